"""The part-file backend of a data root on object storage (an fsspec URL; s3fs for `s3://`).

* A part is written with one PUT straight to its final name: an object appears whole or not
  at all, so there is no temporary name and no rename. Objects are never overwritten: a part
  that loses rows is rewritten under a new name that keeps its sequence, then the old one is
  deleted, so a reader never sees a half-written or changing object. A listing gives each
  part's size and ETag, so equal listings before and after a read mean a consistent read.
* Writers on one machine serialise on a local lock file under the store's local folder
  (`local_dir/stores/<table>/.lock`); writers on other machines take no shared lock
  (`writers_elsewhere`), see data_contracts.store for why tables stay exact.
* Artifacts are written to the local folder, uploaded with one PUT, and downloaded once into
  the same local folder (their names are content-addressed).
* The object store's exceptions become StoreAccessError (reads) or StoreWriteError (writes)
  naming the URL and the way out (missing bucket, refused credentials, unreachable endpoint),
  never a raw botocore error.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import functools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from filelock import FileLock

from data_contracts.atomic import atomic_path
from data_contracts.location import DataRootError
from data_contracts.parts import (
    PART_GLOB,
    Listing,
    Part,
    PartBackend,
    StoreAccessError,
    StoreWriteError,
    part_name,
    part_seq,
    read_parquet,
    store_write_error,
    write_parquet,
)

# Parts up to this size are fetched whole in one GET; larger ones are read by ranges (only the
# footer and the wanted columns) when a read wants some columns only.
_WHOLE_GET_BYTES = 8 << 20
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


class ObjectParts(PartBackend):
    """A data root at an fsspec URL: paths, listings, reads, writes and their errors."""

    writers_elsewhere = True
    read_backoff_s = 0.02

    def __init__(
        self, url: str, storage_options: dict[str, Any], local_dir: Path, lock_timeout: float
    ):
        self.url = url
        self.storage_options = storage_options
        self.local_dir = local_dir
        self.lock_timeout = lock_timeout
        self._bucket_seen = False

    @functools.cached_property
    def _opened(self) -> tuple[Any, str]:
        """The fsspec filesystem and the root's path in it, opened on first use."""
        import fsspec

        try:
            fs, path = fsspec.core.url_to_fs(self.url, **self.storage_options)
        except ImportError as e:
            raise DataRootError(
                f"data root {self.url} needs the fsspec driver of its protocol ({e}); install "
                f"it (s3://: s3fs, gs://: gcsfs, az://: adlfs) or use a local data root"
            ) from e
        except ValueError as e:
            raise DataRootError(f"data root {self.url} is not a URL fsspec can open: {e}") from e
        return fs, path.rstrip("/")

    @property
    def fs(self) -> Any:
        return self._opened[0]

    @property
    def base(self) -> str:
        return self._opened[1]

    @functools.cached_property
    def endpoint(self) -> str | None:
        client = self.storage_options.get("client_kwargs") or {}
        return (
            getattr(self.fs, "endpoint_url", None)  # s3fs: the option, FSSPEC_S3_ENDPOINT_URL
            or self.storage_options.get("endpoint_url")
            or client.get("endpoint_url")
            or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL")
        )

    # -- paths and errors ----------------------------------------------------------------------
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

    # -- part files ----------------------------------------------------------------------------
    def _what(self, name: str) -> str:
        return f"table {name!r} of {self.url}"

    def table_dir(self, name: str) -> str:
        return f"{self.url}/stores/{name}"

    def listing(self, name: str, writing: bool = False) -> Listing:
        out = {}
        for entry in self.ls(self.path(f"stores/{name}"), self._what(name), writing):
            path = entry["name"].rstrip("/")
            base = path.rsplit("/", 1)[-1]
            if entry.get("type") != "file" or not fnmatch.fnmatch(base, PART_GLOB):
                continue
            stamp = entry.get("ETag") or entry.get("LastModified") or entry.get("mtime")
            stamp = stamp or entry.get("created") or ""
            out[path] = (int(entry.get("size") or 0), str(stamp))
        return dict(sorted(out.items(), key=lambda kv: kv[0].rsplit("/", 1)[-1]))

    def read_parts(
        self,
        name: str,
        listing: Listing,
        columns: list[str] | None,
        filters: ds.Expression | None = None,
    ) -> Iterator[tuple[Part, pa.Schema, pa.Table]]:
        # Whole objects in one concurrent batch (one GET each, in parallel); only large parts
        # read for some columns go by ranges, one after the other.
        whole = [
            p for p, (size, _) in listing.items() if columns is None or size <= _WHOLE_GET_BYTES
        ]
        fetched = self._fetch(whole, self._what(name))
        for part in listing:
            if part in fetched:
                yield (part, *read_parquet(pa.BufferReader(fetched.pop(part)), columns, filters))
                continue
            with (
                self.translate(f"part {self.url_of(part)}", writing=False),
                self.fs.open(part, "rb", cache_type="none") as f,
            ):
                schema, t = read_parquet(f, columns, filters)
            yield part, schema, t

    def _fetch(self, paths: list[str], what: str) -> dict[str, bytes]:
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

    def read_schema(self, part: Part) -> pa.Schema:
        with (
            self.translate(f"part {self.url_of(str(part))}", writing=False),
            self.fs.open(str(part), "rb", cache_type="none") as f,
        ):
            return pq.ParquetFile(f).schema_arrow

    def write_part(self, name: str, t: pa.Table, seq: int) -> str:
        path = self.path(f"stores/{name}/{part_name(seq)}")
        sink = pa.BufferOutputStream()
        write_parquet(t, sink)
        self._put(path, sink.getvalue().to_pybytes(), self._what(name))
        return path

    def rewrite_part(self, name: str, part: Part, t: pa.Table) -> None:
        # Objects are never overwritten: the rewrite keeps the part's sequence (its place in
        # the newest-wins order) under a new name, then the old one goes.
        self.write_part(name, t, part_seq(part))
        self.remove_part(part)

    def remove_part(self, part: Part) -> None:
        with (
            self.translate(f"part {self.url_of(str(part))}", writing=True),
            contextlib.suppress(FileNotFoundError),
        ):
            self.fs.rm_file(str(part))

    def describe(self, part: Part) -> str:
        return self.url_of(str(part))

    @contextlib.contextmanager
    def locked(self, name: str) -> Iterator[None]:
        # Object stores have no locks: writers on this machine serialise on a local lock file;
        # writers elsewhere stay correct through unique part names (data_contracts.store).
        folder = self.local_dir / "stores" / name
        lock = FileLock(str(folder / ".lock"), timeout=self.lock_timeout)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            lock.acquire()
        except OSError as e:
            what = f"{self._what(name)} (its lock file on this machine)"
            raise store_write_error(e, what, folder, self.local_dir) from e
        try:
            yield
        finally:
            lock.release()

    # -- the rest of the data root -------------------------------------------------------------
    def absolute(self, relative: str) -> str:
        return f"{self.url}/{relative}"

    def _put(self, path: str, data: bytes, what: str) -> None:
        with self.translate(what, writing=True):
            self.fs.pipe_file(path, data)

    def has_stores(self) -> bool:
        return bool(self.ls(self.path("stores"), f"the stores of {self.url}"))

    def list_tables(self, under: str, depth: int) -> list[str]:
        top = self.path(f"stores/{under}")
        with self.translate(f"the stores of {self.url}", writing=False):
            self.fs.invalidate_cache(top)
            try:
                found = self.fs.find(top)
            except FileNotFoundError:
                found = []
        names = set()
        for path in found:
            rel = path[len(top) :].strip("/").split("/")
            if len(rel) == depth + 1 and fnmatch.fnmatch(rel[-1], PART_GLOB):
                names.add(f"{under}/{'/'.join(rel[:-1])}")
        return sorted(names)

    def put_text(self, relative: str, text: str) -> str:
        self._put(self.path(relative), text.encode("utf-8"), self.absolute(relative))
        return self.absolute(relative)

    def get_text(self, relative: str) -> str | None:
        try:
            with self.translate(self.absolute(relative), writing=False):
                return self.fs.cat_file(self.path(relative)).decode("utf-8")
        except FileNotFoundError:
            return None

    def upload(self, local: Path, relative: str) -> None:
        with self.translate(f"artifact {self.absolute(relative)}", writing=True):
            self.fs.put_file(str(local), self.path(relative))

    def download(self, relative: str, local: Path) -> None:
        if any(seg in ("", ".", "..") for seg in relative.split("/")):
            raise ValueError(f"artifact path {relative!r} is not a plain relative path")
        try:
            with (
                self.translate(f"artifact {self.absolute(relative)}", writing=False),
                atomic_path(local) as tmp,
            ):
                self.fs.get_file(self.path(relative), str(tmp))
        except FileNotFoundError as e:
            raise FileNotFoundError(
                errno.ENOENT, f"artifact is not on the object store: {self.absolute(relative)}"
            ) from e

    def exists(self, relative: str) -> bool:
        with self.translate(f"artifact {self.absolute(relative)}", writing=False):
            return bool(self.fs.exists(self.path(relative)))
