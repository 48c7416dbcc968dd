"""Wan2.2 weights for a FastWAM: the video expert loads them, the action expert is initialised from them.

`build_fastwam_from_wan` builds the model on the meta device, loads the video expert in place
(`wan_checkpoint.load_video_expert`: diffusers or original Wan layout, memory-mapped without a second copy), and
computes the action expert tensor by tensor from the video expert's (`init_action_expert_from_video`, the official
interpolation rule `resize_tensor`). The loading names are importable from here too.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fastwam.config import ModelConfig
from fastwam.model.safetensors_mmap import CHUNK_BYTES, MappedFile, TensorInfo, read_header
from fastwam.model.wan_checkpoint import (
    VIDEO_FIELDS,
    WanCheckpoint,
    _head,
    check_video_config,
    diffusers_to_original_key,
    is_original_layout,
    load_checkpoint_into,
    load_video_expert,
    model_config_from_diffusers,
    original_to_diffusers_key,
)

__all__ = [
    "ACTION_RANDOM_PREFIXES", "CHUNK_BYTES", "VIDEO_FIELDS", "MappedFile", "TensorInfo", "WanCheckpoint",
    "build_fastwam_from_wan", "check_video_config", "init_action_expert_from_video", "is_original_layout",
    "load_checkpoint_into", "load_video_expert", "model_config_from_diffusers", "original_to_diffusers_key",
    "diffusers_to_original_key", "read_header", "resize_tensor",
]

# ---------------------------------------------------------------------------------------------------------------------
# Action expert from the video expert


# Parts of the action expert that have no counterpart in the video expert and stay randomly initialised.
ACTION_RANDOM_PREFIXES = ("action_encoder.", "proj_out.")


def resize_tensor(src: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The official action-expert initialisation rule (docs/reference.md, "Action-expert initialisation"): resize each
    dimension by 1-D linear interpolation (align_corners=True); then a tensor with ndim >= 2 whose last (input)
    dimension changed is multiplied by sqrt(d_src / d_tgt), which keeps a linear layer's output scale when its fan-in
    changes. 1-D tensors (biases, norm weights) are never scaled. Computed in float64, returned in `src`'s dtype."""
    shape = tuple(shape)
    if src.dim() != len(shape):
        raise ValueError(f"cannot resize a {src.dim()}-D tensor {tuple(src.shape)} to {len(shape)}-D {shape}")
    x = src.detach().to(torch.float64)
    for dim, size in enumerate(shape):
        if x.shape[dim] != size:
            x = _interp_dim(x, dim, size)
    if len(shape) >= 2 and shape[-1] != src.shape[-1]:
        x = x * math.sqrt(src.shape[-1] / shape[-1])
    return x.to(src.dtype)


def _interp_dim(x: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    moved = x.movedim(dim, -1)
    lead = moved.shape[:-1]
    out = F.interpolate(moved.reshape(-1, 1, moved.shape[-1]), size=size, mode="linear", align_corners=True)
    return out.reshape(*lead, size).movedim(-1, dim)


@torch.no_grad()
def init_action_expert_from_video(video_sd: Mapping[str, torch.Tensor], action_expert: nn.Module) -> list[str]:
    """Overwrite every action-expert tensor that has a video-expert counterpart of the same name with the video
    tensor resized by `resize_tensor`; `action_encoder` and `proj_out` keep their (random) values.

    The action expert may be on the meta device (it is then materialised on the video tensors' device) — but its
    random parts must be initialised by the caller in that case. Returns the keys that were initialised.
    """
    target = action_expert.state_dict(keep_vars=True)
    wanted = [k for k in target if not k.startswith(ACTION_RANDOM_PREFIXES)]
    missing = [k for k in wanted if k not in video_sd]
    if missing:
        raise ValueError(f"video weights lack tensors the action expert needs: {_head(missing)}")
    new = {}
    for k in wanted:
        src = video_sd[k]
        dst = target[k]
        new[k] = resize_tensor(src, tuple(dst.shape)).to(dtype=dst.dtype)
    if any(t.is_meta for t in target.values()):
        action_expert.load_state_dict(new, strict=False, assign=True)
    else:
        action_expert.load_state_dict(new, strict=False)
    return wanted


def build_fastwam_from_wan(
    path: str | os.PathLike,
    model_cfg: ModelConfig | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    **overrides: Any,
):
    """A FastWAM whose video expert holds the Wan weights at `path` and whose action expert is interpolated from them.

    Nothing is allocated twice: the model is built on the meta device, the video expert is loaded in place, the
    action expert is computed tensor by tensor, and only the parts with no Wan counterpart (action encoder, action
    head, state projection) get a fresh random initialisation (from `seed`, without touching the global RNG).
    """
    from fastwam.model.fastwam import FastWAM

    device = torch.device(device)
    video = load_video_expert(path, dtype=dtype, device=device, model_cfg=model_cfg, **overrides)
    cfg = video.cfg
    with torch.device("meta"):
        model = FastWAM(cfg)
    model.video = video
    action = model.action
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # Random parts first, on CPU in fp32 (initialisers are defined there), then moved.
        for name in ("action_encoder", "proj_out"):
            layer = getattr(action, name).to_empty(device="cpu")
            layer.reset_parameters()
            setattr(action, name, layer.to(device=device, dtype=dtype))
        model.state_proj = model.state_proj.to_empty(device="cpu")
        model.state_proj.reset_parameters()
        model.state_proj = model.state_proj.to(device=device, dtype=dtype)
    init_action_expert_from_video(video.state_dict(), action)
    action.to(device=device, dtype=dtype)
    left = [n for n, t in model.state_dict(keep_vars=True).items() if t.is_meta]
    if left:
        raise RuntimeError(f"tensors left uninitialised: {_head(left)}")
    return model.eval()
