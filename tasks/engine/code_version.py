"""Which merflow wrote a row: its version and git commit, recorded in provenance (light: no
torch, so commands that only write tables load fast)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any


@functools.cache
def code_version() -> dict[str, Any]:
    """merflow's version and git commit, once per process; None where unknown, never an error."""
    import importlib.metadata
    import subprocess

    try:
        version = importlib.metadata.version("merflow")
    except importlib.metadata.PackageNotFoundError:
        version = None
    root = Path(__file__).resolve().parents[1]
    commit, dirty = None, None

    def git(*args: str) -> str:
        out = subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() if out.returncode == 0 else ""

    try:
        # A copy installed inside some other checkout (a venv in a repo) is not that commit.
        top = git("rev-parse", "--show-toplevel")
        if top and Path(top).resolve() == root:
            commit = git("rev-parse", "HEAD") or None
            dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        pass
    return {"merflow_version": version, "git_commit": commit, "git_dirty": dirty}
