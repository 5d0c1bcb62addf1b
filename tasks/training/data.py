"""From the feature stores to in-memory training sets: join on video, mask missing modalities,
z-score each modality (zscore; apply_zscore applies a run's z-score to other videos) and apply
the run's quality filters (quality_kept), as training and prediction both do.

The videos a run trains on are the manifest's, at their current bytes (video_id + sha256), and
the ids the chosen feature tables hold as feature-only rows (imported without their videos,
sha256 NO_VIDEO: data_contracts/tables.py) that the manifest lacks. An id in both is the
manifest's video: its bytes decide which rows it gets, and its feature-only rows are not used."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from data_contracts import tables
from data_contracts.labels import CLASS_INDEX, MODALITIES
from data_contracts.store import Store, arrow_system_memory
from data_contracts.tables import NO_VIDEO, TableRef
from models.featureset import UNLABELLED, FeatureSet
from tasks.engine.errors import BadInputError
from tasks.stores.quality import current_videos, quality_mask, quality_signals, quality_thresholds

if TYPE_CHECKING:
    from models.settings import TrainSettings
    from tasks.dag import Plan

log = logging.getLogger(__name__)


@dataclass
class TrainingData:
    """Labelled and unlabelled feature sets of the training videos, plus what was left out."""

    labelled: FeatureSet
    unlabelled: FeatureSet
    dropped: list[str] = field(default_factory=list)  # videos with no modality at all
    missing: dict[str, int] = field(default_factory=dict)  # modality -> videos lacking it
    extractor_ids: dict[str, str] = field(default_factory=dict)
    load_seconds: float = 0.0
    # Per modality (mean, std) over every present row, labelled or not; None: not standardised.
    stats: dict[str, tuple[np.ndarray, np.ndarray]] | None = None
    # Every row, labelled ones first, labels hidden: views the labelled and unlabelled sets share
    # (frozen inputs: tasks/training/inputs.py), so pretraining needs no copy of them. None: build
    # it by concatenating.
    everything: FeatureSet | None = None
    # The CV fold of each labelled row, assigned once per run (with_folds); None: not yet.
    folds: np.ndarray | None = None


def with_folds(data: TrainingData, n_splits: int, seed: int) -> TrainingData:
    """`data` with its folds assigned over exactly its labelled rows (models/folds.py)."""
    from models.folds import assign_folds

    return dataclasses.replace(data, folds=assign_folds(data.labelled.labels, n_splits, seed))


def zscore(
    features: dict[str, np.ndarray],
    present: dict[str, np.ndarray],
    order: Mapping[str, np.ndarray] | None = None,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Z-score each modality's columns in place with the mean/std of its present rows; returns
    the stats (float32 mean, std), which apply_zscore applies to other videos. `order`: per
    modality, the present rows in the order they are summed (default: matrix order).

    Label-free (every video, labelled or not), so no label leaks into validation folds.
    Extractor outputs differ wildly in scale (a random tiny HuBERT's per-dimension spread is
    ~0.01, CLIP's ~1): without this, small-spread modalities barely move the networks.
    """
    stats = {}
    for m, x in features.items():
        rows = np.flatnonzero(present[m]) if order is None else order[m]
        mean, std = column_stats(x, rows)
        stats[m] = (mean, np.where(std > 1e-8, std, 1.0).astype(np.float32))
    apply_zscore(features, present, stats)
    return stats


def column_stats(x: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 mean and std of the rows `rows` of `x` (zeros and ones for fewer than one and
    two rows), bit for bit numpy's x[rows].mean(0) and .std(0): the rows are summed one after
    the other in `rows`' order, block by block, so no temporary is larger than a block (numpy's
    std makes a copy of the whole matrix, 2.4 GB for MER2024's text features)."""
    d = x.shape[1]
    if len(rows) == 0:
        return np.zeros(d, np.float32), np.ones(d, np.float32)

    def sequential_sum(blocks: Iterator[np.ndarray]) -> np.ndarray:
        total = None
        for b in blocks:  # continuing from the running total: the order of one long sum
            total = np.add.reduce(b if total is None else np.concatenate([total[None], b]), 0)
        return total

    def blocks(transform: Callable[[np.ndarray], np.ndarray]) -> Iterator[np.ndarray]:
        for lo in range(0, len(rows), _BLOCK):
            yield transform(x[rows[lo : lo + _BLOCK]].astype(np.float32, copy=False))

    mean = sequential_sum(blocks(lambda b: b))
    mean = np.true_divide(mean, len(rows), out=mean, casting="unsafe")
    if len(rows) == 1:
        return mean, np.ones(d, np.float32)

    def squared(b: np.ndarray) -> np.ndarray:
        b = b - mean
        return np.multiply(b, b, out=b)

    var = sequential_sum(blocks(squared))
    return mean, np.sqrt(np.true_divide(var, len(rows), out=var, casting="unsafe"))


def apply_zscore(
    features: Mapping[str, np.ndarray],
    present: Mapping[str, np.ndarray],
    stats: Mapping[str, tuple[np.ndarray, np.ndarray]],
) -> None:
    """(x - mean) / std in place on each modality of `stats` (what zscore returned, or a run's
    normalizer.npz), on its present rows; absent rows become 0."""
    for m, (mean, std) in stats.items():
        x, p = features[m], present[m]
        if bool(p.all()):  # in place: the same float operations as (x - mean) / std, no copy
            x -= mean
            x /= std
            continue
        for lo in range(0, len(x), _BLOCK):  # block by block: no copy of the present rows
            xb, pb = x[lo : lo + _BLOCK], p[lo : lo + _BLOCK]
            xb[pb] = (xb[pb] - mean) / std
            xb[~pb] = 0.0


def quality_kept(
    store: Store, plan: Plan, ts: TrainSettings, *sets: FeatureSet
) -> list[FeatureSet]:
    """Each of `sets` with the run's quality filters (train.quality_min_*) applied: a modality of
    a video that fails them is masked (present False); rows and features stay. Unchanged when
    the run has none. The signals come from the plan's faces, audio and transcript tables;
    videos outside the manifest have none and keep every modality."""
    thresholds = quality_thresholds(ts)
    if all(v is None for v in thresholds.values()) or not any(len(fs) for fs in sets):
        return list(sets)
    signals = quality_signals(store, plan.faces.extractor_id, plan.audio_id, plan.transcripts_id)
    kept = []
    for fs in sets:
        keep = quality_mask(store, fs.video_ids, signals=signals, **thresholds)
        present = {m: fs.present[m] & keep[m] for m in MODALITIES}
        kept.append(FeatureSet(fs.video_ids, fs.features, present, fs.labels))
    return kept


_BLOCK = 8192  # rows copied at a time from a store's matrix into the training matrix


def training_videos(store: Store, feature_tables: dict[str, TableRef]) -> pd.DataFrame:
    """The videos a run trains on, sorted by id (video_id, sha256): the manifest's current
    bytes, then the feature-only ids of `feature_tables` the manifest lacks (sha256 NO_VIDEO).
    The rule is current_videos' (tasks/stores/quality.py), which check, inspect and the folds
    share."""
    return current_videos(store, feature_tables.values())[["video_id", "sha256"]]


@arrow_system_memory()  # the tables are read part by part: nothing kept once read
def load_training_data(
    store: Store, feature_tables: dict[str, TableRef], zscored: bool = True
) -> TrainingData:
    """Join every modality's features onto the training videos (training_videos: video_id +
    sha256), each modality z-scored (zscore) unless `zscored` is False.

    A feature row of an older version of a video (another sha256) is not used; a modality
    without a row is masked (present=False), never zero-filled silently.
    """
    started = time.perf_counter()
    videos = training_videos(store, feature_tables)
    if videos.empty:
        raise BadInputError(
            f"no video to train on under {store.root}: the manifest is empty and the feature "
            f"tables {', '.join(t.name for t in feature_tables.values())} hold no feature-only "
            f"rows; run `merflow extract` (or `merflow scan`) on the corpus first, or, with "
            f"features and no videos, `merflow import-features MODALITY NAME SOURCE "
            f"--without-videos` and train.feature_tables naming the imported tables"
        )
    position = {
        (v, s): i for i, (v, s) in enumerate(zip(videos.video_id, videos.sha256, strict=True))
    }
    n = len(videos)
    # Which videos have each modality, from the key columns alone; then the rows in their
    # final order (labelled first, each part in video order), so the matrices are filled once
    # in place and the labelled and unlabelled sets are views of them, not copies.
    had: dict[str, np.ndarray] = {}
    for m in MODALITIES:
        keys = store.read(feature_tables[m], columns=["video_id", "sha256"])
        had[m] = np.zeros(n, dtype=bool)
        found = [position.get(k) for k in zip(keys.video_id, keys.sha256, strict=True)]
        had[m][[i for i in found if i is not None]] = True
    labels_df = store.read(tables.LABELS)
    label_of = dict(zip(labels_df.video_id, labels_df.label, strict=True))
    labels = np.array(
        [CLASS_INDEX[label_of[v]] if v in label_of else UNLABELLED for v in videos.video_id],
        dtype=np.int64,
    )
    _say_unknown_labels(set(label_of) - set(videos.video_id), store)
    anything = np.stack([had[m] for m in MODALITIES]).any(axis=0)
    dropped = videos.video_id[~anything].tolist()
    keep = np.flatnonzero(anything)
    lab = labels[keep] != UNLABELLED
    if not lab.any():
        raise BadInputError(
            f"no video under {store.root} (of the manifest, or imported without videos) has "
            f"both features and a label; check the label CSV's names against the video file "
            f"stems (or the imported ids)"
        )
    order = np.concatenate([keep[lab], keep[~lab]])  # video positions in final row order
    row_of = np.full(n, -1, dtype=np.int64)
    row_of[order] = np.arange(len(order))
    features, present, ext_ids, sums = {}, {}, {}, {}
    for m in MODALITIES:
        table = feature_tables[m]
        x = np.zeros((len(order), dict(table.contract.vector_dims)["embedding"]), np.float32)
        # Part file by part file: memory holds the training matrix and one part, never a
        # second copy of the table (at MER2024 size the text table alone is 2.4 GB).
        for keys, mat in store.vector_parts(table):
            found = [position.get(k) for k in zip(keys.video_id, keys.sha256, strict=True)]
            src = np.flatnonzero(np.array([i is not None for i in found], dtype=bool))
            dst = row_of[np.array([i for i in found if i is not None], dtype=np.int64)]
            for lo in range(0, len(dst), _BLOCK):  # block by block: no temporary of the part
                x[dst[lo : lo + _BLOCK]] = mat[src[lo : lo + _BLOCK]]
            del keys, mat
        features[m], present[m] = x, had[m][order]
        # The z-score sums a modality's rows in video order, whatever the row order.
        sums[m] = row_of[np.flatnonzero(had[m])]
        ext_ids[m] = table.name.rsplit("/", 1)[-1]
    stats = zscore(features, present, sums) if zscored else None
    ids = videos.video_id.to_numpy()[order]
    missing = {m: int((~present[m]).sum()) for m in MODALITIES}
    n_lab = int(lab.sum())
    labelled, unlabelled = (
        FeatureSet(
            video_ids=ids[part],
            features={m: x[part] for m, x in features.items()},
            present={m: p[part] for m, p in present.items()},
            labels=labels[order][part],
        )
        for part in (slice(0, n_lab), slice(n_lab, None))
    )
    data = TrainingData(
        labelled=labelled,
        unlabelled=unlabelled,
        dropped=dropped,
        missing=missing,
        extractor_ids=ext_ids,
        load_seconds=time.perf_counter() - started,
        stats=stats,
    )
    log.info(
        "training data: %d labelled, %d unlabelled (%d of all feature-only, without a video "
        "file), %d without any modality; missing %s (%.2f s)",
        len(data.labelled),
        len(data.unlabelled),
        int((videos.sha256.to_numpy()[keep] == NO_VIDEO).sum()),
        len(dropped),
        missing,
        data.load_seconds,
    )
    return data


def _say_unknown_labels(ids: set[str], store: Store) -> None:
    """Warn of labelled videos that are not training videos: neither in the manifest nor
    imported without videos into a chosen table."""
    if not ids:
        return
    shown = sorted(ids)
    log.warning(
        "%d labelled videos under %s are not trained on: the manifest lacks them and no chosen "
        "feature table holds them feature-only (`merflow scan VIDEO_DIR` adds their videos; "
        "`merflow import-features ... --without-videos` their features alone): %s",
        len(shown),
        store.root,
        ", ".join(shown[:10]) + (f" (+{len(shown) - 10} more)" if len(shown) > 10 else ""),
    )


def without_empty(data: FeatureSet) -> tuple[FeatureSet, list[str]]:
    """`data` without the videos that have no modality left (e.g. after quality_kept), and the
    ids of those videos."""
    anything = np.stack([data.present[m] for m in MODALITIES]).any(axis=0)
    return data.subset(np.flatnonzero(anything)), data.video_ids[~anything].tolist()
