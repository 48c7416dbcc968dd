"""`fastwam import lerobot`: a Fast-WAM policy in LeRobot's format becomes the same run as the official import.

The LeRobot policy directories here are synthetic: the official fixture's tensors (tests/fixtures/official_tiny) under
LeRobot's names (both key layouts, fp32 and bf16), its dataset statistics in LeRobot's processor files and a
config.json in the shape of LeRobot's `FastWAMConfig` (docs/lerobot_port.md). Importing one must give, tensor for
tensor, what `fastwam import official` gives for the same checkpoint, and so the fixture's official fast actions.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import fastwam
from fastwam.config import ModelConfig, get_preset
from fastwam.data.normalize import Normalizer, NormStats
from fastwam.formats.lerobot_policy import POST_STATS, LeRobotPolicyError, import_lerobot, lerobot_to_official
from fastwam.formats.official import OfficialCheckpointError, import_official

FIXTURE = Path(__file__).parent / "fixtures" / "official_tiny"
TOL = 1e-5
PRE = "policy_preprocessor_step_3_normalizer_processor.safetensors"
MODES = {"MIN_MAX": "min_max", "MEAN_STD": "z_score"}


def lerobot_tensors(name: str = "checkpoint.pt", layout: str = "mixtures") -> dict[str, torch.Tensor]:
    """The official checkpoint's tensors under LeRobot's names: `mixtures` (the published checkpoints) or `layers`
    (newer saves: each block under model.mot.layers.<i>.blocks.<expert>)."""
    official = torch.load(FIXTURE / name, weights_only=True)
    out = {}
    for key, tensor in official["mot"].items():
        m = re.match(r"mixtures\.(video|action)\.blocks\.(\d+)\.(.+)$", key)
        new = f"model.mot.layers.{m[2]}.blocks.{m[1]}.{m[3]}" if layout == "layers" and m else f"model.mot.{key}"
        out[new] = tensor.contiguous()
    for key, tensor in official["proprio_encoder"].items():
        out[f"model.proprio_encoder.{key}"] = tensor.contiguous()
    return out


def lerobot_stats(stats: tuple[str, ...] = ("min", "max", "mean", "std", "q01", "q99")) -> dict[str, torch.Tensor]:
    """The fixture's global statistics as LeRobot's flat `<feature>.<stat>` float32 tensors (+ an image's)."""
    official = json.loads((FIXTURE / "dataset_stats.json").read_text())
    out = {"observation.images.image.mean": torch.zeros(3, 1, 1), "observation.images.image.std": torch.ones(3, 1, 1)}
    for role, feature in (("state", "observation.state"), ("action", "action")):
        for s in stats:
            out[f"{feature}.{s}"] = torch.tensor(official[role]["default"][f"global_{s}"], dtype=torch.float32)
        out[f"{feature}.count"] = torch.tensor([100])
    return out


def lerobot_config(mode: str = "MIN_MAX") -> dict:
    official = json.loads((FIXTURE / "model_config.json").read_text())["official"]
    return {
        "type": "fastwam", "n_obs_steps": 1, "action_dim": 5, "proprio_dim": 3, "action_horizon": 8,
        "n_action_steps": 8, "num_video_frames": 33, "action_video_freq_ratio": 4, "image_size": [224, 448],
        "context_len": 128, "tokenizer_max_len": 128, "use_relative_actions": False, "torch_dtype": "float32",
        "prompt_template": "A video recorded from a robot's point of view executing the following instruction: {task}",
        "num_inference_steps": 10, "inference_seed": 42, "sigma_shift": None, "toggle_action_dimensions": [-1],
        "video_scheduler": official["video_scheduler"], "action_scheduler": official["action_scheduler"],
        "video_dit_config": official["video_dit_config"], "action_dit_config": official["action_dit_config"],
        "normalization_mapping": {"VISUAL": "IDENTITY", "STATE": mode, "ACTION": mode},
        "input_features": {"observation.images.image": {"type": "VISUAL", "shape": [3, 224, 224]},
                           "observation.images.image2": {"type": "VISUAL", "shape": [3, 224, 224]},
                           "observation.state": {"type": "STATE", "shape": [3]}},
        "output_features": {"action": {"type": "ACTION", "shape": [5]}},
    }


def make_policy(path: Path, name: str = "checkpoint.pt", layout: str = "mixtures", mode: str = "MIN_MAX",
                tensors: dict | None = None, stats: dict | None = None) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(lerobot_config(mode), indent=2))
    save_file(tensors if tensors is not None else lerobot_tensors(name, layout), str(path / "model.safetensors"))
    stats = stats if stats is not None else lerobot_stats()
    save_file(stats, str(path / PRE))
    save_file(stats, str(path / POST_STATS))
    return path


def _import(policy: Path, out: Path, log=lambda *_: None) -> Path:
    return import_lerobot(policy, out, get_preset("libero_2cam224"), preset=get_preset("libero_2cam224"), log=log)


def _official(tmp_path: Path, name: str) -> Path:
    cfg = get_preset("libero_2cam224").replace(model=ModelConfig(num_heads=2, action_horizon=8))
    return import_official(FIXTURE / name, tmp_path / "official", cfg, stats=FIXTURE / "dataset_stats.json",
                           log=lambda *_: None)


@pytest.mark.parametrize("layout", ["mixtures", "layers"])
@pytest.mark.parametrize("name", ["checkpoint.pt", "checkpoint_bf16.pt"])
def test_weights_equal_the_official_import_and_reproduce_its_fast_actions(tmp_path, name, layout):
    lines = []
    ckpt = _import(make_policy(tmp_path / "policy", name, layout), tmp_path / "run", lines.append)
    assert f"({layout} layout)" in lines[0]
    got = load_file(str(ckpt / "model.safetensors"))
    want = load_file(str(_official(tmp_path, name) / "model.safetensors"))
    assert sorted(got) == sorted(want)
    for key in want:
        assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key
    # (b) the fixture's official fast actions (10 Euler steps, shift 5, the stored noise), from the imported run
    inputs, expected = load_file(str(FIXTURE / "inputs.safetensors")), load_file(str(FIXTURE / "expected.safetensors"))
    model = fastwam.load_model(ckpt, dtype=torch.float32)
    cfg = json.loads((ckpt / "config.json").read_text())
    out = model.sample(inputs["first_latent"], inputs["text"], inputs["state"], mode=cfg["inference"]["mode"],
                       steps=cfg["inference"]["steps"], shift=cfg["inference"]["shift"],
                       action_noise=inputs["action_noise"], video_noise=inputs["video_noise"])
    prefix = "bf16." if "bf16" in name else ""
    diff = (out.actions - expected[f"{prefix}fast.actions"]).abs().max().item()
    assert diff <= TOL, f"fast actions differ from the official ones by {diff:.3g}"


@pytest.mark.parametrize("mode", ["MIN_MAX", "MEAN_STD"])
def test_config_norm_stats_and_mode_come_through(tmp_path, mode):
    lines = []
    ckpt = _import(make_policy(tmp_path / "policy", mode=mode), tmp_path / "run", lines.append)
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["data"]["normalizer"] == MODES[mode]
    assert cfg["model"]["num_heads"] == 2 and cfg["model"]["action_horizon"] == cfg["data"]["action_horizon"] == 8
    assert (cfg["data"]["num_frames"], cfg["data"]["frame_stride"], cfg["model"]["latent_frames"]) == (9, 4, 3)
    assert cfg["inference"] == {"mode": "fast", "steps": 10, "shift": 5.0} and cfg["train"]["variant"] == "fast"
    norm = NormStats.load(ckpt / "norm_stats.json")
    official = json.loads((FIXTURE / "dataset_stats.json").read_text())
    for role in ("action", "state"):
        for s in ("min", "max", "mean", "std", "q01", "q99"):
            want = np.float32(official[role]["default"][f"global_{s}"]).astype(np.float64)
            np.testing.assert_array_equal(norm[role][s], want)
    # The official normaliser's cases, from the imported stats (float32-rounded, hence 1e-5, not exact)
    from safetensors.numpy import load_file as load_numpy

    cases = load_numpy(str(FIXTURE / "normalizer_cases.safetensors"))
    normalizer = Normalizer(norm, MODES[mode])
    for role in ("action", "state"):
        np.testing.assert_allclose(normalizer.normalize(role, cases[f"{role}_raw"]),
                                   cases[f"{MODES[mode]}.{role}_normalized"], rtol=0, atol=TOL)
        np.testing.assert_allclose(normalizer.unnormalize(role, cases[f"{role}_model"]),
                                   cases[f"{MODES[mode]}.{role}_unnormalized"], rtol=0, atol=TOL)
    # The fixture's near-constant dims (action 2: range 5e-5; state 1: constant) are where LeRobot differs: named.
    text = "\n".join(lines)
    if mode == "MIN_MAX":
        assert "action dimension(s) [2] have max - min < 1e-4" in text and "state dimension(s) [1]" in text
    else:
        assert "state dimension(s) [1] have std = 0" in text


def test_missing_statistics_are_filled_and_said(tmp_path):
    lines = []
    stats = lerobot_stats(("mean", "std"))
    ckpt = _import(make_policy(tmp_path / "policy", mode="MEAN_STD", stats=stats), tmp_path / "run", lines.append)
    norm = NormStats.load(ckpt / "norm_stats.json")
    np.testing.assert_allclose(norm["action"]["max"], norm["action"]["mean"] + norm["action"]["std"])
    np.testing.assert_array_equal(norm["action"]["q99"], norm["action"]["max"])
    assert any("lacks statistics, filled (unused by z_score): min/max and q01/q99 = mean -+ std" in line
               for line in lines)
    match = re.escape(f"{PRE}: no observation.state.min, observation.state.max (the min_max normalizer needs them)")
    with pytest.raises(LeRobotPolicyError, match=match):
        _import(make_policy(tmp_path / "p2", mode="MIN_MAX", stats=stats), tmp_path / "run2")


def test_import_cli(tmp_path, capsys):
    from fastwam.cli import main

    policy = make_policy(tmp_path / "policy", layout="layers", mode="MEAN_STD")
    assert main(["import", "lerobot", "--policy", str(policy), "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "read from the tensors" in out and "normalizer z_score" in out and "--gripper flip01" in out
    ckpt = next((tmp_path / "r" / "checkpoints").glob("step_*"))
    assert sorted(p.name for p in ckpt.iterdir()) == ["config.json", "model.safetensors", "norm_stats.json"]
    # an override that contradicts config.json is refused
    rc = main(["import", "lerobot", "--policy", str(policy), "--out", str(tmp_path / "r2"),
               "--config.inference.steps", "4"])
    assert rc == 2 and "inference.steps=4 vs 10" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------------
# Errors name the file and key; nothing is written


def _refused(tmp_path: Path, policy: Path, match: str) -> None:
    with pytest.raises(OfficialCheckpointError, match=match):  # LeRobotPolicyError, or the shared checks' own
        _import(policy, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_unknown_keys(tmp_path):
    tensors = {**lerobot_tensors(), "model.vae.encoder.weight": torch.zeros(2), "model.mot.extra": torch.zeros(1)}
    _refused(tmp_path, make_policy(tmp_path / "p", tensors=tensors),
             r"model\.safetensors: 2 key\(s\) are not Fast-WAM policy weights .*model\.mot\.extra, model\.vae\.encoder")
    with pytest.raises(LeRobotPolicyError, match="two tensors map to mot.mixtures.video.blocks.0.ffn.0.bias"):
        tensors = lerobot_tensors()
        lerobot_to_official({**tensors, "model.mot.layers.0.blocks.video.ffn.0.bias": torch.zeros(48)})


def test_base_checkpoint_is_refused(tmp_path):
    base = {k: v for k, v in lerobot_tensors().items()
            if not re.match(r"model\.(mot\.mixtures\.action\.(action_encoder|head)\.|proprio_encoder)", k)}
    _refused(tmp_path, make_policy(tmp_path / "p", tensors=base),
             r"model\.safetensors: no model\.mot\.mixtures\.action\.action_encoder\.weight / head\.weight: "
             "a base model")
    no_proprio = {k: v for k, v in lerobot_tensors().items() if "proprio" not in k}
    _refused(tmp_path, make_policy(tmp_path / "p2", tensors=no_proprio), r"no model\.proprio_encoder\.\*")


def test_mis_shaped_weights_are_named(tmp_path):
    tensors = lerobot_tensors()
    tensors["model.mot.mixtures.action.blocks.1.ffn.0.weight"] = torch.zeros(41, 24)
    del tensors["model.mot.mixtures.video.blocks.1.ffn.2.bias"]
    _refused(tmp_path, make_policy(tmp_path / "p", tensors=tensors),
             r"missing 1 tensor\(s\): video\.blocks\.1\.ffn\.net\.2\.bias.*"
             r"action\.blocks\.1\.ffn\.net\.0\.proj\.weight: file \(41, 24\) vs model \(40, 24\)")


def test_missing_files(tmp_path):
    policy = make_policy(tmp_path / "p")
    (policy / POST_STATS).unlink()
    _refused(tmp_path, policy, re.escape(f"{policy / POST_STATS}: no such file"))
    (policy / PRE).unlink()
    _refused(tmp_path, policy, r"expected one policy_preprocessor_step_\*_normalizer_processor\.safetensors .* none")
    (policy / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    _refused(tmp_path, policy, r"model\.safetensors: not a readable safetensors file")
    (policy / "config.json").unlink()
    _refused(tmp_path, policy, r"config\.json: no such file")
    _refused(tmp_path, tmp_path / "nowhere", "not a directory")


@pytest.mark.parametrize("edit, match", [
    ({"normalization_mapping": {"STATE": "QUANTILES", "ACTION": "QUANTILES"}},
     r"normalization_mapping\.STATE is 'QUANTILES'; fastwam imports only MEAN_STD / MIN_MAX"),
    ({"normalization_mapping": {"STATE": "MIN_MAX", "ACTION": "MEAN_STD"}}, "one normalizer for both"),
    ({"use_relative_actions": True}, "use_relative_actions is true"),
    ({"type": "pi0"}, r"\"type\" is 'pi0'"),
    ({"action_dim": 7}, r"config\.json: action_dim is 7 but the weights' is 5"),
    ({"input_features": {f"observation.images.c{i}": {"type": "VISUAL", "shape": [3, 8, 8]} for i in range(3)}},
     r"3 cameras .*, the preset 2: name them with --config\.data\.cameras"),
])
def test_config_errors(tmp_path, edit, match):
    policy = make_policy(tmp_path / "p")
    (policy / "config.json").write_text(json.dumps({**lerobot_config(), **edit}))
    _refused(tmp_path, policy, match)


def test_disagreeing_statistics(tmp_path):
    policy = make_policy(tmp_path / "p")
    stats = lerobot_stats()
    stats["action.max"] = stats["action.max"] + 1
    save_file(stats, str(policy / POST_STATS))
    _refused(tmp_path, policy, f"{PRE} and {POST_STATS} disagree on action.max")
