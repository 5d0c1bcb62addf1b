"""Error types that decide how a task treats a failure: recorded as data, or retried.

They live here, at the bottom of the layers, so that the stores (data_contracts) can raise
merflow's own errors without importing the tasks; tasks.engine.errors re-exports them.
"""

from __future__ import annotations


class MerflowError(Exception):
    """Base class of merflow's own errors."""


class BadInputError(MerflowError):
    """A deterministic problem with one input (corrupt file, no audio, no face).

    Never retried: the task records a failure row (stage, video, reason) and goes on.
    """


class TransientError(MerflowError):
    """A fault that may pass on a retry (I/O hiccup, killed subprocess, GPU OOM).

    Re-raised out of the task so that Prefect retries it.
    """
