"""The training loop every stage of the recipe runs (pretraining, fine-tuning, the baseline), and
prediction. The recipe that calls them (folds, oversampling, pseudo labels, voting) is
models/recipe.py; the loss each stage minimises is models/losses.py; the scores are
models/metrics.py; what the loop logs as it goes is models/epoch_reports.py.

Read top to bottom: loop settings; batches and the DDP wrapper (all a rank of a torchrun job
does differently); early stopping; `fit`, the loop every stage runs with its loss (pretraining,
fine-tuning, the baseline: models/recipe.py calls it with each); predict.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from data_contracts.labels import CLASSIFIERS, NUM_CLASSES
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
from models.epoch_reports import EpochProgress, current_stage, report_epoch
from models.featureset import (
    UNLABELLED,
    FeatureSet,
    TensorBatch,
    as_index_tensor,
    take,
    to_tensors,
)
from models.losses import pretrain_loss
from models.metrics import waf
from models.mrccl import MRCCL
from models.settings import default

log = logging.getLogger(__name__)

# A stage's loss (models/losses.py): (model, this rank's rows, the whole batch, gather) ->
# (loss, its terms as floats).
StageLoss = Callable[[nn.Module, TensorBatch, TensorBatch, Gather], tuple[torch.Tensor, dict]]


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


# ----------------------------------------------------------------------------- batches and DDP


def _batches(n: int, batch_size: int, rng: np.random.Generator | None) -> Iterator[np.ndarray]:
    """Row indices in batches of min(batch_size, n); shuffled when an rng is given."""
    order = rng.permutation(n) if rng is not None else np.arange(n)
    size = max(1, min(batch_size, n))
    for start in range(0, n, size):
        yield order[start : start + size]


def _labels_and_presence(data: TensorBatch, index: torch.Tensor) -> TensorBatch:
    """Rows `index` without their features (what a loss needs of the whole batch): labels,
    presence and video groups (the contrastive terms compare groups across the whole batch)."""
    return TensorBatch(
        features={},
        present={m: v.index_select(0, index) for m, v in data.present.items()},
        labels=data.labels.index_select(0, index),
        groups=None if data.groups is None else data.groups.index_select(0, index),
    )


def _split_batch(
    data: TensorBatch, idx: np.ndarray, w: World
) -> tuple[TensorBatch, TensorBatch, Gather]:
    """The global batch of rows `idx` as this rank sees it: (its own share, to forward; the whole
    batch's labels and presence, for the loss; the gather from the one to the other). Every rank
    draws the same batches, so a global batch holds the rows of a single-process run. In one
    process: (the batch, the batch, the identity)."""
    device = data.labels.device
    whole_index = as_index_tensor(idx, device)
    if not w.distributed:
        batch = take(data, whole_index)
        return batch, batch, no_gather
    mine, sizes = shard_batch(idx, w)
    local = take(data, as_index_tensor(mine, device))
    return local, _labels_and_presence(data, whole_index), RowGather(sizes, device)


class _ModelWithLoss(nn.Module):
    """A model and its stage loss as one module, for DDP to wrap: the parameters the loss uses
    after the gather (heads, temperatures) are then DDP's too."""

    def __init__(self, model: nn.Module, loss: StageLoss) -> None:
        super().__init__()
        self.model, self.loss = model, loss

    def forward(self, local: TensorBatch, whole: TensorBatch, gather: Gather):
        return self.loss(self.model, local, whole, gather)


def _loss_on_ranks(
    model: nn.Module, loss: StageLoss, w: World
) -> Callable[[TensorBatch, TensorBatch, Gather], tuple[torch.Tensor, dict]]:
    """A batch's loss: `loss` of `model` in one process; under torchrun the two wrapped in
    DistributedDataParallel, which averages the gradients over the ranks."""
    if not w.distributed:
        return functools.partial(loss, model)
    # Unused parameters are normal here: the classifiers during pretraining, the contrastive
    # heads when lambda_con is 0. device_ids=None: inputs are already on the rank's device.
    return nn.parallel.DistributedDataParallel(
        _ModelWithLoss(model, loss), find_unused_parameters=True
    )


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


# ----------------------------------------------------------------------------- early stopping


def _state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class _EarlyStop:
    """Early stopping on rows a stage does not train on (docs/method.md §7): after every epoch
    `scores(data)` (data: the stage's tensors) gives held-out scores, and patience on the one
    named `watch` keeps the best epoch's weights, says when to stop, and puts the best weights
    back at the end. `higher`: a higher score is better (WAF); else lower (a loss)."""

    def __init__(
        self,
        patience: int,
        scores: Callable[[TensorBatch], dict[str, float]],
        watch: str,
        higher: bool,
    ) -> None:
        self.patience, self.scores, self.watch, self.higher = patience, scores, watch, higher
        self.best = -float("inf") if higher else float("inf")
        self.best_epoch, self.state, self.stale = 0, None, 0

    def should_stop(self, model: nn.Module, epoch: int, stats: dict[str, float]) -> bool:
        """Record the score of `epoch`; True once `patience` epochs in a row did no better."""
        score = stats[self.watch]
        if score > self.best if self.higher else score < self.best:
            self.best, self.best_epoch, self.state, self.stale = score, epoch, _state_copy(model), 0
            return False
        self.stale += 1
        return self.stale >= self.patience

    def restore(self, model: nn.Module) -> None:
        """Load the best epoch's weights (nothing when no score was recorded)."""
        if self.state is not None:
            model.load_state_dict(self.state)


# ----------------------------------------------------------------------------- the loop


@dataclass
class FitResult:
    """Per-epoch history of a stage and the epoch whose state the model ends with."""

    history: list[dict[str, float]]
    best_epoch: int
    best_val_waf: float | None  # on the early-stopping set; None without one


def fit(
    model: nn.Module,
    data: FeatureSet,
    cfg: TrainConfig,
    loss: StageLoss,
    stage: str,
    epochs: int | None = None,
    *,
    stop: FeatureSet | None = None,
    held_out: np.ndarray | None = None,
) -> FitResult:
    """Train `model` on `data` by minimising `loss` (models/losses.py) for at most `epochs`
    (default cfg.max_epochs). The epoch kept (docs/method.md §7): with `stop`, a labelled
    early-stopping set, the best WAF on it; with `held_out`, rows of `data` not trained on
    (pretraining), the lowest loss on them; with neither, the last. Training ends after
    cfg.patience epochs without a better score. `stage` names the epochs in the report lines
    when no training_stage does.
    """
    early, rows = _early_stopping(model, data, cfg, loss, stop, held_out)
    epochs = cfg.max_epochs if epochs is None else epochs
    w = world()
    torch.manual_seed(cfg.seed + RANK_SEED_STRIDE * w.rank)  # dropout, NEE; rank 0 = one process
    rng = np.random.default_rng(cfg.seed)  # the same on every rank: one batch order
    model.to(cfg.device)
    tensors = to_tensors(data, cfg.device)  # the rows not trained on stay on the device too
    loss_of = _loss_on_ranks(model, loss, w)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    n = len(data) if rows is None else len(rows)
    of = -(-n // max(1, min(cfg.batch_size, n)))  # the batches of _batches
    history: list[dict[str, float]] = []
    for epoch in range(1, epochs + 1):
        started = time.perf_counter()
        progress = EpochProgress(current_stage(stage), epoch, epochs, of)
        model.train()
        sums: dict[str, float] = {}
        done = 0
        for batches, idx in enumerate(_batches(n, cfg.batch_size, rng), 1):
            idx = idx if rows is None else rows[idx]
            local, whole, gather = _split_batch(tensors, idx, w)
            value, terms = loss_of(local, whole, gather)
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            optimizer.step()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v * len(idx)
            done += len(idx)
            progress.batch_done(batches, done)
        stats = {k: v / n for k, v in sums.items()}  # each term's mean over the epoch's rows
        if early is not None:
            stats |= early.scores(tensors)  # the same on every rank: all stop at one epoch
        history.append({"epoch": epoch, **stats})  # no wall time in it: a rerun's is identical
        report_epoch(stage, epoch, epochs, stats, started)
        if early is not None and early.should_stop(model, epoch, stats):
            break
    if early is None:
        return FitResult(history, len(history), None)  # the last epoch is kept
    early.restore(model)
    return FitResult(history, early.best_epoch, early.best)


# ----------------------------------------------------------------------------- the stages


@torch.no_grad()
def _held_out_loss(
    model: MRCCL, data: TensorBatch, held: np.ndarray, batch_size: int, seed: int
) -> float:
    """Pretraining's loss on the rows `held` of `data` (eval mode, batches in row order, the NEE
    noise drawn from `seed`): the same rows and noise every epoch, so epochs compare, and on
    every rank, so all ranks stop at the same epoch."""
    model.eval()
    device = data.labels.device
    devices = [torch.cuda.current_device()] if device.type == "cuda" else []
    total = 0.0
    with torch.random.fork_rng(devices=devices):  # training's random stream is left as it was
        torch.manual_seed(seed)
        for idx in _batches(len(held), batch_size, None):
            batch = take(data, as_index_tensor(held[idx], device))
            loss, _ = pretrain_loss(model, batch, batch)
            total += loss.item() * len(idx)
    return total / len(held)


def _early_stopping(
    model: nn.Module,
    data: FeatureSet,
    cfg: TrainConfig,
    loss: StageLoss,
    stop: FeatureSet | None,
    held_out: np.ndarray | None,
) -> tuple[_EarlyStop | None, np.ndarray | None]:
    """fit's early stopping and the rows it trains on (None: all of `data`).

    `stop` (supervised stages): the WAF of the voted scores on it, every rank seeing the same
    gathered probabilities; `data` and `stop` must be non-empty and fully labelled. `stop` must
    be rows the caller will not report scores on: a figure measured on the rows that chose the
    epoch is optimistic. `held_out` (pretraining):
    the pretraining loss on those rows of `data` (_held_out_loss); training takes the others.
    """
    if stop is not None and held_out is not None:
        raise ValueError("early stopping takes an early-stopping set or held-out rows, not both")
    if held_out is not None:
        held = np.sort(np.asarray(held_out, dtype=np.int64))
        rows = np.setdiff1d(np.arange(len(data)), held)
        if len(held) < 2 or len(rows) < 2:
            raise ValueError(
                f"pretraining's held-out rows ({len(held)}) and training rows ({len(rows)}) need "
                "two rows each (a contrastive term compares rows); hold out fewer or none"
            )

        def val_loss(tensors: TensorBatch) -> dict[str, float]:
            return {"val_loss": _held_out_loss(model, tensors, held, cfg.batch_size, cfg.seed)}

        return _EarlyStop(cfg.patience, val_loss, "val_loss", higher=False), rows
    if stop is None:
        return None, None
    for name, part in (("training", data), ("early-stopping", stop)):
        if (part.labels == UNLABELLED).any() or len(part) == 0:
            raise ValueError(f"the {name} set must be non-empty and fully labelled")

    def val_scores(_: TensorBatch) -> dict[str, float]:
        voted = predict(model, stop, cfg.eval_batch_size)["voted"]
        picked = np.clip(voted[np.arange(len(stop)), stop.labels], 1e-12, None)
        return {
            "val_ce": float(-np.log(picked).mean()),
            "val_waf": waf(stop.labels, voted.argmax(1)),
        }

    return _EarlyStop(cfg.patience, val_scores, "val_waf", higher=True), None


# ----------------------------------------------------------------------------- prediction


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
