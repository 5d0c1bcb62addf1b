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
the visual modality, never an empty file. The file's writer and readers are
tasks/faces/crop_files.py.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from data_contracts import tables
from data_contracts.store import Store
from models.settings import available_cpus
from tasks.corrupt import Corruption, FrameCorruptor
from tasks.engine import video_pool
from tasks.engine.errors import BadInputError
from tasks.engine.shard import ShardReport
from tasks.engine.stage import Stage, artifact_stage, run_stage
from tasks.engine.video_pool import resolve_processes
from tasks.faces.backends import (
    BACKENDS,
    DEFAULT_DETECT_MAX_SIDE,
    DEFAULT_PADDING,
    THRESHOLDS,
    load_backend,
)
from tasks.faces.crop_files import (
    CropWriter,
)
from tasks.faces.frames import FaceBackend, FrameSampler
from tasks.faces.speaker import (
    SELECT_RULES,
    SPEAKING_RULE_VERSION,
    Selection,
    choose_largest,
    choose_speaking,
    speaking_inputs,
)
from tasks.faces.track import link_tracks
from tasks.media import NoVideoStreamError, UnreadableMediaError, find_ffmpeg, probe

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
    recipe: str = "merflow",
    corruption: Corruption | None = None,
) -> dict[str, Any]:
    # Detection on every frame and the largest face keep their keys out, so ids from before
    # landmark tracking and face tracks existed hold (their crops are the same).
    tracked = {"detect_every": detect_every} if detect_every > 1 and backend == "dlib" else {}
    chosen = {"select": select} if select != "largest" else {}
    if select == "speaking":
        chosen["speaking_rule"] = SPEAKING_RULE_VERSION
    # The baseline's OpenFace crops (masked, failed frames kept); other backends have one recipe.
    baseline = {"recipe": recipe} if recipe != "merflow" and backend == "openface" else {}
    # Frames corrupted for robustness scoring (tasks/corrupt.py): crops of their own.
    corrupted = {"corruption": corruption.id} if corruption is not None else {}
    return {
        **baseline,
        **corrupted,
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
    recipe: str = "merflow",
    corruption: Corruption | None = None,
) -> str:
    """A readable name plus a short hash of all output-changing settings: `faces-dlib-112-all-…`
    (`…+corrupt-blur2-v1` for frames corrupted for robustness scoring)."""
    settings = _id_settings(
        backend,
        size,
        fps,
        max_frames,
        detect_max_side,
        padding,
        detect_every,
        select,
        recipe,
        corruption,
    )
    digest = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    name = f"faces-{backend}-{size}-{_rate_name(fps, max_frames)}-{digest}"
    return name + (f"+{corruption.id}" if corruption is not None else "")


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
    # (tasks/faces/track.py LandmarkTracker); 1: detect on every frame.
    detect_every: int = 1
    decode_threads: int = 0  # PyAV decoder threads; 0: automatic (for_workers)
    # Which faces the crops keep: "largest", the largest face of each frame (as before tracks);
    # "speaking", the track whose mouth follows the speech (tasks/faces/speaker.py).
    select: str = "largest"
    # Worker processes that crop a shard's videos side by side, off the GIL of the process that
    # runs the model stages (tasks/engine/video_pool.py); None: every core, 0: in this process.
    processes: int | None = None
    # OpenFace only: "mertools" runs it with its defaults as the challenge baseline does (the
    # background masked, failed frames kept as black crops); "merflow": unmasked, failed dropped.
    recipe: str = "merflow"
    # Robustness scoring: each decoded frame blurred, downscaled or dropped before the backend
    # sees it (tasks/corrupt.py); None for the clean crops.
    corruption: Corruption | None = None

    def __post_init__(self) -> None:
        if self.corruption is not None and self.corruption.modality != "video":
            raise ValueError(f"faces take video corruptions, not {self.corruption.name}")
        if self.corruption is not None and self.backend == "openface":
            raise ValueError(
                f"{self.corruption.name} corrupts the frames merflow decodes, and OpenFace decodes "
                "the video itself; score robustness of video corruptions on a run whose faces came "
                "from faces.backend=dlib or opencv, or give audio levels only"
            )
        if self.recipe not in ("merflow", "mertools"):
            raise ValueError(f"unknown faces recipe {self.recipe!r}; choose merflow or mertools")
        if self.recipe == "mertools" and self.backend == "openface" and self.select != "largest":
            # A failed frame (kept black, no box) would start a track of its own and be dropped
            # by the speaking-face rule, undoing the recipe; OpenFace follows one face anyway.
            raise ValueError(
                f"faces.recipe=mertools keeps OpenFace's one face in every frame, failed ones "
                f"included, as the challenge baseline did; it needs faces.select=largest, not "
                f"{self.select!r} (or use faces.recipe=merflow)"
            )
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
        if self.processes is not None and self.processes < 0:
            raise ValueError(
                f"processes must be >= 0 (0: in this process) or None (every core), got "
                f"{self.processes}"
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
            self.recipe,
            self.corruption,
        )

    @property
    def extractor_id(self) -> str:
        """The extractor id of these settings (keys the faces table and the artifact folder)."""
        return faces_extractor_id(*self._id_args)

    @property
    def thresholds(self) -> dict[str, Any]:
        """The backend's thresholds as these settings run it (OpenFace's mertools recipe keeps
        the frames it aligned badly, and masks the background)."""
        if self.backend == "openface" and self.recipe == "mertools":
            return {"nobadaligned": False, "mask": True}
        return dict(THRESHOLDS[self.backend])

    def provenance(self) -> dict[str, Any]:
        """What the visual features computed from these crops record about them."""
        return {
            "faces_extractor_id": self.extractor_id,
            "faces_settings": _id_settings(*self._id_args),
            "face_backend": self.backend,
            "face_thresholds": self.thresholds,
            "faces_recipe": self.recipe if self.backend == "openface" else "merflow",
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
            recipe=self.recipe,
        )


# -- one video -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class FaceResult:
    """What cropping one video produced: the faces table's columns (docs/faces.md)."""

    path: Path
    backend: str
    n_frames_decoded: int
    n_frames_sampled: int
    n_faces: int  # chosen faces (the crops the visual features see)
    mean_confidence: float | None
    crop_size: int
    n_frames_chosen: int = 0  # sampled frames with a chosen face
    n_frames_any: int = 0  # sampled frames with any face, chosen or not
    n_faces_all: int = 0  # every face found, chosen or not
    n_tracks: int = 0
    select_rule: str = "largest"
    chosen_track: int = -1
    select_score: float | None = None  # the chosen track's speaking score (correlation)
    select_reason: str = ""

    @property
    def face_ratio(self) -> float:
        """Share of sampled frames with a chosen face: how much of the video the visual
        features see (with `speaking`, the chosen person's face; with `largest`, any face)."""
        return self.n_frames_chosen / self.n_frames_sampled if self.n_frames_sampled else 0.0

    @property
    def any_face_ratio(self) -> float:
        """Share of sampled frames with any face, chosen or not."""
        return self.n_frames_any / self.n_frames_sampled if self.n_frames_sampled else 0.0


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
    corrupt = None if settings.corruption is None else FrameCorruptor(settings.corruption, out.stem)
    sampler = FrameSampler(
        settings.fps, settings.max_frames, threads=settings.decode_threads, corrupt=corrupt
    )
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
        frames = np.asarray(writer.frame_idx, np.int64)
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
        n_frames_chosen=len(np.unique(frames[sel.chosen])),
        n_frames_any=len(np.unique(frames)),
        n_faces_all=n_all,
        n_tracks=len(sel.track_score),
        select_rule=sel.rule,
        chosen_track=sel.chosen_track,
        select_score=sel.score if np.isfinite(sel.score) else None,
        select_reason=sel.reason,
    )


# -- the stage ----------------------------------------------------------------------------------
def _cropper(settings: FaceSettings) -> Callable[[Path, Path], FaceResult]:
    backend = settings.load()  # a missing binary or model stops the shard here
    if settings.select == "speaking":
        find_ffmpeg()  # the speaking face hears the audio: no ffmpeg stops the shard here too
    return functools.partial(crop_faces, settings=settings, backend=backend)


def for_workers(settings: FaceSettings, processes: int) -> FaceSettings:
    """The settings each of `processes` worker processes crops with: automatic decoder threads
    become the worker's share of the cores. FFmpeg's own choice is every core per decoder, and
    with a worker per core those threads only compete: on a 640x360 clip threaded decoding
    took 0.44 CPU s where one thread took 0.32 s. Decoding gives the same frames either way."""
    if processes and settings.decode_threads == 0:
        return replace(settings, decode_threads=max(1, available_cpus() // processes))
    return settings


def faces_stage(settings: FaceSettings | None = None) -> Stage:
    """Face crops as a stage: the backend loaded once per process, the videos cropped in
    `settings.processes` worker processes (one at a time in this process with 0)."""
    settings = settings or FaceSettings()
    processes = resolve_processes(settings.processes)
    setup = _setup(settings, processes)
    return artifact_stage(
        FACES_STAGE, tables.FACES, settings.extractor_id, ".npz", setup, processes
    )


def _setup(settings: FaceSettings, processes: int) -> Callable[[], Any]:
    """The stage's setup, as the pool keys it (faces_stage and start_workers give the same)."""
    return functools.partial(_cropper, for_workers(settings, processes))


def start_workers(settings: FaceSettings) -> int:
    """Start the faces stage's worker processes now, backends loaded, as a worker holds them
    after its first shard (a benchmark's model load); returns how many there are."""
    processes = resolve_processes(settings.processes)
    if processes:
        video_pool.pool(processes).warm(_setup(settings, processes))
    return processes


def crop_faces_shard(
    videos: pd.DataFrame,
    store: Store,
    settings: FaceSettings | None = None,
    retry_failed: bool = False,
    attempt: int | None = None,
) -> ShardReport:
    """Crop the faces of every video in the shard that the faces table lacks."""
    return run_stage(faces_stage(settings), videos, store, retry_failed, attempt)


def settings_dict(settings: FaceSettings) -> dict[str, Any]:
    """The settings as a plain dict (for logs and the resolved config saved beside outputs)."""
    return asdict(settings)
