"""Servers do not pile up silently: a command that starts one says so and how to stop it,
`merflow server list` shows every one merflow started, `merflow server stop --all` stops them,
PREFECT_API_URL or prefect.api_url reuse a server the user has; the demo ends with the way to
the UI."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import time

import psutil
import pytest
import typer
from typer.testing import CliRunner

from flows import cli, server
from flows.cli import app
from flows.config import load_settings


@pytest.fixture
def state(monkeypatch, tmp_path):
    """This test's own server list (never the developer's), and no server named by the
    environment."""
    monkeypatch.setenv(server.STATE_ENV, str(tmp_path / "state"))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    return server.registry_dir()


def _merflow(*args: str):
    return CliRunner().invoke(app, list(args))


def _gone(pid: int, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.2)
    return False


@pytest.mark.server
def test_a_started_server_is_announced_listed_and_stopped_by_stop_all(state, tmp_path, capsys):
    root = tmp_path / "root"
    settings = load_settings("demo", [f"prefect.port={server.free_port()}"])
    cli._connect(settings, root)
    info = server.status(root)
    try:
        said = capsys.readouterr().out
        assert f"Started a Prefect server for {root} (pid {info.pid})" in said
        assert f"UI:   {info.ui_url}" in said and server.healthy(info.api_url)
        (stop_line,) = [ln for ln in said.splitlines() if ln.strip().startswith("stop:")]
        stop_argv = shlex.split(stop_line.split(":", 1)[1])
        assert stop_argv == ["merflow", "server", "stop", "--data-root", str(root)]

        # The next command on this data root reuses the server and says whose it is.
        cli._connect(settings, root)
        again = capsys.readouterr().out
        assert "Started" not in again and f"Prefect server of {root} (pid {info.pid}" in again
        # The printed stop command names this server.
        status = _merflow("server", "status", *stop_argv[3:])
        assert (
            status.exit_code == 0 and f"pid {info.pid} at {info.ui_url}: healthy" in status.stdout
        )

        listed = _merflow("server", "list")
        assert listed.exit_code == 0, listed.output
        (row,) = [ln for ln in listed.stdout.splitlines() if str(root) in ln]
        assert row.split()[1:3] == [str(info.pid), info.ui_url] and row.endswith("healthy")

        # A server an older merflow started without listing it joins the list.
        for entry in state.glob("*.json"):
            entry.unlink()
        assert str(root) in _merflow("server", "list").stdout

        # The data root deleted while its server runs: the list still finds and stops it.
        shutil.rmtree(root)
        stopped = _merflow("server", "stop", "--all")
        assert stopped.exit_code == 0, stopped.output
        assert f"stopped pid {info.pid}" in stopped.stdout
        assert _gone(info.pid)
        assert "no server that merflow started is running" in _merflow("server", "list").stdout
        assert _merflow(*stop_argv[1:]).stdout.strip() == "no server was running"
    finally:
        server._terminate(info.pid)


def test_dead_entries_are_pruned_and_a_reused_pid_is_never_stopped(state, tmp_path):
    # A process that got a listed server's pid after that server exited: it started later.
    other = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        started = psutil.Process(other.pid).create_time()
        home = server.prefect_home(tmp_path / "root")
        info = server.ServerInfo(
            other.pid, "127.0.0.1", 1, "http://127.0.0.1:1/api", str(home), "", "", started - 60
        )
        server._write(server._entry(home), info)
        assert len(list(state.glob("*.json"))) == 1
        result = _merflow("server", "stop", "--all")
        assert result.exit_code == 0
        assert result.stdout.strip() == "no server that merflow started is running"
        assert other.poll() is None  # still running
        assert list(state.glob("*.json")) == []  # the stale entry is gone
    finally:
        other.kill()
        other.wait()


def test_stop_needs_a_data_root_or_all(state):
    for args in ([], ["--all", "--data-root", "x"]):
        result = _merflow("server", "stop", *args)
        assert result.exit_code == 2
        assert "give --data-root ROOT" in result.stderr and "--all" in result.stderr


@pytest.mark.server
def test_a_server_the_user_has_is_used_and_named(state, prefect_server, monkeypatch, tmp_path):
    root = tmp_path / "root"
    monkeypatch.setenv("PREFECT_API_URL", prefect_server.api_url)
    conn = server.connect(root)
    assert (conn.source, conn.api_url, conn.server) == ("environment", prefect_server.api_url, None)
    assert conn.describe() == [
        f"Prefect API {prefect_server.api_url} (from PREFECT_API_URL; UI {prefect_server.ui_url})"
    ]
    monkeypatch.delenv("PREFECT_API_URL")
    conn = server.connect(root, api_url=prefect_server.api_url)
    assert conn.source == "setting" and "the prefect.api_url setting" in conn.describe()[0]
    # Neither started a server for the data root.
    assert server.status(root) is None and not (root / "prefect" / "server.json").exists()
    assert not list(state.glob("*.json"))


@pytest.mark.server
def test_the_demo_ends_with_the_ui_and_a_serve_command_that_is_the_one_serve_runs(
    prefect_server, tmp_path
):
    corpus = tmp_path / "demo run" / "corpus"  # a space: the command must quote it
    overrides = ["faces.fps=5"]
    args = cli._demo_serve_args(corpus, overrides)
    lines = cli._demo_next_steps(tmp_path / "root", prefect_server.api_url, args, serving=False)
    ui_line = next(ln for ln in lines if ln.startswith("Prefect UI: "))
    ui = ui_line.removeprefix("Prefect UI: ").split()[0]
    assert server.healthy(f"{ui}/api")
    (command,) = [ln.strip() for ln in lines if ln.strip().startswith("merflow serve ")]
    argv = shlex.split(command)
    # The printed command parses, as the real command line would, into the very arguments
    # that `merflow demo --serve` passes to the serve command.
    group = typer.main.get_command(app)
    serve = group.get_command(group.make_context("merflow", argv[1:]), argv[1])
    params = serve.make_context(argv[1], argv[2:]).params
    assert {k: params[k] for k in args} == args
    assert params["corpus_dir"] == corpus and params["overrides"] == overrides
    serving = cli._demo_next_steps(tmp_path / "root", prefect_server.api_url, args, serving=True)
    assert any("Ctrl-C" in ln and f"{ui}/deployments" in ln for ln in serving)
