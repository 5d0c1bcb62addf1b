"""Every way the extract flow is started runs it on the task runner `extract.task_runner` names:
the served `extract` deployment, `pipeline` and the scheduled `reextract-new` (no server: the
extract flow is replaced by a recorder of the runner it was started on)."""

from __future__ import annotations

import logging

import pytest
from prefect.task_runners import ThreadPoolTaskRunner
from prefect_dask import DaskTaskRunner

from flows import deploy
from flows.config import load_settings
from flows.runners import task_runner_for


class RecordingFlow:
    """Stands in for a flow: `with_options(task_runner=...)` and calls are recorded."""

    def __init__(self, calls: list, task_runner=None):
        self.calls, self.task_runner = calls, task_runner

    def with_options(self, task_runner=None, **_):
        return RecordingFlow(self.calls, task_runner)

    def __call__(self, *args, **kwargs):
        self.calls.append((self.task_runner, kwargs))
        return {"videos": 0, "stages": {}}


CASES = [([], ThreadPoolTaskRunner), (["extract.task_runner=dask"], DaskTaskRunner)]


@pytest.fixture
def recorded(monkeypatch) -> list:
    calls: list = []
    monkeypatch.setattr(deploy, "extract_flow", RecordingFlow(calls))
    monkeypatch.setattr(deploy, "train_flow", lambda *a, **k: {})
    monkeypatch.setattr(deploy, "get_run_logger", lambda: logging.getLogger("test"))
    return calls


def _served_extract_runner(corpus: str, overrides: list[str]):
    opts = deploy.ServeOptions(corpus_dir=corpus, overrides=tuple(overrides))
    flows = {options["name"]: flow for flow, options in deploy.deployment_specs(opts)}
    return flows["extract"].task_runner


@pytest.mark.parametrize(("overrides", "runner"), CASES)
def test_reextract_new_runs_extract_on_the_extract_deployments_runner(
    recorded, tmp_path, overrides, runner
):
    deploy.reextract_new_flow.fn(str(tmp_path), "demo", None, overrides, train_deployment=None)
    ((used, kwargs),) = recorded
    assert kwargs["only_new"] is True
    expected = type(task_runner_for(load_settings("demo", overrides)))
    assert expected is runner
    assert type(used) is runner
    assert type(_served_extract_runner(str(tmp_path), overrides)) is runner


@pytest.mark.parametrize(("overrides", "runner"), CASES)
def test_pipeline_runs_extract_on_the_same_runner(recorded, tmp_path, overrides, runner):
    deploy.pipeline_flow.fn(str(tmp_path), "demo", None, overrides)
    ((used, _),) = recorded
    assert type(used) is runner


def test_served_runs_execute_the_built_flow_objects(monkeypatch, tmp_path):
    # prefect.serve() would re-import each entrypoint (the extract flow on its default runner);
    # merflow registers the flow objects themselves with the runner.
    added: list = []

    class FakeRunner:
        def __init__(self, **_):
            pass

        def add_flow(self, flow, **options):
            added.append((options["name"], flow))

        async def start(self):
            return None

    monkeypatch.setattr("prefect.runner.Runner", FakeRunner)
    opts = deploy.ServeOptions(corpus_dir=str(tmp_path), overrides=("extract.task_runner=dask",))
    deploy.serve_deployments(opts)
    served = dict(added)
    assert list(served) == [
        "extract",
        "train",
        "pipeline",
        "reextract-new",
        "predict-new",
        "ablate",
        "robustness",
    ]
    assert isinstance(served["extract"].task_runner, DaskTaskRunner)
