"""A throw-away PostgreSQL cluster on loopback for the tests: Debian's postgresql package
(initdb, pg_ctl), a data folder and a socket folder of its own, trust authentication for one
superuser, stopped and deleted at the end.

PostgreSQL refuses to run as root: as root (CI's containers), the cluster runs as the
`postgres` user the package creates (else `nobody`) through `runuser`.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

USER = "merflow"  # the cluster's superuser (trust authentication, loopback only)


def pg_bin() -> Path | None:
    """The folder of initdb and pg_ctl: Debian's newest /usr/lib/postgresql/N/bin, else PATH."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4])
    )
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).resolve().parent if initdb else None


def _runner() -> tuple[list[str], str | None]:
    """The command prefix that runs PostgreSQL's programs, and the user it runs them as."""
    if os.geteuid() != 0:
        return [], None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return ["runuser", "-u", name, "--"], name
    raise RuntimeError("running as root, and neither a postgres nor a nobody user exists")


@contextlib.contextmanager
def cluster(port: int) -> Iterator[str]:
    """Run a new cluster on 127.0.0.1:`port`; yield its postgresql+asyncpg URL."""
    bindir = pg_bin()
    if bindir is None:
        raise FileNotFoundError("PostgreSQL's initdb is not installed (apt-get install postgresql)")
    prefix, user = _runner()
    base = Path(tempfile.mkdtemp(prefix="merflow-pg-"))  # not under root's private tmp folders
    data, sockets = base / "data", base / "sockets"
    sockets.mkdir()
    if user is not None:
        for path in (base, sockets):
            shutil.chown(path, user)

    def run(*args: str) -> None:
        done = subprocess.run([*prefix, *args], capture_output=True, text=True, cwd=base)
        if done.returncode:
            raise RuntimeError(f"{args[0]} failed: {done.stdout[-2000:]}{done.stderr[-2000:]}")

    run(str(bindir / "initdb"), "-D", str(data), "-U", USER, "--auth=trust", "-E", "UTF8", "-N")
    options = f"-h 127.0.0.1 -p {port} -k {sockets} -c fsync=off -c max_connections=200"
    run(
        str(bindir / "pg_ctl"),
        "-D",
        str(data),
        "-o",
        options,
        "-l",
        str(base / "log"),
        "-w",
        "start",
    )
    try:
        yield f"postgresql+asyncpg://{USER}@127.0.0.1:{port}/postgres"
    finally:
        with contextlib.suppress(RuntimeError):
            run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(base, ignore_errors=True)
