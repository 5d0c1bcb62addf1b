"""Self-training pieces: random oversampling and the two-model pseudo-label rule."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from data_contracts.labels import CLASS_INDEX, CLASSES, NUM_CLASSES
from models.featureset import check_mapping_keys
from models.settings import default

# The numbers are declared in models/settings.py (docs/method.md §8).
DEFAULT_THRESHOLDS: dict[str, float] = default("thresholds")
DEFAULT_PREFERRED: dict[str, str] = {
    c: "baseline" if c in default("preferred_baseline") else "mrccl" for c in CLASSES
}
MODEL_NAMES: tuple[str, ...] = ("baseline", "mrccl")
STEP1_TARGETS: dict[str, int] = default("oversample_step1")
STEP2_TARGETS: dict[str, int] = default("oversample_step2")


def targets_by_index(targets: Mapping[str, int], scale: float = 1.0) -> dict[int, int]:
    """Class-name targets as class-index targets, multiplied by `scale` (for small data)."""
    check_mapping_keys("oversampling targets", targets, CLASSES)
    return {CLASS_INDEX[name]: round(count * scale) for name, count in targets.items()}


def random_oversample(
    labels: np.ndarray, targets: Mapping[int, int], rng: np.random.Generator
) -> np.ndarray:
    """Indices of all rows plus random repeats that lift each class below its target to it.

    Give it the training split only (never validation). Classes at or above their target
    are left as they are; the repeats are drawn with replacement.
    """
    labels = np.asarray(labels)
    if (labels < 0).any():
        raise ValueError("random_oversample got unlabelled rows (-1); pass labelled rows only")
    extra = []
    for c in sorted(targets):
        if not 0 <= c < NUM_CLASSES:
            raise ValueError(
                f"oversampling target for class index {c}; valid are 0..{NUM_CLASSES - 1}"
            )
        rows = np.flatnonzero(labels == c)
        missing = int(targets[c]) - len(rows)
        if missing <= 0:
            continue
        if len(rows) == 0:
            raise ValueError(
                f"class {CLASSES[c]!r} has no training rows, so it cannot be oversampled to "
                f"{targets[c]}; add labelled data for it or drop it from the targets"
            )
        extra.append(rng.choice(rows, size=missing, replace=True))
    return np.concatenate([np.arange(len(labels)), *extra]).astype(np.int64)


@dataclass
class PseudoLabels:
    """Rows of the unlabelled set that received a pseudo label."""

    indices: np.ndarray  # int64 (K,), rows of the probability matrices
    labels: np.ndarray  # int64 (K,)
    confidences: np.ndarray  # float (K,), the preferred model's probability of the label

    def counts(self) -> dict[str, int]:
        """Pseudo labels per class name (the paper's Table 2)."""
        return {name: int((self.labels == i).sum()) for i, name in enumerate(CLASSES)}


def _per_class(name: str, given: Mapping[str, object]) -> list:
    check_mapping_keys(name, given, CLASSES)
    missing = [c for c in CLASSES if c not in given]
    if missing:
        raise ValueError(f"{name} must give a value for every class; missing {missing}")
    return [given[c] for c in CLASSES]


def select_pseudo_labels(
    probs_baseline: np.ndarray,
    probs_mrccl: np.ndarray,
    thresholds: Mapping[str, float] = DEFAULT_THRESHOLDS,
    preferred: Mapping[str, str] = DEFAULT_PREFERRED,
) -> PseudoLabels:
    """Label c where both models' argmax is c and the preferred model's p(c) >= threshold[c]."""
    pb, pm = np.asarray(probs_baseline), np.asarray(probs_mrccl)
    if pb.shape != pm.shape or pb.ndim != 2 or pb.shape[1] != NUM_CLASSES:
        raise ValueError(
            f"need two (N, {NUM_CLASSES}) probability matrices; got {pb.shape}, {pm.shape}"
        )
    thr = np.asarray(_per_class("pseudo-label thresholds", thresholds), dtype=np.float64)
    pref = _per_class("preferred models", preferred)
    bad = sorted({p for p in pref if p not in MODEL_NAMES})
    if bad:
        raise ValueError(f"preferred model {bad} unknown; valid are {', '.join(MODEL_NAMES)}")
    use_baseline = np.array([p == "baseline" for p in pref])  # (C,)
    label = pb.argmax(1)  # (N,)
    agree = label == pm.argmax(1)
    rows = np.arange(len(label))
    conf = np.where(use_baseline[label], pb[rows, label], pm[rows, label])  # (N,)
    keep = np.flatnonzero(agree & (conf >= thr[label]))
    return PseudoLabels(keep.astype(np.int64), label[keep].astype(np.int64), conf[keep])
