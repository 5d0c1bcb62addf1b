"""What the training loops (models/training.py) tell while they run: one EpochReport per finished
epoch and, inside a long epoch, a BatchProgress line every PROGRESS_EVERY_S seconds; both are
INFO records of the `models.training` logger with the report attached."""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from models.distributed import world

log = logging.getLogger("models.training")  # the loops' logger: one stream of training news


# Every finished epoch is one INFO record of this module's logger, carrying its EpochReport
# under this attribute: the one path by which the terminal, the Prefect run (flows/train.py)
# and the parent of a torchrun rank (flows/train_worker.py) learn how training goes.
EPOCH_RECORD = "merflow_epoch"

_stage: contextvars.ContextVar[str | None] = contextvars.ContextVar("training_stage", default=None)


@contextlib.contextmanager
def training_stage(name: str) -> Iterator[None]:
    """Name the training stage the loops run in (e.g. `fold-0 step1`) for their epoch reports."""
    token = _stage.set(name)
    try:
        yield
    finally:
        _stage.reset(token)


@dataclass(frozen=True)
class EpochReport:
    """One finished epoch of a training stage: losses, early-stopping scores, wall time."""

    stage: str  # `pretrain` or `fold-K PART` (models/recipe.py names them)
    epoch: int
    epochs: int  # the stage's most epochs; early stopping may end it sooner
    stats: dict[str, float]
    seconds: float

    def line(self) -> str:
        """`fold-0 step1: epoch 3/20 loss=1.2345 ... val_waf=0.8123 (1.2 s)`."""
        stats = " ".join(f"{k}={v:.4f}" for k, v in self.stats.items())
        return f"{self.stage}: epoch {self.epoch}/{self.epochs} {stats} ({self.seconds:.1f} s)"

    def to_json(self) -> str:
        """One line of JSON (how a torchrun rank hands it to its parent)."""
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> EpochReport:
        """The report `to_json` wrote."""
        return cls(**json.loads(text))


def log_epoch(report: EpochReport) -> None:
    """Log a finished epoch: its line, with the report attached (EPOCH_RECORD)."""
    log.info("%s", report.line(), extra={EPOCH_RECORD: report})


# Inside an epoch, rank 0 logs where it is every PROGRESS_EVERY_S seconds: an INFO record of
# this module's logger carrying a BatchProgress under PROGRESS_RECORD (a pretraining epoch on
# MER2024's 115k clips takes many minutes on CPU).
PROGRESS_RECORD = "merflow_progress"
PROGRESS_EVERY_S = 30.0


@dataclass(frozen=True)
class BatchProgress:
    """How far an epoch is: batches done of its batches, rows per second so far."""

    stage: str
    epoch: int
    epochs: int
    batches: int
    of: int
    rows: int
    seconds: float

    def line(self) -> str:
        """`pretrain: epoch 1/40 batch 120/226 (61440 rows, 512 rows/s)`."""
        rate = self.rows / max(self.seconds, 1e-9)
        return (
            f"{self.stage}: epoch {self.epoch}/{self.epochs} batch {self.batches}/{self.of} "
            f"({self.rows} rows, {rate:.0f} rows/s)"
        )


class EpochProgress:
    """Logs a BatchProgress of one epoch at most every PROGRESS_EVERY_S seconds (rank 0)."""

    def __init__(self, stage: str, epoch: int, epochs: int, of: int) -> None:
        self.stage, self.epoch, self.epochs, self.of = stage, epoch, epochs, of
        self.started = self.last = time.perf_counter()

    def batch_done(self, batches: int, rows: int) -> None:
        now = time.perf_counter()
        if now - self.last < PROGRESS_EVERY_S or batches == self.of or not world().main:
            return  # the epoch's own report follows the last batch
        self.last = now
        p = BatchProgress(
            self.stage, self.epoch, self.epochs, batches, self.of, rows, now - self.started
        )
        log.info("%s", p.line(), extra={PROGRESS_RECORD: p})


def current_stage(default: str) -> str:
    """The stage named by `training_stage`, else `default`."""
    return _stage.get() or default


def report_epoch(default: str, epoch: int, epochs: int, stats: dict, started: float) -> None:
    """An epoch's report, from rank 0 only (every rank has the same losses and scores)."""
    if world().main:
        seconds = time.perf_counter() - started
        log_epoch(EpochReport(_stage.get() or default, epoch, epochs, dict(stats), seconds))
