"""What every sharded stage shares: skip done keys, record failures, report counts."""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from data_contracts import tables
from data_contracts.failures import failures_frame
from data_contracts.store import Store
from data_contracts.tables import TableRef


@dataclass
class ShardReport:
    """What one stage did to one shard of videos."""

    stage: str
    processed: int = 0
    skipped: int = 0  # already in the store: no work done
    failed: int = 0
    reasons: Counter = field(default_factory=Counter)  # error type -> count
    failed_videos: list[str] = field(default_factory=list)

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
    h = hashlib.sha256(f"{stage}\n{extractor_id}\n{Path(data_root).resolve()}\n".encode())
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
