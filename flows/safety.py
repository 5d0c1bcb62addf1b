"""Run parameters are untrusted input: paths must lie under the allowed roots, and the settings
that decide what code runs belong to whoever serves merflow, not to whoever starts a run.

Flow parameters arrive from the Prefect UI's run form. When the `allowed_roots` setting is set
(`merflow serve` sets it, best through the MERFLOW_ALLOWED_ROOTS environment variable so that
no profile file can lift it), every path a run reads or writes is resolved (symlinks and `..`
included) and must lie under one of those roots, and no run override may change the roots,
the binaries merflow executes or whether model folders may run their own Python code. With
`allowed_roots` empty (local command-line use) nothing is restricted.

Data roots may be object-storage URLs (`s3://bucket/prefix`). A URL is allowed only under an
allowed URL root of the same protocol and bucket, on a `/` boundary (`s3://b/merflow` allows
`s3://b/merflow/x`, not `s3://b/merflow-other`); URLs with `.`/`..` segments, queries or fsspec
chains are refused outright (data_contracts.location). An allowed URL root also allows its own
default local work folder (where models, runs and caches of that root live on this machine),
never a `work_dir` a run chooses.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from data_contracts.location import DataRootError, default_local_dir, is_url, normalize_root
from flows.config import Settings, load_settings
from tasks.engine.errors import MerflowError

# Overrides that choose executed code or lift the restriction: only the server's own profile
# or environment may set these while a restriction is in force.
SERVER_ONLY_SETTINGS = (
    "allowed_roots",
    "audio.ffmpeg_bin",
    "faces.openface_bin",
    "models.trust_remote_code",
    "models.allow_download",
    "prefect.api_url",
)


class UnsafeParameterError(MerflowError):
    """A run parameter points outside the allowed roots or sets a server-only setting."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        listing = "\n".join(f"  - {p}" for p in problems)
        super().__init__(
            f"run refused before any work started, {len(problems)} problem(s):\n{listing}"
        )


def _resolve(path: str | os.PathLike[str]) -> Path | str:
    """A local path resolved (symlinks, `..`, `~`), or a URL normalised."""
    return normalize_root(path)


def _under(path: Path | str, root: Path | str) -> bool:
    if isinstance(path, str) or isinstance(root, str):
        return (
            isinstance(path, str)
            and isinstance(root, str)
            and (path == root or path.startswith(f"{root}/"))
        )
    return path == root or path.is_relative_to(root)


def _outside(
    path: str | os.PathLike[str], roots: list[str], what: str
) -> tuple[Path | str, str | None]:
    try:
        resolved = _resolve(path)
    except DataRootError as e:
        return str(path), f"{what}: {e}"
    if not roots:
        return resolved, None
    allowed = [_resolve(r) for r in roots]
    # A URL root's default local work folder is derived by merflow, not chosen by the run.
    allowed += [default_local_dir(r) for r in allowed if isinstance(r, str)]
    if any(_under(resolved, r) for r in allowed):
        return resolved, None
    shown = f"{path}" if str(path) == str(resolved) else f"{path} (resolves to {resolved})"
    return resolved, (
        f"{what} {shown} is outside the allowed roots {', '.join(map(str, allowed))}; give a "
        f"path under one of them, or ask whoever serves merflow to add its folder to "
        f"allowed_roots"
    )


def check_under_roots(path: str | os.PathLike[str], roots: list[str], what: str) -> Path | str:
    """`path` resolved (symlinks, `..`, `~`; a URL normalised); refused unless it lies under one
    of `roots`.

    Empty `roots` means no restriction. `what` names the parameter in the error message.
    """
    resolved, problem = _outside(path, roots, what)
    if problem:
        raise UnsafeParameterError([problem])
    return resolved


def check_all_under_roots(
    named_paths: Iterable[tuple[str, str | os.PathLike[str]]], roots: list[str]
) -> list[Path | str]:
    """Resolve every `(what, path)`; refuse with one error listing every path outside `roots`."""
    resolved, problems = [], []
    for what, path in named_paths:
        r, problem = _outside(path, roots, what)
        resolved.append(r)
        if problem:
            problems.append(problem)
    if problems:
        raise UnsafeParameterError(problems)
    return resolved


def trusted_roots(profile: str, overrides: list[str], settings: Settings) -> list[str]:
    """The allowed roots in force for a run; refuses overrides of server-only settings.

    The roots come from the profile and the MERFLOW_* environment, never from the run's own
    overrides; while they are set, an override of a SERVER_ONLY_SETTINGS key is refused.
    """
    roots = load_settings(profile, []).allowed_roots
    if not roots:
        return list(settings.allowed_roots)  # a local user may restrict their own run
    problems = []
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key in SERVER_ONLY_SETTINGS:
            problems.append(
                f"override {item!r} is refused: {key} can only be set by whoever serves "
                f"merflow (its profile or MERFLOW_* environment), not by a run"
            )
    profile_path = Path(profile)
    if profile_path.suffix in (".yaml", ".yml"):
        _, problem = _outside(profile_path, roots, "profile file")
        if problem:
            problems.append(problem)
    if problems:
        raise UnsafeParameterError(problems)
    return list(roots)


def data_root_paths(settings: Settings, root: Path | str) -> list[tuple[str, Path | str]]:
    """The paths a run writes under its data root, named for check_all_under_roots."""
    return [
        ("data_root", root),
        *([("work_dir", settings.local_root(root))] if is_url(root) else []),
        ("models_dir", settings.models_dir(root)),
    ]


def checked_corpus_root(
    settings: Settings, profile: str, overrides: list[str], corpus_dir: str, data_root: str | None
) -> tuple[Path, Path | str]:
    """A flow's corpus folder and data root, refused (before anything is read or written)
    when a path lies outside the allowed roots in force; the data root defaults to the
    corpus's."""
    roots = trusted_roots(profile, overrides, settings)
    given = [("corpus_dir", corpus_dir), *([("data_root", data_root)] if data_root else [])]
    check_all_under_roots(given, roots)
    corpus = Path(corpus_dir).expanduser().resolve()
    root = normalize_root(data_root) if data_root else settings.resolved_data_root(corpus)
    check_all_under_roots(data_root_paths(settings, root), roots)
    return corpus, root


def checked_data_root(
    settings: Settings, profile: str, overrides: list[str], corpus_dir, data_root
) -> tuple[Path | None, Path | str]:
    """The corpus folder (None when none is given) and the data root: the one given, else the
    corpus's, else the data_root setting; refused (before anything is read or written) when a
    path lies outside the allowed roots in force."""
    if corpus_dir:
        return checked_corpus_root(settings, profile, overrides, corpus_dir, data_root)
    roots = trusted_roots(profile, overrides, settings)
    check_all_under_roots([("data_root", data_root)] if data_root else [], roots)
    root = normalize_root(data_root) if data_root else settings.resolved_data_root(None)
    check_all_under_roots(data_root_paths(settings, root), roots)
    return None, root
