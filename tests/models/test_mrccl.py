"""The MR-CCL network: per-sample attention, missing modalities, config checks."""

from __future__ import annotations

import pytest
import torch

from models.mrccl import MRCCL, MRCCLConfig, mrccl_config

DIMS = {"visual": 24, "acoustic": 32, "text": 40}


def inputs(n: int, seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    feats = {m: torch.randn(n, d, generator=g) * 3 + 1 for m, d in DIMS.items()}
    present = {m: torch.ones(n, dtype=torch.bool) for m in DIMS}
    return feats, present


def tiny(**overrides: object) -> MRCCL:
    torch.manual_seed(0)
    return MRCCL(mrccl_config("tiny", dims=DIMS, **overrides)).eval()


def test_shapes_and_contrastive_terms() -> None:
    model = tiny()
    feats, present = inputs(6)
    out = model(feats, present)
    assert set(out.logits) == {"A", "V", "T", "F"}
    assert all(v.shape == (6, 6) for v in out.logits.values())
    assert out.l_intra.item() > 0 and out.l_imc.item() > 0
    assert len(out.terms) == 9  # 3 intra + 3 pairs + 3 one-vs-two
    out.l_intra.backward()  # the losses reach the parameters
    assert model.specific["text"].tokenize_weight.grad is not None


def test_eval_output_of_a_sample_does_not_depend_on_its_batch() -> None:
    model = tiny()
    feats, present = inputs(7)
    with torch.no_grad():
        alone = model(
            {m: v[:1] for m, v in feats.items()},
            {m: v[:1] for m, v in present.items()},
            with_contrastive=False,
        )
        batch = model(feats, present, with_contrastive=False)
        other = {m: v.clone() for m, v in feats.items()}
        for v in other.values():
            v[1:] = torch.randn_like(v[1:]) * 10  # change everybody else
        changed = model(other, present, with_contrastive=False)
    for c in "AVTF":
        assert torch.allclose(alone.logits[c][0], batch.logits[c][0], atol=1e-5)
        assert torch.equal(batch.logits[c][0], changed.logits[c][0])


def test_a_missing_modality_is_masked_everywhere() -> None:
    model = tiny(dropout=0.0)
    feats, present = inputs(5)
    present["visual"][2] = False
    with torch.no_grad():
        ref = model(feats, present)
        feats["visual"][2] = float("nan")  # a placeholder must never be read
        out = model(feats, present)
    assert torch.isfinite(out.logits["F"]).all() and torch.isfinite(out.l_imc)
    assert torch.equal(ref.logits["F"], out.logits["F"])
    assert out.presence["V"].tolist() == [True, True, False, True, True]
    assert out.presence["F"].all()


def test_without_nee_there_is_no_intra_term() -> None:
    model = tiny(use_nee=False)
    out = model(*inputs(4))
    assert out.l_intra.item() == 0.0 and "intra-visual" not in out.terms
    assert model.nee is None


def test_vote_is_a_distribution() -> None:
    model = tiny()
    with torch.no_grad():
        out = model(*inputs(3), with_contrastive=False)
    assert torch.allclose(model.vote(out).sum(-1), torch.ones(3))


def test_config_errors_name_the_way_out() -> None:
    with pytest.raises(ValueError, match="not divisible by n_heads"):
        MRCCLConfig(hidden=30, n_heads=4)
    with pytest.raises(ValueError, match="valid presets"):
        mrccl_config("huge")
    with pytest.raises(ValueError, match="unknown keys \\['hiden'\\]"):
        MRCCLConfig.from_dict({"hiden": 3})
    with pytest.raises(TypeError, match="hidden must be"):
        MRCCLConfig.from_dict({"hidden": "32"})
    with pytest.raises(ValueError, match="valid: linear, scaled_linear"):
        MRCCLConfig(nee_schedule="cosine")


def test_paper_preset_has_the_paper_dims() -> None:
    cfg = mrccl_config("paper")
    assert cfg.dims == {"visual": 768, "acoustic": 1024, "text": 5120}
    assert cfg.voting_weights == {"A": 0.7, "V": 0.5, "T": 0.4, "F": 0.7}
