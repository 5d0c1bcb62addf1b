"""Where a data root lives: a local folder, or an fsspec URL on object storage (`s3://bucket/p`).

A data root given as a string that starts with `<protocol>://` is a URL (any fsspec protocol
but `file`, whose URLs are plain local paths). URL roots are normalised (lower-case protocol,
no trailing slash) and refused when they hold `.`/`..`/empty segments, a query, a fragment or
an fsspec chain (`a::b`): such a URL could name another place than it seems to, which would
open a hole in the allowed-roots check (flows/safety.py).

Things that must stay on a local disk even when the data root is a URL (model checkpoints,
training runs, the Prefect server home, the store's lock files and artifact cache) go to a
local folder per URL: `$MERFLOW_CACHE_DIR/<slug>-<hash>` (default `~/.cache/merflow/...`).
This module imports nothing heavy: the settings (flows/config.py) use it.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from data_contracts.errors import MerflowError

CACHE_ENV = "MERFLOW_CACHE_DIR"
_URL = re.compile(r"^(?P<protocol>[A-Za-z][A-Za-z0-9+.\-]+)://(?P<rest>.*)$", re.DOTALL)
# What a str(Path(url)) looks like: the path conversion ate one slash of "s3://".
_MANGLED = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]+:/[^/]")


class DataRootError(MerflowError, ValueError):
    """A data root that cannot be used as given; the message says why and what to give."""


def is_url(root: str | os.PathLike[str] | None) -> bool:
    """Whether `root` is an object-storage URL (a `<protocol>://` string other than file://)."""
    if not isinstance(root, str):
        return False
    m = _URL.match(root)
    return bool(m) and m["protocol"].lower() != "file"


def normalize_root(root: str | os.PathLike[str]) -> Path | str:
    """A data root as merflow uses it: a resolved local Path, or a normalised URL string.

    `file://` URLs become local paths. A URL is refused (DataRootError) when it could name
    another place than it seems to, or when a path conversion mangled it (`s3:/bucket`).
    """
    if not isinstance(root, str):
        text = os.fspath(root)
        if _MANGLED.match(text) and not Path(text).exists():
            raise DataRootError(
                f"data root {text!r} looks like a URL whose '//' a path conversion collapsed; "
                f"pass it as a string such as 's3://bucket/prefix'"
            )
        return Path(text).expanduser().resolve()
    m = _URL.match(root)
    if not m:
        if "::" in root and "://" in root:  # an fsspec chain such as simplecache::s3://b/p
            raise DataRootError(
                f"data root URL {root!r} is refused: it chains filesystems ('::'); give a plain "
                f"URL such as 's3://bucket/prefix'"
            )
        return Path(root).expanduser().resolve()
    protocol, rest = m["protocol"].lower(), m["rest"]
    if protocol == "file":
        return Path(rest or "/").expanduser().resolve()
    problems = []
    if "::" in root:
        problems.append("it chains filesystems ('::')")
    if "?" in rest or "#" in rest:
        problems.append("it has a query or fragment ('?', '#')")
    segments = rest.rstrip("/").split("/")
    if not segments or not segments[0]:
        problems.append("it names no bucket or host")
    elif any(s in ("", ".", "..") for s in segments):
        problems.append("it has empty, '.' or '..' path segments")
    if problems:
        raise DataRootError(
            f"data root URL {root!r} is refused: {'; '.join(problems)}; give a plain URL such as "
            f"'s3://bucket/prefix'"
        )
    return f"{protocol}://{'/'.join(segments)}"


def split_root_list(value: str) -> list[str]:
    """Split an os.pathsep-separated list of folders and URLs (MERFLOW_ALLOWED_ROOTS): on
    POSIX the separator is ':', which also follows a URL's protocol, so `s3` + `//bucket/p`
    pieces are joined back into `s3://bucket/p`."""
    pieces = value.split(os.pathsep)
    out: list[str] = []
    for piece in pieces:
        if out and piece.startswith("//") and re.fullmatch(r"[A-Za-z][A-Za-z0-9+.\-]+", out[-1]):
            out[-1] = f"{out[-1]}:{piece}"
        else:
            out.append(piece)
    return [p for p in out if p]


def cache_base() -> Path:
    """The folder that holds the local work folders of URL data roots."""
    base = os.environ.get(CACHE_ENV) or Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / (
        "merflow"
    )
    return Path(base).expanduser().resolve()


def default_local_dir(url: str) -> Path:
    """The default local work folder of a URL data root: `<cache base>/<slug>-<hash12>`.

    The same URL always maps to the same folder (for every process of this user on this
    machine), so writers on one machine serialise on the same lock files there.
    """
    url = str(normalize_root(url))
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", url.replace("://", "_"))[:48].strip("_.")
    return cache_base() / f"{slug}-{hashlib.sha256(url.encode()).hexdigest()[:12]}"
