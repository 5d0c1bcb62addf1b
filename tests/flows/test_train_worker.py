"""The torchrun command lines of training steps and the checks made before launching one."""

from __future__ import annotations

import pytest

from flows.config import SettingsError, load_settings
from flows.train_worker import check_devices, torchrun_command, worker_args
from tasks.engine.errors import MerflowError


def _train(*overrides: str):
    return load_settings("demo", list(overrides)).train


def test_one_machine_is_standalone_several_meet_at_the_endpoint():
    args = worker_args("fold-1", "k", "/r/run", "demo", ["a=1"])
    assert args[-2:] == ["--override", "a=1"] and "/r/run" in args
    one = torchrun_command(_train("train.nproc_per_node=4"), "id", args)
    assert "--standalone" in one and one[one.index("--nproc-per-node") + 1] == "4"
    assert one[one.index("-m", 3) + 1] == "flows.train_worker"
    many = torchrun_command(
        _train("train.nnodes=3", "train.rdzv_endpoint=node0:29400", "train.nproc_per_node=2"),
        "merflow-k-fold-1",
        args,
    )
    assert "--standalone" not in many
    for flag, value in (
        ("--nnodes", "3"),
        ("--rdzv-endpoint", "node0:29400"),
        ("--rdzv-id", "merflow-k-fold-1"),
        ("--rdzv-backend", "c10d"),
    ):
        assert many[many.index(flag) + 1] == value


def test_bad_launch_settings_are_refused_before_anything_starts():
    with pytest.raises(SettingsError, match="rdzv_endpoint"):
        _train("train.nnodes=2")
    with pytest.raises(MerflowError, match="nproc_per_node=4 but this machine has 2 GPU"):
        check_devices(_train("train.nproc_per_node=4", "train.device=auto"), gpus=2)
    check_devices(_train("train.nproc_per_node=4", "train.device=cpu"), gpus=0)  # CPU ranks
    check_devices(_train("train.nproc_per_node=2", "train.device=auto"), gpus=2)


def test_a_failing_rank_fails_the_step_with_its_reason(tmp_path):
    """A step whose ranks fail (here: a run folder without frozen inputs) raises with the
    ranks' last lines and leaves no done.json behind."""
    from flows.train_worker import DistributedStepError, launch

    ts = _train("train.nproc_per_node=2")
    run_dir = tmp_path / "runs" / "train-k"
    args = worker_args("pretrain", "k", str(run_dir), "demo", [])
    lines: list[str] = []
    with pytest.raises(DistributedStepError, match="pretrain failed under torchrun") as err:
        launch(ts, "pretrain", "k", args, emit=lines.append)
    assert "no training inputs under" in str(err.value)  # the worker's own error reaches the user
    assert any("torch.distributed.run" in line for line in lines)
    assert not (run_dir / "pretrain" / "done.json").exists()
