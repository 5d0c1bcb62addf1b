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

from tasks.engine.errors import TransientError
from tasks.faces.frames import BackendUnavailableError, Face, FrameSampler
from tasks.media import UnreadableMediaError

# -- OpenFace ------------------------------------------------------------------------------------
OPENFACE_ENV = "MERFLOW_OPENFACE_BIN"
MERTOOLS = "mertools"
# The aligned images' format per recipe: merflow asks for png, the baseline kept OpenFace's bmp
# (both lossless: the same pixels).
ALIGNED_FORMAT = {"merflow": "png", MERTOOLS: "bmp"}


class OpenFaceBackend:
    """OpenFace 2's `FeatureExtraction`, run as a recipe says: merflow's (similarity-aligned
    faces at `size`, unmasked, badly aligned and failed frames dropped) or "mertools", the
    challenge baseline's (OpenFace's defaults: 112 px at scale 0.7, the background masked black,
    every frame kept, a failed one as the black crop OpenFace writes for it).

    Confidence is OpenFace's landmark-tracking confidence in [0, 1]; landmarks: its 68 2-D
    points (none, and a NaN box, for a failed frame). FeatureExtraction follows one face, so a
    frame rarely has more than one.
    """

    name = "openface"

    def __init__(
        self, binary: str | None = None, timeout_per_frame: float = 2.0, recipe: str = "merflow"
    ):
        if recipe not in ALIGNED_FORMAT:
            raise ValueError(
                f"unknown OpenFace recipe {recipe!r}; choose one of {', '.join(ALIGNED_FORMAT)}"
            )
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
        if self.recipe == MERTOOLS:
            # The baseline's `-f video -out_dir dir` with OpenFace's alignment defaults (112 px,
            # scale 0.7, masked, .bmp, an image for every frame). `size` is not passed: the
            # face's size in pixels is set by the scale, so -simsize would only widen the canvas
            # around it; the reader resizes to `size`. Asking for some outputs instead of all
            # (the baseline's) changes what is written, not the crops; -q: no windows.
            return [
                self.binary, "-f", str(video), "-out_dir", str(out_dir), "-simalign", "-2Dfp", "-q",
            ]  # fmt: skip
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
            yield from parse_openface_output(out_dir, link.stem, sampler, size, video, self.recipe)


def sampler_frames_hint(video: Path) -> int:
    """A frame count for sizing time limits (0 when the container does not say)."""
    try:
        with av.open(str(video)) as c:
            return int(c.streams.video[0].frames) if c.streams.video else 0
    except (av.FFmpegError, OSError):
        return 0


def parse_openface_output(
    out_dir: Path,
    stem: str,
    sampler: FrameSampler,
    size: int,
    video: Path | None = None,
    recipe: str = "merflow",
) -> Iterator[Face]:
    """Faces from FeatureExtraction's `<stem>.csv` and `<stem>_aligned/frame_det_*`, the
    largest (by landmark extent) of each frame first. merflow: tracked faces only; mertools:
    failed frames too, as the crops OpenFace wrote for them (black), as the baseline reads
    every image of the folder."""
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
    suffix = ALIGNED_FORMAT[recipe]
    keep_failed = recipe == MERTOOLS
    sampler.plan(len(by_frame), None)
    for frame in sorted(by_frame):
        candidates = by_frame[frame]
        t = float(candidates[0].get("timestamp") or 0.0)
        if not sampler.accept(t):
            continue
        # OpenFace numbers frames from 1; merflow's frame_idx counts from 0 like the decoder.
        sampler.times[frame - 1] = t
        kept = [r for r in candidates if keep_failed or _tracked(r)]
        kept.sort(key=lambda r: -_area(r))  # stable: max()'s pick first; failed rows last
        for rank, row in enumerate(kept):
            face_id = int(float(row.get("face_id", "0") or 0))
            image = aligned / f"frame_det_{face_id:02d}_{frame:06d}.{suffix}"
            tracked = _tracked(row)
            if image.is_file():
                crop = _read_aligned(image, size)
            elif not tracked:
                # OpenFace's defaults write a black image for a failed frame; one it did not
                # write is that same black crop (the baseline's mean counts every frame).
                crop = np.zeros((size, size, 3), np.uint8)
            else:
                # -nobadaligned: no image for a face OpenFace judged badly aligned (its rank
                # stays taken, so another face never stands in for the largest).
                continue
            yield Face(
                frame - 1,
                crop,
                _landmark_box(row) if tracked else (math.nan,) * 4,
                float(row.get("confidence", "nan")),
                rank,
                _landmarks(row) if tracked else None,
            )


def _tracked(row: dict[str, str]) -> bool:
    """Whether OpenFace tracked the face of this row (its `success` column)."""
    return int(float(row.get("success", "1"))) == 1


def _area(row: dict[str, str]) -> float:
    """A row's landmark extent; 0 for a failed frame, whose landmarks locate no face."""
    return _landmark_area(_landmark_box(row)) if _tracked(row) else 0.0


def _read_aligned(image: Path, size: int) -> np.ndarray:
    """An aligned image OpenFace wrote (BGR), as a `size` x `size` RGB crop."""
    bgr = cv2.imread(str(image), cv2.IMREAD_COLOR)
    if bgr is None:
        raise UnreadableMediaError(f"OpenFace's aligned image {image} is unreadable")
    crop = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    if crop.shape[:2] != (size, size):
        crop = cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA)
    return crop


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
