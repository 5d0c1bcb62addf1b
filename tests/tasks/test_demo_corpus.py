"""The demo corpus: MER's layout, a detectable face, speech, determinism, and cues that need
fusion: each modality merges classes (through the real models: tests/flows/test_demo_shape.py)."""

from __future__ import annotations

import csv
import dataclasses
import re
from collections import Counter, defaultdict
from itertools import combinations
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from data_contracts.labels import CLASSES, MER2024_TRAIN_COUNTS
from tasks.demo import corpus as dc
from tasks.demo import media as dm
from tasks.demo.corpus import (
    CUE_CONFLICT,
    CUE_KEEP,
    CUE_STATES,
    CUE_TABLE,
    NO_CUE,
    VOICES,
    WORDING,
    DemoCorpus,
    DemoCorpusError,
    MissingToolError,
    class_counts,
    make_demo_corpus,
    plan_corpus,
)

N_LABELLED, N_UNLABELLED, SEED = 12, 6, 7
SMALL = {"min_seconds": 2.0, "max_seconds": 2.0}
MODALITIES = tuple(CUE_STATES)  # voice, words, face


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> DemoCorpus:
    return make_demo_corpus(
        tmp_path_factory.mktemp("demo"), N_LABELLED, N_UNLABELLED, SEED, **SMALL
    )


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


def test_files_and_csvs_agree(corpus: DemoCorpus) -> None:
    truth = read_csv(corpus.truth_csv)
    names = [r["name"] for r in truth]
    assert len(names) == len(set(names)) == N_LABELLED + N_UNLABELLED
    assert all(re.fullmatch(r"sample_\d{8}", n) for n in names)
    assert {r["discrete"] for r in truth} <= set(CLASSES)
    for r in truth:
        folder = corpus.labelled_dir if r["pool"] == "labeled" else corpus.unlabelled_dir
        assert (folder / f"{r['name']}.mp4").is_file()
    on_disk = {p.stem for d in (corpus.labelled_dir, corpus.unlabelled_dir) for p in d.iterdir()}
    assert on_disk == set(names)  # no stray or partial files
    labels = read_csv(corpus.labels_csv)
    assert list(labels[0]) == ["name", "discrete"]
    assert [(r["name"], r["discrete"]) for r in labels] == [
        (r["name"], r["discrete"]) for r in truth if r["pool"] == "labeled"
    ]
    transcripts = read_csv(corpus.transcripts_csv)
    assert list(transcripts[0]) == ["name", "chinese"]
    assert [r["name"] for r in transcripts] == names
    assert corpus.labelled_counts == class_counts(N_LABELLED)
    assert corpus.unlabelled_counts == class_counts(N_UNLABELLED)


def test_class_counts_follow_mer_imbalance() -> None:
    mer = np.array([MER2024_TRAIN_COUNTS[c] for c in CLASSES], dtype=float)
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


def test_each_modality_merges_classes_and_only_fusion_tells_all_six_apart() -> None:
    for m in MODALITIES:
        shown = Counter(getattr(CUE_TABLE[c], m) for c in CLASSES)
        assert len(shown) < len(CLASSES) and max(shown.values()) >= 2, (m, shown)
        assert set(shown) | {getattr(NO_CUE, m)} <= set(CUE_STATES[m]), m
    assert len({CUE_TABLE[c] for c in CLASSES}) == len(CLASSES)  # all three together do
    for a, b in combinations(CLASSES, 2):  # and each pair merges in some modality or differs
        apart = [m for m in MODALITIES if getattr(CUE_TABLE[a], m) != getattr(CUE_TABLE[b], m)]
        assert apart, (a, b)
    # Every state is one the renderer knows.
    assert set(CUE_STATES["voice"]) == set(VOICES)
    assert set(CUE_STATES["words"]) == set(WORDING)
    assert set(CUE_STATES["face"]) == set(dm.EXPRESSIONS)


def best_accuracy(states: list, labels: list[str]) -> float:
    """Accuracy of the best rule from `states` to a class (each state's majority class)."""
    by_state: dict = defaultdict(Counter)
    for s, y in zip(states, labels, strict=True):
        by_state[s][y] += 1
    return sum(c.most_common(1)[0][1] for c in by_state.values()) / len(labels)


def test_clips_miss_and_contradict_cues_as_planned() -> None:
    specs = plan_corpus(0, 6000, seed=3)  # planning only: nothing is rendered
    labels = [s.label for s in specs]
    for c in CLASSES:
        cues = [s.cues for s in specs if s.label == c]
        for m in MODALITIES:
            own, blank = getattr(CUE_TABLE[c], m), getattr(NO_CUE, m)
            shown = np.array([getattr(x, m) for x in cues])
            expected = CUE_KEEP[m] + (1 - CUE_KEEP[m] - CUE_CONFLICT) * (own == blank)
            assert abs((shown == own).mean() - expected) < 0.08, (c, m)
            conflicting = ~np.isin(shown, [own, blank])
            assert 0 < conflicting.mean() < 2 * CUE_CONFLICT, (c, m)
    # What the cues allow: no modality alone comes near what all three give together.
    alone = {m: best_accuracy([getattr(s.cues, m) for s in specs], labels) for m in MODALITIES}
    together = best_accuracy([s.cues for s in specs], labels)
    assert together > 0.8 and max(alone.values()) < together - 0.15, (alone, together)
    # The rendering follows the cues shown, never the class behind them.
    for s in specs[:300]:
        assert s.look.expression == s.cues.face
        assert any(s.look.sentence.endswith(w) for w in WORDING[s.cues.words])


def test_wording_groups_share_no_sentence(corpus: DemoCorpus) -> None:
    sets = [set(v) for v in WORDING.values()]
    assert sum(len(s) for s in sets) == len(set().union(*sets))
    for clip in corpus.clips:
        assert any(clip.transcript.endswith(w) for w in WORDING[clip.cues.words]), clip


def test_expressions_change_only_the_face() -> None:
    blank = dm.face_template("none").astype(int)
    for expression in ("smile", "frown", "open"):
        changed = np.abs(dm.face_template(expression).astype(int) - blank).sum(2) > 40
        ys, xs = np.nonzero(changed)
        assert changed.sum() > 300, expression  # visible at the demo's 64 px crops too
        # Inside dlib's box around the astronaut's face, (179, 83)-(266, 170), brows included.
        assert xs.min() >= 179 and xs.max() <= 266 and ys.min() >= 75 and ys.max() <= 170


def pitch_hz(audio: np.ndarray, rate: int) -> float:
    """Median autocorrelation pitch over the loud 46 ms frames."""
    n, found = 1024, []
    for i in range(0, len(audio) - n, n // 2):
        w = audio[i : i + n]
        if np.sqrt((w**2).mean()) < 0.05:
            continue
        ac = np.correlate(w, w, "full")[n - 1 :]
        lo, hi = rate // 400, rate // 60
        found.append(rate / (lo + np.argmax(ac[lo:hi])))
    return float(np.median(found))


def test_arousal_is_audible() -> None:
    """Higher arousal: higher pitch; the tense voice is clipped (low crest factor), the lax one
    breathy (noise between the harmonics: a flat spectrum)."""
    espeak, _ = dm.require_tools()
    look = plan_corpus(0, 1, 0)[0].look
    measured = {}
    for level, (pitch, rate, effort, peak) in VOICES.items():
        voice = dataclasses.replace(
            look, sentence=WORDING["neutral"][0], pitch=pitch, rate=rate, effort=effort,
            speech_peak=peak,
        )  # fmt: skip
        audio = dm.render_audio(espeak, voice, dm.ClipFormat())
        power = np.abs(np.fft.rfft(audio * np.hanning(len(audio)))) ** 2 + 1e-12
        measured[level] = {
            "pitch": pitch_hz(audio, dm.SPEECH_RATE_HZ),
            "crest": np.abs(audio).max() / np.sqrt((audio**2).mean()),
            "flatness": np.exp(np.log(power).mean()) / power.mean(),
        }
    low, mid, high = measured["low"], measured["mid"], measured["high"]
    assert low["pitch"] < mid["pitch"] < high["pitch"], measured  # measured 75, 93, 125 Hz
    assert high["crest"] < 0.5 * mid["crest"], measured  # measured 2.7 vs 9.8
    assert low["flatness"] > 4 * mid["flatness"], measured  # measured 0.46 vs 0.03


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
        # Speech is far louder than the noise floor that fills the pauses.
        assert frame_rms.max() > 0.08, clip.name
        assert frame_rms.max() > 3 * np.percentile(frame_rms, 5), clip.name


def test_same_seed_same_corpus(corpus: DemoCorpus, tmp_path: Path) -> None:
    again = make_demo_corpus(tmp_path, N_LABELLED, N_UNLABELLED, SEED, workers=1, **SMALL)
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
    assert len(list(again.unlabelled_dir.iterdir())) == 0
    assert (tmp_path / "notes.txt").read_text() == "mine"  # only the corpus's own files go


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_labelled": 0, "n_unlabelled": 0}, "positive number of clips"),
        ({"size": 128}, "frame size"),
        ({"fps": 60}, "fps"),
        ({"min_seconds": 3.0, "max_seconds": 2.0}, "min_seconds"),
    ],
)
def test_bad_parameters_are_named(kwargs: dict, message: str, tmp_path: Path) -> None:
    with pytest.raises(DemoCorpusError, match=message):
        make_demo_corpus(tmp_path, **kwargs)
    assert not any(tmp_path.iterdir())  # refused before writing anything


def test_a_run_is_scored_against_the_hidden_classes(tmp_path):
    corpus, run = tmp_path / "corpus", tmp_path / "run"
    corpus.mkdir()
    (run / "report").mkdir(parents=True)
    (run / "fold-0").mkdir()
    truth = [("a", "happy"), ("b", "sad"), ("c", "angry"), ("d", "happy")]
    (corpus / dc.TRUTH_CSV).write_text(
        "name,discrete,pool\n" + "".join(f"{n},{c},unlabeled\n" for n, c in truth)
    )
    # The run got a, b, d right and called c sad; it pseudo-labelled a (right) and b (wrong).
    guesses = {"a": "happy", "b": "sad", "c": "sad", "d": "happy"}
    (run / "report" / "submission.csv").write_text(
        "name,discrete\n" + "".join(f"{n},{c}\n" for n, c in guesses.items())
    )
    np.savez(
        run / "fold-0" / "outputs.npz",
        pseudo_index=np.array([0, 1]),
        pseudo_label=np.array([CLASSES.index("happy"), CLASSES.index("angry")]),
    )
    lines = dc.score_against_truth(corpus, run)
    assert "the 4 unlabelled clips score WAF 66.67" in lines[0]  # F1: happy 1, sad 2/3, angry 0
    assert lines[1].startswith("pseudo labels: 1 of 2 (50 %)")
    (corpus / dc.TRUTH_CSV).unlink()  # a real corpus has no answer key: nothing to say
    assert dc.score_against_truth(corpus, run) == []
