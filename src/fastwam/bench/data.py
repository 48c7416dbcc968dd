"""`fastwam bench data`: throughput of the training clip loader on a LeRobot dataset.

Measures, on the machine it runs on: building the dataset (decode + cache), then random batches of `batch_size`
clips through the path the trainer uses (`[ds[i] for i in idx]` then `ds.collate`) and through the vectorised
`ds.get_batch(idx)`. Reports clips/s and batches/s for each (higher is better); `clips_per_s` is the trainer's path.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import sys
import time
from dataclasses import dataclass

import numpy as np

from fastwam.presets import PresetName


@dataclass(frozen=True)
class BenchDataArgs:
    """Training data loader throughput (JSON with --json)."""

    dataset: str  # a LeRobot dataset directory
    # Config preset: clip shapes (frames, stride, horizon, image size) come from its data config.
    preset: PresetName = "small_cpu"
    batch_size: int = 32
    batches: int = 50  # timed batches per path
    warmup: int = 3
    seed: int = 0
    threads: int = 0  # torch threads (0 = torch default)
    cache_in_memory: bool = True
    json: bool = False


def run(args: BenchDataArgs) -> dict:
    import torch

    from fastwam.config import get_preset
    from fastwam.data.clips import ClipDataset

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = dataclasses.replace(get_preset(args.preset).data, dataset=args.dataset,
                              cache_in_memory=args.cache_in_memory)
    t0 = time.perf_counter()
    ds = ClipDataset(cfg, split="train")
    build_s = time.perf_counter() - t0
    rng = np.random.default_rng(args.seed)

    def batches(n: int) -> list[np.ndarray]:
        return [rng.integers(0, len(ds), args.batch_size) for _ in range(n)]

    def time_path(fn) -> float:
        for idx in batches(args.warmup):
            fn(idx)
        todo = batches(args.batches)
        t = time.perf_counter()
        for idx in todo:
            out = fn(idx)
        dt = time.perf_counter() - t
        assert out["video"].shape[0] == args.batch_size
        return dt

    items_s = time_path(lambda idx: ds.collate([ds[int(i)] for i in idx]))
    batched_s = time_path(ds.get_batch)
    n = args.batches * args.batch_size
    cache_bytes = sum(c.nbytes for c in ds._cache) if ds._cache is not None else 0
    sample = ds[0]
    return {
        "dataset": args.dataset,
        "preset": args.preset,
        "batch_size": args.batch_size,
        "batches": args.batches,
        "clips_per_s": round(n / items_s, 1),
        "batches_per_s": round(args.batches / items_s, 2),
        "batched_clips_per_s": round(n / batched_s, 1),
        "batched_batches_per_s": round(args.batches / batched_s, 2),
        "build_seconds": round(build_s, 2),
        "cached": ds._cache is not None,
        "cache_mb": round(cache_bytes / 1e6, 1),
        "episodes": ds.num_episodes,
        "clips": len(ds),
        "fps": ds.fps,
        "cameras": ds.camera_keys,
        "video_shape": list(sample["video"].shape),
        "actions_shape": list(sample["actions"].shape),
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "processor": platform.processor() or platform.machine()},
    }


def cli(argv: list[str], prog: str = "fastwam bench data") -> int:
    import tyro

    args = tyro.cli(BenchDataArgs, args=argv, prog=prog)
    res = run(args)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(f"{res['clips_per_s']:.0f} clips/s ({res['batches_per_s']:.1f} batches of {args.batch_size}/s) via items+"
              f"collate; {res['batched_clips_per_s']:.0f} clips/s via get_batch; built in {res['build_seconds']:.1f} s "
              f"({res['episodes']} episodes, {res['clips']} clips, cache {res['cache_mb']:.0f} MB)", file=sys.stderr)
    return 0
