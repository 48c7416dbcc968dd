"""The frozen encoders a config names: the latent codec (frames <-> latents) and the text encoder.

The factories live here, apart from the encoders, because the Wan VAE and umT5 modules build on the small encoders'
base classes (`codecs.LatentCodec`, `text.TextEncoder`): a factory beside those classes would import the modules
that import it.
"""

from __future__ import annotations

from fastwam.config import CodecConfig, TextConfig
from fastwam.model.codecs import DCTCodec, LatentCodec, PixelCodec
from fastwam.model.text import HashTextEncoder, TextEncoder


def build_codec(cfg: CodecConfig) -> LatentCodec:
    if cfg.kind == "pixel":
        return PixelCodec(cfg.space_factor)
    if cfg.kind == "dct":
        return DCTCodec(cfg.space_factor, cfg.dct_diagonals, cfg.latents_mean, cfg.latents_std)
    if cfg.kind == "wan_vae":
        from fastwam.model.wan_vae import WanVAECodec

        return WanVAECodec.from_pretrained(cfg.path)
    raise ValueError(f"unknown codec kind {cfg.kind!r}")


def build_text_encoder(cfg: TextConfig, text_dim: int) -> TextEncoder:
    if cfg.kind == "hash":
        return HashTextEncoder(text_dim, cfg.max_len, cfg.vocab_size, cfg.seed)
    if cfg.kind == "umt5":
        from fastwam.model.umt5 import UMT5TextEncoder

        return UMT5TextEncoder.from_pretrained(cfg.path, max_len=cfg.max_len, template=cfg.template)
    raise ValueError(f"unknown text encoder kind {cfg.kind!r}")
