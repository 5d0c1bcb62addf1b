"""The training engine: it learns, it does not learn noise, it is deterministic, the recipe runs."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np
import pytest
import torch

import models.training as training
from models.baseline import BaselineConfig, BaselineNet
from models.featureset import FeatureSet
from models.mrccl import MRCCL, mrccl_config
from models.training import (
    RecipeConfig,
    TrainConfig,
    cross_validate_baseline,
    fine_tune,
    predict,
    pretrain,
    run_self_training,
    train_baseline,
    waf,
)
from tests.models.synthetic import DIMS, make_featureset

FAST = TrainConfig(lr=3e-3, batch_size=32, max_epochs=12, patience=12, seed=0)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models gain nothing from a second thread, and on a busy 2-core machine it spins."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_mrccl(seed: int = 0) -> MRCCL:
    torch.manual_seed(seed)
    return MRCCL(mrccl_config("tiny", dims=DIMS, n_layers=1))


def test_fine_tune_learns_separable_data() -> None:
    train, val = make_featureset(180, seed=1, missing=0.1), make_featureset(90, seed=2, missing=0.1)
    model = tiny_mrccl()
    fit = fine_tune(model, train, val, FAST)
    assert fit.best_val_waf > 0.9
    probs = predict(model, val)
    assert set(probs) == {"A", "V", "T", "F", "voted"}
    assert waf(val.labels, probs["voted"].argmax(1)) == pytest.approx(fit.best_val_waf)
    assert [h["epoch"] for h in fit.history] == list(range(1, len(fit.history) + 1))


def test_shuffled_labels_are_not_learned() -> None:
    train, val = make_featureset(180, seed=1), make_featureset(90, seed=2)
    shuffled = train.with_labels(np.random.default_rng(0).permutation(train.labels))
    fit = fine_tune(tiny_mrccl(), shuffled, val, dataclasses.replace(FAST, patience=3))
    assert fit.best_val_waf < 0.45


def test_baseline_learns_separable_data() -> None:
    train, val = make_featureset(180, seed=1, missing=0.1), make_featureset(90, seed=2, missing=0.1)
    torch.manual_seed(0)
    model = BaselineNet(BaselineConfig(dims=DIMS, hidden=32, dropout=0.1))
    fit = train_baseline(model, train, val, FAST)
    assert fit.best_val_waf > 0.9
    assert set(predict(model, val)) == {"voted"}


def test_same_seed_same_result() -> None:
    train, val = make_featureset(60, seed=1), make_featureset(30, seed=2)
    cfg = dataclasses.replace(FAST, max_epochs=3)
    runs = []
    for _ in range(2):
        model = tiny_mrccl()
        pre = pretrain(model, make_featureset(60, seed=3, labelled=False), cfg, epochs=2)
        fit = fine_tune(model, train, val, cfg)
        runs.append((pre, fit.history, predict(model, val)["voted"]))
    assert runs[0][0] == runs[1][0] and runs[0][1] == runs[1][1]
    assert np.array_equal(runs[0][2], runs[1][2])
    other = fine_tune(tiny_mrccl(), train, val, dataclasses.replace(cfg, seed=1))
    assert other.history != runs[0][1]


def test_pretraining_lowers_the_contrastive_loss() -> None:
    history = pretrain(tiny_mrccl(), make_featureset(128, seed=4, labelled=False), FAST, epochs=6)
    assert history[-1]["loss"] < history[0]["loss"]
    assert {"l_intra", "l_imc"} <= set(history[0])


def small_recipe(**changes: object) -> RecipeConfig:
    cfg = RecipeConfig(
        train=dataclasses.replace(FAST, max_epochs=4),
        model=mrccl_config("tiny", dims=DIMS, n_layers=1),
        baseline=BaselineConfig(dims=DIMS, hidden=16),
        n_splits=2,
        pretrain_epochs=1,
        final_epochs=3,
        oversample_scale=0.04,  # 850 -> 34 rows per minority class
        thresholds={c: 0.0 for c in ("neutral", "angry", "happy", "sad", "worried", "surprise")},
    )
    return dataclasses.replace(cfg, **changes)


def test_recipe_runs_keeps_pseudo_labels_out_of_validation_and_is_deterministic(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    labelled = make_featureset(60, seed=5, missing=0.1)
    unlabelled = make_featureset(90, seed=6, labelled=False, missing=0.1)
    seen: list[tuple[FeatureSet, FeatureSet]] = []
    real = training.fine_tune

    def spy(model: MRCCL, train: FeatureSet, val: FeatureSet, cfg: TrainConfig) -> object:
        seen.append((train, val))
        return real(model, train, val, cfg)

    monkeypatch.setattr(training, "fine_tune", spy)
    result = run_self_training(labelled, unlabelled, small_recipe())
    assert len(seen) == 4  # 2 folds x (step 1, step 2)
    unlabelled_ids = set(unlabelled.video_ids)
    for train, val in seen:
        assert not set(val.video_ids) & unlabelled_ids  # validation: labelled rows only
        assert len(set(val.video_ids)) == len(val)  # and never oversampled
        assert not set(val.video_ids) & set(train.video_ids)
    step2_train = seen[1][0]
    assert set(step2_train.video_ids) & unlabelled_ids  # pseudo labels did join training
    assert sum(result.pseudo_counts[0].values()) > 0
    summary = result.summary()
    assert len(summary["fold_waf"]) == 2 and np.array(summary["confusion"]).sum() == 60
    assert result.test_probs.shape == (90, 6)
    assert np.allclose(result.test_probs.sum(1), 1.0, atol=1e-5)
    assert len(result.models) == 2 and len(result.pretrain_history) == 1
    monkeypatch.undo()
    again = run_self_training(labelled, unlabelled, small_recipe())
    assert again.fold_waf == result.fold_waf
    assert np.array_equal(again.test_probs, result.test_probs)


@pytest.mark.parametrize(
    "switch",
    [
        {"use_pretraining": False},
        {"use_pseudo_labels": False},
        {"use_oversampling": False},
        {"model": mrccl_config("tiny", dims=DIMS, n_layers=1, use_nee=False)},
    ],
    ids=["no-pretraining", "no-pseudo-labels", "no-oversampling", "no-nee"],
)
def test_each_ablation_is_a_switch(switch: dict) -> None:
    labelled = make_featureset(48, seed=7)
    unlabelled = make_featureset(30, seed=8, labelled=False)
    result = run_self_training(labelled, unlabelled, small_recipe(**switch))
    assert len(result.fold_waf) == 2
    assert (not result.pseudo_counts) == ("use_pseudo_labels" in switch)
    assert (not result.pretrain_history) == ("use_pretraining" in switch)


def test_baseline_cross_validation_and_input_checks() -> None:
    labelled = make_featureset(48, seed=9)
    result = cross_validate_baseline(labelled, small_recipe(), test=make_featureset(10, seed=1))
    assert len(result.fold_waf) == 2 and result.test_probs.shape == (10, 6)
    with pytest.raises(ValueError, match="every class has fewer labelled rows than n_splits=20"):
        cross_validate_baseline(labelled, small_recipe(n_splits=20))
    with pytest.raises(ValueError, match="differ from the features' dims"):
        cross_validate_baseline(labelled, small_recipe(baseline=BaselineConfig(hidden=8)))
    with pytest.raises(ValueError, match="unlabelled set holds labelled rows"):
        run_self_training(labelled, labelled, small_recipe())


def test_recipe_config_from_nested_mapping() -> None:
    cfg = RecipeConfig.from_dict(
        {"n_splits": 3, "train": {"lr": 0.01}, "model": {"hidden": 64, "n_heads": 4}}
    )
    assert cfg.n_splits == 3 and cfg.train.lr == 0.01 and cfg.model.hidden == 64
    with pytest.raises(ValueError, match="unknown keys \\['n_split'\\]"):
        RecipeConfig.from_dict({"n_split": 3})
