"""`fastwam demo`: the CPU Meta-World demo — a small version of the four-variant study, end to end.

Scripted demos for a few tasks -> train Fast-WAM and its no-video-co-training twin side by side (one core each) ->
closed-loop evaluation on held-out environment seeds -> report.md with videos. Sized to finish in about 20 minutes on
2 CPU cores (19.2 min measured); `fastwam ablate` is the full study. Re-running resumes / reuses what is already done.
"""

from __future__ import annotations

from dataclasses import dataclass

import tyro


@dataclass
class DemoArgs:
    """The CPU Meta-World demo: scripted demos -> train Fast-WAM and its no-video-co-training twin -> closed-loop
    evaluation -> report.md (a small `fastwam ablate` on the small_cpu preset; rerunning continues where it stopped)."""

    out: str = "runs/demo"  # output directory: data/, runs/, eval/ (with rollout videos) and report.md
    tasks: str = "button-press-topdown-v3,drawer-open-v3,window-open-v3"  # comma-separated Meta-World tasks
    episodes_per_task: int = 30  # scripted demonstrations per task
    train_steps: int = 1500  # optimisation steps per variant
    variants: str = "fast,no_cotrain"  # variants to train and compare (fast, joint, idm, no_cotrain)
    eval_episodes: int = 10  # evaluation episodes per task and evaluation seed
    eval_seeds: str = "0"  # evaluation environment seeds, comma-separated


def cli(argv: list[str], prog: str = "fastwam demo") -> int:
    args = tyro.cli(DemoArgs, args=argv, prog=prog)
    from fastwam.study import ablate

    return ablate.cli([
        "--preset", "small_cpu", "--out", args.out, "--tasks", args.tasks,
        "--episodes-per-task", str(args.episodes_per_task), "--train-steps", str(args.train_steps),
        "--variants", args.variants, "--eval-episodes", str(args.eval_episodes), "--eval-seeds", args.eval_seeds,
        "--seeds", "0", "--parallel", "2", "--videos", "1", "--no-baselines",
        # batch 16: measured on 2 cores, it halves the step time for a small loss in sample efficiency (the
        # ablation in docs/results/ uses the same setting).
        "--config.train.batch-size", "16", "--config.train.save-every", "500",
    ], prog=prog)
