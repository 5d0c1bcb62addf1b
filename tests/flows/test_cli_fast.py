"""The command line starts without torch, open_clip, transformers, Prefect or pandas: help,
settings, the server list and argument errors load none of them; the commands that need them
import them when they run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

HEAVY = ("torch", "open_clip", "transformers", "prefect", "pandas", "pyarrow")
MERFLOW = str(Path(sys.executable).with_name("merflow"))

# Run the CLI in a fresh interpreter on ARGV, then report which heavy modules it had loaded.
_PROBE = """
import json, sys
from flows.cli import app
try:
    app(sys.argv[1:], prog_name="merflow")
except SystemExit:
    pass
heavy = sorted(m for m in {heavy!r} if m in sys.modules)
print("HEAVY=" + json.dumps(heavy), file=sys.stderr)
"""


def _env(tmp_path: Path) -> dict[str, str]:
    # The server list of this test only; no settings of the developer's.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MERFLOW_")}
    return {**env, "MERFLOW_STATE_DIR": str(tmp_path / "state")}


def _loaded(args: list[str], tmp_path: Path) -> list[str]:
    code = _PROBE.format(heavy=HEAVY)
    proc = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        env=_env(tmp_path),
        cwd=Path(__file__).resolve().parents[2],
        timeout=120,
    )
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("HEAVY=")]
    return json.loads(line.removeprefix("HEAVY="))


def test_importing_the_command_line_loads_no_heavy_module(tmp_path):
    code = f"import sys, flows.cli; print([m for m in {HEAVY!r} if m in sys.modules])"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=_env(tmp_path),
        check=True,
        timeout=120,
    ).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["config"],
        ["server", "list"],
        ["server", "status", "--data-root", "NOWHERE"],
        ["task", "--help"],
        ["check", "--help"],
        ["config", "--no-such-option"],
        ["robustness", "latest", "--levels", "hiss:3", "--data-root", "NOWHERE"],
    ],
    ids=" ".join,
)
def test_light_commands_load_no_heavy_module(args, tmp_path):
    args = [str(tmp_path / "nowhere") if a == "NOWHERE" else a for a in args]
    assert _loaded(args, tmp_path) == []


def _merflow(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [MERFLOW, *args], capture_output=True, text=True, env=_env(tmp_path), timeout=120
    )


def test_the_entry_point_answers_help_config_and_bad_arguments(tmp_path):
    helped = _merflow("--help", tmp_path=tmp_path)
    assert helped.returncode == 0, helped.stderr
    for command in ("demo", "extract", "train", "serve", "server", "task", "check", "inspect"):
        assert command in helped.stdout

    config = _merflow("config", "faces.fps=5", tmp_path=tmp_path)
    assert config.returncode == 0, config.stderr
    settings = yaml.safe_load(config.stdout)
    assert settings["profile"] == "demo" and settings["faces"]["fps"] == 5

    # Usage errors keep click's usage line and exit 2, not merflow's "failed" 1.
    bad_option = _merflow("config", "--no-such-option", tmp_path=tmp_path)
    assert bad_option.returncode == 2
    assert "No such option" in bad_option.stderr and "Usage: merflow config" in bad_option.stderr
    bad_command = _merflow("no-such-command", tmp_path=tmp_path)
    assert bad_command.returncode == 2 and "No such command" in bad_command.stderr
    bad_setting = _merflow("config", "faces.backend=mtcnn", tmp_path=tmp_path)
    assert bad_setting.returncode == 2
    assert bad_setting.stderr.startswith("error: settings refused: ")


def test_a_bad_robustness_level_is_refused_before_any_server_starts(tmp_path):
    bad = _merflow(
        "robustness", "latest", "--levels", "blur:0", "--data-root", str(tmp_path / "root"),
        tmp_path=tmp_path,
    )  # fmt: skip
    assert bad.returncode == 2, bad.stderr
    assert "blur:0 is out of range; blur takes 0.1..50 (px sigma)" in bad.stderr
    assert not (tmp_path / "root").exists()  # no server, no data root made


def _no_server_started(tmp_path: Path) -> bool:
    """No entry in this test's server list (MERFLOW_STATE_DIR): no server was started."""
    state = tmp_path / "state"
    return not state.exists() or not any(state.rglob("*.json"))


@pytest.mark.parametrize("command", ["extract", "train"])
@pytest.mark.parametrize("folder", ["missing", "empty"])
def test_a_missing_or_empty_corpus_folder_is_refused_before_any_server_starts(
    command, folder, tmp_path
):
    corpus = tmp_path / "corpus"
    if folder == "empty":
        corpus.mkdir()
        (corpus / "notes.txt").write_text("not a video")
    bad = _merflow(command, str(corpus), tmp_path=tmp_path)
    assert bad.returncode == 2, bad.stderr
    (line,) = bad.stderr.splitlines()
    why = "does not exist" if folder == "missing" else "holds no videos"
    assert line.startswith(f"error: corpus folder {corpus} {why}"), line
    assert "give a folder of videos" in line and f"(see `merflow {command} --help`)" in line
    assert bad.stdout == ""
    assert not (corpus / "merflow").exists() and _no_server_started(tmp_path)


def test_a_bad_extract_folder_loads_no_heavy_module(tmp_path):
    assert _loaded(["extract", str(tmp_path / "nowhere")], tmp_path) == []


def test_predict_refuses_an_empty_folder_and_a_missing_run_before_any_server_starts(tmp_path):
    root = tmp_path / "root"
    empty = tmp_path / "empty"
    empty.mkdir()
    clips = tmp_path / "clips"
    clips.mkdir()
    (clips / "a.mp4").write_bytes(b"")  # listed as a video; never opened
    no_videos = _merflow(
        "predict", "latest", str(empty), "--data-root", str(root), tmp_path=tmp_path
    )
    assert no_videos.returncode == 2, no_videos.stderr
    assert f"error: folder {empty.resolve()} holds no videos" in no_videos.stderr
    no_run = _merflow("predict", "nokey", str(clips), "--data-root", str(root), tmp_path=tmp_path)
    assert no_run.returncode == 2, no_run.stderr
    (line,) = no_run.stderr.splitlines()
    assert "no training run 'nokey'" in line and "give `latest`" in line, line
    assert not root.exists() and _no_server_started(tmp_path)


def test_robustness_refuses_a_missing_run_before_any_server_starts(tmp_path):
    root = tmp_path / "root"
    bad = _merflow("robustness", "nokey", "--data-root", str(root), tmp_path=tmp_path)
    assert bad.returncode == 2, bad.stderr
    assert "no training run 'nokey'" in bad.stderr
    assert not root.exists() and _no_server_started(tmp_path)


def test_server_start_port_defaults_to_the_setting(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from flows import server
    from flows.cli import app

    ports = []

    def start(home, host="127.0.0.1", port=None, database_url=None):
        ports.append(port)
        return server.ServerInfo(1, host, port, f"http://{host}:{port}/api", "", "", "")

    monkeypatch.setattr(server, "start", start)
    monkeypatch.delenv("MERFLOW_PREFECT__PORT", raising=False)
    root = str(tmp_path / "root")
    assert CliRunner().invoke(app, ["server", "start", "--data-root", root]).exit_code == 0
    monkeypatch.setenv("MERFLOW_PREFECT__PORT", "4321")
    assert CliRunner().invoke(app, ["server", "start", "--data-root", root]).exit_code == 0
    given = ["server", "start", "--data-root", root, "--port", "4333"]
    assert CliRunner().invoke(app, given).exit_code == 0  # the option still wins
    assert ports == [4200, 4321, 4333]
    assert server.setting_port() == 4321  # what server.start/connect use when given no port


@pytest.mark.parametrize("command", ["serve", "deploy", "ablate"])
def test_serve_deploy_and_ablate_refuse_a_missing_corpus_before_any_server_starts(
    command, tmp_path
):
    corpus = tmp_path / "corpus"
    bad = _merflow(command, str(corpus), tmp_path=tmp_path)
    assert bad.returncode == 2, bad.stderr
    (line,) = bad.stderr.splitlines()
    assert line.startswith(f"error: corpus folder {corpus} does not exist"), line
    assert not corpus.exists() and _no_server_started(tmp_path)
