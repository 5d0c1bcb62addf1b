"""DDP training (torchrun, 2 CPU processes, gloo) against a single-process run of the same
recipe: MR-CCL pretraining, fine-tuning, baseline, prediction (tests/models/ddp_worker.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from models.distributed import RowGather, World, shard_batch, share

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("ddp_worker.py")


def _run(args: list[str], out: Path, stochastic: bool) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [*args, str(WORKER), str(out), *(["--stochastic"] if stochastic else [])]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "history.json").read_text())


def _single_and_ddp(tmp_path: Path, stochastic: bool) -> tuple[dict, dict]:
    one = _run([sys.executable], tmp_path / "one", stochastic)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    two = _run([*torchrun, "--nproc-per-node", "2"], tmp_path / "two", stochastic)
    assert (one["world"], two["world"]) == (1, 2)
    return one, two


def _stats(history: dict) -> list[float]:
    return [
        v for stage in ("pretrain", "fine_tune", "baseline") for epoch in history[stage]
        for k, v in sorted(epoch.items()) if k != "epoch"
    ]  # fmt: skip


@pytest.mark.slow
def test_two_gloo_ranks_match_one_process(tmp_path: Path) -> None:
    one, two = _single_and_ddp(tmp_path, stochastic=False)
    # Every loss term, epoch by epoch (InfoNCE over the whole global batch, not per rank).
    np.testing.assert_allclose(_stats(two), _stats(one), rtol=1e-5, atol=1e-6)
    probs = [np.load(tmp_path / d / "probs.npy") for d in ("one", "two")]
    np.testing.assert_allclose(probs[1], probs[0], atol=1e-5)
    for name in ("mrccl.pt", "baseline.pt"):
        a, b = (torch.load(tmp_path / d / name) for d in ("one", "two"))
        assert a.keys() == b.keys()
        for key in a:
            x, y = a[key], b[key]
            if key.endswith("self_attn.in_proj_bias"):
                # The key bias has a zero gradient in exact arithmetic (softmax is shift
                # invariant); Adam turns its float noise into full-size steps. It changes no
                # output, so compare the query and value thirds only.
                third = x.shape[0] // 3
                x, y = (
                    torch.cat([x[:third], x[2 * third :]]),
                    torch.cat([y[:third], y[2 * third :]]),
                )
            torch.testing.assert_close(y, x, atol=1e-5, rtol=1e-4, msg=f"{name}: {key}")


@pytest.mark.slow
def test_dropout_and_nee_train_under_ddp(tmp_path: Path) -> None:
    """With dropout and NEE each rank draws its own noise, so runs differ like two seeds do;
    the validation loss (no randomness at evaluation) still agrees closely."""
    one, two = _single_and_ddp(tmp_path, stochastic=True)
    assert np.isfinite(_stats(two)).all()
    for stage in ("fine_tune", "baseline"):
        for e1, e2 in zip(one[stage], two[stage], strict=True):
            assert abs(e1["val_ce"] - e2["val_ce"]) < 0.02
    assert two["pretrain"][0]["l_intra"] > 0  # the NEE view was used


def test_shards_cover_a_batch_in_order() -> None:
    index = np.array([9, 4, 7, 1, 3])
    parts = [shard_batch(index, World(rank=r, size=2)) for r in range(2)]
    (rows0, sizes), (rows1, _) = parts
    assert sizes == [3, 2]
    assert rows0.tolist() == [9, 4, 7] and rows1.tolist() == [1, 3, 9]  # padded with row 9
    gather = RowGather(sizes)
    everything = torch.as_tensor(np.concatenate([rows0, rows1]))
    assert everything.index_select(0, gather.keep).tolist() == index.tolist()
    # A batch smaller than the world still gives every rank a row to forward.
    rows, sizes = shard_batch(np.array([5]), World(rank=1, size=2))
    assert sizes == [1, 0] and rows.tolist() == [5]
    assert [len(share(10, World(rank=r, size=3))[0]) for r in range(3)] == [4, 3, 3]
