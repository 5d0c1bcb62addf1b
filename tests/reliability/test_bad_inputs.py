"""Bad inputs: a folder of broken media gives good clips every feature and each bad one failure
rows with readable reasons; bad label CSVs and settings are refused before any work starts."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest
from typer.testing import CliRunner

from data_contracts import tables
from data_contracts.store import Store
from flows.cli import app
from tests.reliability.helpers import raw_rows, stage_dirs
from tests.tasks import badmedia

pytestmark = pytest.mark.server

NON_ASCII = "样本_情绪 ü"


@pytest.fixture
def bad_corpus(small_corpus, tmp_path):
    """Four good labelled clips; an unlabelled folder of broken files and one non-ASCII name."""
    root = tmp_path / "corpus"
    labelled, unlabelled = root / "video-labeled", root / "video-unlabeled"
    labelled.mkdir(parents=True)
    unlabelled.mkdir()
    good = sorted((small_corpus / "video-labeled").glob("*.mp4"))[:4]
    for f in good:
        shutil.copy(f, labelled / f.name)
    labels = pd.read_csv(small_corpus / "label-disdim.csv", dtype=str)
    labels[labels.name.isin([f.stem for f in good])].to_csv(root / "label-disdim.csv", index=False)
    shutil.copy(good[0], unlabelled / f"{NON_ASCII}.mp4")
    badmedia.zero_byte(unlabelled / "bad_zero.mp4")
    badmedia.text_as_mp4(unlabelled / "bad_text.mp4")
    badmedia.truncated(good[1], unlabelled / "bad_truncated.mp4", keep=0.5)
    badmedia.face_clip(unlabelled / "bad_noaudio.mp4", seconds=1.0, rate=5, audio=False)
    badmedia.audio_only(unlabelled / "bad_novideo.mp4")
    badmedia.one_frame(unlabelled / "bad_oneframe.mp4")
    badmedia.testsrc_clip(unlabelled / "bad_noface.mp4", seconds=1.0, rate=5)
    return root


def invoke(*args: str):
    return CliRunner().invoke(app, ["extract", *args], catch_exceptions=False)


def test_bad_media_become_failure_rows_and_strict_exits_non_zero(
    prefect_server, bad_corpus, tmp_path, tiny_models
):
    root = tmp_path / "root"
    result = invoke(
        str(bad_corpus),
        "--data-root",
        str(root),
        "--strict",
        f"models.models_dir={tiny_models}",
        "models.build_tiny=false",
        "extract.shard_size=4",
    )
    assert result.exit_code == 3, result.output[-3000:]
    assert "--strict" in result.output

    store = Store(root)
    manifest = store.read(tables.MANIFEST)
    good = {p.stem for p in (bad_corpus / "video-labeled").glob("*.mp4")} | {NON_ASCII}
    bad = set(manifest.video_id) - good
    assert len(bad) == 7
    failures = raw_rows(store.table_dir(tables.FAILURES))
    key = ["video_id", "sha256", "stage", "extractor_id"]
    assert not failures.duplicated(subset=key).any()  # one row per failing stage
    assert (failures.message.str.len() > 20).all() and failures.error_type.notna().all()

    # Good clips, the non-ASCII name included, get every feature and no failure row.
    summary_tables = {
        m: f"features/{m}/" + next((store.stores / "features" / m).iterdir()).name
        for m in ("visual", "acoustic", "text")
    }
    for stage, folder in stage_dirs(root, summary_tables).items():
        rows = raw_rows(folder)
        assert good <= set(rows.video_id), stage
        assert rows.video_id.is_unique, stage
    assert not good & set(failures.video_id)

    # Every bad file has at least one failure row, named in the CLI summary.
    stages = failures.groupby("video_id").stage.apply(set).to_dict()
    messages = failures.set_index(["video_id", "stage"]).message
    for vid in bad:
        assert stages.get(vid), f"{vid} has no failure row"
        assert vid in result.output, f"{vid} missing from the CLI summary"
    assert stages["bad_zero"] == {"probe"} and "empty" in messages["bad_zero", "probe"]
    assert stages["bad_text"] == {"probe"}
    assert "no audio stream" in messages["bad_noaudio", "audio"]
    assert {"audio", "acoustic", "transcribe", "text"} <= stages["bad_noaudio"]
    assert "visual" not in stages["bad_noaudio"]  # its face is fine
    assert "no video stream" in messages["bad_novideo", "faces"]
    assert "audio" not in stages["bad_novideo"]
    assert "no face" in messages["bad_noface", "faces"]
    assert "faces" in stages["bad_oneframe"]


def test_bad_label_csv_is_refused_with_every_problem_before_any_work(
    prefect_server, corpus, tmp_path, model_overrides
):
    csv = corpus / "label-disdim.csv"
    labels = pd.read_csv(csv, dtype=str)
    labels.loc[0, "discrete"] = "furious"
    labels.loc[1, "discrete"] = "bored"
    labels.loc[3, "name"] = labels.loc[2, "name"]
    labels.to_csv(csv, index=False)
    root = tmp_path / "root"
    result = CliRunner().invoke(app, ["extract", str(corpus), "--data-root", str(root)])
    assert result.exit_code != 0
    out = result.output
    assert "'furious'" in out and "'bored'" in out and "duplicate names" in out, out
    assert "valid classes are" in out
    assert not (root / "stores").exists()

    labels[["name"]].to_csv(csv, index=False)  # the label column is gone
    result = CliRunner().invoke(app, ["extract", str(corpus), "--data-root", str(root)])
    assert result.exit_code != 0 and "missing column(s) discrete" in result.output
    assert not (root / "stores").exists()


def test_bad_settings_are_refused_with_every_problem_before_any_work(corpus, tmp_path):
    root = tmp_path / "root"
    result = CliRunner().invoke(
        app,
        [
            "extract",
            str(corpus),
            "--data-root",
            str(root),
            "extract.shard_size=0",
            "faces.backend=mtcnn",
            "models.no_such_knob=1",
            "not-a-pair",
        ],
    )
    assert result.exit_code == 2
    for needle in ("shard_size", "faces.backend", "no_such_knob", "not-a-pair"):
        assert needle in result.output, (needle, result.output)
    assert not root.exists()
