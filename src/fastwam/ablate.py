"""`fastwam ablate`: the four-variant study on Meta-World, end to end and resumable.

demos (scripted experts, LeRobot v3.0) -> train each variant x seed on the same data and budget -> evaluate each in
its own inference mode (fast for fast/no_cotrain, joint for joint, idm for idm) on held-out environment seeds ->
baselines (zero / random actions) -> report.md with Wilson CIs, latency, a bar chart, training curves and samples.

Every stage is a `fastwam` subprocess with its own log under OUT/logs/, skipped when its output already exists, so an
interrupted study continues where it stopped (run the same command again). Trainings resume from their latest
checkpoint. On a 2-core machine two single-threaded jobs side by side use the cores better than one two-threaded job
(docs/reference.md, "Learnability"), hence `--parallel 2` with one torch thread per job.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from fastwam.config import Config
from fastwam.presets import PresetArgs

VARIANT_MODES = {"fast": "fast", "joint": "joint", "idm": "idm", "no_cotrain": "fast"}
DEFAULT_TASKS = "button-press-topdown-v3,drawer-open-v3,door-open-v3,window-open-v3,reach-v3,push-v3"


@dataclass
class AblateArgs(PresetArgs):
    """The four-variant ablation (Fast-WAM / Joint / IDM / without video co-training) on Meta-World."""

    config: Config
    out: str = "runs/ablation"
    tasks: str = DEFAULT_TASKS  # comma-separated Meta-World tasks, or a set name such as mt10
    episodes_per_task: int = 40  # scripted demonstrations per task (successful ones kept)
    train_steps: int = 3000
    variants: str = "fast,joint,idm,no_cotrain"
    seeds: str = "0"  # training seeds
    eval_seeds: str = "0,1"  # evaluation environment seeds (offset from the demonstration seeds by the evaluator)
    eval_episodes: int = 20  # per task and evaluation seed
    replan: int = 8  # execute this many actions of each chunk, then re-plan
    max_steps: int = 300
    parallel: int = 2  # jobs side by side (one torch thread each)
    dataset: str = ""  # reuse an existing dataset instead of generating OUT/data
    videos: int = 1  # rollout videos per task
    baselines: bool = True  # also evaluate zero / random action policies
    baseline_episodes: int = 5  # per task and evaluation seed (baselines fail slowly: every episode runs max_steps)
    report_only: bool = False


@dataclass
class Job:
    name: str
    cmd: list[str]
    done: Path  # the job is complete when this file exists
    after: tuple[str, ...] = ()


def _py() -> list[str]:
    return [sys.executable, "-m", "fastwam"]


def plan(args: AblateArgs) -> tuple[list[Job], dict]:
    out = Path(args.out)
    cfg = args.config
    data_dir = Path(args.dataset) if args.dataset else out / "data"
    size = cfg.data.image_size[0]
    jobs: list[Job] = []
    if not args.dataset:
        jobs.append(Job("data", _py() + ["data", "metaworld", "--tasks", args.tasks, "--episodes",
                                         str(args.episodes_per_task), "--out", str(data_dir), "--image-size",
                                         str(size)], data_dir / "meta" / "info.json"))
    # Longest trainings first, so the job pool's tail is short (IDM runs two video copies; no_cotrain none).
    cost = {"idm": 0, "joint": 1, "fast": 2, "no_cotrain": 3}
    variants = sorted((v.strip() for v in args.variants.split(",") if v.strip()), key=lambda v: cost.get(v, 9))
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    runs = {}

    def eval_args(episodes: int) -> list[str]:
        return ["--tasks", args.tasks, "--episodes", str(episodes), "--seeds", args.eval_seeds, "--replan",
                str(args.replan), "--max-steps", str(args.max_steps), "--workers", "1", "--videos", str(args.videos),
                "--threads", "1", "--no-progress"]

    for variant in variants:
        if variant not in VARIANT_MODES:
            raise ValueError(f"unknown variant {variant!r}")
        for seed in seeds:
            name = f"{variant}_s{seed}"
            run_dir = out / "runs" / name
            overrides = _config_overrides(cfg) + [
                "--dataset", str(data_dir), "--out", str(run_dir), "--variant", variant, "--steps",
                str(args.train_steps), "--config.train.seed", str(seed), "--config.train.threads", "1",
                "--auto-resume", "--no-progress",
            ]
            final = run_dir / "checkpoints" / f"step_{args.train_steps:07d}" / "model.safetensors"
            jobs.append(Job(f"train_{name}", _py() + ["train"] + overrides, final,
                            after=("data",) if not args.dataset else ()))
            eval_dir = out / "eval" / name
            jobs.append(Job(f"eval_{name}", _py() + ["eval", "metaworld", "--checkpoint", str(run_dir), "--mode",
                                                     VARIANT_MODES[variant], "--out", str(eval_dir)]
                            + eval_args(args.eval_episodes),
                            eval_dir / "results.json", after=(f"train_{name}",)))
            runs[name] = {"variant": variant, "seed": seed, "run_dir": run_dir, "eval_dir": eval_dir}
    # Batch-1 latency of each inference mode for this study's architecture, overrides included (random weights: latency
    # does not depend on them). The config comes from ablation.json, which `cli` writes before any job runs.
    modes = ",".join(sorted({VARIANT_MODES[v] for v in variants}, key=["fast", "joint", "idm"].index))
    jobs.append(Job("latency", _py() + ["bench", "latency", "--config-file", str(out / "ablation.json"), "--modes",
                                        modes, "--threads", "1", "--out", str(out / "latency.json")],
                    out / "latency.json"))
    if args.baselines:
        for baseline in ("zero", "random"):
            eval_dir = out / "eval" / f"baseline_{baseline}"
            jobs.append(Job(f"eval_baseline_{baseline}", _py() + ["eval", "metaworld", "--policy", baseline, "--out",
                                                                  str(eval_dir)] + eval_args(args.baseline_episodes),
                            eval_dir / "results.json", after=("data",) if not args.dataset else ()))
            runs[f"baseline_{baseline}"] = {"variant": f"baseline ({baseline})", "seed": None, "run_dir": None,
                                            "eval_dir": eval_dir}
    return jobs, runs


def _config_overrides(cfg: Config) -> list[str]:
    """The non-default fields of the chosen config as CLI overrides (so subprocesses see the same config)."""
    from fastwam.config import get_preset

    base = get_preset(cfg.name)
    args = ["--preset", cfg.name]
    for section in ("model", "codec", "text", "data", "train", "inference"):
        mine, theirs = getattr(cfg, section), getattr(base, section)
        for f in dataclasses.fields(mine):
            value = getattr(mine, f.name)
            if value != getattr(theirs, f.name) and f.name not in ("dataset", "variant", "steps", "seed", "threads"):
                flag = f"--config.{section}.{f.name.replace('_', '-')}"
                if isinstance(value, bool):
                    args.append(flag if value else flag.replace(f"{section}.", f"{section}.no-"))
                elif isinstance(value, tuple):
                    if value:  # an empty sequence cannot be written as a flag; () is the default of every tuple field
                        args += [flag, *map(str, value)]
                else:
                    args += [flag, str(value)]
    return args


def run_jobs(jobs: list[Job], out: Path, parallel: int) -> None:
    """Run pending jobs respecting dependencies, `parallel` at a time; logs in OUT/logs/NAME.log."""
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    pending = [j for j in jobs if not j.done.exists()]
    done = {j.name for j in jobs if j.done.exists()}
    for j in jobs:
        if j.name in done:
            print(f"[ablate] {j.name}: done already, skipping")
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    failed: list[str] = []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")}
    while pending or running:
        for name, (proc, t0) in list(running.items()):
            if proc.poll() is not None:
                del running[name]
                job = next(j for j in jobs if j.name == name)
                if proc.returncode == 0 and job.done.exists():
                    done.add(name)
                    print(f"[ablate] {name}: finished in {(time.time() - t0) / 60:.1f} min")
                else:
                    failed.append(name)
                    print(f"[ablate] {name}: FAILED (exit {proc.returncode}); see {logs / (name + '.log')}")
        ready = [j for j in pending if all(a in done for a in j.after)]
        blocked = [j for j in pending if any(a in failed for a in j.after)]
        for j in blocked:
            pending.remove(j)
            failed.append(j.name)
            print(f"[ablate] {j.name}: skipped (a job it needs failed)")
        while ready and len(running) < parallel:
            job = ready.pop(0)
            pending.remove(job)
            print(f"[ablate] {job.name}: starting")
            log = open(logs / f"{job.name}.log", "a")
            log.write(f"$ {' '.join(job.cmd)}\n")
            log.flush()
            running[job.name] = (subprocess.Popen(job.cmd, stdout=log, stderr=subprocess.STDOUT, env=env),
                                 time.time())
        time.sleep(1.0)
    if failed:
        raise RuntimeError(f"ablation jobs failed: {', '.join(failed)} (logs in {logs}); rerun to retry them")


def cli(argv: list[str], prog: str = "fastwam ablate") -> int:
    from fastwam.train import parse_with_preset

    args = parse_with_preset(argv, AblateArgs, prog)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs, runs = plan(args)
    # The study's command: without --report-only, which only re-renders the report of the same study.
    command = ["fastwam", "ablate", *(a for a in argv if a not in ("--report-only", "--no-report-only"))]
    (out / "ablation.json").write_text(json.dumps({
        "command": " ".join(command),
        "args": {k: v for k, v in dataclasses.asdict(args).items() if k != "config"},
        "config": args.config.to_dict(),
    }, indent=2))
    t0 = time.time()
    if not args.report_only:
        run_jobs(jobs, out, args.parallel)
    from fastwam.report import write_report

    report = write_report(out, runs, args)
    print(f"[ablate] done in {(time.time() - t0) / 60:.1f} min; report: {report}")
    videos = sorted(out.glob("eval/*/videos/*.mp4"))
    if videos:
        print(f"[ablate] {len(videos)} rollout videos under {out / 'eval'}/*/videos/, e.g. {videos[0]}")
    return 0
