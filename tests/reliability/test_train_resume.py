"""SIGKILL training in the middle of a fold; the rerun resumes from the last finished step:
pretraining and finished folds are neither retrained nor rewritten."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from data_contracts.atomic import FAULT_ENV
from flows.extract import extract_flow
from flows.server import client_env
from flows.train import train_flow
from tasks.training.steps import load_fold
from tests.reliability.helpers import REPO

pytestmark = pytest.mark.server

DRIVER = Path(__file__).with_name("train_driver.py")
FAST = [
    "train.n_splits=2",
    "train.max_epochs=2",
    "train.final_epochs=2",
    "train.pretrain_epochs=1",
    "train.patience=1",
]


def fingerprint(folder: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime) of every file under a step folder: a rewrite changes both."""
    return {
        str(p.relative_to(folder)): (p.stat().st_ino, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_killed_training_resumes_from_the_last_finished_step(
    prefect_server, corpus, tmp_path, model_overrides
):
    root = tmp_path / "root"
    overrides = [*model_overrides, *FAST]
    extract_flow(str(corpus), profile="demo", data_root=str(root), overrides=model_overrides)

    env = {
        **os.environ,
        **client_env(Path(prefect_server.home).parent, prefect_server.api_url),
        "PYTHONPATH": str(REPO),
        # Killed while fold 1 writes its outputs: its model is saved, its step is not done.
        FAULT_ENV: "/fold-1/outputs.npz:1",
    }
    proc = subprocess.run(
        [sys.executable, str(DRIVER), str(corpus), str(root), *overrides],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == -signal.SIGKILL, (proc.stdout + proc.stderr)[-3000:]
    (run_dir,) = (root / "runs").glob("train-*")
    assert (run_dir / "pretrain" / "done.json").is_file()
    assert (run_dir / "fold-0" / "done.json").is_file()
    assert not (run_dir / "fold-1" / "done.json").exists()
    finished = {step: fingerprint(run_dir / step) for step in ("pretrain", "fold-0")}

    report = train_flow(str(corpus), profile="demo", data_root=str(root), overrides=overrides)
    assert Path(report["run_dir"]) == run_dir
    assert len(report["fold_waf"]) == 2
    for step, files in finished.items():
        assert fingerprint(run_dir / step) == files, f"{step} was redone after the crash"
    fold1 = run_dir / "fold-1"
    assert (fold1 / "done.json").is_file()
    # The killed write's dot-named temporary file may remain; only the renamed file is read.
    summary, arrays = load_fold(fold1)
    assert summary and "val_index" in arrays
