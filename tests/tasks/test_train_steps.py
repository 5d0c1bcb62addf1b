"""The steps of a training run (freeze, pretrain, fold k, report) on in-memory features: the
same functions the train flow and torchrun ranks run."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

import models.recipe as recipe_module
from data_contracts.labels import MODALITIES
from models.baseline import BaselineConfig
from models.featureset import FeatureSet
from models.mrccl import mrccl_config
from tasks.training.data import TrainingData
from tasks.training.folds import read_run_folds
from tasks.training.report import report_markdown, train_in_process
from tasks.training.steps import load_fold
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
    real = recipe_module.fit

    def spy(model, train, cfg, loss, stage, epochs=None, **early):
        if stage == "fine-tune":
            seen.append((train, early.get("stop")))
        return real(model, train, cfg, loss, stage, epochs, **early)

    monkeypatch.setattr(recipe_module, "fit", spy)
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
    assert {"majority", "class_prior", "A", "V", "T", "F", "step1", "voted"} <= set(rows)
    assert {"baseline", "baseline_oversampled"} <= set(rows)
    assert rows["voted"]["folds"] == report["fold_waf"]
    _, arrays = load_fold(tmp_path / "a" / "fold-0")
    assert arrays["test_voted"].shape == (90, 6)
    assert np.allclose(arrays["test_voted"].sum(1), 1.0, atol=1e-5)
    assert not set(arrays["stop_index"]) & set(arrays["val_index"])
    md = (tmp_path / "a" / "report" / "report.md").read_text()
    assert "reference: guess by class mix" in md and "MR-CCL fused classifier F" in md
    assert "chosen on rows held out" in md  # the report says how epochs were chosen
    fixed = report_markdown({**report, "settings": {**report["settings"], "inner_val_fraction": 0}})
    assert "no early stopping" in fixed and "chosen on rows held out" not in fixed
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
    # No oversampling: merflow's oversampled baseline would be the paper's, so it is not trained.
    twice = not {"use_pseudo_labels", "use_oversampling"} & set(switch)
    assert ("baseline_oversampled" in report["rows"]) == twice
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


def _stage_sets(monkeypatch: pytest.MonkeyPatch) -> dict[str, list]:
    """What the recipe's stages train on: (training set, config) of each fine-tuning and
    baseline stage, in order."""
    seen: dict[str, list] = {"fine_tune": [], "train_baseline": []}
    key = {"fine-tune": "fine_tune", "baseline": "train_baseline"}
    real = recipe_module.fit

    def spy(model, train, cfg, loss, stage, epochs=None, **early):
        if stage in key:
            seen[key[stage]].append((train, cfg))
        return real(model, train, cfg, loss, stage, epochs, **early)

    monkeypatch.setattr(recipe_module, "fit", spy)
    return seen


def _counts(fs: FeatureSet) -> np.ndarray:
    return np.bincount(fs.labels, minlength=6)


def test_without_pseudo_labels_step_2_still_runs_at_its_rate_and_targets(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The paper's "w/o pseudo labels" keeps the rest of the recipe: step 2 continues from
    step 1 at lr_step2 on the labelled fit rows oversampled to the step-2 targets."""
    labelled = make_featureset(48, seed=7)
    unlabelled = make_featureset(30, seed=8, labelled=False)
    recipe = small_recipe(use_pseudo_labels=False)
    seen = _stage_sets(monkeypatch)
    train_in_process(tmp_path, _data(labelled, unlabelled), recipe)
    assert not seen["train_baseline"]  # no baseline: nothing to make pseudo labels with
    assert len(seen["fine_tune"]) == 4  # 2 folds x (step 1, step 2)
    for k in range(2):
        (step1, cfg1), (step2, cfg2) = seen["fine_tune"][2 * k : 2 * k + 2]
        assert (cfg1.lr, cfg2.lr) == (recipe.train.lr, recipe.lr_step2)
        assert set(step2.video_ids) == set(step1.video_ids)  # the same videos, no pseudo rows
        assert list(_counts(step1)[3:]) == [34, 34, 34] and list(_counts(step2)[3:]) == [40] * 3
        summary, _ = load_fold(tmp_path / f"fold-{k}")
        stages = summary["stages"]
        assert set(stages) == {"step1", "step2"} and "step2" in summary["history"]
        assert stages["step2"]["lr"] == recipe.lr_step2 and stages["step2"]["pseudo_rows"] == 0
        assert stages["step2"]["rows"] == len(step2) and stages["step2"]["copies"] > 0
        assert sum(summary["pseudo_counts"].values()) == 0


def test_the_papers_baseline_sees_no_oversampled_rows(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The paper's baseline (Table 1's 79.31 is Table 3's row without oversampling) trains on
    the fold's labelled fit rows as they are; merflow's oversampled one on step 1's rows."""
    labelled = make_featureset(60, seed=5, missing=0.1)
    unlabelled = make_featureset(90, seed=6, labelled=False, missing=0.1)
    seen = _stage_sets(monkeypatch)
    report = train_in_process(tmp_path, _data(labelled, unlabelled), small_recipe())
    assert len(seen["train_baseline"]) == 2 * 2  # 2 folds x (paper's, oversampled)
    for k in range(2):
        (paper, _), (oversampled, _) = seen["train_baseline"][2 * k : 2 * k + 2]
        step1, _ = seen["fine_tune"][2 * k]
        assert len(np.unique(paper.video_ids)) == len(paper)  # not one copy
        assert set(paper.video_ids) == set(step1.video_ids)  # the same videos, each once
        assert oversampled.video_ids.tolist() == step1.video_ids.tolist()
        summary, arrays = load_fold(tmp_path / f"fold-{k}")
        stages = summary["stages"]
        assert stages["baseline"]["copies"] == 0 and stages["baseline_oversampled"]["copies"] > 0
        # Step 2: the pseudo-labelled videos (with their oversampled copies) at lr_step2.
        step2, cfg2 = seen["fine_tune"][2 * k + 1]
        pseudo_ids = unlabelled.video_ids[arrays["pseudo_index"]]
        assert stages["step2"]["pseudo_rows"] == np.isin(step2.video_ids, pseudo_ids).sum()
        assert stages["step2"]["lr"] == cfg2.lr == small_recipe().lr_step2
    assert sum(sum(c.values()) for c in report["pseudo_counts"]) > 0
    assert report["baseline_mean_waf"] is not None
    assert report["baseline_oversampled_mean_waf"] is not None
    md = (tmp_path / "report" / "report.md").read_text()
    assert "baseline, no oversampling (the paper's" in md and "(merflow's row)" in md


def test_a_changed_recipe_changes_the_run_and_pretraining_keys(monkeypatch) -> None:
    """Old finished runs are never reused for a recipe that trains differently: the recipe's
    version is in both keys; pretraining's key follows what pretraining reads and nothing else."""
    from models.settings import TrainSettings
    from tasks.training import steps as train_module

    data = _data(make_featureset(24, seed=1), make_featureset(12, seed=2, labelled=False))
    ts = TrainSettings()
    recipe = small_recipe()
    run, pre = train_module.run_key("data", ts, recipe), train_module.pretrain_key(data, recipe)
    monkeypatch.setattr(train_module, "RECIPE_VERSION", 1)
    assert train_module.run_key("data", ts, recipe) != run
    assert train_module.pretrain_key(data, recipe) != pre
    monkeypatch.undo()
    for changed in (
        small_recipe(inner_val_fraction=0.3),  # the held-out rows that early-stop it
        small_recipe(pretrain_epochs=5),
        small_recipe(train=dataclasses.replace(recipe.train, patience=2)),
    ):
        assert train_module.pretrain_key(data, changed) != pre
    for same in (small_recipe(use_pseudo_labels=False), small_recipe(oversampled_baseline=False)):
        assert train_module.pretrain_key(data, same) == pre
    assert train_module.run_key("data", ts.model_copy(update={"oversampled_baseline": False}),
                                recipe) != run  # fmt: skip
