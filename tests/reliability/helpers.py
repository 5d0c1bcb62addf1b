"""Helpers shared by the reliability tests: driver summaries and raw reads of table folders."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from data_contracts import tables
from data_contracts.store import Store

REPO = Path(__file__).resolve().parents[2]
SUMMARY_PREFIX = "EXTRACT-SUMMARY "
FIXED_STAGE_TABLES = {
    "audio": tables.AUDIO.name,
    "faces": tables.FACES.name,
    "transcribe": tables.TRANSCRIPTS.name,
}


def summary_of(proc: subprocess.Popen, timeout: float = 240) -> dict:
    """Wait for a driver process; its summary, or a failure that shows its output."""
    out, _ = proc.communicate(timeout=timeout)
    lines = [ln for ln in out.splitlines() if ln.startswith(SUMMARY_PREFIX)]
    assert proc.returncode == 0 and lines, f"driver exited {proc.returncode}:\n{out[-4000:]}"
    return json.loads(lines[-1].removeprefix(SUMMARY_PREFIX))


def stage_dirs(root: Path, feature_tables: dict[str, str]) -> dict[str, Path]:
    """The table folder of every extraction stage, given a summary's feature tables."""
    store = Store(root)
    names = {**FIXED_STAGE_TABLES, **feature_tables}
    return {stage: store.stores / name for stage, name in names.items()}


def raw_rows(folder: Path) -> pd.DataFrame:
    """Every row of a table folder as plain pandas reads it (no merflow dedup), maybe none."""
    if not any(folder.glob("part-*.parquet")):
        return pd.DataFrame({"video_id": pd.Series([], dtype=str)})
    return pd.read_parquet(folder)


def table_key(folder: Path) -> list[str]:
    """A table folder's key columns, as its part files declare them (empty without parts)."""
    part = next(folder.glob("part-*.parquet"), None)
    if part is None:
        return []
    return json.loads(pq.read_schema(part).metadata[b"merflow.key"])


def table_folders(root: Path) -> list[Path]:
    """Every table folder under a data root's stores (a folder with a lock or part files)."""
    stores = Path(root) / "stores"
    found = {p.parent for p in stores.rglob("part-*.parquet")}
    found |= {p.parent for p in stores.rglob(".lock")}
    return sorted(found)
