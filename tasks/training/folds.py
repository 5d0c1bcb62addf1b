"""Which CV fold each labelled video is in: assigned once per training run over the exact rows
it trains on (models/folds.py), written into the run folder and beside the stores, and read by
everything that names a fold (`merflow check`, `merflow inspect`, the report).

    <run dir>/folds.json            the run's own assignment
    <data root>/runs/latest-folds.json
                                    the latest run's, where check and inspect look first
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from data_contracts import tables
from data_contracts.atomic import atomic_path
from data_contracts.labels import CLASS_INDEX, CLASSES
from data_contracts.store import Store
from models.folds import assign_folds, thin_classes

log = logging.getLogger(__name__)

RUN_FOLDS = "folds.json"
LATEST_FOLDS = "runs/latest-folds.json"


@dataclass(frozen=True)
class FoldAssignment:
    """The fold of each labelled video and where the assignment comes from."""

    folds: dict[str, int]
    n_splits: int
    seed: int
    run_key: str | None  # None: a preview, no training run has made these folds yet
    source: str  # one line for reports: which run's folds these are

    def to_json(self) -> str:
        """The assignment as JSON (the files above)."""
        return json.dumps(asdict(self), indent=1, sort_keys=True)


def run_assignment(
    video_ids: np.ndarray, labels: np.ndarray, n_splits: int, seed: int, run_key: str
) -> FoldAssignment:
    """A run's folds over its labelled rows (in the run's row order); warns, once for the run,
    of classes too thin for every fold to validate on them."""
    folds = assign_folds(labels, n_splits, seed)
    thin = [CLASSES[c] for c in thin_classes(labels, n_splits)]
    if thin:
        log.warning(
            "classes %s have fewer labelled rows than n_splits=%d; some folds validate without "
            "them",
            thin,
            n_splits,
        )
    return FoldAssignment(
        folds=dict(zip(map(str, video_ids), folds.tolist(), strict=True)),
        n_splits=n_splits,
        seed=seed,
        run_key=run_key,
        source=f"training run {run_key} ({len(video_ids)} labelled videos)",
    )


def save_folds(assignment: FoldAssignment, run_dir: Path, store: Store | None) -> None:
    """Write the assignment into the run folder and, with a store, beside the stores (as the
    latest run's)."""
    text = assignment.to_json()
    run_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(run_dir / RUN_FOLDS) as tmp:
        tmp.write_text(text, encoding="utf-8")
    if store is not None:
        store.write_text(LATEST_FOLDS, text)


def _parse(text: str | None) -> FoldAssignment | None:
    if not text:
        return None
    try:
        return FoldAssignment(**json.loads(text))
    except (json.JSONDecodeError, TypeError):
        return None


def read_run_folds(run_dir: Path) -> FoldAssignment | None:
    """The assignment of the run in `run_dir`, or None."""
    path = run_dir / RUN_FOLDS
    return _parse(path.read_text(encoding="utf-8")) if path.is_file() else None


def fold_assignment(store: Store, n_splits: int | None = None, seed: int | None = None):
    """The folds `check` and `inspect` show: the latest training run's (when its n_splits and
    seed are the ones asked for, or none were asked), else a preview (with the n_splits and seed
    asked for, else the data root's saved settings) computed with the same function over the
    rows a run would train on: the labelled videos (of the manifest, or imported without their
    files: tasks/stores/quality.py current_videos), sorted by id, that have at least one modality
    in the table a run trains on per modality (train.feature_tables of the saved settings, else the
    newest; a run's quality filters, when set, may drop more).
    Raises ValueError when there are too few labelled videos for the folds."""
    latest = _parse(store.read_text(LATEST_FOLDS))
    if latest is not None and n_splits in (None, latest.n_splits) and seed in (None, latest.seed):
        return latest
    saved_splits, saved_seed = _saved_fold_settings(store)
    n_splits = saved_splits if n_splits is None else n_splits
    seed = saved_seed if seed is None else seed
    labels = store.read(tables.LABELS, columns=["video_id", "label"])
    with_features = _videos_with_features(store)
    labels = labels[labels.video_id.isin(with_features)].sort_values("video_id")
    folds = assign_folds(labels.label.map(CLASS_INDEX).to_numpy(), n_splits, seed)
    return FoldAssignment(
        folds=dict(zip(labels.video_id, folds.tolist(), strict=True)),
        n_splits=n_splits,
        seed=seed,
        run_key=None,
        source=(
            f"preview: no training run with n_splits={n_splits}, seed={seed} yet; the folds a "
            f"run would make over the {len(labels)} labelled videos that have features"
        ),
    )


# Where the train settings of a data root are saved: the latest run's, else the extraction's.
_SAVED_SETTINGS = ("runs/latest-train-settings.yaml", "runs/extract-settings.yaml")


def _saved_train(store: Store) -> dict:
    """The train section a run on this data root would use: its saved settings' (the latest
    run's, else the extraction's), else empty (the defaults)."""
    import yaml

    for name in _SAVED_SETTINGS:
        try:
            train = (yaml.safe_load(store.read_text(name) or "") or {}).get("train") or {}
        except (OSError, yaml.YAMLError, AttributeError):
            continue
        if "n_splits" in train and "seed" in train:
            return train
    return {}


def _saved_fold_settings(store: Store) -> tuple[int, int]:
    """The n_splits and seed a run on this data root would use: its saved settings, else the
    defaults."""
    from models.settings import default

    train = _saved_train(store)
    if train:
        return int(train["n_splits"]), int(train["seed"])
    return default("n_splits"), default("seed")


def _videos_with_features(store: Store) -> set[str]:
    """The videos a run trains on (current_videos: the manifest's current bytes and the
    feature-only ids) that have a row in one of its tables: per modality the table the saved
    settings' train.feature_tables names (flows/plan.py training_tables), else the newest."""
    from tasks.stores.quality import current_videos, named_feature_tables, newest_feature_tables

    named = _saved_train(store).get("feature_tables") or {}
    chosen = {**newest_feature_tables(store), **named_feature_tables(store, named)}
    videos = current_videos(store, chosen.values())
    current = set(zip(videos.video_id, videos.sha256, strict=True))
    found: set[str] = set()
    for ref in chosen.values():
        keys = store.read(ref, columns=["video_id", "sha256"])
        found |= {v for v, s in zip(keys.video_id, keys.sha256, strict=True) if (v, s) in current}
    return found
