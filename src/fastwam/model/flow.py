"""Flow matching as in the official Fast-WAM code (docs/reference.md, "Flow matching").

Conventions: sigma = 0 is data, sigma = 1 is noise; x_sigma = (1 - sigma) * x0 + sigma * noise; the network predicts
the velocity d x / d sigma = noise - x0; timestep = 1000 * sigma. Training draws u ~ U(0, 1) and warps it with the
shift s (sigma = s u / (1 + (s - 1) u)), which spends more time at high noise; inference integrates with Euler on
the same warp of linspace(1, 0, N + 1).
"""

from __future__ import annotations

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


def _weight_norm(shift: float, n: int = 1000) -> float:
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    return float(_raw_weight(1000.0 * shift_sigma(u, shift)).mean())


_NORMS: dict[float, float] = {}


def loss_weight(sigma: torch.Tensor, shift: float = DEFAULT_SHIFT) -> torch.Tensor:
    """Gaussian bump over the timestep, normalised to mean 1 over the shifted training distribution."""
    if shift not in _NORMS:
        _NORMS[shift] = _weight_norm(shift)
    return _raw_weight(1000.0 * sigma.float()) / _NORMS[shift]


def euler_sigmas(steps: int, shift: float = DEFAULT_SHIFT, device=None) -> torch.Tensor:
    """steps + 1 noise levels from 1 (noise) to 0 (data)."""
    if steps < 1:
        raise ValueError(f"need at least one denoising step, got {steps}")
    return shift_sigma(torch.linspace(1.0, 0.0, steps + 1, device=device), shift)


def euler_step(x: torch.Tensor, velocity: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    return x + (sigma_next - sigma) * velocity


