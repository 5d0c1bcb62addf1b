"""Labelling videos with a finished run (tasks/predict.py): the fold-averaged voted probabilities
are the run's own for the videos it saw, new clips are extracted by the engine and labelled, and
a partial run folder or other extractors are refused, naming what is wrong."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest

from data_contracts import tables
from data_contracts.labels import CLASSES, CLASSIFIERS
from data_contracts.store import Store
from flows.config import load_settings
from flows.plan import matching_plan
from tasks.predict import (
    ExtractorMismatchError,
    RunFolderError,
    average_over_folds,
    extract_here,
    find_run,
    label_videos,
    load_models,
    load_run,
    video_rows,
)
from tasks.training.steps import load_fold
from tests.tasks.predict_run import predict_run

pytestmark = pytest.mark.server  # the run is made by the real extract and train flows


@pytest.fixture(scope="module")
def made(prefect_server, small_corpus, tiny_models, tmp_path_factory):
    return predict_run(small_corpus, tiny_models, tmp_path_factory)


def _opened(made, *extra):
    settings = load_settings("demo", [*made.overrides, *extra])
    run = load_run(find_run(made.root / "runs", "latest"))
    return settings, run, matching_plan(settings, made.root, run)


def test_seen_videos_get_the_runs_own_probabilities(made, one_thread):
    _, run, plan = _opened(made)
    assert run.key == made.report["run_id"] and run.folder == made.run_dir
    store = Store(made.root)
    own = store.read(tables.PREDICTIONS)
    # The run's own rows; other tests of the session may already have added "predict" rows.
    own = own[(own.run_id == run.key) & own.split.isin(["cv", "unlabeled"])]
    unl = own[own.split == "unlabeled"].set_index("video_id").sort_index()
    manifest = store.read(tables.MANIFEST)
    seen = manifest[manifest.video_id.isin(own.video_id)][["video_id", "sha256"]]
    assert len(seen) == 18

    table = label_videos(store, load_models(run, "cpu"), plan, seen)
    assert set(table.modalities) == {"visual+acoustic+text"} and table["class"].notna().all()
    mine = store.read(tables.PREDICTIONS)
    mine = mine[(mine.run_id == run.key) & (mine.split == "predict")].set_index("video_id")
    assert set(seen.video_id) <= set(mine.index)
    # The submission's videos: the same fold-averaged probabilities, classifier by classifier.
    for column in [f"prob_{c}" for c in CLASSIFIERS] + ["prob_voted"]:
        np.testing.assert_allclose(
            np.stack(mine.loc[unl.index, column]), np.stack(unl[column]), atol=1e-5, rtol=0
        )
    sub = pd.read_csv(made.run_dir / "report" / "submission.csv").set_index("name")
    assert (mine.loc[sub.index, "predicted"] == sub.discrete).all()
    # Labelled videos keep their ground truth beside the prediction.
    labels = store.read(tables.LABELS).set_index("video_id").label
    cv = own[own.split == "cv"].video_id
    assert (mine.loc[cv, "label"] == labels.loc[cv]).all()
    # The printed table carries the voted probabilities of the predictions rows.
    shown = table.set_index("video_id").loc[unl.index, [f"p_{c}" for c in CLASSES]]
    np.testing.assert_allclose(shown.to_numpy(), np.stack(unl.prob_voted), atol=1e-5)


def test_the_submission_is_the_fold_average(made):
    n = made.report["n_unlabelled"]
    folds = [load_fold(made.run_dir / f"fold-{k}")[1] for k in range(2)]
    tests_ = [{k[5:]: v for k, v in a.items() if k.startswith("test_")} for a in folds]
    probs = average_over_folds(tests_, 2)
    assert probs["voted"].shape == (n, len(CLASSES))
    rows = Store(made.root).read(tables.PREDICTIONS)
    rows = rows[(rows.run_id == made.report["run_id"]) & (rows.split == "unlabeled")]
    # In the run's order of unlabelled videos: the submission's.
    sub = pd.read_csv(made.run_dir / "report" / "submission.csv")
    by_id = rows.set_index("video_id").loc[sub.name]
    np.testing.assert_array_equal(np.stack(by_id.prob_voted), probs["voted"].astype(np.float32))


def test_a_new_clip_is_extracted_by_the_engine_and_labelled(made, one_thread):
    _, run, plan = _opened(made)
    store = Store(made.root)
    manifest_before = store.read(tables.MANIFEST)
    videos = video_rows(made.new_clips[:1])
    computed = extract_here(plan, videos, store)
    assert computed == dict.fromkeys(computed, 1) and len(computed) == 6
    assert set(extract_here(plan, videos, store).values()) == {0}  # the stores are the cache
    table = label_videos(store, load_models(run, "cpu"), plan, videos)
    (row,) = table.itertuples(index=False)
    assert row.video_id == "new_clip_0" and row._1 in CLASSES and row.run_key == run.key
    assert row.modalities == "visual+acoustic+text"
    probs = np.array([getattr(row, f"p_{c}") for c in CLASSES])
    assert abs(probs.sum() - 1) < 1e-4 and CLASSES[int(probs.argmax())] == row._1
    # A single video is a debugging run: the manifest is left as it was.
    pd.testing.assert_frame_equal(store.read(tables.MANIFEST), manifest_before)


def test_a_partial_run_folder_names_what_is_missing(made, tmp_path):
    runs = tmp_path / "runs"
    copy = runs / made.run_dir.name
    shutil.copytree(made.run_dir, copy)
    (copy / "fold-1" / "done.json").unlink()
    (copy / "normalizer.npz").unlink()
    with pytest.raises(RunFolderError) as err:
        load_run(copy)
    message = str(err.value)
    assert "fold-1/done.json" in message and "normalizer.npz" in message
    assert "fold-0" not in message and "merflow train" in message

    (copy / "report" / "report.json").unlink()
    with pytest.raises(RunFolderError, match=r"has not finished: .*report.json is missing"):
        load_run(copy)
    with pytest.raises(RunFolderError, match="no finished training run under"):
        find_run(runs, "latest")
    with pytest.raises(RunFolderError, match=r"no training run 'abc' under .*runs there: "):
        find_run(runs, "abc")
    with pytest.raises(RunFolderError, match="does not exist"):
        load_run(runs / "train-gone")


def test_other_extractors_than_the_runs_are_refused(made):
    with pytest.raises(ExtractorMismatchError) as err:
        _opened(made, "faces.size=48")
    message = str(err.value)
    assert "visual: run " in message and "settings.yaml" in message
    assert "acoustic" not in message  # only what differs is named
