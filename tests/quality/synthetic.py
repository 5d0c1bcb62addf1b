"""Small synthetic data roots for the quality checks, and a test double of a broken extractor."""

from __future__ import annotations

import hashlib
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from data_contracts import tables
from data_contracts.failures import failure_row, failures_frame
from data_contracts.labels import CLASSES
from data_contracts.store import Store

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def sha(video_id: str) -> str:
    """A stand-in content hash: distinct per id."""
    return hashlib.sha256(video_id.encode()).hexdigest()


def manifest_rows(ids: list[str], pools: list[str], shas: list[str] | None = None) -> pd.DataFrame:
    """Manifest rows of the given videos (every contract column filled)."""
    shas = shas or [sha(v) for v in ids]
    n = len(ids)
    return pd.DataFrame(
        {
            "video_id": ids,
            "sha256": shas,
            "path": [f"/corpus/{p}/{v}.mp4" for v, p in zip(ids, pools, strict=True)],
            "source_dir": [f"/corpus/{p}" for p in pools],
            "pool": pools,
            "size": [1000] * n,
            "mtime_ns": [0] * n,
            "duration": [2.0] * n,
            "fps": [12.0] * n,
            "n_frames": [24] * n,
            "width": [64] * n,
            "height": [64] * n,
            "has_video": [True] * n,
            "has_audio": [True] * n,
            "audio_sample_rate": [16000] * n,
            "probe_error": [None] * n,
            "scanned_at": [T0] * n,
        }
    )


def feature_rows(
    ids: list[str], x: np.ndarray, extractor_id: str, shas: list[str] | None = None, minute: int = 0
) -> pd.DataFrame:
    """Feature rows of one table (created at T0 + `minute`, so tables have an order)."""
    shas = shas or [sha(v) for v in ids]
    return pd.DataFrame(
        {
            "video_id": ids,
            "sha256": shas,
            "extractor_id": extractor_id,
            "embedding": list(x.astype(np.float32)),
            "n_items": 3,
            "provenance": '{"extractor": "synthetic"}',
            "created_at": T0 + timedelta(minutes=minute),
        }
    )


def make_root(
    root: Path, n_labelled: int = 24, n_unlabelled: int = 12, dim: int = 16, seed: int = 0
) -> tuple[Store, list[str], np.ndarray]:
    """A data root with a manifest, labels and one clean visual table of random features."""
    rng = np.random.default_rng(seed)
    ids = [f"sample_{i:08d}" for i in range(n_labelled + n_unlabelled)]
    pools = ["labeled"] * n_labelled + ["unlabeled"] * n_unlabelled
    store = Store(root)
    store.upsert(tables.MANIFEST, manifest_rows(ids, pools))
    labels = [CLASSES[i % len(CLASSES)] for i in range(n_labelled)]
    store.upsert(
        tables.LABELS,
        pd.DataFrame({"video_id": ids[:n_labelled], "label": labels, "source": "synthetic.csv"}),
    )
    x = rng.normal(size=(len(ids), dim)).astype(np.float32) + 3.0
    store.upsert(tables.features("visual", "vis-a", dim), feature_rows(ids, x, "vis-a"))
    return store, ids, x


def add_failure(store: Store, video_id: str, stage: str, error: str, extractor_id: str) -> None:
    """Record one failure row, as a stage does."""
    row = failure_row(video_id, sha(video_id), stage, error, extractor_id)
    row["error_type"] = error.split(":")[0]
    store.upsert(tables.FAILURES, failures_frame([row]))


def broken_extractor_write(
    store: Store,
    modality: str,
    extractor_id: str,
    dim: int,
    video_id: str,
    vector: np.ndarray,
    sha256: str | None = None,
) -> Path:
    """A test double of a broken external extractor: it writes a part file straight to the table
    folder with pyarrow and the contract's metadata, bypassing the store's validation (which would
    refuse a NaN vector)."""
    ref = tables.features(modality, extractor_id, dim)
    schema = ref.contract.schema
    storage = pa.array(np.asarray(vector, dtype=np.float32), type=pa.float32())
    columns = {
        "video_id": pa.array([video_id]),
        "sha256": pa.array([sha256 or sha(video_id)]),
        "extractor_id": pa.array([extractor_id]),
        "embedding": pa.FixedSizeListArray.from_arrays(storage, dim),
        "n_items": pa.array([1], pa.int32()),
        "provenance": pa.array(['{"extractor": "broken"}']),
        "created_at": pa.array([datetime.now(UTC)], schema.field("created_at").type),
    }
    table = pa.Table.from_arrays([columns[f.name] for f in schema], schema=schema)
    folder = store.table_dir(ref)
    folder.mkdir(parents=True, exist_ok=True)
    # Named like the store's parts and sorted after them, so the read sees it as the newest.
    path = folder / f"part-{time.time_ns():020d}-broken00.parquet"
    pq.write_table(table, path)
    return path
