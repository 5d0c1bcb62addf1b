"""One CLI convention: every command turns an error into one line on stderr and the exit code of
one rule (flows/cli_common.py), never a traceback; `-v` shows the traceback."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from flows import cli
from flows.cli import app
from flows.cli_common import exit_code, one_line

BAD = ["faces.backend=mtcnn", "train.no_such_knob=1"]


def _run(*args: str):
    return CliRunner().invoke(app, list(args))


def _error_lines(result) -> list[str]:
    return [ln for ln in result.stderr.splitlines() if ln.strip()]


@pytest.mark.parametrize(
    "command",
    [
        ["config", "--profile", "demo"],
        ["train", "CORPUS", "--profile", "demo"],
        ["extract", "CORPUS", "--profile", "demo"],
        ["serve", "CORPUS", "--interval", "0"],
    ],
    ids=lambda c: c[0],
)
def test_a_bad_setting_is_exit_2_and_one_clean_line_for_every_command(command, tmp_path):
    args = [str(tmp_path) if a == "CORPUS" else a for a in command]
    result = _run(*args, *BAD)
    assert result.exit_code == 2, result.output
    lines = _error_lines(result)
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("error: settings refused: "), line
    assert "faces.backend" in line and "no_such_knob" in line  # every problem, on one line
    assert f"(see `merflow {command[0]} --help`)" in line  # the way out
    assert "Traceback" not in result.output and result.stdout == ""
    assert not (tmp_path / "merflow").exists()  # refused before any work


def test_same_kind_of_error_same_code_across_commands(tmp_path):
    missing = tmp_path / "nowhere"
    # A folder that does not exist, given to two different commands: exit 2 both times.
    train = _run("train", str(missing))
    inspect = _run("inspect", "sample_1", "--data-root", str(missing))
    assert (train.exit_code, inspect.exit_code) == (2, 2), (train.output, inspect.output)
    for result in (train, inspect):
        (line,) = _error_lines(result)
        assert line.startswith("error: ") and str(missing) in line and "Traceback" not in line


def test_a_failed_operation_is_exit_1(monkeypatch, tmp_path):
    monkeypatch.delenv("PREFECT_SERVER_API_AUTH_STRING", raising=False)
    result = _run("server", "start", "--data-root", str(tmp_path), "--host", "0.0.0.0")
    assert result.exit_code == 1, result.output
    (line,) = _error_lines(result)
    assert "not a loopback address" in line and "PREFECT_SERVER_API_AUTH_STRING" in line


def test_verbose_shows_the_traceback(monkeypatch, tmp_path):
    def broken(*args, **kwargs):
        raise RuntimeError("a bug\nwith two lines")

    monkeypatch.setattr(cli, "_settings", broken)
    plain = _run("config")
    assert plain.exit_code == 1
    (line,) = _error_lines(plain)
    assert line == "error: RuntimeError: a bug; with two lines (`merflow -v ...` shows where)"
    verbose = _run("-v", "config")
    assert isinstance(verbose.exception, RuntimeError)


def test_the_rule():
    from data_contracts.errors import BadInputError, MerflowError
    from data_contracts.location import DataRootError
    from flows.config import SettingsError
    from flows.safety import UnsafeParameterError
    from flows.server import ServerError
    from models.registry import ModelNotFoundError

    twos = [
        SettingsError("x"),
        ValueError("x"),
        DataRootError("x"),
        UnsafeParameterError(["x"]),
        FileNotFoundError("x"),
        ModelNotFoundError("x"),
        LookupError("x"),
    ]
    ones = [BadInputError("x"), MerflowError("x"), ServerError("x"), OSError(28, "disk full")]
    assert [exit_code(e) for e in twos] == [2] * len(twos)
    assert [exit_code(e) for e in ones] == [1] * len(ones)
    assert (
        one_line(ValueError("settings refused:\n  - a: b\n  - c: d"))
        == "settings refused: a: b; c: d"
    )


def test_help_still_works_and_states_the_codes():
    result = _run("--help")
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "2 a setting or argument is wrong" in text
