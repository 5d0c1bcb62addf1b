"""The Prefect server of a running `merflow extract` is killed (SIGKILL) after its first shard:
a local server merflow started comes back on the same database and port within seconds and the
run completes; a server merflow did not start ends the command within 30 s with one line, and
every row stored before stays."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_contracts import tables
from data_contracts.store import Store
from flows import server
from tests.reliability.helpers import REPO, raw_rows, table_folders, table_key


def _extract(corpus: Path, root: Path, overrides: list[str], env: dict) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "flows.cli", "extract", str(corpus), "--data-root", str(root)]
    cmd += [f"prefect.port={server.free_port()}", "extract.shard_size=4", *overrides]
    return subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _env(tmp_path: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.pop("PREFECT_HOME", None)
    return {**env, "PYTHONPATH": str(REPO), server.STATE_ENV: str(tmp_path / "state"), **extra}


def _stored(root: Path) -> dict[str, set[str]]:
    """The video ids every table folder holds now."""
    return {f.name: set(raw_rows(f).video_id) for f in table_folders(root) if table_key(f)}


def _kill_after_first_shard(proc: subprocess.Popen, root: Path, pid_of) -> float:
    while not any((root / "stores").rglob("part-*.parquet")):
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.2)
    os.kill(pid_of(), signal.SIGKILL)
    return time.monotonic()


@pytest.mark.server
def test_a_killed_local_server_comes_back_and_the_run_goes_on(corpus, tmp_path, model_overrides):
    root = tmp_path / "root"
    proc = _extract(corpus, root, model_overrides, _env(tmp_path))
    try:
        old = None

        def pid_of() -> int:
            nonlocal old
            old = server._read(server._state_file(root))
            return old.pid

        killed = _kill_after_first_shard(proc, root, pid_of)
        while (info := server.status(root)) is None or not server.healthy(info.api_url):
            assert time.monotonic() - killed < 60 and proc.poll() is None
            time.sleep(0.2)
        back = time.monotonic() - killed
        out, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
        server.stop(root)
    assert proc.returncode == 0, out[-4000:]
    print(f"server back {back:.1f} s after the kill")
    # Same database and port: the same address, its runs in the same SQLite file.
    assert (info.api_url, info.database) == (old.api_url, old.database) and info.pid != old.pid
    assert f"(pid {old.pid}) died; started it again on the same database and port" in out
    assert back < 30
    # Every video once in every table, as without the kill.
    for folder in table_folders(root):
        key = table_key(folder)
        assert not key or not raw_rows(folder).duplicated(subset=key).any(), folder
    assert len(Store(root).read(tables.MANIFEST)) == 18


@pytest.mark.server
def test_a_dead_server_merflow_did_not_start_ends_the_command_within_30_s(
    corpus, tmp_path, model_overrides, monkeypatch
):
    monkeypatch.setenv(server.STATE_ENV, str(tmp_path / "state"))
    other = server.start(tmp_path / "elsewhere", port=server.free_port())
    root = tmp_path / "root"
    proc = _extract(corpus, root, model_overrides, _env(tmp_path, PREFECT_API_URL=other.api_url))
    try:
        before: dict = {}

        def pid_of() -> int:
            before.update(_stored(root))
            return other.pid

        killed = _kill_after_first_shard(proc, root, pid_of)
        out, _ = proc.communicate(timeout=120)
        ended = time.monotonic() - killed
    finally:
        proc.kill()
        server.stop(other.data_root)
    print(f"command ended {ended:.1f} s after the kill")
    assert proc.returncode == 1 and ended < 30, (ended, out[-3000:])
    (line,) = [ln for ln in out.splitlines() if "has not answered" in ln]
    assert line.startswith(f"error: the Prefect server at {other.api_url} (PREFECT_API_URL)")
    assert "kept: everything this command stored so far" in line
    assert f"resume, once a server answers there: merflow extract {corpus}" in line
    after = _stored(root)  # nothing lost: what was stored before the kill is still there
    assert before and all(ids <= after[name] for name, ids in before.items())


@pytest.mark.server
def test_a_local_server_whose_postgresql_is_down_ends_the_command_within_30_s(
    tmp_path, monkeypatch
):
    from flows.server_watch import ServerWatch
    from tests.reliability.postgres import cluster

    monkeypatch.setenv(server.STATE_ENV, str(tmp_path / "state"))
    root = tmp_path / "root"
    with cluster(server.free_port()) as url:
        info = server.start(root, port=server.free_port(), database_url=url)
        fatal: list[str] = []
        watch = ServerWatch(server.client_env(root, info.api_url), on_fatal=fatal.append)
        watch.start()
    # PostgreSQL is gone; now the server dies too, and cannot start again.
    os.kill(info.pid, signal.SIGKILL)
    killed = time.monotonic()
    watch.join(timeout=60)
    ended = time.monotonic() - killed
    server.stop(root)
    print(f"the command would end {ended:.1f} s after the kill")
    assert ended < 30 and not watch.restarts
    (line,) = fatal
    assert line.startswith(f"error: the Prefect server at {info.api_url} (the server of {root}")
    assert "it could not be started again: the Prefect server exited with code" in line
