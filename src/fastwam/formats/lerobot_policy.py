"""Fast-WAM policies in LeRobot's policy format (`policy.type=fastwam`) as fastwam runs: `fastwam import lerobot`.

A LeRobot policy directory (docs/lerobot_port.md; local only, downloaded beforehand) holds `config.json` (LeRobot's
`FastWAMConfig`), `model.safetensors` (both experts and the proprio encoder, no VAE / umT5) and the normaliser's
statistics, flat `<feature>.<stat>` keys, in `policy_preprocessor_step_<i>_normalizer_processor.safetensors` (state)
and `policy_postprocessor_step_0_unnormalizer_processor.safetensors` (action). `model.safetensors` is memory-mapped
from its header (never unpickled); `LEROBOT_KEY_RULES` map its keys (`model.mot.layers.<i>.blocks.<e>.X` of newer saves,
`model.mot.mixtures.<e>.X`) onto the official checkpoint's, and the official importer (`fastwam.formats.official`)
renames, infers the shapes, checks and writes: an unknown key, a base checkpoint (`lerobot/fastwam_base`: no action
encoder / head / proprio encoder) and any missing, unexpected or mis-shaped tensor are refused by name.
`config.json` gives heads, eps, horizon, frame window, inference steps and shift, prompt, and the normaliser mode
(MEAN_STD -> z_score, MIN_MAX -> min_max; others refused).

Normaliser differences: fastwam applies the official rules (`data/normalize.py`) to LeRobot's statistics, where
LeRobot's `NormalizerProcessorStep` (eps 1e-8, float32) computes, per dimension:
  MEAN_STD / z_score: forward both y = (x - mean) / (std + 1e-8), but fastwam clamps y to [-5, 5] (LeRobot does not):
    equal within 5 std, else fastwam's |y| is smaller by |y| - 5 (unbounded; with std = 0, LeRobot gives
    (x - mean) * 1e8, fastwam +-5). Inverse: LeRobot y * std + mean, fastwam y * (std + 1e-8) + mean: |y| * 1e-8.
  MIN_MAX / min_max, r = max - min: for r >= 1e-4 the same y = 2 (x - min) / r - 1 up to the clamp (inputs more than
    2 r outside [min, max]). For r < 1e-4 fastwam only shifts (y = x - min) where LeRobot scales (r = 0: divides by
    1e-8, so x = min gives -1): for x in [min, max] the normalised values differ by up to 1 + r, and un-normalised
    actions by |y - (y + 1) r / 2| <= |y| + r raw units (LeRobot stays in [min, max] for y in [-1, 1]; fastwam gives
    min + y). The import names such dimensions.
  Precision: LeRobot computes in float32, fastwam in float64 (relative 1e-7; amplified on tiny-std dimensions).
Which is right depends on where the weights were trained (converted from the official code: the official rules).
"""

from __future__ import annotations

import dataclasses
import json
import math
import mmap
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
import tyro

from fastwam.config import Config
from fastwam.data.normalize import RANGE_EPS, STAT_KEYS, NormStats
from fastwam.formats.official import OfficialCheckpointError, fastwam_state_dict, write_imported_run
from fastwam.presets import PresetArgs, PresetName, parse_with_preset

CONFIG, WEIGHTS = "config.json", "model.safetensors"
PRE_STATS = "policy_preprocessor_step_*_normalizer_processor.safetensors"
POST_STATS = "policy_postprocessor_step_0_unnormalizer_processor.safetensors"
MODES = {"MEAN_STD": "z_score", "MIN_MAX": "min_max"}  # LeRobot NormalizationMode -> fastwam normalizer
NEEDS = {"z_score": ("mean", "std"), "min_max": ("min", "max")}
# LeRobot model.safetensors key -> (official checkpoint section, key inside it); anything else is an error.
LEROBOT_KEY_RULES = [
    (re.compile(r"^model\.mot\.layers\.(\d+)\.blocks\.(video|action)\.(.+)$"), "mot", r"mixtures.\2.blocks.\1.\3"),
    (re.compile(r"^model\.mot\.mixtures\.(video|action)\.(.+)$"), "mot", r"mixtures.\1.\2"),
    (re.compile(r"^model\.proprio_encoder\.(weight|bias)$"), "proprio_encoder", r"\1"),
]


class LeRobotPolicyError(OfficialCheckpointError):
    """A LeRobot policy directory that cannot be imported; the message names the file and key."""


def lerobot_to_official(tensors: dict[str, torch.Tensor], source: str = WEIGHTS) -> dict[str, dict[str, Any]]:
    """LeRobot state-dict keys -> the official checkpoint's {"mot": ..., "proprio_encoder": ...}."""
    payload: dict[str, dict[str, Any]] = {"mot": {}, "proprio_encoder": {}}
    unknown = []
    for key, tensor in tensors.items():
        for pattern, section, template in LEROBOT_KEY_RULES:
            if pattern.match(key):
                new = pattern.sub(template, key)
                if new in payload[section]:
                    raise LeRobotPolicyError(f"{source}: two tensors map to {section}.{new} (second: {key})")
                payload[section][new] = tensor
                break
        else:
            unknown.append(key)
    if unknown:
        raise LeRobotPolicyError(f"{source}: {len(unknown)} key(s) are not Fast-WAM policy weights "
                                 f"(model.mot.* / model.proprio_encoder.*): {', '.join(sorted(unknown)[:12])}")
    lacking = [p for p in ("action_encoder.weight", "head.weight") if f"mixtures.action.{p}" not in payload["mot"]]
    if lacking:
        raise LeRobotPolicyError(f"{source}: no model.mot.mixtures.action.{' / '.join(lacking)}: a base model (like "
                                 "lerobot/fastwam_base), not a trained policy (action encoder, head, proprio encoder)")
    if not payload["proprio_encoder"]:
        raise LeRobotPolicyError(f"{source}: no model.proprio_encoder.* (a base model, or proprio_dim null); "
                                 "fastwam's Fast-WAM always takes the robot state")
    return payload


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file as zero-copy views of a private memory map (no pickle, no copy)."""
    from fastwam.model.weights import read_header

    try:
        infos = read_header(path)
    except FileNotFoundError:
        raise LeRobotPolicyError(f"{path}: no such file") from None
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise LeRobotPolicyError(f"{path}: not a readable safetensors file: {e}") from None
    with open(path, "rb") as f:  # ACCESS_COPY: private and writable (torch.frombuffer wants that); nothing is written
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    return {name: torch.frombuffer(mm, dtype=i.dtype, count=math.prod(i.shape), offset=i.start).view(i.shape)
            if math.prod(i.shape) else torch.empty(i.shape, dtype=i.dtype) for name, i in infos.items()}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise LeRobotPolicyError(f"{path}: no such file (not a LeRobot policy directory?)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LeRobotPolicyError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise LeRobotPolicyError(f"{path}: expected a JSON object")
    return data


def _feature(lr: dict, kind: str, default: str, where: str) -> str:
    feats = {**(lr.get("input_features") or {}), **(lr.get("output_features") or {})}
    names = [k for k, v in feats.items() if isinstance(v, dict) and v.get("type") == kind]
    if len(names) > 1:
        raise LeRobotPolicyError(f"{where}: more than one {kind} feature: {names}")
    return names[0] if names else default


def normalizer_mode(lr: dict, where: str = CONFIG) -> str:
    """fastwam's normalizer for the config's `normalization_mapping` (one mode for STATE and ACTION)."""
    mapping = lr.get("normalization_mapping") or {"STATE": "MEAN_STD", "ACTION": "MEAN_STD"}  # LeRobot's default
    modes = {k: str(mapping.get(k, "MEAN_STD")) for k in ("STATE", "ACTION")}
    for k, m in modes.items():
        if m not in MODES:
            raise LeRobotPolicyError(f"{where}: normalization_mapping.{k} is {m!r}; fastwam imports only "
                                     f"{' / '.join(MODES)} (-> {' / '.join(MODES.values())})")
    if modes["STATE"] != modes["ACTION"]:
        raise LeRobotPolicyError(f"{where}: normalization_mapping has STATE {modes['STATE']} but ACTION "
                                 f"{modes['ACTION']}; fastwam has one normalizer for both")
    return MODES[modes["ACTION"]]


def _stats_file(path: Path) -> dict[str, np.ndarray]:
    from safetensors.torch import load_file

    try:
        return {k: v.double().numpy() for k, v in load_file(str(path)).items()}
    except FileNotFoundError:
        raise LeRobotPolicyError(f"{path}: no such file (the policy's normaliser statistics)") from None
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for broken files
        raise LeRobotPolicyError(f"{path}: not a readable safetensors file ({' '.join(str(e).split())})") from None


def _fill(st: dict[str, np.ndarray]) -> list[str]:
    """Complete min/max/mean/std/q01/q99 in place from the pairs present; returns what was filled, and from what."""
    has = lambda a, b: a in st and b in st  # noqa: E731
    filled = []
    if not has("q01", "q99") and has("min", "max"):
        st["q01"], st["q99"] = st["min"], st["max"]
        filled.append("q01/q99 = min/max")
    if not has("min", "max") and has("q01", "q99"):
        st["min"], st["max"] = st["q01"], st["q99"]
        filled.append("min/max = q01/q99")
    if not has("min", "max") and has("mean", "std"):  # so that min_max on them behaves as z_score
        st["min"], st["max"] = st["mean"] - st["std"], st["mean"] + st["std"]
        st["q01"], st["q99"] = st["min"], st["max"]
        filled.append("min/max and q01/q99 = mean -+ std")
    if not has("mean", "std") and has("min", "max"):  # so that z_score on them behaves as min_max
        st["mean"], st["std"] = (st["max"] + st["min"]) / 2, (st["max"] - st["min"]) / 2
        filled.append("mean/std = (max + min) / 2, (max - min) / 2")
    return filled


def read_norm_stats(policy: Path, lr: dict, mode: str, log=print) -> NormStats:
    """State statistics from the preprocessor's normaliser file, action statistics from the postprocessor's."""
    pre = sorted(policy.glob(PRE_STATS))
    if len(pre) != 1:
        raise LeRobotPolicyError(f"{policy}: expected one {PRE_STATS} (the state statistics), found "
                                 f"{[p.name for p in pre] or 'none'}")
    files = {"state": (pre[0], _feature(lr, "STATE", "observation.state", str(policy / CONFIG))),
             "action": (policy / POST_STATS, _feature(lr, "ACTION", "action", str(policy / CONFIG)))}
    flat = {p: _stats_file(p) for p in (pre[0], policy / POST_STATS)}
    out = {}
    for role, (path, feature) in files.items():
        st = {s: flat[path][f"{feature}.{s}"].reshape(-1) for s in STAT_KEYS if f"{feature}.{s}" in flat[path]}
        lacking = [f"{feature}.{s}" for s in NEEDS[mode] if s not in st]
        if lacking:
            raise LeRobotPolicyError(f"{path}: no {', '.join(lacking)} (the {mode} normalizer needs them)")
        other = flat[pre[0]] if role == "action" else {}
        for s, v in st.items():  # the preprocessor normalises actions for training: it must agree
            if f"{feature}.{s}" in other and not np.array_equal(other[f"{feature}.{s}"].reshape(-1), v):
                raise LeRobotPolicyError(f"{pre[0].name} and {path.name} disagree on {feature}.{s}")
        if not all(np.all(np.isfinite(v)) for v in st.values()):
            raise LeRobotPolicyError(f"{path}: {feature} statistics are not finite")
        if filled := _fill(st):
            log(f"[import] {path.name}: {feature} lacks statistics, filled (unused by {mode}): " + "; ".join(filled))
        out[role] = st
    try:
        norm = NormStats(out)
    except ValueError as e:
        raise LeRobotPolicyError(f"{policy}: {e}") from None
    rule = {"min_max": "max - min < 1e-4: fastwam only shifts them, LeRobot scales",
            "z_score": "std = 0: LeRobot multiplies deviations by 1e8, fastwam clamps to +-5"}[mode]
    for role, st in norm.stats.items():
        odd = st["max"] - st["min"] < RANGE_EPS if mode == "min_max" else st["std"] == 0
        if odd.any():
            log(f"[import] note: {role} dimension(s) {np.flatnonzero(odd).tolist()} have {rule} "
                "(docs/lerobot_port.md, 'Normaliser differences')")
    return norm


def config_from_lerobot(lr: dict, cfg: Config, preset: Config | None, where: str = CONFIG) -> Config:
    """`cfg` with what the LeRobot config fixes; a user override (differing from the preset) that contradicts it is an
    error. Shapes are not taken from here but from the tensors."""
    def get(d: dict, key: str, kind: type, default: Any = None) -> Any:
        value = d.get(key, default)
        if value is None or (kind is float and type(value) is int):
            return value
        if type(value) is not kind:
            raise LeRobotPolicyError(f"{where}: {key} must be {kind.__name__}, got {value!r}")
        return value

    if lr.get("type") != "fastwam":
        raise LeRobotPolicyError(f"{where}: \"type\" is {lr.get('type')!r}, not \"fastwam\"")
    if lr.get("use_relative_actions"):
        raise LeRobotPolicyError(f"{where}: use_relative_actions is true (actions relative to the state); fastwam "
                                 "predicts absolute actions")
    video, action = lr.get("video_dit_config") or {}, lr.get("action_dit_config") or {}
    heads = get(video, "num_heads", int, 24)
    if get(action, "num_heads", int, heads) != heads:
        raise LeRobotPolicyError(f"{where}: the experts have {heads} and {action['num_heads']} heads")
    frames, ratio = get(lr, "num_video_frames", int, 33), get(lr, "action_video_freq_ratio", int, 4)
    if ratio <= 0 or (frames - 1) % ratio or ((frames - 1) // ratio) % 4:
        raise LeRobotPolicyError(f"{where}: num_video_frames {frames} / action_video_freq_ratio {ratio} do not give "
                                 "4k + 1 model frames")
    shift = get(lr, "sigma_shift", float)
    shift = get(lr.get("action_scheduler") or {}, "infer_shift", float, 5.0) if shift is None else shift
    values = {
        "model": dict(num_heads=heads, eps=float(get(video, "eps", float, 1e-6)),
                      action_horizon=get(lr, "action_horizon", int, 32), latent_frames=(frames - 1) // ratio // 4 + 1),
        "data": dict(num_frames=(frames - 1) // ratio + 1, frame_stride=ratio, normalizer=normalizer_mode(lr, where)),
        "inference": dict(steps=get(lr, "num_inference_steps", int, 10), shift=float(shift), mode="fast"),
        "text": dict(template=get(lr, "prompt_template", str, cfg.text.template),
                     max_len=get(lr, "tokenizer_max_len", int, 128)),
        "train": dict(variant="fast"),
    }
    clash = [f"{s}.{k}={getattr(getattr(cfg, s), k)!r} vs {v!r}" for s, fields in values.items()
             for k, v in fields.items() if preset is not None and getattr(getattr(cfg, s), k) != v
             and getattr(getattr(cfg, s), k) != getattr(getattr(preset, s), k)]
    if clash:
        raise LeRobotPolicyError(f"overrides contradict {where} (override vs file): {', '.join(clash)}")
    return cfg.replace(**{s: dataclasses.replace(getattr(cfg, s), **f) for s, f in values.items()})


def import_lerobot(policy: str | Path, out: str | Path, cfg: Config, preset: Config | None = None, log=print) -> Path:
    """Write a LeRobot Fast-WAM policy directory as a fastwam run; returns the checkpoint directory."""
    policy = Path(policy)
    if not policy.is_dir():
        raise LeRobotPolicyError(f"{policy}: not a directory (a LeRobot policy directory, downloaded beforehand)")
    lr = _read_json(policy / CONFIG)
    cfg = config_from_lerobot(lr, cfg, preset, str(policy / CONFIG))
    raw = read_weights(policy / WEIGHTS)
    tensors = fastwam_state_dict(lerobot_to_official(raw, str(policy / WEIGHTS)), str(policy / WEIGHTS))
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    layout = "layers" if any(k.startswith("model.mot.layers.") for k in raw) else "mixtures"
    log(f"[import] {policy.name}: {len(raw)} tensors ({layout} layout), {size / 1e9:.2f} GB")
    for key, dim in (("action_dim", tensors["action.action_encoder.weight"].shape[1]),
                     ("proprio_dim", tensors["state_proj.weight"].shape[1])):
        if key in lr and lr[key] != dim:
            raise LeRobotPolicyError(f"{policy / CONFIG}: {key} is {lr[key]} but the weights' is {dim}")
    norm = read_norm_stats(policy, lr, cfg.data.normalizer, log)
    log(f"[import] from {CONFIG}: {cfg.data.num_frames} frames every {cfg.data.frame_stride}, normalizer "
        f"{cfg.data.normalizer}, {cfg.inference.steps} steps, shift {cfg.inference.shift}")
    cams = sorted(k for k, v in (lr.get("input_features") or {}).items() if (v or {}).get("type") == "VISUAL")
    if cams and len(cams) != len(cfg.data.cameras):
        raise LeRobotPolicyError(f"{policy / CONFIG}: {len(cams)} cameras {cams}, the preset {len(cfg.data.cameras)}: "
                                 "name them with --config.data.cameras (and --config.data.layout)")
    log(f"[import] LeRobot cameras {cams} (sorted, as LeRobot stacks them) are fastwam's {list(cfg.data.cameras)}; "
        f"not converted: toggle_action_dimensions {lr.get('toggle_action_dimensions', [])} ([-1]: `fastwam eval libero "
        f"--gripper flip01`), n_action_steps {lr.get('n_action_steps')} (--replan), inference_seed "
        f"{lr.get('inference_seed', 42)} (FastWAMPolicy seed)")
    return write_imported_run(tensors, out, cfg, preset, norm, source=str(policy / WEIGHTS),
                              stats_source=str(policy), kept_from=f"{CONFIG} / the preset", log=log)


@dataclasses.dataclass(kw_only=True)
class ImportLeRobotArgs(PresetArgs):
    """Import a Fast-WAM policy saved in LeRobot's format (config.json, model.safetensors, processor files)."""

    preset: PresetName = "libero_2cam224"  # config preset for what the policy files do not fix (cameras, codec, text)
    config: Config
    policy: str = tyro.MISSING  # the LeRobot policy directory, local or hf://ORG/NAME[/SUBDIR][@REVISION]
    out: str = tyro.MISSING  # run directory to write (RUN/checkpoints/step_0000000/)


def cli(argv: list[str], prog: str = "fastwam import lerobot") -> int:
    from fastwam.config import get_preset

    args = parse_with_preset(argv, ImportLeRobotArgs, prog)
    from fastwam.hub import local_folder

    import_lerobot(local_folder(args.policy), args.out, args.config, preset=get_preset(args.config.name))
    return 0
