"""Training steps on several processes: the train flow starts each step (pretraining, fold k)
under `torchrun` when train.nproc_per_node x train.nnodes > 1, and `merflow train-join` starts
the same steps on the other machines of a multi-node run.

Each rank runs this module's `main`: it maps the inputs the flow froze in the run folder and
checks their run key against its own settings (tasks/training/steps.py `step_inputs`, as the flow's
own process does), joins the process group torchrun set up, trains its share of every batch
(models/distributed.py) and rank 0 writes the step's folder (checkpoint, outputs, done.json),
exactly what the single-process step writes. A step that fails leaves no done.json, so a rerun
(or Prefect's retry) starts it again. Rank 0's epoch reports (models/training.py) reach the
parent as EPOCH_MARK lines, which `launch` turns back into reports.

    python -m torch.distributed.run --standalone --nproc-per-node 2 -m flows.train_worker \\
        --step fold-0 --key KEY --run-dir RUN --profile demo
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from torch.distributed.elastic.multiprocessing.errors import record

from flows.config import TrainSettings, load_settings
from models.distributed import init_from_env, local_device, shutdown
from models.settings import available_cpus
from tasks.engine.errors import MerflowError

if TYPE_CHECKING:
    from models.epoch_reports import EpochReport

log = logging.getLogger(__name__)


# A rank prints its user-facing error after this mark; launch() puts it first in its own.
ERROR_MARK = "merflow-error:"
# Rank 0 prints each epoch report as JSON after this mark; launch() logs it again.
EPOCH_MARK = "merflow-epoch:"


class DistributedStepError(MerflowError):
    """A training step failed under torchrun; its folder holds no done.json."""


def worker_args(
    step: str, key: str, run_dir: str, profile: str, overrides: Sequence[str]
) -> list[str]:
    """Command-line arguments of `flows.train_worker` for one step."""
    args = ["--step", step, "--key", key, "--run-dir", run_dir, "--profile", profile]
    for o in overrides:
        args += ["--override", o]
    return args


def torchrun_command(ts: TrainSettings, rdzv_id: str, args: Sequence[str]) -> list[str]:
    """The torchrun command line of one step. One machine without an endpoint: --standalone
    (torchrun picks a free loopback port). Several: a c10d rendezvous at train.rdzv_endpoint,
    the same rdzv id on every machine."""
    cmd = [sys.executable, "-m", "torch.distributed.run"]
    cmd += ["--nproc-per-node", str(ts.nproc_per_node), "--max-restarts", "0"]
    if ts.nnodes == 1 and not ts.rdzv_endpoint:
        cmd += ["--standalone"]
    else:
        cmd += ["--nnodes", str(ts.nnodes), "--rdzv-backend", "c10d"]
        cmd += ["--rdzv-endpoint", str(ts.rdzv_endpoint), "--rdzv-id", rdzv_id]
    return [*cmd, "-m", "flows.train_worker", *args]


def check_devices(ts: TrainSettings, gpus: int | None = None) -> None:
    """Refuse, before starting anything, more GPU processes than this machine has GPUs."""
    import torch

    gpus = torch.cuda.device_count() if gpus is None else gpus
    wants_gpu = ts.device == "cuda" or (ts.device == "auto" and gpus > 0)
    if wants_gpu and ts.nproc_per_node > gpus:
        raise MerflowError(
            f"train.nproc_per_node={ts.nproc_per_node} but this machine has {gpus} GPU(s); set "
            f"train.nproc_per_node={max(gpus, 1)} (one process per GPU), or train.device=cpu"
        )


def launch(
    ts: TrainSettings,
    step: str,
    key: str,
    args: Sequence[str],
    emit: Callable[[str], None] = print,
    threads: int | None = None,
) -> None:
    """Run one step under torchrun, streaming its output through `emit`, and rank 0's epoch
    reports through this process's training logger (models/training.py `log_epoch`), as if it
    trained the step itself; raise DistributedStepError (with the last lines) when any rank
    fails. `threads`: each process's threads (default: its share of this worker's cores)."""
    from models.epoch_reports import log_epoch

    check_devices(ts)
    cmd = torchrun_command(ts, f"merflow-{key}-{step}", args)
    emit(f"{step}: {ts.world_size} processes: {' '.join(cmd)}")
    tail: collections.deque[str] = collections.deque(maxlen=40)
    reasons: list[str] = []  # what the ranks said was wrong (ERROR_MARK lines)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # torchrun sets one thread per process only when it starts several; share the cores out
    # always, or CPU ranks (and a CPU-bound flow beside them) oversubscribe the machine.
    per_process = str(threads or ts.process_threads(available_cpus()))
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = per_process
    with subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            report = _epoch_report(line)
            if report is not None:
                tail.append(report.line())
                log_epoch(report)
                continue
            tail.append(line)
            if ERROR_MARK in line and len(reasons) < 8:
                reasons.append(line.split(ERROR_MARK, 1)[1].strip())
            emit(line)
        code = proc.wait()
    if code != 0:
        why = "; ".join(dict.fromkeys(reasons)) or "see the last lines below"
        last = "\n".join(tail)
        raise DistributedStepError(
            f"training step {step} failed under torchrun (exit {code}): {why}. It wrote no "
            f"done.json, so rerunning the flow starts it again. Last lines:\n{last}"
        )


def _epoch_report(line: str) -> EpochReport | None:
    """The epoch report an EPOCH_MARK line carries; None for any other (or a garbled) line."""
    if EPOCH_MARK not in line:
        return None
    from models.epoch_reports import EpochReport

    try:
        return EpochReport.from_json(line.split(EPOCH_MARK, 1)[1])
    except (ValueError, TypeError):
        return None


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="flows.train_worker", description=__doc__)
    p.add_argument("--step", required=True, help="pretrain or fold-K")
    p.add_argument("--key", required=True, help="the run key the flow computed")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--profile", required=True)
    p.add_argument("--override", action="append", default=[])
    return p.parse_args(argv)


class _EpochMarks(logging.Filter):
    """Epoch records (models/training.py) as one EPOCH_MARK line of JSON each."""

    def filter(self, record: logging.LogRecord) -> bool:
        from models.epoch_reports import EPOCH_RECORD

        report = getattr(record, EPOCH_RECORD, None)
        if report is not None:
            record.msg, record.args = f"{EPOCH_MARK} {report.to_json()}", ()
        return True


@record  # torchrun's failure summary then shows the first failing rank's traceback
def main(argv: Sequence[str] | None = None) -> None:
    """One rank of one training step."""
    try:
        _main(argv)
    except MerflowError as e:
        print(f"rank {os.environ.get('RANK', '0')} {ERROR_MARK} {e}", flush=True)
        raise


def _main(argv: Sequence[str] | None) -> None:
    # The flow imports this module: import the training code late.
    from tasks.training.inputs import INPUTS
    from tasks.training.steps import run_step, step_inputs

    a = _parse(argv)
    rank = int(os.environ.get("RANK", "0"))
    # force: this process's logging is the rank's own, whatever an import configured first
    # (Prefect's root WARNING level would swallow rank 0's INFO lines and epoch reports).
    logging.basicConfig(
        force=True,
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(_EpochMarks())
    settings = load_settings(a.profile, a.override)
    started = time.perf_counter()
    data, recipe = step_inputs(Path(a.run_dir), a.key, settings.train)
    mapped = Path(a.run_dir) / INPUTS
    log.info("inputs mapped from %s in %.2f s", mapped, time.perf_counter() - started)
    w = init_from_env(settings.train.dist_backend, recipe.train.device)
    train = dataclasses.replace(recipe.train, device=local_device(recipe.train.device, w))
    recipe = dataclasses.replace(recipe, train=train)
    log.info("%s: rank %d of %d on %s (%s)", a.step, w.rank, w.size, train.device, w.backend)
    try:
        run_step(a.step, Path(a.run_dir), data, recipe)
    finally:
        shutdown()


if __name__ == "__main__":
    main()
