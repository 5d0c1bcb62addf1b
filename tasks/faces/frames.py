"""What every face backend shares: the `Face` record, the streaming frame sampler (which also
notes shot cuts), the interface.

A backend turns a video into aligned crops of every face of each sampled frame, ranked largest
first; the backends themselves are in tasks/faces/backends.py and tasks/faces/openface.py.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import av
import cv2
import numpy as np
from av.video.reformatter import VideoReformatter

from tasks.media import TruncatedMediaError, UnreadableMediaError, media_error


class BackendUnavailableError(RuntimeError):
    """A face backend cannot be loaded here (missing binary or model): a configuration error."""


@dataclass(frozen=True)
class Face:
    """The aligned crop of one face of one frame."""

    frame_idx: int
    crop: np.ndarray  # (size, size, 3) uint8 RGB
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in the frame's pixels (NaN: unknown)
    confidence: float  # the backend's own score; see each backend
    # 0: the face the backend ranks first in its frame (the largest, by its own measure: the
    # one `select=largest` keeps); 1, 2, ...: the others.
    rank: int = 0
    # (k, 2) float32 landmarks in frame pixels, as the backend has them (dlib: 5 points, or
    # dlib's 68 when asked for the mouth; OpenFace: 68; OpenCV: the 2 eye centres); None: none.
    landmarks: np.ndarray | None = None


# -- shot cuts -----------------------------------------------------------------------------------
# Two consecutive sampled frames belong to different shots when their colour (hue-saturation)
# histograms are far apart (Bhattacharyya distance), or moderately apart while the picture
# itself changed (mean absolute difference of small grey thumbnails, as a share of 255). Faces
# drifting, scaling or changing expression within a shot stay well below both.
CUT_HIST_DISTANCE = 0.45
CUT_HIST_DISTANCE_WITH_CHANGE = 0.25
CUT_GREY_CHANGE = 0.15


class ShotCuts:
    """Notes where a new shot starts, from one sampled frame to the next (cheap: a ~64 px copy)."""

    def __init__(self) -> None:
        self.cuts: list[int] = []  # frame indices that start a new shot
        self._prev: tuple[np.ndarray, np.ndarray] | None = None

    @staticmethod
    def signature(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A frame's hue-saturation histogram (sums to 1) and its 32 x 32 grey thumbnail."""
        step = max(1, max(rgb.shape[:2]) // 64)
        small = np.ascontiguousarray(rgb[::step, ::step])
        hsv = cv2.cvtColor(small, cv2.COLOR_RGB2HSV)
        hist = cv2.calcHist([hsv], [0, 1], None, [16, 8], [0, 180, 0, 256]).astype(np.float32)
        hist /= max(float(hist.sum()), 1.0)
        grey = cv2.resize(cv2.cvtColor(small, cv2.COLOR_RGB2GRAY), (32, 32), cv2.INTER_AREA)
        return hist, grey.astype(np.float32) / 255.0

    def see(self, idx: int, rgb: np.ndarray) -> bool:
        """Take the next sampled frame; True when it starts a new shot."""
        sig = self.signature(rgb)
        prev, self._prev = self._prev, sig
        if prev is None:
            return False
        hist = float(cv2.compareHist(prev[0], sig[0], cv2.HISTCMP_BHATTACHARYYA))
        change = float(np.abs(prev[1] - sig[1]).mean())
        cut = hist > CUT_HIST_DISTANCE or (
            hist > CUT_HIST_DISTANCE_WITH_CHANGE and change > CUT_GREY_CHANGE
        )
        if cut:
            self.cuts.append(idx)
        return cut


# -- frame streaming -----------------------------------------------------------------------------
@dataclass
class FrameSampler:
    """Chooses which frames to look at while a video streams by, and counts them.

    `fps`: keep frames at most this often (by timestamp); `max_frames`: keep at most this many,
    spread over the whole video when its frame count is known. Neither: every frame (the paper).
    While frames stream by it notes each sampled frame's time (`times`) and where a new shot
    starts (`cuts`: face tracks end there).
    """

    fps: float | None = None
    max_frames: int | None = None
    threads: int = 0  # decoder threads; 0: FFmpeg's choice
    # Applied to each sampled frame before anything sees it (tasks/corrupt.py FrameCorruptor);
    # None back: the frame is dropped (sampled, but no face can come from it).
    corrupt: Callable[[np.ndarray], np.ndarray | None] | None = None
    n_decoded: int = 0
    n_sampled: int = 0
    times: dict[int, float] = field(default_factory=dict)  # sampled frame index -> seconds
    shots: ShotCuts = field(default_factory=ShotCuts, repr=False)
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
                # One converter for the stream: `frame.to_ndarray` builds a new swscale context
                # for every frame (same pixels, ~1 ms more per 640x360 frame).
                to_rgb = VideoReformatter()
                for idx, frame in enumerate(container.decode(stream)):
                    t = frame.time if frame.time is not None else idx / float(rate or 25)
                    if self.accept(t):
                        self.times[idx] = t
                        rgb = to_rgb.reformat(frame, format="rgb24").to_ndarray()
                        if self.corrupt is not None:
                            rgb = self.corrupt(rgb)
                        if rgb is not None:
                            self.shots.see(idx, rgb)
                            yield idx, rgb
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


def detect_scale(shape: tuple, max_side: int) -> float:
    """The factor `downscale` shrinks a frame of `shape` by (1.0: not shrunk)."""
    return min(1.0, max_side / max(shape[0], shape[1]))


def downscale(rgb: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    """`rgb` shrunk so its longer side is at most `max_side`, and the scale factor used."""
    h, w = rgb.shape[:2]
    scale = detect_scale(rgb.shape, max_side)
    if scale >= 1.0:
        return rgb, 1.0
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA), scale


# -- the interface -------------------------------------------------------------------------------
# One aligned face of a frame: (crop, box, confidence, landmarks or None).
Aligned = tuple[np.ndarray, tuple, float, np.ndarray | None]


class FaceBackend(Protocol):
    """Turns a video into aligned crops of every face of each sampled frame."""

    name: str

    def faces(self, video: Path, sampler: FrameSampler, size: int) -> Iterator[Face]:
        """Aligned `size` x `size` crops, in frame order and within a frame by rank (rank 0:
        the largest); frames without a face yield nothing."""
        ...


class FrameBackend:
    """A backend that looks at frames one by one: subclasses implement `align_all`."""

    name = "frame"

    def align_all(self, rgb: np.ndarray, size: int) -> list[Aligned]:
        """Every face in `rgb`, aligned, the largest first; empty when there is none."""
        raise NotImplementedError

    def align(self, rgb: np.ndarray, size: int) -> tuple[np.ndarray, tuple, float] | None:
        """(crop, box, confidence) of the largest face in `rgb`, or None when there is none."""
        found = self.align_all(rgb, size)
        return found[0][:3] if found else None

    def faces(self, video: Path, sampler: FrameSampler, size: int) -> Iterator[Face]:
        """Stream `video` through `sampler` and align every face of each sampled frame."""
        # One backend instance serves every thread of a worker process, and dlib's detector and
        # shape predictor crash (SIGSEGV) when two threads call them at once: decoding runs in
        # parallel, alignment one frame at a time per process.
        lock = self.__dict__.setdefault("_align_lock", threading.Lock())
        for idx, rgb in sampler.frames(video):
            with lock:
                found = self.align_all(np.ascontiguousarray(rgb), size)
            for rank, (crop, box, confidence, points) in enumerate(found):
                yield Face(idx, crop, box, confidence, rank, points)
