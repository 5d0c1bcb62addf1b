"""How a model's predictions are scored: the weighted-average F1 (WAF, the challenge's metric),
per-class F1, and the WAFs that need no features to read a WAF against."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import f1_score

from data_contracts.labels import CLASSES, NUM_CLASSES


def waf(labels: np.ndarray, predicted: np.ndarray) -> float:
    """Weighted-average F1 over the six classes (scikit-learn, average='weighted')."""
    return float(
        f1_score(
            labels, predicted, labels=list(range(NUM_CLASSES)), average="weighted", zero_division=0
        )
    )


def per_class_f1(labels: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """F1 of each class, by class name."""
    scores = f1_score(
        labels, predicted, labels=list(range(NUM_CLASSES)), average=None, zero_division=0
    )
    return {name: float(s) for name, s in zip(CLASSES, scores, strict=True)}


def reference_wafs(train_labels: np.ndarray, val_labels: np.ndarray) -> dict[str, float]:
    """What needs no features, for reading a WAF against (docs/method.md §9):

    - `majority`: every validation row predicted as the training rows' most frequent class;
    - `class_prior`: the expected WAF of guessing each row's class at random with the training
      rows' class frequencies q. A class of n_c validation rows out of N then has expected
      true positives n_c q_c and predictions N q_c, so F1_c = 2 n_c q_c / (n_c + N q_c).
    """
    q = np.bincount(train_labels, minlength=NUM_CLASSES) / max(1, len(train_labels))
    n = np.bincount(val_labels, minlength=NUM_CLASSES).astype(np.float64)
    total = n.sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(n + total * q > 0, 2 * n * q / (n + total * q), 0.0)
    majority = np.full(len(val_labels), int(q.argmax()))
    return {
        "majority": waf(val_labels, majority),
        "class_prior": float((n / max(total, 1.0)) @ f1),
    }
