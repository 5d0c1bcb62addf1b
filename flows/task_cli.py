"""`merflow task ...`: run one task on one video, without any Prefect server.

Every command builds the same stages as the flow and runs them with the same engine
(`tasks.engine.stage.run_stage`) on a one-video shard in a scratch store, then prints what they did,
so a person can debug a video that failed in a flow run. The raw-video commands copy their
artifact out of the scratch store (`--out`).
"""

from __future__ import annotations

import contextlib
import math
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from flows.cli_common import Overrides, ProfileOpt
from flows.config import Settings, SettingsError, load_settings
from tasks.engine.errors import BadInputError, TransientError

# pandas, the stores and the tasks (Prefect, av, cv2) load in the commands that run them, so
# that `merflow --help` and every other command start without them.
if TYPE_CHECKING:
    import pandas as pd

    from data_contracts.store import Store
    from tasks.engine.stage import Stage
    from tasks.media import MediaInfo

task_app = typer.Typer(
    help="Run one task on one video locally (no Prefect server) and print what it did.",
    no_args_is_help=True,
)

VideoArg = Annotated[
    Path, typer.Argument(help="the video file", exists=False, dir_okay=False, show_default=False)
]


class VideoFailedError(BadInputError):
    """A stage recorded a failure row for the video (its message says why)."""

    def __init__(self, stage: str, error_type: str, message: str):
        super().__init__(f"{stage}: {message}")
        self.stage, self.error_type = stage, error_type


# -- one video through the engine -----------------------------------------------------------------
def one_video(video: Path) -> pd.DataFrame:
    """A one-video shard: the manifest row a scan would write (id: the file stem)."""
    import pandas as pd

    from tasks.corpus.scan import sha256_file

    try:
        sha = sha256_file(video)
    except OSError:  # missing or unreadable: the first stage records why
        sha = "0" * 64
    return pd.DataFrame({"video_id": [video.stem], "sha256": [sha], "path": [str(video)]})


def run_video(video: Path, stages: list[Stage], store: Store) -> dict[str, Any]:
    """Run `stages` (upstream first) on `video` with the engine; each stage's row, by name.

    A stage that records a failure row raises it as VideoFailedError; configuration and
    transient errors escape as they are. A stage whose row is already stored is not rerun,
    and failures are retried (`retry_failed`).
    """
    from data_contracts import tables
    from tasks.engine.stage import run_stage

    videos = one_video(video)
    vid, sha = videos.video_id[0], videos.sha256[0]
    out: dict[str, Any] = {}
    for stage in stages:
        run_stage(stage, videos, store, retry_failed=True)
        where = {"video_id": [vid], "extractor_id": [stage.extractor_id]}
        rows = store.read(stage.table, where=where)
        rows = rows[rows.sha256 == sha]
        if rows.empty:
            failed = store.read(tables.FAILURES, where={**where, "stage": [stage.name]})
            if failed.empty:
                raise VideoFailedError(stage.name, "Error", "no row and no failure recorded")
            raise VideoFailedError(stage.name, failed.error_type.iloc[0], failed.message.iloc[0])
        out[stage.name] = rows.iloc[0]
    return out


@contextlib.contextmanager
def scratch_store() -> Iterator[Store]:
    """A store in a temporary folder, removed afterwards (the commands keep no tables)."""
    from data_contracts.store import Store

    with tempfile.TemporaryDirectory(prefix="merflow-task-") as tmp:
        yield Store(Path(tmp))


def optional(value: Any) -> Any:
    """None for a missing (None or NaN) stored value."""
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


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


def profile_settings(profile: str, overrides: list[str] | None) -> Settings:
    """The profile's settings with the overrides; wrong ones exit 2 naming every problem."""
    try:
        return load_settings(profile, overrides or [])
    except SettingsError as e:
        typer.secho(str(e), err=True, fg=typer.colors.RED)
        raise typer.Exit(2) from e


def _copy_out(store: Store, row: Any, dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(store.local_file(row.path), dest)
    return dest


@task_app.command("extract-audio")
def extract_audio_cmd(
    video: VideoArg,
    out: Annotated[Path, typer.Option("--out", help="folder for <video stem>.wav")] = Path("."),
    ffmpeg_bin: Annotated[
        str | None, typer.Option("--ffmpeg", help="ffmpeg binary (default: PATH, then bundled)")
    ] = None,
    sample_rate: Annotated[
        int | None, typer.Option(help="output sample rate in Hz (default: audio.sample_rate)")
    ] = None,
    profile: ProfileOpt = "demo",
    overrides: Overrides = None,
) -> None:
    """Split VIDEO's audio into a mono 16-bit wav, as the extract-audio task does with the
    profile's audio settings."""
    from tasks.media import FFmpegNotFoundError, audio_stage, find_ffmpeg, probe

    audio = profile_settings(profile, overrides).audio
    start = time.perf_counter()
    try:
        info = probe(video)
        typer.echo(f"probed   {video}: {_describe(info)}")
        exe = find_ffmpeg(ffmpeg_bin or audio.ffmpeg_bin)
        typer.echo(f"ffmpeg   {exe}")
        stage = audio_stage(exe, sample_rate or audio.sample_rate, audio.ffmpeg_threads)
        with scratch_store() as store:
            row = run_video(video, [stage], store)[stage.name]
            path = _copy_out(store, row, out / f"{video.stem}.wav")
    except (BadInputError, TransientError, FFmpegNotFoundError, OSError, ValueError) as e:
        raise _fail(e) from e
    ratio = optional(row.speech_ratio)
    ratio = "n/a" if ratio is None else f"{ratio:.2f}"
    typer.echo(f"wrote    {path} ({stage.extractor_id})")
    typer.echo(
        f"audio    {row.n_samples} samples at {row.sample_rate} Hz = "
        f"{row.duration:.2f} s, speech ratio {ratio}"
    )
    typer.echo(f"took     {time.perf_counter() - start:.2f} s")


@task_app.command("crop-faces")
def crop_faces_cmd(
    video: VideoArg,
    out: Annotated[Path, typer.Option("--out", help="folder for <stem>.faces.npz")] = Path("."),
    profile: ProfileOpt = "demo",
    backend: Annotated[str | None, typer.Option(help="dlib, opencv or openface")] = None,
    size: Annotated[int | None, typer.Option(help="side of the aligned crops in pixels")] = None,
    fps: Annotated[float | None, typer.Option(help="sample at most this many frames/s")] = None,
    max_frames: Annotated[int | None, typer.Option(help="sample at most this many frames")] = None,
    detect_max_side: Annotated[
        int | None, typer.Option(help="detect on frames shrunk to this")
    ] = None,
    openface_bin: Annotated[
        str | None, typer.Option(help="OpenFace FeatureExtraction binary (backend openface)")
    ] = None,
    select: Annotated[
        str | None, typer.Option(help="faces kept: largest (of each frame) or speaking (track)")
    ] = None,
    preview: Annotated[
        Path | None,
        typer.Option(help="write a contact sheet to this PNG: a row per track, the chosen marked"),
    ] = None,
    overrides: Overrides = None,
) -> None:
    """Align and track every face of each sampled frame of VIDEO and keep the ones `--select`
    chooses, as the crop-faces task does with the profile's face settings (`faces.*`; an option
    given here replaces the profile's value)."""
    import dataclasses

    from flows.plan import face_settings
    from tasks.faces.backends import BackendUnavailableError
    from tasks.faces.crop import faces_stage
    from tasks.faces.crop_files import load_tracks, track_sheet
    from tasks.media import probe

    given = {
        "backend": backend,
        "size": size,
        "fps": fps,
        "max_frames": max_frames,
        "detect_max_side": detect_max_side,
        "openface_bin": openface_bin,
        "select": select,
    }
    profiled = profile_settings(profile, overrides)
    start = time.perf_counter()
    try:
        settings = dataclasses.replace(
            face_settings(profiled), **{k: v for k, v in given.items() if v is not None}
        )
        info = probe(video)
        typer.echo(f"probed   {video}: {_describe(info)}")
        typer.echo(
            f"faces    {settings.backend}, {settings.size} px, select {settings.select}, detect "
            f"every {settings.detect_every} (profile {profile}; {settings.extractor_id})"
        )
        with scratch_store() as store:
            row = run_video(video, [faces_stage(settings)], store)["faces"]
            path = _copy_out(store, row, out / f"{video.stem}.faces.npz")
    except (BadInputError, TransientError, BackendUnavailableError, OSError, ValueError) as e:
        raise _fail(e) from e
    conf = optional(row.mean_confidence)
    conf = "n/a" if conf is None else f"{conf:.3f}"
    typer.echo(
        f"frames   {row.n_frames_decoded} decoded, {row.n_frames_sampled} sampled, "
        f"a chosen face in {row.face_ratio:.0%} of them, any face in {row.any_face_ratio:.0%}; "
        f"mean confidence {conf}"
    )
    side = settings.size
    typer.echo(f"wrote    {path} ({row.n_faces} x {side}x{side} RGB crops)")
    tracks = load_tracks(path)
    others = len(tracks.frame_idx) - int(tracks.chosen.sum())
    typer.echo(f"tracks   {tracks.n_tracks} ({others} faces not chosen), {len(tracks.cuts)} cuts")
    typer.echo(f"select   {tracks.select_reason}")
    if preview is not None:
        track_sheet(tracks, preview)
        typer.echo(f"preview  {preview}")
    typer.echo(f"took     {time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    task_app()
