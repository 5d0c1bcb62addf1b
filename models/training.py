"""The training engine: the loops every stage of the recipe runs (pretraining, fine-tuning,
the baseline) and prediction. The recipe that calls them (folds, oversampling, pseudo labels,
voting) is models/recipe.py; what the loops log as they go is models/epoch_reports.py.

Read top to bottom: loop settings, metrics, batching, the loss of each stage,
the loops (pretrain, fine_tune, train_baseline), predict.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import f1_score
from torch import nn

from data_contracts.labels import CLASSES, CLASSIFIERS, NUM_CLASSES
from models.baseline import BaselineNet
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
from models.epoch_reports import (  # noqa: F401  (EPOCH_RECORD .. log_epoch: re-exported)
    EPOCH_RECORD,
    PROGRESS_RECORD,
    BatchProgress,
    EpochProgress,
    EpochReport,
    current_stage,
    log_epoch,
    report_epoch,
    training_stage,
)
from models.featureset import (
    UNLABELLED,
    FeatureSet,
    TensorBatch,
    as_index_tensor,
    take,
    to_tensors,
)
from models.mrccl import MRCCL
from models.settings import default

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- settings


@dataclass
class TrainConfig:
    """Optimiser and loop settings of one training stage (defaults: models/settings.py)."""

    lr: float = default("lr")
    batch_size: int = default("batch_size")
    max_epochs: int = default("max_epochs")
    patience: int = default("patience")
    lambda_con: float = default("lambda_con")
    weight_decay: float = 0.0
    eval_batch_size: int = 2048
    seed: int = default("seed")
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.batch_size < 1 or self.max_epochs < 1 or self.patience < 1:
            raise ValueError(
                "need lr > 0, batch_size >= 1, max_epochs >= 1, patience >= 1; got "
                f"lr={self.lr}, batch_size={self.batch_size}, max_epochs={self.max_epochs}, "
                f"patience={self.patience}"
            )


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


def reference_wafs(train_labels: np.ndarray, val_labels: np.ndarray) -> dict[str, float]:
    """What needs no features, for reading a WAF against (docs/method.md §9):

    - `majority`: every validation row predicted as the training rows' most frequent class;
    - `class_prior`: the expected WAF of guessing each row's class at random with the training
      rows' class frequencies q. A class of n_c validation rows out of N then has expected
      true positives n_c q_c and predictions N q_c, so F1_c = 2 n_c q_c / (n_c + N q_c).
    """
    q = np.bincount(train_labels, minlength=NUM_CLASSES) / max(1, len(train_labels))
    n = np.bincount(val_labels, minlength=NUM_CLASSES).astype(np.float64)
    total = n.sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(n + total * q > 0, 2 * n * q / (n + total * q), 0.0)
    majority = np.full(len(val_labels), int(q.argmax()))
    return {
        "majority": waf(val_labels, majority),
        "class_prior": float((n / max(total, 1.0)) @ f1),
    }


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


class _EarlyStop:
    """Patience on a held-out score: keeps the best epoch's weights, says when to stop, and
    puts the best weights back at the end (docs/method.md §7). `higher`: a higher score is
    better (WAF); else lower (a loss)."""

    def __init__(self, patience: int, higher: bool) -> None:
        self.patience, self.higher = patience, higher
        self.best = -float("inf") if higher else float("inf")
        self.best_epoch, self.state, self.stale = 0, None, 0

    def should_stop(self, model: nn.Module, epoch: int, score: float) -> bool:
        """Record `score` of `epoch`; True once `patience` epochs in a row did no better."""
        if score > self.best if self.higher else score < self.best:
            self.best, self.best_epoch, self.state, self.stale = score, epoch, _state_copy(model), 0
            return False
        self.stale += 1
        return self.stale >= self.patience

    def restore(self, model: nn.Module) -> None:
        """Load the best epoch's weights (nothing when no score was recorded)."""
        if self.state is not None:
            model.load_state_dict(self.state)


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
    # whole.groups: copies of a video (oversampling) are not each other's negatives.
    out = model.heads(reps, whole.present, with_contrastive=True, groups=whole.groups)
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
    out = model.heads(reps, whole.present, with_contrastive=contrastive, groups=whole.groups)
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
    """Rows `index` without their features (what a loss needs of the whole batch): labels,
    presence and video groups (the contrastive terms compare groups across the whole batch)."""
    return TensorBatch(
        features={},
        present={m: v.index_select(0, index) for m, v in data.present.items()},
        labels=data.labels.index_select(0, index),
        groups=None if data.groups is None else data.groups.index_select(0, index),
    )


def _train_epoch(
    step: nn.Module,
    data: TensorBatch,
    optimizer: torch.optim.Optimizer,
    batch_size: int,
    rng: np.random.Generator,
    w: World,
    rows: np.ndarray | None = None,
    progress: EpochProgress | None = None,
) -> dict[str, float]:
    """One pass over `data` (its `rows` only, when given) in shuffled batches; returns the
    row-weighted mean of each stat; tells `progress` after each batch.

    Every rank draws the same order (same rng seed), so a global batch holds the same rows as
    in a single-process run; each rank forwards its share of it.
    """
    step.train()
    n = len(data.labels) if rows is None else len(rows)
    device = data.labels.device
    sums: dict[str, float] = {}
    done = 0
    for batches, idx in enumerate(_batches(n, batch_size, rng), 1):
        idx = idx if rows is None else rows[idx]
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
        done += len(idx)
        if progress is not None:
            progress.batch_done(batches, done)
    return {k: v / n for k, v in sums.items()}


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


class _Loop:
    """What every training stage sets up: this rank's seed, the batch order shared by all ranks,
    the data on the device, the (DDP-wrapped) step and the optimiser."""

    def __init__(
        self,
        model: nn.Module,
        data: FeatureSet,
        cfg: TrainConfig,
        loss_fn: LossFn,
        rows: np.ndarray | None = None,
    ):
        self.world = world()
        self.rows = rows  # the rows trained on (None: all); the others stay on the device too
        _seed_rank(cfg.seed, self.world)
        self.rng = np.random.default_rng(cfg.seed)  # the same on every rank: one batch order
        self.batch_size = cfg.batch_size
        model.to(cfg.device)
        self.tensors = to_tensors(data, cfg.device)
        self.step = _stepper(model, loss_fn, self.world)
        self.optimizer = _optimizer(model, cfg)

    def epoch(self, stage: str, epoch: int, epochs: int) -> dict[str, float]:
        """One epoch; `stage`, `epoch` and `epochs` name it in the progress lines."""
        n = len(self.tensors.labels) if self.rows is None else len(self.rows)
        of = -(-n // max(1, min(self.batch_size, n)))  # the batches of _batches
        progress = EpochProgress(current_stage(stage), epoch, epochs, of)
        return _train_epoch(
            self.step,
            self.tensors,
            self.optimizer,
            self.batch_size,
            self.rng,
            self.world,
            self.rows,
            progress,
        )


@torch.no_grad()
def _held_out_loss(model: MRCCL, loop: _Loop, held: np.ndarray, seed: int) -> float:
    """Pretraining's loss on the rows `held` (eval mode, batches in row order, the NEE noise
    drawn from `seed`): the same rows and noise every epoch, so epochs compare, and on every
    rank, so all ranks stop at the same epoch."""
    model.eval()
    device = loop.tensors.labels.device
    devices = [torch.cuda.current_device()] if device.type == "cuda" else []
    total = 0.0
    with torch.random.fork_rng(devices=devices):  # training's random stream is left as it was
        torch.manual_seed(seed)
        for idx in _batches(len(held), loop.batch_size, None):
            batch = take(loop.tensors, as_index_tensor(held[idx], device))
            loss, _ = pretrain_loss(model, batch, batch)
            total += loss.item() * len(idx)
    return total / len(held)


def pretrain(
    model: MRCCL,
    data: FeatureSet,
    cfg: TrainConfig,
    epochs: int,
    held_out: np.ndarray | None = None,
) -> list[dict[str, float]]:
    """Contrastive pretraining (L_intra + L_imc), labels unused, for at most `epochs`; per-epoch
    stats. With `held_out` rows of `data`: trains on the others, stops after cfg.patience epochs
    without a lower loss on the held-out rows and ends with the best state (docs/method.md §7);
    without: every epoch on every row, the last state kept."""
    held = None if held_out is None else np.sort(np.asarray(held_out, dtype=np.int64))
    fit = None if held is None else np.setdiff1d(np.arange(len(data)), held)
    if held is not None and (len(held) < 2 or len(fit) < 2):
        raise ValueError(
            f"pretraining's held-out rows ({len(held)}) and training rows ({len(fit)}) need two "
            "rows each (a contrastive term compares rows); hold out fewer or none"
        )
    loop = _Loop(model, data, cfg, pretrain_loss, rows=fit)
    history: list[dict[str, float]] = []
    early = _EarlyStop(cfg.patience, higher=False)
    for epoch in range(1, epochs + 1):
        started = time.perf_counter()
        stats = loop.epoch("pretrain", epoch, epochs)
        if held is not None:
            stats["val_loss"] = _held_out_loss(model, loop, held, cfg.seed)
        history.append({"epoch": epoch, **stats})
        report_epoch("pretrain", epoch, epochs, stats, started)
        if held is not None and early.should_stop(model, epoch, stats["val_loss"]):
            break
    early.restore(model)
    return history


@dataclass
class FitResult:
    """Per-epoch history of a supervised stage and the epoch whose state the model ends with."""

    history: list[dict[str, float]]
    best_epoch: int
    best_val_waf: float | None  # on the early-stopping set; None without one


def _fit(
    model: nn.Module,
    train: FeatureSet,
    stop: FeatureSet | None,
    cfg: TrainConfig,
    loss_fn: LossFn,
    stage_name: str,
) -> FitResult:
    """Train for at most cfg.max_epochs. With an early-stopping set `stop`, stop after
    cfg.patience epochs without a better WAF on it and end with the best state; without one,
    train every epoch and keep the last state.

    `stop` must be rows the caller will not report scores on (docs/method.md §7): a figure
    measured on the rows that chose the epoch is optimistic.
    """
    parts = [("training", train), *([("early-stopping", stop)] if stop is not None else [])]
    for name, part in parts:
        if (part.labels == UNLABELLED).any() or len(part) == 0:
            raise ValueError(f"the {name} set must be non-empty and fully labelled")
    loop = _Loop(model, train, cfg, loss_fn)
    history: list[dict[str, float]] = []
    early = _EarlyStop(cfg.patience, higher=True)
    for epoch in range(1, cfg.max_epochs + 1):
        started = time.perf_counter()
        stats = loop.epoch(stage_name, epoch, cfg.max_epochs)
        row: dict[str, float] = {"epoch": epoch, **stats}
        if stop is not None:
            # Every rank sees the same probabilities (gathered), so all stop at the same epoch.
            voted = predict(model, stop, cfg.eval_batch_size)["voted"]
            picked = np.clip(voted[np.arange(len(stop)), stop.labels], 1e-12, None)
            row |= {"val_ce": float(-np.log(picked).mean())}
            row |= {"val_waf": waf(stop.labels, voted.argmax(1))}
        history.append(row)  # no wall time in it: a rerun's history is identical
        scores = {k: v for k, v in row.items() if k != "epoch"}
        report_epoch(stage_name, epoch, cfg.max_epochs, scores, started)
        if stop is None:
            early.best_epoch = epoch  # no epoch choice: the last one is kept
            continue
        if early.should_stop(model, epoch, row["val_waf"]):
            break
    early.restore(model)
    return FitResult(history, early.best_epoch, early.best if stop is not None else None)


def fine_tune(
    model: MRCCL, train: FeatureSet, stop: FeatureSet | None, cfg: TrainConfig
) -> FitResult:
    """Supervised MR-CCL training with the full fine-tuning loss (early stopping on `stop`)."""

    def loss(m: nn.Module, local: TensorBatch, whole: TensorBatch, gather: Gather):
        return fine_tune_loss(m, local, whole, gather, cfg.lambda_con)

    return _fit(model, train, stop, cfg, loss, "fine-tune")


def train_baseline(
    model: BaselineNet, train: FeatureSet, stop: FeatureSet | None, cfg: TrainConfig
) -> FitResult:
    """Supervised training of the challenge baseline (early stopping on `stop`)."""
    return _fit(model, train, stop, cfg, baseline_loss, "baseline")


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
