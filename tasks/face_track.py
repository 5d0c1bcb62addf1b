"""Landmark tracking between detections: dlib's detector on every k-th sampled frame only."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from tasks.face_frames import Face

if TYPE_CHECKING:
    from tasks.face_backends import DlibBackend

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


class LandmarkTracker:
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
