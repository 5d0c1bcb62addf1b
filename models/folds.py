"""The one fold assignment of merflow (numpy and scikit-learn only: `merflow check` and
`inspect` use it without loading torch)."""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.model_selection import StratifiedKFold


def assign_folds(labels: np.ndarray, n_splits: int, seed: int) -> np.ndarray:
    """The CV fold (0..n_splits-1) of each labelled row: StratifiedKFold(n_splits, shuffle,
    random_state=seed) over the rows in the order given (a run gives them sorted by video_id).
    A run computes it once over the exact rows it trains on and keeps it
    (tasks/training/folds.py)."""
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
        # scikit-learn warns that the least populated class has fewer members than n_splits
        # each time folds are made (check, inspect, every run); a run says it once, naming
        # the classes (tasks/training/folds.py, thin_classes). Only that warning is silenced.
        warnings.filterwarnings(
            "ignore", message="The least populated class in y has only", category=UserWarning
        )
        for k, (_, val) in enumerate(splitter.split(np.zeros(len(labels)), labels)):
            fold[val] = k
    return fold


def thin_classes(labels: np.ndarray, n_splits: int) -> list[int]:
    """Classes with some labelled rows but fewer than n_splits: some folds validate without
    them (stratified folds still work)."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64))
    return [c for c, n in enumerate(counts.tolist()) if 0 < n < n_splits]
