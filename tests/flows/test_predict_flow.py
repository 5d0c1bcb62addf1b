"""`merflow predict`: a folder of new clips runs as the predict flow (scanned, extracted by the
extract flow's stage tasks, labelled, shown as a table artifact); a single video is labelled
without any Prefect server; other extractors than the run's are refused before any work."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from data_contracts import tables
from data_contracts.labels import CLASSES
from data_contracts.store import Store
from flows.predict import predict_flow
from tasks.dag import STAGES
from tests.tasks.predict_run import predict_run

pytestmark = pytest.mark.server

MERFLOW = str(Path(sys.executable).with_name("merflow"))
PROBS = [f"p_{c}" for c in CLASSES]


@pytest.fixture(scope="module")
def made(prefect_server, small_corpus, tiny_models, tmp_path_factory):
    return predict_run(small_corpus, tiny_models, tmp_path_factory)


def _artifact(key: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]))
        )
    return found


def test_a_folder_of_new_clips_runs_as_the_predict_flow(made, tmp_path, one_thread):
    folder = tmp_path / "incoming"
    folder.mkdir()
    for clip in made.new_clips[1:]:
        shutil.copy(clip, folder / clip.name)
    out = predict_flow("latest", [str(folder)], str(made.root), overrides=made.overrides)
    rows = pd.DataFrame(out["rows"]).set_index("video_id").sort_index()
    assert list(rows.index) == ["new_clip_1", "new_clip_2"]
    assert out["extracted"] == dict.fromkeys(STAGES, 2)
    assert rows["class"].isin(CLASSES).all() and (rows.modalities == "visual+acoustic+text").all()
    assert (rows.run_key == made.report["run_id"]).all()
    np.testing.assert_allclose(rows[PROBS].sum(axis=1), 1, atol=1e-4)

    csv = pd.read_csv(out["csv"]).set_index("video_id").sort_index()
    assert Path(out["csv"]).parent == made.run_dir / "predict"
    assert list(csv.columns[:7]) == ["class", *PROBS]
    np.testing.assert_allclose(csv[PROBS], rows[PROBS], atol=1e-6)
    store = Store(made.root)
    preds = store.read(tables.PREDICTIONS).set_index(["video_id", "split"])
    stored = preds.loc[[(v, "predict") for v in rows.index]]
    assert (stored.run_id == made.report["run_id"]).all()
    np.testing.assert_allclose(np.stack(stored.prob_voted), rows[PROBS], atol=1e-6)
    assert list(stored.predicted) == list(rows["class"])
    manifest = store.read(tables.MANIFEST).set_index("video_id")
    assert set(manifest.loc[rows.index, "pool"]) == {"incoming"}  # scanned like any folder
    (artifact,) = _artifact("predictions")[:1]
    shown = json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data
    assert sorted(r["video_id"] for r in shown) == list(rows.index)

    # Again: nothing left to extract, the same labels.
    again = predict_flow("latest", [str(folder)], str(made.root), overrides=made.overrides)
    assert set(again["extracted"].values()) == {0}
    again_rows = pd.DataFrame(again["rows"]).set_index("video_id").sort_index()
    np.testing.assert_allclose(again_rows[PROBS], rows[PROBS], atol=1e-6)


def _merflow(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [MERFLOW, "predict", *args], capture_output=True, text=True, env=env, timeout=600
    )


def test_a_single_video_is_labelled_without_a_server(made, tmp_path):
    # An API address where nothing listens: any call to Prefect would fail the command.
    env = {**os.environ, "PREFECT_API_URL": "http://127.0.0.1:9/api", "OMP_NUM_THREADS": "1"}
    clip = tmp_path / "one_clip.mp4"
    shutil.copy(made.new_clips[0], clip)
    # The run folder's path names the data root too.
    done = _merflow(str(made.run_dir), str(clip), *made.overrides, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "one_clip" in done.stdout and "1 of 1 videos labelled" in done.stdout
    assert made.report["run_id"] in done.stdout
    preds = Store(made.root).read(tables.PREDICTIONS)
    assert set(preds[preds.video_id == "one_clip"].split) == {"predict"}

    # Other extractors than the run's: refused, naming the difference, before any work.
    other = tmp_path / "other_clip.mp4"
    shutil.copy(made.new_clips[0], other)
    refused = _merflow(
        "latest",
        str(other),
        "--data-root",
        str(made.root),
        *made.overrides,
        "faces.size=48",
        env=env,
    )
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert refused.stderr.startswith("error: run ") and "visual: run " in refused.stderr
    audio = Store(made.root).read(tables.AUDIO)
    assert "other_clip" not in set(audio.video_id)
