"""Corruption stages for robustness scoring (tasks/corrupt.py): noise is mixed at the SNR asked
(measured back on the stored wav), blur is measurable in the stored crops, each level is rows
of its own (the clean ones untouched) and a rerun computes nothing."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from data_contracts import tables
from data_contracts.store import Store
from tasks.corrupt import (
    Corruption,
    CorruptionError,
    FrameCorruptor,
    add_noise,
    parse_levels,
)
from tasks.engine.stage import run_stage
from tasks.faces.crop import faces_stage
from tasks.faces.crop_files import load_crops
from tasks.faces.settings import FaceSettings
from tasks.media import audio_extractor_id, audio_stage, load_wav


# -- the measurements ------------------------------------------------------------------------------
def measured_snr(clean: np.ndarray, noisy: np.ndarray) -> float:
    """The SNR (dB) of `noisy` against `clean`, allowing for a gain between them (add_noise
    scales a mix that would clip): the clean part is noisy's projection on clean."""
    clean, noisy = np.asarray(clean, np.float64), np.asarray(noisy, np.float64)
    gain = float(noisy @ clean / (clean @ clean))
    residual = noisy - gain * clean
    return float(10 * np.log10((gain**2 * (clean @ clean)) / (residual @ residual)))


def sharpness(images: np.ndarray) -> float:
    """Mean variance of the Laplacian over images (n, h, w, 3) uint8: lower is blurrier."""
    import cv2

    values = [
        cv2.Laplacian(cv2.cvtColor(im, cv2.COLOR_RGB2GRAY), cv2.CV_64F).var() for im in images
    ]
    return float(np.mean(values)) if values else float("nan")


@pytest.fixture(scope="module")
def clips(small_corpus) -> pd.DataFrame:
    """Three labelled demo clips (speech and a face) as manifest-like rows."""
    from tasks.corpus.scan import sha256_file

    paths = sorted((small_corpus / "video-labeled").glob("*.mp4"))[:3]
    return pd.DataFrame(
        {
            "video_id": [p.stem for p in paths],
            "sha256": [sha256_file(p) for p in paths],
            "path": [str(p) for p in paths],
        }
    )


def test_levels_parse_with_their_kind_carried_and_bad_ones_refused():
    got = parse_levels(["noise:20,10", "blur:2", "noise:0", "down:4,2", "drop:25"])
    assert [c.name for c in got] == [
        "blur:2", "down:2", "down:4", "drop:25", "noise:20", "noise:10", "noise:0",
    ]  # fmt: skip
    assert Corruption("noise", 10).id == "corrupt-noise10-v1"
    for bad, says in [
        ("down:3", "not a power of two"),
        ("noise", "KIND:LEVEL"),
        ("hiss:10", "unknown corruption"),
        ("blur:0", "out of range"),
        ("noise:ten", "KIND:LEVEL"),
    ]:
        with pytest.raises(CorruptionError, match=says):
            parse_levels([bad])


def test_noise_has_the_snr_asked_for_even_when_the_mix_is_scaled_to_fit():
    t = np.arange(16000) / 16000
    speechy = (0.9 * np.sin(2 * np.pi * 220 * t) * (t % 0.25 < 0.15)).astype(np.float32)
    for kind in ("noise", "pink"):
        for snr in (20.0, 10.0, 5.0, 0.0, -5.0):
            c = Corruption(kind, snr)
            mixed = add_noise(speechy, c, c.rng("clip-abc"))
            assert np.abs(mixed).max() <= 1.0  # loud clip + noise: scaled down, not clipped
            assert measured_snr(speechy, mixed) == pytest.approx(snr, abs=0.05)
    assert not add_noise(np.zeros(100, np.float32), Corruption("noise", 0), c.rng("x")).any()


def test_the_audio_stage_stores_noisy_wavs_at_the_snr_beside_the_clean_ones(clips, tmp_path):
    store = Store(tmp_path / "root")
    assert run_stage(audio_stage(), clips, store).processed == 3
    clean = store.read(tables.AUDIO)
    noisy_ids = {}
    for snr in (20.0, 5.0, 0.0):
        c = Corruption("noise", snr)
        stage = audio_stage(corruption=c)
        assert stage.extractor_id == audio_extractor_id(16000, c) != audio_extractor_id(16000)
        assert run_stage(stage, clips, store).processed == 3
        assert run_stage(stage, clips, store).processed == 0  # a rerun computes nothing
        rows = store.read(tables.AUDIO)
        rows = rows[rows.extractor_id == stage.extractor_id].set_index("video_id")
        noisy_ids[snr] = stage.extractor_id
        for r in clean.itertuples():
            x, _ = load_wav(store.local_file(r.path))
            y, rate = load_wav(store.local_file(rows.loc[r.video_id, "path"]))
            assert rate == 16000 and len(y) == len(x)
            # measured on the stored 16-bit wav, quantisation included
            assert measured_snr(x, y) == pytest.approx(snr, abs=0.5)
        assert (rows.speech_ratio.notna()).all()
    after = store.read(tables.AUDIO)
    kept = after[after.extractor_id == audio_extractor_id(16000)]
    pd.testing.assert_frame_equal(kept.reset_index(drop=True), clean.reset_index(drop=True))
    assert len(set(noisy_ids.values())) == 3


def test_the_noise_is_the_same_on_every_rerun(clips, tmp_path):
    c = Corruption("noise", 5)
    waves = []
    for i in range(2):
        store = Store(tmp_path / f"root{i}")
        run_stage(audio_stage(corruption=c), clips.iloc[:1], store)
        row = store.read(tables.AUDIO).iloc[0]
        waves.append(load_wav(store.local_file(row.path))[0])
    np.testing.assert_array_equal(*waves)


def test_blurred_frames_give_blurrier_crops_of_their_own(clips, tmp_path):
    store = Store(tmp_path / "root")
    base = FaceSettings(backend="dlib", size=64, fps=4, processes=0)
    sharp = {}
    for c in (None, Corruption("blur", 1), Corruption("blur", 3), Corruption("down", 4)):
        settings = FaceSettings(**{**base.__dict__, "corruption": c})
        stage = faces_stage(settings)
        report = run_stage(stage, clips, store)
        assert report.processed + report.failed == 3
        rows = store.read(tables.FACES)
        rows = rows[rows.extractor_id == settings.extractor_id]
        crops = [load_crops(store.local_file(p)).crops for p in rows.path]
        sharp[c.name if c else "clean"] = sharpness(np.concatenate(crops))
    assert sharp["blur:3"] < sharp["blur:1"] < sharp["clean"]
    assert sharp["down:4"] < sharp["clean"]


def test_dropped_frames_are_a_share_of_the_sampled_ones():
    drop = FrameCorruptor(Corruption("drop", 30), "clip-abc")
    frame = np.zeros((8, 8, 3), np.uint8)
    kept = sum(drop(frame) is not None for _ in range(2000))
    assert kept / 2000 == pytest.approx(0.7, abs=0.04)


def test_openface_frames_cannot_be_corrupted_and_say_why():
    with pytest.raises(ValueError, match="OpenFace decodes the video itself"):
        FaceSettings(backend="openface", corruption=Corruption("blur", 2))
    with pytest.raises(ValueError, match="video corruptions"):
        FaceSettings(corruption=Corruption("noise", 2))


def test_a_corrupted_plan_feeds_its_stages_the_corrupted_inputs(tiny_models, tmp_path):
    """Every stage downstream of a corrupted raw-video stage reads the corrupted rows and writes
    under the ids the plan's feature tables name; the others stay the clean plan's."""
    from flows.config import load_settings
    from flows.plan import plan_extraction
    from tasks.dag import STAGES, UPSTREAM

    settings = load_settings(
        "demo", [f"models.models_dir={tiny_models}", "models.build_tiny=false"]
    )
    clean = plan_extraction(settings, tmp_path, None, official=False)
    for c, touched in [
        (Corruption("noise", 5), {"audio", "acoustic", "transcribe", "text"}),
        (Corruption("blur", 2), {"faces", "visual"}),
    ]:
        plan = clean.corrupted(c)
        stages = {s: plan.stage(s) for s in STAGES}
        for s in STAGES:
            changed = stages[s].extractor_id != clean.stage(s).extractor_id
            assert changed == (s in touched), s
            if s in UPSTREAM:
                assert stages[s].upstream.extractor_id == stages[UPSTREAM[s]].extractor_id, s
        tables_ = plan.feature_tables()
        for m, s in [("visual", "visual"), ("acoustic", "acoustic"), ("text", "text")]:
            assert tables_[m].name.endswith(stages[s].extractor_id)


def test_down_is_the_challenge_baselines_pyramid_blur():
    """MER-NOISE's video corruption (the challenge baseline's noise script), restated: a blur
    rate r takes each frame log2(r) times down its Gaussian pyramid and as often back up. On a
    frame whose sides divide by r both give the same pixels; on others merflow comes back to
    the frame's own size (the baseline's frame grows by a pixel per odd side)."""
    import cv2

    def baseline_blur(frame, rate):
        k = int(np.log2(rate))
        for _ in range(k):
            frame = cv2.pyrDown(frame)
        for _ in range(k):
            frame = cv2.pyrUp(frame)
        return frame

    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)
    for rate in (2, 4, 8):
        ours = FrameCorruptor(Corruption("down", rate), "clip")(frame)
        np.testing.assert_array_equal(ours, baseline_blur(frame, rate))
    odd = rng.integers(0, 256, (97, 131, 3), dtype=np.uint8)
    assert FrameCorruptor(Corruption("down", 4), "clip")(odd).shape == odd.shape


def test_noise_is_mixed_as_the_challenge_baseline_mixes_it():
    """The baseline's SNR: the RMS of the clean int16 amplitudes over the noise's, over the
    whole clip (20 log10 of their ratio), noise scaled to it and added; a mix past int16 is
    scaled down as a whole. Restated on our noise: the same mix, to the int16 step."""
    t = np.arange(8000) / 16000
    clean = (0.2 * np.sin(2 * np.pi * 180 * t)).astype(np.float32)
    c = Corruption("noise", 5)
    ours = add_noise(clean, c, c.rng("clip"))
    assert np.abs(ours).max() < 0.99  # not scaled to fit: the noise is ours minus clean
    noise = ours.astype(np.float64) - clean
    amp, n = clean * 32768.0, noise * 32768.0
    rms = lambda x: np.sqrt(np.mean(np.square(x)))  # noqa: E731
    target = rms(amp) / 10 ** (5 / 20)
    baseline = amp + n * (target / rms(n))
    np.testing.assert_allclose(ours * 32768.0, baseline, atol=1.0)
