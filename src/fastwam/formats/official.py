"""Checkpoints of the official Fast-WAM code (github.com/yuantianyuan01/FastWAM) as fastwam runs.

An official checkpoint (`libero_uncond_2cam224.pt`, `robotwin_uncond_3cam_384.pt`) is a `torch.save` of
`{"mot": MoT state dict, "proprio_encoder": {"weight", "bias"}, "step": int, "torch_dtype": "torch.bfloat16"}`
(sometimes with an `"optimizer"`); its dataset-stats file holds the normalisation statistics. `fastwam import
official` turns both into an ordinary fastwam run directory (config.json, model.safetensors, norm_stats.json) that
`fastwam serve`, `FastWAMPolicy.from_pretrained`, `fastwam eval libero` and `fastwam.load_model` use unchanged.

Safety and memory: the file is read with `torch.load(weights_only=True, mmap=True)` only — tensors and plain
containers, never a general unpickler, so a file carrying a Python object is refused without running it — and its
tensors stay memory-mapped: they become the parameters of a model built on the meta device and safetensors (>= 0.8)
writes them to disk straight from the mapping, so the 12 GB 5B checkpoint is never held twice (`fastwam bench memory
--official`: peak RAM 0.86-1.0x the file). Shapes are checked against a model built on the meta device before
anything is written.

Key names (docs/reference.md, "The official checkpoint"): `mixtures.video.X` is the video expert in the original
Wan layout (renamed to diffusers' names as for any Wan checkpoint, `model/wan_checkpoint.py`); `mixtures.action.X` the
action expert, with the same renames plus `action_encoder.*` and `head.*` (our `proj_out`, a plain Linear);
`proprio_encoder.*` is our `state_proj`.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import tyro

from fastwam.config import Config, ModelConfig
from fastwam.data.normalize import STAT_KEYS, NormStats
from fastwam.errors import UserError
from fastwam.model.weights import diffusers_to_original_key, original_to_diffusers_key
from fastwam.presets import PresetArgs, PresetName, parse_with_preset

VIDEO_PREFIX, ACTION_PREFIX = "mixtures.video.", "mixtures.action."


class OfficialCheckpointError(UserError):
    """An official checkpoint or stats file that cannot be imported; the message says what is wrong and where."""


# ---------------------------------------------------------------------------------------------------------------------
# Key names


def official_to_fastwam_key(key: str) -> str | None:
    """One `mot` key of an official checkpoint -> its fastwam state-dict key (None: not a key we know)."""
    if key.startswith(VIDEO_PREFIX):
        return "video." + original_to_diffusers_key(key[len(VIDEO_PREFIX):])
    if key.startswith(ACTION_PREFIX):
        rest = key[len(ACTION_PREFIX):]
        if rest.startswith("head."):  # the plain Linear(hidden, action_dim) head
            return "action.proj_out." + rest[len("head."):]
        if rest.startswith("action_encoder."):
            return "action." + rest
        return "action." + original_to_diffusers_key(rest)
    return None


def fastwam_to_official_key(key: str) -> tuple[str, str]:
    """One FastWAM state-dict key -> (part of the official payload, name in it): `("mot", "mixtures.video....")`,
    `("mot", "mixtures.action....")` or `("proprio_encoder", "weight" | "bias")`."""
    if key.startswith("video."):
        return "mot", VIDEO_PREFIX + diffusers_to_original_key(key[len("video."):])
    if key.startswith("action."):
        rest = key[len("action."):]
        if rest.startswith("proj_out."):
            return "mot", ACTION_PREFIX + "head." + rest[len("proj_out."):]
        if rest.startswith("action_encoder."):
            return "mot", ACTION_PREFIX + rest
        return "mot", ACTION_PREFIX + diffusers_to_original_key(rest)
    if key.startswith("state_proj."):
        return "proprio_encoder", key[len("state_proj."):]
    raise ValueError(f"no official name for {key!r}")


def fastwam_state_dict(payload: Mapping[str, Any], source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The fastwam state dict (same tensors, renamed) of an official checkpoint dict. Names nothing it can't map."""
    mot = payload["mot"]
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, tensor in mot.items():
        new = official_to_fastwam_key(key)
        if new is None:
            unknown.append(key)
            continue
        if new in out:
            raise OfficialCheckpointError(f"{source}: two tensors map to {new!r} (second: mot.{key})")
        out[new] = tensor
    if unknown:
        raise OfficialCheckpointError(f"{source}: {len(unknown)} `mot` tensor(s) are neither mixtures.video.* nor "
                                      f"mixtures.action.*: {_head(unknown)}")
    proprio = payload.get("proprio_encoder")
    if proprio is not None:
        for name, tensor in proprio.items():
            out[f"state_proj.{name}"] = tensor
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Reading the file


@dataclass
class OfficialCheckpoint:
    path: Path
    tensors: dict[str, torch.Tensor]  # fastwam names; memory-mapped when the file allows it
    step: int
    dtype: str  # the file's `torch_dtype`, e.g. "torch.bfloat16"

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def read_official_checkpoint(path: str | Path) -> OfficialCheckpoint:
    """Open an official checkpoint file safely (weights only, memory-mapped) and rename its tensors."""
    path = Path(path)
    if not path.is_file():
        raise OfficialCheckpointError(f"{path}: no such file")
    payload = _safe_torch_load(path)
    if not isinstance(payload, dict):
        raise OfficialCheckpointError(f"{path}: expected a dict with a 'mot' state dict, got {type(payload).__name__}")
    if "mot" not in payload:
        if "dit" in payload:
            raise OfficialCheckpointError(
                f"{path}: a legacy video-only payload ('dit': the video expert alone, no action expert); "
                "fastwam import official needs a Fast-WAM checkpoint with a 'mot' state dict (video + action experts)")
        raise OfficialCheckpointError(f"{path}: not an official Fast-WAM checkpoint: no 'mot' key (keys: "
                                      f"{sorted(map(str, payload))})")
    for name in ("mot", "proprio_encoder"):
        part = payload.get(name)
        if part is not None and not (isinstance(part, Mapping)
                                     and all(isinstance(t, torch.Tensor) for t in part.values())):
            raise OfficialCheckpointError(f"{path}: '{name}' must map names to tensors")
    tensors = fastwam_state_dict(payload, str(path))
    step = payload.get("step", 0)
    return OfficialCheckpoint(path, tensors, int(step) if isinstance(step, int) else 0,
                              str(payload.get("torch_dtype", "")))


def _safe_torch_load(path: Path) -> Any:
    """torch.load with weights_only=True (tensors and plain containers only), memory-mapped when possible."""
    def load(mmap: bool):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)

    is_zip = zipfile.is_zipfile(path)
    if not is_zip:
        what = _not_a_torch_file(path)
        if what:
            raise OfficialCheckpointError(f"{path}: not a PyTorch checkpoint: {what}")
    try:
        return load(mmap=is_zip)  # the legacy (pre-zip) format cannot be memory-mapped
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OfficialCheckpointError(
            f"{path}: refused to load: the file holds Python objects other than tensors and plain containers, which "
            f"a weights-only load never executes ({first})") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as e:
        raise OfficialCheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt download?): "
                                      f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e) else ''}") \
            from None


def _not_a_torch_file(path: Path) -> str:
    """What a file that is neither a zip archive (torch.save's format) nor a pickle (its legacy format) looks like,
    or "" when it may be a legacy torch file. Without this, the weights-only unpickler reports any other file as
    'Python objects it refuses to load', which sends the user looking for malware instead of the right file."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError:
        return ""  # torch.load reports it
    if not head:
        return "the file is empty"
    if head[:1] == b"\x80" or head[:2] == b"PK":  # a legacy pickle, or a zip cut short: torch.load says which
        return ""
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 1 << 30:
        return "it is a safetensors file (give the official .pt checkpoint, or load safetensors directly)"
    kinds = [(b"\x1f\x8b", "a gzip archive"), (b"\x89HDF", "an HDF5 file"),
             (b"GGUF", "a GGUF model file"), (b"<", "an HTML / XML page (a failed download?)")]
    for magic, name in kinds:
        if head.startswith(magic):
            return f"it is {name}"
    stripped = head.lstrip()
    if stripped[:1] in (b"{", b"["):
        return "it is JSON text (the dataset statistics go to --stats, the checkpoint to --checkpoint)"
    try:
        head.decode("utf-8")
        return "it is a text file"
    except UnicodeDecodeError:
        return "its first bytes match no known format (neither a zip archive nor a pickle)"


# ---------------------------------------------------------------------------------------------------------------------
# Model shapes from the tensors


def infer_model_config(tensors: Mapping[str, torch.Tensor], base: ModelConfig,
                       preset_model: ModelConfig | None = None) -> tuple[ModelConfig, dict[str, Any]]:
    """The ModelConfig of an official checkpoint: every field the tensor shapes determine comes from them (returned
    as the second value), the rest (num_heads, action_horizon, latent_frames, eps, RoPE) from `base`.

    `preset_model`: the preset `base` was made from; a field the user changed in `base` (it differs from the preset)
    that contradicts the tensors is an error rather than silently replaced.
    """
    def shape(key: str) -> tuple[int, ...]:
        if key not in tensors:
            raise OfficialCheckpointError(f"the checkpoint lacks {key!r}, which determines the model's shape")
        return tuple(tensors[key].shape)

    width, channels, *patch = shape("video.patch_embedding.weight")
    layers = sorted({int(m.group(1)) for k in tensors if (m := re.match(r"video\.blocks\.(\d+)\.", k))})
    if not layers or layers != list(range(len(layers))):
        raise OfficialCheckpointError(f"video blocks are not numbered 0..N-1: {layers[:5]}...")
    if width % base.num_heads:
        raise OfficialCheckpointError(
            f"the video expert is {width} wide, not divisible by num_heads={base.num_heads}: pass the official "
            "config's head count, e.g. --config.model.num-heads N (it cannot be read from the tensors)")
    action_hidden, action_dim = shape("action.action_encoder.weight")
    text_dim_state, state_dim = shape("state_proj.weight") if "state_proj.weight" in tensors else (None, base.state_dim)
    inferred = dict(
        latent_channels=channels, patch_size=tuple(patch),
        video_ffn_dim=shape("video.blocks.0.ffn.net.0.proj.weight")[0], video_hidden_dim=0,
        head_dim=width // base.num_heads, num_layers=len(layers), action_hidden_dim=action_hidden,
        action_ffn_dim=shape("action.blocks.0.ffn.net.0.proj.weight")[0],
        freq_dim=shape("video.condition_embedder.time_embedder.linear_1.weight")[1],
        text_dim=shape("video.condition_embedder.text_embedder.linear_1.weight")[1],
        cross_attn_norm="video.blocks.0.norm2.weight" in tensors, action_dim=action_dim, state_dim=state_dim,
    )
    if text_dim_state is not None and text_dim_state != inferred["text_dim"]:
        raise OfficialCheckpointError(f"proprio_encoder maps to {text_dim_state} but the text context is "
                                      f"{inferred['text_dim']} wide")
    if preset_model is not None:
        clash = {k: (getattr(base, k), v) for k, v in inferred.items()
                 if getattr(base, k) != getattr(preset_model, k) and getattr(base, k) != v}
        if clash:
            raise OfficialCheckpointError("model overrides contradict the checkpoint's tensors (override, checkpoint): "
                                          + ", ".join(f"{k}={a!r} vs {b!r}" for k, (a, b) in clash.items()))
    return dataclasses.replace(base, **inferred), inferred


def check_shapes(tensors: Mapping[str, torch.Tensor], cfg: ModelConfig, source: str = "checkpoint") -> None:
    """Every tensor of a FastWAM(cfg) present with its shape, nothing else: one error listing all differences."""
    from fastwam.model.fastwam import FastWAM

    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in FastWAM(cfg).state_dict().items()}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    shapes = [f"{k}: file {tuple(tensors[k].shape)} vs model {expected[k]}"
              for k in sorted(set(expected) & set(tensors)) if tuple(tensors[k].shape) != expected[k]]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {_head(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensor(s): {_head(unexpected)}")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch(es): {'; '.join(shapes[:12])}")
    if problems:
        raise OfficialCheckpointError(f"{source} does not fit the Fast-WAM model (names in fastwam's naming; "
                                      "mixtures.video./mixtures.action. renamed): " + " | ".join(problems))


def _head(items: list[str], n: int = 12) -> str:
    return ", ".join(items[:n]) + (f", ... (+{len(items) - n})" if len(items) > n else "")


# ---------------------------------------------------------------------------------------------------------------------
# Dataset statistics


def norm_stats_from_official(stats: Mapping[str, Any], source: str = "stats file") -> NormStats:
    """fastwam NormStats (action, state) from an official `*_dataset_stats.json` (its `default` global stats).

    The official normaliser applies the global (not step-wise) statistics in both released configs
    (`use_stepwise_action_norm: false`), so those are what fastwam keeps.
    """
    out = {}
    for key in ("action", "state"):
        try:
            group = stats[key]["default"]
        except (KeyError, TypeError):
            raise OfficialCheckpointError(f"{source}: no '{key}' -> 'default' statistics") from None
        values = {}
        for stat in STAT_KEYS:
            name = f"global_{stat}"
            if name not in group:
                raise OfficialCheckpointError(f"{source}: {key}.default lacks {name!r}")
            arr = np.asarray(group[name], dtype=np.float64)
            if arr.ndim != 1 or not np.all(np.isfinite(arr)):
                raise OfficialCheckpointError(f"{source}: {key}.default.{name} must be a finite 1-D list")
            values[stat] = arr
        out[key] = values
    try:
        return NormStats(out)
    except ValueError as e:
        raise OfficialCheckpointError(f"{source}: {e}") from None


def read_official_stats(path: str | Path) -> NormStats:
    path = Path(path)
    try:
        stats = json.loads(path.read_text())
    except FileNotFoundError:
        raise OfficialCheckpointError(f"{path}: no such file") from None
    except json.JSONDecodeError as e:
        raise OfficialCheckpointError(f"{path}: not valid JSON ({e})") from None
    return norm_stats_from_official(stats, str(path))


# ---------------------------------------------------------------------------------------------------------------------
# Import


def import_official(checkpoint: str | Path, out: str | Path, cfg: Config, preset: Config | None = None,
                    stats: str | Path | None = None, log=print) -> Path:
    """Write an official checkpoint (+ stats) as a fastwam run directory; returns the checkpoint directory.

    The tensors keep the file's dtype (bf16 for the released checkpoints) and are never copied in memory: the model
    is built on the meta device, the memory-mapped tensors are installed as its parameters, and the checkpoint writer
    streams them to disk.
    """
    ckpt = read_official_checkpoint(checkpoint)
    log(f"[import] {ckpt.path.name}: step {ckpt.step}, {ckpt.dtype or 'dtype not recorded'}, "
        f"{len(ckpt.tensors)} tensors, {ckpt.nbytes() / 1e9:.2f} GB")
    norm = read_official_stats(stats) if stats else None
    if norm is None:
        log("[import] no --stats: the run has no norm_stats.json (a policy needs one to un-normalise actions)")
    return write_imported_run(ckpt.tensors, out, cfg, preset, norm, step=ckpt.step, source=str(ckpt.path),
                              stats_source=str(stats), log=log)


def write_imported_run(tensors: Mapping[str, torch.Tensor], out: str | Path, cfg: Config, preset: Config | None,
                       norm: NormStats | None, *, step: int = 0, source: str = "checkpoint",
                       stats_source: str = "stats", kept_from: str = "the preset / overrides", log=print) -> Path:
    """The shared end of every importer: `tensors` (already in fastwam's names) + `norm` -> a run directory.

    The model shapes come from the tensors (`infer_model_config`; the rest of `cfg.model` is kept), every tensor is
    checked against a FastWAM built on the meta device (`check_shapes`) and the statistics against its action / state
    sizes before anything is written; then the tensors (not copied) become the model's parameters and the checkpoint
    writer saves them as RUN/checkpoints/step_N/.
    """
    from fastwam.checkpoint import save_checkpoint
    from fastwam.model.fastwam import FastWAM

    model_cfg, inferred = infer_model_config(tensors, cfg.model, preset.model if preset else None)
    log("[import] read from the tensors: " + ", ".join(f"{k}={v}" for k, v in inferred.items()))
    kept = {f: getattr(model_cfg, f) for f in ("num_heads", "action_horizon", "latent_frames", "eps")}
    log(f"[import] from {kept_from}: " + ", ".join(f"{k}={v}" for k, v in kept.items()))
    check_shapes(tensors, model_cfg, source)
    cfg = cfg.replace(model=model_cfg)
    if cfg.data.action_horizon != model_cfg.action_horizon:
        cfg = cfg.replace(data=dataclasses.replace(cfg.data, action_horizon=model_cfg.action_horizon))
    if norm is not None:
        for key, dim in (("action", model_cfg.action_dim), ("state", model_cfg.state_dim)):
            if norm.dim(key) != dim:
                raise OfficialCheckpointError(f"{stats_source}: {key} statistics are {norm.dim(key)}-d but the "
                                              f"checkpoint's {key} is {dim}-d")
    with torch.device("meta"):
        model = FastWAM(model_cfg)
    model.load_state_dict(dict(tensors), strict=True, assign=True)
    final = save_checkpoint(out, step, cfg, model, norm_stats=norm.to_dict() if norm is not None else None)
    log(f"[import] wrote {final}")
    return final


@dataclass(kw_only=True)
class ImportOfficialArgs(PresetArgs):
    """Import a checkpoint of the official Fast-WAM code as a fastwam run (safetensors + JSON)."""

    preset: PresetName = "libero_2cam224"  # config preset for what the tensors do not determine (heads, horizon, data)
    config: Config
    checkpoint: str = tyro.MISSING  # the official .pt file (e.g. libero_uncond_2cam224.pt), or hf://ORG/NAME/FILE
    out: str = tyro.MISSING  # run directory to write (RUN/checkpoints/step_N/)
    stats: str = ""  # the official dataset-stats JSON (e.g. libero_2cam224_dataset_stats.json)
    variant: str = "fast"  # fast | joint | idm: which official model the checkpoint is (its mask and inference mode)


def cli(argv: list[str], prog: str = "fastwam import official") -> int:
    from fastwam.config import get_preset
    from fastwam.model.visibility import get_variant

    args = parse_with_preset(argv, ImportOfficialArgs, prog)
    variant = get_variant(args.variant)
    cfg = args.config.replace(train=dataclasses.replace(args.config.train, variant=args.variant),
                              inference=dataclasses.replace(args.config.inference, mode=variant.inference))
    from fastwam.hub import local_file

    stats = local_file(args.stats) if args.stats else None
    import_official(local_file(args.checkpoint), args.out, cfg, preset=get_preset(args.config.name), stats=stats)
    return 0
