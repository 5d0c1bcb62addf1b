"""The `ablate` deployment: `merflow serve` and `merflow deploy` offer the paper's Table 1 as the
ablate flow, its run form filled with the served corpus, profile, data root and overrides (no
server: the deployment's own parameters are handed to the flow)."""

from __future__ import annotations

import logging

import pytest
from prefect.flows import load_flow_from_entrypoint

from flows import ablate, deploy
from flows.ablate import ablate_flow
from flows.config import PROJECT_ROOT, SettingsError


def _served(opts: deploy.ServeOptions) -> dict:
    return {d.name: d for d in deploy.build_deployments(opts)}


def test_ablate_deployment_runs_the_ablate_flow_with_the_served_overrides(monkeypatch, tmp_path):
    served = ("train.n_splits=2", "train.use_nee=false")
    opts = deploy.ServeOptions(corpus_dir=str(tmp_path), profile="demo", overrides=served)
    flows = {options["name"]: flow for flow, options in deploy.deployment_specs(opts)}
    assert flows["ablate"] is ablate_flow
    deployment = _served(opts)["ablate"]
    assert deployment.entrypoint == "flows/ablate.py:ablate_flow"
    assert "gpu" in deployment.tags
    assert deployment.parameters == {
        "corpus_dir": str(tmp_path),
        "profile": "demo",
        "data_root": None,
        "overrides": list(served),
        "seeds": 3,  # the command line's default
        "parallel": None,
        "robustness": None,  # no robustness table unless levels are given
    }
    # A run from the form gets the served overrides: the ablate flow refuses this one, which
    # switches a part of the full method off, before it reads anything.
    monkeypatch.setattr(ablate, "get_run_logger", lambda: logging.getLogger("test"))
    with pytest.raises(SettingsError, match=r"already switch off train\.use_nee"):
        ablate_flow.fn(**deployment.parameters)


def test_ablate_deployment_on_work_pools_is_the_same_flow():
    entrypoint, kind = deploy.ENTRYPOINTS["ablate"]
    path, name = entrypoint.split(":")
    loaded = load_flow_from_entrypoint(f"{PROJECT_ROOT / path}:{name}")
    assert loaded.name == ablate_flow.name == "ablate"
    assert kind == "gpu"  # it trains, as the train deployment does


def test_robustness_deployment_offers_the_latest_run_and_the_default_levels(monkeypatch, tmp_path):
    from flows import robustness
    from flows.robustness import robustness_flow
    from tasks.corrupt import DEFAULT_LEVELS
    from tasks.predict import RunFolderError

    opts = deploy.ServeOptions(corpus_dir=str(tmp_path), profile="demo")
    deployment = _served(opts)["robustness"]
    assert deployment.entrypoint == "flows/robustness.py:robustness_flow"
    assert deployment.parameters == {
        "corpus_dir": str(tmp_path),
        "profile": "demo",
        "data_root": None,
        "overrides": [],
        "run": "latest",
        "levels": list(DEFAULT_LEVELS),
    }
    entrypoint, kind = deploy.ENTRYPOINTS["robustness"]
    path, name = entrypoint.split(":")
    assert load_flow_from_entrypoint(f"{PROJECT_ROOT / path}:{name}").name == "robustness"
    assert kind == "gpu"
    # Run from the form before any run finished: the error says what to do.
    monkeypatch.setattr(robustness, "get_run_logger", lambda: logging.getLogger("test"))
    with pytest.raises(RunFolderError, match="train one first"):
        robustness_flow.fn(**deployment.parameters)
