"""`fastwam data metaworld`: scripted Meta-World experts -> a LeRobot v3.0 dataset.

Work is cut into shards of `shard_size` episodes per task; shard s of every task runs in its own env made with
seed `seed * 1000 + s`, so the data depend only on (tasks, episodes, seed, shard size, image settings) and never
on the number of worker processes. Only successful episodes are kept (an episode stops `post_success_steps` after the
first success, or fails at `max_steps`); each shard retries until it has its episodes or `max_attempts_factor` times
as many attempts. Episodes are written round-robin over tasks, so the last episodes (the validation split of the
clip loader) cover every task. Frames are (observation, expert action) pairs at the control rate (80 Hz: Meta-World
steps 5 x 2.5 ms of physics per action).
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fastwam.envs.metaworld import DEFAULT_CAMERAS, INSTRUCTIONS, MetaWorldEnv, parse_tasks

CONTROL_FPS = 80  # 1 / (frame_skip 5 * timestep 0.0025 s)
STATE_NAMES = ["eef_x", "eef_y", "eef_z", "gripper_opening"]
ACTION_NAMES = ["dx", "dy", "dz", "gripper"]
SEED_STRIDE = 1000  # shard s of seed k runs env seed k * SEED_STRIDE + s (evaluate with seeds outside these)


@dataclass(frozen=True)
class GenArgs:
    """Generate scripted Meta-World demonstrations as a LeRobot v3.0 dataset."""

    out: Path  # dataset directory to create
    tasks: str = "mt10"  # a task set (mt10, mt50) or a comma-separated list (push-v3,reach or push,reach-v3)
    episodes: int = 50  # successful episodes kept per task
    seed: int = 0
    image_size: int = 64  # square camera images (pixels)
    cameras: tuple[str, ...] = DEFAULT_CAMERAS
    workers: int = 2  # simulation processes (always separate from the writer, see `generate`)
    max_steps: int = 300  # an episode without success by then is discarded
    post_success_steps: int = 10  # steps recorded after the first success
    shard_size: int = 5  # episodes per (task, env seed) work unit
    max_attempts_factor: float = 3.0  # attempts allowed per shard, as a multiple of the episodes it needs
    vcodec: str = "h264"
    crf: int = 12  # x264 quality (lower = better); 12 keeps the table texture and 2-px markers at 64x64
    overwrite: bool = False
    progress: bool = True


@dataclass
class ShardJob:
    task: str
    shard: int
    env_seed: int
    want: int
    max_attempts: int
    image_size: int
    cameras: tuple[str, ...]
    max_steps: int
    post_success_steps: int


@dataclass
class ShardResult:
    task: str
    shard: int
    attempted: int = 0
    episodes: list[dict[str, np.ndarray]] = field(default_factory=list)
    failed_lengths: list[int] = field(default_factory=list)
    seconds: float = 0.0


def run_episode(env: MetaWorldEnv, post_success_steps: int) -> tuple[dict[str, np.ndarray], bool]:
    """Roll the expert out once: per step the observation and the action taken from it."""
    obs = env.reset()
    images: dict[str, list[np.ndarray]] = {c: [] for c in env.cameras}
    states, actions = [], []
    success_at = None
    while True:
        action = env.expert_action()
        for c in env.cameras:
            images[c].append(obs["images"][c])
        states.append(obs["state"])
        actions.append(action)
        obs, _, success, done = env.step(action)
        if success and success_at is None:
            success_at = env.steps
        if success_at is not None and env.steps >= success_at + post_success_steps:
            break
        if done:
            break
    data = {f"observation.images.{c}": np.stack(v) for c, v in images.items()}
    data["observation.state"] = np.stack(states).astype(np.float32)
    data["action"] = np.stack(actions).astype(np.float32)
    return data, success_at is not None


def run_shard(job: ShardJob) -> ShardResult:
    """Worker entry point (top level so spawn can pickle it)."""
    t0 = time.perf_counter()
    res = ShardResult(job.task, job.shard)
    env = MetaWorldEnv(job.task, job.env_seed, image_size=job.image_size, cameras=job.cameras,
                       max_steps=job.max_steps)
    try:
        while len(res.episodes) < job.want and res.attempted < job.max_attempts:
            data, ok = run_episode(env, job.post_success_steps)
            res.attempted += 1
            if ok:
                res.episodes.append(data)
            else:
                res.failed_lengths.append(len(data["action"]))
    finally:
        env.close()
    res.seconds = time.perf_counter() - t0
    return res


def make_jobs(args: GenArgs, tasks: list[str]) -> list[ShardJob]:
    """Shard jobs in round-robin order: shard 0 of every task, then shard 1, ..."""
    n_shards = math.ceil(args.episodes / args.shard_size)
    jobs = []
    for s in range(n_shards):
        want = min(args.shard_size, args.episodes - s * args.shard_size)
        for task in tasks:
            jobs.append(ShardJob(task, s, args.seed * SEED_STRIDE + s, want,
                                 max(want, math.ceil(want * args.max_attempts_factor)), args.image_size,
                                 tuple(args.cameras), args.max_steps, args.post_success_steps))
    return jobs


def dataset_features(image_size: int, cameras: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    feats: dict[str, dict[str, Any]] = {
        f"observation.images.{c}": {"dtype": "video", "shape": [image_size, image_size, 3],
                                    "names": ["height", "width", "channels"]}
        for c in cameras
    }
    feats["observation.state"] = {"dtype": "float32", "shape": [4], "names": STATE_NAMES}
    feats["action"] = {"dtype": "float32", "shape": [4], "names": ACTION_NAMES}
    return feats


def generate(args: GenArgs) -> dict[str, Any]:
    """Run the experts, write the dataset, return the summary (also saved as fastwam_generation.json)."""
    from tqdm.auto import tqdm

    from fastwam.data.lerobot_writer import LeRobotWriter, dataset_size_bytes

    if args.episodes < 1 or args.shard_size < 1 or args.image_size < 8:
        raise ValueError("episodes and shard_size must be >= 1, image_size >= 8")
    tasks = parse_tasks(args.tasks)
    jobs = make_jobs(args, tasks)
    t_start = time.perf_counter()
    writer = LeRobotWriter(args.out, CONTROL_FPS, dataset_features(args.image_size, tuple(args.cameras)),
                           robot_type="sawyer", vcodec=args.vcodec, crf=args.crf, overwrite=args.overwrite)
    per_task = {t: {"kept": 0, "attempted": 0, "frames": 0, "failed_lengths": [], "env_seeds": []} for t in tasks}
    bar = tqdm(total=len(tasks) * args.episodes, unit="ep", desc="metaworld demos", disable=not args.progress,
               dynamic_ncols=True)
    pending_round: list[ShardResult] = []

    def flush_round() -> None:
        # Interleave the round's episodes over tasks so every task appears throughout the dataset.
        depth = max((len(r.episodes) for r in pending_round), default=0)
        for k in range(depth):
            for r in pending_round:
                if k < len(r.episodes):
                    writer.add_episode(INSTRUCTIONS[r.task], r.episodes[k])
        pending_round.clear()

    pool = None
    try:
        # Simulation always runs in child processes: x264 in a process that has also rendered with EGL/llvmpipe
        # produced different bytes now and then (measured), so the encoding process never renders. For byte-identical
        # datasets, call this from a process that has not rendered either (the CLI does; an in-process Meta-World
        # evaluation before it in the same process does not).
        pool = mp.get_context("spawn").Pool(max(1, args.workers))
        results = pool.imap(run_shard, jobs, chunksize=1)
        for i, res in enumerate(results):
            st = per_task[res.task]
            st["kept"] += len(res.episodes)
            st["attempted"] += res.attempted
            st["frames"] += sum(len(e["action"]) for e in res.episodes)
            st["failed_lengths"] += res.failed_lengths
            st["env_seeds"].append(jobs[i].env_seed)
            bar.update(len(res.episodes))
            bar.set_postfix(discarded=sum(s["attempted"] - s["kept"] for s in per_task.values()))
            pending_round.append(res)
            if len(pending_round) == len(tasks):
                flush_round()
        flush_round()
    finally:
        bar.close()
        if pool is not None:
            pool.close()
            pool.join()
    writer.finalize()
    wall = time.perf_counter() - t_start
    summary = {
        "dataset": str(args.out),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(args).items()},
        "fps": CONTROL_FPS,
        "episodes": len(writer.episodes),
        "frames": writer.total_frames,
        "per_task": {t: {**s, "success_rate": s["kept"] / max(1, s["attempted"]),
                         "mean_length": s["frames"] / max(1, s["kept"])} for t, s in per_task.items()},
        "discarded": sum(s["attempted"] - s["kept"] for s in per_task.values()),
        "shortfall": {t: args.episodes - s["kept"] for t, s in per_task.items() if s["kept"] < args.episodes},
        "wall_seconds": round(wall, 1),
        "size_bytes": dataset_size_bytes(args.out),
    }
    (Path(args.out) / "fastwam_generation.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def format_summary(s: dict[str, Any]) -> str:
    lines = [f"wrote {s['dataset']}: {s['episodes']} episodes, {s['frames']} frames at {s['fps']} fps, "
             f"{s['size_bytes'] / 1e6:.1f} MB, {s['wall_seconds']:.0f} s"]
    lines.append(f"  {'task':<26} kept/attempted  success  mean length")
    for t, st in s["per_task"].items():
        lines.append(f"  {t:<26} {st['kept']:>4}/{st['attempted']:<9} {100 * st['success_rate']:6.1f}%  "
                     f"{st['mean_length']:8.1f}")
    lines.append(f"  discarded (expert failed): {s['discarded']}")
    if s["shortfall"]:
        lines.append(f"  WARNING: fewer episodes than asked for: {s['shortfall']}")
    return "\n".join(lines)


def cli(argv: list[str], prog: str = "fastwam data metaworld") -> int:
    import tyro

    args = tyro.cli(GenArgs, args=argv, prog=prog)
    summary = generate(args)
    print(format_summary(summary), file=sys.stderr)
    return 0
