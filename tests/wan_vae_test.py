"""The Wan2.2 VAE wrapper on a tiny random AutoencoderKLWan in the Wan2.2 configuration (48 latent channels)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import AutoencoderKLWan  # noqa: E402

from fastwam.config import CodecConfig  # noqa: E402
from fastwam.model.encoders import build_codec  # noqa: E402
from fastwam.model.wan_vae import WanVAECodec  # noqa: E402

MEAN = [0.05 * i - 1.0 for i in range(48)]
STD = [0.5 + 0.03 * i for i in range(48)]


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    # Wan2.2's structure (is_residual, 12 in/out channels = 3 x 2x2 patch, z 48, 16x / 4x compression) at a tiny width;
    # the decoder wider than the encoder as in the real model (base 160, decoder 256).
    torch.manual_seed(0)
    vae = AutoencoderKLWan(
        base_dim=16, decoder_base_dim=24, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
        temperal_downsample=[False, True, True], is_residual=True, in_channels=12, out_channels=12, patch_size=2,
        scale_factor_spatial=16, scale_factor_temporal=4, latents_mean=MEAN, latents_std=STD,
    )
    root = tmp_path_factory.mktemp("wan22")
    vae.save_pretrained(root / "vae")
    return root


def test_encode_decode_shapes_and_normalisation(vae_dir):
    codec = WanVAECodec.from_pretrained(vae_dir)  # the pipeline root (holds vae/)
    assert (codec.latent_channels, codec.spatial_factor, codec.temporal_factor) == (48, 16, 4)
    video = torch.rand(2, 3, 5, 64, 96, generator=torch.Generator().manual_seed(1)) * 2 - 1
    lat = codec.encode(video)
    assert lat.shape == (2, 48, 2, 4, 6) and lat.dtype == torch.float32
    # Normalisation as the TI2V pipeline: (z - mean) / std on the posterior mean.
    raw = AutoencoderKLWan.from_pretrained(vae_dir / "vae").eval()
    with torch.no_grad():
        z = raw.encode(video).latent_dist.mode()
    mean, std = torch.tensor(MEAN).view(1, 48, 1, 1, 1), torch.tensor(STD).view(1, 48, 1, 1, 1)
    torch.testing.assert_close(lat, (z - mean) / std, rtol=1e-5, atol=1e-5)
    # Deterministic; per-sample results do not depend on the batch.
    torch.testing.assert_close(codec.encode(video[1:]), lat[1:], rtol=1e-5, atol=1e-5)
    frames = codec.decode(lat)
    assert frames.shape == video.shape and frames.min() >= -1 and frames.max() <= 1
    with torch.no_grad():
        want = raw.decode(lat * std + mean).sample
    torch.testing.assert_close(frames, want, rtol=1e-5, atol=1e-5)
    # A single frame (the observation) -> one latent frame.
    assert codec.encode(video[:, :, :1]).shape == (2, 48, 1, 4, 6)
    assert codec.latent_frames(9) == 3


def test_frozen_and_built_from_config(vae_dir):
    codec = build_codec(CodecConfig(kind="wan_vae", path=str(vae_dir / "vae")))
    assert isinstance(codec, WanVAECodec)
    assert not any(p.requires_grad for p in codec.parameters())
    codec.train()
    assert not codec.vae.training
    video = torch.zeros(1, 3, 5, 32, 32, requires_grad=True)
    assert not codec.encode(video).requires_grad


def test_errors(vae_dir, tmp_path):
    codec = WanVAECodec.from_pretrained(vae_dir / "vae")
    with pytest.raises(ValueError, match="temporal factor"):
        codec.encode(torch.zeros(1, 3, 4, 32, 32))
    with pytest.raises(ValueError, match="not divisible"):
        codec.encode(torch.zeros(1, 3, 1, 40, 32))
    with pytest.raises(FileNotFoundError, match="vae/config.json"):
        WanVAECodec.from_pretrained(tmp_path)
