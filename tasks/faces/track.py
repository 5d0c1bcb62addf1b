"""Faces across frames: dlib's landmarks tracked between detections (every k-th sampled frame),
and the faces of a video linked into tracks (box overlap, appearance, shot cuts)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import cv2
import numpy as np

from tasks.faces.frames import Face


class Detector(Protocol):
    """What the tracker needs of its backend (tasks/faces/backends.py DlibBackend): detection
    (`min_side`: only faces at least that large; `skips`: whether that saves anything), the box
    detection would report near a box (`snap`), the landmark fit on a box, the aligned chip and
    the points of a fit."""

    detect_every: int

    def detect(
        self, rgb: np.ndarray, min_side: float | None = None
    ) -> list[tuple[tuple, float]]: ...

    def skips(self, shape: tuple, min_side: float) -> int: ...

    def snap(self, box: tuple, shape: tuple) -> tuple: ...

    def landmarks(self, rgb: np.ndarray, box: tuple) -> Any: ...

    def chip(self, rgb: np.ndarray, shape: Any, size: int) -> np.ndarray: ...

    def points(self, rgb: np.ndarray, shape: Any, box: tuple) -> np.ndarray: ...

    def align_all(self, rgb: np.ndarray, size: int) -> list: ...


# -- tracking between detections -----------------------------------------------------------------
# A tracked frame's landmarks must put the face where the next detection finds it: below this
# IoU the frames between are not settled by tracking (LandmarkTracker: the frame halfway is
# detected, and so on).
TRACK_MIN_IOU = 0.5
# While faces are followed, a detection that confirms them looks only for faces about as large as
# the smallest followed one (DlibBackend.detect's `min_side`: 2-4x cheaper, the same boxes and
# scores); every FULL_DETECT_EVERY-th detection, and any that fails to confirm, looks for faces
# of every size.
FULL_DETECT_EVERY = 5
CONFIRM_MIN_SIDE = 0.8  # of the smallest followed face's side


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


@dataclass
class _Followed:
    """One face followed from a detection: its last landmarks, and the detector's box around
    them in landmark units (centre offset, size)."""

    points: np.ndarray
    offset: np.ndarray
    extent: np.ndarray

    @classmethod
    def start(cls, points: np.ndarray, box: tuple) -> _Followed:
        centre, scale = _frame_of(points)
        b = np.asarray(box)
        return cls(points, ((b[:2] + b[2:]) / 2 - centre) / scale, (b[2:] - b[:2]) / scale)

    def box(self) -> tuple[float, float, float, float]:
        centre, scale = _frame_of(self.points)
        c, half = centre + self.offset * scale, self.extent * scale / 2
        return (c[0] - half[0], c[1] - half[1], c[0] + half[0], c[1] + half[1])


class LandmarkTracker:
    """Detect on every k-th sampled frame; between, re-fit the 5 landmarks of each face on a box
    carried over from the previous frame's landmarks (dlib's landmark model is cheap, detection
    is not), put where the detector would put it (`snap`: its pyramid's window nearest in size
    and position; the fit depends on the box it starts from).

    The frames between two detections are settled when the two agree: both find no face (the
    frames between are faceless), or the later confirms the faces followed from the earlier
    (the largest, rank 0, when the later's largest overlaps it; each other face when some
    detection overlaps it; they are kept in those frames, with the confirming detection's
    score). When they do not agree, the frame halfway between is detected and each half is
    settled the same way, down to single frames: a face that comes into view, leaves, or is
    replaced by another at a cut costs a few detections, not one per frame. So tracking keeps
    no face that the detections around it drop, and a face that both find is kept in the
    frames between even where detection on one of them alone would miss it. Only a face seen
    for fewer frames than lie between two faceless detections is missed. Holds at most k - 1
    decoded frames (those pending).
    """

    def __init__(self, backend: Detector, size: int):
        self.b, self.size = backend, size
        self.pending: list[tuple[int, np.ndarray]] = []  # frames since the last detection
        self.followed: list[_Followed] = []  # its faces, [0] the largest
        self.since = backend.detect_every - 1  # sampled frames since the last detection (the
        # first frame is detected)
        self.detections = 0  # since the last one that looked for faces of every size

    def _confirmed(self, found: list[tuple[tuple, float]], boxes: list[tuple]) -> bool:
        return bool(found) and box_iou(found[0][0], boxes[0]) >= TRACK_MIN_IOU

    def _detect(self, rgb: np.ndarray, boxes: list[tuple]) -> list[tuple[tuple, float]]:
        """This frame's faces: while faces are followed, only those about as large as the
        smallest of them (the same boxes and scores; every size on every FULL_DETECT_EVERY-th
        detection); every size otherwise, or when the followed faces are not confirmed."""
        self.detections += 1
        if boxes and self.detections < FULL_DETECT_EVERY:
            smallest = CONFIRM_MIN_SIDE * min(min(b[2] - b[0], b[3] - b[1]) for b in boxes)
            if self.b.skips(rgb.shape, smallest):  # else it would be a detection for every size
                found = self.b.detect(rgb, min_side=smallest)
                if self._confirmed(found, boxes):
                    return found
        self.detections = 0
        return self.b.detect(rgb)

    def _follow(self, start: list[_Followed], frames: list[tuple[int, np.ndarray]]) -> list:
        """Follow the faces of `start` (left as they are) through `frames`: per frame, per face,
        the landmark fit and the box it was fitted in, and the box carried on to the next
        frame. The fits of one model back to back, while its data stays in the CPU's caches (a
        5-point fit took 0.42 ms warm, 0.84 ms after 32 MB of other work; a decode between two
        fits is such work)."""
        faces = [_Followed(f.points, f.offset, f.extent) for f in start]
        out = []
        for _, rgb in frames:
            out.append([])
            for f in faces:
                box = self.b.snap(f.box(), rgb.shape)  # from the last frame's landmarks
                shape = self.b.landmarks(rgb, box)
                f.points = _points(shape)
                moved = self.b.snap(f.box(), rgb.shape)  # from this frame's
                if moved != box:  # fitted again in the box recorded, as detection fits its box
                    box, shape = moved, self.b.landmarks(rgb, moved)
                    f.points = _points(shape)
                out[-1].append((shape, box, f.box()))
        return out

    def _emit(self, frames: list, tracked: list, found: list, boxes: list[tuple]) -> list[Face]:
        """The tracked faces of `frames` that the detection `found` confirms, with its scores:
        crops, then landmarks (each model's calls back to back)."""
        scores = [found[0][1]] + [_confirming(b, found) for b in boxes[1:]]
        kept = [
            (i, rgb, r, shape, box)
            for (i, rgb), fits in zip(frames, tracked, strict=True)
            for r, (shape, box, _) in enumerate(fits)
            if scores[r] is not None
        ]
        crops = [self.b.chip(rgb, shape, self.size) for _, rgb, _, shape, _ in kept]
        return [
            Face(i, crop, box, scores[r], r, self.b.points(rgb, shape, box))
            for (i, rgb, r, shape, box), crop in zip(kept, crops, strict=True)
        ]

    def _settle(
        self,
        start: list[_Followed],
        frames: list[tuple[int, np.ndarray]],
        found: list[tuple[tuple, float]],
        tracked: list | None = None,
    ) -> list[Face]:
        """The faces of `frames`, which lie between a detection whose faces are `start` and one
        that found `found` (see the class): tracked when the later confirms them, none when
        both are faceless, else the frame halfway is detected and each half settled alike.
        `tracked`: `_follow(start, frames)`, when already done."""
        if not frames:
            return []
        if start:
            tracked = tracked if tracked is not None else self._follow(start, frames)
            boxes = [carried for *_, carried in tracked[-1]]
            if self._confirmed(found, boxes):
                return self._emit(frames, tracked, found, boxes)
        elif not found:
            return []
        mid = len(frames) // 2
        i, rgb = frames[mid]
        aligned = self.b.align_all(rgb, self.size)
        here = [Face(i, c, box, sc, r, pts) for r, (c, box, sc, pts) in enumerate(aligned)]
        middle = [(box, score) for _, box, score, _ in aligned]
        before = self._settle(start, frames[:mid], middle, tracked[:mid] if start else None)
        return before + here + self._settle(self._start(rgb, middle), frames[mid + 1 :], found)

    def _start(self, rgb: np.ndarray, found: list[tuple[tuple, float]]) -> list[_Followed]:
        return [_Followed.start(_points(self.b.landmarks(rgb, box)), box) for box, _ in found]

    def _detected(self, idx: int, rgb: np.ndarray) -> list[Face]:
        """Detect on this frame; settle the pending frames; restart tracking from here."""
        tracked = self._follow(self.followed, self.pending) if self.followed else None
        boxes = [carried for *_, carried in tracked[-1]] if tracked else []
        boxes = boxes or [f.box() for f in self.followed]  # nothing pending: from the detection
        found = self._detect(rgb, boxes)
        out = self._settle(self.followed, self.pending, found, tracked)
        self.pending, self.since, self.followed = [], 0, []
        for rank, (box, score) in enumerate(found):
            shape = self.b.landmarks(rgb, box)
            self.followed.append(_Followed.start(_points(shape), box))
            crop = self.b.chip(rgb, shape, self.size)
            out.append(Face(idx, crop, box, score, rank, self.b.points(rgb, shape, box)))
        return out

    def frame(self, idx: int, rgb: np.ndarray) -> list[Face]:
        """The faces this frame settles (its own, and pending tracked ones), in frame order."""
        self.since += 1
        if self.since >= self.b.detect_every:
            return self._detected(idx, rgb)
        self.pending.append((idx, rgb))  # followed when the next detection is due
        return []

    def finish(self) -> list[Face]:
        """Settle what is pending at the end of the video: its last frame is detected."""
        if not self.pending:
            return []
        idx, rgb = self.pending.pop()
        return self._detected(idx, rgb)


def _confirming(box: tuple, found: list[tuple[tuple, float]]) -> float | None:
    """The score of the detection that best overlaps `box`, if it overlaps enough."""
    best = max(found, key=lambda f: box_iou(box, f[0]))
    return best[1] if box_iou(box, best[0]) >= TRACK_MIN_IOU else None


# -- linking faces into tracks -------------------------------------------------------------------
# A face joins the track that ended nearest before it, in the same shot, when it is about the
# same size (side ratio within LINK_MAX_SCALE), has not moved more than LINK_MAX_SHIFT face
# sides, was unseen no longer than LINK_MAX_GAP_S (a missed detection or two does not split a
# track), and looks alike (colour signatures' Bhattacharyya coefficient >= LINK_MIN_SIMILARITY);
# among several such pairs the best (overlap + similarity) are taken first.
LINK_MAX_GAP_S = 1.0
LINK_MAX_SCALE = 1.5
LINK_MAX_SHIFT = 1.0
LINK_MIN_SIMILARITY = 0.6


def appearance(crop: np.ndarray) -> np.ndarray:
    """A face's colour signature: the hue-saturation-value histogram of the aligned crop's
    centre (skin, eyes, mouth; little background), summing to 1."""
    s = crop.shape[0]
    centre = np.ascontiguousarray(crop[s // 5 : s - s // 5, s // 5 : s - s // 5])
    hsv = cv2.cvtColor(centre, cv2.COLOR_RGB2HSV)
    hist = cv2.calcHist([hsv], [0, 1, 2], None, [8, 4, 4], [0, 180, 0, 256, 0, 256]).ravel()
    return (hist / max(float(hist.sum()), 1.0)).astype(np.float32)


def similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Bhattacharyya coefficient of two signatures: 1 identical, 0 disjoint colours."""
    return float(np.sqrt(np.clip(a, 0, None) * np.clip(b, 0, None)).sum())


@dataclass
class _Open:
    track: int
    box: np.ndarray
    time: float
    signature: np.ndarray


def _side(box: np.ndarray) -> float:
    return float(np.sqrt(max((box[2] - box[0]) * (box[3] - box[1]), 1e-9)))


def _link_score(t: _Open, box: np.ndarray, signature: np.ndarray) -> float | None:
    """How well a face continues an open track (overlap + similarity), or None: it does not."""
    side_t, side_f = _side(t.box), _side(box)
    shift = np.hypot(*((box[:2] + box[2:]) / 2 - (t.box[:2] + t.box[2:]) / 2)) / side_t
    if not (1 / LINK_MAX_SCALE <= side_f / side_t <= LINK_MAX_SCALE and shift <= LINK_MAX_SHIFT):
        return None  # NaN boxes (unknown) fail here too: such a face starts its own track
    sim = similarity(t.signature, signature)
    return None if sim < LINK_MIN_SIMILARITY else box_iou(t.box, box) + sim


def link_tracks(
    frame_idx: np.ndarray,
    times: np.ndarray,
    boxes: np.ndarray,
    signatures: np.ndarray,
    cuts: list[int] | np.ndarray = (),
) -> np.ndarray:
    """Track ids (0, 1, ... in order of first appearance) of faces given in frame order;
    faces of one frame never share a track, and a shot cut ends every track."""
    n = len(frame_idx)
    ids = np.full(n, -1, np.int32)
    cuts = sorted(int(c) for c in cuts)
    open_: list[_Open] = []
    next_cut, n_tracks, start = 0, 0, 0
    while start < n:
        frame = frame_idx[start]
        stop = start
        while stop < n and frame_idx[stop] == frame:
            stop += 1
        rows = range(start, stop)
        if next_cut < len(cuts) and cuts[next_cut] <= frame:
            open_ = []  # a new shot since the last face: nothing continues across it
            while next_cut < len(cuts) and cuts[next_cut] <= frame:
                next_cut += 1
        t_now = float(times[start])
        open_ = [t for t in open_ if t_now - t.time <= LINK_MAX_GAP_S]
        pairs = []
        for j, t in enumerate(open_):
            for r in rows:
                score = _link_score(t, boxes[r], signatures[r])
                if score is not None:
                    pairs.append((score, j, r))
        used_t: set[int] = set()
        for _, j, r in sorted(pairs, key=lambda p: -p[0]):
            if j in used_t or ids[r] >= 0:
                continue
            used_t.add(j)
            ids[r] = open_[j].track
            t = open_[j]
            t.box, t.time = boxes[r], t_now
            t.signature = 0.8 * t.signature + 0.2 * signatures[r]
        for r in rows:
            if ids[r] < 0:
                ids[r] = n_tracks
                open_.append(_Open(n_tracks, boxes[r], t_now, signatures[r].copy()))
                n_tracks += 1
        start = stop
    return ids
