"""The NEE noise schedules and the noising itself."""

from __future__ import annotations

import math

import pytest
import torch

from models.nee import NoiseSchedule


def beta(kind: str, s: int, T: int = 100, b1: float = 0.001, bT: float = 0.1) -> float:
    """beta_s (s in 1..T) from the schedule's definition."""
    if kind == "linear":
        return b1 + (s - 1) * (bT - b1) / (T - 1)
    root = math.sqrt(b1) + (s - 1) * (math.sqrt(bT) - math.sqrt(b1)) / (T - 1)
    return root**2


@pytest.mark.parametrize("kind", ["linear", "scaled_linear"])
def test_alpha_bar_is_the_product_formula(kind: str) -> None:
    sched = NoiseSchedule(kind)
    assert sched.betas[0].item() == pytest.approx(0.001)
    assert sched.betas[-1].item() == pytest.approx(0.1)
    for t in (1, 50, 100):
        product = math.prod(1.0 - beta(kind, s) for s in range(1, t + 1))
        assert sched.alpha_bar[t - 1].item() == pytest.approx(product, rel=1e-5)


def test_scaled_linear_keeps_more_signal_than_linear() -> None:
    lin, scaled = NoiseSchedule("linear"), NoiseSchedule("scaled_linear")
    assert scaled.alpha_bar[-1] > lin.alpha_bar[-1]


def test_add_noise_uses_the_formula_per_row_and_is_reproducible() -> None:
    sched = NoiseSchedule("linear")
    x = torch.randn(4, 16)
    t = torch.tensor([1, 10, 50, 100])
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    noisy = sched.add_noise(x, generator=g1, timesteps=t)
    eps = torch.randn(x.shape, generator=g2)
    ab = sched.alpha_bar[t - 1].unsqueeze(1)
    assert torch.allclose(noisy, ab.sqrt() * x + (1 - ab).sqrt() * eps, atol=1e-6)
    again = sched.add_noise(x, generator=torch.Generator().manual_seed(5), timesteps=t)
    assert torch.equal(noisy, again)


def test_timesteps_are_uniform_in_one_to_T() -> None:
    sched = NoiseSchedule("linear")
    t = sched.sample_timesteps(20000, torch.Generator().manual_seed(0))
    assert t.min().item() == 1 and t.max().item() == 100
    counts = torch.bincount(t, minlength=101)[1:].float()
    assert counts.std() / counts.mean() < 0.15


def test_bad_schedules_are_rejected() -> None:
    with pytest.raises(ValueError, match="valid kinds are linear, scaled_linear"):
        NoiseSchedule("cosine")
    with pytest.raises(ValueError, match="beta_1 <= beta_T"):
        NoiseSchedule("linear", beta_start=0.2, beta_end=0.1)
