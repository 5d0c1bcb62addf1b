"""A training run's inputs, frozen once in the run folder: every step of the run (pretraining,
each fold, the report), in the flow's process or in torchrun ranks, reads them and nothing else.

Without it every rank of every step reads the feature stores again, joins them onto the
manifest and standardises them: at MER2024 size (115,595 videos, 6,912 floats each) that is
about a minute and 3.2 GB of private memory per rank per step. The train flow has the inputs in
memory already; it writes them here as plain .npy files, and each rank maps them (copy on write),
so the ranks on one machine share one copy in the page cache and start in well under a second.

The inputs are also exactly what the flow computed the run key from: a step never trains on
stores that changed after the run started (a scheduled re-extraction may grow them meanwhile).

    run_dir/inputs/meta.json      key, data fingerprint, row counts, what was left out
    run_dir/inputs/video_ids.npy, labels.npy, <modality>.npy, <modality>.present.npy
                                  every row, the labelled ones first
    run_dir/inputs/folds.npy      the CV fold of each labelled row

The labelled and unlabelled sets are views of one mapping, and so is the all-rows set that
pretraining reads: a rank holds no private copy of the features until it takes a subset.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from data_contracts.labels import MODALITIES
from models.featureset import UNLABELLED, FeatureSet
from tasks.engine.errors import MerflowError
from tasks.training.data import TrainingData

INPUTS = "inputs"
META = "meta.json"
FORMAT = 2  # 2: folds.npy


class TrainingInputsError(MerflowError):
    """A run's frozen inputs are missing or belong to another run."""


def inputs_key(folder: Path) -> str | None:
    """The run key of the inputs under `folder`, or None when there are none (or half-written)."""
    try:
        meta = json.loads((folder / META).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return meta.get("key") if meta.get("format") == FORMAT else None


def save_inputs(folder: Path, data: TrainingData, key: str, fingerprint: str) -> Path:
    """Write `data` under `folder` (skipped when it holds this run's inputs already).

    Written beside the target and renamed into place, meta.json last, so a killed write never
    leaves inputs that look complete.
    """
    if inputs_key(folder) == key:
        return folder
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    try:
        _write(tmp, data, key, fingerprint)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        parts = (data.labelled, data.unlabelled)
        size = sum(x.nbytes for fs in parts for x in fs.features.values())
        raise TrainingInputsError(
            f"cannot write the training inputs ({size / 2**20:.0f} MiB) under {folder}: "
            f"{e.strerror or e}; free space on that disk, then rerun `merflow train`: finished "
            "steps are kept and skipped"
        ) from e
    return folder


def _write(tmp: Path, data: TrainingData, key: str, fingerprint: str) -> None:
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    parts = [data.labelled, data.unlabelled]
    ids = np.concatenate([fs.video_ids for fs in parts]).astype(str)  # unicode, no pickle
    np.save(tmp / "video_ids.npy", ids)
    np.save(tmp / "labels.npy", np.concatenate([fs.labels for fs in parts]))
    if data.folds is None:
        raise ValueError("the training inputs need their folds: tasks.training.data.with_folds")
    np.save(tmp / "folds.npy", np.asarray(data.folds, dtype=np.int64))
    for m in MODALITIES:
        np.save(tmp / f"{m}.present.npy", np.concatenate([fs.present[m] for fs in parts]))
        # Filled part by part: no second in-memory copy of a 2.4 GB matrix.
        d = parts[0].features[m].shape[1]
        out = np.lib.format.open_memmap(tmp / f"{m}.npy", "w+", np.float32, (len(ids), d))
        out[: len(parts[0])] = parts[0].features[m]
        out[len(parts[0]) :] = parts[1].features[m]
        out.flush()
        del out
    if data.stats is not None:
        arrays = {f"{m}.mean": mean for m, (mean, _) in data.stats.items()}
        arrays |= {f"{m}.std": std for m, (_, std) in data.stats.items()}
        np.savez(tmp / "stats.npz", **arrays)
    meta = {
        "format": FORMAT,
        "key": key,
        "fingerprint": fingerprint,
        "rows": {"labelled": len(data.labelled), "unlabelled": len(data.unlabelled)},
        "dropped": list(data.dropped),
        "missing": dict(data.missing),
        "extractor_ids": dict(data.extractor_ids),
    }
    (tmp / META).write_text(json.dumps(meta, indent=2, sort_keys=True))


def load_inputs(folder: Path, key: str) -> tuple[TrainingData, str]:
    """The inputs under `folder`, memory-mapped, and their data fingerprint; they must be run
    `key`'s. Arrays are mapped copy-on-write: shared between processes until one writes."""
    found = inputs_key(folder)
    if found is None:
        raise TrainingInputsError(
            f"no training inputs under {folder}; the train flow writes them before it starts a "
            "step on several processes. On a multi-node run the run folder must be on storage "
            "every machine sees (NFS, a shared volume); otherwise rerun `merflow train`"
        )
    if found != key:
        raise TrainingInputsError(
            f"the training inputs under {folder} belong to run {found}, not {key}; delete the "
            "folder and rerun `merflow train`"
        )
    meta = json.loads((folder / META).read_text())

    def load(name: str) -> np.ndarray:
        return np.load(folder / f"{name}.npy", mmap_mode="c", allow_pickle=False)

    ids = np.load(folder / "video_ids.npy", allow_pickle=False)
    labels = load("labels")
    features = {m: load(m) for m in MODALITIES}
    present = {m: load(f"{m}.present") for m in MODALITIES}

    def rows(part: slice, labels: np.ndarray = labels) -> FeatureSet:
        return FeatureSet(
            video_ids=ids[part],
            features={m: x[part] for m, x in features.items()},
            present={m: p[part] for m, p in present.items()},
            labels=labels[part],
        )

    n = meta["rows"]["labelled"]
    stats = None
    if (folder / "stats.npz").is_file():
        with np.load(folder / "stats.npz", allow_pickle=False) as z:
            stats = {m: (z[f"{m}.mean"], z[f"{m}.std"]) for m in MODALITIES if f"{m}.mean" in z}
    data = TrainingData(
        labelled=rows(slice(0, n)),
        unlabelled=rows(slice(n, None)),
        dropped=meta["dropped"],
        missing=meta["missing"],
        extractor_ids=meta["extractor_ids"],
        stats=stats,
        everything=rows(slice(None), np.full(len(ids), UNLABELLED, np.int64)),
        folds=np.load(folder / "folds.npy", allow_pickle=False),
    )
    return data, meta["fingerprint"]
