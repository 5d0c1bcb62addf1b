"""Faces detected on every k-th frame and tracked between: the same crops as detecting on
every frame, never a face where detection finds none; and the settings that choose it."""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import pytest

from flows.config import load_settings
from flows.plan import face_settings
from tasks.faces import backends as face_backends
from tasks.faces.crop import crop_faces
from tasks.faces.crop_files import load_crops
from tasks.faces.frames import BackendUnavailableError, FrameSampler
from tasks.faces.settings import FaceSettings, faces_extractor_id
from tasks.faces.track import box_iou
from tests.tasks import badmedia


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("track")
    return {
        "face_then_blank": badmedia.face_then_blank_clip(d / "fb.mp4", rate=5),
        "blank_then_face": badmedia.face_then_blank_clip(d / "bf.mp4", rate=5, blank_first=True),
        "face": badmedia.face_clip(d / "face.mp4", seconds=1.0, rate=5),
    }


def _crops(video: Path, out: Path, **kw) -> tuple:
    result = crop_faces(video, out, FaceSettings(**kw))
    return result, load_crops(result.path)


def test_tracked_crops_match_detection_on_every_frame(small_corpus, tmp_path):
    # Demo clips: a real face that drifts, scales and wobbles from frame to frame. Tracked boxes
    # on the detector's grid give detection's own crops wherever it would pick the same window:
    # 0.18 grey levels apart on average here, against 0.60 with boxes not snapped (version 3).
    gaps = []
    for video in sorted(small_corpus.rglob("*.mp4"))[:3]:
        _, every = _crops(video, tmp_path / "a.npz", size=64, detect_every=1)
        _, tracked = _crops(video, tmp_path / "b.npz", size=64, detect_every=4)
        assert list(tracked.frame_idx) == list(every.frame_idx)
        gap = np.abs(tracked.crops.astype(float) - every.crops.astype(float)).mean()
        assert gap < 4.0, f"{video.name}: tracked crops differ by {gap:.1f} grey levels"
        ious = [box_iou(a, b) for a, b in zip(every.boxes, tracked.boxes, strict=True)]
        assert min(ious) > 0.6
        gaps.append(gap)
    assert np.mean(gaps) < 0.3, gaps


def test_tracking_never_keeps_a_face_detection_would_drop(clips, tmp_path):
    # Frames 0-4 show the face, 5-9 grey: the tracked frames before the face vanishes are
    # settled by detecting each of them, and the grey ones give nothing.
    for k in (2, 3, 4):
        result, crops = _crops(clips["face_then_blank"], tmp_path / f"{k}.npz", detect_every=k)
        assert (result.n_frames_sampled, result.n_faces) == (10, 5)
        assert list(crops.frame_idx) == [0, 1, 2, 3, 4]
        assert np.isfinite(crops.confidence).all()


def test_a_face_coming_into_view_is_cropped_from_its_first_frame(clips, tmp_path, monkeypatch):
    # Frames 0-4 grey, 5-9 the face. Without a face to follow, detection still runs on every
    # k-th frame only; the one that first finds the face has the frames since the last detected
    # one by one, so the crops are those of detection on every frame.
    _, every = _crops(clips["blank_then_face"], tmp_path / "every.npz", detect_every=1)
    assert list(every.frame_idx) == [5, 6, 7, 8, 9]
    for k in (2, 3, 4, 5):
        backend = face_backends.DlibBackend(detect_every=k)
        calls: list[int] = []
        detect = backend.detect
        monkeypatch.setattr(
            backend, "detect", lambda rgb, d=detect, c=calls, **kw: c.append(1) or d(rgb, **kw)
        )
        faces = list(backend.faces(clips["blank_then_face"], FrameSampler(), 112))
        assert [f.frame_idx for f in faces] == [5, 6, 7, 8, 9], k
        assert len(calls) < 10  # the grey frames were not all detected
        _, tracked = _crops(clips["blank_then_face"], tmp_path / f"{k}.npz", detect_every=k)
        assert list(tracked.frame_idx) == [5, 6, 7, 8, 9]
        ious = [box_iou(a, b) for a, b in zip(every.boxes, tracked.boxes, strict=True)]
        assert min(ious) > 0.8, (k, ious)


def test_tracking_detects_less_often(clips, tmp_path, monkeypatch):
    backend = face_backends.DlibBackend(detect_every=5)
    calls = []
    detect = backend.detect
    monkeypatch.setattr(backend, "detect", lambda rgb, **kw: calls.append(1) or detect(rgb, **kw))
    faces = list(backend.faces(clips["face"], FrameSampler(), 112))
    assert [f.frame_idx for f in faces] == [0, 1, 2, 3, 4]
    assert len(calls) == 2  # frame 0, and frame 4 closing the video; 1-3 were tracked


def test_frames_between_two_detections_that_disagree_are_bisected(clips, monkeypatch):
    # k = 5 on 10 frames: detections on frames 0 and 5, and 9 closing the video. When frame 5's
    # detection disagrees with frame 0's (face, then grey; grey, then face), frame 3 (halfway)
    # is detected, then frame 4 (between 3 and 5, still disagreeing); frames 1-2 lie between two
    # that agree: tracked (face, face) or faceless (grey, grey).
    # Each frame is looked at once: the face (44 px, found on the 256 px frame's upsampled
    # look) is too small for a confirmation to skip pyramid copies, so it is a full detection.
    cases = {
        "face_then_blank": ([0, 1, 2, 3, 4], [0, 5, 3, 4, 9]),
        "blank_then_face": ([5, 6, 7, 8, 9], [0, 5, 3, 4, 9]),
    }
    for clip, (want, looked_at) in cases.items():
        frames = [np.ascontiguousarray(rgb) for _, rgb in FrameSampler().frames(clips[clip])]
        backend = face_backends.DlibBackend(detect_every=5)
        detected: list[np.ndarray] = []
        detect = backend.detect
        monkeypatch.setattr(
            backend, "detect", lambda rgb, d=detect, s=detected, **kw: s.append(rgb) or d(rgb, **kw)
        )
        faces = list(backend.faces(clips[clip], FrameSampler(), 112))
        assert [f.frame_idx for f in faces] == want, clip
        assert len(detected) == len(looked_at), clip
        for rgb, i in zip(detected, looked_at, strict=True):
            assert np.array_equal(rgb, frames[i]), (clip, i)


def test_a_detection_for_large_faces_finds_them_with_the_same_boxes_and_scores():
    # Confirming followed faces skips the pyramid copies where they would be too small for the
    # detector's window; the boxes must be those of the whole pyramid to the pixel (1 px moves
    # the 5 landmarks by ~0.7 % of the eye distance) and the scores the same.
    backend = face_backends.DlibBackend()
    sides = []
    for size in (300, 420, 560):
        for angle in (0.0, 9.0, -13.0):
            head = badmedia.face_image(angle)[:300, 80:380]  # the face fills more of the frame
            head = cv2.resize(head, (size, size), interpolation=cv2.INTER_LINEAR)
            for dx, dy in ((0, 0), (13, 7), (37, 50)):
                rgb = np.ascontiguousarray(np.pad(head, ((dy, 0), (dx, 0), (0, 0))))
                full = backend.detect(rgb)
                if not full:  # HOG misses some tilts at some sizes
                    continue
                side = min(box[2] - box[0] for box, _ in full)
                sides.append(side * min(1.0, backend.detect_max_side / max(rgb.shape[:2])))
                assert backend.detect(rgb, min_side=0.8 * side) == full, (size, angle, dx, dy)
    # Faces from ~1.2x to ~2.5x the window: 0 to 3 copies skipped.
    assert len(sides) >= 24 and min(sides) < 100 and max(sides) > 170


def test_detection_is_dlibs_own_on_the_colour_frame(small_corpus):
    # The reference: dlib's frontal face detector run on the RGB frame itself, at the backend's
    # score threshold, largest first. A grey copy (faster) moves boxes by a pyramid step on
    # ~1 frame in 12 of real footage; this pins the colour detection the crops are measured on.
    import dlib

    from tasks.faces.settings import DLIB_MIN_SCORE

    backend = face_backends.DlibBackend()
    reference = dlib.get_frontal_face_detector()
    seen = 0
    for video in sorted(small_corpus.rglob("*.mp4"))[:2]:
        for n, (_, rgb) in enumerate(FrameSampler().frames(video)):
            if n % 7:
                continue
            rgb = np.ascontiguousarray(rgb)
            assert max(rgb.shape[:2]) <= backend.detect_max_side  # no downscale in between
            rects, scores, _ = reference.run(rgb, 0, DLIB_MIN_SCORE)
            if not rects and 2 * max(rgb.shape[:2]) <= backend.detect_max_side:
                rects, scores, _ = reference.run(rgb, 1, DLIB_MIN_SCORE)  # small frames: 2x
            want = sorted(
                (((r.left(), r.top(), r.right(), r.bottom()), float(s)) for r, s in zip(
                    rects, scores, strict=True
                )),
                key=lambda f: -(f[0][2] - f[0][0]) * (f[0][3] - f[0][1]),
            )  # fmt: skip
            got = backend.detect(rgb)
            assert [(tuple(float(v) for v in box), s) for box, s in got] == [
                (tuple(float(v) for v in box), s) for box, s in want
            ]
            seen += bool(got)
    assert seen >= 3


def test_every_box_the_detector_reports_is_its_own_snap(small_corpus):
    # `snap` puts a tracked face's box where the detector would: on its pyramid's window grid.
    # Every box the detector reports must be a fixed point, on frames it detects on as they
    # are (demo clips; the synthetic head from 1.2x to 2.5x the window: pyramid copies 1-5) and
    # on frames it downscales first (the same, twice as large); a box a few pixels off comes
    # back to it.
    backend = face_backends.DlibBackend()
    frames = []
    for video in sorted(small_corpus.rglob("*.mp4"))[:2]:
        frames += [np.ascontiguousarray(rgb) for _, rgb in list(FrameSampler().frames(video))[::9]]
    for size in (300, 420, 560):
        head = badmedia.face_image(0.0)[:300, 80:380]
        frames.append(cv2.resize(head, (size, size), interpolation=cv2.INTER_LINEAR))
    frames += [cv2.resize(f, None, fx=2, fy=2, interpolation=cv2.INTER_LINEAR) for f in frames]
    seen = set()
    for rgb in frames:
        for box, _ in backend.detect(rgb):
            if box[2] - box[0] < face_backends.HOG_WINDOW * max(1.0, max(rgb.shape[:2]) / 640):
                continue  # found on a small frame's upsampled look: left as it is
            assert backend.snap(box, rgb.shape) == box, (rgb.shape, box)
            side = box[2] - box[0]
            off = (box[0] + 0.03 * side, box[1] - 0.02 * side, box[2] + 0.04 * side, box[3])
            assert backend.snap(off, rgb.shape) == box, (rgb.shape, box, off)
            seen.add((max(rgb.shape[:2]) > 640, round(side)))
    assert {big for big, _ in seen} == {False, True} and len(seen) >= 6, seen


def test_tracked_faces_are_fitted_in_the_box_they_record(small_corpus):
    # As detection fits the landmarks in the box it reports, a tracked face's 5 landmarks are
    # those dlib fits in its recorded box, and that box is on the detector's grid.
    backend = face_backends.DlibBackend(detect_every=4)
    video = sorted(small_corpus.rglob("*.mp4"))[0]
    frames = {i: np.ascontiguousarray(rgb) for i, rgb in FrameSampler().frames(video)}
    faces = list(backend.faces(video, FrameSampler(), 64))
    tracked = [f for f in faces if f.frame_idx % 4]  # frames 0, 4, 8, ... were detected
    assert len(tracked) >= 6
    for f in tracked:
        rgb = frames[f.frame_idx]
        assert backend.snap(f.box, rgb.shape) == f.box
        fit = backend.landmarks(rgb, f.box)
        assert np.array_equal(f.landmarks, backend.points(rgb, fit, f.box)), f.frame_idx


def test_detect_every_keys_the_extractor_id_and_one_keeps_the_old_id():
    assert faces_extractor_id("dlib", 112) == FaceSettings().extractor_id
    assert FaceSettings(detect_every=5).extractor_id != FaceSettings().extractor_id
    # OpenFace does its own detection: the knob does not change its crops.
    assert (
        FaceSettings(backend="openface", detect_every=5).extractor_id
        == FaceSettings(backend="openface").extractor_id
    )
    assert FaceSettings(detect_every=5).provenance()["faces_settings"]["detect_every"] == 5
    with pytest.raises(ValueError, match="detect_every"):
        FaceSettings(detect_every=0)


def test_paper_profile_falls_back_from_openface_once_and_says_which(monkeypatch, caplog):
    monkeypatch.delenv("MERFLOW_OPENFACE_BIN", raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")
    settings = load_settings("paper", ["faces.openface_bin=/nonexistent/FeatureExtraction"])
    assert settings.faces.backend == "openface"
    with caplog.at_level(logging.WARNING, logger="flows.plan"):
        first, second = face_settings(settings), face_settings(settings)
    assert first.backend == second.backend == "dlib"
    assert first.extractor_id.startswith("faces-dlib-")
    said = [r.getMessage() for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(said) == 1 and "'openface'" in said[0] and "'dlib'" in said[0]


def test_openface_is_used_when_its_binary_is_found(tmp_path):
    binary = tmp_path / "FeatureExtraction"
    binary.write_text("#!/bin/sh\nexit 0\n")
    binary.chmod(0o755)
    settings = load_settings("paper", [f"faces.openface_bin={binary}"])
    assert face_settings(settings).backend == "openface"


def test_without_a_fallback_a_missing_backend_is_still_an_error(tmp_path):
    settings = load_settings(
        "paper", ["faces.fallback=null", "faces.openface_bin=/nonexistent/FeatureExtraction"]
    )
    plan_faces = face_settings(settings)
    assert plan_faces.backend == "openface"
    with pytest.raises(BackendUnavailableError, match="openface"):
        face_backends.backend_for(plan_faces)
