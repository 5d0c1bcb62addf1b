"""Face crops: the largest face of each sampled frame, aligned, stored as one `.npz` per video.

The crops file holds `crops` (n, size, size, 3) uint8 RGB, `frame_idx` (n,) int32, `boxes`
(n, 4) float32 (x0, y0, x1, y1 in frame pixels) and `confidence` (n,) float32. Zero faces in a
video is a recorded failure of the visual modality, never an empty file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image
from prefect import task

from data_contracts import tables
from data_contracts.atomic import atomic_path
from data_contracts.store import Store
from tasks.errors import BadInputError
from tasks.face_backends import (
    BACKENDS,
    DEFAULT_DETECT_MAX_SIDE,
    DEFAULT_PADDING,
    THRESHOLDS,
    load_backend,
)
from tasks.face_frames import Face, FaceBackend, FrameSampler
from tasks.media import NoVideoStreamError, UnreadableMediaError, probe
from tasks.shard import ShardReport
from tasks.stage import Stage, artifact_stage, run_stage, task_options

FACES_STAGE = "faces"
# Bump when a code change alters crops for the same settings, so old artifacts are not reused.
FACES_CODE_VERSION = 1


class NoFaceError(BadInputError):
    """No face in any sampled frame: the video's visual features are missing."""


# -- settings ------------------------------------------------------------------------------------
def _rate_name(fps: float | None, max_frames: int | None) -> str:
    """How frames are sampled, in words: `all`, `5fps`, `max30`, `5fps-max30`."""
    parts = ([f"{fps:g}fps"] if fps is not None else []) + (
        [f"max{max_frames}"] if max_frames is not None else []
    )
    return "-".join(parts) or "all"


def _id_settings(
    backend: str,
    size: int,
    fps: float | None,
    max_frames: int | None,
    detect: int,
    padding: float,
    detect_every: int = 1,
) -> dict[str, Any]:
    # Detection on every frame keeps the key out, so ids from before tracking existed hold.
    tracked = {"detect_every": detect_every} if detect_every > 1 and backend == "dlib" else {}
    return {
        **tracked,
        "backend": backend,
        "size": size,
        "fps": fps,
        "max_frames": max_frames,
        # The OpenFace binary does its own detection and framing; these do not change its crops.
        "detect_max_side": None if backend == "openface" else detect,
        "padding": None if backend == "openface" else padding,
        "code": FACES_CODE_VERSION,
    }


def faces_extractor_id(
    backend: str = "dlib",
    size: int = 112,
    fps: float | None = None,
    max_frames: int | None = None,
    detect_max_side: int = DEFAULT_DETECT_MAX_SIDE,
    padding: float = DEFAULT_PADDING,
    detect_every: int = 1,
) -> str:
    """A readable name plus a short hash of all output-changing settings: `faces-dlib-112-all-…`."""
    settings = _id_settings(backend, size, fps, max_frames, detect_max_side, padding, detect_every)
    digest = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    return f"faces-{backend}-{size}-{_rate_name(fps, max_frames)}-{digest}"


@dataclass(frozen=True)
class FaceSettings:
    """How to crop faces: backend, crop size, sampling, and the backends' knobs."""

    backend: str = "dlib"
    size: int = 112  # the paper's (and OpenFace's -simsize) 112 x 112 aligned faces
    fps: float | None = None  # None: every frame, as the paper
    max_frames: int | None = None
    detect_max_side: int = DEFAULT_DETECT_MAX_SIDE  # detect on a copy no larger than this
    padding: float = DEFAULT_PADDING  # margin around the face, as dlib's get_face_chip
    openface_bin: str | None = None  # path of FeatureExtraction (a location, not an output knob)
    # dlib: run the detector on every k-th sampled frame and track the landmarks between
    # (tasks/face_track.py LandmarkTracker); 1: detect on every frame.
    detect_every: int = 1
    decode_threads: int = 0  # PyAV decoder threads; 0: FFmpeg's choice (the cores)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(
                f"unknown face backend {self.backend!r}; choose one of {', '.join(BACKENDS)}"
            )
        if not 16 <= self.size <= 1024:
            raise ValueError(f"crop size {self.size} is out of range; use 16..1024 (paper: 112)")
        if self.fps is not None and not self.fps > 0:
            raise ValueError(f"fps must be positive or None (every frame), got {self.fps}")
        if self.max_frames is not None and self.max_frames < 1:
            raise ValueError(f"max_frames must be >= 1 or None (no cap), got {self.max_frames}")
        if self.detect_max_side < 64:
            raise ValueError(f"detect_max_side {self.detect_max_side} is too small; use >= 64")
        if self.detect_every < 1:
            raise ValueError(
                f"detect_every must be >= 1 (1: detect on every frame), got {self.detect_every}"
            )
        if self.decode_threads < 0:
            raise ValueError(
                f"decode_threads must be >= 0 (0: automatic), got {self.decode_threads}"
            )
        if not 0 <= self.padding <= 2:
            raise ValueError(f"padding {self.padding} is out of range; use 0..2 (default 0.25)")

    @property
    def _id_args(self) -> tuple:
        """The settings that change the crops, in faces_extractor_id's order."""
        return (
            self.backend,
            self.size,
            self.fps,
            self.max_frames,
            self.detect_max_side,
            self.padding,
            self.detect_every,
        )

    @property
    def extractor_id(self) -> str:
        """The extractor id of these settings (keys the faces table and the artifact folder)."""
        return faces_extractor_id(*self._id_args)

    def provenance(self) -> dict[str, Any]:
        """What the visual features computed from these crops record about them."""
        return {
            "faces_extractor_id": self.extractor_id,
            "faces_settings": _id_settings(*self._id_args),
            "face_backend": self.backend,
            "face_thresholds": THRESHOLDS[self.backend],
            "crop_size": self.size,
            "frame_rate": self.fps,
            "max_frames": self.max_frames,
            "frame_sampling": _rate_name(self.fps, self.max_frames),  # "all": every frame
        }

    def load(self) -> FaceBackend:
        """The backend these settings name, loaded once per process."""
        return load_backend(
            self.backend, self.detect_max_side, self.padding, self.openface_bin, self.detect_every
        )


# -- crops file ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class FaceCrops:
    """The content of one crops file."""

    crops: np.ndarray  # (n, size, size, 3) uint8 RGB
    frame_idx: np.ndarray  # (n,) int32
    boxes: np.ndarray  # (n, 4) float32
    confidence: np.ndarray  # (n,) float32


def load_crops(path: str | os.PathLike[str]) -> FaceCrops:
    """Read a crops `.npz` written by `crop_faces`."""
    with np.load(path, allow_pickle=False) as z:
        return FaceCrops(z["crops"], z["frame_idx"], z["boxes"], z["confidence"])


class CropWriter:
    """Collects crops with bounded memory and writes them as one compressed `.npz`, atomically.

    Crops go to a raw scratch file beside the output every `chunk` faces; the final write
    streams that file into the archive, so a long video never holds all its crops in memory.
    """

    def __init__(self, out: Path, size: int, chunk: int = 256):
        self.out, self.size, self.chunk = Path(out), size, chunk
        self.out.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{self.out.name}.", suffix=".raw", dir=self.out.parent)
        self._raw_path = Path(name)
        self._raw = os.fdopen(fd, "wb")
        self._pending: list[np.ndarray] = []
        self.frame_idx: list[int] = []
        self.boxes: list[tuple[float, float, float, float]] = []
        self.confidence: list[float] = []

    @property
    def n(self) -> int:
        """Number of crops added."""
        return len(self.frame_idx)

    def add(self, face: Face) -> None:
        """Append one face."""
        if face.crop.shape != (self.size, self.size, 3) or face.crop.dtype != np.uint8:
            raise ValueError(
                f"crop of frame {face.frame_idx} is {face.crop.shape} {face.crop.dtype}; "
                f"expected ({self.size}, {self.size}, 3) uint8"
            )
        self._pending.append(face.crop)
        self.frame_idx.append(face.frame_idx)
        self.boxes.append(face.box)
        self.confidence.append(face.confidence)
        if len(self._pending) >= self.chunk:
            self._spill()

    def _spill(self) -> None:
        if self._pending:
            self._raw.write(np.stack(self._pending).tobytes())
            self._pending.clear()

    def commit(self) -> Path:
        """Write the `.npz` (atomically) and remove the scratch file."""
        self._spill()
        self._raw.close()
        shape = (self.n, self.size, self.size, 3)
        crops = (
            np.memmap(self._raw_path, dtype=np.uint8, mode="r", shape=shape)
            if self.n
            else np.zeros(shape, np.uint8)
        )
        with atomic_path(self.out) as tmp, open(tmp, "wb") as f:
            # A file object, not a name: np.savez would append ".npz" to the temporary name.
            np.savez_compressed(
                f,
                crops=crops,
                frame_idx=np.asarray(self.frame_idx, np.int32),
                boxes=np.asarray(self.boxes, np.float32).reshape(-1, 4),
                confidence=np.asarray(self.confidence, np.float32),
            )
        del crops
        self.close()
        return self.out

    def close(self) -> None:
        """Drop the scratch file (the output, if committed, stays)."""
        self._raw.close()
        with contextlib.suppress(FileNotFoundError):
            self._raw_path.unlink()

    def __enter__(self) -> CropWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- preview -------------------------------------------------------------------------------------
def contact_sheet(
    crops: np.ndarray, out: str | os.PathLike[str], cols: int = 8, max_tiles: int = 64
) -> Path:
    """Write a PNG grid of up to `max_tiles` crops, evenly spread over the video."""
    if len(crops) == 0:
        raise ValueError("no crops to put on a contact sheet")
    pick = np.unique(np.linspace(0, len(crops) - 1, min(max_tiles, len(crops))).round().astype(int))
    tiles = crops[pick]
    n, h, w, _ = tiles.shape
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    sheet = np.full((rows * (h + 2) + 2, cols * (w + 2) + 2, 3), 255, np.uint8)
    for k, tile in enumerate(tiles):
        r, c = divmod(k, cols)
        sheet[2 + r * (h + 2) : 2 + r * (h + 2) + h, 2 + c * (w + 2) : 2 + c * (w + 2) + w] = tile
    out = Path(out)
    with atomic_path(out) as tmp:
        Image.fromarray(sheet).save(tmp, format="PNG")
    return out


# -- one video -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class FaceResult:
    """What cropping one video produced."""

    path: Path
    backend: str
    n_frames_decoded: int
    n_frames_sampled: int
    n_faces: int
    mean_confidence: float | None
    crop_size: int

    @property
    def face_ratio(self) -> float:
        """Share of sampled frames in which a face was found."""
        return self.n_faces / self.n_frames_sampled if self.n_frames_sampled else 0.0


def crop_faces(
    video: str | os.PathLike[str],
    out: str | os.PathLike[str],
    settings: FaceSettings | None = None,
    backend: FaceBackend | None = None,
) -> FaceResult:
    """Crop and align the largest face of each sampled frame of `video` into `out` (.npz)."""
    video, out = Path(video), Path(out)
    settings = settings or FaceSettings()
    info = probe(video)
    if not info.has_video:
        raise NoVideoStreamError(
            f"{video} has no video stream (audio only?); its visual features will be marked missing"
        )
    backend = backend or settings.load()
    sampler = FrameSampler(settings.fps, settings.max_frames, threads=settings.decode_threads)
    with CropWriter(out, settings.size) as writer:
        for face in backend.faces(video, sampler, settings.size):
            writer.add(face)
        if sampler.n_decoded == 0:
            raise UnreadableMediaError(
                f"the video stream of {video} decodes to no frames; re-encode or re-download it"
            )
        if writer.n == 0:
            raise NoFaceError(
                f"no face in any of the {sampler.n_sampled} sampled frames ({sampler.n_decoded} "
                f"decoded) of {video} (backend {backend.name}); its visual features will be marked "
                "missing. If it does show "
                "a face, try another backend or a larger detect_max_side"
            )
        confidence = np.asarray(writer.confidence, np.float64)
        finite = confidence[np.isfinite(confidence)]
        writer.commit()
    return FaceResult(
        path=out,
        backend=backend.name,
        n_frames_decoded=sampler.n_decoded,
        n_frames_sampled=sampler.n_sampled,
        n_faces=writer.n,
        mean_confidence=float(finite.mean()) if finite.size else None,
        crop_size=settings.size,
    )


# -- the stage ----------------------------------------------------------------------------------
def faces_stage(settings: FaceSettings | None = None) -> Stage:
    """Face crops as a stage: one video at a time, the backend loaded once per process."""
    settings = settings or FaceSettings()

    def setup() -> Any:
        backend = settings.load()  # a missing binary or model stops the shard here
        return lambda video, out: crop_faces(video, out, settings, backend)

    return artifact_stage(FACES_STAGE, tables.FACES, settings.extractor_id, ".npz", setup)


def crop_faces_shard(
    videos: pd.DataFrame,
    store: Store,
    settings: FaceSettings | None = None,
    retry_failed: bool = False,
    attempt: int | None = None,
) -> ShardReport:
    """Crop the faces of every video in the shard that the faces table lacks."""
    return run_stage(faces_stage(settings), videos, store, retry_failed, attempt)


@task(name="crop-faces", **task_options(faces_stage))
def crop_faces_task(
    videos: pd.DataFrame, data_root: str, settings: FaceSettings | None = None
) -> ShardReport:
    """Prefect task: crop the faces of one shard into the store under `data_root`."""
    return crop_faces_shard(videos, Store(data_root), settings)


def settings_dict(settings: FaceSettings) -> dict[str, Any]:
    """The settings as a plain dict (for logs and the resolved config saved beside outputs)."""
    return asdict(settings)
