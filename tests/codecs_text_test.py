"""Contracts: the pixel codec is an exact round trip; the DCT codec is an orthonormal low-pass with normalised
latents; the hash text encoder is reproducible from its config."""

import pytest
import torch

from fastwam.config import CodecConfig, TextConfig
from fastwam.model.codecs import DCTCodec, PixelCodec, fit_codec_stats
from fastwam.model.encoders import build_codec, build_text_encoder
from fastwam.model.text import HashTextEncoder


def test_pixel_codec_round_trip_and_shapes():
    codec = build_codec(CodecConfig(kind="pixel", space_factor=4))
    video = torch.rand(2, 3, 3, 16, 32) * 2 - 1
    lat = codec.encode(video)
    assert lat.shape == (2, 48, 3, 4, 8)
    assert torch.equal(codec.decode(lat), video)
    # A latent pixel holds exactly one 4x4 RGB patch of its own frame.
    assert torch.equal(lat[0, :, 1, 0, 0].reshape(3, 4, 4), video[0, :, 1, :4, :4])
    with pytest.raises(ValueError, match="not divisible"):
        codec.encode(torch.zeros(1, 3, 1, 10, 16))


def test_dct_codec_is_an_orthonormal_low_pass():
    cfg = CodecConfig(kind="dct", space_factor=8, dct_diagonals=4)
    codec = build_codec(cfg)
    assert codec.latent_channels == cfg.latent_channels() == 30  # 10 frequencies (u + v < 4) per colour
    assert torch.allclose(codec.basis @ codec.basis.T, torch.eye(30), atol=1e-6)
    # Latents -> frames -> latents is exact (every latent is a representable low-pass image) ...
    z = torch.randn(2, 30, 3, 2, 4)
    assert torch.allclose(codec.encode(codec.decode(z)), z, atol=1e-5)
    # ... and frames -> latents -> frames removes exactly the energy of the dropped frequencies (Parseval).
    video = torch.rand(2, 3, 3, 16, 32) * 2 - 1
    kept = codec.coefficients(video)
    residual = (video - codec.decode(codec.encode(video))).pow(2).sum()
    assert torch.allclose(residual, video.pow(2).sum() - kept.pow(2).sum(), rtol=1e-4)
    # The DC coefficient of a constant patch is f * value (orthonormal DCT), every other coefficient 0.
    flat = torch.full((1, 3, 1, 8, 8), 0.5)
    coef = codec.coefficients(flat)[0, :, 0, 0, 0].reshape(3, 10)
    assert torch.allclose(coef[:, 0], torch.full((3,), 4.0)) and coef[:, 1:].abs().max() < 1e-6


def test_dct_codec_statistics_normalise_the_latents():
    cfg = CodecConfig(kind="dct", space_factor=4, dct_diagonals=3)
    video = (torch.rand(8, 3, 2, 16, 16) * 0.4 + 0.3).clamp(-1, 1)
    fitted = fit_codec_stats(cfg, video)
    assert len(fitted.latents_mean) == len(fitted.latents_std) == cfg.latent_channels() == 18
    z = build_codec(fitted).encode(video)
    assert z.mean(dim=(0, 2, 3, 4)).abs().max() < 1e-4
    assert (z.std(dim=(0, 2, 3, 4)) - 1).abs().max() < 1e-3
    assert torch.allclose(build_codec(fitted).decode(z), build_codec(cfg).decode(build_codec(cfg).encode(video)),
                          atol=1e-5)
    with pytest.raises(ValueError, match="18 values each"):
        DCTCodec(4, 3, mean=(0.0,) * 17, std=(1.0,) * 17)


def test_latent_frame_mask():
    codec = PixelCodec(2)
    mask = torch.tensor([[True, True, False]])
    assert torch.equal(codec.latent_frame_mask(mask), mask)
    codec.temporal_factor = 4  # the Wan VAE's grouping: frame 0 alone, then groups of 4
    # The official rule: a latent frame is padding only when all 4 of its pixel frames are.
    mask9 = torch.tensor([[True] * 6 + [False] * 3, [True] * 5 + [False] * 4])
    assert codec.latent_frame_mask(mask9).tolist() == [[True, True, True], [True, True, False]]
    assert codec.latent_frames(9) == 3
    with pytest.raises(ValueError):
        codec.latent_frames(8)


def test_hash_text_encoder_reproducible_and_distinct():
    cfg = TextConfig(kind="hash", max_len=8, vocab_size=512, seed=3)
    a = build_text_encoder(cfg, 16)(["push the puck to the goal", "open the drawer"])
    b = HashTextEncoder(16, 8, 512, 3)(["push the puck to the goal", "open the drawer"])
    assert a.shape == (2, 8, 16) and torch.equal(a, b)
    assert not torch.allclose(a[0], a[1])
    assert torch.equal(a[1, 3:], torch.zeros(5, 16))  # zero padding past the 3 words
    assert not torch.equal(a, build_text_encoder(TextConfig(kind="hash", max_len=8, vocab_size=512, seed=4), 16)(
        ["push the puck to the goal", "open the drawer"]))
    with pytest.raises(TypeError):
        build_text_encoder(cfg, 16)([3])
