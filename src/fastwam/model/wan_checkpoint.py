"""Wan2.2 DiT checkpoints on disk: their config, their tensor names, and loading them into the video expert.

Two checkpoint layouts are read, both as safetensors (one file, or shards + `*.safetensors.index.json`):
  diffusers  `WanTransformer3DModel.save_pretrained` (keys `attn1.to_q`, `ffn.net.0.proj`, ...) — the names of our
             modules, loaded key for key;
  original   the Wan repository's `WanModel` (keys `self_attn.q`, `ffn.0`, `modulation`, `head.head`, ...), renamed
             with the table of diffusers' own converter (`convert_wan_transformer_to_diffusers`).
`path` may be the transformer directory itself, a parent holding `transformer/` (the diffusers pipeline layout), or
one `.safetensors` file with its `config.json` beside it. Which layout a checkpoint uses is read from its tensor names
(the original Wan release also names its shards `diffusion_pytorch_model*.safetensors`).

Memory: a 5B checkpoint must not be held twice. The module is built on the meta device (no storage), every tensor is
checked against it from the safetensors headers alone (names and shapes, before any data is read), then each shard is
memory-mapped and its tensors are copied 16 MB at a time (`safetensors_mmap`), and installed with
`load_state_dict(assign=True)`: the resident set is the loaded parameters plus one 16 MB piece.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastwam.config import ModelConfig
from fastwam.model.safetensors_mmap import MappedFile, TensorInfo, read_header

# ---------------------------------------------------------------------------------------------------------------------
# Configuration


# ModelConfig fields that describe the video expert (the rest are the action expert and the robot interface).
VIDEO_FIELDS = (
    "latent_channels", "patch_size", "video_ffn_dim", "video_hidden_dim", "num_heads", "head_dim", "num_layers",
    "freq_dim", "text_dim", "cross_attn_norm", "eps", "rope_max_seq_len",
)


def model_config_from_diffusers(cfg_json: Mapping[str, Any] | str | os.PathLike, **overrides: Any) -> ModelConfig:
    """A `ModelConfig` whose video-expert fields come from a Wan transformer `config.json`.

    Accepts diffusers' `WanTransformer3DModel` config and the original Wan `WanModel` config (`dim`, `in_dim`, ...).
    `overrides` set the other fields (robot dims, action expert size, ...), e.g. `action_dim=7, state_dim=8`.
    """
    if not isinstance(cfg_json, Mapping):
        cfg_json = json.loads(Path(cfg_json).read_text())
    c = dict(cfg_json)
    if "num_attention_heads" in c:  # diffusers
        if c.get("image_dim") is not None or c.get("added_kv_proj_dim") is not None:
            raise ValueError("this is an image-to-video Wan transformer (image_dim / added_kv_proj_dim set); "
                             "the video expert supports the TI2V / T2V models without the image embedder")
        if c.get("qk_norm", "rms_norm_across_heads") != "rms_norm_across_heads":
            raise ValueError(f"unsupported qk_norm {c.get('qk_norm')!r}: the video expert uses 'rms_norm_across_heads'")
        heads, head_dim = int(c["num_attention_heads"]), int(c["attention_head_dim"])
        in_ch, out_ch = int(c.get("in_channels", 16)), c.get("out_channels")
        video = dict(
            latent_channels=in_ch, patch_size=tuple(c.get("patch_size", (1, 2, 2))), video_ffn_dim=int(c["ffn_dim"]),
            num_heads=heads, head_dim=head_dim, num_layers=int(c["num_layers"]), freq_dim=int(c.get("freq_dim", 256)),
            text_dim=int(c.get("text_dim", 4096)), cross_attn_norm=bool(c.get("cross_attn_norm", True)),
            eps=float(c.get("eps", 1e-6)), rope_max_seq_len=int(c.get("rope_max_seq_len", 1024)),
        )
    elif "dim" in c and "num_heads" in c:  # original Wan (WanModel)
        if c.get("model_type", "t2v") in ("i2v", "flf2v", "vace"):
            raise ValueError(f"unsupported Wan model_type {c['model_type']!r}: only t2v / ti2v transformers load")
        dim, heads = int(c["dim"]), int(c["num_heads"])
        if dim % heads:
            raise ValueError(f"Wan config: dim {dim} is not divisible by num_heads {heads}")
        in_ch, out_ch = int(c.get("in_dim", 16)), c.get("out_dim")
        video = dict(
            latent_channels=in_ch, patch_size=tuple(c.get("patch_size", (1, 2, 2))), video_ffn_dim=int(c["ffn_dim"]),
            num_heads=heads, head_dim=dim // heads, num_layers=int(c["num_layers"]),
            freq_dim=int(c.get("freq_dim", 256)), text_dim=int(c.get("text_dim", 4096)),
            cross_attn_norm=bool(c.get("cross_attn_norm", True)), eps=float(c.get("eps", 1e-6)),
        )
        if not c.get("qk_norm", True):
            raise ValueError("Wan config has qk_norm false; the video expert always normalises q and k")
    else:
        raise ValueError("not a Wan transformer config: expected diffusers' `num_attention_heads` / "
                         f"`attention_head_dim` or the original `dim` / `num_heads`; keys: {sorted(c)}")
    if out_ch is not None and int(out_ch) != in_ch:
        raise ValueError(f"in/out channels differ ({in_ch} vs {out_ch}); the video expert predicts its input space")
    known = {f.name for f in fields(ModelConfig)}
    bad = set(overrides) - known
    if bad:
        raise ValueError(f"unknown ModelConfig field(s) {sorted(bad)}")
    clash = {k: (overrides[k], video[k]) for k in overrides if k in video and overrides[k] != video[k]}
    if clash:
        raise ValueError(f"overrides contradict the checkpoint config (override, checkpoint): {clash}")
    return ModelConfig(**{**video, **overrides})


def check_video_config(cfg: ModelConfig, ckpt_cfg: ModelConfig) -> None:
    """Raise if `cfg`'s video-expert fields differ from the checkpoint's."""
    diff = {f: (getattr(cfg, f), getattr(ckpt_cfg, f)) for f in VIDEO_FIELDS if getattr(cfg, f) != getattr(ckpt_cfg, f)}
    # RoPE is computed on the fly, so its table length is irrelevant to the weights.
    diff.pop("rope_max_seq_len", None)
    if diff:
        raise ValueError(f"model config does not match the checkpoint (config, checkpoint): {diff}")


# ---------------------------------------------------------------------------------------------------------------------
# Original Wan names -> diffusers names

_TOP_LEVEL = {
    "patch_embedding": "patch_embedding",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "head.head": "proj_out",
}
_ATTN = {"q": "to_q", "k": "to_k", "v": "to_v", "o": "to_out.0", "norm_q": "norm_q", "norm_k": "norm_k"}
_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")
# Names only the original layout has (top-level prefixes, and block sub-modules).
_ORIGINAL_PREFIXES = ("head.head.", "head.modulation", "time_projection.", "time_embedding.", "text_embedding.")
_ORIGINAL_PARTS = (".self_attn.", ".cross_attn.", ".modulation")


def original_to_diffusers_key(key: str) -> str:
    """One original Wan tensor name -> its diffusers name; unknown names come back unchanged (and are then reported
    as unexpected). Note the swap: the original cross-attention norm is `norm3`, diffusers' is `norm2`."""
    key = key.removeprefix("model.diffusion_model.")
    if key == "head.modulation":
        return "scale_shift_table"
    m = _BLOCK.fullmatch(key)
    if m is None:
        module, _, leaf = key.rpartition(".")
        return f"{_TOP_LEVEL[module]}.{leaf}" if module in _TOP_LEVEL else key
    i, rest = m.groups()
    if rest == "modulation":
        return f"blocks.{i}.scale_shift_table"
    module, _, leaf = rest.rpartition(".")
    parts = module.split(".")
    if parts[0] in ("self_attn", "cross_attn") and len(parts) == 2 and parts[1] in _ATTN:
        attn = "attn1" if parts[0] == "self_attn" else "attn2"
        return f"blocks.{i}.{attn}.{_ATTN[parts[1]]}.{leaf}"
    renamed = {"norm3": "norm2", "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2"}.get(module)
    return f"blocks.{i}.{renamed}.{leaf}" if renamed else key


_TOP_LEVEL_INV = {v: k for k, v in _TOP_LEVEL.items()}
_ATTN_INV = {v: k for k, v in _ATTN.items()}
_BLOCK_INV = {"norm2": "norm3", "ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2"}  # the block renames, reversed


def diffusers_to_original_key(key: str) -> str:
    """One diffusers Wan tensor name -> the original Wan name (inverse of `original_to_diffusers_key`)."""
    if key == "scale_shift_table":
        return "head.modulation"
    m = _BLOCK.fullmatch(key)
    if m is None:
        module, _, leaf = key.rpartition(".")
        return f"{_TOP_LEVEL_INV[module]}.{leaf}" if module in _TOP_LEVEL_INV else key
    i, rest = m.groups()
    if rest == "scale_shift_table":
        return f"blocks.{i}.modulation"
    module, _, leaf = rest.rpartition(".")
    attn, _, proj = module.partition(".")
    if attn in ("attn1", "attn2") and proj in _ATTN_INV:
        return f"blocks.{i}.{'self_attn' if attn == 'attn1' else 'cross_attn'}.{_ATTN_INV[proj]}.{leaf}"
    return f"blocks.{i}.{_BLOCK_INV[module]}.{leaf}" if module in _BLOCK_INV else key


def is_original_layout(keys: list[str]) -> bool:
    stripped = [k.removeprefix("model.diffusion_model.") for k in keys]
    return any(k.startswith(_ORIGINAL_PREFIXES) or any(p in k for p in _ORIGINAL_PARTS) for k in stripped)


# ---------------------------------------------------------------------------------------------------------------------
# A checkpoint on disk


@dataclass
class WanCheckpoint:
    """A Wan transformer checkpoint found on disk: its config, shards and tensor table (headers only)."""

    directory: Path
    config: dict[str, Any]
    shards: list[Path]
    tensors: dict[str, TensorInfo]  # by diffusers name
    layout: str  # "diffusers" or "original"

    @classmethod
    def open(cls, path: str | os.PathLike) -> WanCheckpoint:
        path = Path(path).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"checkpoint path {path} does not exist")
        if path.is_file():
            if path.suffix != ".safetensors":
                raise ValueError(f"{path}: expected a .safetensors file or a checkpoint directory")
            directory, shards = path.parent, [path]
        else:
            directory = path
            if not (path / "config.json").exists() and (path / "transformer" / "config.json").exists():
                directory = path / "transformer"
            shards = None
        config_path = directory / "config.json"
        if not config_path.exists():
            raise FileNotFoundError(f"{directory} has no config.json (expected a diffusers `transformer/` directory "
                                    "or an original Wan checkpoint directory)")
        shards = shards or _find_shards(directory)
        config = json.loads(config_path.read_text())
        raw: dict[str, TensorInfo] = {}
        for shard in shards:
            for name, info in read_header(shard).items():
                if name in raw:
                    raise ValueError(f"tensor {name!r} appears in both {raw[name].file.name} and {shard.name}")
                raw[name] = info
        layout = "original" if is_original_layout(list(raw)) else "diffusers"
        tensors: dict[str, TensorInfo] = {}
        for name, info in raw.items():
            new = original_to_diffusers_key(name) if layout == "original" else name
            if new in tensors:
                raise ValueError(f"tensors {tensors[new].name!r} and {name!r} both map to {new!r}")
            tensors[new] = info
        return cls(directory, config, shards, tensors, layout)

    def model_config(self, **overrides: Any) -> ModelConfig:
        return model_config_from_diffusers(self.config, **overrides)

    def nbytes(self) -> int:
        return sum(info.end - info.start for info in self.tensors.values())


def _find_shards(directory: Path) -> list[Path]:
    indexes = sorted(directory.glob("*.safetensors.index.json"))
    preferred = [p for p in indexes if p.name.startswith("diffusion_pytorch_model")] or indexes
    if preferred:
        index = json.loads(preferred[0].read_text())
        names = list(dict.fromkeys(index["weight_map"].values()))  # unique, first-seen order
        shards = [directory / n for n in names]
        missing = [str(p) for p in shards if not p.exists()]
        if missing:
            raise FileNotFoundError(f"{preferred[0].name} lists shards that are not on disk: {missing}")
        return shards
    files = sorted(directory.glob("diffusion_pytorch_model*.safetensors")) or sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {directory}")
    return files


# ---------------------------------------------------------------------------------------------------------------------
# Loading


def load_checkpoint_into(
    module: nn.Module,
    ckpt: WanCheckpoint,
    dtype: torch.dtype | None = torch.float32,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """Install every tensor of `ckpt` into `module` (typically built on the meta device) with assign=True.

    Names and shapes are checked from the headers before any data is read; a mismatch raises one error listing every
    missing key, unexpected key and shape difference. Floating-point tensors are converted to `dtype` (None = keep).
    """
    device = torch.device(device)
    expected = {k: tuple(v.shape) for k, v in module.state_dict(keep_vars=True).items()}
    missing = sorted(set(expected) - set(ckpt.tensors))
    unexpected = sorted(set(ckpt.tensors) - set(expected))
    shapes = [
        f"  {k}: checkpoint {tuple(ckpt.tensors[k].shape)} ({ckpt.tensors[k].file.name}) vs model {expected[k]}"
        for k in sorted(set(expected) & set(ckpt.tensors))
        if tuple(ckpt.tensors[k].shape) != expected[k]
    ]
    if missing or unexpected or shapes:
        msg = [f"checkpoint {ckpt.directory} ({ckpt.layout} layout) does not fit {type(module).__name__}:"]
        if missing:
            msg.append(f"missing keys ({len(missing)}): {_head(missing)}")
        if unexpected:
            original = {k: ckpt.tensors[k].name for k in unexpected if ckpt.tensors[k].name != k}
            note = f" (file names: {_head([original[k] for k in unexpected if k in original])})" if original else ""
            msg.append(f"unexpected keys ({len(unexpected)}): {_head(unexpected)}{note}")
        if shapes:
            msg.append(f"shape mismatches ({len(shapes)}):\n" + "\n".join(shapes[:20]))
        raise ValueError("\n".join(msg))

    by_file: dict[Path, list[tuple[str, TensorInfo]]] = {}
    for key, info in ckpt.tensors.items():
        by_file.setdefault(info.file, []).append((key, info))
    for shard in ckpt.shards:
        entries = sorted(by_file.get(shard, []), key=lambda e: e[1].start)  # sequential reads
        if not entries:
            continue
        with MappedFile(shard) as mf:
            chunk = {key: mf.copy(info, dtype, device) for key, info in entries}
        result = module.load_state_dict(chunk, strict=False, assign=True)
        assert not result.unexpected_keys, result.unexpected_keys  # checked above from the headers
        del chunk
    left = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
    if left:
        raise ValueError(f"after loading, these tensors are still on the meta device (not in the checkpoint and not "
                         f"buffers the module recomputes): {_head(left)}")
    return module


def _head(items: list[str], n: int = 12) -> str:
    return ", ".join(items[:n]) + (f", ... (+{len(items) - n})" if len(items) > n else "")


def load_video_expert(
    path: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    model_cfg: ModelConfig | None = None,
    **overrides: Any,
):
    """A `VideoExpert` holding the Wan transformer weights at `path` (diffusers or original layout).

    Its `forward(hidden_states, timestep, encoder_hidden_states)` equals diffusers' `WanTransformer3DModel`'s.
    `model_cfg` (if given) must agree with the checkpoint's config on the video-expert fields; otherwise the config
    is derived from the checkpoint, with `overrides` for the other fields.
    """
    from fastwam.model.experts import VideoExpert

    ckpt = WanCheckpoint.open(path)
    ckpt_cfg = ckpt.model_config(**overrides)
    if model_cfg is not None:
        check_video_config(model_cfg, ckpt_cfg)
    cfg = model_cfg or ckpt_cfg
    with torch.device("meta"):
        expert = VideoExpert(cfg)
    load_checkpoint_into(expert, ckpt, dtype=dtype, device=device)
    return expert.eval()
