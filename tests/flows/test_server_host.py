"""`prefect.host` is where the local Prefect server merflow starts listens: loopback by default,
another address only with an auth string."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from flows import cli, server
from flows.cli import app
from flows.config import load_settings


def test_the_setting_reaches_the_server_merflow_starts_for_a_flow(monkeypatch, tmp_path):
    seen = {}

    def connect(root, api_url=None, port=4200, host="127.0.0.1"):
        seen.update(root=root, host=host, port=port)
        return server.Connection("http://x/api", {}, "environment")

    monkeypatch.setattr(server, "connect", connect)
    cli._connect(load_settings("demo", ["prefect.host=127.0.0.2", "prefect.port=4321"]), tmp_path)
    assert seen == {"root": tmp_path, "host": "127.0.0.2", "port": 4321}
    cli._connect(load_settings("demo"), tmp_path)
    assert seen["host"] == "127.0.0.1"  # loopback by default


def test_server_start_binds_to_the_setting(monkeypatch, tmp_path):
    calls = []

    def start(home: Path, host="127.0.0.1", port=4200, database_url=None):
        calls.append(host)
        return server.ServerInfo(1, host, port, f"http://{host}:{port}/api", "", "", "")

    monkeypatch.setattr(server, "start", start)
    root = str(tmp_path / "root")
    assert CliRunner().invoke(app, ["server", "start", "--data-root", root]).exit_code == 0
    monkeypatch.setenv("MERFLOW_PREFECT__HOST", "127.0.0.3")
    assert CliRunner().invoke(app, ["server", "start", "--data-root", root]).exit_code == 0
    given = ["server", "start", "--data-root", root, "--host", "::1"]
    assert CliRunner().invoke(app, given).exit_code == 0  # the option still wins
    assert calls == ["127.0.0.1", "127.0.0.3", "::1"]


def test_a_non_loopback_setting_needs_an_auth_string(monkeypatch, tmp_path):
    monkeypatch.delenv("PREFECT_SERVER_API_AUTH_STRING", raising=False)
    monkeypatch.setenv("MERFLOW_PREFECT__HOST", "0.0.0.0")
    result = CliRunner().invoke(app, ["server", "start", "--data-root", str(tmp_path)])
    assert result.exit_code == 1
    assert "refusing to bind the Prefect server to 0.0.0.0" in result.stderr
    assert not (tmp_path / "prefect" / "server.json").exists()
