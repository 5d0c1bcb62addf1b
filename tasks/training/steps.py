"""The steps of a training run over its frozen inputs: freeze, then run_step for pretraining and
each fold k; the report follows (tasks/training/report.py). Each step writes its outputs under
the run folder and is skipped when they are already there, so a killed run resumes from the
last finished step; runs that would pretrain the same model share one pretraining
(pretrain_step). The train flow, the torchrun worker, the tests and the benchmarks all run these
same functions (tasks/training/report.py train_in_process: a whole run in one process).

A step reads the run's frozen inputs and checks their run key against its own settings: it
never reads the stores, so a store that grows during the run changes nothing in it."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator
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
from models.distributed import World, barrier, gather_rows, world
from models.recipe import (
    RECIPE_VERSION,
    FoldOutcome,
    RecipeConfig,
    pretrain_start,
    recipe_from_settings,
    train_fold,
)
from models.settings import LAUNCH_SETTINGS, TrainSettings
from tasks.training.data import TrainingData
from tasks.training.folds import run_assignment, save_folds
from tasks.training.inputs import INPUTS, TrainingInputsError, load_inputs, save_inputs

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
    """A training run's identity: its data, the recipe's version (RECIPE_VERSION) and every
    setting of its recipe. Standardisation and quality filters change the inputs, so every train
    setting is part of it; how many processes train is not (LAUNCH_SETTINGS)."""
    text = json.dumps(
        {
            "data": fingerprint,
            "recipe_version": RECIPE_VERSION,
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
    inputs (tasks/training/inputs.py) and the folds (tasks/training/folds.py; beside the stores too
    when a store is given), and return the inputs as every step will read them (mapped)."""
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


# The recipe's loop settings that pretraining reads (models/training.py pretrain and fit), and
# the device; the fine-tuning ones (max_epochs, lambda_con) it does not. Its epochs, held-out
# share and patience are the recipe's (pretrain_key).
_PRETRAIN_LOOP = ("lr", "batch_size", "weight_decay", "seed", "patience")
LOCK_POLL_S = 0.5  # how often a run waiting for another's pretraining looks again


def pretrain_key(data: TrainingData, recipe: RecipeConfig) -> str:
    """What MR-CCL pretraining computes from (models/recipe.py pretrain_start), hashed: every
    row's features and presence in training order, the network's whole config (NEE included:
    its noisy view is L_intra), the loop settings it reads, its epochs and seed. Not the fold,
    pseudo-label or oversampling settings: runs that differ only there pretrain the same model.
    """
    h = hashlib.sha256()
    parts = [data.everything] if data.everything is not None else [data.labelled, data.unlabelled]
    head = {
        "rows": sum(len(fs) for fs in parts),
        "extractor_ids": dict(data.extractor_ids),
        "features_version": FEATURES_VERSION,
        # The whole config, not only what shapes the weights: the checkpoint saves it.
        "model": asdict(recipe.model),
        "loop": {n: getattr(recipe.train, n) for n in _PRETRAIN_LOOP}
        # The kind of device, not which one: the ranks of a torchrun step each have their own.
        | {"device": str(recipe.train.device).split(":")[0]},
        "epochs": recipe.pretrain_epochs,
        "held_out": recipe.inner_val_fraction,  # the rows that early-stop it
        "recipe_version": RECIPE_VERSION,
    }
    h.update(json.dumps(head, sort_keys=True, default=str).encode())
    for fs in parts:
        h.update("".join(f"{v}\0" for v in fs.video_ids.tolist()).encode())
    for m in MODALITIES:  # part after part: the same bytes as the concatenated rows
        for fs in parts:
            x = np.ascontiguousarray(fs.features[m])
            h.update(f"{m}:{x.dtype}:{x.shape[1:]}".encode())
            h.update(x)
            h.update(np.ascontiguousarray(fs.present[m], dtype=bool))
    return h.hexdigest()[:16]


def shared_pretraining_dir(run_dir: Path) -> Path | None:
    """Where the pretrainings a run may share live: beside the train flow's runs (runs/, whose
    run folders are train-<key>); None for a run folder elsewhere (tests, benchmarks), which
    trains its own."""
    if run_dir.parent.name == "runs" and run_dir.name.startswith("train-"):
        return run_dir.parent
    return None


def pretrain_step(run_dir: Path, data: TrainingData, recipe: RecipeConfig) -> Path:
    """MR-CCL contrastive pretraining on all videos; writes run_dir/pretrain/ (or skips).

    A train flow's run shares it: the first run that needs a pretraining key (pretrain_key)
    trains it into runs/pretrain-<key>/ while holding that key's lock, and every run of the key
    (the ablations that keep pretraining, other seeds of the fold recipe) links it into its own
    folder. Without pretraining there is nothing to share (a fresh initialisation)."""
    folder = run_dir / "pretrain"
    if _done(folder) is not None:
        log.info("pretraining already done in %s", folder)
        return folder
    shared_root = shared_pretraining_dir(run_dir)
    if not recipe.use_pretraining or shared_root is None:
        _pretrain_into(folder, data, recipe, {})
        return folder
    key = pretrain_key(data, recipe)
    shared = shared_root / f"pretrain-{key}"
    w = world()
    shared_root.mkdir(parents=True, exist_ok=True)
    with _held(shared_root / f".pretrain-{key}.lock", w):
        # Rank 0 holds the key's lock, and only a holder publishes: every rank sees one answer.
        if _done(shared) is None:
            _pretrain_into(shared, data, recipe, {"trained_for": run_dir.name}, publish=True)
        else:
            log.info("pretraining %s reused from %s", key, shared)
        if w.main:
            _link_tree(shared, folder, {"pretrain_key": key, "shared": shared.name})
        barrier(w)
    return folder


def _pretrain_into(
    folder: Path, data: TrainingData, recipe: RecipeConfig, info: dict, publish: bool = False
) -> None:
    """Pretrain (every rank) and write the checkpoint and done.json into `folder` (rank 0).
    publish: written beside it and renamed into place, so `folder` is whole or absent."""
    w = world()  # under torchrun every rank trains; rank 0 alone writes
    model, history = pretrain_start(data.labelled, data.unlabelled, recipe, data.everything)
    if w.main:
        out = folder.with_name(f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}") if publish else folder
        save_checkpoint(model, out, data.extractor_ids, FEATURES_VERSION, {"history": history})
        done = {"epochs": len(history), "history": history, "world_size": w.size, **info}
        _mark_done(out, done)
        if publish:
            shutil.rmtree(folder, ignore_errors=True)  # a folder without done.json: not whole
            try:
                os.rename(out, folder)
            except OSError:  # published meanwhile by a run whose lock did not hold (NFS)
                shutil.rmtree(out, ignore_errors=True)
    barrier(w)


def _link_tree(src: Path, dst: Path, info: dict) -> None:
    """`src`'s files hard-linked (copied across file systems) into `dst`, done.json written anew
    with `info` added; built beside `dst` and renamed into place."""
    tmp = dst.with_name(f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}")

    def link(s: str, d: str) -> None:
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    shutil.copytree(src, tmp, copy_function=link, ignore=shutil.ignore_patterns(DONE, ".*"))
    _mark_done(tmp, {**(_done(src) or {}), **info})
    shutil.rmtree(dst, ignore_errors=True)  # what a killed step left
    os.rename(tmp, dst)


@contextlib.contextmanager
def _held(path: Path, w: World) -> Iterator[None]:
    """Inside, rank 0 holds an exclusive lock on `path` (released when its process dies too).
    The ranks wait for it together by polling in short collectives, never in one that could
    outlast the process group's timeout; a world of one just polls."""
    fd = os.open(path, os.O_CREAT | os.O_RDWR) if w.main else None
    try:
        while True:
            got = fd is not None and _try_lock(fd)
            if w.distributed:  # every rank learns rank 0's answer
                got = bool(gather_rows(np.array([int(got)]), [1] * w.size, w)[0])
            if got:
                break
            time.sleep(LOCK_POLL_S)
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


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
    arrays |= {f"val_{name}": p for name, p in outcome.baseline_val_probs.items()}
    with atomic_path(folder / "outputs.npz") as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)
    _mark_done(folder, {**outcome.summary(), "world_size": world().size})


def step_names(n_splits: int) -> list[str]:
    """The training steps of a run, in the order they run (the names of its folders)."""
    return ["pretrain", *(f"fold-{k}" for k in range(n_splits))]


def run_step(step: str, run_dir: Path, data: TrainingData, recipe: RecipeConfig) -> Path:
    """A training step by name, into run_dir/<step>/ (skipped when done there): 'pretrain'
    (pretrain_step), or 'fold-K': step 1, baselines, pseudo labels and step 2 of fold K
    (models/recipe.py train_fold), from the pretrained checkpoint."""
    if step == "pretrain":
        return pretrain_step(run_dir, data, recipe)
    if not (step.startswith("fold-") and step[5:].isdigit()):
        raise ValueError(f"unknown training step {step!r}; valid: pretrain, fold-K")
    k, folder = int(step[5:]), run_dir / step
    if _done(folder) is not None:
        log.info("fold %d already done in %s", k, folder)
        return folder
    if data.folds is None:
        raise ValueError("a fold step needs the run's folds: freeze the inputs first (freeze_run)")
    w = world()  # under torchrun every rank trains; rank 0 alone writes
    start = load_checkpoint(run_dir / "pretrain").model.state_dict()
    outcome = train_fold(
        k, data.labelled, data.unlabelled, data.unlabelled, recipe, start, data.folds
    )
    if w.main:
        _save_fold(folder, outcome, data)
    barrier(w)
    return folder


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
