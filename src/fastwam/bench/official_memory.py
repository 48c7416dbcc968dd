"""`fastwam bench memory --official`: peak host RAM of `fastwam import official` against the checkpoint's size.

Writes a synthetic checkpoint in the official Fast-WAM layout (`torch.save` of `{"mot": mixtures.video.* +
mixtures.action.* in the original Wan names, "proprio_encoder": {weight, bias}, "step", "torch_dtype"}`) with the exact
tensor shapes of the `libero_2cam224` preset — the released 5B model: video expert = Wan2.2-TI2V-5B, action expert
1024 wide, 30 layers each, 6.02B parameters, ~12.0 GB in bf16 — or fewer layers with `--size-gb`. A fresh
subprocess then runs the import (`fastwam.formats.official.cli`, exactly what `fastwam import official` runs) and
reports its peak resident set (`VmHWM`: mapped file pages count as well as copies). Target: peak <= 1.3 x checkpoint
size.

The writer never holds the checkpoint in memory: every tensor is a private, lazily read mapping of one sparse file
of zeros as long as the largest tensor (`torch.from_file`), so the pages `torch.save` streams out are the same few
page-cache pages for every tensor. The values are all zero, which changes nothing for the import (it never looks at
them). The import writes a second file of the same size, so the disk needs room for two (checked first).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from fastwam.config import ModelConfig, get_preset
from fastwam.errors import UserError
from fastwam.formats.official import fastwam_to_official_key

TARGET_RATIO = 1.3
PRESET = "libero_2cam224"  # the preset whose model is the released 5B checkpoint's
_HEADROOM = 1.02  # disk: both files plus 2 % and 256 MB for headers, config files and the filesystem
_HEADROOM_BYTES = 256 << 20

# ---------------------------------------------------------------------------------------------------------------------
# The synthetic checkpoint


def model_shapes(model: ModelConfig) -> dict[str, tuple[int, ...]]:
    """FastWAM state-dict shapes of `model` (built on the meta device: nothing allocated)."""
    from fastwam.model.fastwam import FastWAM

    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in FastWAM(model).state_dict().items()}


def five_b_model() -> ModelConfig:
    return get_preset(PRESET).model


def layers_for_size(model: ModelConfig, size_gb: float, itemsize: int) -> int:
    """The number of layers (both experts) that makes a checkpoint of `model`'s widths about `size_gb` GB."""
    one = sum(map(_numel, model_shapes(_with_layers(model, 1)).values()))
    two = sum(map(_numel, model_shapes(_with_layers(model, 2)).values()))
    per_layer, fixed = (two - one) * itemsize, (2 * one - two) * itemsize
    return max(1, round((size_gb * 1e9 - fixed) / per_layer))


def _with_layers(model: ModelConfig, n: int) -> ModelConfig:
    return dataclasses.replace(model, num_layers=n)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def checkpoint_nbytes(model: ModelConfig, itemsize: int) -> int:
    return sum(map(_numel, model_shapes(model).values())) * itemsize


def write_official_checkpoint(path: Path, model: ModelConfig, dtype: torch.dtype = torch.bfloat16,
                              step: int = 0) -> dict:
    """An official-layout checkpoint of `model`'s shapes at `path` (all zeros), written without holding it in RAM."""
    shapes = model_shapes(model)
    zeros = path.with_name(path.name + ".zeros")
    largest = max(map(_numel, shapes.values()))
    with open(zeros, "wb") as f:
        f.truncate(largest * dtype.itemsize)  # sparse: no disk blocks, read back as zeros
    payload: dict = {"mot": {}, "proprio_encoder": {}}
    try:
        for key, shape in shapes.items():
            part, name = fastwam_to_official_key(key)
            # A private mapping, read lazily: torch.save touches each tensor's pages only while writing it, and
            # every tensor maps the same file, so they are the same page-cache pages.
            payload[part][name] = torch.from_file(str(zeros), shared=False, size=_numel(shape),
                                                  dtype=dtype).view(shape)
        payload.update(step=step, torch_dtype=str(dtype))
        torch.save(payload, path)
    finally:
        payload.clear()
        zeros.unlink(missing_ok=True)
    return {"num_layers": model.num_layers, "tensors": len(shapes), "mot_tensors": len(shapes) - 2,
            "parameters": sum(map(_numel, shapes.values()))}


# ---------------------------------------------------------------------------------------------------------------------
# Measuring


def _child(checkpoint: str, out: str, num_heads: int) -> None:
    """Runs in a fresh interpreter: import the checkpoint as the CLI does, print one JSON line last."""
    from fastwam import checkpoint as _checkpoint  # noqa: F401 - imported before the baseline, as the import needs them
    from fastwam.bench.rss import _peak_rss_bytes, _rss_bytes
    from fastwam.formats import official
    from fastwam.model import fastwam as _fastwam  # noqa: F401

    baseline = _peak_rss_bytes()
    rss_before = _rss_bytes()
    t0 = time.perf_counter()
    official.cli(["--checkpoint", checkpoint, "--out", out, "--config.model.num-heads", str(num_heads)])
    seconds = time.perf_counter() - t0
    peak = _peak_rss_bytes()
    written = Path(out) / "checkpoints" / (Path(out) / "checkpoints" / "latest").read_text().strip()
    print(json.dumps({"baseline_peak_rss_bytes": baseline, "rss_before_load_bytes": rss_before,
                      "peak_rss_bytes": peak, "rss_after_load_bytes": _rss_bytes(), "import_seconds": seconds,
                      "output_bytes": (written / "model.safetensors").stat().st_size}))


def _need_disk(directory: Path, need: int, what: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(directory).free
    if free < need:
        raise UserError(f"{directory}: {free / 1e9:.1f} GB free, but the benchmark needs about {need / 1e9:.1f} GB "
                        f"({what}): free some space, pass --dir on a larger disk, or --size-gb N for fewer layers")


def run_official(args, model: ModelConfig | None = None) -> dict:
    """`fastwam bench memory --official` (args: bench.memory.MemoryArgs). `model`: shapes to synthesise instead of
    the 5B preset's (tests use a tiny one); `--size-gb` then changes only its number of layers."""
    from fastwam.bench.rss import _DTYPES, peak_report

    if args.dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {args.dtype!r}")
    dtype = getattr(torch, _DTYPES[args.dtype])
    model = model or five_b_model()
    if args.size_gb is not None:
        model = _with_layers(model, layers_for_size(model, args.size_gb, dtype.itemsize))
    written: dict = {}
    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="fastwam-membench-official-"))
    remove_all = not (args.dir or args.keep)
    out = work / "run"
    try:
        if args.path:
            path = Path(args.path)
            if not path.is_file():
                raise UserError(f"{path}: no such file")
            _need_disk(work, int(path.stat().st_size * _HEADROOM) + _HEADROOM_BYTES, "the imported copy")
        else:
            path = work / "official_synthetic.pt"
            size = checkpoint_nbytes(model, dtype.itemsize)
            _need_disk(work, int(2 * size * _HEADROOM) + _HEADROOM_BYTES,
                       f"the {size / 1e9:.1f} GB synthetic checkpoint and its imported copy")
            t0 = time.perf_counter()
            written = write_official_checkpoint(path, model, dtype)
            written["write_seconds"] = time.perf_counter() - t0
        if out.exists():
            shutil.rmtree(out)
        ckpt_bytes = path.stat().st_size
        code = (f"from fastwam.bench.official_memory import _child; "
                f"_child({str(path)!r}, {str(out)!r}, {model.num_heads})")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"import subprocess failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        child = json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        if remove_all:
            shutil.rmtree(work, ignore_errors=True)
        elif not args.keep:  # --dir without --keep: remove what was written there
            if not args.path:
                (work / "official_synthetic.pt").unlink(missing_ok=True)
            shutil.rmtree(out, ignore_errors=True)
    peak = child["peak_rss_bytes"]
    return {
        "mode": "official",
        "checkpoint": str(path) if (args.path or args.keep) else "(synthetic, removed)",
        "output": str(out) if args.keep else "(removed)",
        "checkpoint_bytes": ckpt_bytes,
        "checkpoint_gb": ckpt_bytes / 1e9,
        "dtype": args.dtype,
        **written,
        **child,
        "load_seconds": child["import_seconds"],
        **peak_report(peak, ckpt_bytes, child["rss_before_load_bytes"], TARGET_RATIO),
    }
