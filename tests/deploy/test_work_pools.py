"""`merflow deploy` on work pools, run by real process workers: the pools are created when
missing, and `pipeline` extracts on the CPU pool's worker and trains on the GPU pool's."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from prefect.deployments import run_deployment

from flows import deploy, server
from tests.deploy.conftest import FAST_TRAIN, _client, delete_deployments, wait_for_run


class Worker:
    """A `prefect worker start --pool NAME` process, in its own process group (its flow-run
    processes with it)."""

    def __init__(self, pool: str, env: dict[str, str], log: Path) -> None:
        self.pool, self.log = pool, log
        cmd = [
            str(Path(sys.executable).with_name("prefect")),
            "worker",
            "start",
            "--pool",
            pool,
            "--type",
            "process",
            "--name",
            f"worker-of-{pool}",
        ]
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=20)


def _runs_of(deployment: str):
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with _client() as client:
        dep = client.read_deployment_by_name(deployment)
        return client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id]))
        )


@pytest.mark.server
@pytest.mark.slow
def test_deploy_creates_the_pools_and_pipeline_trains_on_the_gpu_pools_worker(
    prefect_server, corpus, tiny_models, tmp_path
):
    tag = uuid.uuid4().hex[:6]
    cpu, gpu = f"cpu-{tag}", f"gpu-{tag}"
    root = tmp_path / "root"
    env = {
        **os.environ,
        **server.client_env(root, prefect_server.api_url),
        "PREFECT_LOGGING_LEVEL": "INFO",
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_WORKER_HEARTBEAT_SECONDS": "5",
    }
    models = [f"models.models_dir={tiny_models}", "models.build_tiny=false"]
    merflow = str(Path(sys.executable).with_name("merflow"))
    deploy = [merflow, "deploy", str(corpus), "--cpu-pool", cpu, "--gpu-pool", gpu]
    deploy += ["--data-root", str(root), "--interval", "0", *models, *FAST_TRAIN]
    workers: list[Worker] = []
    try:
        done = subprocess.run(deploy, env=env, capture_output=True, text=True, timeout=300)
        said = done.stdout + done.stderr
        assert done.returncode == 0, said
        # Neither pool existed: deploy made both, and said so.
        assert f"created work pool '{cpu}' (type process)" in said, said
        assert f"created work pool '{gpu}' (type process)" in said, said
        with _client() as client:
            assert client.read_work_pool(gpu).type == "process"

        server.prefect_home(root).mkdir(parents=True, exist_ok=True)
        workers = [Worker(pool, env, tmp_path / f"{pool}.log") for pool in (cpu, gpu)]
        run = run_deployment("pipeline/pipeline", timeout=0)  # the deployed defaults
        run = wait_for_run(run.id, timeout=600)
        logs = "\n\n".join(f"--- {w.pool}\n{w.text()[-3000:]}" for w in workers)
        assert run.state.is_completed(), f"{run.state.message}\n{logs}"
        assert run.work_pool_name == cpu

        # Training was a run of the train deployment, on the GPU pool, picked up by its worker.
        (train,) = _runs_of("train/train")
        assert train.state.is_completed() and train.work_pool_name == gpu
        assert train.parent_task_run_id is not None  # shown inside the pipeline run
        cpu_log, gpu_log = (w.text() for w in workers)
        took = f"submitting flow run '{train.id}'"
        assert took in gpu_log and took not in cpu_log, logs
        took = f"submitting flow run '{run.id}'"
        assert took in cpu_log and took not in gpu_log, logs
        reports = list((root / "runs").glob("train-*/report/report.json"))
        assert len(reports) == 1
    finally:
        for w in workers:
            w.stop()
        delete_deployments()
        with _client() as client:
            for pool in (cpu, gpu):
                with contextlib.suppress(Exception):  # never created: the failure says why
                    client.delete_work_pool(pool)
    assert all(w.proc.poll() is not None for w in workers)


def test_pipeline_hands_training_to_the_deployment_and_fails_with_it(monkeypatch, tmp_path):
    """No server: extraction and run_deployment are stand-ins; what pipeline asks for and how
    it ends are real."""
    from prefect.states import Completed, Failed

    started: list[tuple[str, dict]] = []
    state = Completed()

    class Run:
        id, name, work_pool_name = uuid.uuid4(), "train-demo", "gpu-pool"

        def __init__(self):
            self.state = state

    def run_deployment(name, parameters, **_):
        started.append((name, parameters))
        return Run()

    monkeypatch.setattr(deploy, "extract_flow_for", lambda s: lambda *a: {"videos": 0})
    monkeypatch.setattr(deploy, "run_deployment", run_deployment)
    monkeypatch.setattr(deploy, "train_flow", lambda *a, **k: pytest.fail("trained in process"))
    monkeypatch.setattr(deploy, "get_run_logger", lambda: logging.getLogger("test"))
    corpus, overrides = str(tmp_path), ["train.n_splits=2"]
    out = deploy.pipeline_flow.fn(corpus, "demo", None, overrides, train_deployment="train/train")
    assert out["train_run"] == str(Run.id) and out["train_pool"] == "gpu-pool"
    parameters = {"corpus_dir": corpus, "profile": "demo", "data_root": None}
    assert started == [("train/train", {**parameters, "overrides": overrides})]
    state = Failed(message="boom")
    with pytest.raises(RuntimeError, match=r"train/train run train-demo .* ended Failed: boom"):
        deploy.pipeline_flow.fn(corpus, "demo", None, overrides, train_deployment="train/train")
