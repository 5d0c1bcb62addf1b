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
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from data_contracts import tables
from data_contracts.store import Store
from models.settings import available_cpus
from tasks.corrupt import FrameCorruptor
from tasks.dag import FACES
from tasks.engine import video_pool
from tasks.engine.errors import BadInputError
from tasks.engine.shard import ShardReport
from tasks.engine.stage import Stage, artifact_stage, run_stage
from tasks.engine.video_pool import resolve_processes
from tasks.faces.backends import backend_for
from tasks.faces.crop_files import (
    CropWriter,
)
from tasks.faces.frames import FaceBackend, FrameSampler
from tasks.faces.settings import FaceSettings
from tasks.faces.speaker import (
    Selection,
    choose_largest,
    choose_speaking,
    speaking_inputs,
)
from tasks.faces.track import link_tracks
from tasks.media import NoVideoStreamError, UnreadableMediaError, find_ffmpeg, probe

log = logging.getLogger(__name__)


class NoFaceError(BadInputError):
    """No face in any sampled frame: the video's visual features are missing."""


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
    backend = backend or backend_for(settings)
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
    backend = backend_for(settings)  # a missing binary or model stops the shard here
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
    return artifact_stage(FACES, tables.FACES, settings.extractor_id, ".npz", setup, processes)


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
