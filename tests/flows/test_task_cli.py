"""`merflow task embed-*|transcribe` run one extractor on one video without a server."""

from __future__ import annotations

import re

from typer.testing import CliRunner

from flows.cli import app


def test_extractor_commands_print_shape_and_norm(small_corpus, tiny_models, tmp_path):
    video = sorted((small_corpus / "video-labeled").glob("*.mp4"))[0]
    common = [str(video), "--data-root", str(tmp_path), f"models.models_dir={tiny_models}"]
    runner = CliRunner()
    for command, modality in (("embed-visual", "visual"), ("embed-audio", "acoustic")):
        result = runner.invoke(app, ["task", command, *common, "models.build_tiny=false"])
        assert result.exit_code == 0, result.output
        match = re.search(rf"{modality}: shape \((\d+),\), L2 norm ([0-9.]+)", result.output)
        assert match and int(match[1]) > 0 and float(match[2]) > 0, result.output
    result = runner.invoke(app, ["task", "transcribe", *common, "models.build_tiny=false"])
    assert result.exit_code == 0 and "transcript:" in result.output, result.output
    text = ["task", "embed-text", *common, "models.build_tiny=false", "--text", "今天很开心"]
    result = runner.invoke(app, text)
    assert result.exit_code == 0 and "text: shape" in result.output, result.output


def test_bad_video_is_a_clear_error(tmp_path, tiny_models):
    bad = tmp_path / "broken.mp4"
    bad.write_text("not a video")
    result = CliRunner().invoke(
        app,
        [
            "task",
            "embed-audio",
            str(bad),
            "--data-root",
            str(tmp_path),
            f"models.models_dir={tiny_models}",
        ],
    )
    assert result.exit_code == 1 and "broken.mp4" in result.output
