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
import shlex
import time
from pathlib import Path

from fastwam.config import Config
from fastwam.files import write_text_atomic
from fastwam.study.jobs import run_jobs
from fastwam.study.plan import AblateArgs, Job, _int_list, _tasks, cell_config, parse_cells, plan

# `fastwam eval metaworld` options that an evaluation's results.json records (under config), by the name it records
# them under: what a finished evaluation must match to count as this study's.
EVAL_SETTINGS = {"--tasks": ("tasks", _tasks), "--seeds": ("seeds", _int_list),
                 "--episodes": ("episodes_per_seed", int), "--replan": ("replan", int),
                 "--max-steps": ("max_steps", int), "--shift": ("shift", str), "--obs-delay": ("obs_delay", int),
                 "--mode": ("modes", lambda v: v.split(",")), "--steps": ("inference_steps", int),
                 "--chunking": ("chunking", str), "--inference-delay": ("inference_delay", int)}


def eval_settings(cmd: list[str]) -> dict:
    """What an evaluation job's command asks for, keyed as results.json's config records it (a later option wins, as
    on the command line: a condition's --replan after the base one)."""
    settings = {}
    for option, value in zip(cmd, cmd[1:]):
        if option in EVAL_SETTINGS:
            key, parse = EVAL_SETTINGS[option]
            settings[key] = parse(value)
    return settings


def check_evaluations(jobs: list[Job], out: Path) -> None:
    """Refuse a study whose finished evaluations were made with other settings than its command asks for (another
    --eval-episodes, --eval-seeds, --tasks, --replan, --max-steps): a job counts as done when its results.json exists,
    so they would be skipped and reported as if they answered this command. Nothing is deleted or redone."""
    stale = []
    for job in jobs:
        if job.done.name != "results.json" or not job.is_done():
            continue
        try:
            recorded = json.loads(job.done.read_text()).get("config", {})
        except (OSError, ValueError, AttributeError):
            continue  # unreadable: is_done() said it is whole; the report will say if it cannot use it
        wanted = eval_settings(job.cmd)
        diff = {k: (recorded[k], v) for k, v in wanted.items() if k in recorded and recorded[k] != v}
        if diff:
            stale.append((job, diff))
    if stale:
        job, diff = stale[0]
        what = "; ".join(f"{k} {was!r} (this command: {now!r})" for k, (was, now) in diff.items())
        more = f" ({len(stale) - 1} more evaluations differ likewise)" if len(stale) > 1 else ""
        raise ValueError(f"{job.name}: {job.done} was evaluated with {what}{more}. A finished evaluation is not "
                         f"redone: run the study's own command (in {out / 'ablation.json'}), or move those "
                         "evaluations' folders away to evaluate them again")


def _check_cells(out: Path, cells: dict[str, dict[str, str]]) -> None:
    """A cell name keeps its meaning for the life of OUT: runs trained under it must not change architecture."""
    path = out / "cells.json"
    known = json.loads(path.read_text()) if path.is_file() else {}
    for name, overrides in cells.items():
        if name in known and known[name] != overrides:
            raise ValueError(f"cell {name!r} was defined as {known[name]} in {path}; now {overrides}. Use a new "
                             "cell name for a new architecture")
    known.update(cells)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(known, indent=2, sort_keys=True) + "\n")


# Options that say how or where a study runs, or only re-render / publish its report: never part of what the study is.
_NOT_THE_STUDY = ("--publish", "--publish-videos", "--executor", "--ray-address", "--job-gpus")


_RUNS_ON = ("executor", "ray_address", "job_gpus")  # AblateArgs fields of the options above


def _study_argv(argv: list[str]) -> list[str]:
    """The study's own options: without those that only re-render or publish the report of the same study, or that
    choose where its jobs run (the results are the same under every executor)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--report-only", "--no-report-only") or a.startswith(tuple(f"{o}=" for o in _NOT_THE_STUDY)):
            continue
        if a in _NOT_THE_STUDY:
            skip = True
            continue
        out.append(a)
    return out


def study_record(args: AblateArgs, argv: list[str]) -> dict:
    """OUT/ablation.json: the study's command (without --report-only and --publish, which only re-render or copy the
    report of the same study), its options and its config."""
    return {"command": shlex.join(["fastwam", "ablate", *_study_argv(argv)]),
            "args": {k: v for k, v in dataclasses.asdict(args).items() if k not in ("config", *_RUNS_ON)},
            "config": args.config.to_dict()}


def _same_study(path: Path, record: dict) -> bool:
    """Whether the study recorded at `path` is the one `record` describes, up to where it is kept (--out) and the
    report-only options. A report re-rendered from a copy of a published study then keeps the study's own command."""
    try:
        recorded = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(recorded, dict) or not isinstance(recorded.get("args"), dict):
        return False
    record = json.loads(json.dumps(record))  # tuples as the file has them: lists
    where = ("out", "report_only", "publish", "publish_videos", *_RUNS_ON)
    strip = lambda a: {k: v for k, v in a.items() if k not in where}  # noqa: E731
    # A study recorded before an option or a config field existed had that option's default.
    defaults = {f.name: f.default for f in dataclasses.fields(AblateArgs) if f.default is not dataclasses.MISSING}
    recorded_args = {**json.loads(json.dumps(defaults)), **recorded["args"]}
    try:
        recorded_config = json.loads(json.dumps(Config.from_dict(recorded.get("config")).to_dict()))
    except (ValueError, TypeError):
        return False
    return strip(recorded_args) == strip(record["args"]) and recorded_config == record["config"]


def cli(argv: list[str], prog: str = "fastwam ablate") -> int:
    from fastwam.presets import parse_with_preset

    args = parse_with_preset(argv, AblateArgs, prog)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs, runs = plan(args)
    cells = parse_cells(args.cells)
    _check_cells(out, cells)
    for cell, overrides in cells.items():  # each cell's full config, for its latency job and the report
        write_text_atomic(out / f"config_{cell}.json", cell_config(args.config, overrides).to_json() + "\n")
    check_evaluations(jobs, out)  # before ablation.json records this command as the study's
    record = study_record(args, argv)
    if not (args.report_only and _same_study(out / "ablation.json", record)):
        write_text_atomic(out / "ablation.json", json.dumps(record, indent=2))
    t0 = time.time()
    if not args.report_only:
        executor = None
        if args.executor == "ray":
            from fastwam.study.ray_executor import RayExecutor

            executor = RayExecutor(args.ray_address, args.parallel, jobs)
        run_jobs(jobs, out, args.parallel, executor)
    from fastwam.study.report import write_report

    report = write_report(out, runs, args)
    if args.publish:
        from fastwam.study.report import publish_report

        print(f"[ablate] published: {publish_report(out, Path(args.publish), args.publish_videos)}")
    print(f"[ablate] done in {(time.time() - t0) / 60:.1f} min; report: {report}")
    videos = sorted(out.glob("eval/*/videos/*.mp4"))
    if videos:
        print(f"[ablate] {len(videos)} rollout videos under {out / 'eval'}/*/videos/, e.g. {videos[0]}")
    return 0
