"""Error types that decide how a task treats a failure: recorded as data, or retried.

Defined in data_contracts.errors (the stores raise them too, and data_contracts imports no
task); re-exported here so that `from tasks.engine.errors import ...` keeps working.
"""

from __future__ import annotations

from data_contracts.errors import BadInputError, MerflowError, TransientError

__all__ = ["BadInputError", "MerflowError", "TransientError"]
