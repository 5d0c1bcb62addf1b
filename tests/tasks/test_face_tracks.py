"""Face tracks: every face of a frame, linked across frames by overlap and appearance, ended by
shot cuts, and stored (chosen and not) in the crops file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tasks.faces.backends import DlibBackend
from tasks.faces.crop import crop_faces
from tasks.faces.crop_files import load_crops, load_tracks
from tasks.faces.frames import FrameSampler, ShotCuts
from tasks.faces.settings import FaceSettings
from tasks.faces.track import appearance, link_tracks
from tests.tasks import face_clips as fc


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("tracks")
    still = fc.place(fc.hopper(), fc.HOPPER_CENTER_XY, fc.HOPPER_BOX_PX, (160, 80), 112, 320, 160)

    def moving(k: int) -> np.ndarray:
        # The astronaut crosses the top band left to right (~9 px a frame); Hopper stays below.
        top = fc.astronaut(0.0, (50 + 9.5 * k, 80), 84, fc.SIZE, 160)
        return np.ascontiguousarray(np.concatenate([top, still]))

    def cut(k: int) -> np.ndarray:
        # One second of the astronaut, then one of Grace Hopper, the face in the same place.
        if k < fc.FPS:
            return fc.astronaut(0.0, (160, 150), 110, fc.SIZE, fc.SIZE)
        return fc.place(fc.hopper(), fc.HOPPER_CENTER_XY, fc.HOPPER_BOX_PX, (160, 150), 110,
                        fc.SIZE, fc.SIZE)  # fmt: skip

    return {
        "moving": fc.clip_of(d / "moving.mp4", 24, moving),
        "cut": fc.clip_of(d / "cut.mp4", 2 * fc.FPS, cut),
        "two": fc.two_faces_clip(d / "two.mp4"),
    }


# -- linking -------------------------------------------------------------------------------------
def _faces(n_frames: int, xs: list[float], skip: dict[int, set[int]] | None = None) -> tuple:
    """Faces of side 80 at x positions `xs` in each frame (12 fps), `skip`: frame -> missing."""
    rng = np.random.default_rng(0)
    looks = [rng.dirichlet(np.ones(128)).astype(np.float32) for _ in xs]
    frames, boxes, sigs = [], [], []
    for f in range(n_frames):
        for j, x in enumerate(xs):
            if j in (skip or {}).get(f, set()):
                continue
            frames.append(f)
            boxes.append((x, 100, x + 80, 180))
            sigs.append(looks[j])
    frames = np.asarray(frames)
    return frames, frames / 12.0, np.asarray(boxes, float), np.stack(sigs)


def test_faces_side_by_side_are_two_tracks_that_a_cut_ends():
    frames, times, boxes, sigs = _faces(10, [0, 200])
    ids = link_tracks(frames, times, boxes, sigs)
    assert list(ids) == [0, 1] * 10  # the faces of one frame never share a track
    ids = link_tracks(frames, times, boxes, sigs, cuts=[5])
    assert list(ids) == [0, 1] * 5 + [2, 3] * 5


def test_a_short_miss_continues_a_track_and_a_long_one_does_not():
    frames, times, boxes, sigs = _faces(40, [0], skip={f: {0} for f in (3, 4, *range(10, 25))})
    ids = link_tracks(frames, times, boxes, sigs)
    # Frames 3-4 missed (1/6 s): one track; 10-24 missed (1.25 s > LINK_MAX_GAP_S): a new one.
    assert list(ids[frames < 10]) == [0] * 8 and set(ids[frames >= 25]) == {1}


def test_appearance_keeps_two_faces_apart_where_they_swap_places():
    frames, times, boxes, sigs = _faces(2, [0, 60])
    boxes[2:, 0], boxes[2:, 2] = [60, 0], [140, 80]  # frame 1: the two faces swapped places
    sigs_swapped = sigs.copy()
    sigs_swapped[2:] = sigs[[3, 2]]
    ids = link_tracks(frames, times, boxes, sigs_swapped)
    # By overlap alone each would continue the other's track; by looks they stay themselves.
    assert list(ids) == [0, 1, 1, 0]


# -- on clips ------------------------------------------------------------------------------------
def test_a_moving_face_stays_one_track(clips, tmp_path):
    result = crop_faces(clips["moving"], tmp_path / "m.npz", FaceSettings(fps=6))
    tracks = load_tracks(result.path)
    assert result.n_frames_sampled == 12 and tracks.n_tracks == 2 and len(tracks.cuts) == 0
    top = tracks.boxes[:, 1] < 160
    assert len(set(tracks.track_id[top])) == 1 and len(set(tracks.track_id[~top])) == 1
    # Sampled at 6 fps the face jumps ~19 px (a quarter of its width) between looks.
    x = (tracks.boxes[top, 0] + tracks.boxes[top, 2]) / 2
    assert top.sum() >= 11 and np.all(np.diff(x) > 10)


def test_a_shot_cut_ends_every_track(clips, tmp_path):
    result = crop_faces(clips["cut"], tmp_path / "c.npz")
    tracks = load_tracks(result.path)
    assert list(tracks.cuts) == [fc.FPS]  # the first frame of the second shot
    assert tracks.n_tracks == 2
    assert set(tracks.track_id[tracks.frame_idx < fc.FPS]) == {0}
    assert set(tracks.track_id[tracks.frame_idx >= fc.FPS]) == {1}


def test_a_drifting_wobbling_face_is_no_cut(clips):
    sampler = FrameSampler()
    assert sum(1 for _ in sampler.frames(clips["moving"])) == 24 and sampler.shots.cuts == []
    cuts = ShotCuts()
    grey, face = np.full((64, 64, 3), 128, np.uint8), fc.astronaut(0.0, (32, 32), 30, 64, 64)
    assert [cuts.see(i, f) for i, f in enumerate([grey, grey, face, face])] == [0, 0, 1, 0]


@pytest.mark.parametrize("detect_every", [1, 4])
def test_every_face_is_kept_with_its_track_and_landmarks(clips, tmp_path, detect_every):
    settings = FaceSettings(detect_every=detect_every)
    result = crop_faces(clips["two"], tmp_path / "t.npz", settings)
    tracks, chosen = load_tracks(result.path), load_crops(result.path)
    n = result.n_frames_sampled
    assert (result.n_faces, result.n_faces_all, result.n_tracks) == (n, 2 * n, 2)
    # Two faces a frame, one per track; the chosen ones are what load_crops gives.
    assert all(sorted(tracks.track_id[tracks.frame_idx == f]) == [0, 1] for f in range(n))
    assert np.array_equal(tracks.crops[tracks.chosen], chosen.crops)
    assert tracks.landmarks.shape == (2 * n, 5, 2) and np.isfinite(tracks.landmarks).all()
    inside = (tracks.landmarks[..., 0] >= tracks.boxes[:, None, 0] - 5) & (
        tracks.landmarks[..., 0] <= tracks.boxes[:, None, 2] + 5
    )
    assert inside.all()  # each face's landmarks lie in its own box


def test_tracking_between_detections_follows_both_faces(clips):
    every = list(DlibBackend(detect_every=1).faces(clips["two"], FrameSampler(), 112))
    tracked = list(DlibBackend(detect_every=4).faces(clips["two"], FrameSampler(), 112))
    key = [(f.frame_idx, f.rank) for f in every]
    assert [(f.frame_idx, f.rank) for f in tracked] == key
    pairs = zip(every, tracked, strict=True)
    gap = np.mean([np.abs(a.crop.astype(float) - b.crop).mean() for a, b in pairs])
    assert gap < 6.0


def test_opencv_gives_every_face_too(clips, tmp_path):
    result = crop_faces(clips["two"], tmp_path / "o.npz", FaceSettings(backend="opencv"))
    tracks = load_tracks(result.path)
    assert tracks.n_tracks == 2 and result.n_faces_all >= 1.9 * result.n_frames_sampled
    assert tracks.landmarks.shape[1:] == (2, 2)  # the eye centres (NaN where not found)


def test_appearance_tells_the_two_faces_apart(clips, tmp_path):
    tracks = load_tracks(crop_faces(clips["two"], tmp_path / "a.npz").path)
    from tasks.faces.track import similarity

    a, b = (appearance(tracks.crops[tracks.track_id == t][0]) for t in (0, 1))
    a2 = appearance(tracks.crops[tracks.track_id == 0][-1])
    assert similarity(a, a2) > 0.9 > 0.6 > similarity(a, b)
