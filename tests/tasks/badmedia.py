"""Generators of good, bad and odd media files for the raw-video task tests.

Everything is made on the fly with the FFmpeg binary that imageio-ffmpeg ships (lavfi test
sources) and scikit-image's public-domain astronaut photo, so no media lives in git.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import imageio_ffmpeg
import numpy as np
from PIL import Image

FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()


def run_ffmpeg(*args: str | Path) -> None:
    """Run the bundled ffmpeg quietly; raise with its stderr on failure."""
    cmd = [FFMPEG, "-nostdin", "-hide_banner", "-loglevel", "error", "-y", *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"ffmpeg failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr}")


def _h264(rate: int) -> list[str]:
    # yuv420p + even sizes: the widely decodable H.264 flavour that real corpora use.
    return ["-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-r", str(rate)]


def testsrc_clip(
    path: Path,
    seconds: float = 1.0,
    size: str = "160x120",
    rate: int = 25,
    audio: bool = True,
    video: bool = True,
    freq: int = 440,
    faststart: bool = False,
) -> Path:
    """An mp4 with FFmpeg's `testsrc` pattern and/or a `sine` tone (48 kHz stereo AAC).

    `faststart` puts the index (moov) before the data, so a truncated copy still opens.
    """
    args: list[str] = []
    if video:
        args += ["-f", "lavfi", "-i", f"testsrc=size={size}:rate={rate}:duration={seconds}"]
    if audio:
        args += ["-f", "lavfi", "-i", f"sine=frequency={freq}:sample_rate=48000:d={seconds}"]
        args += ["-ac", "2"]
    if video:
        args += _h264(rate)
    if audio:
        args += ["-c:a", "aac", "-b:a", "64k"]
    if faststart:
        args += ["-movflags", "+faststart"]
    run_ffmpeg(*args, "-t", str(seconds), path)
    return path


def silent_clip(path: Path, seconds: float = 1.0) -> Path:
    """An mp4 whose audio stream holds digital silence (a stream, but no voice)."""
    run_ffmpeg(
        "-f", "lavfi", "-i", f"testsrc=size=160x120:rate=25:duration={seconds}",
        "-f", "lavfi", "-i", f"anullsrc=r=48000:cl=mono:d={seconds}",
        *_h264(25), "-c:a", "aac", "-t", str(seconds), path,
    )  # fmt: skip
    return path


def audio_only(path: Path, seconds: float = 1.0) -> Path:
    """An mp4 container holding only an AAC tone, no video stream."""
    return testsrc_clip(path, seconds=seconds, video=False)


def video_only(path: Path, seconds: float = 1.0) -> Path:
    """An mp4 with a video stream and no audio stream."""
    return testsrc_clip(path, seconds=seconds, audio=False)


def one_frame(path: Path) -> Path:
    """An mp4 holding exactly one video frame (and a short tone)."""
    run_ffmpeg(
        "-f", "lavfi", "-i", "testsrc=size=160x120:rate=25",
        "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000:d=0.04",
        "-frames:v", "1", *_h264(25), "-c:a", "aac", path,
    )  # fmt: skip
    return path


def zero_byte(path: Path) -> Path:
    """An empty file with a video name."""
    path.write_bytes(b"")
    return path


def text_as_mp4(path: Path) -> Path:
    """A text file named like a video."""
    path.write_text("this is not a video, just text with an .mp4 name\n" * 20, encoding="utf-8")
    return path


def truncated(src: Path, path: Path, keep: float = 0.3) -> Path:
    """The first `keep` fraction of the bytes of `src` (a download cut short)."""
    data = src.read_bytes()
    path.write_bytes(data[: max(1, int(len(data) * keep))])
    return path


def symlink(target: Path, path: Path) -> Path:
    """A symbolic link at `path` to `target`."""
    if path.is_symlink() or path.exists():
        path.unlink()
    os.symlink(target, path)
    return path


def face_image(angle: float = 0.0, size: int = 512) -> np.ndarray:
    """scikit-image's astronaut photo (a real frontal face), optionally rotated, (H, W, 3) RGB."""
    from skimage import data

    img = Image.fromarray(data.astronaut())
    if angle:
        # Rotate about the face centre, not the image centre, so the face stays in frame.
        img = img.rotate(angle, resample=Image.Resampling.BILINEAR, center=(222, 126))
    if size != 512:
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(img)


def face_clip(
    path: Path,
    seconds: float = 1.0,
    rate: int = 10,
    angle: float = 0.0,
    size: int = 512,
    audio: bool = True,
) -> Path:
    """A still video of the astronaut's face (optionally rotated), with a tone track."""
    png = path.with_name(f".{path.stem}-face.png")
    Image.fromarray(face_image(angle, size)).save(png)
    args: list[str | Path] = ["-loop", "1", "-framerate", str(rate), "-i", png]
    if audio:
        args += ["-f", "lavfi", "-i", f"sine=frequency=300:sample_rate=48000:d={seconds}"]
    args += [*_h264(rate), "-t", str(seconds)]
    if audio:
        args += ["-c:a", "aac"]
    run_ffmpeg(*args, path)
    png.unlink()
    return path


def face_then_blank_clip(path: Path, rate: int = 10, blank_first: bool = False) -> Path:
    """One second of the face followed by one second of a plain grey picture (`blank_first`:
    the grey second first)."""
    png = path.with_name(f".{path.stem}-face.png")
    Image.fromarray(face_image(0.0, 256)).save(png)
    order = "[1:v][0:v]" if blank_first else "[0:v][1:v]"
    run_ffmpeg(
        "-loop", "1", "-framerate", str(rate), "-t", "1", "-i", png,
        "-f", "lavfi", "-i", f"color=c=gray:size=256x256:rate={rate}:duration=1",
        "-filter_complex", f"{order}concat=n=2:v=1:a=0[v]", "-map", "[v]",
        *_h264(rate), path,
    )  # fmt: skip
    png.unlink()
    return path
