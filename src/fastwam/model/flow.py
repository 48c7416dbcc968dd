"""Flow matching as in the official Fast-WAM code (docs/reference.md, "Flow matching").

Conventions: sigma = 0 is data, sigma = 1 is noise; x_sigma = (1 - sigma) * x0 + sigma * noise; the network predicts
the velocity d x / d sigma = noise - x0; timestep = 1000 * sigma. Training draws u ~ U(0, 1) and warps it with the
shift s (sigma = s u / (1 + (s - 1) u)), which spends more time at high noise; inference integrates with Euler on
the same warp of linspace(1, 0, N + 1).
"""

from __future__ import annotations

import functools

import torch

DEFAULT_SHIFT = 5.0


def shift_sigma(u: torch.Tensor, shift: float = DEFAULT_SHIFT) -> torch.Tensor:
    return shift * u / (1 + (shift - 1) * u)


def sample_sigma(batch: int, generator: torch.Generator | None = None, device=None, shift: float = DEFAULT_SHIFT):
    """Training noise levels [B]: shifted uniform (the released code; the paper text says logit-normal)."""
    u = torch.rand(batch, generator=generator, device=device)
    return shift_sigma(u, shift)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    s = sigma.reshape(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1 - s) * x0 + s * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x0


def _raw_weight(timestep: torch.Tensor) -> torch.Tensor:
    return torch.exp(-2.0 * ((timestep - 500.0) / 1000.0) ** 2)


@functools.lru_cache(maxsize=8)
def _weight_stats(shift: float, grid: int = 1000) -> tuple[float, float]:
    """(y_min, mean(y - y_min)) of the raw weight over the official float64 grid t = 1000 * warp(u),
    u = linspace(1, 0, grid + 1)[:-1] (the endpoint u = 1, i.e. t = 1000, included; u = 0 left out)."""
    u = torch.linspace(1.0, 0.0, grid + 1, dtype=torch.float64)[:-1]
    y = _raw_weight(1000.0 * shift_sigma(u, shift))
    y_min = float(y.min())
    return y_min, float((y - y_min).mean())


def loss_weight(sigma: torch.Tensor, shift: float = DEFAULT_SHIFT) -> torch.Tensor:
    """The official per-sample loss weight w = (y(t) - y_min) / mean(y - y_min), y(t) = exp(-2 ((t - 500) / 1000)^2),
    t = 1000 sigma: a bump that is 0 at sigma = 0 and 1 and ~2.08 at sigma = 0.5, with mean ~1 over the shifted
    training distribution. Computed in float32 like the official scheduler (its 1e-10 guard included)."""
    y_min, norm = _weight_stats(float(shift))
    return (_raw_weight(1000.0 * sigma.float()) - y_min) / (norm + 1e-10)


def euler_sigmas(steps: int, shift: float = DEFAULT_SHIFT, device=None) -> torch.Tensor:
    """steps + 1 noise levels from 1 (noise) to 0 (data)."""
    if steps < 1:
        raise ValueError(f"need at least one denoising step, got {steps}")
    return shift_sigma(torch.linspace(1.0, 0.0, steps + 1, device=device), shift)


def euler_step(x: torch.Tensor, velocity: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    return x + (sigma_next - sigma) * velocity


