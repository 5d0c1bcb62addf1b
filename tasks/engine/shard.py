"""What every sharded stage shares: shards and their cache keys, the store's done and failed
keys, the shard report, the attempt number and the Prefect retry rule (the engine that runs a
stage on a shard is tasks/engine/stage.py)."""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from data_contracts import tables
from data_contracts.location import is_url, normalize_root
from data_contracts.store import Store, StoreAccessError, StoreWriteError
from data_contracts.tables import TableRef
from tasks.engine.errors import BadInputError, TransientError


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
    # Seconds the stage worked (last attempt; a wait for a GPU slot excluded).
    seconds: float = 0.0
    # Most torch threads it computed with: its share of the machine's cores
    # (tasks/engine/gpu_slots.py
    # cpu_cores); 0: it claimed none (a GPU stage, or one whose work is in other processes).
    threads: int = 0

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
            self.seconds + other.seconds,
            max(self.threads, other.threads),
        )

    def line(self, shard: int, shards: int, cached: bool = False) -> str:
        """One log line of this shard's report: counts, seconds, videos (computed or failed) per
        second; `cached`: Prefect's cache answered, the task did not run."""
        text = (
            f"{self.stage} shard {shard}/{shards}: {self.processed} computed, "
            f"{self.skipped} skipped, {self.failed} failed"
        )
        if self.reasons:
            text += " (" + ", ".join(f"{k} {v}" for k, v in sorted(self.reasons.items())) + ")"
        if cached:
            return text + " (cached)"
        text += f" in {self.seconds:.1f} s"
        worked = self.processed + self.failed
        if worked and self.seconds > 0:
            text += f", {worked / self.seconds:.2f} videos/s"
        if self.threads:
            text += f" on {self.threads} thread{'s' if self.threads != 1 else ''}"
        return text + (" (retried)" if self.retried else "")


def shards(videos: pd.DataFrame, size: int) -> list[pd.DataFrame]:
    """Split manifest rows, sorted by video_id, into shards of at most `size` videos."""
    videos = videos.sort_values("video_id").reset_index(drop=True)
    return [videos.iloc[i : i + size] for i in range(0, len(videos), size)]


def stored_keys(
    store: Store, table: TableRef, stage: str, extractor_id: str, video_ids: list[str]
) -> tuple[set[tuple[str, str]], set[tuple[str, str]]]:
    """Of `video_ids`, the (video_id, sha256) pairs `table` holds under `extractor_id`, and
    those with a failure row of `stage` under it; only these videos' rows are read."""
    where = {"video_id": video_ids, "extractor_id": [extractor_id]}
    done = {k[:2] for k in store.existing_keys(table, where=where)}
    failed = store.existing_keys(tables.FAILURES, where={**where, "stage": [stage]})
    return done, {k[:2] for k in failed}


def select_pending(
    videos: pd.DataFrame,
    store: Store,
    table: TableRef,
    stage: str,
    extractor_id: str,
    retry_failed: bool = False,
    side: tuple[TableRef, str] | None = None,
) -> tuple[pd.DataFrame, int, set[tuple[str, str]]]:
    """Videos that still need `stage` under `extractor_id`, how many were skipped, and the
    (video_id, sha256) pairs that failed before.

    Skipped: the table already holds the row (and `side`, a (table, extractor id) the stage also
    writes, holds rows of it), or the same bytes already failed deterministically under the same
    settings (it would fail again) unless `retry_failed`.
    """
    ids = videos.video_id.tolist()
    done, failed = stored_keys(store, table, stage, extractor_id, ids)
    if side is not None:
        where = {"video_id": ids, "extractor_id": [side[1]]}
        done &= {k[:2] for k in store.existing_keys(side[0], where=where)}
    skip = done if retry_failed else done | failed
    # A bool array, never a list: `df[[]]` would select no columns instead of no rows.
    mask = np.array(
        [k not in skip for k in zip(videos.video_id, videos.sha256, strict=True)], dtype=bool
    )
    todo = videos[mask]
    return todo, len(videos) - len(todo), failed


def shard_cache_key(videos: pd.DataFrame, extractor_id: str, stage: str, data_root: str) -> str:
    """Prefect cache key: the shard's sorted (video_id, sha256) pairs, the extractor id, the stage
    and the data root it writes to; never input paths or times."""
    pairs = sorted(zip(videos["video_id"].astype(str), videos["sha256"].astype(str), strict=True))
    root = normalize_root(data_root) if is_url(data_root) else Path(data_root).resolve()
    h = hashlib.sha256(f"{stage}\n{extractor_id}\n{root}\n".encode())
    for vid, sha in pairs:
        h.update(f"{vid}\t{sha}\n".encode())
    return f"{stage}-{extractor_id}-{h.hexdigest()[:24]}"


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
