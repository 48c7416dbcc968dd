"""Wan-compatible DiT pieces, with diffusers' parameter names.

The state-dict names of every module here match diffusers' `WanTransformer3DModel` (0.42), so a diffusers
checkpoint loads into the video expert key for key (see `wan_checkpoint.py`). The numerics follow diffusers too:
LayerNorms and residual arithmetic in fp32, RMSNorm over the whole q/k width before the head split, RoPE on
interleaved pairs with float64 angles.

Unlike diffusers' block, `DiTBlock` exposes self-attention in two halves (`attention_inputs`, `finish`) so that a
mixture-of-transformers layer can run ONE attention over the tokens of several experts with a visibility mask
(`mot.py`). An expert's hidden size may differ from its attention width (the action expert: hidden 1024, attention
24 x 128 = 3072), which Wan never needs but the same parameter layout supports.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

# ---------------------------------------------------------------------------------------------------------------------
# Small layers


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the input dtype (diffusers' FP32LayerNorm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class GELUProj(nn.Module):
    """diffusers' `GELU` activation module: Linear followed by tanh-approximate GELU (key `ffn.net.0.proj`)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    """`ffn.net.0.proj` -> GELU(tanh) -> `ffn.net.2` (index 1 is diffusers' dropout slot)."""

    def __init__(self, dim: int, inner_dim: int):
        super().__init__()
        self.net = nn.ModuleList([GELUProj(dim, inner_dim), nn.Identity(), nn.Linear(inner_dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class Attention(nn.Module):
    """q/k/v/out projections and q/k RMSNorm of one attention (diffusers' `WanAttention` parameters).

    The attention itself is not computed here: self-attention goes through the shared MoT attention, and
    cross-attention through `cross_attend` with the context's keys/values from `context_kv`.
    """

    def __init__(self, dim: int, num_heads: int, head_dim: int, eps: float, kv_dim: int | None = None):
        super().__init__()
        inner = num_heads * head_dim
        kv_dim = dim if kv_dim is None else kv_dim
        self.num_heads = num_heads
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(kv_dim, inner)
        self.to_v = nn.Linear(kv_dim, inner)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Identity()])
        self.norm_q = nn.RMSNorm(inner, eps=eps)
        self.norm_k = nn.RMSNorm(inner, eps=eps)

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, S, H*Dh] -> [B, H, S, Dh]"""
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

    def project_qkv(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q = self.heads(self.norm_q(self.to_q(x)))
        k = self.heads(self.norm_k(self.to_k(x)))
        v = self.heads(self.to_v(x))
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return q, k, v

    def output(self, attn: torch.Tensor) -> torch.Tensor:
        """[B, H, S, Dh] -> [B, S, dim]"""
        return self.to_out[0](attn.transpose(1, 2).flatten(2))

    def context_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention keys/values [B, H, L, Dh] of a context [B, L, kv_dim]."""
        return self.heads(self.norm_k(self.to_k(context))), self.heads(self.to_v(context))

    def cross_attend(self, x: torch.Tensor, context_kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        q = self.heads(self.norm_q(self.to_q(x)))
        return self.output(F.scaled_dot_product_attention(q, *context_kv))


# ---------------------------------------------------------------------------------------------------------------------
# Rotary position embedding


def rope_angles(positions: torch.Tensor, dim: int, theta: float) -> torch.Tensor:
    """Angles [S, dim/2] for integer positions [S] (float64, as diffusers' get_1d_rotary_pos_embed)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64)[: dim // 2] / dim))
    return torch.outer(positions.to(torch.float64), inv_freq)


@functools.lru_cache(maxsize=64)  # pure function of its arguments; recomputed every step otherwise
def rope_3d(grid: tuple[int, int, int], head_dim: int, theta: float, frame_offset: int = 0):
    """Wan's 3-D RoPE for a patched (frames, rows, cols) grid: cos/sin of shape [F*H*W, head_dim/2].

    The head dim is split t/h/w = rest / 2*(d//6) / 2*(d//6); each part rotates by its own coordinate.
    """
    f, h, w = grid
    hw_dim = 2 * (head_dim // 6)
    t_dim = head_dim - 2 * hw_dim
    ff, hh, ww = torch.meshgrid(
        torch.arange(frame_offset, frame_offset + f), torch.arange(h), torch.arange(w), indexing="ij"
    )
    angles = torch.cat(
        [
            rope_angles(ff.flatten(), t_dim, theta),
            rope_angles(hh.flatten(), hw_dim, theta),
            rope_angles(ww.flatten(), hw_dim, theta),
        ],
        dim=-1,
    )
    return angles.cos().float(), angles.sin().float()


@functools.lru_cache(maxsize=64)
def rope_1d(length: int, head_dim: int, theta: float):
    """1-D RoPE over the whole head dim for a token index 0..length-1 (the action chunk)."""
    angles = rope_angles(torch.arange(length), head_dim, theta)
    return angles.cos().float(), angles.sin().float()


def rope(table_fn, *args) -> tuple[torch.Tensor, torch.Tensor]:
    """`rope_3d(...)` / `rope_1d(...)` through their cache in eager mode; under torch.compile the pure computation
    is traced instead (dynamo cannot use an lru_cache and warns about it), and becomes part of the graph."""
    return table_fn.__wrapped__(*args) if torch.compiler.is_compiling() else table_fn(*args)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of x [B, H, S, Dh] by per-token angles (cos/sin [S, Dh/2])."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)
    return out.type_as(x)


# ---------------------------------------------------------------------------------------------------------------------
# Time and text conditioning


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding with cos first, computed in float64 and returned in float32 (the official Fast-WAM / Wan
    `sinusoidal_embedding_1d`). diffusers' `Timesteps(flip_sin_to_cos=True)` is the same formula in float32, which
    differs by up to ~1e-4 at t ~ 1000 (t * freq loses digits in float32)."""
    half = dim // 2
    freqs = torch.pow(max_period, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    args = t.to(torch.float64)[..., None] * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1).float()


class TimestepEmbedding(nn.Module):
    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class TextProjection(nn.Module):
    """Linear -> GELU(tanh) -> Linear (diffusers' PixArtAlphaTextProjection)."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(x), approximate="tanh"))


class ConditionEmbedder(nn.Module):
    """Timesteps -> (temb for the output head, 6-way block modulation); text states -> the expert's width."""

    def __init__(self, dim: int, freq_dim: int, text_dim: int):
        super().__init__()
        self.freq_dim = freq_dim
        self.time_embedder = TimestepEmbedding(freq_dim, dim)
        self.time_proj = nn.Linear(dim, 6 * dim)
        self.text_embedder = TextProjection(text_dim, dim)

    def time(self, timestep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """timestep [B, S] (per token; S may be 1 to broadcast) -> temb [B, S, D], modulation [B, S, 6, D]."""
        dtype = self.time_embedder.linear_1.weight.dtype
        temb = self.time_embedder(timestep_embedding(timestep, self.freq_dim).to(dtype))
        return temb, self.time_proj(F.silu(temb)).unflatten(-1, (6, -1))

    def text(self, context: torch.Tensor) -> torch.Tensor:
        return self.text_embedder(context)


# ---------------------------------------------------------------------------------------------------------------------
# The block


class DiTBlock(nn.Module):
    """One Wan DiT block: AdaLN-modulated self-attention, text cross-attention, AdaLN-modulated FFN.

    `attention_inputs` returns this expert's q/k/v for the shared attention; `finish` takes the attention result
    and applies the output projection with its gate, cross-attention and the FFN.
    """

    def __init__(self, dim: int, ffn_dim: int, num_heads: int, head_dim: int, eps: float, cross_attn_norm: bool):
        super().__init__()
        self.norm1 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.attn1 = Attention(dim, num_heads, head_dim, eps)
        self.attn2 = Attention(dim, num_heads, head_dim, eps)
        self.norm2 = FP32LayerNorm(dim, eps, elementwise_affine=True) if cross_attn_norm else nn.Identity()
        self.ffn = FeedForward(dim, ffn_dim)
        self.norm3 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def modulation(self, time_mod: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """time_mod [B, S, 6, D] -> shift, scale, gate (attention), shift, scale, gate (FFN), each [B, S, D] fp32."""
        return tuple((self.scale_shift_table.unsqueeze(0) + time_mod.float()).unbind(2))

    def attention_inputs(self, x: torch.Tensor, mod: tuple[torch.Tensor, ...], rope) -> tuple[torch.Tensor, ...]:
        shift, scale = mod[0], mod[1]
        h = (self.norm1(x.float()) * (1 + scale) + shift).type_as(x)
        return self.attn1.project_qkv(h, rope)

    def finish(self, x: torch.Tensor, attn: torch.Tensor, mod: tuple[torch.Tensor, ...], context_kv: tuple):
        gate, c_shift, c_scale, c_gate = mod[2], mod[3], mod[4], mod[5]
        x = (x.float() + self.attn1.output(attn) * gate).type_as(x)
        x = x + self.attn2.cross_attend(self.norm2(x.float()).type_as(x), context_kv)
        h = (self.norm3(x.float()) * (1 + c_scale) + c_shift).type_as(x)
        return (x.float() + self.ffn(h).float() * c_gate).type_as(x)
