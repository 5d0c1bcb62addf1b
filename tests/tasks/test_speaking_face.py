"""The speaking face: on a clip of two real faces, one speaking (espeak-ng, her mouth opening
with its loudness) and one still and larger, `speaking` keeps the speaker and `largest` keeps
today's crops (of the larger, wrong, face)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from data_contracts import tables
from data_contracts.store import Store
from flows.config import load_settings
from flows.task_cli import task_app
from tasks.faces.backends import load_backend
from tasks.faces.crop import crop_faces, crop_faces_shard
from tasks.faces.crop_files import CHOSEN_COLOUR, load_crops, load_tracks
from tasks.faces.frames import FrameSampler
from tasks.faces.settings import FaceSettings, faces_extractor_id
from tasks.faces.speaker import (
    SPEAKING_MIN_FRAMES,
    choose_speaking,
    loudness_at,
    mouth_opening,
)
from tasks.stores.quality import quality_signals
from tests.quality.synthetic import manifest_rows
from tests.tasks import badmedia
from tests.tasks import face_clips as fc

HIDDEN = 12  # frames at the end of the `hidden` clip without the speaker


def speaker_leaves_clip(path: Path) -> Path:
    """The two-face clip whose speaker is gone for the last HIDDEN frames (after her speech)
    while Grace Hopper stays: a listener shown while the speaker is off screen."""
    audio = fc.speech(tail_s=1.6)
    n = round(len(audio) / fc.SPEECH_RATE_HZ * fc.FPS)
    opening = fc.envelope(audio, n)
    hopper = fc.hopper()
    still = fc.place(hopper, fc.HOPPER_CENTER_XY, fc.HOPPER_BOX_PX, (80, 150), 136, 160, fc.SIZE)
    empty = np.full((fc.SIZE, 160, 3), 128, np.uint8)

    def frames():
        for k in range(n):
            left = (
                fc.astronaut(opening[k], (80, 150), 84, 160, fc.SIZE) if k < n - HIDDEN else empty
            )
            yield np.ascontiguousarray(np.concatenate([left, still], axis=1))

    return fc.encode(path, frames(), audio, n)


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("speaking")
    two = fc.two_faces_clip(d / "two.mp4")
    silent = d / "silent.mp4"
    badmedia.run_ffmpeg("-i", two, "-map", "0:v", "-c", "copy", silent)  # no audio stream
    return {"two": two, "silent": silent, "leaves": speaker_leaves_clip(d / "leaves.mp4")}


@pytest.fixture(scope="module")
def speaking(clips, tmp_path_factory):
    out = tmp_path_factory.mktemp("speaking-out") / "s.npz"
    return crop_faces(clips["two"], out, FaceSettings(select="speaking"))


def _left(boxes: np.ndarray) -> np.ndarray:
    """Which faces are the speaker's (the left half of the frame)."""
    return (boxes[:, 0] + boxes[:, 2]) / 2 < fc.SIZE / 2


def test_speaking_keeps_the_speaker(speaking):
    chosen, tracks = load_crops(speaking.path), load_tracks(speaking.path)
    share = _left(chosen.boxes).mean()
    assert share >= 0.95, f"the speaker is chosen in {share:.0%} of the chosen frames"
    # ... in (nearly) every frame she is seen, as one track, with its score and reason kept.
    assert speaking.n_faces >= 0.95 * speaking.n_frames_sampled
    assert (speaking.select_rule, tracks.select) == ("speaking", "speaking")
    assert speaking.chosen_track == tracks.chosen_track
    assert set(tracks.track_id[tracks.chosen]) == {tracks.chosen_track}
    assert (
        speaking.select_score == pytest.approx(tracks.select_score) and speaking.select_score > 0.5
    )
    assert tracks.select_reason == speaking.select_reason
    assert speaking.select_reason.startswith(f"speaking: track {speaking.chosen_track}'s mouth")
    still = 1 - speaking.chosen_track
    assert tracks.track_score[still] < 0.2  # the still face does not move with the speech
    assert tracks.landmarks.shape[1] == 68  # the mouth needs dlib's 68 points


def test_largest_keeps_todays_crops_of_the_larger_face(clips, tmp_path, small_corpus):
    for video in [clips["two"], sorted(small_corpus.rglob("*.mp4"))[0]]:
        result = crop_faces(video, tmp_path / "l.npz", FaceSettings(size=64))
        crops = load_crops(result.path)
        # Today's code path: per frame, detect the largest face, fit 5 landmarks, align.
        backend, ref = load_backend("dlib"), []
        for idx, rgb in FrameSampler().frames(video):
            found = backend.align(np.ascontiguousarray(rgb), 64)
            if found is not None:
                ref.append((idx, found[0], found[1]))
        assert list(crops.frame_idx) == [i for i, _, _ in ref]
        assert crops.crops.tobytes() == np.stack([c for _, c, _ in ref]).tobytes()
        assert np.array_equal(crops.boxes, np.asarray([b for _, _, b in ref], np.float32))
        if video == clips["two"]:
            assert not _left(crops.boxes).any()  # on the two-face clip: always the wrong face


def test_without_audio_the_longest_track_is_kept(clips, tmp_path):
    result = crop_faces(clips["silent"], tmp_path / "n.npz", FaceSettings(select="speaking"))
    assert result.select_reason == "longest track: the video has no audio stream"
    assert result.select_score is None
    tracks = load_tracks(result.path)
    # Both tracks cover every frame: the tie goes to the larger faces (the still one).
    assert not _left(load_crops(result.path).boxes).any() and np.isnan(tracks.track_score).all()


def test_selection_keys_the_extractor_id_and_largest_keeps_the_old_one():
    assert FaceSettings(select="largest").extractor_id == faces_extractor_id("dlib", 112)
    assert FaceSettings(select="speaking").extractor_id != FaceSettings().extractor_id
    assert FaceSettings(select="speaking").provenance()["faces_settings"]["select"] == "speaking"
    with pytest.raises(ValueError, match="choose one of largest, speaking"):
        FaceSettings(select="loudest")
    assert load_settings("paper").faces.select == "speaking"
    assert load_settings("demo").faces.select == "largest"
    # The setting reaches the stage the flow runs (flows/plan.py face_settings).
    from flows.plan import face_settings

    assert face_settings(load_settings("demo", ["faces.select=speaking"])).select == "speaking"


def test_the_faces_table_records_the_choice_and_both_face_ratios(clips, tmp_path):
    store = Store(tmp_path / "data")
    video = pd.DataFrame(
        {"video_id": ["leaves"], "path": [str(clips["leaves"])], "sha256": ["0" * 64]}
    )
    for select in ("speaking", "largest"):
        report = crop_faces_shard(video, store, FaceSettings(size=64, select=select))
        assert (report.processed, report.failed) == (1, 0)
    rows = store.read(tables.FACES).set_index("select_rule")
    spk, big = rows.loc["speaking"], rows.loc["largest"]
    n = spk.n_frames_sampled
    # Grace Hopper is in every frame: both rules see a face in all of them.
    assert spk.any_face_ratio == big.any_face_ratio == pytest.approx(1.0)
    # `largest` keeps a face in every frame; `speaking` keeps the speaker, who leaves.
    assert big.face_ratio == pytest.approx(1.0) and big.n_faces == n
    assert spk.face_ratio == pytest.approx((n - HIDDEN) / n, abs=1.5 / n)
    assert spk.n_faces == pytest.approx(spk.face_ratio * n)
    # The choice, its score and its reason are the crops file's.
    tracks = load_tracks(store.root / spk.path)
    assert (spk.n_tracks, spk.chosen_track) == (tracks.n_tracks, tracks.chosen_track)
    assert spk.n_faces_all == len(tracks.frame_idx) > spk.n_faces
    assert spk.select_score == pytest.approx(tracks.select_score) and spk.select_score > 0.5
    assert spk.select_reason == tracks.select_reason and spk.select_reason.startswith("speaking:")
    assert _left(load_crops(store.root / spk.path).boxes).all()
    assert np.isnan(big.select_score) and big.select_reason.startswith("largest face of each")
    # The quality report shows the score.
    store.upsert(tables.MANIFEST, manifest_rows(["leaves"], ["labeled"], ["0" * 64]))
    signals = quality_signals(store, spk.extractor_id).set_index("video_id")
    assert signals.loc["leaves", "speaker_score"] == pytest.approx(spk.select_score, rel=1e-6)


# -- the score -----------------------------------------------------------------------------------
def _mouths(opening: np.ndarray) -> np.ndarray:
    """68-point landmarks with eyes 40 px apart and the inner lips `opening` x 40 px apart."""
    pts = np.zeros((len(opening), 68, 2), np.float32)
    pts[:, 36:42, 0], pts[:, 42:48, 0] = 0.0, 40.0
    pts[:, [61, 62, 63], 1] = 0.0
    pts[:, [67, 66, 65], 1] = (40 * opening)[:, None]
    return pts


def test_mouth_opening_is_the_lip_gap_over_the_eye_distance():
    assert np.allclose(mouth_opening(_mouths(np.array([0.0, 0.1, 0.3]))), [0.0, 0.1, 0.3])
    assert np.isnan(mouth_opening(np.zeros((2, 5, 2)))).all()  # 5 points: no mouth


def test_loudness_follows_the_audio():
    rate = 8000
    audio = np.zeros(2 * rate, np.float32)
    audio[rate:] = 0.5 * np.sin(np.arange(rate) * 0.3)
    loud = loudness_at(audio, np.array([0.5, 1.5]), rate)
    assert loud[0] == pytest.approx(-80, abs=1) and loud[1] == pytest.approx(-9, abs=1)


def test_no_track_moving_with_the_speech_falls_back_to_the_longest():
    rng = np.random.default_rng(0)
    loud = rng.normal(-30, 10, 60)
    track = np.repeat([0, 1], [40, 20])  # the longest has 40 faces
    boxes = np.tile([0.0, 0.0, 50.0, 50.0], (60, 1))
    still = _mouths(np.full(60, 0.1))
    sel = choose_speaking(track, boxes, mouth_opening(still), loud)
    assert sel.chosen_track == 0 and sel.reason.startswith("longest track: no track's mouth")
    # Track 1 speaks: its mouth opens with the loudness, and it is chosen though shorter.
    opening = np.full(60, 0.1)
    opening[40:] = 0.05 + 0.004 * (loud[40:] + 50)
    sel = choose_speaking(track, boxes, mouth_opening(_mouths(opening)), loud)
    assert sel.chosen_track == 1 and sel.score > 0.99 and sel.chosen.sum() == 20
    # Too short to tell: not scored.
    short = np.repeat([0, 1], [60 - SPEAKING_MIN_FRAMES + 1, SPEAKING_MIN_FRAMES - 1])
    sel = choose_speaking(short, boxes, mouth_opening(_mouths(opening)), loud)
    assert np.isnan(sel.track_score[1])
    # Digital silence (a real stock clip's audio track): nothing to follow, and it says so.
    sel = choose_speaking(track, boxes, mouth_opening(_mouths(opening)), np.full(60, -80.0))
    assert sel.chosen_track == 0 and sel.reason == (
        "longest track: its audio is silent (no change in loudness)"
    )


def test_slow_unrelated_drifts_are_not_taken_for_speech():
    """A smile that widens while music swells: two slow, independent drifts correlate by
    chance (r = 0.43 over 72 frames, which counting every frame would call certain), but
    they are worth few independent frames, so the still, longer track is kept."""
    rng = np.random.default_rng(3)

    def drift() -> np.ndarray:
        return np.convolve(rng.normal(size=80), np.ones(9) / 9, "valid")  # 72 smooth values

    opening, music = 0.15 + 0.06 * drift(), -30 + 5 * drift()
    track = np.repeat([0, 1], [90, 72])
    loud = np.concatenate([rng.normal(-30, 5, 90), music])
    mouth = mouth_opening(_mouths(np.concatenate([np.full(90, 0.1), opening])))
    boxes = np.tile([0.0, 0.0, 50.0, 50.0], (162, 1))
    sel = choose_speaking(track, boxes, mouth, loud)
    assert sel.track_score[1] == pytest.approx(0.43, abs=0.01)
    assert sel.chosen_track == 0 and sel.reason.startswith("longest track: no track's mouth")
    assert "72 frames, 13 independent" in sel.reason


# -- the preview ---------------------------------------------------------------------------------
def test_preview_shows_each_track_and_marks_the_speaker(clips, tmp_path):
    preview = tmp_path / "sheet.png"
    args = ["crop-faces", str(clips["two"]), "faces.fps=null", "--out", str(tmp_path)]
    result = CliRunner().invoke(
        task_app, [*args, "--select", "speaking", "--preview", str(preview)]
    )
    assert result.exit_code == 0, result.output
    assert "tracks   2 (" in result.output and "speaking: track" in result.output
    sheet = np.asarray(Image.open(preview))
    cell, label, head, row_h = 72, 150, 30, 72
    assert sheet.shape[:2] == (head + 2 * row_h + 4, label + 8 * cell + 4)
    chosen = load_tracks(tmp_path / "two.faces.npz").chosen_track
    frame = [tuple(sheet[head + r * row_h + 1, label + 1]) for r in (0, 1)]
    assert frame[chosen] == CHOSEN_COLOUR and frame[1 - chosen] != CHOSEN_COLOUR
