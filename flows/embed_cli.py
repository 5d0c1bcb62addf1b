"""`merflow task embed-visual|embed-audio|transcribe|embed-text`: one extractor on one video,
locally and without a Prefect server, printing the vector's shape and norms.

Each command runs the flow's stages (built from the same plan) with the same engine on a
one-video shard in a scratch store: what it prints is what the flow would store. Errors take
the exit codes of every merflow command (flows/cli_common.py): a bad video 1, a bad setting or
path 2."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from flows.cli_common import Overrides, ProfileOpt
from flows.config import load_settings
from flows.task_cli import VideoFailedError, optional, run_video, scratch_store

if TYPE_CHECKING:  # the plan loads the extractors (torch): only the commands import it
    import numpy as np

    from flows.plan import ExtractionPlan

VideoArg = Annotated[Path, typer.Argument(help="the video file", dir_okay=False)]
RootOpt = Annotated[
    Path, typer.Option("--data-root", help="where the profile's models live (models/ below it)")
]


def _plan(
    profile: str, overrides: list[str] | None, data_root: Path, official: bool = False
) -> ExtractionPlan:
    from flows.plan import plan_extraction

    settings = load_settings(profile, overrides or [])
    return plan_extraction(settings, data_root.resolve(), None, official=official)


def _report(name: str, vector: np.ndarray, started: float, extra: str = "") -> None:
    import numpy as np

    seconds = time.perf_counter() - started
    typer.echo(
        f"{name}: shape {tuple(vector.shape)}, L2 norm {np.linalg.norm(vector):.4f}, "
        f"mean {vector.mean():+.4f}, std {vector.std():.4f}{extra} ({seconds:.2f} s)"
    )


def _run(
    video: Path, plan: ExtractionPlan, stage: str, official: dict[str, str] | None = None
) -> dict[str, Any]:
    """The rows of `stage` and its upstream stages for VIDEO.

    A missing modality of the stage itself (empty transcript, audio too short) is no error:
    it prints that the video has no vector. Any other failure is raised to the command line's
    one rule (a failed video: exit 1)."""
    from tasks.dag import chain
    from tasks.engine.stage import MissingModalityError

    # An official (given) transcript needs no audio.
    names = [n for n in chain(stage) if not (official and n == "audio")]
    try:
        stages = [plan.stage(name, official) for name in names]
        with scratch_store() as store:
            return run_video(video, stages, store)
    except VideoFailedError as e:
        if e.stage == stage and e.error_type == MissingModalityError.__name__:
            typer.echo(f"{stage}: no vector (missing modality): {e}")
            raise typer.Exit(0) from e
        raise


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
        plan = _plan(profile, overrides, data_root)
        started = time.perf_counter()
        row = _run(video, plan, "visual")["visual"]
        _report("visual", row.embedding, started, f", {row.n_items} face crops")

    @task_app.command("embed-audio")
    def embed_audio(
        video: VideoArg,
        profile: ProfileOpt = "demo",
        data_root: RootOpt = Path("merflow-debug"),
        overrides: Overrides = None,
    ) -> None:
        """The audio split, then HuBERT: mean of the last layers, mean over time."""
        plan = _plan(profile, overrides, data_root)
        started = time.perf_counter()
        rows = _run(video, plan, "acoustic")
        extra = f", {rows['audio'].duration:.2f} s audio"
        _report("acoustic", rows["acoustic"].embedding, started, extra)

    @task_app.command("transcribe")
    def transcribe(
        video: VideoArg,
        profile: ProfileOpt = "demo",
        data_root: RootOpt = Path("merflow-debug"),
        overrides: Overrides = None,
    ) -> None:
        """The audio split, then WeNet ASR (sherpa-onnx)."""
        row = _run(video, _plan(profile, overrides, data_root), "transcribe")["transcribe"]
        typer.echo(f"transcript: {row.text!r} (confidence {optional(row.confidence)})")

    @task_app.command("embed-text")
    def embed_text(
        video: VideoArg,
        text: Annotated[str | None, typer.Option(help="embed this text instead of ASR")] = None,
        profile: ProfileOpt = "demo",
        data_root: RootOpt = Path("merflow-debug"),
        overrides: Overrides = None,
    ) -> None:
        """The transcript (ASR, or --text), then the LLM: mean of the last 4 layers over tokens."""
        plan = _plan(profile, overrides, data_root, official=text is not None)
        started = time.perf_counter()
        given = None if text is None else {video.stem: text}
        rows = _run(video, plan, "text", given)
        _report("text", rows["text"].embedding, started, f", text {rows['transcribe'].text!r}")
