"""Wan weights: diffusers / original layouts load into the video expert and reproduce diffusers' forward; the action
expert is interpolated by the rule of docs/reference.md, "Action-expert initialisation"."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

diffusers = pytest.importorskip("diffusers")
from diffusers import WanTransformer3DModel  # noqa: E402

import fastwam  # noqa: E402
from fastwam.config import ModelConfig  # noqa: E402
from fastwam.model.weights import (  # noqa: E402
    WanCheckpoint,
    build_fastwam_from_wan,
    init_action_expert_from_video,
    load_video_expert,
    model_config_from_diffusers,
    original_to_diffusers_key,
    resize_tensor,
)

# Several shapes: head dims 12 / 16 / 24 (3-D RoPE splits t/h/w = 4/4/4, 8/4/4, 8/8/8), non-square grids, several
# frames, per-token [B, S] and plain [B] timesteps, sharded and single-file checkpoints, with and without the
# cross-attention norm.
CONFIGS = [
    dict(name="hd12_per_token", heads=2, head_dim=12, grid=(3, 4, 6), per_token=True, shard=None, cross_norm=True),
    dict(name="hd16_plain_t_sharded", heads=3, head_dim=16, grid=(2, 6, 4), per_token=False, shard="30KB",
         cross_norm=True),
    dict(name="hd24_per_token_sharded_no_cross_norm", heads=2, head_dim=24, grid=(4, 2, 5), per_token=True,
         shard="20KB", cross_norm=False),
    dict(name="hd16_single_frame_plain_t", heads=2, head_dim=16, grid=(1, 3, 7), per_token=False, shard=None,
         cross_norm=True),
]

IN_CH, TEXT_DIM, FREQ_DIM, FFN, LAYERS = 4, 10, 32, 40, 2


def _wan(heads: int, head_dim: int, cross_norm: bool = True, seed: int = 0) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim, in_channels=IN_CH,
        out_channels=IN_CH, text_dim=TEXT_DIM, freq_dim=FREQ_DIM, ffn_dim=FFN, num_layers=LAYERS,
        cross_attn_norm=cross_norm, rope_max_seq_len=64,
    ).eval()
    with torch.no_grad():  # every tensor non-trivial (norm weights are 1, biases 0 by default)
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


def _inputs(grid, per_token: bool, b: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    f, h, w = grid
    x = torch.randn(b, IN_CH, f, 2 * h, 2 * w, generator=g)
    ctx = torch.randn(b, 5, TEXT_DIM, generator=g)
    if per_token:  # the TI2V convention: first latent frame clean (t = 0), later frames at the sample's level
        t = (torch.rand(b, 1, generator=g) * 1000).expand(b, f * h * w).clone()
        t[:, : h * w] = 0.0
    else:
        t = torch.rand(b, generator=g) * 1000
    return x, t, ctx


def _float64_timestep_embedding(timesteps, embedding_dim, flip_sin_to_cos=False, downscale_freq_shift=1, scale=1,
                                max_period=10000):
    """diffusers' sinusoidal embedding computed in float64, as the official Fast-WAM / Wan code (and fastwam) do:
    diffusers' float32 version differs by ~1e-4 at t ~ 1000, which is not a difference of architecture or weights."""
    from fastwam.model.blocks import timestep_embedding

    assert flip_sin_to_cos and downscale_freq_shift == 0 and scale == 1  # how WanTransformer3DModel calls it
    return timestep_embedding(timesteps, embedding_dim, max_period)


@pytest.mark.parametrize("c", CONFIGS, ids=[c["name"] for c in CONFIGS])
@torch.no_grad()
def test_diffusers_checkpoint_loads_and_matches_diffusers_forward(c, tmp_path, monkeypatch):
    import diffusers.models.embeddings

    monkeypatch.setattr(diffusers.models.embeddings, "get_timestep_embedding", _float64_timestep_embedding)
    ref = _wan(c["heads"], c["head_dim"], c["cross_norm"])
    # The diffusers pipeline layout: <root>/transformer/{config.json, diffusion_pytorch_model*.safetensors}
    kwargs = {"max_shard_size": c["shard"]} if c["shard"] else {}
    ref.save_pretrained(tmp_path / "transformer", **kwargs)
    if c["shard"]:
        assert len(list((tmp_path / "transformer").glob("*.safetensors"))) > 1
        assert (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors.index.json").exists()
    expert = fastwam.load_video_expert(tmp_path)
    assert expert.cfg.head_dim == c["head_dim"] and expert.cfg.cross_attn_norm == c["cross_norm"]
    ref_sd, sd = ref.state_dict(), expert.state_dict()
    assert set(ref_sd) == set(sd)
    assert all(torch.equal(ref_sd[k], sd[k]) for k in sd)
    x, t, ctx = _inputs(c["grid"], c["per_token"])
    want = ref(x, t, ctx).sample
    got = expert(x, t, ctx)
    diff = (want - got).abs().max().item()
    print(f"{c['name']}: max abs diff {diff:.3g} (output scale {want.abs().max().item():.3g})")
    assert got.shape == want.shape
    assert diff <= 1e-5


def _to_original(key: str) -> str:
    """diffusers -> original Wan names, written out by hand (the inverse of the loader's table)."""
    top = {
        "scale_shift_table": "head.modulation",
        "proj_out.weight": "head.head.weight",
        "proj_out.bias": "head.head.bias",
    }
    if key in top:
        return top[key]
    pairs = [
        ("condition_embedder.time_embedder.linear_1.", "time_embedding.0."),
        ("condition_embedder.time_embedder.linear_2.", "time_embedding.2."),
        ("condition_embedder.text_embedder.linear_1.", "text_embedding.0."),
        ("condition_embedder.text_embedder.linear_2.", "text_embedding.2."),
        ("condition_embedder.time_proj.", "time_projection.1."),
        (".attn1.to_q.", ".self_attn.q."), (".attn1.to_k.", ".self_attn.k."), (".attn1.to_v.", ".self_attn.v."),
        (".attn1.to_out.0.", ".self_attn.o."), (".attn1.norm_q.", ".self_attn.norm_q."),
        (".attn1.norm_k.", ".self_attn.norm_k."),
        (".attn2.to_q.", ".cross_attn.q."), (".attn2.to_k.", ".cross_attn.k."), (".attn2.to_v.", ".cross_attn.v."),
        (".attn2.to_out.0.", ".cross_attn.o."), (".attn2.norm_q.", ".cross_attn.norm_q."),
        (".attn2.norm_k.", ".cross_attn.norm_k."),
        (".norm2.", ".norm3."),  # the original cross-attention norm is norm3
        (".ffn.net.0.proj.", ".ffn.0."), (".ffn.net.2.", ".ffn.2."),
        (".scale_shift_table", ".modulation"),
    ]
    for new, old in pairs:
        if new in key:
            return key.replace(new, old)
    return key  # patch_embedding.*


def _original_config(heads: int, head_dim: int) -> dict:
    # The shape of Wan2.2-TI2V-5B's original config.json.
    return {"_class_name": "WanModel", "dim": heads * head_dim, "eps": 1e-6, "ffn_dim": FFN, "freq_dim": FREQ_DIM,
            "in_dim": IN_CH, "model_type": "ti2v", "num_heads": heads, "num_layers": LAYERS, "out_dim": IN_CH,
            "text_len": 512, "text_dim": TEXT_DIM}


@torch.no_grad()
def test_original_layout_gives_identical_weights(tmp_path):
    ref = _wan(3, 16, seed=3)
    ref.save_pretrained(tmp_path / "diffusers")
    original = {_to_original(k): v.contiguous() for k, v in ref.state_dict().items()}
    assert len(original) == len(ref.state_dict())
    assert "blocks.0.norm3.weight" in original and "blocks.0.norm2.weight" not in original
    # Sharded like the real release, with an index.
    d = tmp_path / "original"
    d.mkdir()
    keys = sorted(original)
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    weight_map = {}
    for fname, names in shards.items():
        save_file({k: original[k] for k in names}, str(d / fname))
        weight_map.update({k: fname for k in names})
    (d / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (d / "config.json").write_text(json.dumps(_original_config(3, 16)))
    # And a single file with the "model.diffusion_model." prefix some conversions carry.
    single = tmp_path / "single"
    single.mkdir()
    save_file({f"model.diffusion_model.{k}": v for k, v in original.items()}, str(single / "wan.safetensors"))
    (single / "config.json").write_text(json.dumps(_original_config(3, 16)))

    from_diffusers = load_video_expert(tmp_path / "diffusers")
    for path in (d, single / "wan.safetensors"):
        assert WanCheckpoint.open(path).layout == "original"
        expert = load_video_expert(path)
        assert expert.cfg == dataclasses.replace(from_diffusers.cfg, rope_max_seq_len=1024)  # original default
        a, b = from_diffusers.state_dict(), expert.state_dict()
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    x, t, ctx = _inputs((2, 3, 4), per_token=True)
    assert torch.equal(expert(x, t, ctx), from_diffusers(x, t, ctx))
    # The name table against the hand-written inverse, key by key.
    assert all(original_to_diffusers_key(_to_original(k)) == k for k in ref.state_dict())


@torch.no_grad()
def test_dtype_conversion_and_meta_free(tmp_path):
    ref = _wan(2, 12)
    ref.save_pretrained(tmp_path, max_shard_size="30KB")
    expert = load_video_expert(tmp_path, dtype=torch.bfloat16)
    for k, v in expert.state_dict().items():
        assert v.dtype == torch.bfloat16 and not v.is_meta and v.device.type == "cpu"
        assert torch.equal(v, ref.state_dict()[k].to(torch.bfloat16)), k
    # Parameters are independent copies: writing to them leaves the file alone.
    with torch.no_grad():
        next(expert.parameters()).zero_()
    again = load_video_expert(tmp_path)
    assert torch.equal(again.scale_shift_table, ref.scale_shift_table)


def test_clear_errors(tmp_path):
    ref = _wan(2, 12)
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    cfg = json.loads(json.dumps(ref.config))
    cfg["_class_name"] = "WanTransformer3DModel"

    def write(name, tensors):
        d = tmp_path / name
        d.mkdir()
        save_file(tensors, str(d / "diffusion_pytorch_model.safetensors"))
        (d / "config.json").write_text(json.dumps(cfg))
        return d

    missing = write("missing", {k: v for k, v in sd.items() if k != "blocks.1.attn2.to_k.weight"})
    with pytest.raises(ValueError, match=r"missing keys \(1\): blocks\.1\.attn2\.to_k\.weight"):
        load_video_expert(missing)
    extra = write("extra", {**sd, "blocks.0.attn2.add_k_proj.weight": torch.zeros(3, 3)})
    with pytest.raises(ValueError, match=r"unexpected keys \(1\): blocks\.0\.attn2\.add_k_proj\.weight"):
        load_video_expert(extra)
    bad = dict(sd)
    bad["blocks.0.ffn.net.2.weight"] = torch.zeros(24, 41)
    shape = write("shape", bad)
    want = r"blocks\.0\.ffn\.net\.2\.weight: checkpoint \(24, 41\).* vs model \(24, 40\)"
    with pytest.raises(ValueError, match=want):
        load_video_expert(shape)
    ok = write("ok", sd)
    with pytest.raises(ValueError, match="does not match the checkpoint.*num_heads"):
        load_video_expert(ok, model_cfg=ModelConfig(latent_channels=IN_CH, num_heads=4, head_dim=6))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_video_expert(tmp_path)
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    blob = (ok / "diffusion_pytorch_model.safetensors").read_bytes()
    (truncated / "diffusion_pytorch_model.safetensors").write_bytes(blob[:-100])
    (truncated / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="truncated download"):
        load_video_expert(truncated)


def test_model_config_from_diffusers_5b():
    # The Wan2.2-TI2V-5B-Diffusers transformer config (values from docs/reference.md, "Wan in diffusers").
    cfg_5b = {"_class_name": "WanTransformer3DModel", "added_kv_proj_dim": None, "attention_head_dim": 128,
              "cross_attn_norm": True, "eps": 1e-06, "ffn_dim": 14336, "freq_dim": 256, "image_dim": None,
              "in_channels": 48, "num_attention_heads": 24, "num_layers": 30, "out_channels": 48,
              "patch_size": [1, 2, 2], "pos_embed_seq_len": None, "qk_norm": "rms_norm_across_heads",
              "rope_max_seq_len": 1024, "text_dim": 4096}
    cfg = model_config_from_diffusers(cfg_5b, action_dim=7, state_dim=8, action_horizon=32)
    assert cfg == ModelConfig(action_dim=7, state_dim=8, action_horizon=32)  # the defaults are the 5B model
    original = {"dim": 3072, "eps": 1e-06, "ffn_dim": 14336, "freq_dim": 256, "in_dim": 48, "model_type": "ti2v",
                "num_heads": 24, "num_layers": 30, "out_dim": 48, "text_len": 512}
    assert model_config_from_diffusers(original) == ModelConfig()
    with pytest.raises(ValueError, match="image-to-video"):
        model_config_from_diffusers({**cfg_5b, "image_dim": 1280})
    with pytest.raises(ValueError, match="contradict"):
        model_config_from_diffusers(cfg_5b, num_heads=8)


def test_interpolation_rule_hand_checked():
    """The official initialisation rule: interpolate every dim; scale by sqrt(d_src / d_tgt) only tensors with
    ndim >= 2 whose last dim changed (grown or shrunk); 1-D tensors are never scaled."""
    # 2 x 4 -> 3 x 3. Rows (align_corners): positions 0, 0.5, 1 -> row0, mean(row0, row1), row1.
    src = torch.tensor([[1.0, 2.0, 4.0, 8.0], [3.0, 0.0, -2.0, 5.0]])
    #   rows: [1, 2, 4, 8], [2, 1, 1, 6.5], [3, 0, -2, 5]
    # Columns: positions 0, 1.5, 3 -> col0, mean(col1, col2), col3:
    #   [1, 3, 8], [2, 1, 6.5], [3, -1, 5]; the last dim shrank 4 -> 3: times sqrt(4/3).
    s = math.sqrt(4 / 3)
    want = torch.tensor([[1.0, 3.0, 8.0], [2.0, 1.0, 6.5], [3.0, -1.0, 5.0]]) * s
    torch.testing.assert_close(resize_tensor(src, (3, 3)), want, rtol=0, atol=1e-6)
    # A 2-D tensor whose last dim grows (2 -> 3, positions 0, .5, 1): interpolated and scaled by sqrt(2/3) < 1.
    torch.testing.assert_close(resize_tensor(torch.tensor([[0.0, 4.0]]), (1, 3)),
                               torch.tensor([[0.0, 2.0, 4.0]]) * math.sqrt(2 / 3), rtol=0, atol=1e-6)
    # A 3-D table [1, 2, 4] -> [1, 2, 2] (a modulation table): positions 0, 3 -> columns 0 and 3, times sqrt(2).
    table = torch.tensor([[[1.0, 2.0, 4.0, 8.0], [0.0, -1.0, -2.0, -3.0]]])
    torch.testing.assert_close(resize_tensor(table, (1, 2, 2)),
                               torch.tensor([[[1.0, 8.0], [0.0, -3.0]]]) * math.sqrt(2), rtol=0, atol=1e-6)
    # 1-D tensors (biases, norm weights) are interpolated, never scaled: growing [0, 2, 10] -> positions 0, .5, ..
    torch.testing.assert_close(resize_tensor(torch.tensor([0.0, 2.0, 10.0]), (5,)),
                               torch.tensor([0.0, 1.0, 2.0, 6.0, 10.0]), rtol=0, atol=1e-6)
    # ... and shrinking [1, 2, 4, 8] -> positions 0, 3 -> [1, 8] (no sqrt(2)).
    torch.testing.assert_close(resize_tensor(torch.tensor([1.0, 2.0, 4.0, 8.0]), (2,)),
                               torch.tensor([1.0, 8.0]), rtol=0, atol=1e-6)
    # Only a leading dim shrinks (6 -> 3, positions 0, 2.5, 5): interpolated, no scaling.
    col = torch.tensor([[0.0], [1.0], [4.0], [9.0], [16.0], [25.0]])
    torch.testing.assert_close(resize_tensor(col, (3, 1)), torch.tensor([[0.0], [6.5], [25.0]]), rtol=0, atol=1e-6)
    # Unchanged shape: identity.
    x = torch.randn(3, 5)
    assert torch.equal(resize_tensor(x, (3, 5)), x)


@torch.no_grad()
def test_build_fastwam_from_wan(tmp_path):
    ref = _wan(2, 12)
    ref.save_pretrained(tmp_path)
    overrides = dict(action_hidden_dim=8, action_ffn_dim=16, action_dim=3, state_dim=2, action_horizon=4,
                     latent_frames=2)
    model = build_fastwam_from_wan(tmp_path, seed=0, **overrides)
    assert model.cfg.action_hidden_dim == 8 and model.cfg.head_dim == 12
    vsd, asd = model.video.state_dict(), model.action.state_dict()
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in vsd.items())
    for k, v in asd.items():
        if k.startswith(("action_encoder.", "proj_out.")):
            continue
        torch.testing.assert_close(v, resize_tensor(vsd[k], tuple(v.shape)), rtol=0, atol=0)
    # e.g. the FFN input weight [40, 24] -> [16, 8] and the scale-shift table [1, 6, 24] -> [1, 6, 8] (x sqrt 3);
    # the action expert has no output modulation table (its head is a plain Linear).
    assert asd["blocks.0.ffn.net.0.proj.weight"].shape == (16, 8)
    assert "scale_shift_table" not in asd and "norm_out.weight" not in asd
    torch.testing.assert_close(asd["blocks.0.scale_shift_table"][0, :, 0], vsd["blocks.0.scale_shift_table"][0, :, 0]
                               * math.sqrt(3), rtol=0, atol=1e-6)
    # Random parts come from the seed, reproducibly; the global RNG is untouched.
    state = torch.random.get_rng_state()
    again = build_fastwam_from_wan(tmp_path, seed=0, **overrides)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(again.action.action_encoder.weight, model.action.action_encoder.weight)
    other = build_fastwam_from_wan(tmp_path, seed=1, **overrides)
    assert not torch.equal(other.action.proj_out.weight, model.action.proj_out.weight)
    # The interpolation also works on an action expert the caller built (in place, not on meta).
    from fastwam.model.experts import ActionExpert

    fresh = ActionExpert(model.cfg)
    init_action_expert_from_video(vsd, fresh)
    assert torch.equal(fresh.blocks[1].attn1.to_q.weight, model.action.blocks[1].attn1.to_q.weight)
    # The whole model runs.
    lat = torch.randn(1, IN_CH, 1, 4, 6)
    out = model.sample(lat, torch.randn(1, 3, TEXT_DIM), torch.randn(1, 2), steps=2)
    assert out.actions.shape == (1, 4, 3) and torch.isfinite(out.actions).all()


def test_lazy_export():
    import subprocess
    import sys

    code = "import sys, fastwam; assert 'torch' not in sys.modules; assert callable(fastwam.load_video_expert)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent)
