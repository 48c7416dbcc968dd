"""`fastwam bench train`: training step rate and where each step's time goes, as JSON.

Runs the real training loop (`fastwam.train.train`) for `--steps` steps and reads its timers: `compute` is the
model's forward, backward and optimiser step (including the frozen codec / text encoder on the batch); everything
else — fetching clips, logging, checkpointing — is overhead. Measured in the same run, on the machine it runs on.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from dataclasses import dataclass

import torch
import tyro

from fastwam.bench.latency import machine_info
from fastwam.config import get_preset
from fastwam.presets import PresetName


@dataclass
class TrainBenchArgs:
    preset: PresetName = "small_cpu"  # config preset to train
    dataset: str = ""  # a LeRobot dataset; empty = synthetic clips of the preset's shapes
    variant: str = "fast"
    steps: int = 60
    batch: int = 0  # 0 = the preset's batch size
    save_every: int = 30  # checkpoint during the run so its cost is counted
    threads: int = 0
    json: bool = False


def run(args: TrainBenchArgs) -> dict:
    from fastwam.train import train

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = get_preset(args.preset)
    tc = dataclasses.replace(cfg.train, steps=args.steps, save_every=args.save_every, log_every=10,
                             variant=args.variant, warmup_frac=0.0,
                             batch_size=args.batch or cfg.train.batch_size)
    data = cfg.data if not args.dataset else dataclasses.replace(cfg.data, dataset=args.dataset)
    cfg = cfg.replace(train=tc, data=data)
    dataset = None
    if not args.dataset:
        from fastwam.data.synthetic import SyntheticClips

        dataset = SyntheticClips(cfg.data, num_clips=256)
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        result = train(cfg, out, dataset=dataset, progress=False)
        wall = time.perf_counter() - t0
    timers = result.timers
    loop = sum(timers.values())
    overhead = loop - timers["compute"]
    return {
        "benchmark": "train",
        "preset": args.preset,
        "variant": args.variant,
        "dataset": args.dataset or "synthetic",
        "steps": args.steps,
        "batch_size": tc.batch_size,
        "it_per_s": round(args.steps / loop, 3),
        "samples_per_s": round(args.steps * tc.batch_size / loop, 1),
        "seconds": {k: round(v, 3) for k, v in timers.items()},
        "share": {k: round(v / loop, 4) for k, v in timers.items()},
        "overhead_share": round(overhead / loop, 4),
        "setup_s": round(wall - loop, 2),
        "machine": machine_info(torch.device("cpu" if not torch.cuda.is_available() else "cuda"), torch.float32),
    }


def cli(argv: list[str], prog: str = "fastwam bench train") -> int:
    args = tyro.cli(TrainBenchArgs, args=argv, prog=prog)
    report = run(args)
    print(json.dumps(report, indent=2) if args.json else
          f"{report['it_per_s']} it/s, overhead {100 * report['overhead_share']:.1f} % of each step")
    return 0
