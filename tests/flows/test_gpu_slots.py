"""GPU slots: one Prefect global concurrency limit per machine and device, created on first use
with the configured slots, that bounds the work on that device only; nothing at all on a CPU.

The machine has no GPU: fake device counts and host names stand in for GPU machines; the limits
are real ones on the session's Prefect server.
"""

from __future__ import annotations

import contextvars
import threading
import time
import uuid

import pytest

from tasks.engine import gpu_slots
from tasks.engine.gpu_slots import (
    device_index,
    ensure_gpu_slots,
    gpu_slot,
    physical_device,
    slot_name,
)


def _host() -> str:
    return f"node-{uuid.uuid4().hex[:8]}"


def _limits(prefix: str) -> dict[str, int]:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        found = client.read_global_concurrency_limits(limit=200)
    return {lim.name: lim.limit for lim in found if lim.name.startswith(prefix)}


def _active(name: str) -> int:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_global_concurrency_limit_by_name(name).active_slots


def test_names_say_machine_and_device():
    assert slot_name(0, host="GPU-Box.lab") == "gpu:gpu-box.lab:0"
    assert slot_name("GPU-5d1e/7", host="a b") == "gpu:a-b:gpu-5d1e-7"
    assert slot_name(1).startswith("gpu:") and slot_name(1).endswith(":1")
    # The device as the machine knows it: what CUDA_VISIBLE_DEVICES mapped cuda:i to.
    assert physical_device(0, "") == "0"
    assert physical_device(1, "2,3") == "3"
    assert physical_device(0, "GPU-8f2c") == "GPU-8f2c"
    assert physical_device(2, "5") == "2"  # beyond the list: the index itself


def test_device_index_reads_every_way_of_naming_a_device():
    assert device_index("cpu", count=4) is None
    assert device_index("auto", count=0) is None  # a CPU-only machine
    assert device_index("cuda:0", count=0) is None
    assert device_index("auto", count=2) == 0
    assert device_index("cuda:1", count=2) == 1
    assert device_index(1, count=2) == 1
    assert device_index("mps", count=2) is None


def test_this_cpu_machine_creates_nothing_and_never_asks_the_server(monkeypatch):
    # No server answers here: any call to it would fail (or hang), so none may be made.
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.setattr(gpu_slots, "_upsert", lambda *a: pytest.fail("server asked"))
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        started = time.monotonic()
        assert ensure_gpu_slots(2) == []
        for device in ("auto", "cuda", "cpu", None):
            with gpu_slot(device) as held:
                assert held == []
        assert time.monotonic() - started < 5


def test_no_api_no_slot(monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.setattr(gpu_slots, "_upsert", lambda *a: pytest.fail("server asked"))
    with temporary_settings({PREFECT_API_URL: None}), gpu_slot("cuda:0", count=1) as held:
        assert held == []


@pytest.mark.server
def test_one_limit_per_machine_and_device_with_the_configured_slots(prefect_server):
    a, b = _host(), _host()
    assert ensure_gpu_slots(2, devices=["0", "1"], host=a) == [f"gpu:{a}:0", f"gpu:{a}:1"]
    assert ensure_gpu_slots(1, devices=["0"], host=b) == [f"gpu:{b}:0"]
    # A second machine's limits leave the first one's alone.
    assert _limits(f"gpu:{a}:") == {f"gpu:{a}:0": 2, f"gpu:{a}:1": 2}
    assert _limits(f"gpu:{b}:") == {f"gpu:{b}:0": 1}
    # Again: nothing duplicated; a changed setting resizes the machine's limits.
    ensure_gpu_slots(2, devices=["0", "1"], host=a)
    assert _limits(f"gpu:{a}:") == {f"gpu:{a}:0": 2, f"gpu:{a}:1": 2}
    ensure_gpu_slots(3, devices=["0", "1"], host=a)
    assert _limits(f"gpu:{a}:") == {f"gpu:{a}:0": 3, f"gpu:{a}:1": 3}


@pytest.mark.server
def test_a_slot_bounds_its_device_only(prefect_server):
    host, other = _host(), _host()
    name = f"gpu:{host}:0"
    assert name not in _limits("gpu:")
    held = threading.Event()
    release = threading.Event()

    def first() -> None:
        with gpu_slot("cuda:0", slots_per_device=1, host=host, count=2):
            held.set()
            release.wait(60)

    # Prefect runs tasks in threads that carry the caller's context (its API settings).
    t = threading.Thread(target=contextvars.copy_context().run, args=(first,))
    t.start()
    try:
        assert held.wait(60)
        assert _limits(name) == {name: 1}  # created on first use, with the configured slots
        assert _active(name) == 1
        # The same device of the same machine is full: a second shard waits for it.
        with pytest.raises(TimeoutError), gpu_slot("cuda:0", host=host, count=2, timeout_seconds=2):
            pytest.fail("took a slot of a full device")
        # Another device of that machine, and the same device index of another machine, are not.
        with gpu_slot("cuda:1", host=host, count=2, timeout_seconds=10) as names:
            assert names == [f"gpu:{host}:1"]
        with gpu_slot("cuda:0", host=other, count=1, timeout_seconds=10) as names:
            assert names == [f"gpu:{other}:0"]
    finally:
        release.set()
        t.join(60)
    # Released when the block ended: the next shard gets the device.
    assert _active(name) == 0
    with gpu_slot("cuda:0", host=host, count=2, timeout_seconds=10) as names:
        assert names == [name] and _active(name) == 1
    assert _active(name) == 0


@pytest.mark.server
def test_a_multi_gpu_step_takes_every_device_it_uses(prefect_server):
    host = _host()
    with gpu_slot("cuda", n_devices=2, host=host, count=2, timeout_seconds=10) as names:
        assert names == [f"gpu:{host}:0", f"gpu:{host}:1"]
        assert [_active(n) for n in names] == [1, 1]
        with pytest.raises(TimeoutError), gpu_slot("cuda:1", host=host, count=2, timeout_seconds=2):
            pytest.fail("took a slot of a device a running step holds")


# -- CPU cores: a per-machine budget in lock files, no server -------------------------------------


@pytest.fixture
def quiet(monkeypatch):
    """This machine as if nothing outside the budget ran on it (its real load varies)."""
    monkeypatch.setattr(gpu_slots, "busy_elsewhere", lambda in_budget: 0)


def test_fair_share_gives_small_wants_theirs_and_splits_the_rest():
    from tasks.engine.gpu_slots import fair_share

    assert fair_share(2, [2], 2) == 2  # alone: all it wants
    assert fair_share(8, [4], 4) == 4
    assert fair_share(2, [2, 2], 2) == 1  # two trainings on 2 cores: one each
    assert fair_share(8, [1, 8, 8], 8) == 3  # 1 for the small one, 7 split: 3 (rounded down)
    assert fair_share(8, [1, 8, 8], 1) == 1
    assert fair_share(2, [2, 2, 2], 2) == 1  # never 0: at least one thread


def test_a_neighbour_halves_the_share_and_its_end_gives_it_back(tmp_path, quiet):
    from tasks.engine.gpu_slots import cpu_cores, current_claim

    cores = [0, 1, 2, 3]
    with cpu_cores(4, folder=tmp_path, cores=cores, what="first") as first:
        assert first.threads == 4 and sorted(first.held) == cores and current_claim() is first
        with cpu_cores(4, folder=tmp_path, cores=cores, what="second") as second:
            # Every core is held: the newcomer computes with one thread until the first looks.
            assert second.threads == 1 and not second.held and second.jobs == 2
            assert first.rebalance() == 2 and len(first.held) == 2
            assert second.rebalance() == 2
            assert set(first.held).isdisjoint(second.held)
            assert current_claim() is second
        assert current_claim() is first
        assert first.rebalance() == 4  # the neighbour ended: its cores come back
    assert not list(tmp_path.glob("job-*"))  # a finished job leaves no file


def test_an_explicit_thread_count_wins_and_still_makes_room(tmp_path, quiet):
    from tasks.engine.gpu_slots import cpu_cores

    cores = [0, 1]
    with cpu_cores(2, explicit=3, folder=tmp_path, cores=cores) as fixed:
        assert fixed.threads == 3 and fixed.record()["explicit"]
        with cpu_cores(2, folder=tmp_path, cores=cores) as other:
            # The explicit job wants 3 > 2 cores: the other gets the floor of one thread.
            assert other.rebalance() == 1 and fixed.rebalance() == 3


def test_use_sets_torch_threads_of_the_calling_thread_and_records_them(tmp_path, quiet):
    import torch

    from tasks.engine.gpu_slots import cpu_cores

    before = torch.get_num_threads()
    try:
        with cpu_cores(2, folder=tmp_path, cores=[0, 1]) as claim:
            assert claim.use(force=True) == 2 and torch.get_num_threads() == 2
            with cpu_cores(2, folder=tmp_path, cores=[0, 1]):
                claim.use(force=True)
                assert torch.get_num_threads() == 1
            claim.use(force=True)
        assert claim.record() | {"jobs": 0} == {
            "threads": 2,
            "threads_min": 1,
            "threads_max": 2,
            "wanted": 2,
            "explicit": False,
            "machine_cores": 2,
            "busy_elsewhere": 0,
            "jobs": 0,
        }
        assert claim.env() == {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
    finally:
        torch.set_num_threads(before)


def test_cores_busy_with_work_outside_the_budget_are_left_out(tmp_path, monkeypatch):
    from tasks.engine.gpu_slots import busy_elsewhere, cpu_cores

    monkeypatch.setattr(gpu_slots.os, "getloadavg", lambda: (6.7, 0.0, 0.0))
    assert busy_elsewhere(2) == 4  # rounded down: a fraction of a core is nobody's
    with cpu_cores(4, folder=tmp_path, cores=[0, 1, 2, 3]) as claim:
        # Load 6.7 with this job's one thread: 5 cores' worth of others' work, all but one.
        assert claim.threads == 1 and claim.busy == 3
        assert "3 busy with other work" in claim.line()
    monkeypatch.setattr(gpu_slots.os, "getloadavg", lambda: (0.2, 0.0, 0.0))
    with cpu_cores(4, folder=tmp_path, cores=[0, 1, 2, 3]) as claim:
        assert claim.threads == 4 and claim.busy == 0
        # Its own 4 threads make the load 4: not work outside the budget.
        monkeypatch.setattr(gpu_slots.os, "getloadavg", lambda: (4.3, 0.0, 0.0))
        assert claim.rebalance() == 4


def test_a_killed_job_frees_its_cores_at_once(tmp_path, quiet):
    import signal
    import subprocess
    import sys

    from tasks.engine.gpu_slots import cpu_cores

    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from tasks.engine.gpu_slots import cpu_cores\n"
        "with cpu_cores(2, folder=Path(sys.argv[1]), cores=[0, 1]):\n"
        "    print('held', flush=True)\n"
        "    time.sleep(600)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        with cpu_cores(2, folder=tmp_path, cores=[0, 1]) as claim:
            assert claim.threads == 1 and claim.jobs == 2
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    # No cleanup ran: the lock of its job file went with the process, so the file is stale.
    with cpu_cores(2, folder=tmp_path, cores=[0, 1]) as claim:
        assert claim.threads == 2 and claim.jobs == 1
    assert not list(tmp_path.glob("job-*"))


def test_a_training_step_follows_its_share_at_each_epoch_and_keeps_its_counts(
    tmp_path, monkeypatch, quiet
):
    import json
    import logging

    import torch

    from flows.train import _cores
    from models.epoch_reports import EpochReport, log_epoch
    from tasks.engine.gpu_slots import cpu_cores

    monkeypatch.setenv("MERFLOW_CPU_DIR", str(tmp_path / "cpus"))
    monkeypatch.setattr(gpu_slots, "machine_cores", lambda: [0, 1])
    monkeypatch.setattr(gpu_slots.CpuClaim, "REFRESH_SECONDS", 0.0)
    epochs = logging.getLogger("models.training")
    level, before = epochs.level, torch.get_num_threads()
    epochs.setLevel(logging.INFO)  # as while the train flow watches its run
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    try:
        with _cores("pretrain", str(run_dir), 2, None, follow=True) as claim:
            assert claim is not None and claim.threads == 2 == torch.get_num_threads()
            with cpu_cores(2, what="a second training"):
                log_epoch(EpochReport("pretrain", 1, 3, {}, 0.1))
                assert claim.threads == 1 == torch.get_num_threads()
            log_epoch(EpochReport("pretrain", 2, 3, {}, 0.1))
            assert claim.threads == 2 == torch.get_num_threads()
    finally:
        epochs.setLevel(level)
        torch.set_num_threads(before)
    record = json.loads((run_dir / "threads" / "pretrain.json").read_text())
    assert (record["threads_min"], record["threads_max"], record["threads"]) == (1, 2, 2)
    (run_dir / "pretrain").mkdir()
    (run_dir / "pretrain" / "done.json").write_text("{}")
    with _cores("pretrain", str(run_dir), 2, None, follow=True) as claim:
        assert claim is None  # a step already done claims nothing
