"""The attention-fusion challenge baseline."""

from __future__ import annotations

import torch

from models.baseline import BaselineConfig, BaselineNet

DIMS = {"visual": 24, "acoustic": 32, "text": 40}


def model() -> BaselineNet:
    torch.manual_seed(0)
    return BaselineNet(BaselineConfig(dims=DIMS, hidden=16)).eval()


def inputs(n: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    feats = {m: torch.randn(n, d, generator=g) for m, d in DIMS.items()}
    return feats, {m: torch.ones(n, dtype=torch.bool) for m in DIMS}


def test_eval_output_of_a_sample_does_not_depend_on_its_batch() -> None:
    net = model()
    feats, present = inputs(9)
    with torch.no_grad():
        alone = net({m: v[4:5] for m, v in feats.items()}, {m: v[4:5] for m, v in present.items()})
        batch = net(feats, present)
    assert batch.shape == (9, 6)
    assert torch.allclose(alone[0], batch[4], atol=1e-6)


def test_missing_modality_gets_no_attention_and_is_never_read() -> None:
    net = model()
    feats, present = inputs(3)
    present["text"][1] = False
    with torch.no_grad():
        ref = net(feats, present)
        feats["text"][1] = float("nan")
        out = net(feats, present)
        feats["text"][1] = 1000.0
        big = net(feats, present)
    assert torch.equal(ref, out) and torch.equal(ref, big)
    # Without its modality the row's output differs from the all-present one.
    all_present = net(feats, {m: torch.ones(3, dtype=torch.bool) for m in DIMS})
    assert not torch.allclose(all_present[1], ref[1])
