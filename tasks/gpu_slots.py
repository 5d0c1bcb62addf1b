"""GPU slots per machine and device: Prefect global concurrency limits `gpu:<host>:<device>`.

A GPU-bound task takes one slot of the device it computes on (`gpu_slot`) around its model
work, so at most `extract.gpu_concurrency` shards share one GPU, on every machine: each machine
and device has its own limit, created on first use with the configured slots, and the limits of
one machine never hold back another. On a CPU-only machine (or a CPU device) nothing is created,
nothing is asked of the server and nothing waits. Without a Prefect API (a single task run
from the command line) there is no one to share a GPU with: nothing is taken either.

Devices are named as the machine knows them: the entry of CUDA_VISIBLE_DEVICES a process sees
as `cuda:i` (an index or a GPU UUID), else `i`, so two worker processes that were each given
another GPU by CUDA_VISIBLE_DEVICES take different slots, and two given the same GPU share one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
from collections.abc import Iterator, Sequence
from typing import Any

log = logging.getLogger(__name__)

PREFIX = "gpu"


def host_name() -> str:
    """This machine's name as used in slot names (characters Prefect names allow, lowercase)."""
    return _safe(socket.gethostname()) or "localhost"


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(text)).strip("-").lower()


def slot_name(device: str | int, host: str | None = None) -> str:
    """The global concurrency limit of one device of one machine: `gpu:<host>:<device>`."""
    return f"{PREFIX}:{_safe(host) if host else host_name()}:{_safe(str(device))}"


def physical_device(index: int, visible: str | None = None) -> str:
    """The machine's name for the device a process sees as `cuda:index`: the index-th entry of
    CUDA_VISIBLE_DEVICES (`visible`; the environment's when None), else the index itself."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES") if visible is None else visible
    entries = [e.strip() for e in (visible or "").split(",") if e.strip()]
    return entries[index] if index < len(entries) else str(index)


def cuda_device_count() -> int:
    """CUDA devices this process sees; 0 without torch or CUDA (never raises)."""
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # a broken CUDA install is a CPU-only machine here
        return 0


def device_index(device: Any = "auto", count: int | None = None) -> int | None:
    """The CUDA index a model on `device` computes on; None for the CPU.

    `device`: "auto" (CUDA device 0 when there is one), "cuda", "cuda:N", "cpu", an int or a
    torch.device. `count`: the CUDA devices visible (default: asked of torch; a test passes a
    fake count). A CPU device never imports torch.
    """
    text = str(device if device is not None else "auto").strip().lower()
    if text == "cpu" or text.startswith("cpu:"):
        return None
    count = cuda_device_count() if count is None else count
    if count <= 0:
        return None
    if text in ("auto", "cuda"):
        return _current_cuda_device()
    if text.startswith("cuda:"):
        return int(text.split(":", 1)[1])
    if text.isdigit():
        return int(text)
    return None  # mps, xpu, ...: not a CUDA device, no slot


def _current_cuda_device() -> int:
    """torch's current CUDA device (what a bare "cuda" means); 0 where torch cannot say."""
    try:
        import torch

        return int(torch.cuda.current_device())
    except Exception:  # no CUDA here (a test with a fake count)
        return 0


def _api_configured() -> bool:
    from prefect.settings import get_current_settings

    return bool(get_current_settings().api.url)


def ensure_gpu_slots(
    slots_per_device: int,
    devices: Sequence[str | int] | None = None,
    host: str | None = None,
) -> list[str]:
    """Create (or resize to `slots_per_device`) the limit of every GPU of this machine;
    returns their names, [] on a CPU-only machine (then the server is not contacted).

    `devices`: the devices' names (default: those this process sees, see physical_device);
    `host`: the machine's name (default: host_name()). Both exist for tests with fake GPUs.
    """
    if slots_per_device < 1:
        raise ValueError(f"slots_per_device must be >= 1; got {slots_per_device}")
    if devices is None:
        devices = [physical_device(i) for i in range(cuda_device_count())]
    names = [slot_name(d, host) for d in devices]
    if names:
        _upsert(names, slots_per_device)
    return names


def _upsert(names: list[str], limit: int) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import (
        GlobalConcurrencyLimitCreate,
        GlobalConcurrencyLimitUpdate,
    )
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        for name in names:
            try:
                current = client.read_global_concurrency_limit_by_name(name)
            except ObjectNotFound:
                try:
                    client.create_global_concurrency_limit(
                        GlobalConcurrencyLimitCreate(name=name, limit=limit, active=True)
                    )
                    log.info("created GPU slot limit %s with %d slot(s)", name, limit)
                    continue
                except ObjectAlreadyExists:  # another process of this machine was first
                    current = client.read_global_concurrency_limit_by_name(name)
            if current.limit != limit or not current.active:
                # The configured slots are the truth: extract.gpu_concurrency=2 takes effect.
                client.update_global_concurrency_limit(
                    name, GlobalConcurrencyLimitUpdate(limit=limit, active=True)
                )
                log.info("GPU slot limit %s: %d -> %d slot(s)", name, current.limit, limit)


@contextlib.contextmanager
def gpu_slot(
    device: Any = "auto",
    slots_per_device: int = 1,
    n_devices: int = 1,
    timeout_seconds: float | None = None,
    host: str | None = None,
    count: int | None = None,
) -> Iterator[list[str]]:
    """Hold one slot of each GPU the block computes on, for as long as the block runs.

    `device`: where the model runs (as `device_index` reads it); `n_devices`: that device and
    the next ones (a torchrun step of K processes per machine takes K devices from cuda:0);
    `slots_per_device`: `extract.gpu_concurrency`, used when the limit is created or resized.
    Yields the names of the limits held; [] when nothing was taken: a CPU device or machine, or
    no Prefect API configured. `host` and `count` are for tests with fake GPUs.

    Waits (up to `timeout_seconds`, default for ever) while the device's slots are taken by
    other tasks; the slot is released when the block ends, also on an error.
    """
    index = device_index(device, count)
    if index is None or not _api_configured():
        yield []
        return
    devices = [physical_device(index + i) for i in range(max(1, n_devices))]
    names = ensure_gpu_slots(slots_per_device, devices, host)
    from prefect.concurrency.sync import concurrency

    # strict: a limit that vanished between its creation and here is an error, never a silent
    # run without the bound; a failed lease renewal (a server hiccup) does not kill model work.
    with concurrency(
        names,
        occupy=1,
        timeout_seconds=timeout_seconds,
        strict=True,
        raise_on_lease_renewal_failure=False,
    ):
        yield names
