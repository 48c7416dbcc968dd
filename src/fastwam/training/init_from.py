"""`fastwam train --init-from RUN`: start a policy from another fastwam run's video expert.

The source is a `fastwam pretrain` video prior or any policy run (its latest checkpoint, or a checkpoint directory).
What is copied, and how:

- the video expert, tensor for tensor (the new run's video expert must have the same shapes: a mismatch is one error
  naming the tensor and both shapes);
- the state projection, when the source has one of the same shape (a video prior has none: it stays random);
- the action expert is made from the copied video expert by the rule used with Wan weights (`model/weights.py`,
  `init_action_expert_from_video`: every tensor resized by linear interpolation, the action encoder and head left
  random), or left random altogether (`init_action = "random"`), or copied from a policy source whose action expert
  has the same shapes (`init_action = "copy"`: fine-tuning a trained policy).

The latents and the text embeddings the video expert learnt on are part of what it knows, so the new run takes the
source's codec (a fitted DCT codec's statistics included) and text encoder. The run's config.json records the source
(`train.init_from`), its step and the sha256 of its weights file, so a policy names the prior it grew from.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import sys
from pathlib import Path

import torch

from fastwam import checkpoint as ckpt_io
from fastwam.config import Config
from fastwam.errors import UserError


def source_checkpoint(path: str, option: str = "--init-from",
                      made_by: str = "`fastwam pretrain` / `fastwam train`") -> Path:
    try:
        return ckpt_io.resolve_checkpoint(path)
    except ckpt_io.CheckpointError:
        raise UserError(f"{option} {path}: no fastwam checkpoint there (a run directory or a checkpoint "
                        f"directory of {made_by})") from None


def checkpoint_step(ckpt: Path) -> int:
    match = re.fullmatch(r"step_(\d+)", ckpt.name)
    if match:
        return int(match.group(1))
    try:
        return int(ckpt_io.load_train_state(ckpt, None)["step"])
    except (ckpt_io.CheckpointError, KeyError, TypeError, ValueError):
        return 0


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def adopt_source(cfg: Config, progress: bool = True) -> Config:
    """A new run's config with the source's codec and text encoder and the source's identity recorded."""
    ckpt = source_checkpoint(cfg.train.init_from)
    src = ckpt_io.load_config(ckpt)
    changed = [name for name in ("codec", "text") if getattr(src, name) != getattr(cfg, name)]
    if changed and progress:
        print(f"init-from: taking the {' and '.join(changed)} of {ckpt} (its video expert was trained on them)",
              file=sys.stderr)
    train = dataclasses.replace(cfg.train, init_from_step=checkpoint_step(ckpt),
                                init_from_sha256=file_sha256(ckpt / ckpt_io.WEIGHTS))
    return cfg.replace(codec=src.codec, text=src.text, train=train)


def recorded_source(cfg: Config, saved: Config) -> Config:
    """On resume: the source as the run recorded it when it started (the source run need not exist any more)."""
    train = dataclasses.replace(cfg.train, init_from_step=saved.train.init_from_step,
                                init_from_sha256=saved.train.init_from_sha256)
    return cfg.replace(codec=saved.codec, text=saved.text, train=train)


@torch.no_grad()
def initialise(model, cfg: Config) -> dict[str, list[str]]:
    """Fill `model` (a freshly built FastWAM) from the source run named by cfg.train.init_from.

    Returns which tensors were copied, interpolated and left random. Refuses a source whose weights changed since
    the run recorded their hash (a resumed run never calls this: its weights come from its own checkpoint).
    """
    from fastwam.model.weights import init_action_expert_from_video

    ckpt = source_checkpoint(cfg.train.init_from)
    weights = ckpt / ckpt_io.WEIGHTS
    if cfg.train.init_from_sha256 and file_sha256(weights) != cfg.train.init_from_sha256:
        raise UserError(f"--init-from {ckpt}: its weights changed since this run recorded them (sha256 "
                        f"{cfg.train.init_from_sha256[:16]}...)")
    tensors = ckpt_io._load_tensors(weights)
    video = {k[len("video."):]: v for k, v in tensors.items() if k.startswith("video.")}
    if not video:
        raise UserError(f"{weights}: no video expert tensors (video.*): not a fastwam checkpoint")
    _copy_exactly(model.video, video, weights, "video.")
    report = {"copied": [f"video.{k}" for k in video], "interpolated": [], "random": []}
    if model.state_proj is not None:
        state = {k[len("state_proj."):]: v for k, v in tensors.items() if k.startswith("state_proj.")}
        own = model.state_proj.state_dict()
        if state and all(k in state and state[k].shape == v.shape for k, v in own.items()):
            model.state_proj.load_state_dict(state)
            report["copied"] += [f"state_proj.{k}" for k in own]
        else:
            report["random"] += [f"state_proj.{k}" for k in own]
    if model.action is not None:
        names = list(model.action.state_dict())
        if cfg.train.init_action == "copy":
            action = {k[len("action."):]: v for k, v in tensors.items() if k.startswith("action.")}
            if not action:
                raise UserError(f"--config.train.init-action copy: {weights} has no action expert (a video prior): "
                                "interpolate it from the video expert or start it random instead")
            _copy_exactly(model.action, action, weights, "action.", "action expert")
            report["copied"] += [f"action.{k}" for k in names]
        elif cfg.train.init_action == "interpolate":
            done = init_action_expert_from_video(model.video.state_dict(), model.action)
            report["interpolated"] += [f"action.{k}" for k in done]
            report["random"] += [f"action.{k}" for k in names if k not in done]
        else:
            report["random"] += [f"action.{k}" for k in names]
    return report


def _copy_exactly(module: torch.nn.Module, tensors: dict[str, torch.Tensor], file: Path, prefix: str,
                  what: str = "video expert") -> None:
    own = module.state_dict()
    missing = sorted(set(own) - set(tensors))
    if missing:
        raise UserError(f"{file}: the source has no {prefix}{missing[0]} ({len(missing)} tensor(s) missing): its "
                        f"{what} is not this model's")
    for name, target in own.items():
        if tensors[name].shape != target.shape:
            raise UserError(f"{file}: {prefix}{name} is {tuple(tensors[name].shape)} in the source and "
                            f"{tuple(target.shape)} in this model: give this run the source's {what} "
                            "settings (model.* in its config.json)")
    extra = sorted(set(tensors) - set(own))
    if extra:
        raise UserError(f"{file}: the source has {prefix}{extra[0]}, which this model's {what} lacks")
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in tensors.items()})
