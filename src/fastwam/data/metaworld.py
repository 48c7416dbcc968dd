"""`fastwam data metaworld`: scripted Meta-World experts -> a LeRobot v3.0 dataset.

Work is cut into shards of `shard_size` episodes per task; shard s of every task runs in its own env made with
seed `seed * 1000 + s`, so the data depend only on (tasks, episodes, seed, shard size, image settings, policies) and
never on the number of worker processes. By default only successful episodes are kept (an episode stops
`post_success_steps` after the first success, or fails at `max_steps`); each shard retries until it has its episodes
or `max_attempts_factor` times as many attempts. Episodes are written round-robin over tasks, so the last episodes
(the validation split of the clip loader) cover every task. Frames are (observation, expert action) pairs at the
control rate (80 Hz: Meta-World steps 5 x 2.5 ms of physics per action).

Action-free corpora (`--no-actions`): the same episodes without the `action` and `observation.state` features, the
video a world model learns from when nobody logged what the robot did. `--policies expert,noisy,perturbed` makes the
video cover more than the demonstrations do (attempt k of a shard is played by policy k mod n): `noisy` adds Gaussian
noise to every expert action, `perturbed` interrupts the expert with bursts of a random constant motion (it then has
to recover); `--keep-failures` keeps the episodes that never succeed (they run to `max_steps`).

Nothing half-written is left: the dataset is written under a temporary name beside `--out` and renamed into place at
the end, and each finished shard is kept in `OUT.shards/` until then, so a generation stopped at any point (Ctrl-C, a
kill, a lost machine) continues from its finished shards when the same command is run again.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing as mp
import os
import shutil
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
POLICIES = ("expert", "noisy", "perturbed")


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
    # Write the action and observation.state features (--no-actions: an action-free video corpus).
    actions: bool = True
    # Who plays the episodes, cycled over a shard's attempts: expert, noisy (expert + Gaussian noise of std --noise on
    # every action), perturbed (the expert, interrupted by bursts of random constant motion it must recover from).
    policies: str = "expert"
    noise: float = 0.3  # std of the noisy expert's action noise (the action box is [-1, 1])
    keep_failures: bool = False  # keep episodes that never succeed (they run to --max-steps)
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
    policies: tuple[str, ...] = ("expert",)
    noise: float = 0.3
    keep_failures: bool = False


@dataclass
class ShardResult:
    task: str
    shard: int
    attempted: int = 0
    episodes: list[dict[str, np.ndarray]] = field(default_factory=list)
    failed_lengths: list[int] = field(default_factory=list)
    seconds: float = 0.0
    success: list[bool] = field(default_factory=list)  # per kept episode
    policy: list[str] = field(default_factory=list)  # per kept episode


# Perturbed expert: each step starts a burst with this probability; a burst holds one random xyz motion (gripper as
# the expert has it) for a random number of steps in PERTURB_STEPS.
PERTURB_PROB = 0.04
PERTURB_STEPS = (5, 16)


class _Actor:
    """The policy of one attempt: the expert, the expert plus noise, or the expert with random bursts."""

    def __init__(self, kind: str, rng: np.random.Generator, noise: float):
        if kind not in POLICIES:
            raise ValueError(f"unknown policy {kind!r}; choose from {', '.join(POLICIES)}")
        self.kind, self.rng, self.noise = kind, rng, noise
        self.burst_left, self.burst = 0, np.zeros(3, np.float32)

    def __call__(self, expert: np.ndarray) -> np.ndarray:
        action = expert.copy()
        if self.kind == "noisy":
            action = action + self.rng.normal(0.0, self.noise, size=action.shape).astype(np.float32)
        elif self.kind == "perturbed":
            if self.burst_left == 0 and self.rng.random() < PERTURB_PROB:
                self.burst_left = int(self.rng.integers(*PERTURB_STEPS))
                self.burst = self.rng.uniform(-1.0, 1.0, size=3).astype(np.float32)
            if self.burst_left > 0:
                action[:3] = self.burst
                self.burst_left -= 1
        return np.clip(action, -1.0, 1.0).astype(np.float32)


def run_episode(env: MetaWorldEnv, post_success_steps: int, actor: _Actor | None = None
                ) -> tuple[dict[str, np.ndarray], bool]:
    """Roll a policy (the expert by default) out once: per step the observation and the action taken from it."""
    obs = env.reset()
    images: dict[str, list[np.ndarray]] = {c: [] for c in env.cameras}
    states, actions = [], []
    success_at = None
    while True:
        action = env.expert_action() if actor is None else actor(env.expert_action())
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
    rng = np.random.default_rng((job.env_seed, _task_number(job.task)))
    try:
        while len(res.episodes) < job.want and res.attempted < job.max_attempts:
            kind = job.policies[res.attempted % len(job.policies)]
            actor = None if kind == "expert" else _Actor(kind, rng, job.noise)
            data, ok = run_episode(env, job.post_success_steps, actor)
            res.attempted += 1
            if ok or job.keep_failures:
                res.episodes.append(data)
                res.success.append(ok)
                res.policy.append(kind)
            if not ok:
                res.failed_lengths.append(len(data["action"]))
    finally:
        env.close()
    res.seconds = time.perf_counter() - t0
    return res


def _task_number(task: str) -> int:
    return int.from_bytes(hashlib.sha256(task.encode()).digest()[:4], "little")


def parse_policies(spec: str) -> tuple[str, ...]:
    kinds = tuple(p.strip() for p in spec.split(",") if p.strip())
    bad = [k for k in kinds if k not in POLICIES]
    if not kinds or bad:
        raise ValueError(f"--policies {spec!r}: choose one or more of {', '.join(POLICIES)} (comma-separated)")
    return kinds


def make_jobs(args: GenArgs, tasks: list[str]) -> list[ShardJob]:
    """Shard jobs in round-robin order: shard 0 of every task, then shard 1, ..."""
    n_shards = math.ceil(args.episodes / args.shard_size)
    policies = parse_policies(args.policies)
    jobs = []
    for s in range(n_shards):
        want = min(args.shard_size, args.episodes - s * args.shard_size)
        attempts = want if args.keep_failures else max(want, math.ceil(want * args.max_attempts_factor))
        for task in tasks:
            jobs.append(ShardJob(task, s, args.seed * SEED_STRIDE + s, want, attempts, args.image_size,
                                 tuple(args.cameras), args.max_steps, args.post_success_steps, policies,
                                 args.noise, args.keep_failures))
    return jobs


def dataset_features(image_size: int, cameras: tuple[str, ...], actions: bool = True) -> dict[str, dict[str, Any]]:
    feats: dict[str, dict[str, Any]] = {
        f"observation.images.{c}": {"dtype": "video", "shape": [image_size, image_size, 3],
                                    "names": ["height", "width", "channels"]}
        for c in cameras
    }
    if actions:
        feats["observation.state"] = {"dtype": "float32", "shape": [4], "names": STATE_NAMES}
        feats["action"] = {"dtype": "float32", "shape": [4], "names": ACTION_NAMES}
    return feats


# ---------------------------------------------------------------------------------------------------------------------
# Finished shards on disk (resuming a stopped generation)

# Settings that change what a shard holds; the rest (workers, progress, codec, overwrite) do not.
_SHARD_SETTINGS = ("tasks", "seed", "image_size", "cameras", "max_steps", "post_success_steps", "shard_size",
                   "max_attempts_factor", "policies", "noise", "keep_failures", "episodes")


class ShardStore:
    """`OUT.shards/`: each finished shard as an .npz (written atomically) plus the settings that made them."""

    def __init__(self, out: Path, args: GenArgs):
        self.dir = out.with_name(out.name + ".shards")
        settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(args).items()
                    if k in _SHARD_SETTINGS}
        manifest = self.dir / "settings.json"
        if manifest.is_file():
            saved = json.loads(manifest.read_text())
            if saved != settings:
                differ = sorted(k for k in settings if saved.get(k) != settings[k])
                raise ValueError(f"{self.dir} holds shards of a generation with other settings ({', '.join(differ)}); "
                                 "rerun that command to finish it, or delete the folder to start over")
        else:
            from fastwam.files import write_text_atomic

            self.dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(manifest, json.dumps(settings, indent=1, sort_keys=True) + "\n")

    def _path(self, job: ShardJob) -> Path:
        return self.dir / f"{job.task}_shard{job.shard:04d}.npz"

    def has(self, job: ShardJob) -> bool:
        return self._path(job).is_file()

    def load(self, job: ShardJob) -> ShardResult:
        path = self._path(job)
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            res = ShardResult(job.task, job.shard, meta["attempted"], [], meta["failed_lengths"], meta["seconds"],
                              meta["success"], meta["policy"])
            for i in range(meta["kept"]):
                res.episodes.append({k: z[f"{i}/{k}"] for k in meta["keys"]})
        return res

    def save(self, job: ShardJob, res: ShardResult) -> None:
        meta = {"attempted": res.attempted, "failed_lengths": res.failed_lengths, "seconds": res.seconds,
                "success": res.success, "policy": res.policy, "kept": len(res.episodes),
                "keys": sorted(res.episodes[0]) if res.episodes else []}
        arrays = {f"{i}/{k}": v for i, ep in enumerate(res.episodes) for k, v in ep.items()}
        path = self._path(job)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.npz")
        np.savez(tmp, meta=np.array(json.dumps(meta)), **arrays)
        os.replace(tmp, path)

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def generate(args: GenArgs) -> dict[str, Any]:
    """Run the policies, write the dataset, return the summary (also saved as fastwam_generation.json)."""
    from tqdm.auto import tqdm

    from fastwam.data.lerobot_writer import LeRobotWriter, dataset_size_bytes

    if args.episodes < 1 or args.shard_size < 1 or args.image_size < 8:
        raise ValueError("episodes and shard_size must be >= 1, image_size >= 8")
    if args.noise < 0:
        raise ValueError(f"--noise must be >= 0, got {args.noise}")
    tasks = parse_tasks(args.tasks)
    jobs = make_jobs(args, tasks)
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not args.overwrite:
            raise FileExistsError(f"{out} exists and is not empty (--overwrite replaces it)")
    store = ShardStore(out, args)
    t_start = time.perf_counter()
    # Written under a temporary name and renamed at the end: a stopped generation never leaves a dataset-looking
    # folder behind (its finished shards stay in OUT.shards/ for the rerun).
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    _remove_stale_temporaries(out)
    writer = LeRobotWriter(tmp, CONTROL_FPS, dataset_features(args.image_size, tuple(args.cameras), args.actions),
                           robot_type="sawyer", vcodec=args.vcodec, crf=args.crf, overwrite=True)
    per_task = {t: {"kept": 0, "attempted": 0, "frames": 0, "failed_lengths": [], "env_seeds": [], "failures_kept": 0,
                    "policies": {}} for t in tasks}
    bar = tqdm(total=len(tasks) * args.episodes, unit="ep", desc="metaworld episodes", disable=not args.progress,
               dynamic_ncols=True)
    pending_round: list[ShardResult] = []

    def flush_round() -> None:
        # Interleave the round's episodes over tasks so every task appears throughout the dataset.
        depth = max((len(r.episodes) for r in pending_round), default=0)
        for k in range(depth):
            for r in pending_round:
                if k < len(r.episodes):
                    episode = r.episodes[k]
                    if not args.actions:
                        episode = {key: v for key, v in episode.items() if key.startswith("observation.images.")}
                    writer.add_episode(INSTRUCTIONS[r.task], episode)
        pending_round.clear()

    stored = [store.has(job) for job in jobs]  # loaded one at a time below: a big corpus does not fit in memory
    todo = [job for job, done in zip(jobs, stored, strict=True) if not done]
    if len(todo) < len(jobs):
        print(f"[data] {len(jobs) - len(todo)} of {len(jobs)} shards finished before (in {store.dir}); "
              f"simulating the other {len(todo)}", file=sys.stderr)
    pool = None
    try:
        # Simulation always runs in child processes: x264 in a process that has also rendered with EGL/llvmpipe
        # produced different bytes now and then (measured), so the encoding process never renders. For byte-identical
        # datasets, call this from a process that has not rendered either (the CLI does; an in-process Meta-World
        # evaluation before it in the same process does not).
        fresh = iter(())
        if todo:
            pool = mp.get_context("spawn").Pool(max(1, min(args.workers, len(todo))))
            fresh = pool.imap(run_shard, todo, chunksize=1)
        for i, job in enumerate(jobs):
            if stored[i]:
                res = store.load(job)
            else:
                res = next(fresh)
                store.save(job, res)
            st = per_task[res.task]
            st["kept"] += len(res.episodes)
            st["attempted"] += res.attempted
            st["frames"] += sum(len(e["action"]) for e in res.episodes)
            st["failed_lengths"] += res.failed_lengths
            st["failures_kept"] += sum(not ok for ok in res.success)
            for kind in res.policy:
                st["policies"][kind] = st["policies"].get(kind, 0) + 1
            st["env_seeds"].append(job.env_seed)
            bar.update(len(res.episodes))
            bar.set_postfix(discarded=sum(s["attempted"] - s["kept"] for s in per_task.values()))
            pending_round.append(res)
            if len(pending_round) == len(tasks):
                flush_round()
        flush_round()
        writer.finalize()
    except BaseException:
        writer._close_files()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()
        if pool is not None:
            pool.close()
            pool.join()
    wall = time.perf_counter() - t_start
    summary = {
        "dataset": str(args.out),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(args).items()},
        "fps": CONTROL_FPS,
        "episodes": len(writer.episodes),
        "frames": writer.total_frames,
        "action_free": not args.actions,
        "per_task": {t: {**s, "success_rate": (s["kept"] - s["failures_kept"]) / max(1, s["attempted"]),
                         "mean_length": s["frames"] / max(1, s["kept"])} for t, s in per_task.items()},
        "discarded": sum(s["attempted"] - s["kept"] for s in per_task.values()),
        "failures_kept": sum(s["failures_kept"] for s in per_task.values()),
        "shortfall": {t: args.episodes - s["kept"] for t, s in per_task.items() if s["kept"] < args.episodes},
        "wall_seconds": round(wall, 1),
        "size_bytes": dataset_size_bytes(tmp),
    }
    (tmp / "fastwam_generation.json").write_text(json.dumps(summary, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)  # --overwrite (checked above), or an empty folder
    os.replace(tmp, out)
    store.remove()
    return summary


def _remove_stale_temporaries(out: Path) -> None:
    """Temporary datasets of generations whose process is gone (killed mid-write)."""
    for old in out.parent.glob(f".{out.name}.tmp-*"):
        try:
            pid = int(old.name.rsplit("-", 1)[1])
            os.kill(pid, 0)
        except (ValueError, ProcessLookupError):
            shutil.rmtree(old, ignore_errors=True)
        except PermissionError:
            pass


def format_summary(s: dict[str, Any]) -> str:
    lines = [f"wrote {s['dataset']}: {s['episodes']} episodes, {s['frames']} frames at {s['fps']} fps, "
             f"{s['size_bytes'] / 1e6:.1f} MB, {s['wall_seconds']:.0f} s"]
    lines.append(f"  {'task':<26} kept/attempted  success  mean length")
    for t, st in s["per_task"].items():
        lines.append(f"  {t:<26} {st['kept']:>4}/{st['attempted']:<9} {100 * st['success_rate']:6.1f}%  "
                     f"{st['mean_length']:8.1f}")
    lines.append(f"  discarded (expert failed): {s['discarded']}")
    if s.get("failures_kept"):
        lines.append(f"  failed episodes kept (--keep-failures): {s['failures_kept']}")
    if s.get("action_free"):
        lines.append("  action-free: no action / observation.state features (video for fastwam pretrain or "
                     "train --video-dataset)")
    if s["shortfall"]:
        lines.append(f"  WARNING: fewer episodes than asked for: {s['shortfall']}")
    return "\n".join(lines)


def cli(argv: list[str], prog: str = "fastwam data metaworld") -> int:
    import tyro

    args = tyro.cli(GenArgs, args=argv, prog=prog)
    summary = generate(args)
    print(format_summary(summary), file=sys.stderr)
    return 0
