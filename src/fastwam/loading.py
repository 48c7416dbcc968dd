"""`fastwam.load_model`: the bare FastWAM module of a run or checkpoint directory, for people who feed their own
latents and text states (no codec, no text encoder, no normaliser are built)."""

from __future__ import annotations

from pathlib import Path

import torch

from fastwam import checkpoint as ckpt_io
from fastwam.model.fastwam import FastWAM


def model_from_weights(model_cfg, weights: Path) -> FastWAM:
    """A FastWAM built on the meta device whose parameters are the tensors of `weights` (no random initialisation of
    weights about to be replaced, nothing allocated twice); names and shapes checked (`checkpoint.load_weights`)."""
    with torch.device("meta"):
        model = FastWAM(model_cfg)
    ckpt_io.load_weights(model, weights, assign=True)
    return model


def load_model(path: str | Path, dtype: torch.dtype | str | None = None, device: str | torch.device | None = None,
               use_ema: bool = True) -> FastWAM:
    """The FastWAM of a checkpoint directory (or a run directory: its latest checkpoint), in eval mode.

    dtype: None keeps the stored dtype (e.g. bf16 for imported official checkpoints); device: None = CPU. The module
    is built on the meta device and the stored tensors become its parameters, so nothing is allocated twice.
    """
    ckpt = ckpt_io.resolve_checkpoint(path)
    cfg = ckpt_io.load_config(ckpt)
    weights = ckpt / ckpt_io.EMA if use_ema and (ckpt / ckpt_io.EMA).is_file() else ckpt / ckpt_io.WEIGHTS
    model = model_from_weights(cfg.model, weights)
    device = torch.device(device or "cpu")
    if dtype is not None:
        model = model.to(dtype=resolve_dtype(dtype, device))
    return model.to(device).eval()


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """"auto": bf16 on CUDA (the paper's inference precision), fp32 on CPU (bf16 is ~20x slower on this CPU)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16}
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; choose auto, {', '.join(names)}")
    return names[dtype]
