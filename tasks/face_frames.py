"""What every face backend shares: the `Face` record, the streaming frame sampler, the interface.

A backend turns a video into aligned face crops, at most one (the largest face) per sampled
frame; the backends themselves are in tasks/face_backends.py and tasks/face_openface.py.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import av
import cv2
import numpy as np

from tasks.media import TruncatedMediaError, UnreadableMediaError, media_error


class BackendUnavailableError(RuntimeError):
    """A face backend cannot be loaded here (missing binary or model): a configuration error."""


@dataclass(frozen=True)
class Face:
    """The aligned crop of the largest face of one frame."""

    frame_idx: int
    crop: np.ndarray  # (size, size, 3) uint8 RGB
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in the frame's pixels (NaN: unknown)
    confidence: float  # the backend's own score; see each backend


# -- frame streaming -----------------------------------------------------------------------------
@dataclass
class FrameSampler:
    """Chooses which frames to look at while a video streams by, and counts them.

    `fps`: keep frames at most this often (by timestamp); `max_frames`: keep at most this many,
    spread over the whole video when its frame count is known. Neither: every frame (the paper).
    """

    fps: float | None = None
    max_frames: int | None = None
    threads: int = 0  # decoder threads; 0: FFmpeg's choice
    n_decoded: int = 0
    n_sampled: int = 0
    _stride: int = field(default=1, init=False, repr=False)
    _candidates: int = field(default=0, init=False, repr=False)
    _next_t: float | None = field(default=None, init=False, repr=False)

    def plan(self, n_frames: int | None, rate: float | None) -> None:
        """Spread `max_frames` over an expected `n_frames` frames at `rate` frames per second."""
        self._stride = 1
        if self.max_frames and n_frames:
            expected = n_frames
            if self.fps and rate and rate > self.fps:
                expected = math.ceil(n_frames * self.fps / rate)
            self._stride = max(1, math.ceil(expected / self.max_frames))

    @property
    def full(self) -> bool:
        """Whether `max_frames` frames are already sampled (decoding can stop)."""
        return self.max_frames is not None and self.n_sampled >= self.max_frames

    def accept(self, t: float) -> bool:
        """Count one decoded frame at time `t` (seconds) and say whether to sample it."""
        self.n_decoded += 1
        if self.full:
            return False
        if self.fps:
            period = 1.0 / self.fps
            if self._next_t is None:
                self._next_t = t
            if t + 1e-6 < self._next_t:
                return False
            while self._next_t <= t + 1e-6:
                self._next_t += period
        keep = self._candidates % self._stride == 0
        self._candidates += 1
        if keep:
            self.n_sampled += 1
        return keep

    def frames(self, video: Path) -> Iterator[tuple[int, np.ndarray]]:
        """Decode `video` once, as a stream, yielding (frame index, RGB array) of sampled frames.

        Only sampled frames are converted to arrays; at most one is alive at a time.
        """
        try:
            with av.open(str(video)) as container:
                if not container.streams.video:
                    raise UnreadableMediaError(f"{video} has no video stream to take faces from")
                stream = container.streams.video[0]
                stream.thread_type = "AUTO"  # frame threads: decoding is most of the cost
                stream.thread_count = self.threads
                rate = stream.average_rate or stream.guessed_rate
                self.plan(stream.frames or None, float(rate) if rate else None)
                for idx, frame in enumerate(container.decode(stream)):
                    t = frame.time if frame.time is not None else idx / float(rate or 25)
                    if self.accept(t):
                        yield idx, frame.to_ndarray(format="rgb24")
                    if self.full:
                        return
                declared = stream.frames
                # Threaded decoding ends quietly at a cut-off file; the header tells the truth.
                if declared and self.n_decoded < declared - max(2, 0.05 * declared):
                    raise TruncatedMediaError(
                        f"video {video} decodes to {self.n_decoded} of the {declared} frames its "
                        "header declares: the file is truncated; re-copy or re-download it"
                    )
        except (av.FFmpegError, OSError) as e:
            raise media_error(video, e, f"decode frame {self.n_decoded} of") from e


def downscale(rgb: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    """`rgb` shrunk so its longer side is at most `max_side`, and the scale factor used."""
    h, w = rgb.shape[:2]
    scale = min(1.0, max_side / max(h, w))
    if scale >= 1.0:
        return rgb, 1.0
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA), scale


# -- the interface -------------------------------------------------------------------------------
class FaceBackend(Protocol):
    """Turns a video into aligned crops of the largest face per sampled frame."""

    name: str

    def faces(self, video: Path, sampler: FrameSampler, size: int) -> Iterator[Face]:
        """Aligned `size` x `size` crops, in frame order; frames without a face yield nothing."""
        ...


class FrameBackend:
    """A backend that looks at frames one by one: subclasses implement `align`."""

    name = "frame"

    def align(self, rgb: np.ndarray, size: int) -> tuple[np.ndarray, tuple, float] | None:
        """(crop, box, confidence) of the largest face in `rgb`, or None when there is none."""
        raise NotImplementedError

    def faces(self, video: Path, sampler: FrameSampler, size: int) -> Iterator[Face]:
        """Stream `video` through `sampler` and align the largest face of each sampled frame."""
        # One backend instance serves every thread of a worker process, and dlib's detector and
        # shape predictor crash (SIGSEGV) when two threads call them at once: decoding runs in
        # parallel, alignment one frame at a time per process.
        lock = self.__dict__.setdefault("_align_lock", threading.Lock())
        for idx, rgb in sampler.frames(video):
            with lock:
                found = self.align(np.ascontiguousarray(rgb), size)
            if found is not None:
                crop, box, confidence = found
                yield Face(idx, crop, box, confidence)
