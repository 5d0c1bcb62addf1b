"""The extract flow's run log says, per stage and shard, what was computed, skipped and failed."""

from __future__ import annotations

import logging
import re
import shutil
from uuid import UUID

import pandas as pd
import pytest

from data_contracts.store import Store
from flows.config import load_settings
from flows.plan import plan_extraction
from tasks.dag import STAGES
from tasks.engine.stage import run_stage
from tests.flows.test_extract_flow import _run

LINE = re.compile(r"^(\w+) shard (\d+)/(\d+): (\d+) computed, (\d+) skipped, (\d+) failed(.*)$")


@pytest.fixture
def info_run_logs():
    """Run loggers at INFO (the tests' PREFECT_LOGGING_LEVEL is WARNING), as merflow runs them."""
    logger = logging.getLogger("prefect.flow_runs")
    level = logger.level
    logger.setLevel(logging.INFO)
    yield
    logger.setLevel(level)


def _shard_lines(flow_run_id: UUID) -> list[tuple]:
    """The flow run's own log lines about shards, as read back from the Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)
    with get_client(sync_client=True) as client:
        logs = client.read_logs(
            LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=200
        )
    found = [(log.task_run_id, LINE.match(log.message)) for log in logs]
    return [m.groups() for task_run, m in found if m and task_run is None]


def _run_and_read(corpus, root, tiny_models) -> tuple[dict, dict]:
    state = _run(
        corpus,
        root,
        tiny_models,
        video_dirs=[str(corpus / "video-labeled")],  # 12 videos: shards of 8 and 4
        return_state=True,
    )
    lines = _shard_lines(state.state_details.flow_run_id)
    by_key = {
        (stage, int(k)): (int(n), int(c), int(s), int(f), rest)
        for stage, k, n, c, s, f, rest in lines
    }
    assert len(by_key) == len(lines), "one line per stage and shard, not more"
    return state.result(), by_key


@pytest.mark.server
def test_each_stage_logs_each_shard_once_with_its_counts(
    prefect_server, info_run_logs, small_corpus, tmp_path, tiny_models
):
    corpus = tmp_path / "corpus"
    shutil.copytree(small_corpus, corpus)
    root = tmp_path / "root"
    sizes = {1: 8, 2: 4}

    summary, first = _run_and_read(corpus, root, tiny_models)
    assert summary["shards"] == 2
    assert set(first) == {(stage, k) for stage in STAGES for k in sizes}
    for (stage, k), (n, computed, skipped, failed, rest) in first.items():
        assert (n, computed, skipped, failed) == (2, sizes[k], 0, 0), (stage, k)
        # Model stages compute on their share of the machine's cores, and say how many threads.
        threads = (
            r" on \d+ threads?" if stage in ("transcribe", "text", "acoustic", "visual") else ""
        )
        assert re.fullmatch(rf" in \d+\.\d s, \d+\.\d\d videos/s{threads}", rest), (stage, k, rest)

    _, again = _run_and_read(corpus, root, tiny_models)
    assert set(again) == set(first)
    for (stage, k), (n, computed, skipped, failed, rest) in again.items():
        assert (n, computed, skipped, failed) == (2, 0, sizes[k], 0), (stage, k)
        assert rest == " (cached)", (stage, k, rest)


def test_a_shard_line_names_failures_and_what_a_rerun_skips(small_corpus, tmp_path, tiny_models):
    settings = load_settings(
        "demo", [f"models.models_dir={tiny_models}", "models.build_tiny=false"]
    )
    plan = plan_extraction(settings, tmp_path / "root", None)
    store = Store(tmp_path / "root")
    files = sorted((small_corpus / "video-labeled").glob("*.mp4"))[:3]
    videos = pd.DataFrame(
        {"video_id": [f.stem for f in files], "sha256": [f"{i:064x}" for i in range(3)],
         "path": [str(f) for f in files]}
    )  # fmt: skip

    # No audio rows yet: every video of the shard is a missing modality.
    failed = run_stage(plan.stage("acoustic"), videos, store)
    line = failed.line(1, 1)
    assert line.startswith("acoustic shard 1/1: 0 computed, 0 skipped, 3 failed ")
    assert "(MissingModalityError 3)" in line and "videos/s" in line

    audio = run_stage(plan.stage("audio"), videos, store)
    assert audio.line(1, 1).startswith("audio shard 1/1: 3 computed, 0 skipped, 0 failed in ")
    rerun = run_stage(plan.stage("audio"), videos, store)
    assert rerun.line(2, 2).startswith("audio shard 2/2: 0 computed, 3 skipped, 0 failed in ")
    assert "videos/s" not in rerun.line(2, 2)  # nothing worked on: no rate
