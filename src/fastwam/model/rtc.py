"""Real-time chunking (RTC; Black, Galliker and Levine 2025): a new action chunk that continues the one still running.

A robot that acts while it thinks keeps executing the previous chunk during inference. When the new chunk arrives,
its first `d` actions (d = the inference delay in control steps) have already been replaced by the old chunk's, and
switching abruptly from the old plan to the new one jerks at the seam. RTC treats sampling the new chunk as
inpainting: the old chunk's remaining actions are a target, the first d of them hard (they *will* run), the rest of
the overlap soft with weights that decay towards the end of the old chunk, and nothing beyond it. At every Euler step
the predicted clean chunk is pulled towards the target by a guidance term (pseudo-inverse guidance, PiGDM):

    x0_hat = x - sigma * v(x)                             (the chunk this step predicts)
    g      = (d x0_hat / d x)^T [W * (target - x0_hat)]   (one vector-Jacobian product through the action expert)
    v'     = v - c(sigma) * g,   c = min(beta, sigma / ((1 - sigma) * r2)),  r2 = sigma^2 / (sigma^2 + (1 - sigma)^2)

(the paper's time tau is 1 - sigma here, and its velocity points the other way, hence the minus). c is also capped
at 1 / (sigma - sigma_next): with x0_hat moving about one-for-one with x, one Euler step then moves the predicted
chunk at most all the way to its target, never past it. The paper's beta = 5 assumes small steps (there the cap never
binds: plain 10-step sampling here is unchanged by it); a distilled one-step sampler takes one step of size 1, and
uncapped guidance overshot the target up to 4x: on the real-time study's distilled samplers it cost ~19 points of
MT10 success and made the seams jerkier, not smoother. Only the action
expert is differentiated: the video prefix is a cached constant, exactly as in plain fast sampling. After the last
step the first d actions are set to the target's (they are what the robot executes; the guidance only made the
rest continue them). With d = 0 and no overlap there is nothing to guide and sampling is the plain sampler's.

Training-time action conditioning (`method = "prefix"`; Black, Ren, Equi and Levine 2025, "training-time RTC"): a model
trained with train.action_prefix_max = N has seen chunks whose first d <= N actions were given clean (timestep 0) and
left out of the loss. Sampling then simply feeds the d executing actions in clean at every step: no guidance, no
vector-Jacobian product, the plain sampler's cost; the rest of the chunk continues them because that is what the model
learnt, not because a guidance term pulls it there (nothing beyond the first d is targeted).

Weights (the paper's eq. 5), for an overlap of L actions (the old chunk's remaining length) and delay d:
W_i = 1 for i < d; W_i = c_i (e^{c_i} - 1) / (e - 1) with c_i = (L - i) / (L - d + 1) for d <= i < L; 0 for i >= L.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

DEFAULT_MAX_GUIDANCE = 5.0  # the paper's beta


def rtc_weights(horizon: int, overlap: int, delay: int) -> torch.Tensor:
    """[horizon] guidance weights of one chunk: 1 on the first `delay`, decaying over the rest of `overlap`, then 0."""
    if not 0 <= delay <= overlap <= horizon:
        raise ValueError(f"need 0 <= inference_delay ({delay}) <= overlap ({overlap}) <= chunk length ({horizon})")
    w = torch.zeros(horizon, dtype=torch.float32)
    w[:delay] = 1.0
    for i in range(delay, overlap):
        c = (overlap - i) / (overlap - delay + 1)
        w[i] = c * (math.exp(c) - 1) / (math.e - 1)
    return w


@dataclass
class ActionGuide:
    """What a chunk must continue, per sample: target [B, Ha, A] (normalised, zero beyond the overlap), weights
    [B, Ha] (`rtc_weights`), delay [B] (actions pinned to the target at the end)."""

    target: torch.Tensor
    weights: torch.Tensor
    delay: torch.Tensor
    max_guidance: float = DEFAULT_MAX_GUIDANCE
    # "guidance": the soft, guided inpainting above (any model). "prefix": the first `delay` actions are given clean
    # (timestep 0) at every step and nothing is guided, for a model trained so (train.action_prefix_max > 0): the
    # sampler's cost stays plain sampling's.
    method: str = "guidance"

    @property
    def active(self) -> bool:
        if self.method == "prefix":
            return bool((self.delay > 0).any())
        return bool((self.weights > 0).any())

    def to(self, device, dtype) -> ActionGuide:
        return ActionGuide(self.target.to(device, dtype), self.weights.to(device, dtype), self.delay.to(device),
                           self.max_guidance, self.method)

    def guidance_scale(self, sigma: float) -> float:
        """c(sigma): beta at pure noise (where the formula divides by zero), falling to 0 at the data end."""
        tau = 1.0 - sigma
        if tau <= 0.0:
            return self.max_guidance
        r2 = sigma**2 / (sigma**2 + tau**2)
        if r2 == 0.0:
            return 0.0
        return min(self.max_guidance, sigma / (tau * r2))

    def step_scale(self, sigma: float, sigma_next: float) -> float:
        """The guidance scale of the Euler step sigma -> sigma_next: c(sigma), at most 1 / step size (no overshoot)."""
        scale = self.guidance_scale(sigma)
        step = sigma - sigma_next
        return min(scale, 1.0 / step) if step > 0 else scale

    def guided_velocity(self, velocity_fn, x: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
        """v(x) pulled towards the target: one forward and one vector-Jacobian product of `velocity_fn`."""
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            v = velocity_fn(x_in)
            x0_hat = x_in - sigma * v
            err = (self.target - x0_hat) * self.weights[..., None]
            (g,) = torch.autograd.grad(x0_hat, x_in, grad_outputs=err.detach())
        return (v - self.step_scale(sigma, sigma_next) * g).detach()

    def pin(self, actions: torch.Tensor) -> torch.Tensor:
        """The first `delay` actions of each chunk replaced by the target's (what the robot executes meanwhile)."""
        idx = torch.arange(actions.shape[1], device=actions.device)
        keep = (idx[None, :] < self.delay[:, None])[..., None]
        return torch.where(keep, self.target, actions)
