"""Weighted soft voting on hand-made probabilities."""

from __future__ import annotations

import pytest
import torch

from models.voting import classifier_presence, soft_vote


def test_weighted_vote_matches_hand_computation() -> None:
    p = {
        "A": torch.tensor([[0.8, 0.2]]),
        "V": torch.tensor([[0.1, 0.9]]),
        "T": torch.tensor([[0.1, 0.9]]),
        "F": torch.tensor([[0.8, 0.2]]),
    }
    present = {c: torch.tensor([True]) for c in "AVTF"}
    got = soft_vote(p, present)
    first = (0.7 * 0.8 + 0.5 * 0.1 + 0.4 * 0.1 + 0.7 * 0.8) / 2.3
    assert got[0, 0].item() == pytest.approx(first)
    assert got[0].sum().item() == pytest.approx(1.0)
    # Equal weights would pick class 1 (mean 0.45 vs 0.55); the paper's weights pick class 0.
    assert got.argmax(1).item() == 0
    equal = soft_vote(p, present, {"A": 1, "V": 1, "T": 1, "F": 1})
    assert equal.argmax(1).item() == 1


def test_a_missing_classifier_is_left_out_and_weights_renormalised() -> None:
    p = {
        "A": torch.tensor([[0.9, 0.1], [0.9, 0.1]]),
        "V": torch.tensor([[float("nan"), float("nan")], [0.0, 1.0]]),
        "T": torch.tensor([[0.0, 1.0], [0.0, 1.0]]),
        "F": torch.tensor([[0.5, 0.5], [0.5, 0.5]]),
    }
    present = {
        "A": torch.tensor([True, True]),
        "V": torch.tensor([False, True]),
        "T": torch.tensor([True, True]),
        "F": torch.tensor([True, True]),
    }
    got = soft_vote(p, present)
    row0 = (0.7 * 0.9 + 0.4 * 0.0 + 0.7 * 0.5) / (0.7 + 0.4 + 0.7)
    assert got[0, 0].item() == pytest.approx(row0)
    row1 = (0.7 * 0.9 + 0.5 * 0.0 + 0.4 * 0.0 + 0.7 * 0.5) / 2.3
    assert got[1, 0].item() == pytest.approx(row1)


def test_presence_of_classifiers_follows_modalities() -> None:
    present = {
        "visual": torch.tensor([True, False]),
        "acoustic": torch.tensor([False, False]),
        "text": torch.tensor([True, True]),
    }
    got = classifier_presence(present)
    assert got["V"].tolist() == [True, False] and got["A"].tolist() == [False, False]
    assert got["F"].tolist() == [True, True]


def test_bad_weights_and_empty_rows_are_errors() -> None:
    p = {c: torch.tensor([[0.5, 0.5]]) for c in "AVTF"}
    with pytest.raises(ValueError, match="exactly the classifiers"):
        soft_vote(p, {c: torch.tensor([True]) for c in "AVTF"}, {"A": 1.0})
    with pytest.raises(ValueError, match="no classifier with a positive weight"):
        soft_vote(p, {c: torch.tensor([False]) for c in "AVTF"})
