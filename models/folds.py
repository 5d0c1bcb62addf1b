"""The one fold assignment of merflow (numpy and scikit-learn only: `merflow check` and
`inspect` use it without loading torch)."""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.model_selection import StratifiedKFold


def assign_folds(labels: np.ndarray, n_splits: int, seed: int) -> np.ndarray:
    """The CV fold (0..n_splits-1) of each labelled row: StratifiedKFold(n_splits, shuffle,
    random_state=seed) over the rows in the order given (a run gives them sorted by video_id).
    A run computes it once over the exact rows it trains on and keeps it (tasks/folds.py)."""
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) < n_splits:
        raise ValueError(
            f"{len(labels)} labelled videos cannot make {n_splits} folds; label more videos or "
            "set a smaller train.n_splits"
        )
    if len(labels) and np.bincount(labels).max() < n_splits:
        raise ValueError(
            f"every class has fewer labelled rows than n_splits={n_splits}; lower train.n_splits"
        )
    fold = np.empty(len(labels), dtype=np.int64)
    splitter = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "least populated class" on small sets
        for k, (_, val) in enumerate(splitter.split(np.zeros(len(labels)), labels)):
            fold[val] = k
    return fold
