"""The Parquet store: the one place where merflow reads and writes tables.

Layout under the data root (a local folder, or an fsspec URL such as `s3://bucket/prefix`)::

    stores/<table>/part-<sequence>-<uid>.parquet   one file per write, compacted as they pile up
    stores/<table>/.lock                            serialises writers across processes (local)
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

Object storage (a URL data root; fsspec, s3fs for `s3://`)
-----------------------------------------------------------
* A part is written with one PUT straight to its final name: an object appears whole or not
  at all, so there is no temporary name and no rename. Objects are never overwritten: a part
  that loses rows is rewritten under a new name that keeps its sequence, then the old one is
  deleted. Readers therefore never see a half-written or changing object, and a read lists
  the objects (name, size, ETag) before and after and retries when the listing moved or an
  object vanished under it (the same consistent read as on a local disk).
* The `<sequence>` in a part's name is the writer's wall clock in nanoseconds: newest wins per
  key, across machines too, as long as the writers' clocks agree (NTP) to well under the time
  between two writes of the same key.
* Writers on one machine serialise on a local lock file under the store's local folder
  (`local_dir/stores/<table>/.lock`, one per URL: see data_contracts.location). Writers on
  different machines do not share a lock and stay correct: every write is a new uniquely
  named part, rewrites keep the sequence of the part they replace, and reads keep only the
  newest version of each key, so two machines upserting the same table (disjoint or
  overlapping keys) end with every key once, at the value of the later write.
* Merging parts (automatic compaction) names the merged part with the newest sequence among
  the parts it merges, drops rows that a newer unmerged part overrides, and only takes parts
  older than `compact_grace_s` (default 5 min), so a part still being uploaded by another
  machine cannot be shadowed. `compact()` and `delete()` rewrite parts: run them from one
  process at a time per table (one compactor) and not while another machine replaces or
  deletes keys of the same table, or a concurrent rewrite can bring a deleted row back.
* Artifacts (wavs, face crops) are written to the local folder first, uploaded with
  `publish_artifact`, and read back through `local_file`, which downloads an artifact once
  into the same local folder and reuses it (names are content-addressed).
* A missing bucket, refused credentials or an unreachable endpoint raise StoreAccessError (on
  reads) or StoreWriteError (on writes) naming the URL and the way out, never a raw botocore
  error. Credentials and the endpoint come from the usual places (AWS_ACCESS_KEY_ID,
  AWS_SECRET_ACCESS_KEY, AWS_PROFILE, AWS_ENDPOINT_URL, ...) or `storage_options`.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from filelock import FileLock, Timeout

from data_contracts.atomic import atomic_path
from data_contracts.contracts import Contract
from data_contracts.location import DataRootError, default_local_dir, normalize_root
from data_contracts.tables import TableRef

# The store raises merflow's own error type so that the CLI and the tasks' retry rule treat it
# as a user-facing error; tasks.errors imports nothing, so this adds no cycle.
from tasks.errors import MerflowError

PART_GLOB = "part-*.parquet"
STALE_TMP_GLOB = ".part-*.tmp"  # atomic_path's temporary names for part files
_READ_ATTEMPTS = 8
# Remote parts up to this size are fetched whole in one GET; larger ones are read by ranges
# (only the footer and the wanted columns) when a read wants some columns only.
_WHOLE_GET_BYTES = 8 << 20

_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_READ_ONLY = {errno.EROFS, errno.EACCES, errno.EPERM}


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


# -- object storage --------------------------------------------------------------------------------
# Exception class names (botocore, aiohttp, builtins) that mean "the endpoint did not answer".
_UNREACHABLE = {
    "EndpointConnectionError",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "ConnectionClosedError",
    "ProxyConnectionError",
    "ClientConnectorError",
    "ClientConnectionError",
    "ServerDisconnectedError",
    "ServerTimeoutError",
    "ConnectionError",
    "TimeoutError",
}
_NO_CREDENTIALS = {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"}


def _names(e: BaseException) -> set[str]:
    return {c.__name__ for c in type(e).__mro__}


def _no_bucket(e: BaseException) -> bool:
    """Whether `e` says the bucket itself is missing (not one object in it)."""
    text = str(e).lower()
    return "bucket does not exist" in text or "nosuchbucket" in text


def _part_seq(part: str | Path) -> int:
    """The write sequence in a part's name (`part-<sequence>-<uid>.parquet`)."""
    try:
        return int(os.path.basename(str(part)).split("-")[1])
    except (IndexError, ValueError):
        return 0


def _part_name(seq: int) -> str:
    return f"part-{seq:020d}-{uuid.uuid4().hex[:8]}.parquet"


class _Remote:
    """The fsspec side of a store whose data root is a URL: paths, listings, errors."""

    def __init__(self, url: str, storage_options: dict[str, Any]):
        import fsspec

        self.url = url
        try:
            self.fs, path = fsspec.core.url_to_fs(url, **storage_options)
        except ImportError as e:
            raise DataRootError(
                f"data root {url} needs the fsspec driver of its protocol ({e}); install it "
                f"(s3://: s3fs, gs://: gcsfs, az://: adlfs) or use a local data root"
            ) from e
        except ValueError as e:
            raise DataRootError(f"data root {url} is not a URL fsspec can open: {e}") from e
        self.base = path.rstrip("/")
        self._bucket_seen = False
        client = storage_options.get("client_kwargs") or {}
        self.endpoint = (
            getattr(self.fs, "endpoint_url", None)  # s3fs: the option, FSSPEC_S3_ENDPOINT_URL
            or storage_options.get("endpoint_url")
            or client.get("endpoint_url")
            or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL")
        )

    def path(self, rel: str) -> str:
        return f"{self.base}/{rel}" if rel else self.base

    def url_of(self, path: str) -> str:
        rel = path[len(self.base) :].lstrip("/") if path.startswith(self.base) else path
        return f"{self.url}/{rel}" if rel else self.url

    @property
    def bucket(self) -> str | None:
        split = getattr(self.fs, "split_path", None)  # s3fs, gcsfs: bucket-based stores
        if split is None:
            return None
        return split(self.base)[0] or None

    def error(self, e: BaseException, what: str, writing: bool) -> Exception | None:
        """The merflow error for `e`, raised by the object store while touching `what`."""
        verb = "write" if writing else "read"
        url, names, text = self.url, _names(e), str(e)

        def make(message: str, transient: bool) -> Exception:
            if writing:
                return StoreWriteError(message, url, getattr(e, "errno", None), transient)
            return StoreAccessError(message, url, transient)

        if isinstance(e, FileNotFoundError) and _no_bucket(e):
            return self.missing_bucket(what, writing)
        if names & _NO_CREDENTIALS:
            return make(
                f"cannot {verb} {what}: no credentials for {url} ({text}); set "
                f"AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or give the "
                f"machine a role that may use the bucket",
                False,
            )
        if isinstance(e, PermissionError) or "AccessDenied" in text or "Forbidden" in text:
            return make(
                f"cannot {verb} {what}: the object store refused access to {url} ({text}); check "
                f"the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE) and "
                f"that they may list, read and write objects under {url}",
                False,
            )
        if names & _UNREACHABLE:
            where = f"endpoint {self.endpoint}" if self.endpoint else "the default endpoint"
            return make(
                f"cannot {verb} {what}: the object store of {url} did not answer ({where}: "
                f"{type(e).__name__}: {text}); check AWS_ENDPOINT_URL and the network, then run "
                f"again",
                True,
            )
        if isinstance(e, OSError) or "ClientError" in names or "BotoCoreError" in names:
            return make(
                f"cannot {verb} {what} at {url}: {type(e).__name__}: {text}; check the object "
                f"store and run again",
                True,
            )
        return None

    def missing_bucket(self, what: str, writing: bool) -> Exception:
        bucket = self.bucket or self.url
        scheme = self.url.split("://", 1)[0]
        message = (
            f"cannot {'write' if writing else 'read'} {what}: the bucket {bucket!r} of data root "
            f"{self.url} does not exist (or these credentials cannot see it); create it (e.g. "
            f"`aws s3 mb {scheme}://{bucket}`, with --endpoint-url for a non-AWS server) or point "
            f"data_root at an existing bucket (endpoint: "
            f"{self.endpoint or 'the default; AWS_ENDPOINT_URL sets another'})"
        )
        if writing:
            return StoreWriteError(message, self.url, None, False)
        return StoreAccessError(message, self.url, False)

    @contextlib.contextmanager
    def translate(self, what: str, writing: bool) -> Iterator[None]:
        """Turn the object store's exceptions into merflow errors; a FileNotFoundError of one
        object (not of the bucket) passes through for the caller to handle."""
        try:
            yield
        except (StoreWriteError, StoreAccessError):
            raise
        except FileNotFoundError as e:
            if _no_bucket(e) or not self.bucket_exists(what, writing):
                raise self.missing_bucket(what, writing) from e
            raise
        except Exception as e:
            err = self.error(e, what, writing)
            if err is None:
                raise
            raise err from e

    def bucket_exists(self, what: str, writing: bool) -> bool:
        if self._bucket_seen or self.bucket is None:
            return True
        try:
            self._bucket_seen = bool(self.fs.exists(self.bucket))
        except Exception as e:
            err = self.error(e, what, writing)
            if err is None:
                raise
            raise err from e
        return self._bucket_seen

    def ls(self, path: str, what: str, writing: bool = False) -> list[dict]:
        """The entries right under `path` (fresh, never from a listing cache); [] when none."""
        with self.translate(what, writing):
            self.fs.invalidate_cache(path)
            try:
                return self.fs.ls(path, detail=True)
            except FileNotFoundError as e:
                if _no_bucket(e) or not self.bucket_exists(what, writing):
                    raise self.missing_bucket(what, writing) from e
                return []

    def parts(self, folder: str, what: str, writing: bool = False) -> dict[str, tuple[int, str]]:
        """Part objects in `folder`, in sequence order: path -> (size, ETag or time)."""
        out = {}
        for entry in self.ls(folder, what, writing):
            name = entry["name"].rstrip("/")
            base = name.rsplit("/", 1)[-1]
            if entry.get("type") != "file" or not fnmatch.fnmatch(base, PART_GLOB):
                continue
            stamp = entry.get("ETag") or entry.get("LastModified") or entry.get("mtime")
            stamp = stamp or entry.get("created") or ""
            out[name] = (int(entry.get("size") or 0), str(stamp))
        return dict(sorted(out.items(), key=lambda kv: kv[0].rsplit("/", 1)[-1]))

    def read_part(
        self, path: str, want: list[str] | None, size: int | None
    ) -> tuple[pa.Schema, pa.Table]:
        """A part's schema and (some of) its columns; FileNotFoundError when it vanished."""
        with self.translate(f"part {self.url_of(path)}", writing=False):
            if want is None or size is None or size <= _WHOLE_GET_BYTES:
                pf = pq.ParquetFile(pa.BufferReader(self.fs.cat_file(path)))
                return pf.schema_arrow, pf.read(columns=want)
            with self.fs.open(path, "rb", cache_type="none") as f:
                pf = pq.ParquetFile(f)
                return pf.schema_arrow, pf.read(columns=want)

    def fetch(self, paths: list[str], what: str) -> dict[str, bytes]:
        """Whole objects, fetched concurrently; FileNotFoundError when one vanished."""
        if not paths:
            return {}
        with self.translate(what, writing=False):
            got = self.fs.cat(paths, on_error="return")
        if not isinstance(got, dict):  # one path: fsspec returns its bytes
            got = {paths[0]: got}
        out = {}
        for path in paths:
            data = got.get(path, FileNotFoundError(path))
            if isinstance(data, FileNotFoundError):
                raise data
            if isinstance(data, BaseException):
                err = self.error(data, f"part {self.url_of(path)}", writing=False)
                raise err if err is not None else data
            out[path] = data
        return out

    def parse_part(self, data: bytes, want: list[str] | None) -> tuple[pa.Schema, pa.Table]:
        pf = pq.ParquetFile(pa.BufferReader(data))
        return pf.schema_arrow, pf.read(columns=want)

    def read_schema(self, path: str) -> pa.Schema:
        with (
            self.translate(f"part {self.url_of(path)}", writing=False),
            self.fs.open(path, "rb", cache_type="none") as f,
        ):
            return pq.ParquetFile(f).schema_arrow

    def put_bytes(self, path: str, data: bytes, what: str) -> None:
        with self.translate(what, writing=True):
            self.fs.pipe_file(path, data)

    def put_table(self, path: str, t: pa.Table, what: str) -> None:
        sink = pa.BufferOutputStream()
        pq.write_table(t, sink, compression="zstd")
        self.put_bytes(path, sink.getvalue().to_pybytes(), what)

    def remove(self, path: str, what: str) -> None:
        with self.translate(what, writing=True), contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(path)


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
        self._remote_io: _Remote | None = None

    @property
    def url(self) -> str:
        """The data root as a string: the local path, or the URL."""
        return str(self.root)

    @property
    def _remote(self) -> _Remote:
        if self._remote_io is None:
            self._remote_io = _Remote(str(self.root), self.storage_options)
        return self._remote_io

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_remote_io"] = None  # rebuilt where it is used (another process, another loop)
        return state

    # -- paths ---------------------------------------------------------------------------------
    def table_dir(self, table: TableRef) -> Path | str:
        """The folder (or, for a URL root, the URL prefix) that holds `table`'s part files."""
        if isinstance(self.stores, str):
            return f"{self.stores}/{table.name}"
        return self.stores / table.name

    def _remote_folder(self, name: str) -> str:
        return self._remote.path(f"stores/{name}")

    def artifact_path(
        self, kind: str, extractor_id: str, video_id: str, sha256: str, suffix: str
    ) -> Path:
        """Absolute local path to write one video's artifact to; its folder exists.

        For a URL root this is in the local folder; `publish_artifact` uploads it.
        """
        folder = self.local_dir / "artifacts" / kind / extractor_id
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise store_write_error(e, f"{kind} artifacts", folder, self.local_dir) from e
        return folder / f"{video_id}-{sha256[:12]}{suffix}"

    def relative(self, path: Path | str) -> str:
        """`path` relative to the data root (its local folder for a URL root), as stored in
        table rows."""
        return Path(path).resolve().relative_to(self.local_dir).as_posix()

    def absolute(self, relative: str) -> Path | str:
        """Where a path stored in a table row lives: a local path, or a URL for a URL root."""
        if isinstance(self.root, str):
            return f"{self.root}/{relative}"
        return self.root / relative

    def publish_artifact(self, path: Path | str) -> str:
        """Make an artifact written at `path` (from `artifact_path`) part of the data root and
        return its relative path for the table row: for a URL root it is uploaded (one PUT,
        atomic) and the local copy stays as the cache; a local root needs nothing."""
        rel = self.relative(path)
        if self.is_remote:
            r = self._remote
            with r.translate(f"artifact {self.absolute(rel)}", writing=True):
                r.fs.put_file(str(path), r.path(rel))
        return rel

    def local_file(self, relative: str) -> Path:
        """A local path holding the artifact stored at `relative` (for a URL root, downloaded
        once into the local folder and reused); FileNotFoundError when it is not stored."""
        local = self.local_dir / relative
        if not self.is_remote or local.exists():
            return local
        if any(seg in ("", ".", "..") for seg in relative.split("/")):
            raise ValueError(f"artifact path {relative!r} is not a plain relative path")
        r = self._remote
        try:
            with (
                r.translate(f"artifact {self.absolute(relative)}", writing=False),
                atomic_path(local) as tmp,
            ):
                r.fs.get_file(r.path(relative), str(tmp))
        except FileNotFoundError as e:
            raise FileNotFoundError(
                errno.ENOENT, f"artifact is not on the object store: {self.absolute(relative)}"
            ) from e
        return local

    def artifact_exists(self, relative: str) -> bool:
        """Whether the artifact at `relative` is stored (locally cached counts for a URL root)."""
        local = self.local_dir / relative
        if not self.is_remote or local.exists():
            return local.exists()
        r = self._remote
        with r.translate(f"artifact {self.absolute(relative)}", writing=False):
            return bool(r.fs.exists(r.path(relative)))

    # -- small files beside the stores (reports, resolved settings) -----------------------------
    def write_text(self, relative: str, text: str) -> Path | str:
        """Write a small text file at `relative` under the data root, atomically; returns where."""
        if self.is_remote:
            r = self._remote
            r.put_bytes(r.path(relative), text.encode("utf-8"), str(self.absolute(relative)))
            return self.absolute(relative)
        path = Path(self.absolute(relative))
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            tmp.write_text(text, encoding="utf-8")
        return path

    def read_text(self, relative: str) -> str | None:
        """The text file at `relative` under the data root, or None when there is none."""
        if not self.is_remote:
            try:
                return Path(self.absolute(relative)).read_text(encoding="utf-8")
            except FileNotFoundError:
                return None
        r = self._remote
        try:
            with r.translate(str(self.absolute(relative)), writing=False):
                return r.fs.cat_file(r.path(relative)).decode("utf-8")
        except FileNotFoundError:
            return None

    # -- what the data root holds ----------------------------------------------------------------
    def has_stores(self) -> bool:
        """Whether the data root holds a stores/ folder (is the data root of an extraction)."""
        if isinstance(self.stores, Path):
            return self.stores.is_dir()
        return bool(self._remote.ls(self._remote.path("stores"), f"the stores of {self.url}"))

    def list_tables(self, under: str, depth: int) -> list[str]:
        """Names of the tables `depth` folders below `stores/<under>` that hold part files,
        e.g. list_tables("features", 2) -> ["features/visual/<extractor_id>", ...]."""
        if isinstance(self.stores, Path):
            pattern = "/".join(["*"] * depth)
            return [
                folder.relative_to(self.stores).as_posix()
                for folder in sorted((self.stores / under).glob(pattern))
                if any(folder.glob(PART_GLOB))
            ]
        r = self._remote
        top = self._remote_folder(under)
        with r.translate(f"the stores of {self.url}", writing=False):
            r.fs.invalidate_cache(top)
            try:
                found = r.fs.find(top)
            except FileNotFoundError:
                found = []
        names = set()
        for path in found:
            rel = path[len(top) :].strip("/").split("/")
            if len(rel) == depth + 1 and fnmatch.fnmatch(rel[-1], PART_GLOB):
                names.add(f"{under}/{'/'.join(rel[:-1])}")
        return sorted(names)

    def part_schemas(self, name: str) -> list[pa.Schema]:
        """The schema (with its contract metadata) of every part file of the table `name`."""
        if isinstance(self.stores, Path):
            return [pq.read_schema(p) for p in sorted((self.stores / name).glob(PART_GLOB))]
        folder = self._remote_folder(name)
        return [self._remote.read_schema(p) for p in self._remote.parts(folder, f"table {name!r}")]

    # -- parts ---------------------------------------------------------------------------------
    def _parts(self, table: TableRef) -> list[Path | str]:
        # Names sort by write sequence: later parts win when a key appears twice.
        if self.is_remote:
            return list(self._remote_parts(table))
        return sorted(Path(self.table_dir(table)).glob(PART_GLOB))

    def _remote_parts(self, table: TableRef, writing: bool = False) -> dict[str, tuple[int, str]]:
        folder = self._remote_folder(table.name)
        return self._remote.parts(folder, f"table {table.name!r} of {self.url}", writing)

    @contextlib.contextmanager
    def _writing(self, table: TableRef) -> Iterator[None]:
        """Hold the table's write lock; any OSError inside becomes a StoreWriteError."""
        if self.is_remote:
            # Object stores have no locks: writers on this machine serialise on a local lock
            # file; writers elsewhere stay correct through unique part names (module docstring).
            folder = self.local_dir / "stores" / table.name
            lock = FileLock(str(folder / ".lock"), timeout=self.lock_timeout)
            try:
                folder.mkdir(parents=True, exist_ok=True)
                lock.acquire()
            except OSError as e:
                what = f"table {table.name!r} of {self.url} (its lock file on this machine)"
                raise store_write_error(e, what, folder, self.local_dir) from e
            try:
                yield
            finally:
                lock.release()
            return
        folder = Path(self.table_dir(table))
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
            raise store_write_error(e, f"table {table.name!r}", folder, Path(self.root)) from e

    # -- reading -------------------------------------------------------------------------------
    def exists(self, table: TableRef) -> bool:
        """Whether the table holds at least one part file."""
        return bool(self._parts(table))

    def read_arrow(self, table: TableRef, columns: list[str] | None = None) -> pa.Table:
        """The table as Arrow, newest row per key, contract checked on every file.

        Lock-free and consistent: the folder (or object listing) is listed before and after
        reading, and the read is redone when a concurrent writer changed it in between.
        """
        for attempt in range(_READ_ATTEMPTS):
            if attempt and self.is_remote:
                time.sleep(min(0.5, 0.02 * 2**attempt))
            before = self._snapshot(table)
            if before is None:
                continue
            try:
                t = self._read(table, list(before), columns, before)
            except (OSError, pa.ArrowInvalid):
                if self._snapshot(table) == before:
                    raise  # nothing moved: the file itself is unreadable
                continue  # a writer replaced or removed a part while we read it
            if self._snapshot(table) == before:
                return t
        # Writers kept changing the folder: read once under their lock.
        with self._writing(table):
            return self._read_current(table, columns)[1]

    def _snapshot(self, table: TableRef) -> dict[Any, tuple] | None:
        # Writers never modify a part in place (new files, renames onto new inodes, deletes;
        # on object storage new objects and deletes), so equal (name, inode, mtime, size) or
        # (name, size, ETag) sets before and after a read mean nothing moved.
        if self.is_remote:
            return self._remote_parts(table)
        snap = {}
        for p in self._parts(table):
            try:
                st = Path(p).stat()
            except FileNotFoundError:
                return None
            snap[p] = (st.st_ino, st.st_mtime_ns, st.st_size)
        return snap

    def _read_current(
        self, table: TableRef, columns: list[str] | None
    ) -> tuple[list[Path | str], pa.Table]:
        """The parts and the table as they are now, for a writer holding the lock. On object
        storage a writer on another machine may rewrite or merge a part meanwhile: re-list."""
        if not self.is_remote:
            parts = self._parts(table)
            return parts, self._read(table, parts, columns)
        for _ in range(_READ_ATTEMPTS):
            snap = self._remote_parts(table, writing=True)
            try:
                return list(snap), self._read(table, list(snap), columns, snap)
            except FileNotFoundError:
                continue
        raise StoreAccessError(
            f"table {table.name!r} of {self.url} kept changing while this writer read it "
            f"({_READ_ATTEMPTS} attempts): another machine is rewriting it; run again",
            self.url,
            True,
        )

    def _read_part(
        self, part: Path | str, want: list[str] | None, size: int | None = None
    ) -> tuple[pa.Schema, pa.Table]:
        if isinstance(part, str):
            return self._remote.read_part(part, want, size)
        return pq.read_schema(part), pq.read_table(part, columns=want, schema=None)

    def _concat(
        self,
        table: TableRef,
        parts: list[Path | str],
        columns: list[str] | None,
        sizes: dict | None = None,
    ) -> pa.Table:
        """Every row of `parts` (contract checked), newest per key, with a `__part` column."""
        contract = table.contract
        want = None if columns is None else list(dict.fromkeys([*contract.key, *columns]))
        fetched: dict[str, bytes] = {}
        if self.is_remote:
            # Whole objects in one concurrent batch (one GET each, in parallel); only large
            # parts read for some columns go by ranges, one after the other.
            sizes = sizes or {}
            whole = [
                p
                for p in parts
                if isinstance(p, str)
                and (want is None or p not in sizes or sizes[p][0] <= _WHOLE_GET_BYTES)
            ]
            fetched = self._remote.fetch(whole, f"table {table.name!r} of {self.url}")
        pieces = []
        for i, part in enumerate(parts):
            if isinstance(part, str) and part in fetched:
                schema, t = self._remote.parse_part(fetched.pop(part), want)
            else:
                size = sizes[part][0] if sizes and part in sizes and self.is_remote else None
                schema, t = self._read_part(part, want, size)
            where = self._remote.url_of(part) if isinstance(part, str) else f"{part}"
            contract.check_schema(schema, where)
            pieces.append(t.append_column("__part", pa.array(np.full(t.num_rows, i, np.int32))))
        if not pieces:
            empty = contract.schema.empty_table()
            empty = empty.select(want) if want else empty
            return empty.append_column("__part", pa.array([], pa.int32()))
        t = pa.concat_tables(pieces).combine_chunks()
        return _latest_per_key(t, list(contract.key))

    def _read(
        self,
        table: TableRef,
        parts: list[Path | str],
        columns: list[str] | None,
        sizes: dict | None = None,
    ) -> pa.Table:
        contract = table.contract
        t = self._concat(table, parts, columns, sizes).drop_columns(["__part"])
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
        atomic per file and serialised across processes by a lock file. Only the key columns
        of the stored parts are read unless some of the new keys are already held.
        """
        report = WriteReport(table.name)
        if df is None or len(df) == 0:
            return report
        new = table.contract.to_arrow(df)
        key = list(table.key)
        with self._writing(table):
            parts, held = self._read_current(table, key)
            replaced_keys: set[tuple] = set()
            if held.num_rows and _keys(new, key) & _keys(held, key):
                parts, old = self._read_current(table, None)
                new, replaced_keys, report.unchanged = _split_changes(table.contract, old, new)
            if new.num_rows == 0:
                return report
            report.replaced = len(replaced_keys)
            report.inserted = new.num_rows - report.replaced
            self._write_part(table, new)
            if replaced_keys:
                self._drop_keys_from(table, parts, replaced_keys)
            self._maybe_compact(table)
        return report

    def _write_part(self, table: TableRef, t: pa.Table, seq: int | None = None) -> Path | str:
        name = _part_name(time.time_ns() if seq is None else seq)
        if self.is_remote:
            path = f"{self._remote_folder(table.name)}/{name}"
            self._remote.put_table(path, t, f"table {table.name!r} of {self.url}")
            return path
        final = Path(self.table_dir(table)) / name
        with atomic_path(final) as tmp:
            pq.write_table(t, tmp, compression="zstd")
        return final

    def _remove_part(self, part: Path | str) -> None:
        if isinstance(part, str):
            self._remote.remove(part, f"part {self._remote.url_of(part)}")
        else:
            part.unlink(missing_ok=True)

    def _drop_keys_from(self, table: TableRef, parts: list[Path | str], keys: set[tuple]) -> None:
        for part in parts:
            if isinstance(part, str):
                try:
                    t = self._remote.read_part(part, None, None)[1]
                except FileNotFoundError:
                    continue  # another machine rewrote or merged it; its newer rows still win
            else:
                t = pq.read_table(part)
            hold = _key_mask(t, list(table.key), keys)
            if not pc.any(hold).as_py():
                continue
            kept = t.filter(pc.invert(hold))
            if kept.num_rows == 0:
                if isinstance(part, str):
                    self._remove_part(part)
                else:
                    os.unlink(part)
            elif isinstance(part, str):
                # Objects are never overwritten: the rewrite keeps the part's sequence (its
                # place in the newest-wins order) under a new name, then the old one goes.
                self._write_part(table, kept, seq=_part_seq(part))
                self._remove_part(part)
            else:
                with atomic_path(part) as tmp:
                    pq.write_table(kept, tmp, compression="zstd")

    def _small_parts(self, table: TableRef, below: int) -> list[Path | str]:
        if not self.is_remote:
            return [p for p in self._parts(table) if Path(p).stat().st_size < below]
        # Only parts old enough that no upload still running elsewhere can sort before them.
        cutoff = time.time_ns() - int(self.compact_grace_s * 1e9)
        listing = self._remote_parts(table, writing=True)
        return [p for p, (size, _) in listing.items() if size < below and _part_seq(p) <= cutoff]

    def _maybe_compact(self, table: TableRef) -> None:
        small = self._small_parts(table, self.target_part_bytes // 2)
        if len(small) > self.max_small_parts:
            self._merge(table, small)

    def compact(self, table: TableRef) -> int:
        """Merge all small part files of a table into one; returns the number merged.

        On object storage only parts older than `compact_grace_s` are merged, and one process
        at a time should compact a table (see the module docstring).
        """
        with self._writing(table):
            small = self._small_parts(table, self.target_part_bytes)
            if len(small) > 1 and self._merge(table, small):
                return len(small)
            return 0

    def _merge(self, table: TableRef, parts: list[Path | str]) -> bool:
        if not self.is_remote:
            # Write the merged file first (it sorts after the parts it replaces), then delete
            # them: a crash in between leaves duplicates that reads resolve, never a loss.
            merged = self._read(table, parts, None)
            self._write_part(table, merged)
            for p in parts:
                Path(p).unlink(missing_ok=True)
            return True
        # Object storage: the merged part takes the newest sequence among the merged parts, and
        # a row that a newer part outside the merge overrides is left out, so the merge never
        # changes which version of a key wins, even with writers on other machines.
        try:
            t = self._concat(table, parts, None)
            others = [p for p in self._remote_parts(table, writing=True) if p not in set(parts)]
            if others and t.num_rows:
                newest: dict[tuple, int] = {}
                for q in others:
                    keys_q = self._remote.read_part(q, list(table.key), None)[1]
                    for k in _key_list(keys_q, list(table.key)):
                        newest[k] = max(newest.get(k, 0), _part_seq(q))
                source = [_part_seq(parts[i]) for i in t.column("__part").to_pylist()]
                keep = [
                    newest.get(k, -1) < s
                    for k, s in zip(_key_list(t, list(table.key)), source, strict=True)
                ]
                t = t.filter(pa.array(keep, pa.bool_()))
        except FileNotFoundError:
            return False  # another machine merged or rewrote a part meanwhile: merge later
        merged = t.drop_columns(["__part"]).replace_schema_metadata(table.contract.schema.metadata)
        self._write_part(table, merged, seq=max(_part_seq(p) for p in parts))
        for p in parts:
            self._remove_part(p)
        return True

    def delete(self, table: TableRef, keys: set[tuple]) -> int:
        """Remove rows by key; returns how many keys were held.

        On object storage, one process at a time should delete from a table, and not while
        another machine replaces keys of it (see the module docstring).
        """
        with self._writing(table):
            parts, t = self._read_current(table, list(table.key))
            held = set(_key_list(t, list(table.key))) & keys
            if held:
                self._drop_keys_from(table, parts, held)
            return len(held)


def _key_list(t: pa.Table, key: list[str]) -> list[tuple]:
    return list(zip(*(t.column(k).to_pylist() for k in key), strict=True))


def _keys(t: pa.Table, key: list[str]) -> set[tuple]:
    return set(_key_list(t, key))


def _key_mask(t: pa.Table, key: list[str], keys: set[tuple]) -> pa.ChunkedArray:
    tuples = _key_list(t, key)
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
    old_keys = _key_list(old, key)
    position = {k: i for i, k in enumerate(old_keys)}
    new_keys = _key_list(new, key)
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
