"""The watchdog of a command's server (flows/server_watch.py): a local server merflow started
that dies comes back on the same address and database; one stopped on purpose does not, and
the command's last line names it and the command that resumes."""

from __future__ import annotations

import os
import signal
import time

import pytest

from flows import server
from flows.server_watch import ServerWatch, resume_command


def _wait(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.1)


@pytest.mark.server
def test_a_killed_server_comes_back_and_a_stopped_one_ends_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv(server.STATE_ENV, str(tmp_path / "state"))
    monkeypatch.setattr("sys.argv", ["/venv/bin/merflow", "train", "--data-root", "/d r"])
    root = tmp_path / "root"
    old = server.start(root, port=server.free_port())
    said, fatal = [], []
    watch = ServerWatch(
        server.client_env(root, old.api_url), check_s=0.2, give_up_s=1.0, on_fatal=fatal.append
    )
    watch.say = said.append
    watch.start()
    try:
        os.kill(old.pid, signal.SIGKILL)
        _wait(lambda: watch.restarts)
        new = server.status(root)
        assert (new.api_url, new.database) == (old.api_url, old.database) and new.pid != old.pid
        assert server.identity(new.api_url) == str(server.prefect_home(root))
        assert said == [
            f"The Prefect server of {root} (pid {old.pid}) died; started it again on the same "
            f"database and port in {watch.restarts[0]['start_s']:.1f} s (pid {new.pid}); the "
            "run goes on."
        ]
        server.stop(root)  # on purpose: not started again
        _wait(lambda: fatal)
    finally:
        watch._done.set()
        server.stop(root)
    assert len(watch.restarts) == 1 and server.status(root) is None
    (line,) = fatal
    who = f"the server of {root}, pid {new.pid}"
    assert line.startswith(f"error: the Prefect server at {old.api_url} ({who}) has not answered")
    assert "it was stopped (`merflow server stop`)" in line
    assert line.endswith("merflow train --data-root '/d r'")


def test_the_resume_command_is_the_command_line():
    assert resume_command(["/x/bin/merflow", "extract", "c d"]) == "merflow extract 'c d'"
    assert resume_command(["/repo/flows/cli.py", "train"]) == "merflow train"


def test_a_watch_closed_while_its_server_is_down_ends_once_the_server_answers(
    monkeypatch, tmp_path
):
    answers = iter([False, False])  # down when the command's flows end, then back
    monkeypatch.setattr(server, "healthy", lambda *a, **k: next(answers, True))
    fatal: list[str] = []
    env = {"PREFECT_API_URL": "http://127.0.0.1:9/api", "PREFECT_HOME": str(tmp_path / "p")}
    watch = ServerWatch(env, check_s=0.05, on_fatal=fatal.append)
    watch.close()
    watch.start()
    watch.join(timeout=10)
    assert not watch.is_alive() and not fatal
