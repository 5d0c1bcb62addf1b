"""Session fixtures: CPU only, offline, one real Prefect server, a small corpus, tiny models."""

from __future__ import annotations

import os

# Forced before anything imports torch, transformers or prefect.
os.environ["CUDA_VISIBLE_DEVICES"] = ""
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
for _name in [n for n in os.environ if n.startswith("MERFLOW_")]:
    del os.environ[_name]  # a developer's own settings must not leak into tests

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """One real Prefect server (SQLite) for the whole session; clients in this process use it."""
    from flows import server

    root = tmp_path_factory.mktemp("prefect-root")
    info = server.start(root, port=server.free_port())
    with server.use_server(server.client_env(root, info.api_url)):
        yield info
        # Send buffered run logs while the server still listens (else exit waits ~70 s).
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=5)
    server.stop(root)


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """A small demo corpus (12 labelled, 6 unlabelled clips) shared by the session; read-only."""
    from tasks.demo.corpus import make_demo_corpus

    out = tmp_path_factory.mktemp("corpus") / "corpus"
    make_demo_corpus(out, n_labelled=12, n_unlabelled=6, seed=7)
    return out


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> Path:
    """Tiny seeded checkpoints of the four real architectures, in their real on-disk layouts."""
    from models.tiny import build_tiny_models

    out = tmp_path_factory.mktemp("models")
    build_tiny_models(out, seed=0)
    return out


@pytest.fixture
def one_thread():
    """torch on one thread: tiny models gain nothing from a second, and on a busy 2-core
    machine it spins."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
