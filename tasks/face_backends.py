"""Face detection and alignment backends behind one interface, and the streaming frame sampler.

A backend turns a video into aligned face crops, at most one (the largest face) per sampled
frame. `dlib` (the default) and `opencv` look at frames that `FrameSampler` decodes as a
stream (dlib with `detect_every` k > 1 detects on every k-th and tracks the landmarks between);
`openface` runs OpenFace 2's `FeatureExtraction` binary on the file, as the paper and the
challenge baseline do, and reads back its CSV and aligned images.
"""

from __future__ import annotations

import csv
import functools
import importlib.util
import math
import os
import shutil
import signal
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import av
import cv2
import numpy as np

from tasks.errors import TransientError
from tasks.media import TruncatedMediaError, UnreadableMediaError, media_error

BACKENDS: tuple[str, ...] = ("dlib", "opencv", "openface")
DEFAULT_DETECT_MAX_SIDE = 640
DEFAULT_PADDING = 0.25


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


def _largest(boxes: np.ndarray) -> int:
    """Index of the largest (x, y, w, h) box."""
    return int(np.argmax(boxes[:, 2] * boxes[:, 3]))


# -- dlib ----------------------------------------------------------------------------------------
def dlib_model_dir() -> Path:
    """The folder of face_recognition_models' weights, found without importing that package."""
    # Importing face_recognition_models runs `import pkg_resources`, gone from current setuptools.
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise BackendUnavailableError(
            "backend 'dlib' needs the face_recognition_models package (its weights); "
            "`pip install face_recognition_models dlib-bin` or choose backend=opencv"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "models"


# HOG scores just above dlib's default threshold (0) are often texture, and "largest face"
# would then prefer a large false face over the real one; real frontal faces score ~0.5 to 2.
DLIB_MIN_SCORE = 0.2

# Each backend's detection thresholds, as its code uses them; recorded in the provenance of the
# visual features computed from its crops.
THRESHOLDS: dict[str, dict[str, float | int | bool]] = {
    "dlib": {"min_hog_score": DLIB_MIN_SCORE, "upsample_small_frames": True},
    "opencv": {"scale_factor": 1.1, "min_neighbors": 5, "min_face_side_fraction": 0.125},
    "openface": {"nobadaligned": True},
}


class DlibBackend(FrameBackend):
    """dlib's HOG detector, 5-point landmarks and `get_face_chip` alignment.

    Confidence is the HOG detector's SVM score (unbounded; higher is surer; below
    `DLIB_MIN_SCORE` a detection is dropped). With `detect_every` k > 1 the detector runs on
    every k-th sampled frame only and the frames between are tracked (`faces`).
    """

    name = "dlib"

    def __init__(
        self,
        detect_max_side: int = DEFAULT_DETECT_MAX_SIDE,
        padding: float = DEFAULT_PADDING,
        detect_every: int = 1,
    ):
        import dlib

        model = dlib_model_dir() / "shape_predictor_5_face_landmarks.dat"
        if not model.is_file():
            raise BackendUnavailableError(f"dlib landmark model {model} is missing; reinstall it")
        self._dlib = dlib
        self.detector = dlib.get_frontal_face_detector()
        self.predictor = dlib.shape_predictor(str(model))
        self.detect_max_side = detect_max_side
        self.padding = padding
        self.detect_every = max(1, int(detect_every))

    def faces(self, video: Path, sampler: FrameSampler, size: int) -> Iterator[Face]:
        """Every frame detected (detect_every 1), or detected on every k-th and tracked between."""
        if self.detect_every == 1:
            yield from super().faces(video, sampler, size)
            return
        lock = self.__dict__.setdefault("_align_lock", threading.Lock())
        tracker = _Tracker(self, size)
        for idx, rgb in sampler.frames(video):
            with lock:
                out = tracker.frame(idx, np.ascontiguousarray(rgb))
            yield from out
        with lock:
            out = tracker.finish()
        yield from out

    def detect(self, rgb: np.ndarray) -> tuple[tuple[float, float, float, float], float] | None:
        """The largest face's box (frame pixels) and HOG score, or None."""
        small, scale = downscale(rgb, self.detect_max_side)
        rects, scores, _ = self.detector.run(small, 0, DLIB_MIN_SCORE)
        if len(rects) == 0 and 2 * max(small.shape[:2]) <= self.detect_max_side:
            rects, scores, _ = self.detector.run(small, 1, DLIB_MIN_SCORE)
        if len(rects) == 0:
            return None
        i = int(np.argmax([r.width() * r.height() for r in rects]))
        r = rects[i]
        return (r.left() / scale, r.top() / scale, r.right() / scale, r.bottom() / scale), float(
            scores[i]
        )

    def landmarks(self, rgb: np.ndarray, box: tuple[float, float, float, float]):
        """dlib's 5-point shape of the face in `box` (frame pixels)."""
        return self.predictor(rgb, self._dlib.rectangle(*(round(v) for v in box)))

    def chip(self, rgb: np.ndarray, shape, size: int) -> np.ndarray:
        """The aligned crop from a 5-point shape."""
        crop = self._dlib.get_face_chip(rgb, shape, size=size, padding=self.padding)
        return np.ascontiguousarray(crop, dtype=np.uint8)

    def align(self, rgb: np.ndarray, size: int) -> tuple[np.ndarray, tuple, float] | None:
        """Detect on a downscaled copy, then landmark and align on the full-resolution frame."""
        small, scale = downscale(rgb, self.detect_max_side)
        rects, scores, _ = self.detector.run(small, 0, DLIB_MIN_SCORE)
        if len(rects) == 0 and 2 * max(small.shape[:2]) <= self.detect_max_side:
            # HOG finds faces from ~80 px up: a small frame gets a second look at twice its
            # size (4-5x the cost, so only when the first look found nothing). Large frames
            # never: there it found no more real faces and added a false positive.
            rects, scores, _ = self.detector.run(small, 1, DLIB_MIN_SCORE)
        if len(rects) == 0:
            return None
        areas = [r.width() * r.height() for r in rects]
        i = int(np.argmax(areas))
        r = rects[i]
        box = (r.left() / scale, r.top() / scale, r.right() / scale, r.bottom() / scale)
        full = self._dlib.rectangle(*(round(v) for v in box))
        shape = self.predictor(rgb, full)
        crop = self._dlib.get_face_chip(rgb, shape, size=size, padding=self.padding)
        return np.ascontiguousarray(crop, dtype=np.uint8), box, float(scores[i])


# -- tracking between detections -----------------------------------------------------------------
# A tracked frame's landmarks must put the face where the next detection finds it: below this
# IoU the tracked frames since the last detection are detected one by one instead.
TRACK_MIN_IOU = 0.5


def _points(shape) -> np.ndarray:
    return np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float64)


def _frame_of(points: np.ndarray) -> tuple[np.ndarray, float]:
    """Centre and scale (RMS distance from the centre) of a set of landmarks."""
    centre = points.mean(0)
    return centre, float(np.sqrt(((points - centre) ** 2).sum(1).mean())) or 1.0


def box_iou(a: tuple, b: tuple) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(0.0, w) * max(0.0, h)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


class _Tracker:
    """Detect on every k-th sampled frame; between, re-fit the 5 landmarks on a box carried over
    from the previous frame's landmarks (dlib's landmark model is cheap, detection is not).

    A tracked face is emitted only once the next detection confirms it (the detected box
    overlaps the tracked one): when it does not, or no face is found, those frames are
    detected one by one as with k = 1, so tracking never adds a face detection would miss
    nor keeps one it would drop. Confidence of a tracked face: its closing detection's score.
    Holds at most k - 1 decoded frames (those pending).
    """

    def __init__(self, backend: DlibBackend, size: int):
        self.b, self.size = backend, size
        self.pending: list[tuple[int, np.ndarray, np.ndarray, tuple]] = []  # idx, rgb, crop, box
        self.points: np.ndarray | None = None  # the last frame's landmarks
        self.offset = np.zeros(2)  # detector box centre minus landmark centre, in landmark scale
        self.extent = np.ones(2)  # detector box size in landmark scale
        self.since = 0  # sampled frames since the last detection

    def _box_from(self, points: np.ndarray) -> tuple[float, float, float, float]:
        centre, scale = _frame_of(points)
        c, half = centre + self.offset * scale, self.extent * scale / 2
        return (c[0] - half[0], c[1] - half[1], c[0] + half[0], c[1] + half[1])

    def _detected(self, idx: int, rgb: np.ndarray) -> list[Face]:
        """Detect on this frame; settle the pending frames; restart tracking from here."""
        found = self.b.detect(rgb)
        out: list[Face] = []
        if found is not None and self.pending:
            box, score = found
            if box_iou(box, self._box_from(self.points)) >= TRACK_MIN_IOU:
                out += [Face(i, crop, tb, score) for i, _, crop, tb in self.pending]
            else:
                out += self._one_by_one()
        elif self.pending:
            out += self._one_by_one()
        self.pending, self.since = [], 0
        if found is None:
            self.points = None
            return out
        box, score = found
        shape = self.b.landmarks(rgb, box)
        self.points = _points(shape)
        centre, scale = _frame_of(self.points)
        b = np.asarray(box)
        self.offset = ((b[:2] + b[2:]) / 2 - centre) / scale
        self.extent = (b[2:] - b[:2]) / scale
        out.append(Face(idx, self.b.chip(rgb, shape, self.size), box, score))
        return out

    def _one_by_one(self) -> list[Face]:
        out = []
        for i, rgb, _, _ in self.pending:
            found = self.b.align(rgb, self.size)
            if found is not None:
                out.append(Face(i, found[0], found[1], found[2]))
        return out

    def frame(self, idx: int, rgb: np.ndarray) -> list[Face]:
        """The faces this frame settles (its own, and pending tracked ones), in frame order."""
        self.since += 1
        if self.points is None or self.since >= self.b.detect_every:
            return self._detected(idx, rgb)
        shape = self.b.landmarks(rgb, self._box_from(self.points))
        self.points = _points(shape)
        crop = self.b.chip(rgb, shape, self.size)
        self.pending.append((idx, rgb, crop, self._box_from(self.points)))
        return []

    def finish(self) -> list[Face]:
        """Settle what is pending at the end of the video: its last frame is detected."""
        if not self.pending:
            return []
        idx, rgb, _, _ = self.pending.pop()
        return self._detected(idx, rgb)


# -- opencv --------------------------------------------------------------------------------------
# Where dlib's get_face_chip (padding 0.25) puts the eye centres, as fractions of the crop side,
# so that both light backends give crops of the same framing.
_EYE_Y, _EYE_HALF_GAP = 0.316, 0.177


class OpenCVBackend(FrameBackend):
    """OpenCV's bundled Haar cascades: face, then both eyes to level and scale the crop.

    Confidence is the cascade's level weight of the face (unbounded; higher is surer). A face
    whose two eyes are not found is cropped square around its box, without rotation.
    """

    name = "opencv"

    def __init__(
        self, detect_max_side: int = DEFAULT_DETECT_MAX_SIDE, padding: float = DEFAULT_PADDING
    ):
        folder = Path(getattr(getattr(cv2, "data", None), "haarcascades", "") or ".")
        face_xml = folder / "haarcascade_frontalface_default.xml"
        eye_xml = folder / "haarcascade_eye.xml"
        if not hasattr(cv2, "CascadeClassifier") or not face_xml.is_file():
            raise BackendUnavailableError(
                f"backend 'opencv' needs OpenCV's Haar cascades, which OpenCV {cv2.__version__} "
                "lacks (5.x moved them out); `pip install 'opencv-python-headless>=4.10,<5'` or "
                "choose backend=dlib"
            )
        self.face = cv2.CascadeClassifier(str(face_xml))
        self.eyes = cv2.CascadeClassifier(str(eye_xml))
        self.detect_max_side = detect_max_side
        self.padding = padding

    def align(self, rgb: np.ndarray, size: int) -> tuple[np.ndarray, tuple, float] | None:
        """Detect face and eyes on a downscaled grey copy; warp the full-resolution frame."""
        small, scale = downscale(rgb, self.detect_max_side)
        gray = cv2.equalizeHist(cv2.cvtColor(small, cv2.COLOR_RGB2GRAY))
        # Faces under 1/8 of the frame's short side are not the speaker; skipping those
        # scales halves the cascade's cost.
        t = THRESHOLDS["opencv"]
        min_side = max(24, int(min(gray.shape) * t["min_face_side_fraction"]))
        boxes, _, weights = self.face.detectMultiScale3(
            gray, scaleFactor=t["scale_factor"], minNeighbors=t["min_neighbors"],
            minSize=(min_side, min_side), outputRejectLevels=True,
        )  # fmt: skip
        if len(boxes) == 0:
            return None
        boxes = np.asarray(boxes, dtype=np.float64)
        i = _largest(boxes)
        x, y, w, h = boxes[i]
        eyes = self._eye_centres(gray, x, y, w, h)
        if eyes is not None:
            m = _eye_transform(eyes[0] / scale, eyes[1] / scale, size)
        else:
            m = _box_transform(x / scale, y / scale, w / scale, h / scale, size, self.padding)
        crop = cv2.warpAffine(rgb, m, (size, size), flags=cv2.INTER_LINEAR)
        box = (x / scale, y / scale, (x + w) / scale, (y + h) / scale)
        return crop, box, float(np.ravel(weights)[i])

    def _eye_centres(
        self, gray: np.ndarray, x: float, y: float, w: float, h: float
    ) -> tuple[np.ndarray, np.ndarray] | None:
        # Eyes lie in the upper part of the face box: looking only there skips mouths and nostrils.
        x0, y0, x1, y1 = int(x), int(y), int(x + w), int(y + 0.6 * h)
        roi = gray[y0:y1, x0:x1]
        found, _, weights = self.eyes.detectMultiScale3(
            roi, scaleFactor=1.1, minNeighbors=3, minSize=(max(4, int(w / 7)),) * 2,
            maxSize=(max(8, int(w / 2.5)),) * 2,
            outputRejectLevels=True,
        )  # fmt: skip
        if len(found) < 2:
            return None
        found = np.asarray(found, dtype=np.float64)
        centres = found[:, :2] + found[:, 2:] / 2
        weights = np.ravel(weights)
        left = [j for j in range(len(found)) if centres[j, 0] < w / 2]
        right = [j for j in range(len(found)) if centres[j, 0] >= w / 2]
        if not left or not right:
            return None
        a = max(left, key=lambda j: weights[j])
        b = max(right, key=lambda j: weights[j])
        offset = np.array([x0, y0], dtype=np.float64)
        return centres[a] + offset, centres[b] + offset


def _eye_transform(left: np.ndarray, right: np.ndarray, size: int) -> np.ndarray:
    """Similarity transform putting the eye centres where dlib's chips have them."""
    d = right - left
    angle = math.degrees(math.atan2(d[1], d[0]))
    scale = (2 * _EYE_HALF_GAP * size) / max(float(np.hypot(*d)), 1e-6)
    mid = (left + right) / 2
    m = cv2.getRotationMatrix2D((float(mid[0]), float(mid[1])), angle, scale)
    m[:, 2] += np.array([size / 2, _EYE_Y * size]) - mid
    return m


def _box_transform(x: float, y: float, w: float, h: float, size: int, padding: float) -> np.ndarray:
    """Scale-and-shift transform cropping a padded square around a face box."""
    side = max(w, h) * (1 + padding)
    s = size / side
    cx, cy = x + w / 2, y + h / 2
    return np.array([[s, 0, size / 2 - s * cx], [0, s, size / 2 - s * cy]], dtype=np.float64)


# -- OpenFace ------------------------------------------------------------------------------------
OPENFACE_ENV = "MERFLOW_OPENFACE_BIN"


class OpenFaceBackend:
    """OpenFace 2's `FeatureExtraction`: similarity-aligned faces, masks off, bad frames dropped.

    Confidence is OpenFace's landmark-tracking confidence in [0, 1].
    """

    name = "openface"

    def __init__(self, binary: str | None = None, timeout_per_frame: float = 2.0):
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
    """Faces from FeatureExtraction's `<stem>.csv` and `<stem>_aligned/frame_det_*.png`."""
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
        good = [r for r in candidates if int(float(r.get("success", "1"))) == 1]
        if not good:
            continue
        row = max(good, key=lambda r: _landmark_area(_landmark_box(r)))
        face_id = int(float(row.get("face_id", "0") or 0))
        image = aligned / f"frame_det_{face_id:02d}_{frame:06d}.png"
        if not image.is_file():
            continue  # -nobadaligned: OpenFace saved no image for a frame it judged badly aligned
        bgr = cv2.imread(str(image), cv2.IMREAD_COLOR)
        if bgr is None:
            raise UnreadableMediaError(f"OpenFace's aligned image {image} is unreadable")
        crop = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        if crop.shape[:2] != (size, size):
            crop = cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA)
        # OpenFace numbers frames from 1; merflow's frame_idx counts from 0 like the decoder.
        yield Face(frame - 1, crop, _landmark_box(row), float(row.get("confidence", "nan")))


def _landmark_box(row: dict[str, str]) -> tuple[float, float, float, float]:
    xs = [float(v) for k, v in row.items() if k.startswith("x_") and k[2:].isdigit()]
    ys = [float(v) for k, v in row.items() if k.startswith("y_") and k[2:].isdigit()]
    if not xs or not ys:
        return (math.nan,) * 4
    return (min(xs), min(ys), max(xs), max(ys))


def _landmark_area(box: tuple[float, float, float, float]) -> float:
    area = (box[2] - box[0]) * (box[3] - box[1])
    return area if math.isfinite(area) else 0.0


# -- loading (once per process) ------------------------------------------------------------------
def load_backend(
    name: str = "dlib",
    detect_max_side: int = DEFAULT_DETECT_MAX_SIDE,
    padding: float = DEFAULT_PADDING,
    openface_bin: str | None = None,
    detect_every: int = 1,
) -> FaceBackend:
    """The named backend, built once per process and reused (models stay loaded).
    `detect_every` (dlib): detect on every k-th sampled frame, track between."""
    # Always positional: lru_cache would cache f("dlib") and f("dlib", 640, ...) separately.
    return _load_backend(name, int(detect_max_side), float(padding), openface_bin, detect_every)


@functools.lru_cache(maxsize=8)
def _load_backend(
    name: str, detect_max_side: int, padding: float, openface_bin: str | None, detect_every: int
) -> FaceBackend:
    if name == "dlib":
        return DlibBackend(detect_max_side, padding, detect_every)
    if name == "opencv":
        return OpenCVBackend(detect_max_side, padding)
    if name == "openface":
        return OpenFaceBackend(openface_bin)
    raise ValueError(f"unknown face backend {name!r}; choose one of {', '.join(BACKENDS)}")
