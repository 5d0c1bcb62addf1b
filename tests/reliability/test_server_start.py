"""A server start that cannot be fooled: commands started at the same moment on two data roots
each get their own live server (its process listens on its port, its API answers as its data
root's), commands on one data root share one, and `server stop` returns with the port free."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from flows import server
from tests.reliability.helpers import REPO

ROUNDS = 3


def _start_command(root, port: int, env: dict) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "flows.cli", "server", "start", "--data-root", str(root)]
    return subprocess.Popen(
        [*cmd, "--port", str(port)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.mark.server
def test_starts_at_the_same_moment_get_their_own_server_or_share_their_data_roots(
    tmp_path, monkeypatch
):
    monkeypatch.setenv(server.STATE_ENV, str(tmp_path / "state"))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("PREFECT_API_URL", None)
    for n in range(ROUNDS):
        a, b = tmp_path / f"a{n}", tmp_path / f"b{n}"
        port = server.free_port()  # all three ask for the same port
        procs = [_start_command(root, port, env) for root in (a, b, a)]
        outs = [p.communicate(timeout=240)[0] for p in procs]
        try:
            for p, out in zip(procs, outs, strict=True):
                assert p.returncode == 0, out  # no one refused here: each got a server
            pids = [int(re.search(r"Prefect server pid (\d+)", out).group(1)) for out in outs]
            infos = {root: server.status(root) for root in (a, b)}
            # One data root, two commands: one server, both told about it.
            assert pids[0] == pids[2] == infos[a].pid and pids[1] == infos[b].pid != pids[0]
            for root, info in infos.items():
                # Its own process listens on its port, and the API there is its data root's.
                assert server._listening(info.pid, info.port), (root, info)
                assert server.identity(info.api_url) == str(server.prefect_home(root))
            ports = {info.port for info in infos.values()}
            assert len(ports) == 2 and port in ports  # one got the port, the other a free one
            # The command that started the server on another port says so (for a data root's
            # second command, the server it shares was started by the first).
            port_of = {info.pid: info.port for info in infos.values()}
            said = [f"port {port} was busy" in out for out in outs]
            assert any(said)
            assert all(port_of[pid] != port for pid, s in zip(pids, said, strict=True) if s)
        finally:
            for root in (a, b):
                info = server.status(root)
                assert server.stop(root) or info is None
                # `stop` returns once the port is free again.
                assert info is None or not server.port_busy(info.host, info.port)
