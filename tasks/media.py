"""Raw media: find FFmpeg, probe streams with PyAV, split a video's audio into a 16 kHz mono wav.

Also holds the per-video error types the raw-video stages share, and the audio stage (run by
the engine in tasks/engine/stage.py, which turns them into failure rows).
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import shutil
import signal
import subprocess
import uuid
import wave
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import av
import ffmpeg
import numpy as np
import pandas as pd

from data_contracts import tables
from data_contracts.atomic import atomic_path
from data_contracts.store import Store, store_write_error
from tasks.corrupt import Corruption, add_noise
from tasks.dag import AUDIO
from tasks.defaults import DEFAULT_SAMPLE_RATE
from tasks.engine.errors import BadInputError, TransientError
from tasks.engine.shard import ShardReport
from tasks.engine.stage import Stage, artifact_stage, run_stage

# Videos per ffmpeg process in the audio stage (extract_audio_many).
AUDIO_GROUP = 8
FFMPEG_ENV = "MERFLOW_FFMPEG"


# -- errors: each names one way a video is deterministically unusable ----------------------------
class MissingInputError(BadInputError):
    """The video file is gone (deleted, moved, or a symlink whose target is missing)."""


class UnreadableMediaError(BadInputError):
    """The file is empty, not a media file, or too corrupt to open or decode."""


class TruncatedMediaError(BadInputError):
    """The file opens but its data stops before the duration its header declares."""


class NoAudioStreamError(BadInputError):
    """The video has no audio stream, so acoustic and text features are missing for it."""


class NoVideoStreamError(BadInputError):
    """The file has no video stream, so visual features are missing for it."""


class FFmpegNotFoundError(RuntimeError):
    """No usable ffmpeg binary: a configuration problem, not a property of one video."""


# -- ffmpeg discovery ----------------------------------------------------------------------------
def find_ffmpeg(configured: str | os.PathLike[str] | None = None) -> str:
    """The ffmpeg binary: `configured` (or $MERFLOW_FFMPEG), else PATH's, else imageio-ffmpeg's."""
    configured = configured or os.environ.get(FFMPEG_ENV) or None
    if configured:
        path = shutil.which(str(configured))
        if path is None:
            raise FFmpegNotFoundError(
                f"configured ffmpeg {str(configured)!r} is not an executable file; fix the path "
                f"(setting ffmpeg_bin or ${FFMPEG_ENV}) or unset it to use ffmpeg from PATH or "
                "the binary that imageio-ffmpeg ships"
            )
        return path
    on_path = shutil.which("ffmpeg")
    if on_path:
        return on_path
    try:
        import imageio_ffmpeg

        return imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError) as e:
        raise FFmpegNotFoundError(
            "no ffmpeg found: none configured, none on PATH, and imageio-ffmpeg has no binary "
            f"({e}); install ffmpeg or `pip install imageio-ffmpeg`"
        ) from e


# -- probing -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MediaInfo:
    """What a probe learned about one file's container and its first video and audio streams."""

    path: str
    format_name: str
    duration: float | None
    has_video: bool
    has_audio: bool
    width: int | None = None
    height: int | None = None
    fps: float | None = None
    n_frames: int | None = None
    audio_sample_rate: int | None = None
    audio_channels: int | None = None
    audio_duration: float | None = None


def check_input(path: Path) -> None:
    """Raise a BadInputError when `path` is missing, not a regular file, or empty."""
    if not path.exists():
        why = "a symlink whose target is missing" if path.is_symlink() else "missing"
        raise MissingInputError(
            f"video {path} is {why}; restore the file, or rescan so it leaves the manifest"
        )
    if not path.is_file():
        raise UnreadableMediaError(f"{path} is not a regular file; point the manifest at videos")
    if path.stat().st_size == 0:
        raise UnreadableMediaError(
            f"video {path} is an empty (0-byte) file; re-copy or re-download it"
        )


def media_error(path: Path, e: Exception, what: str = "open") -> Exception:
    """Map a PyAV error on `path` to a BadInputError, or return it unchanged when transient."""
    if isinstance(e, FileNotFoundError):
        return MissingInputError(f"video {path} disappeared while reading it; restore or rescan")
    if isinstance(e, PermissionError):
        return UnreadableMediaError(f"video {path} is not readable ({e}); fix its permissions")
    if isinstance(e, OSError) and (not isinstance(e, av.FFmpegError) or e.errno in _IO_ERRNOS):
        return e  # a real I/O error: transient, re-raised so Prefect retries
    return UnreadableMediaError(
        f"cannot {what} {path} as media ({type(e).__name__}: {e}); the file is corrupt or not a "
        "video: re-encode or re-download it"
    )


_DISK_ERRORS = {code: os.strerror(code) for code in (errno.ENOSPC, errno.EROFS, errno.EDQUOT)}
_IO_ERRNOS = {errno.EIO, errno.EAGAIN, errno.ETIMEDOUT, errno.ENOMEM, errno.ESTALE}


def _seconds(value: Any, time_base: Any) -> float | None:
    if value is None or time_base is None:
        return None
    return float(value * time_base)


def probe(path: str | os.PathLike[str]) -> MediaInfo:
    """Describe `path`'s streams, read with PyAV (no ffprobe); BadInputError when unusable."""
    path = Path(path)
    check_input(path)
    try:
        with av.open(str(path), mode="r") as container:
            video = container.streams.video[0] if container.streams.video else None
            audio = container.streams.audio[0] if container.streams.audio else None
            duration = container.duration / av.time_base if container.duration else None
            info = MediaInfo(
                path=str(path),
                format_name=container.format.name,
                duration=duration,
                has_video=video is not None,
                has_audio=audio is not None,
            )
            if video is not None:
                rate = video.average_rate or video.guessed_rate
                info = replace(
                    info,
                    width=video.codec_context.width or None,
                    height=video.codec_context.height or None,
                    fps=float(rate) if rate else None,
                    n_frames=video.frames or None,
                )
            if audio is not None:
                info = replace(
                    info,
                    audio_sample_rate=audio.codec_context.sample_rate or None,
                    audio_channels=audio.codec_context.channels or None,
                    audio_duration=_seconds(audio.duration, audio.time_base) or duration,
                )
    except (av.FFmpegError, OSError) as e:
        raise media_error(path, e) from e
    if not info.has_video and not info.has_audio:
        raise UnreadableMediaError(f"{path} holds no audio or video stream; it is not a video")
    return info


# -- audio split ---------------------------------------------------------------------------------
def audio_extractor_id(
    sample_rate: int = DEFAULT_SAMPLE_RATE, corruption: Corruption | None = None
) -> str:
    """The extractor id of the audio split, e.g. `ffmpeg-16k-mono-s16`; with a corruption
    (noise mixed in for robustness scoring) `ffmpeg-16k-mono-s16+corrupt-noise10-v1`."""
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    rate = f"{sample_rate // 1000}k" if sample_rate % 1000 == 0 else f"{sample_rate}hz"
    return f"ffmpeg-{rate}-mono-s16" + (f"+{corruption.id}" if corruption else "")


@dataclass(frozen=True)
class AudioResult:
    """One extracted wav: where it is and what it holds."""

    path: Path
    sample_rate: int
    n_samples: int
    duration: float
    speech_ratio: float | None


def audio_command(
    video: Path,
    out: Path,
    ffmpeg_bin: str,
    sample_rate: int = DEFAULT_SAMPLE_RATE,
    threads: int = 0,
) -> list[str]:
    """The ffmpeg command line (built by ffmpeg-python) that writes `video`'s audio to `out`."""
    return audio_command_many([(video, out)], ffmpeg_bin, sample_rate, threads)


def audio_command_many(
    jobs: list[tuple[Path, Path]],
    ffmpeg_bin: str,
    sample_rate: int = DEFAULT_SAMPLE_RATE,
    threads: int = 0,
) -> list[str]:
    """One ffmpeg command line that writes each (video, out) job's first audio stream to its
    out: one input and one output per job, each output mapped to its own input only."""
    # The file: prefix keeps a name with a colon from being read as a protocol (e.g. "a:b.mp4").
    # -threads before an input sets its decoder's threads; 0 leaves ffmpeg's own choice.
    given = {"threads": threads} if threads else {}
    outputs = [
        ffmpeg.input(f"file:{video}", **given)["a:0"].output(
            f"file:{out}",
            vn=None,
            sn=None,
            dn=None,
            ac=1,
            ar=sample_rate,
            acodec="pcm_s16le",
            f="wav",
            map_metadata=-1,
            fflags="+bitexact",  # no encoder tag: the same input gives the same bytes
            **{"flags:a": "+bitexact"},
        )
        for video, out in jobs
    ]
    stream = ffmpeg.merge_outputs(*outputs)
    stream = stream.global_args("-nostdin", "-hide_banner", "-loglevel", "error").overwrite_output()
    return stream.compile(cmd=ffmpeg_bin)


def run_ffmpeg(cmd: list[str], video: Path | str, timeout: float) -> None:
    """Run an ffmpeg command on `video` (what its errors name); a killed or hung process is
    transient, a refusal a bad input."""
    try:
        proc = subprocess.run(cmd, capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as e:
        raise TransientError(
            f"ffmpeg on {video} did not finish in {timeout:.0f} s; retrying"
        ) from e
    stderr = proc.stderr.decode("utf-8", "replace").strip()
    if proc.returncode < 0:
        sig = signal.Signals(-proc.returncode).name
        raise TransientError(f"ffmpeg on {video} was killed by {sig}; retrying")
    if proc.returncode != 0:
        # A full or read-only output disk is the machine's fault, never the video's: recording
        # it as a bad input would skip the video forever.
        for code, text in _DISK_ERRORS.items():
            if text in stderr:
                out = Path([a for a in cmd if a.startswith("file:")][-1].removeprefix("file:"))
                raise store_write_error(
                    OSError(code, os.strerror(code), str(out)), f"audio of {video}", out, out.parent
                )
        raise UnreadableMediaError(
            f"ffmpeg could not decode {video} (exit {proc.returncode}): {stderr[-400:]}; the file "
            "is corrupt: re-encode or re-download it"
        )


def audio_input(video: Path) -> MediaInfo:
    """`video` probed, refused (NoAudioStreamError) when it has no audio stream to split."""
    info = probe(video)
    if not info.has_audio:
        raise _no_audio(video)
    return info


def _no_audio(video: Path) -> NoAudioStreamError:
    return NoAudioStreamError(
        f"video {video} has no audio stream; its acoustic and text features will be marked "
        "missing (nothing to retry)"
    )


def extract_audio(
    video: str | os.PathLike[str],
    out: str | os.PathLike[str],
    ffmpeg_bin: str | None = None,
    sample_rate: int = DEFAULT_SAMPLE_RATE,
    info: MediaInfo | None = None,
    threads: int = 0,
) -> AudioResult:
    """Write `video`'s first audio stream to `out` as mono 16-bit PCM wav, atomically."""
    video, out = Path(video), Path(out)
    if info is None:
        info = audio_input(video)
    else:
        check_input(video)
        if not info.has_audio:
            raise _no_audio(video)
    cmd_bin = find_ffmpeg(ffmpeg_bin)
    with atomic_path(out) as tmp:
        cmd = audio_command(video.resolve(), tmp, cmd_bin, sample_rate, threads)
        run_ffmpeg(cmd, video, timeout=120.0 + 2.0 * (info.duration or 0.0))
        return _checked(video, out, tmp, info, sample_rate)


def _checked(video: Path, out: Path, wav: Path, info: MediaInfo, sample_rate: int) -> AudioResult:
    """The AudioResult of `wav` (written for `out`), or the error of an empty or cut-off one."""
    n_samples = wav_frames(wav)
    duration = n_samples / sample_rate
    if n_samples == 0:
        raise UnreadableMediaError(
            f"the audio stream of {video} decodes to no samples; treat its audio as missing "
            "or re-encode the file"
        )
    declared = info.audio_duration
    # AAC priming makes a few ms of difference; a cut-short file misses far more.
    if declared and duration < declared - max(0.1, 0.02 * declared):
        raise TruncatedMediaError(
            f"audio of {video} stops at {duration:.2f} s of the {declared:.2f} s its header "
            "declares: the file is truncated; re-copy or re-download it"
        )
    return AudioResult(out, sample_rate, n_samples, duration, speech_ratio(wav))


def extract_audio_many(
    jobs: list[tuple[Path, Path]],
    ffmpeg_bin: str | None = None,
    sample_rate: int = DEFAULT_SAMPLE_RATE,
    threads: int = 0,
) -> list[AudioResult | Exception]:
    """extract_audio of each (video, out) job, the group's splits in one ffmpeg process.

    ffmpeg's start-up and input probing are most of a short clip's split: in groups of 8 a
    ~3 s clip costs 12 CPU ms instead of 26 alone (the stage: 47 instead of 29 videos/s,
    benchmarks/raw_video.py). Per job, in order: its
    AudioResult, or the error that fails that video alone: a bad input's, or another (an I/O
    fault) that the stage engine raises after storing the others. When ffmpeg refuses the
    group (one corrupt file), each video is split alone, so that only the bad one fails.
    """
    results: list[AudioResult | Exception | None] = [None] * len(jobs)
    ready: list[tuple[int, Path, Path, MediaInfo]] = []
    for i, (video, out) in enumerate(jobs):
        try:
            ready.append((i, Path(video), Path(out), audio_input(Path(video))))
        except Exception as e:  # this video's own problem, whatever it is
            results[i] = e
    exe = find_ffmpeg(ffmpeg_bin)
    if len(ready) > 1 and _split_together(ready, exe, sample_rate, threads, results):
        ready = []
    for i, video, out, info in ready:
        try:
            results[i] = extract_audio(video, out, exe, sample_rate, info, threads)
        except Exception as e:
            results[i] = e
    return results  # type: ignore[return-value]  # every job has its result now


def _split_together(
    ready: list[tuple[int, Path, Path, MediaInfo]],
    exe: str,
    sample_rate: int,
    threads: int,
    results: list,
) -> bool:
    """Split `ready`'s videos with one ffmpeg process into `results`; False when ffmpeg refused
    the group (nothing is written then). A killed or hung ffmpeg raises (the shard is retried)."""
    tmps = [
        out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.group.tmp") for _, _, out, _ in ready
    ]
    try:
        for _, _, out, _ in ready:
            out.parent.mkdir(parents=True, exist_ok=True)
        jobs = [(video.resolve(), tmp) for (_, video, _, _), tmp in zip(ready, tmps, strict=True)]
        seconds = sum(info.duration or 0.0 for *_, info in ready)
        what = f"{ready[0][1]} and {len(ready) - 1} other videos"
        try:
            run_ffmpeg(
                audio_command_many(jobs, exe, sample_rate, threads), what, 120.0 + 2 * seconds
            )
        except UnreadableMediaError:
            return False
        for (i, video, out, info), written in zip(ready, tmps, strict=True):
            try:
                with atomic_path(out) as tmp:
                    os.replace(written, tmp)
                    results[i] = _checked(video, out, tmp, info, sample_rate)
            except Exception as e:
                results[i] = e
        return True
    finally:
        for tmp in tmps:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()


def wav_frames(path: Path) -> int:
    """Number of samples per channel in a PCM wav file."""
    with wave.open(str(path), "rb") as w:
        return w.getnframes()


def load_wav(path: str | os.PathLike[str]) -> tuple[np.ndarray, int]:
    """A 16-bit PCM wav as float32 mono samples in [-1, 1], and its sample rate."""
    try:
        with wave.open(str(path), "rb") as w:
            if w.getsampwidth() != 2:
                raise UnreadableMediaError(f"{path} is not 16-bit PCM; re-run the audio stage")
            raw, channels, rate = w.readframes(w.getnframes()), w.getnchannels(), w.getframerate()
    except (wave.Error, EOFError) as e:
        raise UnreadableMediaError(
            f"audio artifact {path} is unreadable ({e}); re-run the audio stage"
        ) from e
    x = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
    return (x.reshape(-1, channels).mean(axis=1) if channels > 1 else x), rate


def resample(x: np.ndarray, rate: int, to: int) -> np.ndarray:
    """`x` sampled at `rate` Hz, resampled to `to` Hz (polyphase, with its anti-alias filter)."""
    if rate == to:
        return x
    from scipy.signal import resample_poly

    g = math.gcd(rate, to)
    return resample_poly(x, to // g, rate // g).astype(np.float32)


def read_wav(path: str | os.PathLike[str], sample_rate: int | None = None) -> np.ndarray:
    """A wav's float32 mono samples at `sample_rate` Hz (resampled when the file's rate
    differs), or at the file's own rate when `sample_rate` is None."""
    x, rate = load_wav(path)
    return x if sample_rate is None else resample(x, rate, sample_rate)


def speech_ratio(
    path: Path,
    frame_ms: float = 30.0,
    floor_dbfs: float = -50.0,
    above_noise_db: float = 6.0,
    below_peak_db: float = 30.0,
    chunk_frames: int = 4096,
) -> float | None:
    """Fraction of `frame_ms` frames whose energy is voice-like (energy VAD), read in chunks.

    A frame counts when its RMS level is above `floor_dbfs` (silence), `above_noise_db` over
    the noise floor (10th percentile: a steady hum or tone is not voice), and within
    `below_peak_db` of the loud level (95th percentile).
    """
    with wave.open(str(path), "rb") as w:
        if w.getsampwidth() != 2:
            raise ValueError(f"{path} is not 16-bit PCM; speech_ratio reads s16 wav only")
        rate, channels = w.getframerate(), w.getnchannels()
        hop = max(1, int(rate * frame_ms / 1000))
        levels = []
        while True:
            raw = w.readframes(hop * chunk_frames)
            if not raw:
                break
            x = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
            x = x.reshape(-1, channels).mean(axis=1)
            n = len(x) // hop
            if n == 0:
                break  # a tail shorter than one frame carries no decision
            power = np.mean(x[: n * hop].reshape(n, hop) ** 2, axis=1)
            levels.append(10.0 * np.log10(power + 1e-12))
    if not levels:
        return None
    db = np.concatenate(levels)
    noise, loud = np.percentile(db, [10, 95])
    threshold = max(floor_dbfs, float(noise) + above_noise_db, float(loud) - below_peak_db)
    return float(np.mean(db > threshold))


# -- the stage ----------------------------------------------------------------------------------
def audio_stage(
    ffmpeg_bin: str | None = None,
    sample_rate: int = DEFAULT_SAMPLE_RATE,
    ffmpeg_threads: int = 0,
    corruption: Corruption | None = None,
) -> Stage:
    """The audio split as a stage: AUDIO_GROUP videos per ffmpeg process, ffmpeg looked up
    once per shard. With an audio `corruption` each wav gets its noise before it is stored
    (tasks/corrupt.py), under the corruption's own extractor id."""
    if corruption is not None and corruption.modality != "audio":
        raise ValueError(f"the audio stage takes audio corruptions, not {corruption.name}")

    def setup() -> Any:
        exe = find_ffmpeg(ffmpeg_bin)  # a configuration error stops the shard at once

        def split(jobs: list[tuple[Path, Path]]) -> list[AudioResult | Exception]:
            results = extract_audio_many(jobs, exe, sample_rate, ffmpeg_threads)
            if corruption is None:
                return results
            return [r if isinstance(r, Exception) else _noisy(r, corruption) for r in results]

        return split

    extractor_id = audio_extractor_id(sample_rate, corruption)
    return artifact_stage(AUDIO, tables.AUDIO, extractor_id, ".wav", setup, together=AUDIO_GROUP)


def _noisy(result: AudioResult, c: Corruption) -> AudioResult:
    """A split wav rewritten with `c`'s noise, drawn from a generator seeded by the artifact's
    name (the video's id and bytes' hash): the same noise on every rerun."""
    x, rate = load_wav(result.path)
    mixed = add_noise(x, c, c.rng(result.path.stem))
    with atomic_path(result.path) as tmp:
        with wave.open(str(tmp), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(rate)
            w.writeframes((np.clip(mixed, -1, 1) * 32767).round().astype("<i2").tobytes())
        return replace(result, speech_ratio=speech_ratio(tmp))


def extract_audio_shard(
    videos: pd.DataFrame,
    store: Store,
    ffmpeg_bin: str | None = None,
    sample_rate: int = DEFAULT_SAMPLE_RATE,
    retry_failed: bool = False,
    attempt: int | None = None,
) -> ShardReport:
    """Split the audio of every video in the shard that the audio table lacks."""
    return run_stage(audio_stage(ffmpeg_bin, sample_rate), videos, store, retry_failed, attempt)
