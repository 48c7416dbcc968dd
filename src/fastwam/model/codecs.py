"""Latent codecs: frames in [-1, 1] <-> latents the video expert works on. Frozen, never in the model's state dict.

`PixelCodec` is an exact, parameter-free space-to-depth: a latent pixel is an f x f patch of RGB.
`DCTCodec` (the `small_cpu` preset) keeps only the low-frequency DCT coefficients of each f x f patch and normalises
them per channel. Why not pixels: a latent token must fit the video expert's width. With the pixel codec at f = 8
and patch (1, 2, 2) a token has 768 values but `small_cpu`'s video expert is 128 wide, so its output head can only
produce velocities in a 128-dim subspace: the noise in the other 640 dims can never be removed (the video loss
stalls at ~0.85, the floor 640/768 predicts, and imagined frames stay noise). 30 DCT channels make 120-value tokens
(88 % of the pixel variance on Meta-World frames, like a JPEG at low quality), and unit-variance latents put the
data at the signal-to-noise ratios the shifted flow schedule was made for (raw pixels have variance ~0.1).
`WanVAECodec` (full scale, `wan_vae.py`) wraps diffusers' AutoencoderKLWan with the Wan2.2 latent normalisation.
Both share the causal-video convention of the Wan VAE: latent frame 0 encodes frame 0 alone, and each later latent
frame covers `temporal_factor` frames.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from fastwam.config import CodecConfig


class LatentCodec(nn.Module):
    latent_channels: int
    spatial_factor: int
    temporal_factor: int

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """[B, 3, T, H, W] in [-1, 1] -> [B, C, F, H/s, W/s] with F = 1 + (T - 1) / temporal_factor."""
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def latent_frames(self, num_frames: int) -> int:
        if (num_frames - 1) % self.temporal_factor:
            raise ValueError(f"{num_frames} frames do not fit the codec's temporal factor {self.temporal_factor}")
        return 1 + (num_frames - 1) // self.temporal_factor

    def latent_frame_mask(self, frame_mask: torch.Tensor) -> torch.Tensor:
        """[B, T] valid-frame mask -> [B, F]: as in the official code, a latent frame k > 0 is padding only when every
        pixel frame it covers is padding (so it is valid when any of them is)."""
        first, rest = frame_mask[:, :1], frame_mask[:, 1:]
        if rest.shape[1] == 0:
            return first
        return torch.cat([first, rest.unflatten(1, (-1, self.temporal_factor)).any(dim=2)], dim=1)


class PixelCodec(LatentCodec):
    def __init__(self, space_factor: int):
        super().__init__()
        self.spatial_factor = space_factor
        self.temporal_factor = 1
        self.latent_channels = 3 * space_factor**2

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = video.shape
        if h % self.spatial_factor or w % self.spatial_factor:
            raise ValueError(f"frame size {h}x{w} is not divisible by the codec's factor {self.spatial_factor}")
        frames = video.transpose(1, 2).reshape(b * t, c, h, w)
        lat = F.pixel_unshuffle(frames, self.spatial_factor)
        return lat.reshape(b, t, *lat.shape[1:]).transpose(1, 2)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        b, c, f, h, w = latents.shape
        frames = F.pixel_shuffle(latents.transpose(1, 2).reshape(b * f, c, h, w), self.spatial_factor)
        return frames.reshape(b, f, *frames.shape[1:]).transpose(1, 2)


def dct_matrix(n: int) -> torch.Tensor:
    """Orthonormal DCT-II matrix [n, n] (float64): row u is the u-th cosine basis vector."""
    k = torch.arange(n, dtype=torch.float64)
    m = torch.cos(math.pi * (2 * k[None, :] + 1) * k[:, None] / (2 * n)) * math.sqrt(2.0 / n)
    m[0] /= math.sqrt(2.0)
    return m


class DCTCodec(PixelCodec):
    """Low-frequency 2-D DCT of each f x f RGB patch, per-channel normalised: latents [B, 3 * K, F, H/f, W/f].

    Encode = a fixed orthonormal projection of the space-to-depth pixels onto K cosine bases per colour channel
    (frequencies u + v < diagonals), then (z - mean) / std. Decode = the transpose (the best low-pass reconstruction).
    Channel order: colour-major, then frequencies in (u, v) row-major order.
    """

    def __init__(self, space_factor: int, diagonals: int, mean=(), std=()):
        super().__init__(space_factor)
        f = space_factor
        d = dct_matrix(f)
        freqs = [(u, v) for u in range(f) for v in range(f) if u + v < diagonals]
        per_colour = torch.stack([torch.outer(d[u], d[v]).flatten() for u, v in freqs])  # [K, f*f]
        basis = torch.block_diag(*[per_colour] * 3).float()  # [3K, 3*f*f]; pixel_unshuffle's channel order is (c, y, x)
        self.latent_channels = basis.shape[0]
        self.register_buffer("basis", basis, persistent=False)
        if bool(mean) != bool(std) or (std and not len(mean) == len(std) == self.latent_channels):
            raise ValueError(f"latents_mean / latents_std need {self.latent_channels} values each (or none)")
        self.register_buffer("mean", torch.tensor(mean or [0.0] * self.latent_channels), persistent=False)
        self.register_buffer("std", torch.tensor(std or [1.0] * self.latent_channels), persistent=False)

    def coefficients(self, video: torch.Tensor) -> torch.Tensor:
        """Un-normalised DCT coefficients [B, 3K, F, h, w] (what `fit_codec_stats` measures)."""
        return torch.einsum("oi,bifhw->bofhw", self.basis.to(video.dtype), super().encode(video))

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        z = self.coefficients(video)
        return (z - self.mean.to(z.dtype)[:, None, None, None]) / self.std.to(z.dtype)[:, None, None, None]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents * self.std.to(latents.dtype)[:, None, None, None] + self.mean.to(latents.dtype)[:, None, None, None]
        return super().decode(torch.einsum("oi,bofhw->bifhw", self.basis.to(z.dtype), z))


def fit_codec_stats(cfg: CodecConfig, videos: torch.Tensor) -> CodecConfig:
    """A `dct` codec config with latents_mean / latents_std measured on `videos` [N, 3, T, H, W] in [-1, 1]."""
    z = DCTCodec(cfg.space_factor, cfg.dct_diagonals).coefficients(videos.float().cpu()).double()
    mean = z.mean(dim=(0, 2, 3, 4))
    std = z.std(dim=(0, 2, 3, 4)).clamp_min(1e-3)  # a constant channel (e.g. a blank border) must not divide by 0
    return dataclasses.replace(cfg, latents_mean=tuple(round(float(x), 6) for x in mean),
                               latents_std=tuple(round(float(x), 6) for x in std))
