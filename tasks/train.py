"""Training steps of the train flow: each writes its outputs under the run folder and is skipped
when they are already there, so a killed run resumes from the last finished step."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_contracts import tables
from data_contracts.atomic import atomic_path
from data_contracts.contracts import FEATURES_VERSION
from data_contracts.labels import CLASSES, CLASSIFIERS
from data_contracts.store import Store
from data_contracts.tables import TableRef
from flows.config import TrainSettings
from models.baseline import BaselineConfig
from models.checkpoint import load_checkpoint, save_checkpoint
from models.distributed import barrier, world
from models.mrccl import MRCCLConfig
from models.training import FoldOutcome, RecipeConfig, TrainConfig, pretrain_start, train_fold
from tasks.train_data import TrainingData, load_training_data

log = logging.getLogger(__name__)

DONE = "done.json"


def recipe_from_settings(ts: TrainSettings, dims: dict[str, int]) -> RecipeConfig:
    """The training engine's recipe from the typed train settings and the feature dims."""
    device = ts.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    weights = dict(zip(CLASSIFIERS, ts.vote_weights, strict=True))
    return RecipeConfig(
        train=TrainConfig(
            lr=ts.lr,
            batch_size=ts.batch_size,
            max_epochs=ts.max_epochs,
            patience=ts.patience,
            lambda_con=ts.lambda_con,
            seed=ts.seed,
            device=device,
        ),
        model=MRCCLConfig(
            dims=dict(dims),
            n_tokens=ts.n_tokens,
            hidden=ts.hidden,
            n_layers=ts.n_layers,
            n_heads=ts.n_heads,
            dropout=ts.dropout,
            use_nee=ts.use_nee,
            nee_schedule=ts.nee_schedule,
            voting_weights=weights,
        ),
        baseline=BaselineConfig(dims=dict(dims), hidden=ts.hidden),
        n_splits=ts.n_splits,
        use_pretraining=ts.use_pretraining,
        pretrain_epochs=ts.pretrain_epochs,
        final_epochs=ts.final_epochs,
        lr_step2=ts.lr_step2,
        use_pseudo_labels=ts.use_pseudo_labels,
        use_oversampling=ts.use_oversampling,
        oversample_step1=dict(ts.oversample_step1),
        oversample_step2=dict(ts.oversample_step2),
        thresholds=dict(ts.thresholds),
        preferred={c: "baseline" if c in ts.preferred_baseline else "mrccl" for c in CLASSES},
        keep_models=False,
    )


def data_fingerprint(store: Store, feature_tables: dict[str, TableRef]) -> str:
    """Hash of what training reads: manifest, labels and feature keys (extractor ids included)."""
    h = hashlib.sha256()
    for table in (tables.MANIFEST, tables.LABELS, *feature_tables.values()):
        cols = [c for c in (*table.key, "sha256", "label") if c in table.contract.columns]
        df = store.read(table, columns=list(dict.fromkeys(cols)))
        h.update(table.name.encode())
        h.update(df.sort_values(list(table.key)).to_csv(index=False).encode())
    return h.hexdigest()[:16]


def run_key(fingerprint: str, recipe: RecipeConfig) -> str:
    """The identity of a training run: its data and every recipe setting."""
    text = json.dumps({"data": fingerprint, "recipe": asdict(recipe)}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@lru_cache(maxsize=2)
def _cached_data(
    root: str, names: tuple[tuple[str, str, int], ...], fingerprint: str, standardized: bool
) -> TrainingData:
    # Steps of one run in one process load the stores once (fingerprint in the key).
    refs = {m: tables.features(m, ext, dim) for m, ext, dim in names}
    return load_training_data(Store(root), refs, standardized)


def training_data(
    store: Store, feature_tables: dict[str, TableRef], fingerprint: str, standardized: bool = True
) -> TrainingData:
    """The labelled and unlabelled sets (cached per process and data fingerprint)."""
    names = tuple(
        (m, t.name.rsplit("/", 1)[-1], dict(t.contract.vector_dims)["embedding"])
        for m, t in sorted(feature_tables.items())
    )
    return _cached_data(str(store.root), names, fingerprint, standardized)


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
    w = world()  # under torchrun every rank trains; rank 0 alone writes
    start = load_checkpoint(run_dir / "pretrain").model.state_dict()
    outcome = train_fold(k, data.labelled, data.unlabelled, data.unlabelled, recipe, start)
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
    }
    with atomic_path(folder / "outputs.npz") as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)
    _mark_done(folder, {**outcome.summary(), "world_size": world().size})


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
