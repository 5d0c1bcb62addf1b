"""The OpenFace backend: OpenFace 2's `FeatureExtraction` binary run on the file, as the paper
and the challenge baseline do, and its CSV and aligned images read back."""

from __future__ import annotations

import csv
import math
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import av
import cv2
import numpy as np

from tasks.errors import TransientError
from tasks.face_frames import BackendUnavailableError, Face, FrameSampler
from tasks.media import UnreadableMediaError

# -- OpenFace ------------------------------------------------------------------------------------
OPENFACE_ENV = "MERFLOW_OPENFACE_BIN"


class OpenFaceBackend:
    """OpenFace 2's `FeatureExtraction`: similarity-aligned faces, masks off, bad frames dropped.

    Confidence is OpenFace's landmark-tracking confidence in [0, 1]; landmarks: its 68 2-D
    points. FeatureExtraction follows one face, so a frame rarely has more than one.
    """

    name = "openface"

    def __init__(
        self, binary: str | None = None, timeout_per_frame: float = 2.0, recipe: str = "merflow"
    ):
        configured = binary or os.environ.get(OPENFACE_ENV) or None
        resolved = shutil.which(configured) if configured else shutil.which("FeatureExtraction")
        if resolved is None:
            where = f"configured binary {configured!r} is not executable" if configured else (
                "no binary is configured and none named FeatureExtraction is on PATH"
            )  # fmt: skip
            raise BackendUnavailableError(
                f"backend 'openface' needs OpenFace 2's FeatureExtraction: {where}; set "
                f"openface_bin (or ${OPENFACE_ENV}) to its path (the Docker worker image builds "
                "it), or choose backend=dlib"
            )
        self.binary = resolved
        self.timeout_per_frame = timeout_per_frame
        self.recipe = recipe

    def command(self, video: Path, out_dir: Path, size: int) -> list[str]:
        """The FeatureExtraction command line that aligns `video`'s faces into `out_dir`."""
        return [
            self.binary, "-f", str(video), "-out_dir", str(out_dir),
            "-simalign", "-simsize", str(size), "-nomask", "-format_aligned", "png",
            "-nobadaligned", "-2Dfp", "-q",
        ]  # fmt: skip

    def faces(self, video: Path, sampler: FrameSampler, size: int) -> Iterator[Face]:
        """Run FeatureExtraction on `video` in a scratch folder and read back its faces."""
        with tempfile.TemporaryDirectory(prefix="merflow-openface-") as tmp:
            scratch = Path(tmp)
            # A plain ASCII name: OpenFace names its outputs after the input and trips on others.
            link = scratch / f"input{video.suffix.lower() or '.mp4'}"
            os.symlink(video.resolve(), link)
            out_dir = scratch / "out"
            n = sampler_frames_hint(video)
            try:
                proc = subprocess.run(
                    self.command(link, out_dir, size),
                    capture_output=True,
                    timeout=120 + self.timeout_per_frame * n,
                    check=False,
                )
            except subprocess.TimeoutExpired as e:
                raise TransientError(f"OpenFace on {video} ran over its time limit") from e
            if proc.returncode < 0:
                name = signal.Signals(-proc.returncode).name
                raise TransientError(f"OpenFace on {video} was killed by {name}; retrying")
            if proc.returncode != 0:
                tail = proc.stderr.decode("utf-8", "replace")[-400:]
                raise UnreadableMediaError(
                    f"OpenFace FeatureExtraction failed on {video} (exit {proc.returncode}): "
                    f"{tail}; check the file plays, or try backend=dlib"
                )
            yield from parse_openface_output(out_dir, link.stem, sampler, size, video)


def sampler_frames_hint(video: Path) -> int:
    """A frame count for sizing time limits (0 when the container does not say)."""
    try:
        with av.open(str(video)) as c:
            return int(c.streams.video[0].frames) if c.streams.video else 0
    except (av.FFmpegError, OSError):
        return 0


def parse_openface_output(
    out_dir: Path, stem: str, sampler: FrameSampler, size: int, video: Path | None = None
) -> Iterator[Face]:
    """Faces from FeatureExtraction's `<stem>.csv` and `<stem>_aligned/frame_det_*.png`, the
    largest (by landmark extent) of each frame first."""
    table = out_dir / f"{stem}.csv"
    if not table.is_file():
        raise UnreadableMediaError(
            f"OpenFace wrote no {table.name} for {video or stem}: it could not read the video; "
            "check the file plays, or try backend=dlib"
        )
    with open(table, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, skipinitialspace=True))  # headers are ", confidence"...
    by_frame: dict[int, list[dict[str, str]]] = {}
    for row in rows:
        by_frame.setdefault(int(float(row["frame"])), []).append(row)
    aligned = out_dir / f"{stem}_aligned"
    sampler.plan(len(by_frame), None)
    for frame in sorted(by_frame):
        candidates = by_frame[frame]
        t = float(candidates[0].get("timestamp") or 0.0)
        if not sampler.accept(t):
            continue
        # OpenFace numbers frames from 1; merflow's frame_idx counts from 0 like the decoder.
        sampler.times[frame - 1] = t
        good = [r for r in candidates if int(float(r.get("success", "1"))) == 1]
        good.sort(key=lambda r: -_landmark_area(_landmark_box(r)))  # stable: max()'s pick first
        for rank, row in enumerate(good):
            face_id = int(float(row.get("face_id", "0") or 0))
            image = aligned / f"frame_det_{face_id:02d}_{frame:06d}.png"
            if not image.is_file():
                # -nobadaligned: no image for a face OpenFace judged badly aligned (its rank
                # stays taken, so another face never stands in for the largest).
                continue
            bgr = cv2.imread(str(image), cv2.IMREAD_COLOR)
            if bgr is None:
                raise UnreadableMediaError(f"OpenFace's aligned image {image} is unreadable")
            crop = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            if crop.shape[:2] != (size, size):
                crop = cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA)
            yield Face(
                frame - 1,
                crop,
                _landmark_box(row),
                float(row.get("confidence", "nan")),
                rank,
                _landmarks(row),
            )


def _landmark_box(row: dict[str, str]) -> tuple[float, float, float, float]:
    xs = [float(v) for k, v in row.items() if k.startswith("x_") and k[2:].isdigit()]
    ys = [float(v) for k, v in row.items() if k.startswith("y_") and k[2:].isdigit()]
    if not xs or not ys:
        return (math.nan,) * 4
    return (min(xs), min(ys), max(xs), max(ys))


def _landmarks(row: dict[str, str]) -> np.ndarray | None:
    """The 68 2-D landmarks (x_0..x_67, y_0..y_67) of a row, or None when it has none."""
    xs = [row.get(f"x_{i}") for i in range(68)]
    ys = [row.get(f"y_{i}") for i in range(68)]
    if any(v in (None, "") for v in xs + ys):
        return None
    return np.array([xs, ys], dtype=np.float32).T


def _landmark_area(box: tuple[float, float, float, float]) -> float:
    area = (box[2] - box[0]) * (box[3] - box[1])
    return area if math.isfinite(area) else 0.0
