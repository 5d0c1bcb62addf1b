"""`merflow robustness` on the session's trained run (tasks/training/robustness.py,
flows/robustness.py):
the clean level gives back the run's fold WAF exactly, each fold's model is scored on its own
validation videos only, corrupted features are rows of their own made once (a second invocation
computes nothing), and the report's table, plot and files are written."""

from __future__ import annotations

import json

import numpy as np
import pytest

from data_contracts import tables
from data_contracts.store import Store
from tasks.training import robustness
from tasks.training.folds import read_run_folds
from tests.tasks.predict_run import predict_run

pytestmark = pytest.mark.server  # the run is made by the real extract and train flows

LEVELS = ["noise:10", "blur:2"]


@pytest.fixture(scope="module")
def made(prefect_server, small_corpus, tiny_models, tmp_path_factory):
    return predict_run(small_corpus, tiny_models, tmp_path_factory)


@pytest.fixture(scope="module")
def scored(made, monkeypatch_module):
    """The robustness flow run twice; every scored batch of video ids, per fold model."""
    from flows.robustness import robustness_flow

    seen: list[tuple[int, list[str], dict]] = []
    real = robustness.score_fold

    def spy(store, run, plan, k, videos):
        seen.append((k, videos.video_id.tolist(), plan.feature_tables()))
        return real(store, run, plan, k, videos)

    monkeypatch_module.setattr(robustness, "score_fold", spy)
    args = dict(data_root=str(made.root), profile="demo", overrides=made.overrides, levels=LEVELS)
    first = robustness_flow(**args)
    second = robustness_flow(**args)
    return first, second, seen


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_the_clean_level_is_the_runs_own_fold_waf(made, scored):
    first, _, _ = scored
    clean = first["levels"][0]
    assert clean["level"] == "clean" and first["clean_matches_run"]
    assert [f["voted"]["waf"] for f in clean["folds"]] == made.report["fold_waf"]
    rows = made.report["rows"]
    for c in ("A", "V", "T", "F"):  # each classifier as the training report scored it
        np.testing.assert_allclose(
            [f[c]["waf"] for f in clean["folds"]], rows[c]["folds"], atol=1e-12
        )
    assert [s["level"] for s in first["levels"]] == ["clean", "blur:2", "noise:10"]


def test_each_fold_scores_its_own_validation_videos_only(made, scored):
    _, _, seen = scored
    folds = read_run_folds(made.run_dir).folds
    store = Store(made.root)
    labelled = set(store.read(tables.LABELS).video_id)
    assert len(seen) == 2 * 3 * 2  # two invocations x three levels x two folds
    for k, ids, _ in seen:
        assert ids and all(folds[v] == k for v in ids)  # never a video fold k trained on
        assert set(ids) == {v for v, f in folds.items() if f == k}
    # corrupted features exist for the labelled videos only, never the unlabelled pool
    clean = {t.name for t in seen[0][2].values()}  # the clean level is scored first
    corrupted = {t.name: t for *_, ts in seen for t in ts.values() if t.name not in clean}
    assert len(corrupted) == 3  # acoustic and text (noisy audio), visual (blurred faces)
    for t in corrupted.values():
        ids = set(store.read(t).video_id)
        assert ids and ids <= labelled, (t.name, scored[0]["extracted"])


def test_a_second_invocation_reuses_every_stored_feature(scored):
    first, second, _ = scored
    assert any(n for lv in first["extracted"].values() for n in lv.values())
    assert all(n == 0 for lv in second["extracted"].values() for n in lv.values())
    assert second["levels"] == first["levels"]


def test_noise_changes_what_the_acoustic_classifier_sees(scored):
    first, _, _ = scored
    by = {s["level"]: s for s in first["levels"]}
    assert by["noise:10"]["extractor_ids"]["acoustic"] != by["clean"]["extractor_ids"]["acoustic"]
    assert by["noise:10"]["extractor_ids"]["visual"] == by["clean"]["extractor_ids"]["visual"]
    assert by["blur:2"]["extractor_ids"]["visual"] != by["clean"]["extractor_ids"]["visual"]
    assert by["blur:2"]["extractor_ids"]["acoustic"] == by["clean"]["extractor_ids"]["acoustic"]
    # The corpus ships transcripts: noise leaves what was said, so T scores as on clean text
    # (its features re-embedded under the level's ids from the same official text).
    assert by["noise:10"]["extractor_ids"]["text"] != by["clean"]["extractor_ids"]["text"]
    assert by["noise:10"]["mean"]["T"] == by["clean"]["mean"]["T"]


def test_the_report_files_are_written(made, scored):
    first, _, _ = scored
    folder = made.run_dir / "robustness"
    for name in ("robustness.json", "robustness.md", "robustness.csv", "robustness.png"):
        assert (folder / name).stat().st_size > 0
    assert json.loads((folder / "robustness.json").read_text())["run_key"] == first["run_key"]
    md = (folder / "robustness.md").read_text()
    assert "| noise 10 dB SNR |" in md and "| blur 2 px sigma |" in md
    assert "reproduces the run's fold WAF exactly" in md
