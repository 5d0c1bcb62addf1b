"""Fixtures of the reliability tests: a writable corpus copy and extraction in a subprocess."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.reliability.helpers import REPO

DRIVER = Path(__file__).with_name("extract_driver.py")


@pytest.fixture
def corpus(small_corpus: Path, tmp_path: Path) -> Path:
    """A private, writable copy of the session's small corpus (12 labelled + 6 unlabelled)."""
    dst = tmp_path / "corpus"
    shutil.copytree(small_corpus, dst)
    return dst


@pytest.fixture
def model_overrides(tiny_models: Path) -> list[str]:
    """Overrides that point the demo profile at the session's tiny checkpoints."""
    return [f"models.models_dir={tiny_models}", "models.build_tiny=false"]


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory):
    """A merflow Prefect server on a throw-away PostgreSQL cluster on loopback (the team
    setup: `merflow server start --database-url postgresql+asyncpg://...`)."""
    from flows import server
    from tests.reliability.postgres import cluster

    root = tmp_path_factory.mktemp("prefect-pg-root")
    with cluster(server.free_port()) as url:
        info = server.start(root, port=server.free_port(), database_url=url)
        try:
            yield info
        finally:
            server.stop(root)


@pytest.fixture
def extract_process(prefect_server, model_overrides) -> Callable[..., subprocess.Popen]:
    """Start `extract_driver.py` in a subprocess against the session's Prefect server, or the
    one `server_info` names."""
    from flows.server import client_env

    def start(
        corpus: Path,
        root: Path,
        *overrides: str,
        video_dirs: list[Path] | None = None,
        extra_env: dict[str, str] | None = None,
        server_info=None,
    ) -> subprocess.Popen:
        info = server_info or prefect_server
        env = {
            **os.environ,
            **client_env(Path(info.home).parent, info.api_url),
            "PYTHONPATH": str(REPO),
        }
        cmd = [sys.executable, str(DRIVER), str(corpus), str(root)]
        for d in video_dirs or []:
            cmd += ["--video-dir", str(d)]
        cmd += [*model_overrides, *overrides]
        return subprocess.Popen(
            cmd,
            cwd=REPO,
            env={**env, **(extra_env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    return start


@pytest.fixture(autouse=True)
def _drain_prefect_logs(request):
    """After a test that ran flows, send Prefect's queued API logs while the server is up.

    A failed flow queues error logs; left queued until the session's server has stopped, the
    log worker retries them at interpreter exit for over a minute.
    """
    yield
    if "prefect_server" in request.fixturenames:
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=10)
