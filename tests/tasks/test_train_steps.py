"""The steps of a training run (freeze, pretrain, fold k, report) on in-memory features: the
same functions the train flow and torchrun ranks run."""

from __future__ import annotations

import json

import numpy as np
import pytest

import models.recipe as recipe_module
from data_contracts.labels import MODALITIES
from models.baseline import BaselineConfig
from models.featureset import FeatureSet
from models.mrccl import mrccl_config
from tasks.folds import read_run_folds
from tasks.train import load_fold, train_in_process
from tasks.train_data import TrainingData
from tests.models.synthetic import DIMS, make_featureset
from tests.models.test_training import small_recipe

pytestmark = pytest.mark.usefixtures("one_thread")


def _data(labelled: FeatureSet, unlabelled: FeatureSet) -> TrainingData:
    return TrainingData(
        labelled=labelled,
        unlabelled=unlabelled,
        extractor_ids={m: f"{m}-synthetic" for m in MODALITIES},
    )


def test_a_run_keeps_pseudo_labels_and_early_stopping_rows_out_of_validation(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    labelled = make_featureset(60, seed=5, missing=0.1)
    unlabelled = make_featureset(90, seed=6, labelled=False, missing=0.1)
    seen: list[tuple[FeatureSet, FeatureSet | None]] = []
    real = recipe_module.fine_tune

    def spy(model, train, stop, cfg):
        seen.append((train, stop))
        return real(model, train, stop, cfg)

    monkeypatch.setattr(recipe_module, "fine_tune", spy)
    report = train_in_process(tmp_path / "a", _data(labelled, unlabelled), small_recipe())
    assert len(seen) == 4  # 2 folds x (step 1, step 2)
    folds = read_run_folds(tmp_path / "a")
    assert folds is not None and folds.n_splits == 2 and len(folds.folds) == 60
    unlabelled_ids = set(unlabelled.video_ids)
    for i, (train, stop) in enumerate(seen):
        val_ids = {v for v, k in folds.folds.items() if k == i // 2}
        assert stop is not None and not set(stop.video_ids) & val_ids  # epochs chosen apart
        assert not set(stop.video_ids) & set(train.video_ids)
        assert not set(train.video_ids) & val_ids
        assert not set(stop.video_ids) & unlabelled_ids  # early stopping: labelled rows only
    assert set(seen[1][0].video_ids) & unlabelled_ids  # pseudo labels did join step 2
    assert sum(report["pseudo_counts"][0].values()) > 0
    assert len(report["fold_waf"]) == 2 and np.array(report["confusion"]).sum() == 60
    rows = report["rows"]
    assert {"majority", "class_prior", "A", "V", "T", "F", "baseline", "step1", "voted"} <= set(
        rows
    )
    assert rows["voted"]["folds"] == report["fold_waf"]
    _, arrays = load_fold(tmp_path / "a" / "fold-0")
    assert arrays["test_voted"].shape == (90, 6)
    assert np.allclose(arrays["test_voted"].sum(1), 1.0, atol=1e-5)
    assert not set(arrays["stop_index"]) & set(arrays["val_index"])
    md = (tmp_path / "a" / "report" / "report.md").read_text()
    assert "reference: guess by class mix" in md and "MR-CCL fused classifier F" in md
    monkeypatch.undo()
    again = train_in_process(tmp_path / "b", _data(labelled, unlabelled), small_recipe())
    assert again["fold_waf"] == report["fold_waf"]
    _, arrays_b = load_fold(tmp_path / "b" / "fold-0")
    assert np.array_equal(arrays_b["test_voted"], arrays["test_voted"])


@pytest.mark.parametrize(
    "switch",
    [
        {"use_pretraining": False},
        {"use_pseudo_labels": False},
        {"use_oversampling": False},
        {"model": mrccl_config("tiny", dims=DIMS, n_layers=1, use_nee=False)},
        {"inner_val_fraction": 0.0},
    ],
    ids=["no-pretraining", "no-pseudo-labels", "no-oversampling", "no-nee", "fixed-epochs"],
)
def test_each_ablation_is_a_switch(tmp_path, switch: dict) -> None:
    labelled = make_featureset(48, seed=7)
    unlabelled = make_featureset(30, seed=8, labelled=False)
    report = train_in_process(tmp_path, _data(labelled, unlabelled), small_recipe(**switch))
    assert len(report["fold_waf"]) == 2
    pseudo = sum(sum(counts.values()) for counts in report["pseudo_counts"])
    assert (pseudo == 0) == ("use_pseudo_labels" in switch)
    assert ("baseline" in report["rows"]) == ("use_pseudo_labels" not in switch)
    pretrain = json.loads((tmp_path / "pretrain" / "done.json").read_text())
    assert (not pretrain["history"]) == ("use_pretraining" in switch)


def test_input_checks(tmp_path) -> None:
    labelled = make_featureset(48, seed=9)
    empty = make_featureset(0, seed=1, labelled=False)
    with pytest.raises(ValueError, match=r"cannot make 20 folds|fewer labelled rows than n_splits"):
        train_in_process(tmp_path / "a", _data(labelled, empty), small_recipe(n_splits=20))
    with pytest.raises(ValueError, match="differ from the features' dims"):
        train_in_process(
            tmp_path / "b",
            _data(labelled, empty),
            small_recipe(baseline=BaselineConfig(hidden=8)),
        )
    with pytest.raises(ValueError, match="unlabelled set holds labelled rows"):
        train_in_process(tmp_path / "c", _data(labelled, labelled), small_recipe())


def test_shuffled_labels_report_chance_not_an_optimistic_figure(tmp_path) -> None:
    """Features that carry no label: the reported fold WAF must sit at the class-mix reference.
    When early stopping chose the epoch on the validation fold itself, the reported figure
    was the best of many epochs on those rows, systematically above chance."""
    gaps = []
    for seed in range(3):
        rng = np.random.default_rng(seed)
        labelled = make_featureset(90, seed=20 + seed, noise=1.0)
        noise = labelled.with_labels(rng.permutation(labelled.labels))
        recipe = small_recipe(
            use_pseudo_labels=False,
            use_pretraining=False,
            n_splits=3,
            final_epochs=12,
            train=small_recipe().train.__class__(
                lr=3e-3, batch_size=32, max_epochs=12, patience=3, seed=seed
            ),
        )
        empty = make_featureset(0, seed=1, labelled=False)
        report = train_in_process(tmp_path / str(seed), _data(noise, empty), recipe)
        gaps.append(report["mean_waf"] - report["rows"]["class_prior"]["mean"])
    assert np.mean(gaps) < 0.05, gaps
