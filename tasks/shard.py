"""What every sharded stage shares: skip done keys, record failures, report counts, the shard
loop of the raw-video stages (`run_shard`) and the Prefect retry rule of every stage."""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from data_contracts import tables
from data_contracts.failures import failure_row, failures_frame
from data_contracts.location import is_url, normalize_root
from data_contracts.store import Store, StoreAccessError, StoreWriteError
from data_contracts.tables import TableRef
from tasks.errors import BadInputError, TransientError


@dataclass
class ShardReport:
    """What one stage did to one shard of videos."""

    stage: str
    processed: int = 0
    skipped: int = 0  # already in the store: no work done
    failed: int = 0
    reasons: Counter = field(default_factory=Counter)  # error type -> count
    failed_videos: list[str] = field(default_factory=list)
    # Shards that took Prefect more than one attempt. Their counts are the last attempt's: rows
    # an earlier attempt stored count as `skipped`.
    retried: int = 0

    def add_failure(self, video_id: str, error_type: str) -> None:
        """Count one per-video failure."""
        self.failed += 1
        self.reasons[error_type] += 1
        self.failed_videos.append(video_id)

    def merge(self, other: ShardReport) -> ShardReport:
        """Sum two reports of the same stage."""
        return ShardReport(
            self.stage,
            self.processed + other.processed,
            self.skipped + other.skipped,
            self.failed + other.failed,
            self.reasons + other.reasons,
            self.failed_videos + other.failed_videos,
            self.retried + other.retried,
        )


def pending(videos: pd.DataFrame, store: Store, table: TableRef, extractor_id: str) -> pd.DataFrame:
    """The videos whose (video_id, sha256, extractor_id) row the table does not hold yet."""
    done = store.existing_keys(table)
    return videos[_not_in(videos, done, extractor_id)]


def commit(
    store: Store, table: TableRef, rows: list[dict], failures: list[dict], report: ShardReport
) -> ShardReport:
    """Write a shard's result rows and failure rows; failures are only rows, never a crash."""
    if rows:
        store.upsert(table, pd.DataFrame(rows, columns=table.contract.columns))
    if failures:
        store.upsert(tables.FAILURES, failures_frame(failures))
        for f in failures:
            report.add_failure(f["video_id"], f["error_type"])
    return report


def shards(videos: pd.DataFrame, size: int) -> list[pd.DataFrame]:
    """Split manifest rows, sorted by video_id, into shards of at most `size` videos."""
    videos = videos.sort_values("video_id").reset_index(drop=True)
    return [videos.iloc[i : i + size] for i in range(0, len(videos), size)]


def select_pending(
    videos: pd.DataFrame,
    store: Store,
    table: TableRef,
    stage: str,
    extractor_id: str,
    retry_failed: bool = False,
) -> tuple[pd.DataFrame, int]:
    """Videos that still need `stage` under `extractor_id`, and how many were skipped.

    Skipped: the table already holds the row, or the same bytes already failed deterministically
    under the same settings (it would fail again) unless `retry_failed`.
    """
    done = store.existing_keys(table)
    if not retry_failed:
        done |= {
            (k[0], k[1], extractor_id)
            for k in store.existing_keys(tables.FAILURES)
            if k[2:] == (stage, extractor_id)
        }
    todo = videos[_not_in(videos, done, extractor_id)]
    return todo, len(videos) - len(todo)


def shard_cache_key(videos: pd.DataFrame, extractor_id: str, stage: str, data_root: str) -> str:
    """Prefect cache key: the shard's sorted (video_id, sha256) pairs, the extractor id, the stage
    and the data root it writes to; never input paths or times."""
    pairs = sorted(zip(videos["video_id"].astype(str), videos["sha256"].astype(str), strict=True))
    root = normalize_root(data_root) if is_url(data_root) else Path(data_root).resolve()
    h = hashlib.sha256(f"{stage}\n{extractor_id}\n{root}\n".encode())
    for vid, sha in pairs:
        h.update(f"{vid}\t{sha}\n".encode())
    return f"{stage}-{extractor_id}-{h.hexdigest()[:24]}"


def _not_in(videos: pd.DataFrame, done: set[tuple], extractor_id: str) -> np.ndarray:
    # A bool array, never a list: `df[[]]` would select no columns instead of no rows.
    return np.array(
        [
            (vid, sha, extractor_id) not in done
            for vid, sha in zip(videos["video_id"], videos["sha256"], strict=True)
        ],
        dtype=bool,
    )


def run_shard(
    videos: pd.DataFrame,
    store: Store,
    table: TableRef,
    stage: str,
    extractor_id: str,
    work: Callable[[Any], dict],
    retry_failed: bool = False,
    attempt: int = 1,
) -> ShardReport:
    """Run `work(row)` on each video the store lacks; bad inputs become failure rows.

    Rows are written in one upsert at the end, and also when a transient error escapes, so
    work already done is never lost. A video that failed deterministically before with the
    same bytes and settings would fail again, so it is skipped (counted in `skipped`) unless
    `retry_failed`.
    """
    missing = {"video_id", "sha256", "path"} - set(videos.columns)
    if missing:
        raise ValueError(f"videos lack columns {sorted(missing)}; pass manifest rows")
    report = ShardReport(stage, retried=int(attempt > 1))
    done = store.existing_keys(table)
    failed_before = {
        (k[0], k[1]) for k in store.existing_keys(tables.FAILURES) if k[2:] == (stage, extractor_id)
    }
    rows: list[dict] = []
    failures: list[dict] = []
    try:
        for video in videos.itertuples(index=False):
            key = (video.video_id, video.sha256)
            if (*key, extractor_id) in done or (key in failed_before and not retry_failed):
                report.skipped += 1
                continue
            try:
                rows.append(work(video))
            except BadInputError as e:
                failures.append(failure_row(*key, stage, e, extractor_id, attempt))
            else:
                report.processed += 1
    finally:
        commit(store, table, rows, failures, report)
        # A video that now succeeds (retry_failed) must not keep its old failure row.
        healed = {(r["video_id"], r["sha256"]) for r in rows} & failed_before
        if healed:
            store.delete(tables.FAILURES, {(*k, stage, extractor_id) for k in healed})
    return report


def now_utc() -> datetime:
    """The current time, timezone-aware UTC, for created_at columns."""
    return datetime.now(UTC)


# -- Prefect wrappers ----------------------------------------------------------------------------
def retry_if_transient(task_: Any, task_run: Any, state: Any) -> bool:
    """Prefect retry condition: retry I/O and transient errors, never configuration errors.

    Configuration errors (a missing ffmpeg binary, a bad setting) are neither TransientError nor
    OSError, so they are never retried; a deterministic bad input is not retried either.
    """
    exc = getattr(state, "data", None)
    # A full disk may be freed, an unreachable object store come back; a read-only data root,
    # a missing bucket or refused credentials will not change.
    if isinstance(exc, StoreWriteError | StoreAccessError):
        return exc.transient
    if isinstance(exc, ValueError | BadInputError):
        return False
    return isinstance(exc, TransientError | OSError)


def current_attempt() -> int:
    """The run count of the Prefect task run this is called from (1 outside Prefect)."""
    from prefect.context import TaskRunContext

    ctx = TaskRunContext.get()
    return max(1, ctx.task_run.run_count) if ctx and ctx.task_run else 1
