"""The Parquet store: the one place where merflow reads and writes tables.

Layout under the data root (a local folder, or an fsspec URL such as `s3://bucket/prefix`)::

    stores/<table>/part-<sequence>-<uid>.parquet   one file per write, compacted as they pile up
    stores/<table>/.lock                            serialises writers across processes (local)
    artifacts/<kind>/<extractor_id>/<video_id>-<sha12><suffix>

This module holds the table semantics, written once for every place a data root can be; where
the part files live is a backend's business (data_contracts.parts: the interface, a local disk;
data_contracts.objectstore: object storage); artifacts and text files are
data_contracts.artifacts, the merging of parts data_contracts.compaction.

Each write is a new part file, written atomically (a crash leaves the previous state
readable). Upserting keys that older parts hold rewrites those parts without them; a crash
between the two steps can leave two versions of a row on disk, and every read keeps only the
newest, so the logical table is always exact. Small parts are merged once there are many of
them, so 115,595 videos become a few dozen files, not one ever-growing file nor 115,595 tiny ones.
Plain `pandas.read_parquet(<data_root>/stores/<table>)` and duckdb read the folder as they are.

Readers take no lock: a read lists the parts, reads them and lists them again, and retries when
a writer changed the folder in between (writers only ever add files, replace them under new
inodes or names, or delete them), so a read is always one consistent version of the table. A
read may take some columns and a row filter (`where={"video_id": ids}`), pushed down to the
Parquet reads so that a shard reads only its own rows. A write that the disk refuses (full,
read-only, no permission) raises StoreWriteError, naming the path and the way out, and leaves
the table as it was; an object store that cannot be read raises StoreAccessError.

Writers on other machines (object storage)
-------------------------------------------
* The `<sequence>` in a part's name is the writer's wall clock in nanoseconds: newest wins per
  key, across machines too, as long as the writers' clocks agree (NTP) to well under the time
  between two writes of the same key.
* Writers on one machine serialise on a local lock file. Writers on different machines do not
  share a lock and stay correct: every write is a new uniquely named part, rewrites keep the
  sequence of the part they replace, and reads keep only the newest version of each key, so
  two machines upserting the same table (disjoint or overlapping keys) end with every key
  once, at the value of the later write.
* Merging parts (automatic compaction) names the merged part with the newest sequence among
  the parts it merges and drops rows that a newer unmerged part overrides; where writers
  elsewhere may be uploading, it only takes parts older than `compact_grace_s` (default 5 min),
  so a part still being uploaded by another machine cannot be shadowed. `compact()` and
  `delete()` rewrite parts: run them from one process at a time per table (one compactor) and
  not while another machine replaces or deletes keys of the same table, or a concurrent
  rewrite can bring a deleted row back.
* Credentials and the endpoint come from the usual places (AWS_ACCESS_KEY_ID,
  AWS_SECRET_ACCESS_KEY, AWS_PROFILE, AWS_ENDPOINT_URL, ...) or `storage_options`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq  # noqa: F401  (tests patch data_contracts.store.pq.write_table)

from data_contracts import rows
from data_contracts.artifacts import Artifacts
from data_contracts.compaction import Compaction
from data_contracts.location import default_local_dir, normalize_root
from data_contracts.parts import (
    PART_GLOB,
    STALE_TMP_GLOB,
    Listing,
    LocalParts,
    Part,
    PartBackend,
    StoreAccessError,
    StoreWriteError,
    store_write_error,
)
from data_contracts.rows import Where
from data_contracts.tables import TableRef

__all__ = [
    "PART_GLOB",
    "STALE_TMP_GLOB",
    "Store",
    "StoreAccessError",
    "StoreWriteError",
    "Where",
    "WriteReport",
    "store_write_error",
]
_READ_ATTEMPTS = 8


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


@contextlib.contextmanager
def arrow_system_memory() -> Iterator[None]:
    """Arrow allocates through the system allocator meanwhile. Its default (mimalloc) keeps the
    memory of freed buffers for reuse, so reading a large table part by part grew the process by
    most of what it had read (1.6 GB kept after loading MER2024's features)."""
    previous = pa.default_memory_pool()
    pa.set_memory_pool(pa.system_memory_pool())
    try:
        yield
    finally:
        pa.set_memory_pool(previous)


class Store(Compaction, Artifacts):
    """Contract-checked, atomic, idempotent Parquet tables under one data root.

    `data_root` is a local folder or an fsspec URL (`s3://bucket/prefix`, `memory://x`, ...).
    For a URL, `storage_options` go to fsspec (e.g. `{"endpoint_url": ...}`; by default s3fs
    reads the AWS_* environment), and `local_dir` (default `cache_dir`, else
    data_contracts.location.default_local_dir(url)) holds this machine's lock files and
    artifact cache. For a local root, `local_dir` is the root itself.
    """

    def __init__(
        self,
        data_root: Path | str,
        max_small_parts: int = 16,
        target_part_bytes: int = 256 << 20,
        lock_timeout: float = 600.0,
        storage_options: dict[str, Any] | None = None,
        cache_dir: Path | str | None = None,
        compact_grace_s: float = 300.0,
    ):
        root = normalize_root(data_root)
        self.is_remote = isinstance(root, str)
        self.root: Path | str = root
        if isinstance(root, str):
            self.stores: Path | str = f"{root}/stores"
            self.artifacts: Path | str = f"{root}/artifacts"
            self.local_dir = (
                Path(cache_dir).expanduser().resolve() if cache_dir else default_local_dir(root)
            )
        else:
            self.stores = root / "stores"
            self.artifacts = root / "artifacts"
            self.local_dir = root
        self.storage_options = dict(storage_options or {})
        self.max_small_parts = max_small_parts
        self.target_part_bytes = target_part_bytes
        self.lock_timeout = lock_timeout
        self.compact_grace_s = compact_grace_s
        self._backend: PartBackend | None = None

    @property
    def url(self) -> str:
        """The data root as a string: the local path, or the URL."""
        return str(self.root)

    @property
    def backend(self) -> PartBackend:
        """Where the part files live (built on first use: an object store's client is opened
        in the process and event loop that uses it)."""
        if self._backend is None:
            if isinstance(self.root, str):
                from data_contracts.objectstore import ObjectParts

                self._backend = ObjectParts(
                    self.root, self.storage_options, self.local_dir, self.lock_timeout
                )
            else:
                self._backend = LocalParts(self.root, self.lock_timeout)
        return self._backend

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_backend"] = None  # rebuilt where it is used (another process, another loop)
        return state

    # -- what the data root holds --------------------------------------------------------------
    def table_dir(self, table: TableRef) -> Path | str:
        """The folder (or, for a URL root, the URL prefix) that holds `table`'s part files."""
        return self.backend.table_dir(table.name)

    def has_stores(self) -> bool:
        """Whether the data root holds a stores/ folder (is the data root of an extraction)."""
        return self.backend.has_stores()

    def list_tables(self, under: str, depth: int) -> list[str]:
        """Names of the tables `depth` folders below `stores/<under>` that hold part files,
        e.g. list_tables("features", 2) -> ["features/visual/<extractor_id>", ...]."""
        return self.backend.list_tables(under, depth)

    def part_schemas(self, name: str) -> list[pa.Schema]:
        """The schema (with its contract metadata) of every part file of the table `name`."""
        return [self.backend.read_schema(p) for p in self._listing(name)]

    def _listing(self, name: str, writing: bool = False) -> Listing:
        for _ in range(_READ_ATTEMPTS):
            listing = self.backend.listing(name, writing)
            if listing is not None:
                return listing
        return self.backend.listing(name, writing) or {}

    def _parts(self, table: TableRef) -> list[Part]:
        """The table's part files in sequence order: later parts win when a key is in two."""
        return list(self._listing(table.name))

    # -- reading -------------------------------------------------------------------------------
    def exists(self, table: TableRef) -> bool:
        """Whether the table holds at least one part file."""
        return bool(self._listing(table.name))

    def read_arrow(
        self, table: TableRef, columns: list[str] | None = None, where: Where | None = None
    ) -> pa.Table:
        """The table as Arrow, newest row per key, contract checked on every file (a file of
        an older version the contract still reads comes in the current layout).

        `where` keeps the rows whose value in each named column is in its collection, e.g.
        `{"video_id": ids, "extractor_id": [ext]}`; an empty collection keeps no row. Filters
        on key columns are pushed down to the Parquet reads (only matching rows are read,
        row groups that cannot match are skipped); filters on other columns apply after the
        newest row per key is chosen, so they never bring back an overridden version.

        Lock-free and consistent: the folder (or object listing) is listed before and after
        reading, and the read is redone when a concurrent writer changed it in between.
        """
        checked = rows.check_where(table, where)
        if checked is not None and any(len(v) == 0 for v in checked.values()):
            return rows.empty(table, columns)
        backoff = self.backend.read_backoff_s
        for attempt in range(_READ_ATTEMPTS):
            if attempt and backoff:
                time.sleep(min(0.5, backoff * 2**attempt))
            before = self.backend.listing(table.name)
            if before is None:
                continue
            try:
                t = self._read(table, before, columns, checked)
            except (OSError, pa.ArrowInvalid):
                if self.backend.listing(table.name) == before:
                    raise  # nothing moved: the file itself is unreadable
                continue  # a writer replaced or removed a part while we read it
            if self.backend.listing(table.name) == before:
                return t
        # Writers kept changing the folder: read once under their lock.
        with self.backend.locked(table.name):
            return self._read_current(table, columns, checked)[1]

    def _read_current(
        self, table: TableRef, columns: list[str] | None, where: Where | None = None
    ) -> tuple[Listing, pa.Table]:
        """The parts and the table as they are now, for a writer holding the lock. On object
        storage a writer on another machine may rewrite or merge a part meanwhile: re-list."""
        for _ in range(_READ_ATTEMPTS):
            listing = self._listing(table.name, writing=True)
            try:
                return listing, self._read(table, listing, columns, where)
            except FileNotFoundError:
                continue
        raise StoreAccessError(
            f"table {table.name!r} of {self.url} kept changing while this writer read it "
            f"({_READ_ATTEMPTS} attempts): another machine is rewriting it; run again",
            self.url,
            True,
        )

    def _concat(
        self,
        table: TableRef,
        listing: Listing,
        columns: list[str] | None,
        filters: ds.Expression | None = None,
    ) -> pa.Table:
        """Every row of the parts (contract checked) that `filters` keeps, newest per key,
        with a `__part` column (the part's index in `listing`)."""
        contract = table.contract
        want = None if columns is None else list(dict.fromkeys([*contract.key, *columns]))
        pieces = []
        read = self.backend.read_parts(table.name, listing, want, filters)
        for i, (part, schema, t) in enumerate(read):
            t = contract.conform(t, schema, self.backend.describe(part), want)
            pieces.append(t.append_column("__part", pa.array(np.full(t.num_rows, i, np.int32))))
        if not pieces:
            return rows.empty(table, want).append_column("__part", pa.array([], pa.int32()))
        t = pa.concat_tables(pieces).combine_chunks()
        return rows.latest_per_key(t, list(contract.key))

    def _read(
        self,
        table: TableRef,
        listing: Listing,
        columns: list[str] | None,
        where: Where | None = None,
    ) -> pa.Table:
        pushed, after, after_columns = rows.split_where(table, where)
        want = columns
        if after is not None and columns is not None:
            want = list(dict.fromkeys([*columns, *after_columns]))
        t = self._concat(table, listing, want, pushed).drop_columns(["__part"])
        if after is not None:
            t = t.filter(after)
        if columns is not None:
            t = t.select(columns)
        return t.replace_schema_metadata(table.contract.schema.metadata)

    def read(
        self, table: TableRef, columns: list[str] | None = None, where: Where | None = None
    ) -> pd.DataFrame:
        """The table as pandas, newest row per key; `where` as in read_arrow."""
        return self.read_arrow(table, columns, where).to_pandas()

    def existing_keys(self, table: TableRef, where: Where | None = None) -> set[tuple]:
        """Key tuples the table already holds (of the rows `where` keeps, as in read_arrow),
        so a step can skip done work."""
        t = self.read_arrow(table, columns=list(table.key), where=where)
        return rows.keys(t, list(table.key))

    def read_vectors(
        self, table: TableRef, column: str = "embedding", where: Where | None = None
    ) -> tuple[pd.DataFrame, np.ndarray]:
        """Key columns and a float32 (N, dim) matrix of a vector column, without Python loops;
        `where` as in read_arrow."""
        t = self.read_arrow(table, columns=[*table.key, column], where=where)
        dim = dict(table.contract.vector_dims)[column]
        arr = t.column(column).combine_chunks()
        if t.num_rows == 0:
            return t.drop_columns([column]).to_pandas(), np.zeros((0, dim), np.float32)
        values = arr.values.to_numpy(zero_copy_only=False).reshape(-1, dim)
        return t.drop_columns([column]).to_pandas(), values.astype(np.float32, copy=False)

    def vector_parts(
        self, table: TableRef, column: str = "embedding"
    ) -> Iterator[tuple[pd.DataFrame, np.ndarray]]:
        """The table's current rows part file by part file: (key columns, float32 (n, dim)
        matrix of `column`) per part, the newest row of each key only (as read_vectors gives
        them, in other order), so a reader holds one part's vectors at a time, never the table.

        The keys of every part are read first to choose each key's newest row; a part that a
        concurrent writer removes meanwhile (a merge elsewhere) raises a transient
        StoreAccessError: read again.
        """
        key = list(table.key)
        dim = dict(table.contract.vector_dims)[column]
        listing = None
        for _ in range(_READ_ATTEMPTS):
            listing = self.backend.listing(table.name)
            if listing is not None:
                break
        if not listing:
            return
        winners = self._concat(table, listing, key)
        of_part = winners.column("__part").to_numpy()
        for i, part in enumerate(listing):
            wanted = rows.keys(winners.filter(pa.array(of_part == i)), key)
            if not wanted:
                continue
            try:
                ((_, schema, t),) = self.backend.read_parts(
                    table.name, {part: listing[part]}, [*key, column]
                )
            except FileNotFoundError as e:
                raise StoreAccessError(
                    f"table {table.name!r} of {self.url} changed while it was read (a part was "
                    f"merged or removed); run again",
                    self.url,
                    True,
                ) from e
            t = table.contract.conform(t, schema, self.backend.describe(part), [*key, column])
            if len(wanted) < t.num_rows:  # a key of this part has a newer row elsewhere
                t = t.filter(rows.key_mask(t, key, wanted))
            values = t.column(column).combine_chunks().values.to_numpy(zero_copy_only=False)
            yield t.select(key).to_pandas(), values.reshape(-1, dim).astype(np.float32, copy=False)

    # -- writing -------------------------------------------------------------------------------
    def upsert(self, table: TableRef, df: pd.DataFrame) -> WriteReport:
        """Validate rows and write them; a key already held is replaced, an identical row skipped.

        Validation happens before any file is touched: a bad row writes nothing. The write is
        atomic per file and serialised across processes by a lock file. Only the key columns
        of the stored parts are read, and the other columns of the keys already held.
        """
        report = WriteReport(table.name)
        if df is None or len(df) == 0:
            return report
        new = table.contract.to_arrow(df)
        key = list(table.key)
        with self.backend.locked(table.name):
            listing, held = self._read_current(table, key)
            replaced_keys: set[tuple] = set()
            overlap = rows.keys(new, key) & rows.keys(held, key)
            if overlap:  # read the rows of those keys only, to compare
                only = {c: list({k[i] for k in overlap}) for i, c in enumerate(key)}
                listing, old = self._read_current(table, None, only)
                new, replaced_keys, report.unchanged = rows.split_changes(table.contract, old, new)
            if new.num_rows == 0:
                return report
            report.replaced = len(replaced_keys)
            report.inserted = new.num_rows - report.replaced
            self._write_part(table, new)
            if replaced_keys:
                self._drop_keys_from(table, listing, replaced_keys)
            self._maybe_compact(table)
        return report

    def _write_part(self, table: TableRef, t: pa.Table, seq: int | None = None) -> Part:
        return self.backend.write_part(table.name, t, time.time_ns() if seq is None else seq)

    def _read_whole(self, table: TableRef, listing: Listing) -> list[pa.Table]:
        """The parts of `listing`, every column and row (no contract check: for rewrites)."""
        return [t for _, _, t in self.backend.read_parts(table.name, listing, None)]

    def _drop_keys_from(self, table: TableRef, listing: Listing, keys: set[tuple]) -> None:
        key = list(table.key)
        for part, stamp in listing.items():
            try:
                (t,) = self._read_whole(table, {part: stamp})
            except FileNotFoundError:
                continue  # another machine rewrote or merged it; its newer rows still win
            hold = rows.key_mask(t, key, keys)
            if not pc.any(hold).as_py():
                continue
            kept = t.filter(pc.invert(hold))
            if kept.num_rows == 0:
                self.backend.remove_part(part)
            else:
                self.backend.rewrite_part(table.name, part, kept)

    def delete(self, table: TableRef, keys: set[tuple]) -> int:
        """Remove rows by key; returns how many keys were held.

        On object storage, one process at a time should delete from a table, and not while
        another machine replaces keys of it (see the module docstring).
        """
        with self.backend.locked(table.name):
            listing, t = self._read_current(table, list(table.key))
            held = rows.keys(t, list(table.key)) & keys
            if held:
                self._drop_keys_from(table, listing, held)
            return len(held)
