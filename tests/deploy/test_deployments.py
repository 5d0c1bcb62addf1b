"""Served deployments: pipeline via the API, scheduled re-extraction of new clips and their
labels from the latest finished run (predict-new), auth."""

from __future__ import annotations

import shutil
import urllib.error
import urllib.request

import numpy as np
import pandas as pd
import pytest
from prefect.deployments import run_deployment

from data_contracts import tables
from data_contracts.store import Store
from flows import server
from tests.deploy.conftest import FAST_TRAIN, _client, wait_for_run

pytestmark = [pytest.mark.server, pytest.mark.slow]


def test_pipeline_deployment_runs_extract_then_train(serve, corpus):
    served = serve(corpus, "--interval", "0")
    run = run_deployment(
        "pipeline/pipeline",
        parameters={
            "corpus_dir": str(corpus),
            "profile": "demo",
            "data_root": str(served.root),
            "overrides": FAST_TRAIN,
        },
        timeout=0,
    )
    run = wait_for_run(run.id)
    assert run.state.is_completed(), served.text()[-4000:]
    store = Store(served.root)
    for modality in ("visual", "acoustic", "text"):
        folder = store.stores / "features" / modality
        (table,) = list(folder.iterdir())
        assert len(pd.read_parquet(table)) == 18
    reports = list((served.root / "runs").glob("train-*/report/report.md"))
    assert reports and "WAF" in reports[0].read_text()
    assert len(store.read(tables.PREDICTIONS)) == 18


def test_run_form_parameters_outside_allowed_roots_are_refused(serve, corpus, tmp_path):
    served = serve(corpus, "--interval", "0")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run = run_deployment(
        "extract/extract",
        parameters={"corpus_dir": str(corpus), "data_root": str(elsewhere)},
        timeout=0,
    )
    run = wait_for_run(run.id, timeout=120)
    # Failed for the reason under test, not any other.
    assert run.state.is_failed(), served.text()[-3000:]
    assert "outside the allowed roots" in (run.state.message or ""), run.state.message
    assert not (elsewhere / "stores").exists()
    assert not served.root.joinpath("stores").exists()


def test_schedule_extracts_exactly_the_new_clips(serve, corpus):
    served = serve(corpus, "--interval", "4", overrides=["extract.shard_size=64"])
    store = Store(served.root)

    def extracted(n):
        return lambda _runs: all(len(_rows(store, m)) == n for m in ("visual", "acoustic", "text"))

    assert _wait_for_reextract(served, extracted(18)), served.text()[-3000:]
    baseline = {m: _rows(store, m) for m in ("visual", "acoustic", "text")}
    assert all(len(v) == 18 for v in baseline.values())

    src = sorted((corpus / "video-labeled").glob("*.mp4"))[:2]
    new_ids = ["sample_09000001", "sample_09000002"]
    for s, name in zip(src, new_ids, strict=True):
        shutil.copy(s, corpus / "video-unlabeled" / f"{name}.mp4")

    assert _wait_for_reextract(served, extracted(20)), served.text()[-3000:]
    for m, before in baseline.items():
        after = _rows(store, m)
        assert set(after.video_id) - set(before.video_id) == set(new_ids)
        old = after[after.video_id.isin(before.video_id)].set_index("video_id")
        # Nothing that was done is recomputed: the old rows keep their creation times.
        pd.testing.assert_series_equal(
            old.created_at.sort_index(), before.set_index("video_id").created_at.sort_index()
        )
    # The labelled pool grew nothing; the new clips went to the unlabelled pool.
    manifest = store.read(tables.MANIFEST).set_index("video_id")
    assert set(manifest.loc[new_ids, "pool"]) == {"unlabeled"}


def test_predict_new_labels_a_clip_added_after_training(serve, corpus):
    """reextract-new extracts the new clip and starts predict-new, which labels it with the
    latest finished run (the training it also starts is a separate, later run)."""
    import time

    from data_contracts.labels import CLASSES

    # The least training that makes a finished run: no labels are checked against its WAF.
    quick = [*FAST_TRAIN, "train.max_epochs=1", "train.final_epochs=1"]
    served = serve(corpus, "--interval", "4", overrides=[*quick, "train.use_pseudo_labels=false"])
    store = Store(served.root)
    deadline = time.monotonic() + 400
    while not (done := list(served.root.glob("runs/train-*/report/report.json"))):
        assert time.monotonic() < deadline, served.text()[-3000:]
        time.sleep(2)
    key = done[0].parent.parent.name.removeprefix("train-")

    new_id = "sample_09000003"
    src = sorted((corpus / "video-labeled").glob("*.mp4"))[0]
    shutil.copy(src, corpus / "video-unlabeled" / f"{new_id}.mp4")

    def labelled() -> pd.DataFrame:
        if not store.exists(tables.PREDICTIONS):
            return pd.DataFrame(columns=["video_id", "run_id", "split"])
        preds = store.read(tables.PREDICTIONS)
        return preds[(preds.split == "predict") & (preds.run_id == key)]

    deadline = time.monotonic() + 300
    while labelled().empty:
        assert time.monotonic() < deadline, served.text()[-3000:]
        time.sleep(2)
    (row,) = labelled().itertuples(index=False)  # only the new clip: the run saw the others
    assert row.video_id == new_id and row.predicted in CLASSES and row.fold == -1
    assert abs(float(np.sum(row.prob_voted)) - 1) < 1e-4
    with _client() as client:
        runs = [r for r in client.read_flow_runs() if r.name.startswith("predict-new")]
        artifacts = client.read_artifacts()
    assert any(r.state and r.state.is_completed() for r in runs)
    shown = [a for a in artifacts if a.key == "predict-new"]
    assert shown and new_id in str(shown[0].data)


def _rows(store: Store, modality: str) -> pd.DataFrame:
    folder = store.stores / "features" / modality
    tables_ = list(folder.iterdir()) if folder.exists() else []
    return (
        pd.read_parquet(tables_[0]) if tables_ else pd.DataFrame(columns=["video_id", "created_at"])
    )


def _wait_for_reextract(served, done, timeout: float = 300.0) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with _client() as client:
            runs = [
                r
                for r in client.read_flow_runs()
                if r.name.startswith("reextract-new") and r.state and r.state.is_completed()
            ]
        if runs and done(runs):
            return True
        time.sleep(2)
    return False


def test_auth_string_refuses_unauthenticated_calls(tmp_path):
    root = tmp_path / "auth-root"
    info = server.start(root, port=server.free_port(), auth_string="merflow:s3cret")
    try:
        req = urllib.request.Request(f"{info.api_url}/flows/filter", data=b"{}", method="POST")
        req.add_header("Content-Type", "application/json")
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=10)
        assert err.value.code == 401
        req.add_header("Authorization", "Basic bWVyZmxvdzpzM2NyZXQ=")  # merflow:s3cret
        with urllib.request.urlopen(req, timeout=10) as ok:
            assert ok.status == 200
    finally:
        server.stop(root)
    with pytest.raises(server.ServerError, match="not a loopback address"):
        server.start(root, host="0.0.0.0", port=server.free_port())
