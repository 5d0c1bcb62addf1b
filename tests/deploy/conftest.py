"""A `merflow serve` process against the session's Prefect server, and API helpers."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows import server

FAST_TRAIN = [
    "train.n_splits=2",
    "train.max_epochs=6",
    "train.final_epochs=6",
    "train.pretrain_epochs=1",
]


@pytest.fixture
def corpus(small_corpus, tmp_path) -> Path:
    dst = tmp_path / "corpus"
    shutil.copytree(small_corpus, dst)
    return dst


class Served:
    """A running `merflow serve` subprocess."""

    def __init__(self, proc: subprocess.Popen, log: Path, root: Path):
        self.proc, self.log, self.root = proc, log, root

    def text(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def serve(prefect_server, tmp_path, tiny_models):
    """Start `merflow serve CORPUS ...`; stopped (and its deployments deleted) at teardown."""
    started: list[Served] = []

    def start(corpus: Path, *args: str, overrides: list[str] = ()) -> Served:
        root = tmp_path / "root"
        log = tmp_path / f"serve-{len(started)}.log"
        env = {
            **os.environ,
            **server.client_env(root, prefect_server.api_url),
            "PREFECT_RUNNER_POLL_FREQUENCY": "2",
            "PREFECT_LOGGING_LEVEL": "INFO",
        }
        models = [f"models.models_dir={tiny_models}", "models.build_tiny=false"]
        cmd = [
            str(Path(sys.executable).with_name("merflow")),
            "serve",
            str(corpus),
            "--data-root",
            str(root),
            "--allow",
            str(tiny_models),
            *args,
            *models,
            *overrides,
        ]
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        served = Served(proc, log, root)
        started.append(served)
        wait_for_deployments(["extract", "train", "pipeline", "reextract-new"], served)
        return served

    yield start
    for s in started:
        s.proc.terminate()
        try:
            s.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            s.proc.kill()
    delete_deployments()


def _client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def wait_for_deployments(names: list[str], served: Served, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if served.proc.poll() is not None:
            raise AssertionError(f"merflow serve exited:\n{served.text()[-3000:]}")
        with _client() as client:
            have = {d.name for d in client.read_deployments()}
        if set(names) <= have:
            return
        time.sleep(1)
    raise AssertionError(f"deployments {names} not served in {timeout}s:\n{served.text()[-3000:]}")


def delete_deployments() -> None:
    with _client() as client:
        for d in client.read_deployments():
            client.delete_deployment(d.id)


def wait_for_run(run_id, timeout: float = 400.0):
    """The flow run, once it reached a final state."""
    deadline = time.monotonic() + timeout
    with _client() as client:
        while time.monotonic() < deadline:
            run = client.read_flow_run(run_id)
            if run.state is not None and run.state.is_final():
                return run
            time.sleep(2)
    raise AssertionError(f"flow run {run_id} did not finish in {timeout}s")
