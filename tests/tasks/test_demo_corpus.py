"""The demo corpus: MER's layout, a detectable face, speech, determinism and learnable labels."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from data_contracts.labels import CLASSES
from tasks import demo_corpus as dc
from tasks.demo_corpus import (
    SENTENCES,
    TONE_HZ,
    DemoCorpus,
    DemoCorpusError,
    MissingToolError,
    class_counts,
    make_demo_corpus,
)

N_LABELED, N_UNLABELED, SEED = 12, 6, 7
SMALL = {"min_seconds": 2.0, "max_seconds": 2.0}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> DemoCorpus:
    return make_demo_corpus(tmp_path_factory.mktemp("demo"), N_LABELED, N_UNLABELED, SEED, **SMALL)


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def decode_frames(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as f:
        return [frame.to_ndarray(format="rgb24") for frame in f.decode(video=0)]


def decode_audio(path: Path) -> tuple[np.ndarray, int]:
    with av.open(str(path)) as f:
        rate = f.streams.audio[0].rate
        return np.concatenate([fr.to_ndarray().reshape(-1) for fr in f.decode(audio=0)]), rate


def haar_faces(frame: np.ndarray) -> np.ndarray:
    cascade = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
    return cascade.detectMultiScale(cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY), 1.1, 5)


def loo_nearest_centroid(x: np.ndarray, y: np.ndarray) -> float:
    """Leave-one-out accuracy of a nearest-centroid classifier on standardised features."""
    hits = 0
    for i in range(len(y)):
        rest = np.arange(len(y)) != i
        classes = sorted(set(y[rest]))
        scale = x[rest].std(0) + 1e-9
        centroids = np.array([x[rest][y[rest] == c].mean(0) for c in classes]) / scale
        hits += classes[int(np.argmin(((x[i] / scale - centroids) ** 2).sum(1)))] == y[i]
    return hits / len(y)


def test_files_and_csvs_agree(corpus: DemoCorpus) -> None:
    truth = read_csv(corpus.truth_csv)
    names = [r["name"] for r in truth]
    assert len(names) == len(set(names)) == N_LABELED + N_UNLABELED
    assert all(re.fullmatch(r"sample_\d{8}", n) for n in names)
    assert {r["discrete"] for r in truth} <= set(CLASSES)
    for r in truth:
        folder = corpus.labeled_dir if r["pool"] == "labeled" else corpus.unlabeled_dir
        assert (folder / f"{r['name']}.mp4").is_file()
    on_disk = {p.stem for d in (corpus.labeled_dir, corpus.unlabeled_dir) for p in d.iterdir()}
    assert on_disk == set(names)  # no stray or partial files
    labels = read_csv(corpus.labels_csv)
    assert list(labels[0]) == ["name", "discrete"]
    assert [(r["name"], r["discrete"]) for r in labels] == [
        (r["name"], r["discrete"]) for r in truth if r["pool"] == "labeled"
    ]
    transcripts = read_csv(corpus.transcripts_csv)
    assert list(transcripts[0]) == ["name", "chinese"]
    assert [r["name"] for r in transcripts] == names
    assert corpus.labeled_counts == class_counts(N_LABELED)
    assert corpus.unlabeled_counts == class_counts(N_UNLABELED)


def test_class_counts_follow_mer_imbalance() -> None:
    mer = np.array([dc.MER_TRAIN_COUNTS[c] for c in CLASSES], dtype=float)
    for n in (0, 5, 6, 12, 20, 21, 60, 120, 1000, 2777):
        counts = np.array(list(class_counts(n).values()))
        assert counts.sum() == n
        assert (np.diff(counts) <= 0).all(), (n, counts)
        if n >= 6:
            assert counts.min() >= 1, (n, counts)
        if n >= 21:
            assert (np.diff(counts) < 0).all(), (n, counts)
        if n >= 100:
            assert np.abs(counts - n * mer / mer.sum()).max() <= 2, (n, counts)


def test_transcripts_use_class_wording(corpus: DemoCorpus) -> None:
    sets = [set(SENTENCES[c]) for c in CLASSES]
    assert sum(len(s) for s in sets) == len(set().union(*sets))  # no sentence shared by classes
    for clip in corpus.clips:
        assert any(clip.transcript.endswith(s) for s in SENTENCES[clip.label]), clip


def test_video_format_and_face(corpus: DemoCorpus) -> None:
    for clip in corpus.clips[:6]:
        with av.open(str(clip.path)) as f:
            video, audio = f.streams.video[0], f.streams.audio[0]
            assert video.codec_context.name == "h264"
            assert video.codec_context.pix_fmt == "yuv420p"
            assert (video.width, video.height) == (256, 256)
            assert video.average_rate == 12
            assert audio.codec_context.name == "aac"
            assert audio.rate == 16000
        frames = decode_frames(clip.path)
        assert len(frames) == 24  # 2 s at 12 fps
        faces = haar_faces(frames[len(frames) // 2])
        assert len(faces) >= 1, f"no face found in {clip.name}"
        assert max(w for _, _, w, _ in faces) >= 100  # big enough for dlib's HOG detector


def test_audio_has_speech(corpus: DemoCorpus) -> None:
    for clip in corpus.clips:
        audio, rate = decode_audio(clip.path)
        assert rate == 16000
        assert abs(len(audio) / rate - 2.0) < 0.1
        frame_rms = np.sqrt((audio[: len(audio) // 400 * 400].reshape(-1, 400) ** 2).mean(1))
        # Speech is far louder than the tone + noise floor that fills the pauses.
        assert frame_rms.max() > 0.08, clip.name
        assert frame_rms.max() > 3 * np.percentile(frame_rms, 5), clip.name


def test_same_seed_same_corpus(corpus: DemoCorpus, tmp_path: Path) -> None:
    again = make_demo_corpus(tmp_path, N_LABELED, N_UNLABELED, SEED, workers=1, **SMALL)
    for name in ("labels_csv", "transcripts_csv", "truth_csv"):
        assert getattr(again, name).read_bytes() == getattr(corpus, name).read_bytes()
    for a, b in zip(corpus.clips, again.clips, strict=True):
        assert a.name == b.name
        frames_a, frames_b = decode_frames(a.path), decode_frames(b.path)
        assert all(np.array_equal(x, y) for x, y in zip(frames_a, frames_b, strict=True))
        assert np.array_equal(decode_audio(a.path)[0], decode_audio(b.path)[0])


def test_different_seed_differs(corpus: DemoCorpus, tmp_path: Path) -> None:
    other = make_demo_corpus(tmp_path, 6, 0, SEED + 1, **SMALL)
    assert other.truth_csv.read_bytes() != corpus.truth_csv.read_bytes()
    first = decode_frames(other.clips[0].path)[0]
    assert not any(np.array_equal(first, decode_frames(c.path)[0]) for c in corpus.clips)


def face_colour(path: Path) -> np.ndarray:
    """Chromaticity (r, g share) of the central half of the Haar face box, middle frame."""
    frame = decode_frames(path)[12].astype(float)
    x, y, w, h = max(haar_faces(frame.astype(np.uint8)), key=lambda f: f[2])
    region = frame[y + h // 4 : y + 3 * h // 4, x + w // 4 : x + 3 * w // 4].reshape(-1, 3)
    mean = region.mean(0)
    return mean[:2] / mean.sum()  # brightness-free: per-clip brightness jitter cancels out


def tone_bands(path: Path) -> np.ndarray:
    """Log ratio of each class tone's band energy to its neighbouring bands."""
    audio, rate = decode_audio(path)
    power = np.abs(np.fft.rfft(audio)) ** 2
    freq = np.fft.rfftfreq(len(audio), 1 / rate)
    out = []
    for hz in TONE_HZ.values():
        band = power[(freq > hz * 0.98) & (freq < hz * 1.02)].sum()
        side = (freq > hz * 0.9) & (freq < hz * 0.96) | (freq > hz * 1.04) & (freq < hz * 1.1)
        out.append(np.log(band / (power[side].sum() / 3)))
    return np.array(out)


def test_labels_learnable_and_scrambled_join_is_not(corpus: DemoCorpus) -> None:
    y = np.array([c.label for c in corpus.clips])
    colour = np.array([face_colour(c.path) for c in corpus.clips])
    tone = np.array([tone_bands(c.path) for c in corpus.clips])
    # Scrambled joins (features paired with shuffled labels), averaged: 18 clips are few.
    rng = np.random.default_rng(0)
    scrambles = [y[rng.permutation(len(y))] for _ in range(20)]
    for features in (colour, tone):
        assert loo_nearest_centroid(features, y) >= 0.9  # measured 1.0 for both
        chance = np.mean([loo_nearest_centroid(features, s) for s in scrambles])
        assert chance <= 0.35  # measured ~0.2; six classes give ~0.17


def test_missing_espeak_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(dc.shutil, "which", lambda name: None)
    with pytest.raises(MissingToolError, match=r"apt-get install espeak-ng"):
        make_demo_corpus(tmp_path, 6, 0)


def test_existing_corpus_needs_overwrite(corpus: DemoCorpus, tmp_path: Path) -> None:
    with pytest.raises(DemoCorpusError, match="overwrite=True"):
        make_demo_corpus(corpus.root, 6, 0)
    (tmp_path / "notes.txt").write_text("mine")
    make_demo_corpus(tmp_path, 2, 1, **SMALL)
    again = make_demo_corpus(tmp_path, 1, 0, overwrite=True, **SMALL)
    assert len(read_csv(again.truth_csv)) == 1
    assert len(list(again.unlabeled_dir.iterdir())) == 0
    assert (tmp_path / "notes.txt").read_text() == "mine"  # only the corpus's own files go


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_labeled": 0, "n_unlabeled": 0}, "positive number of clips"),
        ({"size": 128}, "frame size"),
        ({"fps": 60}, "fps"),
        ({"min_seconds": 3.0, "max_seconds": 2.0}, "min_seconds"),
    ],
)
def test_bad_parameters_are_named(kwargs: dict, message: str, tmp_path: Path) -> None:
    with pytest.raises(DemoCorpusError, match=message):
        make_demo_corpus(tmp_path, **kwargs)
    assert not any(tmp_path.iterdir())  # refused before writing anything
