"""Noise embedding enhancement (NEE): a diffusion-style forward noising of feature vectors."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

NoiseKind = Literal["linear", "scaled_linear"]
NOISE_KINDS: tuple[str, ...] = ("linear", "scaled_linear")


def make_betas(kind: str, num_steps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """beta_1..beta_T of a schedule, float64 (T,)."""
    if kind == "linear":  # the paper
        return torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
    if kind == "scaled_linear":  # the authors' code: linear in sqrt(beta)
        root = torch.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=torch.float64)
        return root**2
    raise ValueError(
        f"unknown noise schedule kind {kind!r}; valid kinds are {', '.join(NOISE_KINDS)}"
    )


class NoiseSchedule(nn.Module):
    """N = sqrt(alpha_bar_t) F + sqrt(1 - alpha_bar_t) eps, with t drawn per sample in 1..T."""

    def __init__(
        self,
        kind: str = "linear",
        num_steps: int = 100,
        beta_start: float = 0.001,
        beta_end: float = 0.1,
    ) -> None:
        super().__init__()
        if num_steps < 1 or not 0.0 < beta_start <= beta_end < 1.0:
            raise ValueError(
                f"noise schedule needs T >= 1 and 0 < beta_1 <= beta_T < 1; got T={num_steps}, "
                f"beta_1={beta_start}, beta_T={beta_end}"
            )
        self.kind = kind
        self.num_steps = num_steps
        betas = make_betas(kind, num_steps, beta_start, beta_end)
        # alpha_bar[t-1] = prod_{s<=t} (1 - beta_s); float64 cumprod, then float32 for use.
        # Not persistent: the schedule is rebuilt from the config, never read from a checkpoint.
        self.register_buffer("betas", betas.float(), persistent=False)
        self.register_buffer("alpha_bar", torch.cumprod(1.0 - betas, 0).float(), persistent=False)

    def sample_timesteps(
        self, n: int, generator: torch.Generator | None = None, device: torch.device | None = None
    ) -> torch.Tensor:
        """n timesteps drawn uniformly in 1..T, int64 (n,)."""
        gen_device = generator.device if generator is not None else device
        t = torch.randint(1, self.num_steps + 1, (n,), generator=generator, device=gen_device)
        return t.to(device if device is not None else t.device)

    def add_noise(
        self,
        x: torch.Tensor,
        generator: torch.Generator | None = None,
        timesteps: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Noisy version of x (B, d): one timestep per row, uniform in 1..T unless given."""
        if timesteps is None:
            timesteps = self.sample_timesteps(x.shape[0], generator, x.device)
        gen_device = generator.device if generator is not None else x.device
        eps = torch.randn(x.shape, generator=generator, device=gen_device, dtype=x.dtype)
        ab = self.alpha_bar.to(x.device)[timesteps.to(x.device) - 1].to(x.dtype).unsqueeze(1)
        return ab.sqrt() * x + (1.0 - ab).sqrt() * eps.to(x.device)  # (B, d)
