"""One training step's losses pinned to the values the code gave before the step was optimised
(commit 3867a25, recorded with this file's own settings), so a speed-up cannot change what is
learnt.

Each case: a seeded tiny MR-CCL network (the paper's architecture: 2 layers, NEE on), a fixed
batch with missing modalities and an oversampled copy, torch's global stream seeded (dropout,
NEE noise); the loss of the first step, one Adam step, the loss of the second step. The second
loss pins the gradients too.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.featureset import FeatureSet, to_tensors
from models.losses import fine_tune_loss, pretrain_loss
from models.mrccl import MRCCL, mrccl_config
from tests.models.synthetic import DIMS, make_featureset

LOSSES = {"pretrain": pretrain_loss, "fine-tune": fine_tune_loss}


def batch() -> FeatureSet:
    data = make_featureset(24, seed=3, missing=0.2)
    return data.subset(np.r_[np.arange(24), [5, 5]])  # two copies of row 5: one group


# The tiny preset (2 heads, 4 tokens, hidden 32) and the paper's shape at hidden 64 (4 heads,
# 8 tokens, feed-forward 4x).
PRESETS = {"tiny": {}, "paper": {"hidden": 64}}


def two_steps(loss_name: str, dropout: float, preset: str = "tiny") -> tuple[float, float]:
    torch.manual_seed(0)
    cfg = mrccl_config(preset, dims=DIMS, dropout=dropout, **PRESETS[preset])
    model = MRCCL(cfg).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    tensors = to_tensors(batch())
    losses = []
    for _ in range(2):
        loss, _ = LOSSES[loss_name](model, tensors, tensors)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses[0], losses[1]


# (preset, loss, dropout) -> (first step's loss, second step's loss), at commit 3867a25.
PINNED = {
    ("tiny", "fine-tune", 0.0): (15.70955753326416, 15.900029182434082),
    ("tiny", "pretrain", 0.0): (12.1529541015625, 12.361577987670898),
    ("tiny", "fine-tune", 0.1): (15.455306053161621, 14.332623481750488),
    ("tiny", "pretrain", 0.1): (11.902571678161621, 10.787293434143066),
    ("paper", "fine-tune", 0.0): (14.720264434814453, 11.576984405517578),
    ("paper", "pretrain", 0.0): (11.181472778320312, 8.082839012145996),
    ("paper", "fine-tune", 0.1): (13.943327903747559, 11.891596794128418),
    ("paper", "pretrain", 0.1): (10.397336959838867, 8.393122673034668),
}


@pytest.mark.parametrize(("preset", "loss_name", "dropout"), sorted(PINNED))
def test_step_losses_as_before(preset: str, loss_name: str, dropout: float) -> None:
    got = two_steps(loss_name, dropout, preset)
    assert got == pytest.approx(PINNED[preset, loss_name, dropout], rel=1e-5)
