"""Atomic file writes: write to a temporary name in the same folder, then rename."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

# Crash-test hook, off unless set: TEST_MERFLOW_KILL_AT="<substring>:<n>" makes this process
# SIGKILL itself on its n-th atomic write whose final path contains <substring>, after the
# temporary file is complete and before the rename: the worst moment for a crash. The
# reliability tests (tests/reliability/) set it on a subprocess; nothing else should.
FAULT_ENV = "TEST_MERFLOW_KILL_AT"
_fault_lock = threading.Lock()
_fault_hits = 0


@contextlib.contextmanager
def atomic_path(final: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside `final`; rename it onto `final` only if the block succeeds.

    A crash or exception inside the block leaves `final` as it was (absent or the previous
    version) and removes the temporary file, so readers never see a half-written file.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    # The dot prefix and .tmp suffix keep the file out of glob("part-*.parquet") and similar.
    tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"atomic write of {final} produced no file at {tmp}")
        _fsync_file(tmp)
        _maybe_crash(final)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _maybe_crash(final: Path) -> None:
    global _fault_hits
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    pattern, _, nth = spec.rpartition(":")
    if not pattern or not nth.isdigit():
        raise ValueError(f"{FAULT_ENV}={spec!r} must look like '<path substring>:<n>'")
    if pattern not in final.as_posix():
        return
    with _fault_lock:
        _fault_hits += 1
        if _fault_hits == int(nth):
            os.kill(os.getpid(), signal.SIGKILL)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    # Directory fsync makes the rename durable; not every filesystem supports it.
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
