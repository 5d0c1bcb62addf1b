"""`merflow predict latest`: the newest finished run of the method the current settings describe
(the full method by default). Runs with another part of the method switched off (the ablations
`merflow ablate` trains beside the full method) and unfinished runs are passed over; the ablate
flow's full-method runs count; settings with a switch off pick runs trained that way."""

from __future__ import annotations

import json
import os

import pytest
from typer.testing import CliRunner

from flows.cli import app
from models.settings import TrainSettings
from tasks.predict import REPORT_JSON, RunFolderError, find_run, method_switches
from tasks.training.ablate_report import SYSTEMS


def _finished(runs, key: str, overrides: tuple[str, ...] = (), age: int = 0, seed: int = 0):
    """A run folder as the train flow leaves its report: the train settings it ran with
    (a system's overrides applied); `age` seconds old."""
    settings = TrainSettings().model_dump(mode="json") | {"seed": seed}
    for override in overrides:
        name, value = override.removeprefix("train.").split("=")
        settings[name] = value == "true"
    report = runs / f"train-{key}" / REPORT_JSON
    report.parent.mkdir(parents=True)
    report.write_text(json.dumps({"run_id": key, "settings": settings}))
    os.utime(report, ns=(10**18 - age * 10**9,) * 2)
    return runs / f"train-{key}"


def test_latest_passes_over_ablations_and_unfinished_runs(tmp_path):
    runs = tmp_path / "runs"
    full = _finished(runs, "full0", age=100)
    # merflow ablate afterwards: every system at seed 1, the ablations newest.
    for age, system in enumerate(reversed(SYSTEMS)):
        _finished(runs, f"{system.name}1", system.overrides, age=50 - age, seed=1)
    (runs / "train-killed" / "fold-0").mkdir(parents=True)  # newest, no report
    assert find_run(runs, "latest") == runs / "train-full1"  # the ablate flow's full run
    # A plain run finished later is newer still; an ablation is named by its key.
    os.utime(full / REPORT_JSON, ns=(10**18,) * 2)
    assert find_run(runs, "latest") == full
    assert find_run(runs, "no_nee1") == runs / "train-no_nee1"
    # Settings with NEE off (a served deployment's overrides, say) mean the run trained so.
    no_nee = method_switches(TrainSettings(use_nee=False))
    assert find_run(runs, "latest", no_nee) == runs / "train-no_nee1"


def test_only_ablations_say_what_latest_means_and_name_them(tmp_path):
    runs = tmp_path / "runs"
    with pytest.raises(RunFolderError, match=r"no finished training run under .*newest"):
        find_run(runs, "latest")
    _finished(runs, "nonee", ("train.use_nee=false",))
    _finished(runs, "two", ("train.use_pretraining=false", "train.use_oversampling=false"))
    with pytest.raises(RunFolderError) as err:
        find_run(runs, "latest")
    message = str(err.value)
    assert "newest finished run of the full method" in message
    assert "as the current settings say" in message
    assert "nonee (train.use_nee=false)" in message
    assert "two (train.use_pretraining=false, train.use_oversampling=false)" in message
    # The command says it too, as a usage problem (exit 2), before touching the video.
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"not read")
    said = CliRunner().invoke(app, ["predict", "latest", str(clip), "--data-root", str(tmp_path)])
    assert said.exit_code == 2 and "full method" in said.output, said.output
