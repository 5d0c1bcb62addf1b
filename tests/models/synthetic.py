"""Seeded synthetic feature sets for the model tests (imported as tests.models.synthetic)."""

from __future__ import annotations

import functools

import numpy as np

from models.featureset import FeatureSet
from models.losses import baseline_loss, fine_tune_loss, pretrain_loss
from models.training import FitResult, TrainConfig, fit

DIMS = {"visual": 24, "acoustic": 32, "text": 40}


def make_featureset(
    n: int,
    seed: int = 0,
    noise: float = 1.0,
    labelled: bool = True,
    missing: float = 0.0,
    proto_seed: int = 123,
) -> FeatureSet:
    """n videos whose features are a class prototype (fixed by proto_seed) plus Gaussian noise."""
    protos = np.random.default_rng(proto_seed)
    means = {m: protos.normal(size=(6, d)) for m, d in DIMS.items()}
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 6  # balanced, every class present
    rng.shuffle(y)
    features = {
        m: (means[m][y] + noise * rng.normal(size=(n, d))).astype(np.float32)
        for m, d in DIMS.items()
    }
    present = {m: rng.random(n) >= missing for m in DIMS}
    present["acoustic"] |= ~(present["visual"] | present["text"])  # never a row with nothing
    return FeatureSet(
        video_ids=np.array([f"sample_{seed:02d}_{i:05d}" for i in range(n)]),
        features=features,
        present=present,
        labels=y if labelled else np.full(n, -1),
    )


# The recipe's three stages as models/recipe.py runs them through the one loop (models/training.py).
def pretrain(model, data: FeatureSet, cfg: TrainConfig, epochs: int, held_out=None) -> list:
    return fit(model, data, cfg, pretrain_loss, "pretrain", epochs, held_out=held_out).history


def fine_tune(model, train: FeatureSet, stop: FeatureSet | None, cfg: TrainConfig) -> FitResult:
    loss = functools.partial(fine_tune_loss, lambda_con=cfg.lambda_con)
    return fit(model, train, cfg, loss, "fine-tune", stop=stop)


def train_baseline(
    model, train: FeatureSet, stop: FeatureSet | None, cfg: TrainConfig
) -> FitResult:
    return fit(model, train, cfg, baseline_loss, "baseline", stop=stop)
