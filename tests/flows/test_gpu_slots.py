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

from tasks import gpu_slots
from tasks.gpu_slots import (
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
