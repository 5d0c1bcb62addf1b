"""`merflow task embed-visual|embed-audio|transcribe|embed-text`: one extractor on one video,
locally and without a Prefect server, printing the vector's shape and norms."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from flows.config import SettingsError, load_settings
from flows.plan import face_settings, model_choices
from tasks.embed import read_wav
from tasks.errors import MerflowError
from tasks.faces import crop_faces, load_crops
from tasks.media import extract_audio

VideoArg = Annotated[Path, typer.Argument(help="the video file", dir_okay=False)]
ProfileOpt = Annotated[str, typer.Option("--profile", "-p", help="settings profile")]
RootOpt = Annotated[
    Path, typer.Option("--data-root", help="where the profile's models live (models/ below it)")
]
Overrides = Annotated[list[str] | None, typer.Argument(help="key=value setting overrides")]


def _setup(profile: str, overrides: list[str] | None, data_root: Path):
    try:
        settings = load_settings(profile, overrides or [])
    except SettingsError as e:
        typer.secho(str(e), err=True, fg=typer.colors.RED)
        raise typer.Exit(2) from e
    return settings, model_choices(settings, data_root.resolve())


def _report(name: str, vector: np.ndarray | None, started: float, extra: str = "") -> None:
    if vector is None:
        typer.echo(f"{name}: no vector (missing modality){extra}")
        return
    seconds = time.perf_counter() - started
    typer.echo(
        f"{name}: shape {tuple(vector.shape)}, L2 norm {np.linalg.norm(vector):.4f}, "
        f"mean {vector.mean():+.4f}, std {vector.std():.4f}{extra} ({seconds:.2f} s)"
    )


def _run(fn):
    try:
        return fn()
    except MerflowError as e:
        typer.secho(f"bad input: {e}", err=True, fg=typer.colors.RED)
        raise typer.Exit(1) from e
    except (FileNotFoundError, ValueError) as e:
        typer.secho(f"{type(e).__name__}: {e}", err=True, fg=typer.colors.RED)
        raise typer.Exit(2) from e


def _wave(video: Path, sample_rate: int, ffmpeg_bin: str | None) -> np.ndarray:
    with tempfile.TemporaryDirectory() as tmp:
        out = extract_audio(video, Path(tmp) / "audio.wav", ffmpeg_bin, sample_rate)
        return read_wav(out.path)


def register(task_app: typer.Typer) -> None:
    """Add the four extractor commands to `merflow task`."""

    @task_app.command("embed-visual")
    def embed_visual(
        video: VideoArg,
        profile: ProfileOpt = "demo",
        data_root: RootOpt = Path("merflow-debug"),
        overrides: Overrides = None,
    ) -> None:
        """Face crops, then CLIP features per crop, mean-pooled."""
        settings, models = _setup(profile, overrides, data_root)
        started = time.perf_counter()

        def work():
            with tempfile.TemporaryDirectory() as tmp:
                result = crop_faces(video, Path(tmp) / "crops.npz", face_settings(settings))
                crops = load_crops(result.path).crops
            feats = models["visual"].load().embed(list(crops))
            _report("visual", feats.mean(0), started, f", {len(crops)} face crops")

        _run(work)

    @task_app.command("embed-audio")
    def embed_audio(
        video: VideoArg,
        profile: ProfileOpt = "demo",
        data_root: RootOpt = Path("merflow-debug"),
        overrides: Overrides = None,
    ) -> None:
        """16 kHz audio, then HuBERT: mean of the last layers, mean over time."""
        settings, models = _setup(profile, overrides, data_root)
        started = time.perf_counter()

        def work():
            wave = _wave(video, settings.audio.sample_rate, settings.audio.ffmpeg_bin)
            vec = models["acoustic"].load().embed([wave])[0]
            _report(
                "acoustic", vec, started, f", {len(wave) / settings.audio.sample_rate:.2f} s audio"
            )

        _run(work)

    @task_app.command("transcribe")
    def transcribe(
        video: VideoArg,
        profile: ProfileOpt = "demo",
        data_root: RootOpt = Path("merflow-debug"),
        overrides: Overrides = None,
    ) -> None:
        """16 kHz audio, then WeNet ASR (sherpa-onnx)."""
        settings, models = _setup(profile, overrides, data_root)

        def work():
            wave = _wave(video, settings.audio.sample_rate, settings.audio.ffmpeg_bin)
            t = models["asr"].load().transcribe([wave])[0]
            typer.echo(f"transcript: {t.text!r} (confidence {t.confidence})")

        _run(work)

    @task_app.command("embed-text")
    def embed_text(
        video: VideoArg,
        text: Annotated[str | None, typer.Option(help="embed this text instead of ASR")] = None,
        profile: ProfileOpt = "demo",
        data_root: RootOpt = Path("merflow-debug"),
        overrides: Overrides = None,
    ) -> None:
        """The transcript (ASR, or --text), then the LLM: mean of the last 4 layers over tokens."""
        settings, models = _setup(profile, overrides, data_root)
        started = time.perf_counter()

        def work():
            nonlocal text
            if text is None:
                wave = _wave(video, settings.audio.sample_rate, settings.audio.ffmpeg_bin)
                text = models["asr"].load().transcribe([wave])[0].text
            vec = models["text"].load().embed([text])[0]
            _report("text", vec, started, f", text {text!r}")

        _run(work)
