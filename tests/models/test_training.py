"""The training engine: it learns, it does not learn noise, it is deterministic, the recipe runs."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from models import epoch_reports, training
from models.baseline import BaselineConfig, BaselineNet
from models.metrics import reference_wafs, waf
from models.mrccl import MRCCL, mrccl_config
from models.recipe import RecipeConfig, early_stopping_split, pretraining_held_out
from models.training import TrainConfig, predict
from tests.models.synthetic import DIMS, fine_tune, make_featureset, pretrain, train_baseline

FAST = TrainConfig(lr=3e-3, batch_size=32, max_epochs=12, patience=12, seed=0)


pytestmark = pytest.mark.usefixtures("one_thread")


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


def test_pretraining_stops_on_the_held_out_loss_and_keeps_the_best_state() -> None:
    """Early stopping of pretraining (docs/method.md §7): the held-out rows' contrastive loss
    chooses the epoch; patience epochs without a lower one end it; the best state stays."""
    data = make_featureset(96, seed=4, labelled=False)
    held = pretraining_held_out(len(data), 0.25, seed=0)
    assert held is not None and len(held) == 24 and len(np.unique(held)) == 24
    assert pretraining_held_out(len(data), 0.0, seed=0) is None
    assert pretraining_held_out(6, 0.1, seed=0) is None  # fewer than two rows to hold out
    cfg = dataclasses.replace(FAST, lr=3e-2, patience=2)
    model = tiny_mrccl()
    history = pretrain(model, data, cfg, epochs=40, held_out=held)
    losses = [h["val_loss"] for h in history]
    best = int(np.argmin(losses))
    assert len(history) < 40, losses  # a learning rate this high stops improving early
    assert len(history) == best + 1 + cfg.patience
    tensors = training.to_tensors(data)
    val_loss = training._held_out_loss(model, tensors, held, cfg.batch_size, cfg.seed)
    assert val_loss == pytest.approx(losses[best])
    # The held-out rows are not trained on: the training batches hold the other 72 rows.
    seen: list[np.ndarray] = []
    real = training._split_batch

    def spy(data, idx, w):
        seen.append(idx)
        return real(data, idx, w)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(training, "_split_batch", spy)
        pretrain(tiny_mrccl(), data, cfg, epochs=1, held_out=held)
    trained = np.concatenate(seen)
    assert len(trained) == 72 and not set(trained) & set(held)


def small_recipe(**changes: object) -> RecipeConfig:
    """The recipe on tiny data: 2 folds, few epochs, minority classes oversampled to 34 rows."""
    cfg = RecipeConfig(
        train=dataclasses.replace(FAST, max_epochs=4),
        model=mrccl_config("tiny", dims=DIMS, n_layers=1),
        baseline=BaselineConfig(dims=DIMS, hidden=16),
        n_splits=2,
        pretrain_epochs=1,
        final_epochs=3,
        oversample_step1={"sad": 34, "worried": 34, "surprise": 34},
        oversample_step2={"sad": 40, "worried": 40, "surprise": 40},
        thresholds={c: 0.0 for c in ("neutral", "angry", "happy", "sad", "worried", "surprise")},
    )
    return dataclasses.replace(cfg, **changes)


def test_without_an_early_stopping_set_every_epoch_runs_and_the_last_state_stays() -> None:
    train = make_featureset(60, seed=1)
    model = tiny_mrccl()
    fit = fine_tune(model, train, None, dataclasses.replace(FAST, max_epochs=3, patience=1))
    assert [h["epoch"] for h in fit.history] == [1, 2, 3]
    assert fit.best_epoch == 3 and fit.best_val_waf is None
    assert "val_waf" not in fit.history[0]


def test_early_stopping_rows_are_stratified_and_apart() -> None:
    labels = np.repeat(np.arange(6), [20, 20, 10, 10, 4, 1])
    fit, stop = early_stopping_split(labels, 0.15, seed=3)
    assert not set(fit) & set(stop) and len(fit) + len(stop) == len(labels)
    held = np.bincount(labels[stop], minlength=6)
    assert held.tolist() == [3, 3, 2, 2, 1, 0]  # at least one of a class that has two or more
    again, _ = early_stopping_split(labels, 0.15, seed=3)
    assert np.array_equal(again, fit)
    none_fit, none_stop = early_stopping_split(labels, 0.0, seed=3)
    assert len(none_stop) == 0 and len(none_fit) == len(labels)


def test_reference_wafs() -> None:
    train = np.repeat(np.arange(6), [50, 20, 10, 10, 5, 5])
    val = np.repeat(np.arange(6), [10, 4, 2, 2, 1, 1])
    ref = reference_wafs(train, val)
    # All neutral: F1(neutral) = 2*10/(10+20) = 2/3, weighted by 10/20.
    assert ref["majority"] == pytest.approx(0.5 * 2 / 3)
    # Guessing with the validation rows' own mix gives sum of squared class shares.
    q = np.bincount(val, minlength=6) / len(val)
    assert ref["class_prior"] == pytest.approx(float((q**2).sum()), rel=0.05)


def test_long_epochs_log_progress_lines_with_batches_and_rows_per_second(caplog, monkeypatch):
    monkeypatch.setattr("models.epoch_reports.PROGRESS_EVERY_S", 0.0)  # a line after each batch
    data = make_featureset(100, seed=1)
    cfg = dataclasses.replace(FAST, batch_size=32)
    with caplog.at_level("INFO", logger="models.training"), epoch_reports.training_stage("pre"):
        pretrain(tiny_mrccl(), data, cfg, epochs=2)
    progress = [getattr(r, epoch_reports.PROGRESS_RECORD, None) for r in caplog.records]
    progress = [p for p in progress if p is not None]
    # 4 batches an epoch (32, 32, 32, 4 rows); the last one is the epoch's own report.
    assert [(p.epoch, p.batches, p.of, p.rows) for p in progress] == [
        (e, b, 4, 32 * b) for e in (1, 2) for b in (1, 2, 3)
    ]
    assert all(p.stage == "pre" and p.epochs == 2 and p.seconds > 0 for p in progress)
    line = next(r.getMessage() for r in caplog.records if hasattr(r, epoch_reports.PROGRESS_RECORD))
    assert line.startswith("pre: epoch 1/2 batch 1/4 (32 rows, ") and line.endswith(" rows/s)")
