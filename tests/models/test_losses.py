"""Eq. 3 and the IMCL-NE / IMCL-AE losses built on it."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from models.losses import (
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
