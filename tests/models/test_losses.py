"""Eq. 3 and the IMCL-NE / IMCL-AE losses built on it."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from models.contrastive import (
    LearnableTemperature,
    imcl_ae,
    imcl_ne,
    symmetric_info_nce,
    temperature_names,
)

MODS = ("visual", "acoustic", "text")


def eq3_by_loops(a: torch.Tensor, b: torch.Tensor, tau: float) -> float:
    """Eq. 3 written as the paper's double sums, one scalar at a time."""
    B = a.shape[0]
    dot = [[float(a[k] @ b[j]) for j in range(B)] for k in range(B)]
    first = second = 0.0
    for k in range(B):
        num = math.exp(dot[k][k] / tau)
        first += math.log(num / sum(math.exp(dot[k][j] / tau) for j in range(B)))
        second += math.log(num / sum(math.exp(dot[j][k] / tau) for j in range(B)))
    return -first / B - second / B


@pytest.mark.parametrize("tau", [0.07, 0.5, 1.0])
def test_symmetric_info_nce_equals_the_double_sum(tau: float) -> None:
    g = torch.Generator().manual_seed(1)
    a = F.normalize(torch.randn(5, 7, generator=g, dtype=torch.float64), dim=-1)
    b = F.normalize(torch.randn(5, 7, generator=g, dtype=torch.float64), dim=-1)
    got = symmetric_info_nce(a, b, tau).item()
    assert got == pytest.approx(eq3_by_loops(a, b, tau), rel=1e-10)


def test_symmetric_info_nce_takes_vectors_as_given_and_is_asymmetric_in_rows() -> None:
    g = torch.Generator().manual_seed(2)
    a = torch.randn(4, 3, generator=g, dtype=torch.float64) * 3.0  # not normalised
    b = torch.randn(4, 3, generator=g, dtype=torch.float64)
    assert symmetric_info_nce(a, b, 0.3).item() == pytest.approx(eq3_by_loops(a, b, 0.3))
    # Swapping the arguments swaps the two sums: same total.
    assert symmetric_info_nce(b, a, 0.3).item() == pytest.approx(
        symmetric_info_nce(a, b, 0.3).item()
    )


def test_symmetric_info_nce_edge_cases() -> None:
    a = torch.randn(0, 4, requires_grad=True)
    assert symmetric_info_nce(a, a, 0.1).item() == 0.0
    one = torch.randn(1, 4)
    assert symmetric_info_nce(one, one, 0.1).item() == pytest.approx(0.0)
    with pytest.raises(ValueError, match="two \\(B, d\\) tensors"):
        symmetric_info_nce(torch.randn(3, 4), torch.randn(2, 4), 0.1)


def test_learnable_temperature_starts_at_init_and_is_clamped() -> None:
    t = LearnableTemperature(0.07, 0.01)
    assert t().item() == pytest.approx(0.07)
    with torch.no_grad():
        t.log_tau.fill_(math.log(1e-4))
    assert t().item() == pytest.approx(0.01)
    with pytest.raises(ValueError, match="minimum <= init"):
        LearnableTemperature(0.005, 0.01)


def _temps() -> dict[str, LearnableTemperature]:
    return {name: LearnableTemperature(0.1) for name in temperature_names()}


def test_imcl_ne_is_the_mean_of_three_normalised_terms_and_skips_missing_rows() -> None:
    g = torch.Generator().manual_seed(3)
    clean = {m: torch.randn(6, 8, generator=g) for m in MODS}
    noisy = {m: torch.randn(6, 8, generator=g) for m in MODS}
    present = {m: torch.ones(6, dtype=torch.bool) for m in MODS}
    present["text"][[1, 4]] = False
    temps = _temps()
    total, terms = imcl_ne(clean, noisy, present, temps)
    expected = []
    for m in MODS:
        rows = present[m]
        a, b = F.normalize(clean[m][rows], dim=-1), F.normalize(noisy[m][rows], dim=-1)
        expected.append(eq3_by_loops(a.double(), b.double(), 0.1))
        assert terms[f"intra-{m}"].item() == pytest.approx(expected[-1], rel=1e-5)
    assert total.item() == pytest.approx(sum(expected) / 3, rel=1e-5)
    # The values in a missing row do not matter.
    clean["text"][1] = float("nan")
    assert imcl_ne(clean, noisy, present, temps)[0].item() == pytest.approx(total.item())


def test_imcl_ae_has_six_terms_and_one_vs_two_needs_all_three() -> None:
    g = torch.Generator().manual_seed(4)
    h = {m: torch.randn(5, 4, generator=g) for m in MODS}
    present = {m: torch.ones(5, dtype=torch.bool) for m in MODS}
    present["visual"][0] = False
    proj = {m: torch.nn.Linear(4, 8) for m in MODS}
    total, terms = imcl_ae(h, present, _temps(), proj)
    assert len(terms) == 6
    rows = present["visual"]  # the only missing row is visual's
    a = F.normalize(proj["acoustic"](h["acoustic"])[rows], dim=-1)
    b = F.normalize(torch.cat([h["visual"], h["text"]], -1)[rows], dim=-1)
    expect = eq3_by_loops(a.double().detach(), b.double().detach(), 0.1)
    assert terms["acoustic-vs-rest"].item() == pytest.approx(expect, rel=1e-5)
    pair = eq3_by_loops(
        F.normalize(h["acoustic"], dim=-1).double(), F.normalize(h["text"], dim=-1).double(), 0.1
    )
    assert terms["acoustic-text"].item() == pytest.approx(pair, rel=1e-5)  # all 5 rows
    assert total.item() == pytest.approx(torch.stack(list(terms.values())).mean().item())


# --------------------------------------------------------------- copies of a video (groups)


def eq3_grouped_by_loops(a: torch.Tensor, b: torch.Tensor, tau: float, groups: list[int]) -> float:
    """Eq. 3 by loops where a row j != k of k's group is left out of k's denominators."""
    B = a.shape[0]
    dot = [[float(a[k] @ b[j]) for j in range(B)] for k in range(B)]
    first = second = 0.0
    for k in range(B):
        negatives = [j for j in range(B) if j == k or groups[j] != groups[k]]
        num = math.exp(dot[k][k] / tau)
        first += math.log(num / sum(math.exp(dot[k][j] / tau) for j in negatives))
        second += math.log(num / sum(math.exp(dot[j][k] / tau) for j in negatives))
    return -first / B - second / B


def _unit(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)


def test_groups_of_distinct_rows_change_nothing() -> None:
    a, b = _unit(6, 5, 10), _unit(6, 5, 11)
    plain = symmetric_info_nce(a, b, 0.2)
    assert symmetric_info_nce(a, b, 0.2, None).item() == plain.item()
    distinct = torch.tensor([4, 0, 9, 2, 7, 1])  # any distinct integers
    assert symmetric_info_nce(a, b, 0.2, distinct).item() == pytest.approx(plain.item(), rel=1e-12)


@pytest.mark.parametrize("tau", [0.07, 0.5])
def test_copies_leave_each_others_denominators(tau: float) -> None:
    # Rows 0, 3, 5 are one video, rows 1, 4 another, row 2 alone. Copies hold the same clean
    # vector (a) but their own noisy view (b), as in L_intra after oversampling.
    groups = [0, 1, 2, 0, 1, 0]
    a, b = _unit(6, 7, 12), _unit(6, 7, 13)
    a[3], a[5], a[4] = a[0], a[0], a[1]
    got = symmetric_info_nce(a, b, tau, torch.tensor(groups)).item()
    assert got == pytest.approx(eq3_grouped_by_loops(a, b, tau, groups), rel=1e-10)
    # The copies were really negatives before: the plain loss differs.
    assert symmetric_info_nce(a, b, tau).item() != pytest.approx(got, rel=1e-6)


def test_exact_copies_cost_their_video_once_per_copy_against_the_other_videos() -> None:
    # Identical copies (same a, same b; e.g. L_imc without dropout): on the de-duplicated rows,
    # each video's term normalises over itself and every row of the other videos (a video with
    # c copies counts c times there), and it enters the mean once per copy.
    a, b = _unit(3, 6, 14), _unit(3, 6, 15)  # three videos
    copies = [2, 1, 3]
    rows = [v for v, c in enumerate(copies) for _ in range(c)]  # [0, 0, 1, 2, 2, 2]
    got = symmetric_info_nce(a[rows], b[rows], 0.3, torch.tensor(rows)).item()
    tau, total = 0.3, 0.0
    for u in range(3):
        pos = float(a[u] @ b[u]) / tau
        row = math.exp(pos) + sum(
            copies[v] * math.exp(float(a[u] @ b[v]) / tau) for v in range(3) if v != u
        )
        col = math.exp(pos) + sum(
            copies[v] * math.exp(float(a[v] @ b[u]) / tau) for v in range(3) if v != u
        )
        total += copies[u] * (math.log(row) - pos + math.log(col) - pos)
    assert got == pytest.approx(total / len(rows), rel=1e-10)


def test_grouped_loss_has_finite_gradients_even_when_a_batch_is_one_video() -> None:
    a = torch.randn(5, 4, requires_grad=True)
    b = torch.randn(5, 4, requires_grad=True)
    tau = torch.tensor(0.01, requires_grad=True)
    for groups in (torch.tensor([0, 0, 1, 0, 1]), torch.zeros(5, dtype=torch.long)):
        loss = symmetric_info_nce(F.normalize(a, dim=-1), F.normalize(b, dim=-1), tau, groups)
        assert torch.isfinite(loss)
        grads = torch.autograd.grad(loss, (a, b, tau))
        assert all(torch.isfinite(g).all() for g in grads)
    # One video only: no negatives left, nothing to contrast, the loss is 0.
    assert symmetric_info_nce(a, b, 0.1, torch.zeros(5, dtype=torch.long)).item() == 0.0


def test_a_copy_gets_no_repelling_gradient_from_its_twin() -> None:
    # Row 3 is a copy of row 0. Unmasked, b_3 sits in a_0's denominator and pushes a_0 away from
    # it (and a_0 pushes b_3 away); masked, a_0's gradient does not depend on b_3 at all.
    groups = torch.tensor([0, 1, 2, 0])
    base_b = _unit(4, 5, 17)

    def grad_of_a0(twin_b: torch.Tensor, g: torch.Tensor | None) -> torch.Tensor:
        a = _unit(4, 5, 16)
        a[3] = a[0]
        a.requires_grad_(True)
        b = base_b.clone()
        b[3] = twin_b
        symmetric_info_nce(a, b, 0.1, g).backward()
        return a.grad[0]

    one, other = base_b[0], _unit(1, 5, 18)[0]  # the twin's b: equal to b_0, or anything
    masked = grad_of_a0(one, groups)
    assert torch.allclose(masked, grad_of_a0(other, groups), atol=1e-12)
    assert torch.allclose(masked, grad_of_a0(-one, groups), atol=1e-12)
    unmasked = grad_of_a0(one, None)
    assert not torch.allclose(unmasked, grad_of_a0(other, None), atol=1e-6)
    # The repulsion itself: without the mask, a_0's gradient has a component pushing it away
    # from b_3 = b_0 (descent moves along -grad); with it, that component is gone.
    a = _unit(4, 5, 16)
    a[3] = a[0]
    b = base_b.clone()
    b[3] = b[0]
    a.requires_grad_(True)
    symmetric_info_nce(a, b, 0.1, groups).backward()
    g_masked = a.grad[0].clone()
    a.grad = None
    symmetric_info_nce(a, b, 0.1).backward()
    # Unmasked minus masked gradient on a_0 = the twin's repelling term: along +b_0 (so descent
    # moves a_0 away from its own positive).
    assert float((a.grad[0] - g_masked) @ b[0]) > 0


def test_groups_shape_is_checked() -> None:
    with pytest.raises(ValueError, match=r"groups must have shape \(3,\)"):
        symmetric_info_nce(torch.randn(3, 4), torch.randn(3, 4), 0.1, torch.zeros(4))


def test_imcl_terms_select_groups_with_the_presence_mask() -> None:
    g = torch.Generator().manual_seed(5)
    n = 7
    clean = {m: torch.randn(n, 8, generator=g) for m in MODS}
    noisy = {m: torch.randn(n, 8, generator=g) for m in MODS}
    present = {m: torch.ones(n, dtype=torch.bool) for m in MODS}
    present["text"][[0, 3]] = False  # rows 0 and 3 (copies of one video) lack text
    present["visual"][2] = False
    groups = torch.tensor([5, 1, 5, 5, 2, 1, 3])  # videos {0, 2, 3}, {1, 5}, {4}, {6}
    temps = _temps()
    total, terms = imcl_ne(clean, noisy, present, temps, groups)
    for m in MODS:
        rows = present[m]
        a, b = F.normalize(clean[m][rows], dim=-1), F.normalize(noisy[m][rows], dim=-1)
        ref = eq3_grouped_by_loops(a.double(), b.double(), 0.1, groups[rows].tolist())
        assert terms[f"intra-{m}"].item() == pytest.approx(ref, rel=1e-5)
    ungrouped = imcl_ne(clean, noisy, present, temps)[0]
    assert total.item() != pytest.approx(ungrouped.item(), rel=1e-6)
    distinct = imcl_ne(clean, noisy, present, temps, torch.arange(n))[0]
    assert distinct.item() == pytest.approx(ungrouped.item(), rel=1e-6)

    proj = {m: torch.nn.Linear(8, 16) for m in MODS}
    total, terms = imcl_ae(clean, present, temps, proj, groups)
    rows = present["visual"] & present["text"]
    a, b = F.normalize(clean["visual"][rows], dim=-1), F.normalize(clean["text"][rows], dim=-1)
    ref = eq3_grouped_by_loops(a.double(), b.double(), 0.1, groups[rows].tolist())
    assert terms["visual-text"].item() == pytest.approx(ref, rel=1e-5)
    rows = present["visual"] & present["acoustic"] & present["text"]
    a = F.normalize(proj["text"](clean["text"])[rows], dim=-1).detach()
    b = F.normalize(torch.cat([clean["visual"], clean["acoustic"]], -1)[rows], dim=-1)
    ref = eq3_grouped_by_loops(a.double(), b.double(), 0.1, groups[rows].tolist())
    assert terms["text-vs-rest"].item() == pytest.approx(ref, rel=1e-5)
    distinct = imcl_ae(clean, present, temps, proj, torch.arange(n))[0]
    assert distinct.item() == pytest.approx(imcl_ae(clean, present, temps, proj)[0].item())
