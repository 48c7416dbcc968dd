"""`fastwam bench memory`: peak host RAM while loading a Wan transformer checkpoint, against its size (JSON).

Writes a synthetic checkpoint in the diffusers layout with the exact tensor shapes of Wan2.2-TI2V-5B (hidden 3072,
24 x 128 heads, FFN 14336, 48 latent channels, text 4096) but only as many layers as fit `--size-gb` (the full model
is 30 layers, ~10 GB in bf16), sharded like `save_pretrained` (`--shard-gb`, diffusers' default 5 GB — so a checkpoint
below 5 GB is one shard, the hardest case for a memory-mapped loader). A fresh subprocess then imports the loader,
records its resident set, loads the checkpoint with `fastwam.load_video_expert`, and reports the peak resident set
(`VmHWM`, which counts mapped file pages as well as copies). Target: peak <= 1.2 x checkpoint size.

`--official` measures `fastwam import official` instead, on a synthetic checkpoint in the official Fast-WAM layout
(by default the released 5B model's full shape, ~12 GB in bf16); see `fastwam.bench.official_memory`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import tyro

from fastwam.bench.rss import _DTYPES, _peak_rss_bytes, _rss_bytes, peak_report


@dataclass
class MemoryArgs:
    # approximate checkpoint size to synthesise (GB = 1e9 bytes), set by the number of layers; default 2 GB, with
    # --official the full 30-layer 5B model (~12 GB)
    size_gb: float | None = None
    dtype: str = "bf16"  # stored dtype (bf16 | fp16 | fp32); the checkpoint is loaded in the same dtype
    shard_gb: float = 5.0  # max shard size, as save_pretrained's max_shard_size
    dir: str = ""  # where to write the checkpoint (default: a temporary directory, removed afterwards)
    keep: bool = False  # keep the written checkpoint
    path: str = ""  # measure an existing checkpoint instead of writing one (with --official: an official .pt)
    # measure `fastwam import official` on an official-layout .pt (the 5B shapes) instead of the Wan loader; the disk
    # needs room for the checkpoint twice (it and the imported copy)
    official: bool = False
    json: bool = False  # print the whole report as JSON instead of one summary line


def _five_b_config(num_layers: int) -> dict:
    return {"_class_name": "WanTransformer3DModel", "added_kv_proj_dim": None, "attention_head_dim": 128,
            "cross_attn_norm": True, "eps": 1e-06, "ffn_dim": 14336, "freq_dim": 256, "image_dim": None,
            "in_channels": 48, "num_attention_heads": 24, "num_layers": num_layers, "out_channels": 48,
            "patch_size": [1, 2, 2], "pos_embed_seq_len": None, "qk_norm": "rms_norm_across_heads",
            "rope_max_seq_len": 1024, "text_dim": 4096}


def _shapes(num_layers: int) -> dict[str, tuple[int, ...]]:
    import torch

    from fastwam.model.experts import VideoExpert
    from fastwam.model.weights import model_config_from_diffusers

    with torch.device("meta"):
        expert = VideoExpert(model_config_from_diffusers(_five_b_config(num_layers)))
    return {k: tuple(v.shape) for k, v in expert.state_dict().items()}


def write_synthetic_checkpoint(directory: Path, size_gb: float, dtype: str = "bf16", shard_gb: float = 5.0) -> dict:
    """A 5B-shaped diffusers checkpoint of about `size_gb` GB in `directory`; returns what was written."""
    import torch
    from safetensors.torch import save_file

    tdtype = getattr(torch, _DTYPES[dtype])
    item = tdtype.itemsize
    one, two = _shapes(1), _shapes(2)
    per_layer = (sum(map(_numel, two.values())) - sum(map(_numel, one.values()))) * item
    fixed = sum(map(_numel, one.values())) * item - per_layer
    layers = max(1, round((size_gb * 1e9 - fixed) / per_layer))
    shapes = _shapes(layers)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(_five_b_config(layers), indent=2))
    # Group tensors into shards in state-dict order, as save_pretrained does.
    shards: list[list[str]] = [[]]
    size = 0
    for k, s in shapes.items():
        n = _numel(s) * item
        if shards[-1] and size + n > shard_gb * 1e9:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += n
    gen = torch.Generator().manual_seed(0)
    names = []
    weight_map = {}
    for i, keys in enumerate(shards):
        name = ("diffusion_pytorch_model.safetensors" if len(shards) == 1
                else f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors")
        tensors = {k: (torch.randn(shapes[k], generator=gen) * 0.02).to(tdtype) for k in keys}
        save_file(tensors, str(directory / name), metadata={"format": "pt"})
        del tensors
        names.append(name)
        weight_map.update({k: name for k in keys})
    if len(shards) > 1:
        total = sum(_numel(s) * item for s in shapes.values())
        (directory / "diffusion_pytorch_model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return {"num_layers": layers, "shards": len(names)}


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _child(path: str, dtype: str) -> None:
    """Runs in a fresh interpreter: load the checkpoint, print one JSON line."""
    import torch

    from fastwam.model.weights import load_video_expert

    baseline = _peak_rss_bytes()
    rss_before = _rss_bytes()
    t0 = time.perf_counter()
    expert = load_video_expert(path, dtype=getattr(torch, _DTYPES[dtype]))
    seconds = time.perf_counter() - t0
    peak = _peak_rss_bytes()
    params = sum(p.numel() * p.element_size() for p in expert.parameters())
    print(json.dumps({"baseline_peak_rss_bytes": baseline, "rss_before_load_bytes": rss_before,
                      "peak_rss_bytes": peak, "rss_after_load_bytes": _rss_bytes(), "param_bytes": params,
                      "parameters": sum(p.numel() for p in expert.parameters()), "load_seconds": seconds}))


def _checkpoint_bytes(path: Path) -> int:
    directory = path / "transformer" if (path / "transformer" / "config.json").exists() else path
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def run(args: MemoryArgs) -> dict:
    if args.official:
        from fastwam.bench.official_memory import run_official

        return run_official(args)
    if args.dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {args.dtype!r}")
    written: dict = {}
    tmp = None
    if args.path:
        path = Path(args.path)
    else:
        path = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="fastwam-membench-"))
        tmp = None if (args.dir or args.keep) else path
        t0 = time.perf_counter()
        size_gb = 2.0 if args.size_gb is None else args.size_gb
        written = write_synthetic_checkpoint(path, size_gb, args.dtype, args.shard_gb)
        written["write_seconds"] = time.perf_counter() - t0
    try:
        ckpt_bytes = _checkpoint_bytes(path)
        code = f"from fastwam.bench.memory import _child; _child({str(path)!r}, {args.dtype!r})"
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"loader subprocess failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        child = json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    peak = child["peak_rss_bytes"]
    return {
        "checkpoint": str(path) if (args.path or args.keep or args.dir) else "(synthetic, removed)",
        "checkpoint_bytes": ckpt_bytes,
        "checkpoint_gb": ckpt_bytes / 1e9,
        "dtype": args.dtype,
        **{k: v for k, v in written.items()},
        **child,
        **peak_report(peak, ckpt_bytes, child["rss_before_load_bytes"]),
    }


def cli(argv: list[str], prog: str = "fastwam bench memory") -> int:
    args = tyro.cli(MemoryArgs, args=argv, prog=prog)
    report = run(args)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        what = "import" if args.official else "load"
        print(f"checkpoint {report['checkpoint_gb']:.2f} GB ({report.get('num_layers', '?')} layers), "
              f"peak RSS {report['peak_rss_gb']:.2f} GB, ratio {report['ratio_peak_to_checkpoint']:.3f} "
              f"(target <= {report['target_ratio']}), {what} alone {report['ratio_loader_to_checkpoint']:.3f}, "
              f"{what} {report['load_seconds']:.1f} s")
    return 0 if report["pass"] else 1
