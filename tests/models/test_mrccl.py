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


def test_groups_reach_every_contrastive_term_and_distinct_groups_change_nothing() -> None:
    from models.contrastive import imcl_ae, imcl_ne

    model = tiny()
    n = 6
    feats, present = inputs(n, seed=3)
    for m in feats:  # rows 4 and 5 are oversampled copies of rows 1 and 0
        feats[m][4], feats[m][5] = feats[m][1], feats[m][0]
    present["text"][[0, 5]] = False  # a copy keeps its video's presence
    present["visual"][2] = False
    groups = torch.tensor([0, 1, 2, 3, 1, 0])
    reps = model.encode(feats, present, generator=torch.Generator().manual_seed(0))
    plain = model.heads(reps, present)
    same = model.heads(reps, present, groups=None)
    distinct = model.heads(reps, present, groups=torch.arange(n) * 7)
    grouped = model.heads(reps, present, groups=groups)
    assert set(grouped.terms) == set(plain.terms) and len(grouped.terms) == 9
    for name in plain.terms:
        assert torch.equal(same.terms[name], plain.terms[name])
        assert torch.allclose(distinct.terms[name], plain.terms[name], atol=1e-6)
    _, ne = imcl_ne(reps.specific, reps.noisy, present, model.temperatures, groups)
    _, ae = imcl_ae(reps.invariant, present, model.temperatures, model.projections, groups)
    for name, value in {**ne, **ae}.items():
        assert torch.allclose(grouped.terms[name], value)
    # The copies 1 and 4 have every modality, so every term holds a pair of copies and moves.
    for name in plain.terms:
        assert not torch.allclose(grouped.terms[name], plain.terms[name], atol=1e-6), name
    (grouped.l_intra + grouped.l_imc).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_forward_takes_groups_too() -> None:
    model = tiny(use_nee=False)
    feats, present = inputs(4, seed=4)
    for m in feats:
        feats[m][3] = feats[m][0]
    groups = torch.tensor([0, 1, 2, 0])
    with torch.no_grad():
        reps = model.encode(feats, present)
        via_heads = model.heads(reps, present, groups=groups)
        via_forward = model(feats, present, groups=groups)
        plain = model(feats, present)
    assert torch.allclose(via_forward.l_imc, via_heads.l_imc)
    assert not torch.allclose(via_forward.l_imc, plain.l_imc)


def test_training_losses_use_the_whole_batch_groups_as_under_ddp() -> None:
    # A "rank" forwards rows 0..n-1 of a batch whose rows n..2n-1 are oversampled copies of
    # them; a fake gather appends the (identical, no dropout or NEE) copies' vectors. The loss
    # must see the whole batch's groups, as in a single process on all 2n rows.
    import numpy as np

    from models.featureset import take, to_tensors
    from models.losses import fine_tune_loss, pretrain_loss
    from models.training import _labels_and_presence
    from tests.models.synthetic import make_featureset

    model = MRCCL(mrccl_config("tiny", dims=DIMS, dropout=0.0, use_nee=False)).eval()
    n = 5
    data = to_tensors(make_featureset(n, missing=0.2).subset(np.r_[np.arange(n), np.arange(n)]))
    rows = torch.arange(2 * n)
    full = take(data, rows)
    whole = _labels_and_presence(data, rows)
    assert torch.equal(whole.groups, full.groups) and len(torch.unique(whole.groups)) == n
    local = take(data, torch.arange(n))

    def gather(v: torch.Tensor) -> torch.Tensor:
        return torch.cat([v, v])

    for loss_fn in (pretrain_loss, fine_tune_loss):
        with torch.no_grad():
            single, _ = loss_fn(model, full, full)
            split, _ = loss_fn(model, local, whole, gather)
            whole.groups = None
            ungrouped, _ = loss_fn(model, local, whole, gather)
            whole.groups = full.groups
        assert torch.allclose(single, split, atol=1e-5)
        assert not torch.allclose(single, ungrouped, atol=1e-4)
