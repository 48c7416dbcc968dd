"""Load-time validation: a bad config / checkpoint fails when the policy loads (so before serving), with one line that
names the file and the field and says what to do (`fastwam.validate`, `Config.from_dict`)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastwam import checkpoint as ckpt_io
from fastwam.config import Config, ConfigError, get_preset
from fastwam.data.synthetic import SyntheticClips
from fastwam.lru import LRUCache
from fastwam.policy import FastWAMPolicy
from fastwam.train import train

# --------------------------------------------------------------------------------------------- Config.from_dict types


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("inference.steps", "3", 'inference.steps must be an int, got "3"'),
        ("model.action_horizon", 4.5, "model.action_horizon must be an int, got 4.5"),
        ("model.num_layers", "2", 'model.num_layers must be an int, got "2"'),
        ("model.num_layers", True, "model.num_layers must be an int, got true"),
        ("train.variant", "warp",
         'train.variant must be one of "fast", "joint", "idm", "no_cotrain", "video", got "warp"'),
        ("inference.mode", 1, "inference.mode must be one of"),
        ("data.image_size", "8x8", 'data.image_size must be a list, got "8x8"'),
        ("data.image_size", [8], "data.image_size must be a list of 2 values, got [8]"),
        ("data.image_size", [8, "8"], 'data.image_size[1] must be an int, got "8"'),
        ("data.cameras", ["a", 3], "data.cameras[1] must be a string, got 3"),
        ("model.cross_attn_norm", 1, "model.cross_attn_norm must be true or false, got 1"),
        ("inference.shift", "5", 'inference.shift must be a finite number, got "5"'),
        ("train.lr", float("nan"), "train.lr must be a finite number, got NaN"),
        ("codec.latents_std", [1.0, None], "codec.latents_std[1] must be a finite number, got null"),
        ("text.path", 3, "text.path must be a string, got 3"),
        ("model", [1], "model must be a mapping (a JSON object), got [1]"),
    ],
)
def test_from_dict_checks_types_by_dotted_path(path: str, value, message: str) -> None:
    d = get_preset("tiny").to_dict()
    section, _, name = path.partition(".")
    if name:
        d[section][name] = value
    else:
        d[section] = value
    with pytest.raises(ConfigError) as info:
        Config.from_dict(d)
    assert message in str(info.value)


def test_from_dict_accepts_ints_for_floats_and_lists_for_tuples() -> None:
    d = get_preset("tiny").to_dict()
    d["inference"]["shift"] = 5
    d["train"]["betas"] = [0, 1]
    cfg = Config.from_dict(d)
    assert cfg.inference.shift == 5.0 and type(cfg.inference.shift) is float
    assert cfg.train.betas == (0.0, 1.0) and cfg.data.image_size == (8, 8)


# ------------------------------------------------------------------------------------------------- whole checkpoints


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory) -> Path:
    cfg = get_preset("tiny")
    cfg = cfg.replace(train=dataclasses.replace(cfg.train, steps=2, save_every=2, batch_size=2))
    out = tmp_path_factory.mktemp("validate_run")
    train(cfg, out, dataset=SyntheticClips(cfg.data, num_clips=4), progress=False)
    return ckpt_io.resolve_checkpoint(out)


def _edit_json(name: str, edit):
    def apply(ckpt: Path) -> None:
        data = json.loads((ckpt / name).read_text())
        edit(data)
        (ckpt / name).write_text(json.dumps(data))  # NaN is written as the NaN literal json.loads accepts

    return apply


def _set(section: str, field: str, value):
    return _edit_json("config.json", lambda d: d[section].__setitem__(field, value))


def _stats(role: str, stat: str, index: int, value):
    return _edit_json("norm_stats.json", lambda d: d[role][stat].__setitem__(index, value))


def _five_d_stats(d: dict) -> None:
    for stat in d["action"]:
        d["action"][stat].append(0.5)


def _truncate(name: str, keep: float):
    def apply(ckpt: Path) -> None:
        data = (ckpt / name).read_bytes()
        (ckpt / name).write_bytes(data[: int(len(data) * keep)])

    return apply


def _nan_weight(ckpt: Path) -> None:
    tensors = load_file(str(ckpt / ckpt_io.WEIGHTS))
    name = sorted(k for k, v in tensors.items() if v.is_floating_point())[0]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, str(ckpt / ckpt_io.WEIGHTS))


BAD = {
    "steps_str": (_set("inference", "steps", "3"), "config.json", 'inference.steps must be an int, got "3"'),
    "steps_negative": (_set("inference", "steps", -1), "config.json", "inference.steps must be >= 1, got -1"),
    "horizon_float": (_set("model", "action_horizon", 4.5), "config.json", "model.action_horizon must be an int"),
    "variant": (_set("train", "variant", "warp"), "config.json", 'train.variant must be one of'),
    "shift_zero": (_set("inference", "shift", 0.0), "config.json", "inference.shift must be > 0, got 0.0"),
    "no_cameras": (_set("data", "cameras", []), "config.json", "data.cameras is empty"),
    "config_truncated": (_truncate("config.json", 0.5), "config.json", ("not valid JSON", "Expecting")),
    "stats_nan": (_stats("action", "max", 1, float("nan")), "norm_stats.json", "action.max[1] is NaN"),
    "stats_inf": (_stats("state", "std", 0, float("inf")), "norm_stats.json", "state.std[0] is inf"),
    "stats_5d": (_edit_json("norm_stats.json", _five_d_stats), "norm_stats.json",
                 "action.min has 5 dimension(s) but config.json's model.action_dim is 4"),
    "stats_flipped": (_stats("state", "min", 0, 1e9), "norm_stats.json", "state.min[0] = 1000000000.0 is above"),
    "stats_truncated": (_truncate("norm_stats.json", 0.5), "norm_stats.json", "truncated"),
    "stats_missing": (lambda c: (c / "norm_stats.json").unlink(), "norm_stats.json", "missing"),
    "weights_truncated": (_truncate("model.safetensors", 0.6), "model.safetensors", "truncated or damaged"),
    "weights_empty": (_truncate("model.safetensors", 0.0), "model.safetensors", "is empty (0 bytes)"),
    "weights_nan": (_nan_weight, "model.safetensors", "holds 1 non-finite value(s) (NaN or inf)"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_checkpoint_fails_at_load_with_one_line_naming_file_and_field(good_checkpoint, tmp_path, case) -> None:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(good_checkpoint, ckpt)
    corrupt, file, message = BAD[case]
    corrupt(ckpt)
    with pytest.raises(ckpt_io.CheckpointError) as info:
        FastWAMPolicy.from_pretrained(ckpt)
    text = str(info.value)
    assert "\n" not in text, text
    alternatives = message if isinstance(message, tuple) else (message,)
    assert file in text and any(m in text for m in alternatives), text
    assert any(hint in text for hint in ("fix", "re-copy", "copy the whole", "use the", "serve an earlier")), text


def test_good_checkpoint_loads_and_names_itself_without_paths(good_checkpoint) -> None:
    policy = FastWAMPolicy.from_pretrained(good_checkpoint)
    meta = policy.metadata
    assert meta["checkpoint"] == f"{good_checkpoint.parent.parent.name}/{good_checkpoint.name}"
    assert meta["checkpoint_step"] == 2 and len(meta["checkpoint_sha256"]) == 16
    assert str(good_checkpoint.parent.parent) not in json.dumps(meta)


def test_serve_refuses_a_bad_checkpoint_in_one_line(good_checkpoint, tmp_path) -> None:
    """`fastwam serve` itself: exit code 2, one line on stderr naming the file and field, no traceback."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(good_checkpoint, ckpt)
    _stats("action", "std", 2, float("nan"))(ckpt)
    env = {**os.environ, "FASTWAM_DEBUG": ""}
    proc = subprocess.run(
        [sys.executable, "-m", "fastwam", "serve", "--checkpoint", str(ckpt), "--port", "0", "--log-level", "ERROR"],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "norm_stats.json: action.std[2] is NaN" in lines[0], proc.stderr


# ---------------------------------------------------------------------------------------------------------- LRUCache


def test_lru_cache_bounds_entries_and_bytes() -> None:
    cache: LRUCache[str, torch.Tensor] = LRUCache(3, 10_000, lambda k, v: v.nelement() * v.element_size())
    for i in range(5):
        cache.put(f"p{i}", torch.zeros(10))
    assert len(cache) == 3 and "p0" not in cache and "p4" in cache and cache.nbytes == 120
    assert cache.get("p2") is not None  # now most recent: survives the next insert
    cache.put("p5", torch.zeros(10))
    assert "p2" in cache and "p3" not in cache
    big = LRUCache(100, 100, lambda k, v: v.nelement() * v.element_size())
    for i in range(10):
        big.put(i, torch.zeros(10))  # 40 bytes each: two fit
    assert len(big) == 2 and big.nbytes == 80
    big.put("huge", torch.zeros(1000))  # larger than the bound: kept alone for its caller, dropped by the next put
    assert big.get("huge") is not None and len(big) == 1
    assert big.stats()["evictions"] == 10
