"""`merflow task ...`: run one raw-video task on one video, without any Prefect server.

The commands call the same plain functions as the Prefect tasks and print what they did, so a
person can debug a video that failed in a flow run.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from tasks.errors import BadInputError, TransientError
from tasks.face_backends import BackendUnavailableError
from tasks.faces import FaceSettings, contact_sheet, crop_faces, load_crops
from tasks.media import (
    DEFAULT_SAMPLE_RATE,
    FFmpegNotFoundError,
    MediaInfo,
    audio_extractor_id,
    extract_audio,
    find_ffmpeg,
    probe,
)

task_app = typer.Typer(
    help="Run one task on one video locally (no Prefect server) and print what it did.",
    no_args_is_help=True,
)

VideoArg = Annotated[
    Path, typer.Argument(help="the video file", exists=False, dir_okay=False, show_default=False)
]


def _fail(e: Exception) -> typer.Exit:
    kind = "bad input" if isinstance(e, BadInputError) else type(e).__name__
    typer.secho(f"{kind}: {e}", err=True, fg=typer.colors.RED)
    return typer.Exit(code=1 if isinstance(e, BadInputError) else 2)


def _describe(info: MediaInfo) -> str:
    parts = [info.format_name.split(",")[0]]
    if info.duration is not None:
        parts.append(f"{info.duration:.2f} s")
    if info.has_video:
        parts.append(f"video {info.width}x{info.height} @ {info.fps or 0:.2f} fps")
        if info.n_frames:
            parts.append(f"{info.n_frames} frames")
    if info.has_audio:
        parts.append(f"audio {info.audio_sample_rate} Hz x{info.audio_channels}")
    else:
        parts.append("no audio")
    return ", ".join(parts)


@task_app.command("extract-audio")
def extract_audio_cmd(
    video: VideoArg,
    out: Annotated[Path, typer.Option("--out", help="folder for <video stem>.wav")] = Path("."),
    ffmpeg_bin: Annotated[
        str | None, typer.Option("--ffmpeg", help="ffmpeg binary (default: PATH, then bundled)")
    ] = None,
    sample_rate: Annotated[int, typer.Option(help="output sample rate in Hz")] = (
        DEFAULT_SAMPLE_RATE
    ),
) -> None:
    """Split VIDEO's audio into a mono 16-bit wav, as the extract-audio task does."""
    start = time.perf_counter()
    try:
        info = probe(video)
        typer.echo(f"probed   {video}: {_describe(info)}")
        exe = find_ffmpeg(ffmpeg_bin)
        typer.echo(f"ffmpeg   {exe}")
        result = extract_audio(video, out / f"{video.stem}.wav", exe, sample_rate, info=info)
    except (BadInputError, TransientError, FFmpegNotFoundError, OSError, ValueError) as e:
        raise _fail(e) from e
    ratio = "n/a" if result.speech_ratio is None else f"{result.speech_ratio:.2f}"
    typer.echo(f"wrote    {result.path} ({audio_extractor_id(sample_rate)})")
    typer.echo(
        f"audio    {result.n_samples} samples at {result.sample_rate} Hz = "
        f"{result.duration:.2f} s, speech ratio {ratio}"
    )
    typer.echo(f"took     {time.perf_counter() - start:.2f} s")


@task_app.command("crop-faces")
def crop_faces_cmd(
    video: VideoArg,
    backend: Annotated[str, typer.Option(help="dlib, opencv or openface")] = "dlib",
    out: Annotated[Path, typer.Option("--out", help="folder for <stem>.faces.npz")] = Path("."),
    size: Annotated[int, typer.Option(help="side of the aligned crops in pixels")] = 112,
    fps: Annotated[float | None, typer.Option(help="sample at most this many frames/s")] = None,
    max_frames: Annotated[int | None, typer.Option(help="sample at most this many frames")] = None,
    detect_max_side: Annotated[int, typer.Option(help="detect on frames shrunk to this")] = 640,
    openface_bin: Annotated[
        str | None, typer.Option(help="OpenFace FeatureExtraction binary (backend openface)")
    ] = None,
    preview: Annotated[
        Path | None, typer.Option(help="write a contact sheet of the crops to this PNG")
    ] = None,
) -> None:
    """Align the largest face of each sampled frame of VIDEO, as the crop-faces task does."""
    start = time.perf_counter()
    try:
        settings = FaceSettings(
            backend=backend,
            size=size,
            fps=fps,
            max_frames=max_frames,
            detect_max_side=detect_max_side,
            openface_bin=openface_bin,
        )
        info = probe(video)
        typer.echo(f"probed   {video}: {_describe(info)}")
        typer.echo(f"backend  {backend} ({settings.extractor_id})")
        result = crop_faces(video, out / f"{video.stem}.faces.npz", settings)
    except (BadInputError, TransientError, BackendUnavailableError, OSError, ValueError) as e:
        raise _fail(e) from e
    conf = "n/a" if result.mean_confidence is None else f"{result.mean_confidence:.3f}"
    typer.echo(
        f"frames   {result.n_frames_decoded} decoded, {result.n_frames_sampled} sampled, "
        f"{result.n_faces} with a face ({result.face_ratio:.0%}), mean confidence {conf}"
    )
    typer.echo(f"wrote    {result.path} ({result.n_faces} x {size}x{size} RGB crops)")
    if preview is not None:
        contact_sheet(load_crops(result.path).crops, preview)
        typer.echo(f"preview  {preview}")
    typer.echo(f"took     {time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    task_app()
