"""Multi-classifier weighted soft voting over the A, V, T and F classifiers."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from data_contracts.labels import CLASSIFIER_OF_MODALITY, CLASSIFIERS, MODALITIES
from models.settings import default

# The paper's weights, in CLASSIFIERS order (A, V, T, F).
DEFAULT_VOTING_WEIGHTS: dict[str, float] = dict(
    zip(CLASSIFIERS, default("vote_weights"), strict=True)
)  # declared in models/settings.py


def classifier_presence(present: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Which classifiers have an input per row: A/V/T follow their modality, F any modality."""
    out = {CLASSIFIER_OF_MODALITY[m]: present[m] for m in MODALITIES}
    out["F"] = torch.stack([present[m] for m in MODALITIES]).any(dim=0)
    return out


def check_weights(weights: Mapping[str, float]) -> dict[str, float]:
    """Validate voting weights: one non-negative number per classifier A, V, T, F."""
    if set(weights) != set(CLASSIFIERS):
        raise ValueError(
            f"voting weights must name exactly the classifiers {CLASSIFIERS}; got {sorted(weights)}"
        )
    if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
        raise ValueError(f"voting weights must be >= 0 with a positive sum; got {dict(weights)}")
    return {c: float(weights[c]) for c in CLASSIFIERS}


def soft_vote(
    probs: Mapping[str, torch.Tensor],
    present: Mapping[str, torch.Tensor],
    weights: Mapping[str, float] = DEFAULT_VOTING_WEIGHTS,
) -> torch.Tensor:
    """Weighted mean of the classifiers' probabilities (B, C); absent ones left out per row.

    `probs` and `present` are keyed by classifier (A, V, T, F); the weights of the classifiers
    present in a row are renormalised to sum to one, so the result is a distribution.
    """
    weights = check_weights(weights)
    ref = probs[CLASSIFIERS[0]]
    total = torch.zeros_like(ref)  # (B, C)
    norm = torch.zeros(ref.shape[0], dtype=ref.dtype, device=ref.device)  # (B,)
    for c in CLASSIFIERS:
        w = weights[c] * present[c].to(ref.dtype)  # (B,)
        # where() and not multiply: an absent classifier's output may be NaN.
        total = total + torch.where(present[c].unsqueeze(1), probs[c], 0.0) * w.unsqueeze(1)
        norm = norm + w
    if bool((norm <= 0).any()):
        rows = torch.nonzero(norm <= 0).flatten()[:5].tolist()
        raise ValueError(
            f"rows {rows} have no classifier with a positive weight present; every row needs "
            "at least one modality (drop rows with none) and weights > 0 for it"
        )
    return total / norm.unsqueeze(1)
