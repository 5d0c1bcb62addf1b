"""Seeded synthetic feature sets for the model tests (imported as tests.models.synthetic)."""

from __future__ import annotations

import numpy as np

from models.featureset import FeatureSet

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
