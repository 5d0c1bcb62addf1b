"""Random oversampling and the two-model pseudo-label rule."""

from __future__ import annotations

import numpy as np
import pytest

from models.selftrain import random_oversample, select_pseudo_labels, targets_by_index


def test_oversampling_lifts_only_classes_below_target() -> None:
    labels = np.array([0] * 10 + [3] * 4 + [5] * 1)
    idx = random_oversample(labels, {3: 8, 5: 6, 0: 5}, np.random.default_rng(0))
    counts = np.bincount(labels[idx], minlength=6)
    assert counts.tolist() == [10, 0, 0, 8, 0, 6]  # class 0 is above its target: untouched
    assert set(range(len(labels))) <= set(idx.tolist())  # every original row kept
    again = random_oversample(labels, {3: 8, 5: 6, 0: 5}, np.random.default_rng(0))
    assert np.array_equal(idx, again)


def test_oversampling_errors() -> None:
    with pytest.raises(ValueError, match="unlabelled rows"):
        random_oversample(np.array([0, -1]), {0: 3}, np.random.default_rng(0))
    with pytest.raises(ValueError, match="'surprise' has no training rows"):
        random_oversample(np.array([0, 1]), {5: 3}, np.random.default_rng(0))


def test_targets_by_name_scale() -> None:
    assert targets_by_index({"sad": 850, "surprise": 850}, 0.1) == {3: 85, 5: 85}
    with pytest.raises(ValueError, match="valid keys are neutral"):
        targets_by_index({"sadness": 850})


def _row(p: dict[int, float]) -> list[float]:
    rest = (1.0 - sum(p.values())) / (6 - len(p))
    return [p.get(c, rest) for c in range(6)]


def test_pseudo_label_rule_on_hand_made_probabilities() -> None:
    baseline = np.array(
        [
            _row({2: 0.995}),  # happy: baseline preferred, 0.995 >= 0.99 -> kept
            _row({2: 0.98}),  # happy: baseline only 0.98 (MR-CCL 0.999 does not count) -> out
            _row({0: 0.60}),  # neutral: MR-CCL preferred, MR-CCL 0.995 -> kept
            _row({4: 0.90}),  # worried: baseline 0.90 >= 0.85 -> kept
            _row({5: 0.99}),  # models disagree -> out
            _row({3: 0.999}),  # sad: MR-CCL preferred, MR-CCL 0.95 < 0.99 -> out
        ]
    )
    mrccl = np.array(
        [
            _row({2: 0.5}),
            _row({2: 0.999}),
            _row({0: 0.995}),
            _row({4: 0.30}),
            _row({1: 0.99}),
            _row({3: 0.95}),
        ]
    )
    got = select_pseudo_labels(baseline, mrccl)
    assert got.indices.tolist() == [0, 2, 3]
    assert got.labels.tolist() == [2, 0, 4]
    assert got.confidences == pytest.approx([0.995, 0.995, 0.90])
    assert got.counts() == {
        "neutral": 1, "angry": 0, "happy": 1, "sad": 0, "worried": 1, "surprise": 0,
    }  # fmt: skip
    # Preferring MR-CCL for happy too turns row 1 in and row 0 out.
    pref = {c: "mrccl" for c in ("neutral", "angry", "happy", "sad", "worried", "surprise")}
    assert select_pseudo_labels(baseline, mrccl, preferred=pref).indices.tolist() == [1, 2]


def test_pseudo_label_settings_are_checked() -> None:
    p = np.full((2, 6), 1 / 6)
    with pytest.raises(ValueError, match="missing \\['surprise'\\]"):
        select_pseudo_labels(
            p, p, thresholds={c: 0.9 for c in ("neutral", "angry", "happy", "sad", "worried")}
        )
    with pytest.raises(ValueError, match="valid are baseline, mrccl"):
        pref = {c: "svm" for c in ("neutral", "angry", "happy", "sad", "worried", "surprise")}
        select_pseudo_labels(p, p, preferred=pref)
