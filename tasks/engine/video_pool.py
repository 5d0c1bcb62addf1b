"""Worker processes for the raw-video stages' per-video work (face detection and alignment).

In one Prefect process (the thread runner) every stage is a thread. The face backends hold the
GIL for most of their work (dlib's detector and landmark model, PyAV's frame conversion), so a
faces thread and the model stages' threads take turns on one interpreter instead of running on
separate cores. A stage that runs its per-video function in these processes leaves the GIL to
the model stages; with several processes, the videos of a shard are cropped side by side.

Each worker is `python -m tasks.engine.video_pool`, fed pickled jobs on its stdin: it builds a
stage's per-video function (its `setup`: the face backend loaded) on its first job of those settings
and keeps it for later shards; the pool lives as long as the process that made it. Plain
subprocesses, not multiprocessing: spawn and forkserver re-import the caller's main script (a
script that runs a flow at its top level would run it again), and fork would copy locks held by
Prefect's and torch's threads.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import pickle
import queue
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, BinaryIO

from models.settings import available_cpus
from tasks.engine.errors import BadInputError, TransientError

Setup = Callable[[], Callable[[Path, Path], Any]]  # picklable: a module-level function/partial


def resolve_processes(processes: int | None) -> int:
    """How many worker processes `processes` means here: None is every core this process may
    use, and 0 inside a daemonic process (a Dask worker, already a process of its own per
    lane); 0 means in this process.

    Every core, not the cores the model stages leave: the faces are the critical path, and
    single-threaded processes share cores with the model stages without the barrier stalls that
    oversubscribed torch threads suffer (measured on 2 cores, 96 demo clips in 3 shards: the
    flow took 10.4 s with 2 face processes, 12.9 s with 1)."""
    import multiprocessing

    if multiprocessing.current_process().daemon:
        return 0
    if processes is None:
        return available_cpus()
    return processes


class WorkerDiedError(TransientError):
    """A worker process ended while it held a job (killed, out of memory): the shard is retried."""


class _Worker:
    """One worker process and the thread that feeds it jobs from the pool's queue."""

    def __init__(self, jobs: queue.Queue) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tasks.engine.video_pool"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.send, self.recv = self.proc.stdin, self.proc.stdout
        self.lock = threading.Lock()  # one job at a time on the pipes
        self.thread = threading.Thread(target=self._serve, args=(jobs,), daemon=True)
        self.thread.start()

    def _died(self) -> WorkerDiedError:
        try:
            code = self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = None
        return WorkerDiedError(
            f"a video worker process ended (exit {code}; killed, or out of memory); the "
            "shard is retried. If it keeps happening, run the stage in-process "
            "(faces.processes=0) to see the error"
        )

    def ask(self, setup: bytes, video: Path | None, out: Path | None) -> Any:
        """make(video, out) of `setup`'s function in the worker (None, None: only build it);
        its result, or the exception it raised."""
        with self.lock:
            try:
                pickle.dump((setup, video, out), self.send)
                self.send.flush()
                ok, value = pickle.load(self.recv)
            except (EOFError, pickle.UnpicklingError, OSError) as e:
                raise self._died() from e
        if not ok:
            raise value
        return value

    def _serve(self, jobs: queue.Queue) -> None:
        while True:
            job = jobs.get()
            if job is None:  # shutdown
                return
            future, setup, video, out = job
            try:
                future.set_result(self.ask(setup, video, out))
            except WorkerDiedError as e:
                future.set_exception(e)
                return  # this worker is gone; the pool starts another on its next submit
            except Exception as e:  # the video's own error (a bad input, say)
                future.set_exception(e)

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.send.close()  # the worker ends at the end of its input
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Pool:
    """`processes` workers; each builds a setup's per-video function on its first job of that
    setup and keeps the last few (one pool serves every settings a process runs)."""

    def __init__(self, processes: int) -> None:
        self.processes = processes
        self.jobs: queue.Queue = queue.Queue()
        self.workers = [_Worker(self.jobs) for _ in range(processes)]

    def submit(self, setup: Setup, video: Path, out: Path) -> Future:
        """Queue one video; the future gives make(video, out)'s result or its exception."""
        for i, w in enumerate(self.workers):  # replace a worker that died
            if not w.thread.is_alive():
                w.stop()
                self.workers[i] = _Worker(self.jobs)
        future: Future = Future()
        self.jobs.put((future, pickle.dumps(setup), video, out))
        return future

    def warm(self, setup: Setup) -> None:
        """Build `setup`'s function in every worker now (raises the setup's error)."""
        key = pickle.dumps(setup)
        for w in self.workers:
            w.ask(key, None, None)

    def stop(self) -> None:
        """Stop the workers once the queued jobs are done."""
        for _ in self.workers:
            self.jobs.put(None)
        for w in self.workers:
            w.thread.join(timeout=60)
            w.stop()


_pool: Pool | None = None
_lock = threading.Lock()


def pool(processes: int) -> Pool:
    """This process's pool of `processes` workers, started on first use (a pool of another size
    is stopped first)."""
    global _pool
    with _lock:
        if _pool is not None and _pool.processes == processes:
            return _pool
        if _pool is not None:
            _pool.stop()
        _pool = Pool(processes)
        return _pool


def shutdown() -> None:
    """Stop the pool's workers (at exit)."""
    global _pool
    with _lock:
        if _pool is not None:
            _pool.stop()
            _pool = None


atexit.register(shutdown)


# -- the worker process --------------------------------------------------------------------------
KEEP = 4  # per-video functions a worker keeps (each holds a loaded backend)


def _serve_jobs(recv: BinaryIO, send: BinaryIO) -> None:
    made: dict[bytes, Callable[[Path, Path], Any]] = {}
    while True:
        try:
            setup, video, out = pickle.load(recv)
        except EOFError:
            return
        try:
            if setup not in made:
                made[setup] = pickle.loads(setup)()
                while len(made) > KEEP:
                    made.pop(next(iter(made)))
            answer = (True, None if video is None else made[setup](video, out))
        except Exception as e:  # a bad input's error is data for the parent's failure row
            answer = (False, _portable(e))
        pickle.dump(answer, send)
        send.flush()


def _portable(e: Exception) -> Exception:
    """`e`, or an error of its kind that survives pickling (its message, its type's name)."""
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        kind = BadInputError if isinstance(e, BadInputError) else RuntimeError
        return kind(f"{type(e).__name__}: {e}")


def main() -> None:
    """Serve jobs from stdin; what the jobs print goes to stderr, stdout carries the answers."""
    send = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    _serve_jobs(sys.stdin.buffer, send)


if __name__ == "__main__":
    main()
