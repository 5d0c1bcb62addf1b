"""OpenFace's output read back per recipe: merflow's drops failed frames, mertools' (the challenge
baseline's) keeps them as the black crops OpenFace writes; both command lines as lists."""

from __future__ import annotations

import math
import stat
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from tasks.faces.frames import FrameSampler
from tasks.faces.openface import OpenFaceBackend, parse_openface_output
from tasks.faces.settings import FaceSettings
from tests.tasks import badmedia

SIDE = 112  # OpenFace's default aligned size (-simsize)
# FeatureExtraction's CSV columns, in its order, with a few of each group merflow does not read
# (gaze, eye landmarks, pose, 3-D landmarks, shape parameters, action units).
_HEAD = ["frame", "face_id", "timestamp", "confidence", "success"]
_GAZE = ["gaze_0_x", "gaze_0_y", "gaze_angle_x", "eye_lmk_x_0", "eye_lmk_y_0", "eye_lmk_X_0"]
_POSE = ["pose_Tx", "pose_Ty", "pose_Rx"]
_XY = [f"x_{i}" for i in range(68)] + [f"y_{i}" for i in range(68)]
_TAIL = ["X_0", "Y_0", "Z_0", "p_scale", "p_0", "AU01_r", "AU01_c"]
HEADER = _HEAD + _GAZE + _POSE + _XY + _TAIL


def face_crop(seed: int, masked: bool = False) -> np.ndarray:
    """A face-like aligned crop (RGB): the astronaut's face, tinted per seed; `masked`: black
    outside an ellipse around the face, as OpenFace's default mask leaves it."""
    face = badmedia.face_image()[83:170, 179:266]
    crop = np.asarray(Image.fromarray(face).resize((SIDE, SIDE), Image.Resampling.BILINEAR))
    tint = np.random.default_rng(seed).integers(-40, 41, 3)
    crop = np.clip(crop.astype(np.int16) + tint, 0, 255).astype(np.uint8)
    if masked:
        yy, xx = np.mgrid[:SIDE, :SIDE]
        inside = ((xx - SIDE / 2) / (0.4 * SIDE)) ** 2 + ((yy - 0.55 * SIDE) / (0.45 * SIDE)) ** 2
        crop[inside > 1] = 0
    return crop


def _landmarks(frame: int) -> tuple[list[float], list[float]]:
    """68 points on an ellipse that drifts with the frame (frame pixels)."""
    angle = np.linspace(0, 2 * np.pi, 68, endpoint=False)
    cx, cy = 300 + 2 * frame, 200 + frame
    return list(cx + 60 * np.cos(angle)), list(cy + 80 * np.sin(angle))


def write_openface_output(
    folder: Path,
    frames: list[tuple[int, bool, np.ndarray | None]],
    suffix: str,
    stem: str = "input",
    order: list[int] | None = None,
) -> Path:
    """What FeatureExtraction leaves in -out_dir: `<stem>.csv` (one row per (frame, success,
    RGB image or None) in `frames`, written in `order`) and the images, BGR, as
    `<stem>_aligned/frame_det_00_<frame>.<suffix>`. A failed row's landmarks are zeros."""
    aligned = folder / f"{stem}_aligned"
    aligned.mkdir(parents=True)
    lines = [", ".join(HEADER)]
    for i in order or range(len(frames)):
        frame, success, image = frames[i]
        xs, ys = _landmarks(frame) if success else ([0.0] * 68, [0.0] * 68)
        values = {"frame": frame, "face_id": 0, "timestamp": round(0.04 * (frame - 1), 3)}
        values |= {"confidence": 0.98 if success else 0.05, "success": int(success)}
        values |= {f"x_{k}": x for k, x in enumerate(xs)} | {f"y_{k}": y for k, y in enumerate(ys)}
        lines.append(", ".join(str(values.get(column, 0.0)) for column in HEADER))
        if image is not None:
            name = aligned / f"frame_det_00_{frame:06d}.{suffix}"
            assert cv2.imwrite(str(name), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    (folder / f"{stem}.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


BLACK = np.zeros((SIDE, SIDE, 3), np.uint8)
SHUFFLED = [2, 0, 4, 1, 3]  # the reader goes by frame number, not by CSV order


def test_merflow_reader_drops_failed_frames(tmp_path):
    # -nobadaligned writes no image for a failed frame; one left there anyway is still dropped.
    frames = [
        (1, True, face_crop(1)),
        (2, False, BLACK),
        (3, True, face_crop(3, masked=True)),
        (4, False, None),
        (5, True, face_crop(5)),
    ]
    out = write_openface_output(tmp_path / "out", frames, "png", order=SHUFFLED)
    sampler = FrameSampler()
    faces = list(parse_openface_output(out, "input", sampler, SIDE))
    assert [f.frame_idx for f in faces] == [0, 2, 4]
    for face, (_, _, image) in zip(faces, [frames[0], frames[2], frames[4]], strict=True):
        np.testing.assert_array_equal(face.crop, image)
        assert face.rank == 0 and face.landmarks.shape == (68, 2)
    assert faces[0].confidence == pytest.approx(0.98)
    assert (sampler.n_decoded, sampler.n_sampled) == (5, 5)


def test_mertools_reader_keeps_failed_frames_black_in_frame_order(tmp_path):
    masked = face_crop(3, masked=True)
    frames = [
        (1, True, face_crop(1)),
        (2, False, BLACK),  # OpenFace's defaults: a black image for a frame it lost
        (3, True, masked),
        (4, False, None),  # none written: the same black crop
        (5, True, face_crop(5)),
    ]
    out = write_openface_output(tmp_path / "out", frames, "bmp", order=SHUFFLED)
    faces = list(parse_openface_output(out, "input", FrameSampler(), SIDE, recipe="mertools"))
    assert [f.frame_idx for f in faces] == [0, 1, 2, 3, 4]
    assert all(f.rank == 0 and f.crop.shape == (SIDE, SIDE, 3) for f in faces)
    assert not faces[1].crop.any() and not faces[3].crop.any()
    np.testing.assert_array_equal(faces[2].crop, masked)
    assert not faces[2].crop[0, 0].any() and faces[2].crop[SIDE // 2, SIDE // 2].any()
    # A failed frame's landmarks (zeros) locate no face: no box, no landmarks.
    assert all(math.isnan(v) for v in faces[1].box) and faces[1].landmarks is None
    assert faces[1].confidence == pytest.approx(0.05)
    assert faces[0].box == pytest.approx((242.0, 121.0, 362.0, 281.0), abs=0.5)
    # The baseline's own read: every image of the folder, sorted, BGR -> RGB.
    aligned = sorted((out / "input_aligned").iterdir())
    baseline = [cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in aligned]
    ours = [f.crop for f in faces if f.frame_idx != 3]  # frame 4 (index 3) has no image
    np.testing.assert_array_equal(np.stack(ours), np.stack(baseline))


def test_mertools_reader_brings_crops_to_the_crop_size(tmp_path):
    frames = [(1, True, face_crop(1)), (2, False, None)]
    out = write_openface_output(tmp_path / "out", frames, "bmp")
    faces = list(parse_openface_output(out, "input", FrameSampler(), 64, recipe="mertools"))
    assert [f.crop.shape for f in faces] == [(64, 64, 3), (64, 64, 3)]
    assert not faces[1].crop.any()


def test_mertools_reader_samples_frames_like_merflow(tmp_path):
    frames = [(i, i % 3 != 0, face_crop(i) if i % 3 else BLACK) for i in range(1, 11)]
    out = write_openface_output(tmp_path / "out", frames, "bmp")
    sampler = FrameSampler(fps=12.5)  # every other frame of OpenFace's 25 fps timestamps
    faces = list(parse_openface_output(out, "input", sampler, SIDE, recipe="mertools"))
    assert [f.frame_idx for f in faces] == [0, 2, 4, 6, 8]
    assert [bool(f.crop.any()) for f in faces] == [True, False, True, True, False]


@pytest.fixture
def binary(tmp_path) -> Path:
    path = tmp_path / "FeatureExtraction"
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_command_lines_per_recipe(binary):
    video, out = Path("v.mp4"), Path("out")
    merflow = OpenFaceBackend(str(binary)).command(video, out, 112)
    assert merflow == [
        str(binary), "-f", "v.mp4", "-out_dir", "out", "-simalign", "-simsize", "112",
        "-nomask", "-format_aligned", "png", "-nobadaligned", "-2Dfp", "-q",
    ]  # fmt: skip
    # The baseline's OpenFace defaults: no mask, size, format or bad-frame flags, at any size.
    mertools = OpenFaceBackend(str(binary), recipe="mertools")
    expected = [str(binary), "-f", "v.mp4", "-out_dir", "out", "-simalign", "-2Dfp", "-q"]
    assert mertools.command(video, out, 112) == expected
    assert mertools.command(video, out, 224) == expected


def test_an_unknown_recipe_is_refused(binary):
    with pytest.raises(ValueError, match=r"unknown OpenFace recipe 'baseline'.*merflow, mertools"):
        OpenFaceBackend(str(binary), recipe="baseline")


def test_only_openface_mertools_keys_a_new_faces_id():
    # Today's ids, pinned: merflow's recipe keeps them. dlib on every frame has version 1's id
    # again (its crops are version 1's; version 2's grey detection had 91c577bf).
    assert FaceSettings().extractor_id == "faces-dlib-112-all-d05fb83e"
    assert FaceSettings(detect_every=5).extractor_id == "faces-dlib-112-all-d3729247"  # v4
    assert FaceSettings(backend="openface").extractor_id == "faces-openface-112-all-0e1b3f6e"
    assert FaceSettings(recipe="mertools").extractor_id == FaceSettings().extractor_id
    mertools = FaceSettings(backend="openface", recipe="mertools").extractor_id
    assert mertools.startswith("faces-openface-112-all-")
    assert mertools != FaceSettings(backend="openface").extractor_id


def test_mertools_faces_need_the_largest_face():
    """The speaking-face rule would drop the black crops of failed frames (no box, no track)."""
    from tasks.faces.settings import FaceSettings

    with pytest.raises(ValueError, match=r"faces.recipe=mertools .* faces.select=largest"):
        FaceSettings(backend="openface", recipe="mertools", select="speaking")
    settings = FaceSettings(backend="openface", recipe="mertools")
    assert settings.provenance()["face_thresholds"] == {"nobadaligned": False, "mask": True}
    # Other backends have one recipe: the setting changes neither their crops nor their id.
    dlib = FaceSettings(backend="dlib", recipe="mertools", select="speaking")
    assert dlib.extractor_id == FaceSettings(backend="dlib", select="speaking").extractor_id
