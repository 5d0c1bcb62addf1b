"""Run by tests/models/test_distributed.py: a short MR-CCL recipe on seeded synthetic features,
either as a plain process (world of one) or under torchrun (DDP). Rank 0 saves what it learnt.

    python tests/models/ddp_worker.py OUT [--stochastic]
    python -m torch.distributed.run --standalone --nproc-per-node 2 \
        tests/models/ddp_worker.py OUT [--stochastic]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from data_contracts.labels import MODALITIES, NUM_CLASSES
from models.baseline import BaselineConfig, BaselineNet
from models.distributed import init_from_env, shutdown, world
from models.featureset import FeatureSet
from models.losses import baseline_loss, fine_tune_loss, pretrain_loss
from models.mrccl import MRCCL, MRCCLConfig
from models.training import TrainConfig, fit, predict

DIMS = {"visual": 24, "acoustic": 32, "text": 40}


def synthetic(n: int, seed: int, labelled: bool) -> FeatureSet:
    """Class-dependent Gaussian features with some modalities missing (odd n: uneven shards)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, NUM_CLASSES, n)
    centres = {m: rng.normal(size=(NUM_CLASSES, d)) for m, d in DIMS.items()}
    features = {
        m: (centres[m][labels] + rng.normal(scale=1.5, size=(n, d))).astype(np.float32)
        for m, d in DIMS.items()
    }
    present = {m: rng.random(n) > 0.15 for m in MODALITIES}
    present["visual"] |= ~(present["acoustic"] | present["text"])  # every row has something
    return FeatureSet(
        video_ids=np.array([f"v{seed}_{i:04d}" for i in range(n)]),
        features=features,
        present=present,
        labels=labels if labelled else np.full(n, -1),
    )


def main(out: Path, stochastic: bool) -> None:
    if "RANK" in __import__("os").environ:
        init_from_env("gloo", "cpu")
    w = world()
    torch.set_num_threads(1)
    train, val = synthetic(37, 1, True), synthetic(19, 2, True)
    pool = FeatureSet.concat([train.with_labels(np.full(37, -1)), synthetic(29, 3, False)])
    dropout = 0.1 if stochastic else 0.0
    cfg = MRCCLConfig(
        dims=DIMS, n_tokens=2, hidden=16, n_layers=1, n_heads=2, dropout=dropout,
        use_nee=stochastic,
    )  # fmt: skip
    tc = TrainConfig(lr=1e-3, batch_size=8, max_epochs=2, patience=5, seed=3)
    torch.manual_seed(0)
    model = MRCCL(cfg)
    pre = fit(model, pool, tc, pretrain_loss, "pretrain", epochs=2).history
    tuned = fit(model, train, tc, fine_tune_loss, "fine-tune", stop=val)
    torch.manual_seed(1)
    base = BaselineNet(BaselineConfig(dims=DIMS, hidden=16, dropout=dropout))
    fitb = fit(base, train, tc, baseline_loss, "baseline", stop=val)
    probs = predict(model, pool, batch_size=16)["voted"]
    if w.main:
        out.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.cpu() for k, v in model.state_dict().items()}, out / "mrccl.pt")
        torch.save({k: v.cpu() for k, v in base.state_dict().items()}, out / "baseline.pt")
        np.save(out / "probs.npy", probs)
        history = {"pretrain": pre, "fine_tune": tuned.history, "baseline": fitb.history}
        (out / "history.json").write_text(json.dumps({"world": w.size, **history}))
    shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]), "--stochastic" in sys.argv[2:])
