"""GPU slots per machine and device: Prefect global concurrency limits `gpu:<host>:<device>`.

A GPU-bound task takes one slot of the device it computes on (`gpu_slot`) around its model
work, so at most `prefect.gpu_slots` shards share one GPU, on every machine: each machine
and device has its own limit, created on first use with the configured slots, and the limits of
one machine never hold back another. On a CPU-only machine (or a CPU device) nothing is created,
nothing is asked of the server and nothing waits. Without a Prefect API (a single task run
from the command line) there is no one to share a GPU with: nothing is taken either.

Devices are named as the machine knows them: the entry of CUDA_VISIBLE_DEVICES a process sees
as `cuda:i` (an index or a GPU UUID), else `i`, so two worker processes that were each given
another GPU by CUDA_VISIBLE_DEVICES take different slots, and two given the same GPU share one.

The machine's cores are its other shared resource (`cpu_cores`): a job that computes with torch
threads (a training step, an extraction model stage on the CPU) claims the threads it wants
from the machine's budget and computes with its fair share of it, instead of every job taking
every core (two trainings with 2 threads each on 2 cores: each op waits at a barrier for a
descheduled thread, 5-25x slower). The budget needs no server: one lock file per core and one
per job under a machine-wide folder (`cpu_folder`), held with flock, so a job killed with
SIGKILL frees its cores at once. Each job registers what it wants; the cores are shared out
max-min fair over the live jobs, and a job re-reads its share whenever it calls `use()` (a
training at each epoch, an extraction stage at each batch), so the first job gives cores back
when a neighbour arrives and takes them again when it leaves. Cores busy with work that claims
nothing (other programs: the load average beyond the budget's threads) are left out of the
shares. An explicit thread count (a `threads` setting) is used as given, but still registered,
so the neighbours make room.
"""

from __future__ import annotations

import contextlib
import contextvars
import fcntl
import json
import logging
import os
import re
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
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
                # The configured slots are the truth: prefect.gpu_slots=2 takes effect.
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
    `slots_per_device`: `prefect.gpu_slots`, used when the limit is created or resized.
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


# -- CPU cores ------------------------------------------------------------------------------------

CPU_DIR_ENV = "MERFLOW_CPU_DIR"  # the budget's folder; default <tmp>/merflow-cpus


def cpu_folder() -> Path:
    """The machine-wide folder of the CPU budget's lock files: $MERFLOW_CPU_DIR, else
    <tmp>/merflow-cpus, created open to every user of the machine (sticky, like /tmp)."""
    given = os.environ.get(CPU_DIR_ENV)
    folder = Path(given) if given else Path(tempfile.gettempdir()) / "merflow-cpus"
    if not folder.is_dir():
        folder.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):  # another user's folder: theirs to open
            os.chmod(folder, 0o1777)
    return folder


def machine_cores() -> list[int]:
    """The cores this process may run on (its affinity: a container's, Slurm's), by number: two
    jobs pinned to different cores never claim each other's."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def fair_share(cores: int, wants: Sequence[int], mine: int) -> int:
    """Max-min fair share of `cores` for a job that wants `mine` among jobs wanting `wants`
    (its own included): jobs wanting less than an equal share get what they want, the others
    split the rest equally, rounded down; at least 1."""
    rest, left = sorted(max(1, w) for w in wants), cores
    while rest and rest[0] * len(rest) <= left:
        left -= rest.pop(0)
    level = left // len(rest) if rest else mine
    return max(1, min(mine, level))


def busy_elsewhere(in_budget: int) -> int:
    """Cores kept busy by work the budget does not see (processes that claim nothing: other
    tools, other users' programs): the 1-minute load average less the `in_budget` threads of
    the budget's jobs, rounded down; 0 where the OS does not say."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0
    return max(0, int(load - in_budget))


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


def _open(path: Path) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    with contextlib.suppress(OSError):  # umask: let other users' jobs take this core too
        os.fchmod(fd, 0o666)
    return fd


class CpuClaim:
    """A job's claim on the machine's cores (see `cpu_cores`): `threads` is what it computes
    with now; `use()` re-reads its share and gives the calling thread's torch that many."""

    REFRESH_SECONDS = 0.5  # use() looks at the neighbours at most this often

    def __init__(
        self,
        want: int,
        explicit: int | None = None,
        what: str = "",
        folder: Path | None = None,
        cores: Sequence[int] | None = None,
    ) -> None:
        self.want = max(1, explicit or want)
        self.explicit = explicit
        self.what = what
        self.folder = folder or cpu_folder()
        self.cores = list(cores) if cores is not None else machine_cores()
        self.held: dict[int, int] = {}  # core -> fd of its locked file
        self.jobs = 1
        self.busy = 0  # cores busy with work outside the budget, at the last look
        self.threads = self.want if explicit else 1
        self.seen: list[int] = []  # every thread count computed with, in order
        self._job: tuple[int, Path] | None = None
        self._checked = 0.0
        self._lock = threading.Lock()

    # The job's file: what it wants, locked for as long as the job lives.
    def _register(self) -> None:
        name = f"job-{os.getpid()}-{uuid.uuid4().hex[:8]}.json"
        tmp = self.folder / f".{name}.tmp"
        fd = _open(tmp)
        fcntl.flock(fd, fcntl.LOCK_EX)
        info = {"want": self.want, "pid": os.getpid(), "what": self.what, "host": host_name()}
        os.write(fd, json.dumps(info).encode())
        # Locked before it is visible: a neighbour never takes a live job's file for a dead one.
        os.rename(tmp, self.folder / name)
        self._job = (fd, self.folder / name)

    def _wants(self) -> list[int]:
        """What each live job wants, this one's included; the files of dead jobs are removed."""
        wants = [self.want]
        mine = self._job[1] if self._job else None
        for path in self.folder.glob("job-*.json"):
            if path == mine:
                continue
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:  # gone meanwhile
                continue
            try:
                if _try_lock(fd):  # nobody holds it: its job ended without removing it
                    with contextlib.suppress(OSError):
                        path.unlink()
                    continue
                wants.append(int(json.loads(os.read(fd, 4096) or b"{}").get("want", 1)))
            except (ValueError, OSError):
                wants.append(1)
            finally:
                os.close(fd)
        return wants

    def rebalance(self) -> int:
        """Hold this job's fair share of the cores (fewer while a neighbour has not given its
        extra ones back yet); returns the threads to compute with: the explicit count, else
        the cores held, at least 1 (every core taken: one thread beside the others)."""
        with self._lock:
            wants = self._wants()
            self.jobs = len(wants)
            # Cores the budget's jobs compute on now (each holds its cores; one holding none
            # computes with one thread), and those busy with work outside the budget.
            in_budget = len(self.held) + self._held_by_others() + (0 if self.held else 1)
            self.busy = min(len(self.cores) - 1, busy_elsewhere(in_budget))
            target = min(self.want, len(self.cores))
            if not self.explicit:
                target = fair_share(len(self.cores) - self.busy, wants, self.want)
            while len(self.held) > target:
                os.close(self.held.pop(max(self.held)))
            for core in self.cores:
                if len(self.held) >= target:
                    break
                if core in self.held:
                    continue
                fd = _open(self.folder / f"core-{core}.lock")
                if _try_lock(fd):
                    self.held[core] = fd
                else:
                    os.close(fd)
            self.threads = self.explicit or max(1, len(self.held))
            self._checked = time.monotonic()
            return self.threads

    def _held_by_others(self) -> int:
        """Cores of the budget another job holds."""
        taken = 0
        for core in self.cores:
            if core in self.held:
                continue
            fd = _open(self.folder / f"core-{core}.lock")
            try:
                if _try_lock(fd):
                    fcntl.flock(fd, fcntl.LOCK_UN)
                else:
                    taken += 1
            finally:
                os.close(fd)
        return taken

    def use(self, force: bool = False) -> int:
        """Re-read the share (at most every REFRESH_SECONDS unless `force`) and give the calling
        thread's torch ops (OpenMP and MKL included) that many threads; returns them."""
        if force or time.monotonic() - self._checked >= self.REFRESH_SECONDS:
            self.rebalance()
        threads = self.threads
        if not self.seen or self.seen[-1] != threads:
            self.seen.append(threads)
        import torch

        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        return threads

    def env(self) -> dict[str, str]:
        """The thread variables of a child process computing with this claim's threads."""
        return {v: str(self.threads) for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}

    def record(self) -> dict[str, Any]:
        """What the job computed with, for its run's report."""
        seen = self.seen or [self.threads]
        return {
            "threads": seen[-1],
            "threads_min": min(seen),
            "threads_max": max(seen),
            "wanted": self.want,
            "explicit": bool(self.explicit),
            "machine_cores": len(self.cores),
            "busy_elsewhere": self.busy,
            "jobs": self.jobs,
        }

    def line(self) -> str:
        """`1 torch thread (wanted 2 of 2 cores; 2 jobs on them)`."""
        how = "train.threads/model_threads as set" if self.explicit else f"wanted {self.want}"
        jobs = f"{self.jobs} job{'s' if self.jobs != 1 else ''}"
        threads = f"{self.threads} torch thread{'s' if self.threads != 1 else ''}"
        busy = f", {self.busy} busy with other work" if self.busy else ""
        return f"{threads} ({how} of {len(self.cores)} cores{busy}; {jobs} on them)"

    def close(self) -> None:
        with self._lock:
            for fd in self.held.values():
                os.close(fd)
            self.held.clear()
            if self._job is not None:
                fd, path = self._job
                with contextlib.suppress(OSError):
                    path.unlink()
                os.close(fd)
                self._job = None


_claim: contextvars.ContextVar[CpuClaim | None] = contextvars.ContextVar("cpu_claim", default=None)


def current_claim() -> CpuClaim | None:
    """The CPU claim the calling code runs under (`cpu_cores`), if any."""
    return _claim.get()


@contextlib.contextmanager
def cpu_cores(
    want: int,
    explicit: int | None = None,
    what: str = "",
    folder: Path | None = None,
    cores: Sequence[int] | None = None,
) -> Iterator[CpuClaim]:
    """Claim up to `want` of this machine's cores for the block (`explicit`: a thread count
    set by the user, used as given); yields the claim, whose `threads` the block computes with
    (`claim.use()` re-reads the share and sets torch's threads). Never waits: with every core
    taken the job computes with one thread until a neighbour gives cores back. `folder` and
    `cores` are for tests."""
    claim = CpuClaim(want, explicit, what, folder, cores)
    claim._register()
    token = _claim.set(claim)
    try:
        claim.rebalance()
        yield claim
    finally:
        _claim.reset(token)
        claim.close()
