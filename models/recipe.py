"""The recipe of docs/method.md on in-memory features: the folds, the model every fold starts
from (MR-CCL pretrained on all videos), and one fold (step 1, baselines, pseudo labels, step 2).

Each function is one step of a run; tasks/training/steps.py runs them over a run's frozen inputs and
writes their outputs, for the flow, torchrun ranks, tests and benchmarks alike.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from data_contracts.labels import CLASSES, CLASSIFIERS, NUM_CLASSES
from models.baseline import BaselineConfig, BaselineNet
from models.epoch_reports import training_stage
from models.featureset import UNLABELLED, FeatureSet
from models.losses import baseline_loss, fine_tune_loss, pretrain_loss
from models.metrics import reference_wafs, waf
from models.mrccl import MRCCL, MRCCLConfig, config_from_dict
from models.selftrain import (
    DEFAULT_PREFERRED,
    DEFAULT_THRESHOLDS,
    STEP1_TARGETS,
    STEP2_TARGETS,
    PseudoLabels,
    random_oversample,
    select_pseudo_labels,
    targets_by_index,
)
from models.settings import TrainSettings, default
from models.training import FitResult, TrainConfig, fit, predict

log = logging.getLogger(__name__)

# Bumped when the same settings train differently (tasks/training/steps.py puts it in the run and
# pretraining keys, so runs of an older recipe are never reused). 2: the paper's Table 1 —
# the baseline without oversampling, step 2 without pseudo labels, early-stopped pretraining.
RECIPE_VERSION = 2


@dataclass
class RecipeConfig:
    """The whole recipe. Ablations are switches: `use_pretraining`, `model.use_nee`,
    `use_pseudo_labels` and `use_oversampling`."""

    train: TrainConfig = field(default_factory=TrainConfig)
    model: MRCCLConfig = field(default_factory=MRCCLConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    n_splits: int = default("n_splits")
    use_pretraining: bool = default("use_pretraining")
    pretrain_epochs: int = default("pretrain_epochs")
    final_epochs: int = default("final_epochs")
    lr_step2: float = default("lr_step2")
    inner_val_fraction: float = default("inner_val_fraction")
    # False: no baseline and no pseudo labels; step 2 still runs (lr_step2, step-2 targets).
    use_pseudo_labels: bool = default("use_pseudo_labels")
    use_oversampling: bool = default("use_oversampling")
    oversampled_baseline: bool = default("oversampled_baseline")  # a report row of merflow's
    oversample_step1: dict[str, int] = field(default_factory=lambda: dict(STEP1_TARGETS))
    oversample_step2: dict[str, int] = field(default_factory=lambda: dict(STEP2_TARGETS))
    thresholds: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_THRESHOLDS))
    preferred: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_PREFERRED))

    def __post_init__(self) -> None:
        if not 0 <= self.inner_val_fraction < 1:
            raise ValueError(f"inner_val_fraction must be in [0, 1); got {self.inner_val_fraction}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RecipeConfig:
        """Recipe from nested mappings (`train`, `model`, `baseline` are sub-mappings)."""
        data = dict(data)
        nested = {"train": TrainConfig, "model": MRCCLConfig, "baseline": BaselineConfig}
        subs = {k: config_from_dict(c, data.pop(k, {})) for k, c in nested.items()}
        return dataclasses.replace(config_from_dict(cls, data), **subs)


# ----------------------------------------------------------------------------- settings


def _from_settings(cls: type, ts: TrainSettings, **given: Any) -> Any:
    """`cls` with every field that has a train setting of the same name taken from `ts`."""
    names = {f.name for f in dataclasses.fields(cls)} & set(TrainSettings.model_fields) - set(given)
    return cls(**{n: copy.deepcopy(getattr(ts, n)) for n in names}, **given)


def recipe_from_settings(ts: TrainSettings, dims: Mapping[str, int]) -> RecipeConfig:
    """The recipe's dataclasses from the typed train settings and the feature dims."""
    device = ts.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    weights = dict(zip(CLASSIFIERS, ts.vote_weights, strict=True))
    return _from_settings(
        RecipeConfig,
        ts,
        train=_from_settings(TrainConfig, ts, device=device),
        model=_from_settings(MRCCLConfig, ts, dims=dict(dims), voting_weights=weights),
        # The baseline has its own dropout; its width follows MR-CCL's.
        baseline=BaselineConfig(dims=dict(dims), hidden=ts.hidden, dropout=ts.baseline_dropout),
        preferred={c: "baseline" if c in ts.preferred_baseline else "mrccl" for c in CLASSES},
    )


# ----------------------------------------------------------------------------- rows


def early_stopping_split(
    labels: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Rows to fit on and rows to choose the epoch on: `fraction` of each class (at least one
    row of a class that has two or more), drawn with `seed`. fraction 0: no early-stopping rows."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    stop: list[np.ndarray] = []
    if fraction > 0:
        for c in np.unique(labels):
            rows = np.flatnonzero(labels == c)
            n = min(len(rows) - 1, max(1, round(fraction * len(rows))))
            if n > 0:
                stop.append(rng.choice(rows, size=n, replace=False))
    held = np.sort(np.concatenate(stop)) if stop else np.zeros(0, dtype=np.int64)
    fit = np.setdiff1d(np.arange(len(labels)), held)
    return fit.astype(np.int64), held.astype(np.int64)


def _check_inputs(labelled: FeatureSet, unlabelled: FeatureSet | None, cfg: RecipeConfig) -> None:
    if (labelled.labels == UNLABELLED).any():
        raise ValueError(
            "the labelled set holds rows with label -1; move them to the unlabelled set"
        )
    if unlabelled is not None and (unlabelled.labels != UNLABELLED).any():
        raise ValueError("the unlabelled set holds labelled rows; set their labels to -1")
    for name, dims in (("model", cfg.model.dims), ("baseline", cfg.baseline.dims)):
        if dims != labelled.dims:
            raise ValueError(f"{name}.dims {dims} differ from the features' dims {labelled.dims}")
    counts = np.bincount(labelled.labels, minlength=NUM_CLASSES)
    if counts.max() < cfg.n_splits:
        raise ValueError(
            f"every class has fewer labelled rows than n_splits={cfg.n_splits}; lower n_splits"
        )
    # Classes thinner than n_splits are said once per run, where its folds are assigned
    # (tasks/training/folds.py), not by every step that checks its inputs.


def _oversampled(
    data: FeatureSet, targets: Mapping[str, int], cfg: RecipeConfig, seed: int
) -> FeatureSet:
    """`data` lifted to the targets, or unchanged when oversampling is off. A class with a
    target but no rows in `data` stays absent (tiny corpora: nothing to copy from)."""
    if not cfg.use_oversampling:
        return data
    held = set(np.unique(data.labels).tolist())
    wanted = {c: n for c, n in targets_by_index(targets).items() if c in held}
    idx = random_oversample(data.labels, wanted, np.random.default_rng(seed))
    return data.subset(idx)


def _warn_absent(k: int, train: FeatureSet, cfg: RecipeConfig) -> None:
    """Once per fold: classes with an oversampling target that the fold's fit rows lack."""
    if not cfg.use_oversampling:
        return
    targets = {**cfg.oversample_step1, **cfg.oversample_step2}
    absent = sorted(set(targets_by_index(targets)) - set(np.unique(train.labels).tolist()))
    if absent:
        names = [CLASSES[c] for c in absent]
        log.warning("fold %d: no training rows of %s, so none to oversample", k, names)


def stage_name(k: int, part: str) -> str:
    """The name of a stage of fold k (`step1`, `baseline`, `baseline_oversampled`, `step2`) in
    epoch reports."""
    return f"fold-{k} {part}"


def epoch_plan(cfg: RecipeConfig) -> dict[str, list[tuple[str, int]]]:
    """Each step of a run (`pretrain`, `fold-K`) with its stages and their most epochs, in the
    order they train: what progress is counted against (early stopping may end a stage
    sooner)."""
    plan = {"pretrain": [("pretrain", cfg.pretrain_epochs if cfg.use_pretraining else 0)]}
    for k in range(cfg.n_splits):
        parts = [("step1", cfg.final_epochs)]
        parts += [(b, cfg.train.max_epochs) for b in baselines(cfg)]
        parts += [("step2", cfg.final_epochs)]
        plan[f"fold-{k}"] = [(stage_name(k, part), epochs) for part, epochs in parts]
    return plan


def baselines(cfg: RecipeConfig) -> list[str]:
    """The baselines a fold trains: `baseline` (the paper's: labelled fit rows, no oversampling;
    its votes make the pseudo labels) with pseudo labels, and `baseline_oversampled` (the same
    on the step-1 oversampled rows, a report row of merflow's) when asked and oversampling is on
    (without it the two would be one model)."""
    if not cfg.use_pseudo_labels:
        return []
    extra = cfg.oversampled_baseline and cfg.use_oversampling
    return ["baseline", *(["baseline_oversampled"] if extra else [])]


def _fold_cfg(cfg: RecipeConfig, k: int, **changes: Any) -> TrainConfig:
    # A distinct, fixed seed per fold: same inputs + seed => same result.
    return dataclasses.replace(cfg.train, seed=cfg.train.seed + 1009 * (k + 1), **changes)


# ----------------------------------------------------------------------------- steps


def pretraining_held_out(n: int, fraction: float, seed: int) -> np.ndarray | None:
    """Rows of pretraining's n videos held out to early-stop it on their contrastive loss:
    `fraction` of them, drawn with `seed`; None when fraction is 0 or either side would hold
    fewer than two rows (a contrastive term compares rows)."""
    held = round(fraction * n)
    if held < 2 or n - held < 2:
        return None
    return np.sort(np.random.default_rng(seed).choice(n, size=held, replace=False))


def pretrain_start(
    labelled: FeatureSet,
    unlabelled: FeatureSet,
    cfg: RecipeConfig,
    everything: FeatureSet | None = None,
) -> tuple[MRCCL, list[dict[str, float]]]:
    """The model every fold starts from: MR-CCL contrastively pretrained on all videos
    (labelled ones with their labels hidden; at most pretrain_epochs, early-stopped on the
    contrastive loss of inner_val_fraction of the videos), or freshly initialised without
    pretraining.

    `everything`, when given, must be those rows (labelled first, labels hidden) already in one
    set, e.g. views of mapped arrays; otherwise the two sets are concatenated (a copy).
    """
    _check_inputs(labelled, unlabelled, cfg)
    torch.manual_seed(cfg.train.seed)
    template = MRCCL(cfg.model)
    history: list[dict[str, float]] = []
    if cfg.use_pretraining:
        if everything is None:
            everything = FeatureSet.concat(
                [labelled.with_labels(np.full(len(labelled), UNLABELLED)), unlabelled]
            )
        elif len(everything) != len(labelled) + len(unlabelled) or everything.labelled.any():
            raise ValueError(
                f"everything must hold the {len(labelled)} labelled and {len(unlabelled)} "
                f"unlabelled rows with labels hidden; got {len(everything)} rows, "
                f"{int(everything.labelled.sum())} labelled"
            )
        held = pretraining_held_out(len(everything), cfg.inner_val_fraction, cfg.train.seed)
        with training_stage("pretrain"):
            epochs = cfg.pretrain_epochs
            run = fit(
                template, everything, cfg.train, pretrain_loss, "pretrain", epochs, held_out=held
            )
            history = run.history
    return template.cpu(), history


@dataclass
class FoldOutcome:
    """One cross-validation fold of the recipe: its model, scores and probabilities. Every
    score is measured on the fold's validation rows, which no training choice saw."""

    k: int
    model: MRCCL
    val_index: np.ndarray  # rows of the labelled set this fold validates on
    val_probs: dict[str, np.ndarray]  # A, V, T, F, voted -> (n_val, C)
    test_probs: dict[str, np.ndarray]  # A, V, T, F, voted -> (M, C)
    val_waf: float  # the full method: voted, after step 2 (step 1 without pseudo labels)
    step1_waf: float
    baseline_waf: float | None
    references: dict[str, float]  # majority and class-prior WAFs of this fold
    pseudo: PseudoLabels
    history: dict[str, Any]
    stop_index: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    # The baselines' probabilities on the validation rows, by baselines() name (none without
    # pseudo labels): their per-class F1 beside the method's (Table 1, flows/ablate.py).
    baseline_val_probs: dict[str, np.ndarray] = field(default_factory=dict)
    # What each stage trained on and how (stage_record), by stage: the recipe as it ran.
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    baseline_oversampled_waf: float | None = None  # merflow's report row (baselines())

    def summary(self) -> dict[str, Any]:
        """JSON-able scores, pseudo-label counts, stages and curves."""
        return {
            "k": self.k,
            "val_waf": self.val_waf,
            "step1_waf": self.step1_waf,
            "baseline_waf": self.baseline_waf,
            "baseline_oversampled_waf": self.baseline_oversampled_waf,
            "reference_waf": self.references,
            "n_early_stopping": len(self.stop_index),
            "pseudo_counts": self.pseudo.counts(),
            "stages": self.stages,
            "history": self.history,
        }


def stage_record(
    data: FeatureSet, cfg: TrainConfig, result: FitResult, pseudo: FeatureSet | None = None
) -> dict[str, Any]:
    """A stage as it ran: its rows (oversampled copies and rows of the pseudo-labelled videos
    `pseudo` among them), learning rate, most epochs and the epoch whose weights it kept."""
    n_pseudo = 0 if pseudo is None else int(np.isin(data.video_ids, pseudo.video_ids).sum())
    return {
        "rows": len(data),
        "copies": len(data) - len(np.unique(data.video_ids)),
        "pseudo_rows": n_pseudo,
        "lr": cfg.lr,
        "max_epochs": cfg.max_epochs,
        "epochs": len(result.history),
        "best_epoch": result.best_epoch,
    }


def train_fold(
    k: int,
    labelled: FeatureSet,
    unlabelled: FeatureSet,
    test: FeatureSet,
    cfg: RecipeConfig,
    start_state: Mapping[str, torch.Tensor],
    folds: np.ndarray,
) -> FoldOutcome:
    """Fold k: step 1 fine-tune; the baseline (no oversampling) and pseudo labels by the
    two-model rule; step 2 with the pseudo-labelled videos (training side only) at the lower
    learning rate. Without pseudo labels step 2 still runs, on the labelled fit rows alone.

    `folds` is the run's fold of each labelled row (assign_folds). The epoch of every stage is
    chosen on early-stopping rows held out of the fold's training rows, never on the
    validation rows whose scores are reported.
    """
    _check_inputs(labelled, unlabelled, cfg)
    if len(folds) != len(labelled):
        raise ValueError(f"folds has {len(folds)} rows for {len(labelled)} labelled videos")
    tr, va = np.flatnonzero(folds != k), np.flatnonzero(folds == k)
    if len(va) == 0:
        raise ValueError(f"fold {k} has no validation rows; folds hold {sorted(set(folds))}")
    step1 = _fold_cfg(cfg, k, max_epochs=cfg.final_epochs)
    fit_rows, stop_rows = early_stopping_split(
        labelled.labels[tr], cfg.inner_val_fraction, step1.seed
    )
    train, val = labelled.subset(tr[fit_rows]), labelled.subset(va)
    stop = labelled.subset(tr[stop_rows]) if len(stop_rows) else None
    model = MRCCL(cfg.model).to(cfg.train.device)
    model.load_state_dict(dict(start_state))
    _warn_absent(k, train, cfg)
    fit_set = _oversampled(train, cfg.oversample_step1, cfg, step1.seed)
    with training_stage(stage_name(k, "step1")):
        tune = functools.partial(fine_tune_loss, lambda_con=step1.lambda_con)
        fit1 = fit(model, fit_set, step1, tune, "fine-tune", stop=stop)
    history: dict[str, Any] = {"step1": fit1.history}
    stages = {"step1": stage_record(fit_set, step1, fit1)}
    step1_waf = waf(val.labels, predict(model, val, cfg.train.eval_batch_size)["voted"].argmax(1))
    base_val: dict[str, np.ndarray] = {}
    no_pseudo = np.zeros(0, dtype=np.int64)
    chosen = PseudoLabels(no_pseudo, no_pseudo, np.zeros(0, dtype=np.float32))
    # The paper's baseline trains on "existing labeled data": the fit rows as they are.
    base_rows = {"baseline": train, "baseline_oversampled": fit_set}
    base_cfg = _fold_cfg(cfg, k)
    for name in baselines(cfg):
        torch.manual_seed(step1.seed)  # both baselines start from the same weights
        base = BaselineNet(cfg.baseline)
        with training_stage(stage_name(k, name)):
            fitb = fit(base, base_rows[name], base_cfg, baseline_loss, "baseline", stop=stop)
        base_val[name] = predict(base, val, cfg.train.eval_batch_size)["voted"]
        history[name] = fitb.history
        stages[name] = stage_record(base_rows[name], base_cfg, fitb)
        if name == "baseline" and len(unlabelled):
            probs_b = predict(base, unlabelled, cfg.train.eval_batch_size)["voted"]
            probs_m = predict(model, unlabelled, cfg.train.eval_batch_size)["voted"]
            chosen = select_pseudo_labels(probs_b, probs_m, cfg.thresholds, cfg.preferred)
    # Pseudo-labelled rows join training only; validation stays the labelled fold.
    pseudo = unlabelled.subset(chosen.indices).with_labels(chosen.labels)
    step2 = _fold_cfg(cfg, k, max_epochs=cfg.final_epochs, lr=cfg.lr_step2)
    grown = _oversampled(FeatureSet.concat([train, pseudo]), cfg.oversample_step2, cfg, step2.seed)
    with training_stage(stage_name(k, "step2")):
        tune = functools.partial(fine_tune_loss, lambda_con=step2.lambda_con)
        fit2 = fit(model, grown, step2, tune, "fine-tune", stop=stop)
    history["step2"] = fit2.history
    stages["step2"] = stage_record(grown, step2, fit2, pseudo)
    val_probs = predict(model, val, cfg.train.eval_batch_size)
    test_probs = predict(model, test, cfg.train.eval_batch_size)
    val_waf = waf(val.labels, val_probs["voted"].argmax(1))
    base_waf = {name: waf(val.labels, p.argmax(1)) for name, p in base_val.items()}
    log.info("fold %d: WAF %.4f", k, val_waf)
    return FoldOutcome(
        k=k,
        model=model.cpu(),
        val_index=va,
        val_probs=val_probs,
        test_probs=test_probs,
        val_waf=val_waf,
        step1_waf=step1_waf,
        baseline_waf=base_waf.get("baseline"),
        references=reference_wafs(labelled.labels[tr], val.labels),
        pseudo=chosen,
        history=history,
        stop_index=tr[stop_rows],
        baseline_val_probs=base_val,
        stages=stages,
        baseline_oversampled_waf=base_waf.get("baseline_oversampled"),
    )
