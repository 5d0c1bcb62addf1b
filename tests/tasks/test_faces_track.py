"""Faces detected on every k-th frame and tracked between: the same crops as detecting on
every frame, never a face where detection finds none; and the settings that choose it."""

from __future__ import annotations

import logging
from pathlib import Path

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
        "face": badmedia.face_clip(d / "face.mp4", seconds=1.0, rate=5),
    }


def _crops(video: Path, out: Path, **kw) -> tuple:
    result = crop_faces(video, out, FaceSettings(**kw))
    return result, load_crops(result.path)


def test_tracked_crops_match_detection_on_every_frame(small_corpus, tmp_path):
    # Demo clips: a real face that drifts, scales and wobbles from frame to frame.
    for video in sorted(small_corpus.rglob("*.mp4"))[:3]:
        _, every = _crops(video, tmp_path / "a.npz", size=64, detect_every=1)
        _, tracked = _crops(video, tmp_path / "b.npz", size=64, detect_every=4)
        assert list(tracked.frame_idx) == list(every.frame_idx)
        gap = np.abs(tracked.crops.astype(float) - every.crops.astype(float)).mean()
        assert gap < 4.0, f"{video.name}: tracked crops differ by {gap:.1f} grey levels"
        ious = [box_iou(a, b) for a, b in zip(every.boxes, tracked.boxes, strict=True)]
        assert min(ious) > 0.6


def test_tracking_never_keeps_a_face_detection_would_drop(clips, tmp_path):
    # Frames 0-4 show the face, 5-9 grey: the tracked frames before the face vanishes are
    # settled by detecting each of them, and the grey ones give nothing.
    for k in (2, 3, 4):
        result, crops = _crops(clips["face_then_blank"], tmp_path / f"{k}.npz", detect_every=k)
        assert (result.n_frames_sampled, result.n_faces) == (10, 5)
        assert list(crops.frame_idx) == [0, 1, 2, 3, 4]
        assert np.isfinite(crops.confidence).all()


def test_tracking_detects_less_often(clips, tmp_path, monkeypatch):
    backend = face_backends.DlibBackend(detect_every=5)
    calls = []
    detect = backend.detect
    monkeypatch.setattr(backend, "detect", lambda rgb: calls.append(1) or detect(rgb))
    faces = list(backend.faces(clips["face"], FrameSampler(), 112))
    assert [f.frame_idx for f in faces] == [0, 1, 2, 3, 4]
    assert len(calls) == 2  # frame 0, and frame 4 closing the video; 1-3 were tracked


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
