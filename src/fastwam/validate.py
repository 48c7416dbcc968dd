"""Load-time validation of a checkpoint: everything a policy needs is checked once, when it loads.

Why here and not per request: a checkpoint with a NaN in `norm_stats.json`, `inference.steps: "3"` or 5-d statistics
for a 4-d policy used to load fine and then fail (or silently answer NaN) on every request, with errors that blamed
the client. `FastWAMPolicy.from_pretrained` (so `fastwam serve`, `bench serve` and in-process evaluation) calls
`load_checked`, which refuses such a checkpoint with one line naming the file, the field and what to do:

    .../step_0000003/norm_stats.json: action.std[2] is NaN; the statistics are damaged: re-copy the checkpoint ...

Checked: config.json (valid JSON; types via `Config.from_dict`; ranges here), norm_stats.json (valid JSON, both
roles, every statistic finite, dimensions equal to the model's action / state size), the weights file (present,
non-empty, a complete safetensors file; after loading, every tensor finite) and, last, one blank inference (so any
remaining misfit between config, weights and statistics fails at start-up, not at the first request).

`checkpoint_identity` says which checkpoint a server runs without its filesystem path (metadata goes to clients).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastwam import checkpoint as ckpt_io
from fastwam.config import Config
from fastwam.data.normalize import STAT_KEYS
from fastwam.serving.protocol import describe_error

__all__ = ["CheckedCheckpoint", "check_config", "check_finite_weights", "check_inference", "check_norm_stats",
           "checkpoint_identity", "load_checked"]

RECOPY = "re-copy the checkpoint directory (or retrain)"

# Config fields (dotted paths) that must be >= 1 / >= 0 / > 0; a tuple field's every element is checked. Paths that
# a config does not have are skipped, so the table may name fields that other versions add or drop.
AT_LEAST_1 = (
    "model.latent_channels", "model.patch_size", "model.video_ffn_dim", "model.num_heads", "model.head_dim",
    "model.num_layers", "model.action_hidden_dim", "model.action_ffn_dim", "model.freq_dim", "model.text_dim",
    "model.rope_max_seq_len", "model.action_dim", "model.state_dim", "model.action_horizon", "model.latent_frames",
    "codec.space_factor", "codec.dct_diagonals", "text.max_len", "text.vocab_size", "data.image_size",
    "data.num_frames", "data.frame_stride", "data.action_horizon", "inference.steps",
)
AT_LEAST_0 = ("model.video_hidden_dim",)
POSITIVE = ("model.eps", "model.rope_theta", "inference.shift", "codec.latents_std")


@dataclasses.dataclass(frozen=True)
class CheckedCheckpoint:
    path: Path  # the checkpoint directory (local; never sent to clients)
    config: Config
    norm_stats: dict
    weights: Path  # the file to load (EMA weights when present and asked for)
    identity: dict[str, Any]  # name / step / sha256: what clients may see (see `checkpoint_identity`)


def _fail(file: Path | str, what: str, todo: str) -> ckpt_io.CheckpointError:
    return ckpt_io.CheckpointError(f"{file}: {what}; {todo}")


def _loaded(file: Path, load: Any) -> Any:
    """`load()` (a `checkpoint` reader), with what to do appended to its error and the file named in any other."""
    try:
        return load()
    except ckpt_io.CheckpointError as exc:
        raise ckpt_io.CheckpointError(f"{exc}; fix that file or {RECOPY}") from None
    except (ValueError, TypeError) as exc:  # e.g. a truncated JSON file
        raise _fail(file, f"cannot be read ({exc}); the file is truncated or damaged", RECOPY) from None


def _field(cfg: Config, path: str) -> Any:
    value: Any = cfg
    for part in path.split("."):
        value = getattr(value, part, None)
    return value


def check_config(cfg: Config, file: Path | str = "config.json") -> None:
    """Ranges (types are `Config.from_dict`'s job): sizes >= 1, scales > 0, cameras named."""
    rules = [(p, 1, ">= 1") for p in AT_LEAST_1] + [(p, 0, ">= 0") for p in AT_LEAST_0]
    for path, low, text in rules:
        value = _field(cfg, path)
        for i, v in enumerate(value if isinstance(value, tuple) else (value,)):
            if type(v) is int and v < low:
                name = f"{path}[{i}]" if isinstance(value, tuple) else path
                raise _fail(file, f"{name} must be {text}, got {v}", "fix the value in that file")
    for path in POSITIVE:
        value = _field(cfg, path)
        for i, v in enumerate(value if isinstance(value, tuple) else (value,)):
            if isinstance(v, float) and not v > 0:
                name = f"{path}[{i}]" if isinstance(value, tuple) else path
                raise _fail(file, f"{name} must be > 0, got {v}", "fix the value in that file")
    if not cfg.data.cameras:
        raise _fail(file, "data.cameras is empty (the policy would not know which images it sees)",
                    "use the config.json that training wrote into the checkpoint")


def check_norm_stats(raw: Any, cfg: Config, file: Path | str = "norm_stats.json") -> dict:
    """Both roles, every statistic a finite list of the model's width (action_dim / state_dim), lo <= hi."""
    if not isinstance(raw, dict):
        raise _fail(file, f"must be a JSON object of roles, got {type(raw).__name__}", RECOPY)
    widths = {"action": ("model.action_dim", cfg.model.action_dim), "state": ("model.state_dim", cfg.model.state_dim)}
    for role, (field, width) in widths.items():
        stats = raw.get(role)
        if not isinstance(stats, dict):
            raise _fail(file, f"has no {role!r} statistics", RECOPY)
        for stat in STAT_KEYS:
            values = stats.get(stat)
            if not isinstance(values, list) or not all(type(v) in (int, float) for v in values):
                raise _fail(file, f"{role}.{stat} must be a list of numbers, got {type(values).__name__}", RECOPY)
            if len(values) != width:
                raise _fail(file, f"{role}.{stat} has {len(values)} dimension(s) but config.json's {field} is "
                            f"{width}", "these statistics belong to another dataset: use the norm_stats.json "
                            "written with this checkpoint")
            bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
            if bad:
                shown = "NaN" if math.isnan(values[bad[0]]) else values[bad[0]]
                raise _fail(file, f"{role}.{stat}[{bad[0]}] is {shown}"
                            f"{f' ({len(bad)} non-finite values)' if len(bad) > 1 else ''}", RECOPY)
        for lo, hi in (("min", "max"), ("q01", "q99")):
            flipped = [i for i, (a, b) in enumerate(zip(stats[lo], stats[hi], strict=True)) if a > b]
            if flipped:
                i = flipped[0]
                raise _fail(file, f"{role}.{lo}[{i}] = {stats[lo][i]} is above {role}.{hi}[{i}] = {stats[hi][i]}",
                            RECOPY)
        if any(v < 0 for v in stats["std"]):
            raise _fail(file, f"{role}.std has a negative value", RECOPY)
    return raw


def _check_weights_file(file: Path) -> dict[str, str]:
    """A complete safetensors file (header parses, offsets fit the file size); returns its metadata."""
    from safetensors import safe_open

    if not file.is_file():
        raise _fail(file, "missing", RECOPY)
    if file.stat().st_size == 0:
        raise _fail(file, "is empty (0 bytes); the copy or the save was interrupted", RECOPY)
    try:
        with safe_open(str(file), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as exc:  # SafetensorError (a Rust type); the message says what is wrong with the header
        raise _fail(file, f"not a complete safetensors file ({exc}); it is truncated or damaged", RECOPY) from None


def check_finite_weights(module: torch.nn.Module, file: Path | str) -> None:
    """Every parameter / buffer finite: NaN weights answer NaN actions to every request without a word."""
    for name, tensor in module.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            n = int((~torch.isfinite(tensor)).sum())
            raise _fail(file, f"tensor {name!r} holds {n} non-finite value(s) (NaN or inf)",
                        "training diverged or the file is damaged: serve an earlier checkpoint")


def checkpoint_identity(ckpt: Path, files: list[Path], metadata: dict[str, str] | None = None) -> dict[str, Any]:
    """Name (`run/step_0000300`), step and a content hash (sha256 of the files, 16 hex digits): enough for a client
    to tell checkpoints apart, without the server's filesystem path. Hashing reads the files once (~1 GB/s)."""
    name = f"{ckpt.parent.parent.name}/{ckpt.name}" if ckpt.parent.name == "checkpoints" else ckpt.name
    match = re.fullmatch(r"step_(\d+)", ckpt.name)
    step_text = match.group(1) if match else (metadata or {}).get("step", "")
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest())
    return {"name": name, "step": int(step_text) if step_text.isdigit() else None, "sha256": digest.hexdigest()[:16]}


def load_checked(path: str | Path, use_ema: bool = True) -> CheckedCheckpoint:
    """Resolve a run / checkpoint directory and check its config, statistics and weights file (before any model is
    built). Raises `CheckpointError` with one line naming the file, the field and what to do."""
    ckpt = ckpt_io.resolve_checkpoint(path)
    config_file, stats_file = ckpt / ckpt_io.CONFIG, ckpt / ckpt_io.NORM_STATS
    cfg = _loaded(config_file, lambda: ckpt_io.load_config(ckpt))  # types: `Config.from_dict`, per dotted field
    check_config(cfg, config_file)
    if not cfg.model.action_expert:
        raise _fail(config_file, "describes a video prior (`fastwam pretrain`): it has no action expert and cannot "
                    "act", f"train a policy from it: fastwam train --init-from {path} --dataset DIR ...")
    raw = _loaded(stats_file, lambda: ckpt_io.load_norm_stats(ckpt))
    if raw is None:
        raise _fail(stats_file, "missing (actions cannot be un-normalised without it)",
                    "copy the whole checkpoint directory that `fastwam train` wrote")
    stats = check_norm_stats(raw, cfg, stats_file)
    ema = ckpt / ckpt_io.EMA
    weights = ema if use_ema and ema.is_file() else ckpt / ckpt_io.WEIGHTS
    metadata = _check_weights_file(weights)
    identity = checkpoint_identity(ckpt, [config_file, stats_file, weights], metadata)
    return CheckedCheckpoint(ckpt, cfg, stats, weights, identity)


def check_inference(policy: Any, file: Path | str) -> None:
    """One blank observation through the whole policy: whatever still does not fit fails here, once, at load time
    (not as an error on every request that blames the client), and the actions must be finite."""
    try:
        actions = policy.infer(policy.blank_observation())["actions"]
    except Exception as exc:  # noqa: BLE001 - any failure here is the checkpoint's, reported in one line
        reason = " ".join(describe_error(exc).split())  # one line, whatever the exception's text
        raise _fail(file, f"a test inference at load time failed ({reason})",
                    "config.json, the weights and norm_stats.json do not fit together: " + RECOPY) from exc
    if not np.isfinite(actions).all():
        raise _fail(file, "a test inference at load time gave non-finite actions",
                    "check the weights and norm_stats.json (training may have diverged): " + RECOPY)
