"""Failure rows: one bad video becomes data (stage, reason), never a crashed shard."""

from __future__ import annotations

from datetime import UTC, datetime

import pandas as pd

from data_contracts import tables


def failure_row(
    video_id: str,
    sha256: str,
    stage: str,
    exc: BaseException | str,
    extractor_id: str = "",
    attempt: int = 1,
) -> dict:
    """A failures-table row: `video_id` failed `stage` with `exc` (an exception or a message)."""
    if isinstance(exc, BaseException):
        error_type, message = type(exc).__name__, str(exc) or repr(exc)
    else:
        error_type, message = "Error", str(exc)
    return {
        "video_id": video_id,
        "sha256": sha256,
        "stage": stage,
        "extractor_id": extractor_id,
        "error_type": error_type,
        "message": message,
        "attempt": attempt,
        "timestamp": datetime.now(UTC),
    }


def failures_frame(rows: list[dict]) -> pd.DataFrame:
    """Failure rows as a DataFrame with the contract's columns (empty frame when no rows)."""
    return pd.DataFrame(rows, columns=tables.FAILURES.contract.columns)
