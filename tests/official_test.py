"""Contract: fastwam is the official Fast-WAM model, number for number.

tests/fixtures/official_tiny/ was produced by running the official implementation (github.com/yuantianyuan01/FastWAM)
at tiny shapes with random weights (its README lists every tensor): its checkpoint file (fp32 and bf16), the inputs
and the exact noise it drew, and its outputs. Importing the checkpoint and running fastwam on the same inputs must
reproduce every output to 1e-5: sampling in all three modes, the training forward's velocities, loss weights and
losses (with and without padding). The fixture is the reference: never regenerate it or edit its values.
"""

from __future__ import annotations

import json
import pickle
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import fastwam
from fastwam.config import ModelConfig, get_preset
from fastwam.data.normalize import Normalizer
from fastwam.formats.official import (
    OfficialCheckpointError,
    import_official,
    infer_model_config,
    norm_stats_from_official,
    read_official_checkpoint,
)
from fastwam.model import flow
from fastwam.model.codecs import PixelCodec
from fastwam.model.fastwam import TrainingNoise
from fastwam.model.visibility import get_variant

FIXTURE = Path(__file__).parent / "fixtures" / "official_tiny"
TOL = 1e-5


def _fixture_config():
    meta = json.loads((FIXTURE / "model_config.json").read_text())
    return ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["model"].items()}), meta


@pytest.fixture(scope="module")
def inputs():
    return load_file(str(FIXTURE / "inputs.safetensors"))


@pytest.fixture(scope="module")
def expected():
    return load_file(str(FIXTURE / "expected.safetensors"))


def _import(tmp_path: Path, name: str = "checkpoint.pt", **kwargs) -> Path:
    """`fastwam import official` as a function: the tiny preset for the parts the tensors do not determine."""
    model_cfg, _ = _fixture_config()
    base = get_preset("libero_2cam224")
    cfg = base.replace(model=ModelConfig(num_heads=model_cfg.num_heads, action_horizon=model_cfg.action_horizon,
                                         latent_frames=model_cfg.latent_frames))
    return import_official(FIXTURE / name, tmp_path / "run", cfg, stats=FIXTURE / "dataset_stats.json",
                           log=lambda *_: None, **kwargs)


@pytest.fixture(scope="module", params=["checkpoint.pt", "checkpoint_bf16.pt"])
def imported(request, tmp_path_factory):
    ckpt = _import(tmp_path_factory.mktemp("official"), request.param)
    return request.param, fastwam.load_model(ckpt, dtype=torch.float32)


def test_import_infers_the_official_shapes(imported):
    _, model = imported
    want, meta = _fixture_config()
    for field in ("latent_channels", "patch_size", "video_ffn_dim", "num_heads", "head_dim", "num_layers",
                  "action_hidden_dim", "action_ffn_dim", "freq_dim", "text_dim", "action_dim", "state_dim"):
        assert getattr(model.cfg, field) == getattr(want, field), field
    assert not model.training and next(model.parameters()).dtype == torch.float32


@pytest.mark.parametrize("mode", ["fast", "joint", "idm"])
def test_sampling_reproduces_official_actions_and_video(imported, inputs, expected, mode):
    name, model = imported
    prefix = "bf16." if "bf16" in name else ""
    out = model.sample(inputs["first_latent"], inputs["text"], inputs["state"], mode=mode, steps=10, shift=5.0,
                       action_noise=inputs["action_noise"], video_noise=inputs["video_noise"], return_video=True)
    diff = (out.actions - expected[f"{prefix}{mode}.actions"]).abs().max().item()
    assert diff <= TOL, f"{mode} actions differ from the official ones by {diff:.3g}"
    if mode != "fast":
        diff = (out.video - expected[f"{prefix}{mode}.video"]).abs().max().item()
        assert diff <= TOL, f"{mode} video differs from the official one by {diff:.3g}"


def _training_noise(inputs, mode: str) -> TrainingNoise:
    p = f"train.{mode}."
    noise = TrainingNoise(inputs[p + "sigma_video"], inputs[p + "sigma_action"], inputs[p + "noise_video"],
                          inputs[p + "noise_action"])
    if mode == "idm":
        noise.sigma_c, noise.noise_c = inputs[p + "sigma_cond"], inputs[p + "noise_cond"]
    return noise


@pytest.fixture(scope="module")
def imported_fp32(tmp_path_factory):
    """The fp32 checkpoint (the fixture's training outputs are for it)."""
    return fastwam.load_model(_import(tmp_path_factory.mktemp("official_fp32")), dtype=torch.float32)


@pytest.mark.parametrize("mode", ["fast", "joint", "idm"])
def test_training_forward_reproduces_official_velocities_weights_losses(imported_fp32, inputs, expected, mode):
    model = imported_fp32
    variant = get_variant(mode)
    args = (inputs["train.latents"], inputs["train.actions"], inputs["train.state"], inputs["train.text"], variant)
    noise = _training_noise(inputs, mode)
    with torch.no_grad():
        fwd = model.training_forward(*args, noise)
        e = lambda k: expected[f"train.{mode}.{k}"]  # noqa: E731
        assert (fwd.action_velocity - e("action_velocity")).abs().max() <= TOL
        assert (fwd.video_velocity - e("video_velocity")).abs().max() <= TOL
        assert (flow.loss_weight(noise.sigma_v) - e("weight_video")).abs().max() <= TOL
        assert (flow.loss_weight(noise.sigma_a) - e("weight_action")).abs().max() <= TOL
        plain = model.loss(*args, noise=noise)
        # Padding: the fixture gives pixel-frame padding; the official rule maps it to latent frames (4x temporal).
        codec = PixelCodec(2)
        codec.temporal_factor = 4
        latent_valid = codec.latent_frame_mask(~inputs["train.image_is_pad"])
        assert torch.equal(latent_valid, ~inputs["train.latent_is_pad"])
        padded = model.loss(*args, latent_mask=latent_valid, action_mask=~inputs["train.action_is_pad"], noise=noise)
    for out, key in ((plain, ""), (padded, "padded.")):
        for part in ("video", "action", "total"):
            got = getattr(out, part)
            want = e(f"{key}loss_{part}")
            assert abs(got.item() - want.item()) <= TOL, (mode, key, part, got.item(), want.item())
    assert not torch.isclose(plain.total, padded.total)  # the padding case really differs


def test_loss_weight_values():
    """w = (y - y_min) / mean(y - y_min): 0 at sigma 0 and 1, ~2.08 at sigma 0.5, mean ~1 under the shifted draw."""
    w = flow.loss_weight(torch.tensor([0.0, 0.5, 1.0]))
    assert w[0].abs() < 1e-6 and w[2].abs() < 1e-6
    assert w[1].item() == pytest.approx(2.08, abs=0.01)
    draws = flow.sample_sigma(100_000, torch.Generator().manual_seed(0))
    assert flow.loss_weight(draws).mean().item() == pytest.approx(1.0, abs=0.02)


def test_official_normalizer_cases():
    """The official LinearNormalizer's outputs on the official stats file (min/max for LIBERO, z-score for
    RoboTwin), reproduced to 1e-5 through `fastwam.formats.official.norm_stats_from_official`."""
    from safetensors.numpy import load_file as load_numpy

    stats = norm_stats_from_official(json.loads((FIXTURE / "dataset_stats.json").read_text()))
    cases = load_numpy(str(FIXTURE / "normalizer_cases.safetensors"))
    for mode in ("min_max", "z_score"):
        norm = Normalizer(stats, mode)
        for key in ("action", "state"):
            got = norm.normalize(key, cases[f"{key}_raw"])
            np.testing.assert_allclose(got, cases[f"{mode}.{key}_normalized"], rtol=0, atol=1e-5)
            got = norm.unnormalize(key, cases[f"{key}_model"])
            np.testing.assert_allclose(got, cases[f"{mode}.{key}_unnormalized"], rtol=0, atol=1e-5)
            if mode == "min_max":  # and from float32 tensors, as the policy gets a LIBERO state (under z-score,
                # the near-constant action dim divides float32 rounding by its ~1e-5 std: float64 input is needed)
                got = norm.normalize(key, torch.tensor(cases[f"{key}_raw"], dtype=torch.float32)).numpy()
                np.testing.assert_allclose(got, cases[f"{mode}.{key}_normalized"], rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# Import: what is written, and the errors


def test_import_writes_an_ordinary_run(tmp_path):
    ckpt = _import(tmp_path)
    assert ckpt.parent.name == "checkpoints" and (ckpt.parent / "latest").read_text().strip() == ckpt.name
    assert sorted(p.name for p in ckpt.iterdir()) == ["config.json", "model.safetensors", "norm_stats.json"]
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["train"]["variant"] == "fast" and cfg["model"]["num_heads"] == 2
    assert ckpt.name == "step_0001234"
    weights = load_file(str(ckpt / "model.safetensors"))
    official = torch.load(FIXTURE / "checkpoint.pt", weights_only=True)
    assert torch.equal(weights["action.proj_out.weight"], official["mot"]["mixtures.action.head.weight"])
    assert torch.equal(weights["state_proj.weight"], official["proprio_encoder"]["weight"])
    assert torch.equal(weights["video.blocks.1.attn1.to_out.0.weight"],
                       official["mot"]["mixtures.video.blocks.1.self_attn.o.weight"])
    assert len(weights) == len(official["mot"]) + 2
    bf16 = load_file(str(_import(tmp_path / "b", "checkpoint_bf16.pt") / "model.safetensors"))
    assert all(t.dtype == torch.bfloat16 for t in bf16.values())  # the stored dtype is kept


def test_import_cli(tmp_path, capsys):
    from fastwam.cli import main

    rc = main(["import", "official", "--checkpoint", str(FIXTURE / "checkpoint.pt"), "--out", str(tmp_path / "r"),
               "--stats", str(FIXTURE / "dataset_stats.json"), "--variant", "idm", "--config.model.num-heads", "2",
               "--config.model.action-horizon", "8"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "read from the tensors" in out and "head_dim=14" in out
    cfg = json.loads(next((tmp_path / "r" / "checkpoints").glob("step_*/config.json")).read_text())
    assert cfg["train"]["variant"] == "idm" and cfg["inference"]["mode"] == "idm"
    assert cfg["model"]["action_horizon"] == 8 and cfg["data"]["action_horizon"] == 8


def _save(tmp_path: Path, payload, name: str = "bad.pt") -> Path:
    path = tmp_path / name
    torch.save(payload, path)
    return path


def test_mismatched_files_name_every_tensor(tmp_path):
    good = torch.load(FIXTURE / "checkpoint.pt", weights_only=True)
    mot = dict(good["mot"])
    del mot["mixtures.video.blocks.1.ffn.2.bias"], mot["mixtures.action.head.weight"]
    mot["mixtures.action.extra.weight"] = torch.zeros(3)
    mot["mixtures.action.blocks.1.ffn.0.weight"] = torch.zeros(41, 24)
    path = _save(tmp_path, {**good, "mot": mot})
    with pytest.raises(OfficialCheckpointError) as e:
        import_official(path, tmp_path / "run", get_preset("libero_2cam224").replace(model=ModelConfig(num_heads=2)),
                        log=lambda *_: None)
    msg = str(e.value)
    for name in ("video.blocks.1.ffn.net.2.bias", "action.proj_out.weight", "action.extra.weight",
                 "action.blocks.1.ffn.net.0.proj.weight: file (41, 24) vs model (40, 24)"):
        assert name in msg, (name, msg)
    assert not (tmp_path / "run").exists()  # nothing written


def test_unknown_top_level_keys_and_legacy_payload(tmp_path):
    with pytest.raises(OfficialCheckpointError, match="legacy video-only payload"):
        read_official_checkpoint(_save(tmp_path, {"dit": {"x": torch.zeros(1)}, "step": 3}))
    with pytest.raises(OfficialCheckpointError, match="no 'mot' key"):
        read_official_checkpoint(_save(tmp_path, {"model": {}}))
    with pytest.raises(OfficialCheckpointError, match="neither mixtures.video"):
        read_official_checkpoint(_save(tmp_path, {"mot": {"transformer.x": torch.zeros(1)}}))


def test_truncated_file(tmp_path):
    data = (FIXTURE / "checkpoint.pt").read_bytes()
    path = tmp_path / "truncated.pt"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(OfficialCheckpointError, match="not a readable PyTorch checkpoint"):
        read_official_checkpoint(path)
    with pytest.raises(OfficialCheckpointError, match="no such file"):
        read_official_checkpoint(tmp_path / "missing.pt")


class _Exploit:
    """A pickle payload that would run code (touch a file) if unpickled by a general unpickler."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_malicious_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    good = torch.load(FIXTURE / "checkpoint.pt", weights_only=True)
    path = _save(tmp_path, {**good, "step": _Exploit(marker)})
    with pytest.raises(OfficialCheckpointError, match="refused to load"):
        read_official_checkpoint(path)
    assert not marker.exists()
    # A raw pickle (not even a torch zip) is refused the same way.
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps({"mot": _Exploit(marker)}))
    with pytest.raises(OfficialCheckpointError):
        read_official_checkpoint(raw)
    assert not marker.exists()
    assert zipfile.is_zipfile(path)


@pytest.mark.parametrize("content,says", [
    (b"", "the file is empty"),
    (b"step,loss\n1,0.5\n", "it is a text file"),
    (b'{"action": {"mean": [0.0]}}', "it is JSON text"),
    (len(b'{"a":1}').to_bytes(8, "little") + b'{"a":1}', "it is a safetensors file"),
    (b"<!DOCTYPE html><html>", "HTML"),
    (b"\x1f\x8b\x08\x00", "gzip"),
])
def test_a_file_that_is_not_a_torch_checkpoint_says_what_it_is(tmp_path, content, says):
    path = tmp_path / "model.pt"
    path.write_bytes(content)
    with pytest.raises(OfficialCheckpointError, match="not a PyTorch checkpoint") as info:
        read_official_checkpoint(path)
    assert says in str(info.value) and "Python objects" not in str(info.value)


def test_shapes_come_from_tensors_heads_from_the_preset():
    tensors = read_official_checkpoint(FIXTURE / "checkpoint.pt").tensors
    preset = get_preset("libero_2cam224").model
    with pytest.raises(OfficialCheckpointError, match="num-heads"):
        infer_model_config(tensors, preset)  # 28 wide is not 24 heads: the user must say
    cfg, inferred = infer_model_config(tensors, ModelConfig(num_heads=2, action_horizon=8))
    assert inferred["head_dim"] == 14 and inferred["num_layers"] == 2 and inferred["state_dim"] == 3
    # An override that contradicts the tensors is an error, not silently replaced.
    with pytest.raises(OfficialCheckpointError, match="contradict"):
        infer_model_config(tensors, ModelConfig(num_heads=2, num_layers=5), preset_model=preset)


def test_stats_dimension_mismatch(tmp_path):
    stats = json.loads((FIXTURE / "dataset_stats.json").read_text())
    for k, v in stats["action"]["default"].items():
        stats["action"]["default"][k] = [row[:4] for row in v] if isinstance(v[0], list) else v[:4]
    bad = tmp_path / "stats.json"
    bad.write_text(json.dumps(stats))
    shutil.copy(FIXTURE / "checkpoint.pt", tmp_path / "c.pt")
    cfg = get_preset("libero_2cam224").replace(model=ModelConfig(num_heads=2))
    with pytest.raises(OfficialCheckpointError, match="action statistics are 4-d"):
        import_official(tmp_path / "c.pt", tmp_path / "run", cfg, stats=bad, log=lambda *_: None)


def test_policy_noise_is_the_official_evaluations_with_seed_42(inputs):
    """The official LIBERO evaluation seeds every call with 42: action noise from one CPU generator, the full video
    noise (frame 0 then replaced) from a second generator seeded alike. FastWAMPolicy(seed=42) draws exactly that:
    the fixture's noise is the official code's own draw."""
    from types import SimpleNamespace

    from fastwam.policy import FastWAMPolicy

    model_cfg, _ = _fixture_config()
    fake = SimpleNamespace(cfg=SimpleNamespace(model=model_cfg), seed=42)
    action, video = FastWAMPolicy._noise(fake, inputs["first_latent"])
    assert torch.equal(action, inputs["action_noise"])
    assert torch.equal(video, inputs["video_noise"])
    fake.seed = 0
    assert not torch.equal(FastWAMPolicy._noise(fake, inputs["first_latent"])[0], inputs["action_noise"])
