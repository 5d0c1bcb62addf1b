"""The Parquet store: the one place where merflow reads and writes tables.

Layout under the data root::

    stores/<table>/part-<sequence>-<uid>.parquet   one file per write, compacted as they pile up
    stores/<table>/.lock                            serialises writers across processes
    artifacts/<kind>/<extractor_id>/<video_id>-<sha12><suffix>

Each write is a new part file (temporary name + rename, so a crash leaves the previous state
readable). Upserting keys that older parts hold rewrites those parts without them; a crash
between the two steps can leave two versions of a row on disk, and every read keeps only the
newest, so the logical table is always exact. Small parts are merged once there are many of
them, so 115,595 videos become a few dozen files, not one ever-growing file nor 115,595 tiny ones.
Plain `pandas.read_parquet(<data_root>/stores/<table>)` and duckdb read the folder as they are.

Readers take no lock: a read lists the parts, reads them and lists them again, and retries when
a writer changed the folder in between (writers only ever add files, replace them under new
inodes, or delete them), so a read is always one consistent version of the table. A write that
the disk refuses (full, read-only, no permission) raises StoreWriteError, naming the path and
the way out, and leaves the table as it was.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from filelock import FileLock, Timeout

from data_contracts.atomic import atomic_path
from data_contracts.contracts import Contract
from data_contracts.tables import TableRef

# The store raises merflow's own error type so that the CLI and the tasks' retry rule treat it
# as a user-facing error; tasks.errors imports nothing, so this adds no cycle.
from tasks.errors import MerflowError

PART_GLOB = "part-*.parquet"
STALE_TMP_GLOB = ".part-*.tmp"  # atomic_path's temporary names for part files
_READ_ATTEMPTS = 8

_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_READ_ONLY = {errno.EROFS, errno.EACCES, errno.EPERM}


class StoreWriteError(MerflowError, OSError):
    """The disk refused a write (full, read-only, no permission); the table is as it was.

    Still an OSError, so code that handles I/O errors keeps handling it. `transient` tells the
    tasks' retry rule whether trying again can help: a full disk may be freed by a clean-up
    while the task waits, a read-only or forbidden data root will not change.
    """

    def __init__(self, message: str, path: Path, errno_: int | None, transient: bool):
        super().__init__(message)
        self.path = path
        self.errno = errno_
        self.transient = transient


def store_write_error(e: OSError, what: str, path: Path | str, root: Path) -> StoreWriteError:
    """A StoreWriteError for OSError `e` raised while writing `what` at `path` under `root`."""
    where = Path(getattr(e, "filename", None) or path)
    reason = e.strerror or str(e)
    if isinstance(e, Timeout):
        return StoreWriteError(
            f"cannot write {what}: another process holds its lock {where} for too long; wait "
            f"for the other merflow run to finish, then run again",
            where,
            None,
            True,
        )
    if e.errno in _FULL:
        return StoreWriteError(
            f"cannot write {what}: no space left on the disk that holds {where} ({reason}); "
            f"free space there or point data_root at a larger disk, then run again (rows "
            f"already stored are kept and finished shards are skipped)",
            where,
            e.errno,
            True,
        )
    if e.errno in _READ_ONLY:
        return StoreWriteError(
            f"cannot write {what}: the data root {root} is not writable here ({where}: "
            f"{reason}); mount it read-write, give the user that runs merflow write permission, "
            f"or choose another data_root (data_root=PATH); the stores stay readable",
            where,
            e.errno,
            False,
        )
    return StoreWriteError(
        f"cannot write {what} at {where}: {reason}; check the disk under {root} and run again",
        where,
        e.errno,
        True,
    )


@dataclass
class WriteReport:
    """What one upsert did."""

    table: str
    inserted: int = 0
    replaced: int = 0
    unchanged: int = 0

    @property
    def written(self) -> int:
        """Rows that reached disk (new or replaced)."""
        return self.inserted + self.replaced


class Store:
    """Contract-checked, atomic, idempotent Parquet tables under one data root."""

    def __init__(
        self,
        data_root: Path | str,
        max_small_parts: int = 16,
        target_part_bytes: int = 256 << 20,
        lock_timeout: float = 600.0,
    ):
        self.root = Path(data_root).expanduser().resolve()
        self.stores = self.root / "stores"
        self.artifacts = self.root / "artifacts"
        self.max_small_parts = max_small_parts
        self.target_part_bytes = target_part_bytes
        self.lock_timeout = lock_timeout

    # -- paths ---------------------------------------------------------------------------------
    def table_dir(self, table: TableRef) -> Path:
        """The folder that holds `table`'s part files."""
        return self.stores / table.name

    def artifact_path(
        self, kind: str, extractor_id: str, video_id: str, sha256: str, suffix: str
    ) -> Path:
        """Absolute path of one video's artifact; its folder exists."""
        folder = self.artifacts / kind / extractor_id
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise store_write_error(e, f"{kind} artifacts", folder, self.root) from e
        return folder / f"{video_id}-{sha256[:12]}{suffix}"

    def relative(self, path: Path | str) -> str:
        """`path` relative to the data root, as stored in table rows."""
        return Path(path).resolve().relative_to(self.root).as_posix()

    def absolute(self, relative: str) -> Path:
        """The absolute path of a path stored in a table row."""
        return self.root / relative

    def _parts(self, table: TableRef) -> list[Path]:
        # Names sort by write sequence: later parts win when a key appears twice.
        return sorted(self.table_dir(table).glob(PART_GLOB))

    @contextlib.contextmanager
    def _writing(self, table: TableRef) -> Iterator[None]:
        """Hold the table's write lock; any OSError inside becomes a StoreWriteError."""
        folder = self.table_dir(table)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with FileLock(str(folder / ".lock"), timeout=self.lock_timeout):
                # Every write to the folder happens under this lock, so a temporary part file
                # seen now was left by a writer that was killed before its rename.
                for stale in folder.glob(STALE_TMP_GLOB):
                    stale.unlink(missing_ok=True)
                yield
        except OSError as e:
            raise store_write_error(e, f"table {table.name!r}", folder, self.root) from e

    # -- reading -------------------------------------------------------------------------------
    def exists(self, table: TableRef) -> bool:
        """Whether the table holds at least one part file."""
        return bool(self._parts(table))

    def read_arrow(self, table: TableRef, columns: list[str] | None = None) -> pa.Table:
        """The table as Arrow, newest row per key, contract checked on every file.

        Lock-free and consistent: the folder is listed before and after reading, and the read
        is redone when a concurrent writer changed it in between.
        """
        for _ in range(_READ_ATTEMPTS):
            before = self._snapshot(table)
            if before is None:
                continue
            try:
                t = self._read(table, list(before), columns)
            except (OSError, pa.ArrowInvalid):
                if self._snapshot(table) == before:
                    raise  # nothing moved: the file itself is unreadable
                continue  # a writer replaced or removed a part while we read it
            if self._snapshot(table) == before:
                return t
        # Writers kept changing the folder: read once under their lock.
        with self._writing(table):
            return self._read(table, self._parts(table), columns)

    def _snapshot(self, table: TableRef) -> dict[Path, tuple[int, int, int]] | None:
        # Writers never modify a part in place (new files, renames onto new inodes, deletes),
        # so equal (name, inode, mtime, size) sets before and after a read mean nothing moved.
        snap = {}
        for p in self._parts(table):
            try:
                st = p.stat()
            except FileNotFoundError:
                return None
            snap[p] = (st.st_ino, st.st_mtime_ns, st.st_size)
        return snap

    def _read(self, table: TableRef, parts: list[Path], columns: list[str] | None) -> pa.Table:
        contract = table.contract
        want = None if columns is None else list(dict.fromkeys([*contract.key, *columns]))
        pieces = []
        for i, part in enumerate(parts):
            schema = pq.read_schema(part)
            contract.check_schema(schema, f"{part}")
            t = pq.read_table(part, columns=want, schema=None)
            pieces.append(t.append_column("__part", pa.array(np.full(t.num_rows, i, np.int32))))
        if not pieces:
            empty = contract.schema.empty_table()
            return empty.select(want) if want else empty
        t = pa.concat_tables(pieces).combine_chunks()
        t = _latest_per_key(t, list(contract.key))
        t = t.drop_columns(["__part"])
        if columns is not None:
            t = t.select(columns)
        return t.replace_schema_metadata(contract.schema.metadata)

    def read(self, table: TableRef, columns: list[str] | None = None) -> pd.DataFrame:
        """The table as pandas, newest row per key."""
        return self.read_arrow(table, columns).to_pandas()

    def existing_keys(self, table: TableRef) -> set[tuple]:
        """Key tuples the table already holds, so a step can skip done work."""
        t = self.read_arrow(table, columns=list(table.key))
        cols = [t.column(k).to_pylist() for k in table.key]
        return set(zip(*cols, strict=True))

    def read_vectors(
        self, table: TableRef, column: str = "embedding"
    ) -> tuple[pd.DataFrame, np.ndarray]:
        """Key columns and a float32 (N, dim) matrix of a vector column, without Python loops."""
        t = self.read_arrow(table, columns=[*table.key, column])
        dim = dict(table.contract.vector_dims)[column]
        arr = t.column(column).combine_chunks()
        if t.num_rows == 0:
            return t.drop_columns([column]).to_pandas(), np.zeros((0, dim), np.float32)
        values = arr.values.to_numpy(zero_copy_only=False).reshape(-1, dim)
        return t.drop_columns([column]).to_pandas(), values.astype(np.float32, copy=False)

    # -- writing -------------------------------------------------------------------------------
    def upsert(self, table: TableRef, df: pd.DataFrame) -> WriteReport:
        """Validate rows and write them; a key already held is replaced, an identical row skipped.

        Validation happens before any file is touched: a bad row writes nothing. The write is
        atomic per file and serialised across processes by a lock file.
        """
        report = WriteReport(table.name)
        if df is None or len(df) == 0:
            return report
        new = table.contract.to_arrow(df)
        with self._writing(table):
            parts = self._parts(table)
            old = self._read(table, parts, None) if parts else None
            if old is not None and old.num_rows:
                new, replaced_keys, report.unchanged = _split_changes(table.contract, old, new)
            else:
                replaced_keys = set()
            if new.num_rows == 0:
                return report
            report.replaced = len(replaced_keys)
            report.inserted = new.num_rows - report.replaced
            self._write_part(table, new)
            if replaced_keys:
                self._drop_keys_from(table, parts, replaced_keys)
            self._maybe_compact(table)
        return report

    def _write_part(self, table: TableRef, t: pa.Table) -> Path:
        name = f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"
        final = self.table_dir(table) / name
        with atomic_path(final) as tmp:
            pq.write_table(t, tmp, compression="zstd")
        return final

    def _drop_keys_from(self, table: TableRef, parts: list[Path], keys: set[tuple]) -> None:
        for part in parts:
            t = pq.read_table(part)
            hold = _key_mask(t, list(table.key), keys)
            if not pc.any(hold).as_py():
                continue
            kept = t.filter(pc.invert(hold))
            if kept.num_rows == 0:
                os.unlink(part)
            else:
                with atomic_path(part) as tmp:
                    pq.write_table(kept, tmp, compression="zstd")

    def _maybe_compact(self, table: TableRef) -> None:
        small = [p for p in self._parts(table) if p.stat().st_size < self.target_part_bytes // 2]
        if len(small) > self.max_small_parts:
            self._merge(table, small)

    def compact(self, table: TableRef) -> int:
        """Merge all small part files of a table into one; returns the number merged."""
        with self._writing(table):
            small = [p for p in self._parts(table) if p.stat().st_size < self.target_part_bytes]
            if len(small) > 1:
                self._merge(table, small)
            return len(small) if len(small) > 1 else 0

    def _merge(self, table: TableRef, parts: list[Path]) -> None:
        # Write the merged file first (it sorts after the parts it replaces), then delete them:
        # a crash in between leaves duplicates that reads resolve, never a loss.
        merged = self._read(table, parts, None)
        self._write_part(table, merged)
        for p in parts:
            p.unlink(missing_ok=True)

    def delete(self, table: TableRef, keys: set[tuple]) -> int:
        """Remove rows by key; returns how many keys were held."""
        with self._writing(table):
            parts = self._parts(table)
            t = self._read(table, parts, list(table.key))
            held = set(zip(*(t.column(k).to_pylist() for k in table.key), strict=True)) & keys
            if held:
                self._drop_keys_from(table, parts, held)
            return len(held)


def _key_mask(t: pa.Table, key: list[str], keys: set[tuple]) -> pa.ChunkedArray:
    tuples = list(zip(*(t.column(k).to_pylist() for k in key), strict=True))
    return pa.chunked_array([pa.array([k in keys for k in tuples], pa.bool_())])


def _latest_per_key(t: pa.Table, key: list[str]) -> pa.Table:
    if t.num_rows == 0:
        return t
    keys = t.select(key).to_pandas()
    dup = keys.duplicated(keep="last").to_numpy()
    if not dup.any():
        return t
    return t.filter(pa.array(~dup))


def _split_changes(
    contract: Contract, old: pa.Table, new: pa.Table
) -> tuple[pa.Table, set[tuple], int]:
    """Drop rows identical to stored ones; return the rest and which of them replace stored keys."""
    key = list(contract.key)
    old_keys = list(zip(*(old.column(k).to_pylist() for k in key), strict=True))
    position = {k: i for i, k in enumerate(old_keys)}
    new_keys = list(zip(*(new.column(k).to_pylist() for k in key), strict=True))
    overlap = [(j, position[k]) for j, k in enumerate(new_keys) if k in position]
    if not overlap:
        return new, set(), 0
    new_rows = new.take([j for j, _ in overlap]).to_pylist()
    old_rows = old.select(new.column_names).take([i for _, i in overlap]).to_pylist()
    keep = np.ones(new.num_rows, dtype=bool)
    replaced: set[tuple] = set()
    unchanged = 0
    for (j, _), a, b in zip(overlap, new_rows, old_rows, strict=True):
        if a == b:
            keep[j] = False
            unchanged += 1
        else:
            replaced.add(new_keys[j])
    return new.filter(pa.array(keep)), replaced, unchanged
