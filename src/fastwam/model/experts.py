"""The two experts, built from the same DiT block.

`VideoExpert` has exactly the parameters (and names) of diffusers' `WanTransformer3DModel` without the I2V image
embedder; `ActionExpert` is the same recipe at its own width with an action encoder instead of the patch embedding.
Both turn their inputs into a `Stream` — the tokens of one group plus everything the MoT layers need about them
(time modulation, RoPE, text context, visibility metadata) — and map final tokens back through their output head.
The heads differ, as in the official Fast-WAM code: the video expert ends with Wan's AdaLN output norm (learned
shift/scale table + temb) and `proj_out`; the action expert with a plain `Linear(hidden, action_dim)` on the last
hidden state (no norm, no modulation; the official `ActionHead` class with a modulated norm is defined but unused).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fastwam.config import ModelConfig
from fastwam.model.blocks import ConditionEmbedder, DiTBlock, FP32LayerNorm, rope, rope_1d, rope_3d
from fastwam.model.mot import Stream, run_layers
from fastwam.model.visibility import FULL_RULE, Group


class Expert(nn.Module):
    """Condition embedder and blocks shared by both experts (diffusers' names); each expert adds its own head."""

    def __init__(self, cfg: ModelConfig, dim: int, ffn_dim: int):
        super().__init__()
        self.cfg = cfg
        self.dim = dim
        self.condition_embedder = ConditionEmbedder(dim, cfg.freq_dim, cfg.text_dim)
        self.blocks = nn.ModuleList(
            DiTBlock(dim, ffn_dim, cfg.num_heads, cfg.head_dim, cfg.eps, cfg.cross_attn_norm)
            for _ in range(cfg.num_layers)
        )

    def head(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """Final hidden states [B, S, D] -> outputs [B, S, out_dim] (temb: [B, S or 1, D], for heads that use it)."""
        raise NotImplementedError

    def cross_kv(self, context: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every block's cross-attention K/V of a projected context, for reuse over all denoising steps. With the
        5B preset's 129 context tokens (128 umT5 tokens, padding zeroed but visible, + the state token) these
        projections cost several times the 32 action tokens' own."""
        return [block.attn2.context_kv(context) for block in self.blocks]

    def stream(self, group: Group, x, timestep, rope, first_frame, context) -> Stream:
        temb, time_mod = self.condition_embedder.time(timestep)
        return Stream(group, self, x, temb, time_mod, rope, first_frame, context)


class VideoExpert(Expert):
    """A Wan2.2 DiT over patchified video latents; `forward` reproduces diffusers' WanTransformer3DModel."""

    def __init__(self, cfg: ModelConfig):
        dim = cfg.video_dim
        super().__init__(cfg, dim, cfg.video_ffn_dim)
        self.patch_embedding = nn.Conv3d(cfg.latent_channels, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.norm_out = FP32LayerNorm(dim, cfg.eps, elementwise_affine=False)
        self.proj_out = nn.Linear(dim, cfg.latent_channels * math.prod(cfg.patch_size))
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    def head(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """Wan's output AdaLN (learned table + temb, per token) and projection: [B, S, D] -> [B, S, patch values]."""
        shift, scale = (self.scale_shift_table.unsqueeze(0) + temb.unsqueeze(2)).unbind(2)
        return self.proj_out((self.norm_out(x.float()) * (1 + scale) + shift).type_as(x))

    def grid(self, latents: torch.Tensor) -> tuple[int, int, int]:
        pt, ph, pw = self.cfg.patch_size
        _, _, f, h, w = latents.shape
        if f % pt or h % ph or w % pw:
            raise ValueError(f"latent grid {(f, h, w)} is not divisible by patch size {self.cfg.patch_size}")
        return f // pt, h // ph, w // pw

    def tokens_per_frame(self, latents: torch.Tensor) -> int:
        _, h, w = self.grid(latents)
        return h * w

    def to_stream(
        self, latents: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor, group: Group = Group.VIDEO
    ) -> Stream:
        """latents [B, C, F, H, W]; timestep per token [B, S] (or [B, 1] / [B] for all tokens); context: this
        expert's projected text."""
        grid = self.grid(latents)
        x = self.patch_embedding(latents).flatten(2).transpose(1, 2).contiguous()
        frame_index = torch.arange(grid[0], device=latents.device).repeat_interleave(grid[1] * grid[2])
        cos_sin = tuple(r.to(latents.device) for r in rope(rope_3d, grid, self.cfg.head_dim, self.cfg.rope_theta))
        return self.stream(group, x, timestep.reshape(x.shape[0], -1), cos_sin, frame_index == 0, context)

    def token_timesteps(self, latents: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Per-token timesteps [B, S]: 0 on the clean first latent frame, 1000 * sigma [B] on later frames."""
        f, h, w = self.grid(latents)
        later = (torch.arange(f, device=latents.device) > 0).repeat_interleave(h * w)
        return torch.where(later[None, :], 1000.0 * sigma.reshape(-1, 1).float(), 0.0)

    def patchify(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, C, F, H, W] -> [B, S, pt*ph*pw*C] in proj_out's channel order (the video loss target)."""
        b, c, f, h, w = latents.shape
        pt, ph, pw = self.cfg.patch_size
        x = latents.reshape(b, c, f // pt, pt, h // ph, ph, w // pw, pw)
        return x.permute(0, 2, 4, 6, 3, 5, 7, 1).reshape(b, (f // pt) * (h // ph) * (w // pw), -1)

    def unpatchify(self, tokens: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """[B, S, pt*ph*pw*C] -> [B, C, F, H, W] (diffusers' reshape/permute)."""
        b = tokens.shape[0]
        pt, ph, pw = self.cfg.patch_size
        x = tokens.reshape(b, *grid, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.flatten(6, 7).flatten(4, 5).flatten(2, 3)

    def forward(
        self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> torch.Tensor:
        """diffusers' WanTransformer3DModel.forward: timestep [B] or per-token [B, S]; returns the velocity."""
        grid = self.grid(hidden_states)
        b, s = hidden_states.shape[0], math.prod(grid)
        timestep = timestep.reshape(b, -1)
        if timestep.shape[1] not in (1, s):
            raise ValueError(f"timestep must be [B] or [B, {s}], got {tuple(timestep.shape)}")
        context = self.condition_embedder.text(encoder_hidden_states)
        stream = self.to_stream(hidden_states, timestep, context)
        (x,) = run_layers([stream], FULL_RULE)
        return self.unpatchify(self.head(x, stream.temb), grid)


class ActionExpert(Expert):
    """The action chunk as tokens: Linear(action_dim -> hidden), 1-D RoPE over the index, one timestep per sample (or
    per action, for a clean prefix)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, cfg.action_hidden_dim, cfg.action_ffn_dim)
        self.action_encoder = nn.Linear(cfg.action_dim, cfg.action_hidden_dim)
        self.proj_out = nn.Linear(cfg.action_hidden_dim, cfg.action_dim)  # the official `head`

    def head(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        """The official action head: a plain linear map of the last hidden state (temb unused)."""
        return self.proj_out(x)

    def to_stream(self, actions: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> Stream:
        """actions [B, H, A]; timestep [B] (one per chunk) or [B, H] (per action: a clean prefix at 0, as
        train.action_prefix_max trains); context: this expert's projected text."""
        h = actions.shape[1]
        cos_sin = tuple(r.to(actions.device) for r in rope(rope_1d, h, self.cfg.head_dim, self.cfg.rope_theta))
        first = torch.zeros(h, dtype=torch.bool, device=actions.device)
        timestep = timestep if timestep.dim() == 2 else timestep.reshape(-1, 1)
        return self.stream(Group.ACTION, self.action_encoder(actions), timestep, cos_sin, first, context)
