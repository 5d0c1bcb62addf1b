"""Face crops: every face of each sampled frame, aligned and linked into tracks; the faces a
rule chooses (`select`: the largest of each frame, or the speaking track) and all the others
stored as one `.npz` per video (docs/faces.md).

The crops file holds the chosen faces under the keys it always had: `crops` (n, size, size, 3)
uint8 RGB, `frame_idx` (n,) int32, `boxes` (n, 4) float32 (x0, y0, x1, y1 in frame pixels) and
`confidence` (n,) float32; with them `track_id` (n,) int32 and `landmarks` (n, k, 2) float32
(frame pixels; k as the backend gives: dlib 5, or 68 with `select=speaking`; OpenFace 68;
OpenCV the 2 eye centres; NaN rows: none). The faces not chosen have the same seven arrays
prefixed `other_` (m rows). Tracks are numbered 0..T-1 in order of first appearance;
`track_score` (T,) float32 is each track's speaking score (NaN: not scored). Per video: `cuts`
(int32: frames that start a new shot), and 0-d arrays `select` (the rule), `chosen_track`
(int32; -1: none; for `largest`, the track most chosen crops come from), `select_score`
(float32; NaN: none) and `select_reason` (str). Zero faces in a video is a recorded failure of
the visual modality, never an empty file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw
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
from tasks.face_speaker import (
    SELECT_RULES,
    Selection,
    choose_largest,
    choose_speaking,
    speaking_inputs,
)
from tasks.face_track import appearance, link_tracks
from tasks.media import NoVideoStreamError, UnreadableMediaError, find_ffmpeg, probe
from tasks.shard import ShardReport
from tasks.stage import Stage, artifact_stage, run_stage, task_options

FACES_STAGE = "faces"
# Bump when a code change alters crops for the same settings, so old artifacts are not reused.
FACES_CODE_VERSION = 1
log = logging.getLogger(__name__)


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
    select: str = "largest",
) -> dict[str, Any]:
    # Detection on every frame and the largest face keep their keys out, so ids from before
    # landmark tracking and face tracks existed hold (their crops are the same).
    tracked = {"detect_every": detect_every} if detect_every > 1 and backend == "dlib" else {}
    chosen = {"select": select} if select != "largest" else {}
    return {
        **tracked,
        **chosen,
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
    select: str = "largest",
) -> str:
    """A readable name plus a short hash of all output-changing settings: `faces-dlib-112-all-…`."""
    settings = _id_settings(
        backend, size, fps, max_frames, detect_max_side, padding, detect_every, select
    )
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
    # Which faces the crops keep: "largest", the largest face of each frame (as before tracks);
    # "speaking", the track whose mouth follows the speech (tasks/face_speaker.py).
    select: str = "largest"

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(
                f"unknown face backend {self.backend!r}; choose one of {', '.join(BACKENDS)}"
            )
        if self.select not in SELECT_RULES:
            raise ValueError(
                f"unknown face selection {self.select!r}; choose one of {', '.join(SELECT_RULES)}"
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
            self.select,
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
            "face_select": self.select,
            "crop_size": self.size,
            "frame_rate": self.fps,
            "max_frames": self.max_frames,
            "frame_sampling": _rate_name(self.fps, self.max_frames),  # "all": every frame
        }

    def load(self) -> FaceBackend:
        """The backend these settings name, loaded once per process."""
        return load_backend(
            self.backend,
            self.detect_max_side,
            self.padding,
            self.openface_bin,
            self.detect_every,
            mouth=self.select == "speaking",
        )


# -- crops file ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class FaceCrops:
    """The chosen faces of one crops file (what the visual features are computed from)."""

    crops: np.ndarray  # (n, size, size, 3) uint8 RGB
    frame_idx: np.ndarray  # (n,) int32
    boxes: np.ndarray  # (n, 4) float32
    confidence: np.ndarray  # (n,) float32


def load_crops(path: str | os.PathLike[str]) -> FaceCrops:
    """Read the chosen faces of a crops `.npz` written by `crop_faces`."""
    with np.load(path, allow_pickle=False) as z:
        return FaceCrops(z["crops"], z["frame_idx"], z["boxes"], z["confidence"])


# Per-face arrays: stored for the chosen faces under these names, for the others with `other_`.
ROW_KEYS = ("crops", "frame_idx", "boxes", "confidence", "track_id", "landmarks")


@dataclass(frozen=True)
class FaceTracks:
    """Every face of one crops file, chosen or not, in frame order, with its track."""

    crops: np.ndarray  # (N, size, size, 3) uint8 RGB
    frame_idx: np.ndarray  # (N,) int32
    boxes: np.ndarray  # (N, 4) float32
    confidence: np.ndarray  # (N,) float32
    track_id: np.ndarray  # (N,) int32
    landmarks: np.ndarray  # (N, k, 2) float32
    chosen: np.ndarray  # (N,) bool
    track_score: np.ndarray  # (T,) float32
    cuts: np.ndarray  # int32: frames that start a new shot
    select: str
    chosen_track: int
    select_score: float
    select_reason: str

    @property
    def n_tracks(self) -> int:
        """Number of tracks."""
        return len(self.track_score)


def load_tracks(path: str | os.PathLike[str]) -> FaceTracks:
    """Read every face of a crops `.npz`, chosen and other, with its track."""
    with np.load(path, allow_pickle=False) as z:
        if "track_id" not in z.files:
            raise ValueError(
                f"{path} was written before face tracks existed and keeps only the chosen "
                "faces; crop the video again (`merflow task crop-faces`) to get its tracks"
            )
        rows = {k: np.concatenate([z[k], z[f"other_{k}"]]) for k in ROW_KEYS}
        chosen = np.arange(len(rows["frame_idx"])) < len(z["frame_idx"])
        order = np.lexsort((rows["track_id"], rows["frame_idx"]))
        return FaceTracks(
            **{k: v[order] for k, v in rows.items()},
            chosen=chosen[order],
            track_score=z["track_score"],
            cuts=z["cuts"],
            select=str(z["select"]),
            chosen_track=int(z["chosen_track"]),
            select_score=float(z["select_score"]),
            select_reason=str(z["select_reason"]),
        )


class CropWriter:
    """Collects every face with bounded memory and writes them as one compressed `.npz`,
    atomically: the chosen ones under the plain keys, the others under `other_` ones.

    Crops go to a raw scratch file beside the output every `chunk` faces; the final write
    streams that file (or, when only some faces are chosen, copies of its rows made chunk by
    chunk) into the archive, so a long video never holds all its crops in memory.
    """

    def __init__(self, out: Path, size: int, chunk: int = 256):
        self.out, self.size, self.chunk = Path(out), size, chunk
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self._raw_path = self._scratch()
        self._raw = open(self._raw_path, "wb")  # noqa: SIM115 (closed by commit or close)
        self._more: list[Path] = []
        self._pending: list[np.ndarray] = []
        self.frame_idx: list[int] = []
        self.boxes: list[tuple[float, float, float, float]] = []
        self.confidence: list[float] = []
        self.rank: list[int] = []
        self.points: list[np.ndarray | None] = []
        self.signatures: list[np.ndarray] = []  # colour signatures, for linking tracks

    def _scratch(self) -> Path:
        fd, name = tempfile.mkstemp(prefix=f".{self.out.name}.", suffix=".raw", dir=self.out.parent)
        os.close(fd)
        return Path(name)

    @property
    def n(self) -> int:
        """Number of faces added."""
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
        self.rank.append(face.rank)
        self.points.append(face.landmarks)
        self.signatures.append(appearance(face.crop))
        if len(self._pending) >= self.chunk:
            self._spill()

    def _spill(self) -> None:
        if self._pending:
            self._raw.write(np.stack(self._pending).tobytes())
            self._pending.clear()

    def landmarks(self) -> np.ndarray:
        """(n, k, 2) float32 landmarks of the faces added; NaN rows for faces without."""
        k = next((len(p) for p in self.points if p is not None), 0)
        out = np.full((self.n, k, 2), np.nan, np.float32)
        for i, p in enumerate(self.points):
            if p is None:
                continue
            if len(p) != k:
                raise ValueError(
                    f"face of frame {self.frame_idx[i]} has {len(p)} landmarks, others {k}: "
                    "a backend gives one kind of landmarks per video"
                )
            out[i] = p
        return out

    @contextlib.contextmanager
    def _rows(self, crops: np.ndarray, idx: np.ndarray) -> Any:
        """`crops[idx]` without holding it in memory: the raw file itself when `idx` takes every
        row in order, else a copy made chunk by chunk."""
        if len(idx) == len(crops) and np.array_equal(idx, np.arange(len(crops))):
            yield crops
            return
        if len(idx) == 0:
            yield np.zeros((0, self.size, self.size, 3), np.uint8)
            return
        path = self._scratch()
        self._more.append(path)
        with open(path, "wb") as f:
            for i in range(0, len(idx), self.chunk):
                f.write(np.ascontiguousarray(crops[idx[i : i + self.chunk]]).tobytes())
        rows = np.memmap(path, dtype=np.uint8, mode="r", shape=(len(idx), *crops.shape[1:]))
        try:
            yield rows
        finally:
            del rows

    def commit(
        self,
        chosen: np.ndarray | None = None,
        track_id: np.ndarray | None = None,
        video: dict[str, Any] | None = None,
    ) -> Path:
        """Write the `.npz` (atomically) and remove the scratch files. `chosen`: which faces the
        plain keys hold (default: all); `track_id`: each face's track (default: one track);
        `video`: the per-track and per-video keys (`track_score`, `cuts`, `select`, ...)."""
        self._spill()
        self._raw.close()
        n = self.n
        chosen = np.ones(n, bool) if chosen is None else np.asarray(chosen, bool)
        track_id = np.zeros(n, np.int32) if track_id is None else np.asarray(track_id, np.int32)
        n_tracks = int(track_id.max()) + 1 if n else 0
        per_video = {
            "track_score": np.full(n_tracks, np.nan, np.float32),
            "cuts": np.zeros(0, np.int32),
            "select": np.array("largest"),
            "chosen_track": np.array(-1, np.int32),
            "select_score": np.array(np.nan, np.float32),
            "select_reason": np.array(""),
        }
        for key, value in (video or {}).items():
            kind = per_video[key].dtype
            per_video[key] = np.asarray(value) if kind.kind == "U" else np.asarray(value, kind)
        rows = {
            "frame_idx": np.asarray(self.frame_idx, np.int32),
            "boxes": np.asarray(self.boxes, np.float32).reshape(-1, 4),
            "confidence": np.asarray(self.confidence, np.float32),
            "track_id": track_id,
            "landmarks": self.landmarks(),
        }
        shape = (n, self.size, self.size, 3)
        crops = (
            np.memmap(self._raw_path, dtype=np.uint8, mode="r", shape=shape)
            if n
            else np.zeros(shape, np.uint8)
        )
        pick, rest = np.flatnonzero(chosen), np.flatnonzero(~chosen)
        arrays: dict[str, np.ndarray] = {}
        for key, value in rows.items():
            arrays[key], arrays[f"other_{key}"] = value[pick], value[rest]
        with (
            self._rows(crops, pick) as mine,
            self._rows(crops, rest) as others,
            atomic_path(self.out) as tmp,
            open(tmp, "wb") as f,
        ):
            # A file object, not a name: np.savez would append ".npz" to the temporary name.
            np.savez_compressed(f, crops=mine, other_crops=others, **arrays, **per_video)
        del crops
        self.close()
        return self.out

    def close(self) -> None:
        """Drop the scratch files (the output, if committed, stays)."""
        self._raw.close()
        for path in (self._raw_path, *self._more):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def __enter__(self) -> CropWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- preview -------------------------------------------------------------------------------------
CHOSEN_COLOUR, OTHER_COLOUR = (0, 170, 60), (200, 200, 200)


def track_sheet(
    tracks: FaceTracks, out: str | os.PathLike[str], cols: int = 8, max_tracks: int = 12
) -> Path:
    """Write a PNG with one row per track (up to `cols` faces spread over it, chosen faces
    framed in green, the chosen track labelled) under a line saying the rule and its reason."""
    if len(tracks.frame_idx) == 0:
        raise ValueError("no faces to put on a contact sheet")
    s = tracks.crops.shape[1]
    counts = np.bincount(tracks.track_id, minlength=tracks.n_tracks)
    shown = sorted(np.argsort(-counts, kind="stable")[:max_tracks].tolist())
    if tracks.chosen_track >= 0 and tracks.chosen_track not in shown:
        shown[-1] = tracks.chosen_track
        shown.sort()
    label_w, cell, head = 150, s + 8, 30
    row_h = max(cell, 48)
    width = label_w + cols * cell + 4
    sheet = Image.new("RGB", (width, head + len(shown) * row_h + 4), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    chars = max(20, width // 6)
    header = f"select={tracks.select}: {tracks.select_reason}"
    draw.text((4, 2), header[:chars], fill=(0, 0, 0))
    draw.text((4, 14), header[chars : 2 * chars], fill=(0, 0, 0))
    hidden = tracks.n_tracks - len(shown)
    for row, t in enumerate(shown):
        y = head + row * row_h
        faces = np.flatnonzero(tracks.track_id == t)
        frames = tracks.frame_idx[faces]
        score = tracks.track_score[t]
        lines = [
            f"track {t}" + ("  CHOSEN" if t == tracks.chosen_track else ""),
            f"frames {frames.min()}-{frames.max()} ({len(faces)})",
            f"score r={score:.2f}" if np.isfinite(score) else "not scored",
        ]
        if row == len(shown) - 1 and hidden > 0:
            lines.append(f"(+{hidden} smaller tracks)")
        colour = CHOSEN_COLOUR if t == tracks.chosen_track else (0, 0, 0)
        for i, line in enumerate(lines):
            draw.text((4, y + 2 + 11 * i), line, fill=colour)
        pick = np.unique(np.linspace(0, len(faces) - 1, min(cols, len(faces))).round().astype(int))
        for c, i in enumerate(faces[pick]):
            x0 = label_w + c * cell
            frame = CHOSEN_COLOUR if tracks.chosen[i] else OTHER_COLOUR
            draw.rectangle([x0, y, x0 + cell - 3, y + cell - 3], fill=frame)
            sheet.paste(Image.fromarray(tracks.crops[i]), (x0 + 3, y + 3))
    out = Path(out)
    with atomic_path(out) as tmp:
        sheet.save(tmp, format="PNG")
    return out


# -- one video -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class FaceResult:
    """What cropping one video produced (the faces table's columns, and the selection)."""

    path: Path
    backend: str
    n_frames_decoded: int
    n_frames_sampled: int
    n_faces: int  # chosen faces (the crops the visual features see)
    mean_confidence: float | None
    crop_size: int
    n_faces_all: int = 0  # every face found, chosen or not
    n_tracks: int = 0
    select: str = "largest"
    chosen_track: int = -1
    select_score: float | None = None  # the chosen track's speaking score (correlation)
    select_reason: str = ""

    @property
    def face_ratio(self) -> float:
        """Share of sampled frames in which a face was chosen."""
        return self.n_faces / self.n_frames_sampled if self.n_frames_sampled else 0.0


def _select(
    settings: FaceSettings, video: Path, has_audio: bool, fps: float | None,
    writer: CropWriter, sampler: FrameSampler,
) -> tuple[np.ndarray, Selection]:  # fmt: skip
    """Link the faces into tracks and choose the ones the rule keeps."""
    frame_idx = np.asarray(writer.frame_idx, np.int64)
    # A backend that decodes itself (OpenFace) gives times from its own table.
    times = np.array([sampler.times.get(int(i), i / (fps or 25.0)) for i in frame_idx])
    boxes = np.asarray(writer.boxes, np.float64).reshape(-1, 4)
    track_id = link_tracks(frame_idx, times, boxes, np.stack(writer.signatures), sampler.shots.cuts)
    if settings.select == "largest":
        return track_id, choose_largest(track_id, np.asarray(writer.rank))
    mouth, loudness, why = speaking_inputs(video, has_audio, writer.landmarks(), times)
    return track_id, choose_speaking(track_id, boxes, mouth, loudness, why)


def crop_faces(
    video: str | os.PathLike[str],
    out: str | os.PathLike[str],
    settings: FaceSettings | None = None,
    backend: FaceBackend | None = None,
) -> FaceResult:
    """Crop, align and track every face of each sampled frame of `video` into `out` (.npz),
    the faces that `settings.select` chooses under the plain keys."""
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
        track_id, sel = (
            _select(settings, video, info.has_audio, info.fps, writer, sampler)
            if writer.n
            else (None, None)
        )
        if sel is None or not sel.chosen.any():
            raise NoFaceError(
                f"no face in any of the {sampler.n_sampled} sampled frames ({sampler.n_decoded} "
                f"decoded) of {video} (backend {backend.name}); its visual features will be marked "
                "missing. If it does show "
                "a face, try another backend or a larger detect_max_side"
            )
        confidence = np.asarray(writer.confidence, np.float64)[sel.chosen]
        finite = confidence[np.isfinite(confidence)]
        n_all = writer.n
        writer.commit(
            sel.chosen,
            track_id,
            {
                "track_score": sel.track_score,
                "cuts": np.asarray(sampler.shots.cuts, np.int32),
                "select": sel.rule,
                "chosen_track": sel.chosen_track,
                "select_score": sel.score,
                "select_reason": sel.reason,
            },
        )
    log.info("faces of %s: %s", video.name, sel.reason)
    return FaceResult(
        path=out,
        backend=backend.name,
        n_frames_decoded=sampler.n_decoded,
        n_frames_sampled=sampler.n_sampled,
        n_faces=int(sel.chosen.sum()),
        mean_confidence=float(finite.mean()) if finite.size else None,
        crop_size=settings.size,
        n_faces_all=n_all,
        n_tracks=len(sel.track_score),
        select=sel.rule,
        chosen_track=sel.chosen_track,
        select_score=sel.score if np.isfinite(sel.score) else None,
        select_reason=sel.reason,
    )


# -- the stage ----------------------------------------------------------------------------------
def faces_stage(settings: FaceSettings | None = None) -> Stage:
    """Face crops as a stage: one video at a time, the backend loaded once per process."""
    settings = settings or FaceSettings()

    def setup() -> Any:
        backend = settings.load()  # a missing binary or model stops the shard here
        if settings.select == "speaking":
            find_ffmpeg()  # the speaking face hears the audio: no ffmpeg stops the shard here too
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
