"""The training engine: pretraining, fine-tuning, the baseline, prediction, the whole recipe.

Read top to bottom: settings, metrics, batching, the loss of each stage, the loops (pretrain,
fine_tune, train_baseline, predict), then the recipe of METHOD.md (oversample, pretrain,
5-fold step 1, baseline, pseudo labels, step 2, voting, test predictions).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import confusion_matrix, f1_score
from sklearn.model_selection import StratifiedKFold
from torch import nn

from data_contracts.labels import CLASSES, CLASSIFIERS, NUM_CLASSES
from models.baseline import BaselineConfig, BaselineNet
from models.distributed import (
    RANK_SEED_STRIDE,
    Gather,
    RowGather,
    World,
    gather_rows,
    no_gather,
    shard_batch,
    share,
    world,
)
from models.featureset import (
    UNLABELLED,
    FeatureSet,
    TensorBatch,
    as_index_tensor,
    take,
    to_tensors,
)
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

log = logging.getLogger(__name__)


def _fmt(stats: dict[str, float]) -> str:
    """Epoch losses for the log: `loss=1.2345 ce=0.9876 ...`."""
    return " ".join(f"{k}={v:.4f}" for k, v in stats.items())


# ----------------------------------------------------------------------------- settings


@dataclass
class TrainConfig:
    """Optimiser and loop settings of one training stage (the paper's values by default)."""

    lr: float = 1e-4
    batch_size: int = 512  # capped at the number of rows, for small data
    max_epochs: int = 40
    patience: int = 5  # epochs without a better validation WAF before stopping
    lambda_con: float = 1.0  # weight of L_intra + L_imc during fine-tuning
    weight_decay: float = 0.0
    eval_batch_size: int = 2048
    seed: int = 0  # each stage re-seeds torch's global RNG and its own numpy shuffler with it
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.batch_size < 1 or self.max_epochs < 1 or self.patience < 1:
            raise ValueError(
                "need lr > 0, batch_size >= 1, max_epochs >= 1, patience >= 1; got "
                f"lr={self.lr}, batch_size={self.batch_size}, max_epochs={self.max_epochs}, "
                f"patience={self.patience}"
            )


@dataclass
class RecipeConfig:
    """The whole METHOD.md recipe. Ablations are switches: `use_pretraining`, `model.use_nee`,
    `use_pseudo_labels` and `use_oversampling`."""

    train: TrainConfig = field(default_factory=TrainConfig)
    model: MRCCLConfig = field(default_factory=MRCCLConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    n_splits: int = 5
    use_pretraining: bool = True
    pretrain_epochs: int = 20
    final_epochs: int = 20  # at most this many epochs in step 1 and in step 2
    lr_step2: float = 5e-5
    use_pseudo_labels: bool = True  # False: no baseline, no pseudo labels, no step 2
    use_oversampling: bool = True
    oversample_step1: dict[str, int] = field(default_factory=lambda: dict(STEP1_TARGETS))
    oversample_step2: dict[str, int] = field(default_factory=lambda: dict(STEP2_TARGETS))
    oversample_scale: float = 1.0  # multiplies the targets, e.g. 60/5030 for a 60-clip corpus
    thresholds: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_THRESHOLDS))
    preferred: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_PREFERRED))
    keep_models: bool = True  # return the fold models (for checkpoints)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RecipeConfig:
        """Recipe from nested mappings (`train`, `model`, `baseline` are sub-mappings)."""
        data = dict(data)
        nested = {"train": TrainConfig, "model": MRCCLConfig, "baseline": BaselineConfig}
        subs = {k: config_from_dict(c, data.pop(k, {})) for k, c in nested.items()}
        return dataclasses.replace(config_from_dict(cls, data), **subs)


# ----------------------------------------------------------------------------- metrics


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


# ----------------------------------------------------------------------------- batching


def _batches(n: int, batch_size: int, rng: np.random.Generator | None) -> Iterator[np.ndarray]:
    """Row indices in batches of min(batch_size, n); shuffled when an rng is given."""
    order = rng.permutation(n) if rng is not None else np.arange(n)
    size = max(1, min(batch_size, n))
    for start in range(0, n, size):
        yield order[start : start + size]


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------- losses per stage

# A loss sees this rank's rows (`local`: features for the forward), the whole global batch's
# labels and presence (`whole`) and a `gather` that turns per-row outputs of the local rows into
# the whole batch's (the identity in a single process). Every rank then computes the same loss
# of the whole batch: see models/distributed.py for why that gives the single-process gradient.
LossFn = Callable[[nn.Module, TensorBatch, TensorBatch, Gather], tuple[torch.Tensor, dict]]


def pretrain_loss(
    model: MRCCL, local: TensorBatch, whole: TensorBatch, gather: Gather = no_gather
) -> tuple[torch.Tensor, dict[str, float]]:
    """Contrastive only: L_intra + L_imc."""
    reps = model.encode(local.features, local.present, with_contrastive=True).map(gather)
    out = model.heads(reps, whole.present, with_contrastive=True)
    loss = out.l_intra + out.l_imc
    return loss, {"loss": loss.item(), "l_intra": out.l_intra.item(), "l_imc": out.l_imc.item()}


def fine_tune_loss(
    model: MRCCL,
    local: TensorBatch,
    whole: TensorBatch,
    gather: Gather = no_gather,
    lambda_con: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean CE of A, V, T, F + CE of the voted scores + lambda_con * (L_intra + L_imc)."""
    contrastive = lambda_con > 0
    reps = model.encode(local.features, local.present, with_contrastive=contrastive).map(gather)
    out = model.heads(reps, whole.present, with_contrastive=contrastive)
    y = whole.labels
    # A classifier whose modality is missing in a row does not learn from that row.
    ces = [
        F.cross_entropy(out.logits[c][out.presence[c]], y[out.presence[c]])
        for c in CLASSIFIERS
        if bool(out.presence[c].any())
    ]
    ce = torch.stack(ces).mean()
    ce_vote = F.nll_loss(model.vote(out).clamp_min(1e-12).log(), y)
    con = out.l_intra + out.l_imc
    loss = ce + ce_vote + lambda_con * con
    return loss, {
        "loss": loss.item(),
        "ce": ce.item(),
        "ce_vote": ce_vote.item(),
        "con": con.item(),
    }


def baseline_loss(
    model: BaselineNet, local: TensorBatch, whole: TensorBatch, gather: Gather = no_gather
) -> tuple[torch.Tensor, dict[str, float]]:
    """Plain cross-entropy."""
    logits = gather(model(local.features, local.present))
    loss = F.cross_entropy(logits, whole.labels)
    return loss, {"loss": loss.item()}


class _Step(nn.Module):
    """One training step's forward (model + loss) as a module, so that DDP can wrap all of it:
    parameters used after the gather (heads, temperatures) are then DDP's too."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(
        self, local: TensorBatch, whole: TensorBatch, gather: Gather
    ) -> tuple[torch.Tensor, dict[str, float]]:
        return self.loss_fn(self.model, local, whole, gather)


def _stepper(model: nn.Module, loss_fn: LossFn, w: World) -> nn.Module:
    """The step module, wrapped in DistributedDataParallel when there is more than one rank."""
    step = _Step(model, loss_fn)
    if not w.distributed:
        return step
    # Unused parameters are normal here: the classifiers during pretraining, the contrastive
    # heads when lambda_con is 0. device_ids=None: inputs are already on the rank's device.
    return nn.parallel.DistributedDataParallel(step, find_unused_parameters=True)


def _seed_rank(seed: int, w: World) -> None:
    """torch's global stream (dropout, NEE) per rank; rank 0 matches a single-process run."""
    torch.manual_seed(seed + RANK_SEED_STRIDE * w.rank)


# ----------------------------------------------------------------------------- loops


def _labels_and_presence(data: TensorBatch, index: torch.Tensor) -> TensorBatch:
    """Rows `index` without their features (what a loss needs of the whole batch)."""
    return TensorBatch(
        features={},
        present={m: v.index_select(0, index) for m, v in data.present.items()},
        labels=data.labels.index_select(0, index),
    )


def _train_epoch(
    step: nn.Module,
    data: TensorBatch,
    optimizer: torch.optim.Optimizer,
    batch_size: int,
    rng: np.random.Generator,
    w: World,
) -> dict[str, float]:
    """One pass over `data` in shuffled batches; returns the row-weighted mean of each stat.

    Every rank draws the same order (same rng seed), so a global batch holds the same rows as
    in a single-process run; each rank forwards its share of it.
    """
    step.train()
    n, device = len(data.labels), data.labels.device
    sums: dict[str, float] = {}
    for idx in _batches(n, batch_size, rng):
        whole_index = as_index_tensor(idx, device)
        if w.distributed:
            mine, sizes = shard_batch(idx, w)
            local = take(data, as_index_tensor(mine, device))
            whole, gather = _labels_and_presence(data, whole_index), RowGather(sizes, device)
        else:
            local = whole = take(data, whole_index)
            gather = no_gather
        loss, stats = step(local, whole, gather)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        for k, v in stats.items():
            sums[k] = sums.get(k, 0.0) + v * len(idx)
    return {k: v / n for k, v in sums.items()}


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


class _Loop:
    """What every training stage sets up: this rank's seed, the batch order shared by all ranks,
    the data on the device, the (DDP-wrapped) step and the optimiser."""

    def __init__(self, model: nn.Module, data: FeatureSet, cfg: TrainConfig, loss_fn: LossFn):
        self.world = world()
        _seed_rank(cfg.seed, self.world)
        self.rng = np.random.default_rng(cfg.seed)  # the same on every rank: one batch order
        self.batch_size = cfg.batch_size
        model.to(cfg.device)
        self.tensors = to_tensors(data, cfg.device)
        self.step = _stepper(model, loss_fn, self.world)
        self.optimizer = _optimizer(model, cfg)

    def epoch(self) -> dict[str, float]:
        return _train_epoch(
            self.step, self.tensors, self.optimizer, self.batch_size, self.rng, self.world
        )


def pretrain(
    model: MRCCL, data: FeatureSet, cfg: TrainConfig, epochs: int
) -> list[dict[str, float]]:
    """Contrastive pretraining (L_intra + L_imc) on every row, labels unused; per-epoch stats."""
    loop = _Loop(model, data, cfg, pretrain_loss)
    history = []
    for epoch in range(1, epochs + 1):
        stats = loop.epoch()
        history.append({"epoch": epoch, **stats})
        log.info("pretrain epoch %d: %s", epoch, _fmt(stats))
    return history


@dataclass
class FitResult:
    """Per-epoch history of a supervised stage and where its best validation WAF was."""

    history: list[dict[str, float]]
    best_epoch: int
    best_val_waf: float


def _fit(
    model: nn.Module, train: FeatureSet, val: FeatureSet, cfg: TrainConfig, loss_fn: LossFn
) -> FitResult:
    """Train with early stopping on validation WAF; the model ends with its best state."""
    for name, part in (("training", train), ("validation", val)):
        if (part.labels == UNLABELLED).any() or len(part) == 0:
            raise ValueError(f"the {name} set must be non-empty and fully labelled")
    loop = _Loop(model, train, cfg, loss_fn)
    history: list[dict[str, float]] = []
    best_waf, best_epoch, best_state, stale = -1.0, 0, _state_copy(model), 0
    for epoch in range(1, cfg.max_epochs + 1):
        # Every rank sees the same validation probabilities (gathered), so they all stop at
        # the same epoch and keep the same best state.
        stats = loop.epoch()
        voted = predict(model, val, cfg.eval_batch_size)["voted"]
        val_ce = float(-np.log(np.clip(voted[np.arange(len(val)), val.labels], 1e-12, None)).mean())
        val_waf = waf(val.labels, voted.argmax(1))
        history.append({"epoch": epoch, **stats, "val_ce": val_ce, "val_waf": val_waf})
        log.info("epoch %d: %s val_ce=%.4f val_waf=%.4f", epoch, _fmt(stats), val_ce, val_waf)
        if val_waf > best_waf:
            best_waf, best_epoch, best_state, stale = val_waf, epoch, _state_copy(model), 0
        else:
            stale += 1
            if stale >= cfg.patience:
                break
    model.load_state_dict(best_state)
    return FitResult(history, best_epoch, best_waf)


def fine_tune(model: MRCCL, train: FeatureSet, val: FeatureSet, cfg: TrainConfig) -> FitResult:
    """Supervised MR-CCL training with the full fine-tuning loss and early stopping."""

    def loss(m: nn.Module, local: TensorBatch, whole: TensorBatch, gather: Gather):
        return fine_tune_loss(m, local, whole, gather, cfg.lambda_con)

    return _fit(model, train, val, cfg, loss)


def train_baseline(
    model: BaselineNet, train: FeatureSet, val: FeatureSet, cfg: TrainConfig
) -> FitResult:
    """Supervised training of the challenge baseline with early stopping."""
    return _fit(model, train, val, cfg, baseline_loss)


@torch.no_grad()
def predict(model: nn.Module, data: FeatureSet, batch_size: int = 2048) -> dict[str, np.ndarray]:
    """Class probabilities (N, C): 'voted' always; for MR-CCL also each of A, V, T, F.

    Under torchrun each rank predicts a contiguous share of the rows and every rank gets all of
    them back, in order.
    """
    model.eval()
    device = _model_device(model)
    w = world()
    rows, sizes = share(len(data), w)
    tensors = to_tensors(data, "cpu")  # moved batch by batch: a 115k-row pool stays in host RAM
    parts: dict[str, list[np.ndarray]] = {}
    for idx in _batches(len(rows), batch_size, None):
        batch = take(tensors, as_index_tensor(rows[idx], "cpu")).to(device)
        if isinstance(model, MRCCL):
            out = model(batch.features, batch.present, with_contrastive=False)
            probs = {c: out.logits[c].softmax(-1) for c in CLASSIFIERS}
            probs["voted"] = model.vote(out)
        else:
            probs = {"voted": model(batch.features, batch.present).softmax(-1)}
        for k, v in probs.items():
            parts.setdefault(k, []).append(v.float().cpu().numpy())
    keys = [*CLASSIFIERS, "voted"] if isinstance(model, MRCCL) else ["voted"]
    empty = np.zeros((0, NUM_CLASSES), dtype=np.float32)  # an empty set still has every key
    mine = {k: np.concatenate(parts[k]) if k in parts else empty for k in keys}
    if w.distributed:
        mine = {k: gather_rows(v, sizes, w) for k, v in mine.items()}
    return mine


# ----------------------------------------------------------------------------- the recipe


@dataclass
class CVResult:
    """Outcome of a cross-validated run: fold and out-of-fold scores, test probabilities."""

    labels: np.ndarray  # (N_l,) true labels of the labelled set
    oof_probs: np.ndarray  # (N_l, C) voted probabilities of each row's validation-fold model
    fold_waf: list[float]
    test_ids: np.ndarray  # (M,)
    test_probs: np.ndarray  # (M, C) mean of the fold models' voted probabilities
    histories: list[dict[str, Any]] = field(default_factory=list)  # per fold, per stage
    pretrain_history: list[dict[str, float]] = field(default_factory=list)
    step1_fold_waf: list[float] = field(default_factory=list)
    baseline_fold_waf: list[float] = field(default_factory=list)
    pseudo_counts: list[dict[str, int]] = field(default_factory=list)  # per fold, per class
    models: list[nn.Module] = field(default_factory=list)

    @property
    def mean_waf(self) -> float:
        """Mean of the per-fold WAFs (the paper's Train&Val figure)."""
        return float(np.mean(self.fold_waf))

    @property
    def oof_predictions(self) -> np.ndarray:
        """Argmax of the out-of-fold probabilities (N_l,)."""
        return self.oof_probs.argmax(1)

    def summary(self) -> dict[str, Any]:
        """JSON-able report: WAFs, per-class F1, confusion matrix, pseudo-label counts."""
        pred = self.oof_predictions
        return {
            "fold_waf": self.fold_waf,
            "mean_waf": self.mean_waf,
            "oof_waf": waf(self.labels, pred),
            "per_class_f1": per_class_f1(self.labels, pred),
            "confusion": confusion_matrix(
                self.labels, pred, labels=list(range(NUM_CLASSES))
            ).tolist(),
            "step1_fold_waf": self.step1_fold_waf,
            "baseline_fold_waf": self.baseline_fold_waf,
            "pseudo_counts": self.pseudo_counts,
            "classes": list(CLASSES),
        }


def _check_recipe_inputs(
    labelled: FeatureSet, unlabelled: FeatureSet | None, cfg: RecipeConfig
) -> None:
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
    thin = [CLASSES[c] for c in range(NUM_CLASSES) if 0 < counts[c] < cfg.n_splits]
    if thin:
        # Stratified folds still work: such a class is absent from some validation folds.
        log.warning(
            "classes %s have fewer labelled rows than n_splits=%d; some folds validate without "
            "them",
            thin,
            cfg.n_splits,
        )


def _folds(labels: np.ndarray, n_splits: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    splitter = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    return list(splitter.split(np.zeros(len(labels)), labels))


def _oversampled(
    data: FeatureSet, targets: Mapping[str, int], cfg: RecipeConfig, seed: int
) -> FeatureSet:
    """`data` lifted to the targets (scaled), or unchanged when oversampling is off."""
    if not cfg.use_oversampling:
        return data
    wanted = targets_by_index(targets, cfg.oversample_scale)
    held = set(np.unique(data.labels).tolist())
    absent = [CLASSES[c] for c in wanted if c not in held]
    if absent:
        # Tiny corpora only: a fold can lack a rare class entirely; nothing to copy from.
        log.warning("no training rows of %s in this split; not oversampled", absent)
    wanted = {c: n for c, n in wanted.items() if c in held}
    idx = random_oversample(data.labels, wanted, np.random.default_rng(seed))
    return data.subset(idx)


def _cross_validate(
    labelled: FeatureSet,
    test: FeatureSet,
    cfg: RecipeConfig,
    train_fold: Callable[[int, FeatureSet, FeatureSet, CVResult], nn.Module],
) -> CVResult:
    """Stratified k-fold skeleton: train_fold builds each fold's model, the rest is shared."""
    result = CVResult(
        labels=labelled.labels.copy(),
        oof_probs=np.zeros((len(labelled), NUM_CLASSES), dtype=np.float32),
        fold_waf=[],
        test_ids=test.video_ids.copy(),
        test_probs=np.zeros((len(test), NUM_CLASSES), dtype=np.float64),
    )
    for k, (tr, va) in enumerate(_folds(labelled.labels, cfg.n_splits, cfg.train.seed)):
        val = labelled.subset(va)
        model = train_fold(k, labelled.subset(tr), val, result)
        voted = predict(model, val, cfg.train.eval_batch_size)["voted"]
        result.oof_probs[va] = voted
        result.fold_waf.append(waf(val.labels, voted.argmax(1)))
        result.test_probs += predict(model, test, cfg.train.eval_batch_size)["voted"] / cfg.n_splits
        log.info("fold %d: WAF %.4f", k, result.fold_waf[-1])
        if cfg.keep_models:
            result.models.append(model.cpu())
    result.test_probs = result.test_probs.astype(np.float32)
    return result


def _fold_cfg(cfg: RecipeConfig, k: int, **changes: Any) -> TrainConfig:
    # A distinct, fixed seed per fold: same inputs + seed => same result.
    return dataclasses.replace(cfg.train, seed=cfg.train.seed + 1009 * (k + 1), **changes)


def cross_validate_baseline(
    labelled: FeatureSet, cfg: RecipeConfig, test: FeatureSet | None = None
) -> CVResult:
    """The supervised challenge baseline on the same folds (oversampled if use_oversampling)."""
    _check_recipe_inputs(labelled, None, cfg)
    test = test if test is not None else labelled.subset(np.arange(0))

    def train_fold(k: int, train: FeatureSet, val: FeatureSet, result: CVResult) -> nn.Module:
        fold = _fold_cfg(cfg, k)
        torch.manual_seed(fold.seed)
        model = BaselineNet(cfg.baseline)
        fit = train_baseline(
            model, _oversampled(train, cfg.oversample_step1, cfg, fold.seed), val, fold
        )
        result.histories.append({"baseline": fit.history})
        return model

    return _cross_validate(labelled, test, cfg, train_fold)


def pretrain_start(
    labelled: FeatureSet,
    unlabelled: FeatureSet,
    cfg: RecipeConfig,
    everything: FeatureSet | None = None,
) -> tuple[MRCCL, list[dict[str, float]]]:
    """The model every fold starts from: MR-CCL contrastively pretrained on all videos
    (labelled ones with their labels hidden), or freshly initialised without pretraining.

    `everything`, when given, must be those rows (labelled first, labels hidden) already in one
    set, e.g. views of mapped arrays; otherwise the two sets are concatenated (a copy).
    """
    _check_recipe_inputs(labelled, unlabelled, cfg)
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
        history = pretrain(template, everything, cfg.train, cfg.pretrain_epochs)
    return template.cpu(), history


@dataclass
class FoldOutcome:
    """One cross-validation fold of the recipe: its model, scores and probabilities."""

    k: int
    model: MRCCL
    val_index: np.ndarray  # rows of the labelled set this fold validates on
    val_probs: dict[str, np.ndarray]  # A, V, T, F, voted -> (n_val, C)
    test_probs: dict[str, np.ndarray]  # A, V, T, F, voted -> (M, C)
    val_waf: float
    step1_waf: float
    baseline_waf: float | None
    pseudo: PseudoLabels
    history: dict[str, Any]

    def summary(self) -> dict[str, Any]:
        """JSON-able scores, pseudo-label counts and curves."""
        return {
            "k": self.k,
            "val_waf": self.val_waf,
            "step1_waf": self.step1_waf,
            "baseline_waf": self.baseline_waf,
            "pseudo_counts": self.pseudo.counts(),
            "history": self.history,
        }


def train_fold(
    k: int,
    labelled: FeatureSet,
    unlabelled: FeatureSet,
    test: FeatureSet,
    cfg: RecipeConfig,
    start_state: Mapping[str, torch.Tensor],
) -> FoldOutcome:
    """Fold k of METHOD.md: step 1 fine-tune, baseline, pseudo labels by the two-model rule,
    step 2 with the pseudo-labelled videos (training side only) at the lower learning rate."""
    _check_recipe_inputs(labelled, unlabelled, cfg)
    tr, va = _folds(labelled.labels, cfg.n_splits, cfg.train.seed)[k]
    train, val = labelled.subset(tr), labelled.subset(va)
    model = MRCCL(cfg.model).to(cfg.train.device)
    model.load_state_dict(dict(start_state))
    step1 = _fold_cfg(cfg, k, max_epochs=cfg.final_epochs)
    fit1 = fine_tune(model, _oversampled(train, cfg.oversample_step1, cfg, step1.seed), val, step1)
    stages: dict[str, Any] = {"step1": fit1.history}
    baseline_waf = None
    no_pseudo = np.zeros(0, dtype=np.int64)
    chosen = PseudoLabels(no_pseudo, no_pseudo, np.zeros(0, dtype=np.float32))
    if cfg.use_pseudo_labels:
        # Baseline with the same training set, then the two-model pseudo-label rule.
        torch.manual_seed(step1.seed)
        base = BaselineNet(cfg.baseline)
        fitb = train_baseline(
            base, _oversampled(train, cfg.oversample_step1, cfg, step1.seed), val, _fold_cfg(cfg, k)
        )
        baseline_waf = fitb.best_val_waf
        stages["baseline"] = fitb.history
        if len(unlabelled):
            probs_b = predict(base, unlabelled, cfg.train.eval_batch_size)["voted"]
            probs_m = predict(model, unlabelled, cfg.train.eval_batch_size)["voted"]
            chosen = select_pseudo_labels(probs_b, probs_m, cfg.thresholds, cfg.preferred)
        # Pseudo-labelled rows join training only; validation stays the labelled fold.
        pseudo = unlabelled.subset(chosen.indices).with_labels(chosen.labels)
        step2 = _fold_cfg(cfg, k, max_epochs=cfg.final_epochs, lr=cfg.lr_step2)
        grown = _oversampled(
            FeatureSet.concat([train, pseudo]), cfg.oversample_step2, cfg, step2.seed
        )
        stages["step2"] = fine_tune(model, grown, val, step2).history
    val_probs = predict(model, val, cfg.train.eval_batch_size)
    test_probs = predict(model, test, cfg.train.eval_batch_size)
    val_waf = waf(val.labels, val_probs["voted"].argmax(1))
    log.info("fold %d: WAF %.4f", k, val_waf)
    return FoldOutcome(
        k=k,
        model=model.cpu(),
        val_index=va,
        val_probs=val_probs,
        test_probs=test_probs,
        val_waf=val_waf,
        step1_waf=fit1.best_val_waf,
        baseline_waf=baseline_waf,
        pseudo=chosen,
        history=stages,
    )


def run_self_training(
    labelled: FeatureSet,
    unlabelled: FeatureSet,
    cfg: RecipeConfig,
    test: FeatureSet | None = None,
) -> CVResult:
    """METHOD.md end to end on in-memory features; test defaults to the unlabelled set."""
    test = test if test is not None else unlabelled
    template, pretrain_history = pretrain_start(labelled, unlabelled, cfg)
    start_state = _state_copy(template)
    result = CVResult(
        labels=labelled.labels.copy(),
        oof_probs=np.zeros((len(labelled), NUM_CLASSES), dtype=np.float32),
        fold_waf=[],
        test_ids=test.video_ids.copy(),
        test_probs=np.zeros((len(test), NUM_CLASSES), dtype=np.float64),
        pretrain_history=pretrain_history,
    )
    for k in range(cfg.n_splits):
        # Each fold already predicted its validation and test rows: reuse them.
        outcome = train_fold(k, labelled, unlabelled, test, cfg, start_state)
        result.oof_probs[outcome.val_index] = outcome.val_probs["voted"]
        result.fold_waf.append(outcome.val_waf)
        result.test_probs += outcome.test_probs["voted"] / cfg.n_splits
        result.step1_fold_waf.append(outcome.step1_waf)
        if outcome.baseline_waf is not None:
            result.baseline_fold_waf.append(outcome.baseline_waf)
            result.pseudo_counts.append(outcome.pseudo.counts())
        result.histories.append(outcome.history)
        if cfg.keep_models:
            result.models.append(outcome.model)
    result.test_probs = result.test_probs.astype(np.float32)
    return result
