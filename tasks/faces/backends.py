"""Face detection and alignment backends behind one interface, and loading one by name.

`dlib` (the default) and `opencv` look at frames that `FrameSampler` (tasks/faces/frames.py)
decodes as a stream (dlib with `detect_every` k > 1 detects on every k-th and tracks the
landmarks between: tasks/faces/track.py); `openface` runs OpenFace 2's `FeatureExtraction`
binary on the file, as the paper and the challenge baseline do (tasks/faces/openface.py).
Every backend gives all the faces of a frame, the largest first; with `mouth` the light
backends also fit dlib's 68-point landmarks (for the speaking face, tasks/faces/speaker.py).
"""

from __future__ import annotations

import functools
import importlib.util
import math
import threading
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np

from tasks.faces.frames import (
    Aligned,
    BackendUnavailableError,
    Face,
    FaceBackend,
    FrameBackend,
    FrameSampler,
    detect_scale,
    downscale,
)
from tasks.faces.openface import OpenFaceBackend
from tasks.faces.settings import (
    BACKENDS,
    DEFAULT_DETECT_MAX_SIDE,
    DEFAULT_PADDING,
    DLIB_MIN_SCORE,
    THRESHOLDS,
    FaceSettings,
)
from tasks.faces.track import LandmarkTracker


def _largest_first(areas: list[float] | np.ndarray) -> list[int]:
    """Indices by decreasing area; equal areas keep their order (the first is argmax's pick)."""
    return sorted(range(len(areas)), key=lambda i: -areas[i])


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


_MOUTH_LOCK = threading.Lock()


@functools.cache
def mouth_predictor():
    """dlib's 68-point landmark model (it draws the lips), loaded once per process."""
    import dlib

    model = dlib_model_dir() / "shape_predictor_68_face_landmarks.dat"
    if not model.is_file():
        raise BackendUnavailableError(
            f"dlib's 68-point landmark model {model} is missing (faces.select=speaking needs "
            "it); reinstall face_recognition_models or use faces.select=largest"
        )
    return dlib.shape_predictor(str(model))


def mouth_points(rgb: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
    """The 68 landmarks (frame pixels, float32) dlib fits in `box`."""
    import dlib

    predictor = mouth_predictor()
    with _MOUTH_LOCK:  # one model for every backend of the process; dlib's is not thread-safe
        shape = predictor(rgb, dlib.rectangle(*(round(v) for v in box)))
    return np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float32)


# right - left of every box dlib's frontal face detector finds on one copy of its pyramid (its
# window); the boxes it reports are that box mapped up from the copy where it was found.
HOG_WINDOW = 72
# Where on a copy those windows lie: dlib's HOG cells are 8 px, and every window it reports has
# left and top at 5 modulo 8 (seen on every detection of real and demo footage; a test pins that
# each reported box is on this grid).
HOG_CELL, HOG_GRID_OFFSET = 8, 5


class DlibBackend(FrameBackend):
    """dlib's HOG detector, 5-point landmarks and `get_face_chip` alignment.

    Confidence is the HOG detector's SVM score (unbounded; higher is surer; below
    `DLIB_MIN_SCORE` a detection is dropped). With `detect_every` k > 1 the detector runs on
    every k-th sampled frame only and the frames between are tracked (`faces`). With `mouth`
    each face's landmarks are dlib's 68 points (fitted on the same box), else the 5.
    """

    name = "dlib"

    def __init__(
        self,
        detect_max_side: int = DEFAULT_DETECT_MAX_SIDE,
        padding: float = DEFAULT_PADDING,
        detect_every: int = 1,
        mouth: bool = False,
    ):
        import dlib

        model = dlib_model_dir() / "shape_predictor_5_face_landmarks.dat"
        if not model.is_file():
            raise BackendUnavailableError(f"dlib landmark model {model} is missing; reinstall it")
        self._dlib = dlib
        self.detector = dlib.get_frontal_face_detector()
        self._pyramid = dlib.pyramid_down(6)  # the detector's own (each copy 5/6 of the last)
        self.predictor = dlib.shape_predictor(str(model))
        self.detect_max_side = detect_max_side
        self.padding = padding
        self.detect_every = max(1, int(detect_every))
        self.mouth = mouth
        if mouth:
            mouth_predictor()  # a missing model stops the shard here, not at its first face

    def faces(self, video: Path, sampler: FrameSampler, size: int) -> Iterator[Face]:
        """Every frame detected (detect_every 1), or detected on every k-th and tracked between."""
        if self.detect_every == 1:
            yield from super().faces(video, sampler, size)
            return
        lock = self.__dict__.setdefault("_align_lock", threading.Lock())
        tracker = LandmarkTracker(self, size)
        for idx, rgb in sampler.frames(video):
            with lock:
                out = tracker.frame(idx, np.ascontiguousarray(rgb))
            yield from out
        with lock:
            out = tracker.finish()
        yield from out

    def detect(
        self, rgb: np.ndarray, min_side: float | None = None
    ) -> list[tuple[tuple[float, float, float, float], float]]:
        """Every face's box (frame pixels) and HOG score, the largest first, as dlib's detector
        gives them on the colour frame (downscaled to `detect_max_side`). On colour its HOG
        takes each pixel's strongest channel gradient: a grey copy is ~1.2x faster but moves
        the reported box by a pyramid step (IoU ~0.7) on ~1 frame in 12 of real footage, and
        a tracked face carries that box on (docs/faces.md). `min_side`: faces at least this
        large (frame pixels) are looked for, with the same boxes and scores: dlib scans a
        pyramid of copies, each 5/6 the size of the last, with a HOG_WINDOW window; the copies
        where such faces would be smaller than the window are skipped, the rest made by dlib's
        own pyramid (the very same pixels, HOG features and scores), at a fraction of the
        cost."""
        small, scale = downscale(rgb, self.detect_max_side)
        skip = self.skips(rgb.shape, min_side) if min_side else 0
        for _ in range(skip):
            small = self._pyramid(small)
        rects, scores, _ = self.detector.run(small, 0, DLIB_MIN_SCORE)
        if skip:
            rects = [self._full_pyramid_box(r, skip) for r in rects]
        elif len(rects) == 0 and 2 * max(small.shape[:2]) <= self.detect_max_side:
            # HOG finds faces from ~80 px up: a small frame gets a second look at twice its
            # size (4-5x the cost, so only when the first look found nothing). Large frames
            # never: there it found no more real faces and added a false positive.
            rects, scores, _ = self.detector.run(small, 1, DLIB_MIN_SCORE)
        out = []
        for i in _largest_first([r.width() * r.height() for r in rects]):
            r = rects[i]
            box = (r.left() / scale, r.top() / scale, r.right() / scale, r.bottom() / scale)
            out.append((box, float(scores[i])))
        return out

    def skips(self, shape: tuple, min_side: float) -> int:
        """How many copies of its pyramid a detection for faces at least `min_side` large (frame
        pixels) on a frame of `shape` skips: 0 when it is a detection for every size."""
        scale = detect_scale(shape, self.detect_max_side)
        return max(0, math.floor(math.log(min_side * scale / HOG_WINDOW) / math.log(6 / 5)))

    def _full_pyramid_box(self, rect, skip: int):
        """The box the whole pyramid reports for a face found on a copy `skip` levels down.

        dlib maps a window found on the copy `level` levels down to frame pixels with
        `rect_up(window, level)`, rounding once at the end; mapped from a shorter pyramid it
        is rounded one more time, and 1 px moves the 5 landmarks fitted in it by ~0.7 % of
        the eye distance. So the window is recovered (the integer box of HOG_WINDOW that maps to
        `rect`) and mapped up the whole way, as dlib does."""
        d, pyramid = self._dlib, self._pyramid
        corners = (rect.left(), rect.top(), rect.right(), rect.bottom())
        for level in range(32):
            tl = pyramid.point_down(d.dpoint(rect.left(), rect.top()), level)
            br = pyramid.point_down(d.dpoint(rect.right(), rect.bottom()), level)
            window = d.rectangle(round(tl.x), round(tl.y), round(br.x), round(br.y))
            back = pyramid.rect_up(window, level)
            if window.right() - window.left() == HOG_WINDOW and corners == (
                back.left(),
                back.top(),
                back.right(),
                back.bottom(),
            ):
                return pyramid.rect_up(window, level + skip)
        return pyramid.rect_up(d.drectangle(rect), skip)  # not seen: within a pixel

    def snap(self, box: tuple, shape: tuple) -> tuple[float, float, float, float]:
        """The box dlib's detector would report for a face at `box` on a frame of `shape`: the
        window of its pyramid nearest in size (the copy where the face is HOG_WINDOW wide) and
        in position (the cell grid of that copy), mapped up to frame pixels as `detect` maps
        its detections. A box the detector reported is its own snap. dlib's landmark model was
        trained on its detector's boxes and its fit depends on where the box lies: a tracked
        face fitted in a snapped box gets the landmarks that detection on that frame gives
        whenever the detector picks that window (docs/faces.md). A face smaller than the
        window (found on a small frame's upsampled look) is returned as it is."""
        d, pyramid = self._dlib, self._pyramid
        scale = detect_scale(shape, self.detect_max_side)
        x0, y0, x1, y1 = (v * scale for v in box)
        if x1 - x0 < HOG_WINDOW * 11 / 12:  # below the frame's window: the upsampled look's grid
            return tuple(float(v) for v in box)
        # dlib's sizes count pixels (right - left + 1): 73 on the copy, ~73 * (6/5)^level up
        level = max(0, round(math.log((x1 - x0 + 1) / (HOG_WINDOW + 1)) / math.log(6 / 5)))
        centre = pyramid.point_down(d.dpoint((x0 + x1) / 2, (y0 + y1) / 2), level)
        left, top = (
            round((v - HOG_WINDOW / 2 - HOG_GRID_OFFSET) / HOG_CELL) * HOG_CELL + HOG_GRID_OFFSET
            for v in (centre.x, centre.y)
        )
        up = pyramid.rect_up(d.rectangle(left, top, left + HOG_WINDOW, top + HOG_WINDOW), level)
        return (up.left() / scale, up.top() / scale, up.right() / scale, up.bottom() / scale)

    def landmarks(self, rgb: np.ndarray, box: tuple[float, float, float, float]):
        """dlib's 5-point shape of the face in `box` (frame pixels)."""
        return self.predictor(rgb, self._dlib.rectangle(*(round(v) for v in box)))

    def chip(self, rgb: np.ndarray, shape, size: int) -> np.ndarray:
        """The aligned crop from a 5-point shape."""
        crop = self._dlib.get_face_chip(rgb, shape, size=size, padding=self.padding)
        return np.ascontiguousarray(crop, dtype=np.uint8)

    def points(self, rgb: np.ndarray, shape, box: tuple) -> np.ndarray:
        """The landmarks a Face records: the 68 points with `mouth`, else the 5 of `shape`."""
        if self.mouth:
            return mouth_points(rgb, box)
        return np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float32)

    def align_all(self, rgb: np.ndarray, size: int) -> list[Aligned]:
        """Detect on a downscaled copy, then landmark and align on the full-resolution frame."""
        out = []
        for box, score in self.detect(rgb):
            shape = self.landmarks(rgb, box)
            out.append((self.chip(rgb, shape, size), box, score, self.points(rgb, shape, box)))
        return out


# -- opencv --------------------------------------------------------------------------------------
# Where dlib's get_face_chip (padding 0.25) puts the eye centres, as fractions of the crop side,
# so that both light backends give crops of the same framing.
_EYE_Y, _EYE_HALF_GAP = 0.316, 0.177


class OpenCVBackend(FrameBackend):
    """OpenCV's bundled Haar cascades: face, then both eyes to level and scale the crop.

    Confidence is the cascade's level weight of the face (unbounded; higher is surer). A face
    whose two eyes are not found is cropped square around its box, without rotation. Landmarks:
    the two eye centres (None when not found), or dlib's 68 points fitted on the box (`mouth`).
    """

    name = "opencv"

    def __init__(
        self,
        detect_max_side: int = DEFAULT_DETECT_MAX_SIDE,
        padding: float = DEFAULT_PADDING,
        mouth: bool = False,
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
        self.mouth = mouth
        if mouth:
            mouth_predictor()

    def align_all(self, rgb: np.ndarray, size: int) -> list[Aligned]:
        """Detect faces and eyes on a downscaled grey copy; warp the full-resolution frame."""
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
            return []
        boxes = np.asarray(boxes, dtype=np.float64)
        out = []
        for i in _largest_first(boxes[:, 2] * boxes[:, 3]):
            x, y, w, h = boxes[i]
            eyes = self._eye_centres(gray, x, y, w, h)
            if eyes is not None:
                m = _eye_transform(eyes[0] / scale, eyes[1] / scale, size)
            else:
                m = _box_transform(x / scale, y / scale, w / scale, h / scale, size, self.padding)
            crop = cv2.warpAffine(rgb, m, (size, size), flags=cv2.INTER_LINEAR)
            box = (x / scale, y / scale, (x + w) / scale, (y + h) / scale)
            if self.mouth:
                points = mouth_points(rgb, box)
            else:
                points = None if eyes is None else (np.stack(eyes) / scale).astype(np.float32)
            out.append((crop, box, float(np.ravel(weights)[i]), points))
        return out

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


# -- loading (once per process) ------------------------------------------------------------------
def load_backend(
    name: str = "dlib",
    detect_max_side: int = DEFAULT_DETECT_MAX_SIDE,
    padding: float = DEFAULT_PADDING,
    openface_bin: str | None = None,
    detect_every: int = 1,
    mouth: bool = False,
    recipe: str = "merflow",
) -> FaceBackend:
    """The named backend, built once per process and reused (models stay loaded).
    `detect_every` (dlib): detect on every k-th sampled frame, track between; `mouth` (dlib,
    opencv): fit dlib's 68 landmarks too (OpenFace always gives 68); `recipe` (openface):
    "mertools" runs OpenFace as the challenge baseline does (masked, failed frames kept)."""
    # Always positional: lru_cache would cache f("dlib") and f("dlib", 640, ...) separately.
    return _load_backend(
        name, int(detect_max_side), float(padding), openface_bin, detect_every, bool(mouth), recipe
    )


@functools.lru_cache(maxsize=8)
def _load_backend(
    name: str,
    detect_max_side: int,
    padding: float,
    openface_bin: str | None,
    detect_every: int,
    mouth: bool,
    recipe: str = "merflow",
) -> FaceBackend:
    if name == "dlib":
        return DlibBackend(detect_max_side, padding, detect_every, mouth)
    if name == "opencv":
        return OpenCVBackend(detect_max_side, padding, mouth)
    if name == "openface":
        return OpenFaceBackend(openface_bin, recipe=recipe)
    raise ValueError(f"unknown face backend {name!r}; choose one of {', '.join(BACKENDS)}")


def backend_for(settings: FaceSettings) -> FaceBackend:
    """The backend `settings` name, loaded once per process (68 landmarks on every face when the
    speaking face is chosen)."""
    return load_backend(
        settings.backend,
        settings.detect_max_side,
        settings.padding,
        settings.openface_bin,
        settings.detect_every,
        mouth=settings.select == "speaking",
        recipe=settings.recipe,
    )
