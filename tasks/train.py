"""The steps of a training run over its frozen inputs: freeze, pretrain, fold k, and the report
(tasks/train_report.py). Each writes its outputs under the run folder and is skipped when they
are already there, so a killed run resumes from the last finished step. The train flow, the
torchrun worker, the tests and benchmarks/train_synthetic.py all run these same functions.

A step reads the run's frozen inputs and checks their run key against its own settings: it
never reads the stores, so a store that grows during the run changes nothing in it."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from data_contracts import tables
from data_contracts.atomic import atomic_path
from data_contracts.contracts import FEATURES_VERSION
from data_contracts.labels import MODALITIES
from data_contracts.store import Store
from data_contracts.tables import TableRef
from models.checkpoint import load_checkpoint, save_checkpoint
from models.distributed import barrier, world
from models.recipe import (
    FoldOutcome,
    RecipeConfig,
    pretrain_start,
    recipe_from_settings,
    train_fold,
)
from models.settings import LAUNCH_SETTINGS, TrainSettings
from tasks.folds import run_assignment, save_folds
from tasks.train_data import TrainingData
from tasks.train_inputs import INPUTS, TrainingInputsError, load_inputs, save_inputs

log = logging.getLogger(__name__)

DONE = "done.json"


def data_fingerprint(store: Store, feature_tables: dict[str, TableRef]) -> str:
    """Hash of what training reads: manifest, labels and feature keys (extractor ids included)."""
    h = hashlib.sha256()
    for table in (tables.MANIFEST, tables.LABELS, *feature_tables.values()):
        cols = [c for c in (*table.key, "sha256", "label") if c in table.contract.columns]
        df = store.read(table, columns=list(dict.fromkeys(cols)))
        h.update(table.name.encode())
        h.update(df.sort_values(list(table.key)).to_csv(index=False).encode())
    return h.hexdigest()[:16]


def run_key(fingerprint: str, ts: TrainSettings, recipe: RecipeConfig) -> str:
    """A training run's identity: its data and every setting of its recipe. Standardisation and
    quality filters change the inputs, so every train setting is part of it; how many
    processes train is not (LAUNCH_SETTINGS)."""
    text = json.dumps(
        {
            "data": fingerprint,
            "settings": ts.model_dump(mode="json", exclude=set(LAUNCH_SETTINGS)),
            "recipe": asdict(recipe),
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def freeze_run(
    run_dir: Path,
    data: TrainingData,
    key: str,
    fingerprint: str,
    recipe: RecipeConfig,
    store: Store | None = None,
) -> TrainingData:
    """Freeze a run's inputs once: assign its folds over exactly its labelled rows, write the
    inputs (tasks/train_inputs.py) and the folds (tasks/folds.py; beside the stores too when a
    store is given), and return the inputs as every step will read them (mapped)."""
    ids = data.labelled.video_ids
    folds = run_assignment(ids, data.labelled.labels, recipe.n_splits, recipe.train.seed, key)
    data = dataclasses.replace(data, folds=np.array([folds.folds[v] for v in ids], np.int64))
    save_inputs(run_dir / INPUTS, data, key, fingerprint)
    save_folds(folds, run_dir, store)
    if data.stats:  # what a checkpoint's inputs were standardised with, to apply it elsewhere
        save_normalizer(data.stats, run_dir / "normalizer.npz")
    frozen, _ = load_inputs(run_dir / INPUTS, key)
    return frozen


def step_inputs(run_dir: Path, key: str, ts: TrainSettings) -> tuple[TrainingData, RecipeConfig]:
    """What a step trains on: the run's frozen inputs, and the recipe of `ts`; refused when the
    key they give with `ts` is not `key` (other settings than the run's, or other inputs)."""
    data, fingerprint = load_inputs(run_dir / INPUTS, key)
    recipe = recipe_from_settings(ts, data.labelled.dims)
    found = run_key(fingerprint, ts, recipe)
    if found != key:
        raise TrainingInputsError(
            f"run key {found} differs from the run's {key}: this process was given other "
            "settings than the run it joins (or another machine's inputs); start the train flow "
            "again with the settings you want"
        )
    return data, recipe


def _done(folder: Path) -> dict | None:
    path = folder / DONE
    return json.loads(path.read_text()) if path.is_file() else None


def _mark_done(folder: Path, info: dict) -> None:
    with atomic_path(folder / DONE) as tmp:
        tmp.write_text(json.dumps(info, indent=2, sort_keys=True, default=float))


def pretrain_step(run_dir: Path, data: TrainingData, recipe: RecipeConfig) -> Path:
    """MR-CCL contrastive pretraining on all videos; writes run_dir/pretrain/ (or skips)."""
    folder = run_dir / "pretrain"
    if _done(folder) is not None:
        log.info("pretraining already done in %s", folder)
        return folder
    w = world()  # under torchrun every rank trains; rank 0 alone writes
    model, history = pretrain_start(data.labelled, data.unlabelled, recipe, data.everything)
    if w.main:
        save_checkpoint(model, folder, data.extractor_ids, FEATURES_VERSION, {"history": history})
        _mark_done(folder, {"epochs": len(history), "history": history, "world_size": w.size})
    barrier(w)
    return folder


def fold_step(k: int, run_dir: Path, data: TrainingData, recipe: RecipeConfig) -> Path:
    """One CV fold: step 1, baseline, pseudo labels, step 2; writes run_dir/fold-k/ (or skips)."""
    folder = run_dir / f"fold-{k}"
    if _done(folder) is not None:
        log.info("fold %d already done in %s", k, folder)
        return folder
    if data.folds is None:
        raise ValueError("fold_step needs the run's folds: freeze the inputs first (freeze_run)")
    w = world()  # under torchrun every rank trains; rank 0 alone writes
    start = load_checkpoint(run_dir / "pretrain").model.state_dict()
    outcome = train_fold(
        k, data.labelled, data.unlabelled, data.unlabelled, recipe, start, data.folds
    )
    if w.main:
        _save_fold(folder, outcome, data)
    barrier(w)
    return folder


def _save_fold(folder: Path, outcome: FoldOutcome, data: TrainingData) -> None:
    save_checkpoint(outcome.model, folder / "model", data.extractor_ids, FEATURES_VERSION)
    arrays = {f"val_{c}": p for c, p in outcome.val_probs.items()}
    arrays |= {f"test_{c}": p for c, p in outcome.test_probs.items()}
    arrays |= {
        "val_index": outcome.val_index,
        "pseudo_index": outcome.pseudo.indices,
        "pseudo_label": outcome.pseudo.labels,
        "pseudo_confidence": outcome.pseudo.confidences,
        "stop_index": outcome.stop_index,
    }
    with atomic_path(folder / "outputs.npz") as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)
    _mark_done(folder, {**outcome.summary(), "world_size": world().size})


def train_in_process(
    run_dir: Path,
    data: TrainingData,
    recipe: RecipeConfig,
    key: str = "local",
    store: Store | None = None,
    settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A whole run in this process on in-memory inputs: freeze, every step in order, the report
    (tests and benchmarks; the train flow runs the same steps as Prefect tasks). Returns the
    report."""
    from tasks.train_report import build_report  # the report reads this module's fold outputs

    frozen = freeze_run(run_dir, data, key, key, recipe, store)
    for step in step_names(recipe.n_splits):
        run_step(step, run_dir, frozen, recipe)
    return build_report(run_dir, key, frozen, recipe.n_splits, store, settings or {})


def step_names(n_splits: int) -> list[str]:
    """The training steps of a run, in the order they run (the names of its folders)."""
    return ["pretrain", *(f"fold-{k}" for k in range(n_splits))]


def run_step(step: str, run_dir: Path, data: TrainingData, recipe: RecipeConfig) -> Path:
    """A training step by name: 'pretrain' or 'fold-K' (the names of the run's folders)."""
    if step == "pretrain":
        return pretrain_step(run_dir, data, recipe)
    if step.startswith("fold-") and step[5:].isdigit():
        return fold_step(int(step[5:]), run_dir, data, recipe)
    raise ValueError(f"unknown training step {step!r}; valid: pretrain, fold-K")


def load_fold(folder: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """A finished fold's summary and arrays."""
    with np.load(folder / "outputs.npz", allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    return _done(folder) or {}, arrays


def save_normalizer(stats: dict[str, tuple[np.ndarray, np.ndarray]], path: Path) -> Path:
    """Per-modality mean and std the run's inputs were standardised with."""
    arrays = {
        f"{m}_{k}": v for m, (mean, std) in stats.items() for k, v in (("mean", mean), ("std", std))
    }
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
    return path


def load_normalizer(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """What save_normalizer wrote: per modality (mean, std)."""
    with np.load(path, allow_pickle=False) as z:
        return {m: (z[f"{m}_mean"], z[f"{m}_std"]) for m in MODALITIES if f"{m}_mean" in z.files}
