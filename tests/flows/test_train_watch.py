"""What the Prefect UI shows of a train flow run, read through the API: a log line per epoch
of every stage, a progress artifact that reaches 100, and the fold table renewed per fold."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from data_contracts import tables
from data_contracts.labels import CLASS_INDEX
from data_contracts.store import Store
from flows.extract import extract_flow
from flows.train import train_flow
from models.folds import thin_classes

pytestmark = pytest.mark.server

# The smallest run the deploy tests make (tests/deploy/conftest.py FAST_TRAIN), 2 epochs a stage.
TINY_TRAIN = [
    "train.n_splits=2",
    "train.max_epochs=2",
    "train.final_epochs=2",
    "train.pretrain_epochs=1",
    # The paper's stages only (merflow's oversampled baseline row is another stage of 2 epochs).
    "train.oversampled_baseline=false",
]
EPOCH_LINE = re.compile(
    r"^(?P<stage>pretrain|fold-\d+ (?:step1|baseline|baseline_oversampled|step2)): "
    r"epoch (?P<epoch>\d+)/(?P<of>\d+) "
    r"loss=\d+\.\d{4}.* \(\d+\.\d s\)$"
)


@pytest.fixture(scope="module")
def extracted(prefect_server, small_corpus, tiny_models, tmp_path_factory):
    """The session's small corpus (12 labelled + 6 unlabelled clips), extracted: corpus, data
    root and the overrides that use the tiny models."""
    base = tmp_path_factory.mktemp("watch")
    corpus, root = base / "corpus", base / "root"
    shutil.copytree(small_corpus, corpus)  # the session's copy stays read-only
    models = [f"models.models_dir={tiny_models}", "models.build_tiny=false"]
    extract_flow(str(corpus), profile="demo", data_root=str(root), overrides=models)
    return corpus, root, models


def train(extracted, *extra: str):
    """A finished train flow run: its flow run id and run folder."""
    corpus, root, models = extracted
    state = train_flow(
        str(corpus),
        profile="demo",
        data_root=str(root),
        overrides=[*models, *TINY_TRAIN, *extra],
        return_state=True,
    )
    assert state.is_completed(), state
    report = state.result()
    return state.state_details.flow_run_id, root / "runs" / f"train-{report['run_id']}"


@pytest.fixture(scope="module")
def trained_run(extracted):
    """A finished train flow run, every step in this process."""
    return train(extracted)


def epochs_logged(flow_run_id) -> dict[str, list[int]]:
    """The epochs of each stage that the run's logs hold a line for, in the order logged."""
    logged: dict[str, list[int]] = {}
    for message in run_logs(flow_run_id):
        if m := EPOCH_LINE.match(message):
            logged.setdefault(m["stage"], []).append(int(m["epoch"]))
            assert int(m["of"]) == (1 if m["stage"] == "pretrain" else 2), message
    return logged


def epochs_trained(run_dir) -> dict[str, list[int]]:
    """The epochs of each stage that the run's steps trained (their done.json)."""
    trained = {"pretrain": [1]}
    for k in (0, 1):
        done = json.loads((run_dir / f"fold-{k}" / "done.json").read_text())
        for part, history in done["history"].items():
            trained[f"fold-{k} {part}"] = [h["epoch"] for h in history]
    return trained


def run_logs(flow_run_id) -> list[str]:
    """The flow run's log messages as the UI lists them (its task runs' included)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)
    ours = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
    messages: list[str] = []
    with get_client(sync_client=True) as client:
        while True:
            page = client.read_logs(
                log_filter=ours, limit=200, offset=len(messages), sort=LogSort.TIMESTAMP_ASC
            )
            messages += [log.message for log in page]
            if len(page) < 200:
                return messages


def run_artifacts(flow_run_id, key: str) -> list:
    """Every version of the run's artifact `key`, oldest first."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterKey,
    )

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]),
                key=ArtifactFilterKey(any_=[key]),
            )
        )
    return sorted(found, key=lambda a: a.created)


def test_every_epoch_of_every_stage_is_a_line_of_the_run_logs(trained_run):
    flow_run_id, run_dir = trained_run
    trained = epochs_trained(run_dir)
    assert set(trained) == {"pretrain"} | {
        f"fold-{k} {p}" for k in (0, 1) for p in ("step1", "baseline", "step2")
    }
    assert epochs_logged(flow_run_id) == trained  # each once, in order


@pytest.mark.slow  # three torchrun launches
def test_torchrun_steps_log_rank_0_epochs_the_same_way(extracted):
    """train.nproc_per_node=2: every step runs under torchrun; the epochs of rank 0 (not of
    both ranks) are lines of the run's logs, as in one process."""
    flow_run_id, run_dir = train(extracted, "train.nproc_per_node=2", "train.seed=1")
    assert json.loads((run_dir / "fold-1" / "done.json").read_text())["world_size"] == 2
    assert epochs_logged(flow_run_id) == epochs_trained(run_dir)


def test_thin_classes_are_said_once_per_run(extracted, trained_run):
    flow_run_id, _ = trained_run
    labels = Store(extracted[1]).read(tables.LABELS).label.map(CLASS_INDEX).to_numpy()
    messages = run_logs(flow_run_id)
    thin = [m for m in messages if "fewer labelled rows than n_splits=2" in m]
    assert len(thin) == (1 if thin_classes(labels, 2) else 0), thin  # at freeze, not per step
    absent = [m for m in messages if "none to oversample" in m]
    assert len(absent) == len({m.split(":")[0] for m in absent}), absent  # once per fold


def test_progress_reaches_100_and_the_fold_table_grows_per_fold(trained_run):
    flow_run_id, _ = trained_run
    (progress,) = run_artifacts(flow_run_id, "train-progress")
    assert progress.type == "progress" and float(progress.data) == 100.0
    assert "13 of 13 epochs" in progress.description  # 1 + 2 folds x 3 stages x 2
    tables = [json.loads(a.data) for a in run_artifacts(flow_run_id, "train-folds")]
    assert [[row["fold"] for row in t] for t in tables] == [[0], [0, 1]]  # one per finished fold
    for row in tables[-1]:
        assert 0 <= row["full method"] <= 100 and row["epochs"] == "step1 2, baseline 2, step2 2"
