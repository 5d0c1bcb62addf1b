"""Where a store's part files live: the backend interface, its local-disk implementation, and
the errors a refused write or an unreadable data root raise.

A backend knows files and objects, never contracts or keys: it lists the part files of a table
folder (in write-sequence order, each with its size and a change stamp), reads a part's schema
or (some columns and rows of) a part, writes a part atomically, rewrites or removes one, holds a
table's write lock, and puts and gets the small files beside the stores (text, artifacts). The
table semantics (contracts, newest row per key, upserts, compaction) are written once on top of
it, in data_contracts.store. The object-storage backend is data_contracts.objectstore.

A part's name is `part-<sequence>-<uid>.parquet`: names sort by sequence, and a later part wins
when a key appears in two.
"""

from __future__ import annotations

import abc
import contextlib
import errno
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from filelock import FileLock, Timeout

from data_contracts.atomic import atomic_path
from data_contracts.errors import MerflowError

PART_GLOB = "part-*.parquet"
STALE_TMP_GLOB = ".part-*.tmp"  # atomic_path's temporary names for part files
_PARQUET = ds.ParquetFileFormat()
_ROW_GROUP_BYTES = 8 << 20
_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_READ_ONLY = {errno.EROFS, errno.EACCES, errno.EPERM}

Part = Path | str  # a part file: a local path, or an object's path in its filesystem
# The parts of a table folder in sequence order: part -> (size in bytes, change stamp). Parts
# are never modified in place, so two equal listings mean nothing moved in between.
Listing = dict[Any, tuple[int, Any]]


class StoreWriteError(MerflowError, OSError):
    """The disk refused a write (full, read-only, no permission); the table is as it was.

    Still an OSError, so code that handles I/O errors keeps handling it. `transient` tells the
    tasks' retry rule whether trying again can help: a full disk may be freed by a clean-up
    while the task waits, a read-only or forbidden data root will not change.
    """

    def __init__(self, message: str, path: Path | str, errno_: int | None, transient: bool):
        super().__init__(message)
        self.path = path
        self.errno = errno_
        self.transient = transient


class StoreAccessError(MerflowError):
    """An object store could not be read: missing bucket, refused or absent credentials, an
    unreachable endpoint. Not an OSError on purpose: a per-video step that records unreadable
    files as failures must not record the network's fault against a video; `transient` tells
    the retry rule whether trying again can help."""

    def __init__(self, message: str, url: str, transient: bool):
        super().__init__(message)
        self.url = url
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


def part_seq(part: Part) -> int:
    """The write sequence in a part's name (`part-<sequence>-<uid>.parquet`)."""
    try:
        return int(str(part).rsplit("/", 1)[-1].split("-")[1])
    except (IndexError, ValueError):
        return 0


def part_name(seq: int) -> str:
    """A new part file name of write sequence `seq`."""
    return f"part-{seq:020d}-{uuid.uuid4().hex[:8]}.parquet"


def write_parquet(t: pa.Table, sink: Any) -> None:
    """Write `t` as Parquet to a path or Arrow stream, in row groups of about
    _ROW_GROUP_BYTES (at least 1024 rows): a read with a row filter skips the row groups whose
    statistics cannot match, so smaller groups mean less read to be thrown away."""
    per_row = max(1, t.nbytes // max(1, t.num_rows))
    rows = max(1024, _ROW_GROUP_BYTES // per_row)
    pq.write_table(t, sink, compression="zstd", row_group_size=rows)


def read_parquet(
    source: Any, columns: list[str] | None, filters: ds.Expression | None = None
) -> tuple[pa.Schema, pa.Table]:
    """A Parquet file's schema and (some of) its columns and rows: `source` is a local path,
    an Arrow buffer or file, or a Python file object. `filters` is pushed down to the read,
    which skips the row groups whose statistics cannot match. Of `columns`, those the file
    lacks (a file of an older contract version) are not read: the contract fills them."""
    if filters is None:
        pf = pq.ParquetFile(source)
        return pf.schema_arrow, pf.read(columns=_present(columns, pf.schema_arrow))
    if isinstance(source, str | Path):
        fragment = _PARQUET.make_fragment(str(source), filesystem=pafs.LocalFileSystem())
    else:
        if not isinstance(source, pa.NativeFile | pa.Buffer):
            source = pa.PythonFile(source, mode="r")
        fragment = _PARQUET.make_fragment(source)
    schema = fragment.physical_schema
    return schema, fragment.to_table(columns=_present(columns, schema), filter=filters)


def _present(columns: list[str] | None, schema: pa.Schema) -> list[str] | None:
    return None if columns is None else [c for c in columns if c in schema.names]


class PartBackend(abc.ABC):
    """The files of one data root: tables' part files and the small files beside them.

    `url` names the data root in messages; `local_dir` is this machine's folder for it (lock
    files, artifact cache). `writers_elsewhere` says whether writers on other machines may
    write a table without taking this machine's lock (then compaction only merges parts older
    than the store's grace time); `read_backoff_s` is the first pause between read attempts
    that found the folder moving.
    """

    url: str
    local_dir: Path
    writers_elsewhere: bool = False
    read_backoff_s: float = 0.0

    # -- part files ------------------------------------------------------------------------------
    @abc.abstractmethod
    def table_dir(self, name: str) -> Path | str:
        """The folder (or URL prefix) that holds the part files of table `name`."""

    @abc.abstractmethod
    def listing(self, name: str, writing: bool = False) -> Listing | None:
        """The parts of table `name` in sequence order, or None when they changed while being
        listed. `writing`: errors are raised as a writer's (StoreWriteError)."""

    @abc.abstractmethod
    def read_parts(
        self,
        name: str,
        listing: Listing,
        columns: list[str] | None,
        filters: ds.Expression | None = None,
    ) -> Iterator[tuple[Part, pa.Schema, pa.Table]]:
        """Each part of `listing` (in its order) with its schema, and its `columns` (None:
        all) of the rows `filters` keeps; FileNotFoundError when a part vanished."""

    @abc.abstractmethod
    def read_schema(self, part: Part) -> pa.Schema:
        """A part's schema."""

    @abc.abstractmethod
    def write_part(self, name: str, t: pa.Table, seq: int) -> Part:
        """Write `t` as a new part of table `name` with write sequence `seq`, atomically."""

    @abc.abstractmethod
    def rewrite_part(self, name: str, part: Part, t: pa.Table) -> None:
        """Replace the rows of `part` by `t`, keeping its place in the sequence order."""

    @abc.abstractmethod
    def remove_part(self, part: Part) -> None:
        """Delete a part; nothing when it is gone already."""

    @abc.abstractmethod
    def describe(self, part: Part) -> str:
        """Where a part is, for messages: its path or URL."""

    @abc.abstractmethod
    def locked(self, name: str) -> contextlib.AbstractContextManager[None]:
        """Hold the write lock of table `name`; an OSError inside becomes a StoreWriteError."""

    # -- the rest of the data root -----------------------------------------------------------------
    @abc.abstractmethod
    def absolute(self, relative: str) -> Path | str:
        """Where the file at `relative` under the data root lives: a local path, or a URL."""

    @abc.abstractmethod
    def has_stores(self) -> bool:
        """Whether the data root holds a stores/ folder."""

    @abc.abstractmethod
    def list_tables(self, under: str, depth: int) -> list[str]:
        """Names of the tables `depth` folders below `stores/<under>` that hold part files."""

    @abc.abstractmethod
    def put_text(self, relative: str, text: str) -> Path | str:
        """Write a small text file at `relative`, atomically; returns where it is."""

    @abc.abstractmethod
    def get_text(self, relative: str) -> str | None:
        """The text file at `relative`, or None when there is none."""

    @abc.abstractmethod
    def upload(self, local: Path, relative: str) -> None:
        """Make the local file `local` (under local_dir) the data root's file at `relative`."""

    @abc.abstractmethod
    def download(self, relative: str, local: Path) -> None:
        """Bring the data root's file at `relative` to `local`; FileNotFoundError when absent."""

    @abc.abstractmethod
    def exists(self, relative: str) -> bool:
        """Whether the data root holds a file at `relative`."""


class LocalParts(PartBackend):
    """A data root on a local (or mounted) disk: part files are written under a temporary name
    and renamed (a crash leaves the previous state), writers serialise on `<table>/.lock`."""

    def __init__(self, root: Path, lock_timeout: float):
        self.root = root
        self.url = str(root)
        self.local_dir = root
        self.stores = root / "stores"
        self.lock_timeout = lock_timeout

    def table_dir(self, name: str) -> Path:
        return self.stores / name

    def listing(self, name: str, writing: bool = False) -> Listing | None:
        out = {}
        for p in sorted(self.table_dir(name).glob(PART_GLOB)):
            try:
                st = p.stat()
            except FileNotFoundError:
                return None
            out[p] = (st.st_size, (st.st_ino, st.st_mtime_ns))
        return out

    def read_parts(
        self,
        name: str,
        listing: Listing,
        columns: list[str] | None,
        filters: ds.Expression | None = None,
    ) -> Iterator[tuple[Part, pa.Schema, pa.Table]]:
        for part in listing:
            yield (part, *read_parquet(part, columns, filters))

    def read_schema(self, part: Part) -> pa.Schema:
        return pq.read_schema(part)

    def write_part(self, name: str, t: pa.Table, seq: int) -> Path:
        final = self.table_dir(name) / part_name(seq)
        with atomic_path(final) as tmp:
            write_parquet(t, tmp)
        return final

    def rewrite_part(self, name: str, part: Part, t: pa.Table) -> None:
        with atomic_path(part) as tmp:  # a new inode under the same name
            write_parquet(t, tmp)

    def remove_part(self, part: Part) -> None:
        Path(part).unlink(missing_ok=True)

    def describe(self, part: Part) -> str:
        return str(part)

    @contextlib.contextmanager
    def locked(self, name: str) -> Iterator[None]:
        folder = self.table_dir(name)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with FileLock(str(folder / ".lock"), timeout=self.lock_timeout):
                # Every write to the folder happens under this lock, so a temporary part file
                # seen now was left by a writer that was killed before its rename.
                for stale in folder.glob(STALE_TMP_GLOB):
                    stale.unlink(missing_ok=True)
                yield
        except OSError as e:
            if isinstance(e, StoreWriteError):
                raise
            raise store_write_error(e, f"table {name!r}", folder, self.root) from e

    def absolute(self, relative: str) -> Path:
        return self.root / relative

    def has_stores(self) -> bool:
        return self.stores.is_dir()

    def list_tables(self, under: str, depth: int) -> list[str]:
        pattern = "/".join(["*"] * depth)
        return [
            folder.relative_to(self.stores).as_posix()
            for folder in sorted((self.stores / under).glob(pattern))
            if any(folder.glob(PART_GLOB))
        ]

    def put_text(self, relative: str, text: str) -> Path:
        path = self.absolute(relative)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            tmp.write_text(text, encoding="utf-8")
        return path

    def get_text(self, relative: str) -> str | None:
        try:
            return self.absolute(relative).read_text(encoding="utf-8")
        except FileNotFoundError:
            return None

    def upload(self, local: Path, relative: str) -> None:
        return None  # the local folder is the data root: the file is in place already

    def download(self, relative: str, local: Path) -> None:
        return None  # the same: `local` is where the data root keeps it

    def exists(self, relative: str) -> bool:
        return self.absolute(relative).exists()
