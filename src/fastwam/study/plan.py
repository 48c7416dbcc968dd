"""What a study is: its options (`AblateArgs`), its cells and evaluation axes, and the jobs that carry it out.

`plan(args)` turns the options into `Job`s (each a `fastwam` command, the file whose existence means it is done, and
the jobs it waits for) and the run table the reports read. Executors (`study/jobs.py` on this machine, `study/ray.py`
on a Ray cluster) run the jobs; `study/ablate.py` is the command that ties them together.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

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
    # Sweeps: named model cells, "S:video_hidden_dim=0,video_ffn_dim=512;M:video_hidden_dim=256,..." (ModelConfig
    # fields on top of the config). Every variant x seed is trained in every cell (runs/CELL/VARIANT_sSEED/). Empty:
    # one cell, the config itself (runs/VARIANT_sSEED/). A cell's name is bound to its overrides in OUT/cells.json.
    #
    # A cell may also name how its models start and what they learn from (the video-prior study):
    #   init=prior|scratch (prior: `fastwam train --init-from` the training seed's video prior, pretrained once per
    #   seed on --pretrain-dataset), init_action=interpolate|random, demos=N (N action-labelled demonstrations per task,
    #   a dataset of its own, OUT/data_demosN: the first N of the same generator, so a subset of the full data), and
    #   video_ratio=R (co-train with --video-dataset's action-free clips, R of every batch).
    cells: str = ""
    cell_variants: str = ""  # per-cell variant lists replacing --variants there: "M:fast,joint,idm,no_cotrain;L:fast"
    # Evaluation axes (evaluation only: the trained models are reused): "replan=2,4,16;shift=camera,lighting;delay=8".
    # Each value is one more evaluation of every run in --axis-cells, beside the base one (re-plan every --replan).
    axes: str = ""
    axis_cells: str = ""  # cells whose runs are evaluated along the axes (empty: all)
    axis_variants: str = ""  # variants evaluated along the axes (empty: all; e.g. fast for the real-time axes)
    # Few-step samplers (the real-time study): every fast model of --axis-cells is also distilled (`fastwam distill`)
    # into an N-step sampler for each N here ("1,2"), evaluated in the base condition and along the axes as the model
    # "fast_dN" (runs/CELL/fast_dN_sSEED); --distill-train-steps optimisation steps each.
    distill_steps: str = ""
    distill_train_steps: int = 500
    # Training-time action conditioning (the real-time study): every fast model of --axis-cells is also fine-tuned,
    # for each N here ("8,12"), with `train.action_prefix_max` = N (its whole model copied, `--init-action copy`;
    # --prefix-train-steps steps at peak lr --prefix-lr on its own data), evaluated synchronously and along the async
    # rtc axes as the model "fast_pN" (runs/CELL/fast_pN_sSEED): its rtc conditions on the committed prefix instead of
    # guidance. Empty = none.
    prefix_tune: str = ""
    prefix_train_steps: int = 500
    prefix_lr: float = 1e-4
    # Evaluate (and distill) the trained models of another study instead of training them: its OUT. Its cells, variants
    # and --train-steps must be the ones given here; a model it has not trained yet is reported missing, one line.
    models_from: str = ""
    eval_compile: bool = False  # evaluate checkpoints with compiled inference (eval metaworld --compile)
    pretrain_dataset: str = ""  # the video a prior is pretrained on (cells with init=prior); any LeRobot dataset
    # With --corpus-episodes N > 0, a job makes --pretrain-dataset (when it does not exist yet) as an action-free
    # Meta-World corpus: N episodes per task of --corpus-tasks, played by --corpus-policies, failures kept, env seeds
    # of --corpus-seed (never the demonstrations' or the evaluation's).
    corpus_episodes: int = 0
    corpus_tasks: str = "mt50"
    corpus_policies: str = "expert,noisy,perturbed"
    corpus_seed: int = 1
    pretrain_steps: int = 0  # steps of each training seed's video prior (0: --train-steps)
    video_dataset: str = ""  # action-free clips for cells with video_ratio=R
    # Where the jobs run: "local" (subprocesses of this command, --parallel at a time) or "ray" (Ray tasks with
    # their CPU / GPU needs declared; a local Ray of --parallel CPUs, or the cluster at --ray-address). The results
    # are the same either way; OUT must be on a file system every Ray node sees.
    executor: Literal["local", "ray"] = "local"
    ray_address: str = ""  # a Ray cluster ("auto", "ray://head:10001"); empty: start a local Ray
    job_gpus: float = 0.0  # GPUs each training / pretraining job asks Ray for (0: CPU only)
    report_only: bool = False
    publish: str = ""  # also copy the report, its pictures and --publish-videos videos here (e.g. docs/results/X)
    publish_videos: int = 3


@dataclass
class Job:
    name: str
    cmd: list[str]
    done: Path  # the job is complete when this file exists (and, for results.json, is not marked partial)
    after: tuple[str, ...] = ()
    # Among ready jobs, lower runs first: base evaluations (0), trainings (1), then evaluations along the axes (2),
    # so an interrupted sweep has whole trainings and their base results rather than many axes of a few models.
    priority: int = 0
    # A folder whose presence at start means the job resumes work done before (a training's checkpoints): its time
    # then covers only the remainder and is not recorded as the job's duration.
    resumes_from: Path | None = None
    # A timing job: it starts only on an otherwise idle machine and nothing starts beside it, so the times it
    # measures are not another job's contention (the demo's latency, timed beside data generation, read 81 ms p50;
    # timed alone, 33 ms).
    alone: bool = False
    # What the job needs of a machine, for executors that place jobs (Ray): CPU cores and GPUs.
    cpus: float = 1.0
    gpus: float = 0.0

    def is_done(self) -> bool:
        """The output exists and is whole: an evaluation stopped by Ctrl-C writes results.json marked partial, which
        a rerun must redo, not skip."""
        if not self.done.exists():
            return False
        if self.done.name != "results.json":
            return True
        try:
            return json.loads(self.done.read_text()).get("partial") is not True
        except (OSError, ValueError, AttributeError):
            return False


def _int_list(spec: str) -> list[int]:
    return [int(x) for x in spec.split(",") if x.strip()]


def _tasks(spec: str) -> list[str]:
    from fastwam.envs.metaworld import parse_tasks

    return parse_tasks(spec)


def _py() -> list[str]:
    return [sys.executable, "-m", "fastwam"]


# Evaluation axes: name -> (condition label for a value, `fastwam eval metaworld` options for it).
AXES = {
    "replan": (lambda v: f"replan{v}", lambda v: ["--replan", str(v)]),
    "shift": (lambda v: f"shift_{v}", lambda v: ["--shift", str(v)]),
    "delay": (lambda v: f"delay{v}", lambda v: ["--obs-delay", str(v)]),
    # Acting in real time: denoising steps per chunk, and asynchronous execution ("rtc4" = real-time chunking with
    # 4 control steps of inference delay; "naive4" = switch to the new chunk at once; "sync4" = the robot waits).
    "steps": (lambda v: f"steps{v}", lambda v: ["--steps", str(v)]),
    "async": (lambda v: f"async_{v}", lambda v: ["--async", *_async_options(v)]),
}


def _async_options(value: str) -> list[str]:
    """"rtc4" -> --chunking rtc --inference-delay 4: an `async` axis value is a chunking rule and an inference delay."""
    import re

    m = re.fullmatch(r"(sync|naive|rtc)(\d+)", value.strip())
    if not m:
        raise ValueError(f"async axis value {value!r}: expected sync|naive|rtc followed by the inference delay, "
                         "e.g. rtc4")
    return ["--chunking", m.group(1), "--inference-delay", str(int(m.group(2)))]


BASE = "base"  # the condition every run is evaluated in


# Cell keys that are not ModelConfig fields: how a cell's models start and what data they learn from (see AblateArgs).
STUDY_KEYS = {"init": ("scratch", "prior"), "init_action": ("interpolate", "random"), "demos": int,
              "video_ratio": float}


def model_overrides(overrides: dict[str, str]) -> dict[str, str]:
    """A cell's ModelConfig overrides (without its study keys)."""
    return {k: v for k, v in overrides.items() if k not in STUDY_KEYS}


def _check_study_key(cell: str, key: str, value: str) -> None:
    kind = STUDY_KEYS[key]
    if isinstance(kind, tuple):
        if value not in kind:
            raise ValueError(f"cell {cell!r}: {key} must be one of {', '.join(kind)}, got {value!r}")
        return
    try:
        number = kind(value)
    except ValueError:
        raise ValueError(f"cell {cell!r}: {key} must be a {kind.__name__}, got {value!r}") from None
    if key == "demos" and number < 1:
        raise ValueError(f"cell {cell!r}: demos must be >= 1, got {number}")
    if key == "video_ratio" and not 0 < number < 1:
        raise ValueError(f"cell {cell!r}: video_ratio must be in (0, 1), got {number}")


def parse_cells(spec: str) -> dict[str, dict[str, str]]:
    """"S:a=1,b=2;M:a=3" -> {"S": {"a": "1", "b": "2"}, "M": {"a": "3"}} (ModelConfig field names, '-' or '_', and
    the study keys init, init_action, demos, video_ratio)."""
    from fastwam.config import ModelConfig

    fields = {f.name for f in dataclasses.fields(ModelConfig)} | set(STUDY_KEYS)
    cells: dict[str, dict[str, str]] = {}
    for part in (p.strip() for p in spec.split(";") if p.strip()):
        name, sep, body = part.partition(":")
        name = name.strip()
        if not sep or not name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"cell {part!r}: expected NAME:field=value,... with a plain name")
        if name in cells:
            raise ValueError(f"cell {name!r} is given twice")
        overrides = {}
        for item in (i.strip() for i in body.split(",") if i.strip()):
            key, eq, value = item.partition("=")
            key = key.strip().replace("-", "_")
            if not eq or key not in fields:
                raise ValueError(f"cell {name!r}: {item!r} is not field=value with a ModelConfig field (or one of "
                                 f"{', '.join(STUDY_KEYS)})")
            if key in STUDY_KEYS:
                _check_study_key(name, key, value.strip())
            overrides[key] = value.strip()
        cells[name] = overrides
    return cells


def parse_axes(spec: str) -> list[tuple[str, list[str]]]:
    """"replan=2,4;shift=camera" -> [("replan", ["2", "4"]), ("shift", ["camera"])]."""
    axes = []
    for part in (p.strip() for p in spec.split(";") if p.strip()):
        name, eq, values = part.partition("=")
        name = name.strip()
        if not eq or name not in AXES:
            raise ValueError(f"evaluation axis {part!r}: expected NAME=v1,v2 with NAME one of {', '.join(AXES)}")
        vals = [v.strip() for v in values.split(",") if v.strip()]
        for v in vals:
            if name == "async":
                _async_options(v)
            elif name in ("replan", "delay", "steps") and not (v.isdigit() and int(v) >= (name != "delay")):
                kind = "non-negative" if name == "delay" else "positive"
                raise ValueError(f"evaluation axis {name}: {v!r} is not a {kind} integer")
        axes.append((name, vals))
    return axes


def conditions(args: AblateArgs) -> dict[str, list[str]]:
    """Evaluation condition label -> the extra `fastwam eval metaworld` options (the base condition has none)."""
    out = {BASE: []}
    for name, values in parse_axes(args.axes):
        label, options = AXES[name]
        for v in values:
            out[label(v)] = options(v)
    return out


def _variants(spec: str) -> list[str]:
    variants = [v.strip() for v in spec.split(",") if v.strip()]
    for v in variants:
        if v not in VARIANT_MODES:
            raise ValueError(f"unknown variant {v!r}; choose from {', '.join(VARIANT_MODES)}")
    return variants


def cell_config(cfg: Config, overrides: dict[str, str]) -> Config:
    """`cfg` with a cell's ModelConfig overrides applied (values converted to the fields' types)."""
    typed = {}
    for key, value in model_overrides(overrides).items():
        current = getattr(cfg.model, key)
        if isinstance(current, bool):
            typed[key] = value.lower() in ("1", "true", "yes")
        elif isinstance(current, (int, float)):
            typed[key] = type(current)(value)
        else:
            raise ValueError(f"cell override {key}={value}: only numeric and boolean fields can be swept")
    return cfg.replace(model=dataclasses.replace(cfg.model, **typed))


def plan(args: AblateArgs) -> tuple[list[Job], dict]:
    out = Path(args.out)
    cfg = args.config
    data_dir = Path(args.dataset) if args.dataset else out / "data"
    size = cfg.data.image_size[0]
    jobs: list[Job] = []
    source = Path(args.models_from) if args.models_from else None
    if not args.dataset and source is None:
        jobs.append(Job("data", _py() + ["data", "metaworld", "--tasks", args.tasks, "--episodes",
                                         str(args.episodes_per_task), "--out", str(data_dir), "--image-size",
                                         str(size)], data_dir / "meta" / "info.json", cpus=2))
    cells = parse_cells(args.cells) or {"": {}}
    demos = sorted({int(o["demos"]) for o in cells.values() if "demos" in o} - {args.episodes_per_task})
    data_for = {n: out / f"data_demos{n}" for n in demos}
    if source is None:  # this study trains its models: their data
        for n, path in data_for.items():  # the first n demonstrations per task of the same generator: a subset
            jobs.append(Job(f"data_demos{n}", _py() + [
                "data", "metaworld", "--tasks", args.tasks, "--episodes", str(n), "--out", str(path),
                "--image-size", str(size)], path / "meta" / "info.json", cpus=2))
    corpus_job = ()
    if args.corpus_episodes > 0 and source is None:
        if not args.pretrain_dataset:
            raise ValueError("--corpus-episodes makes the --pretrain-dataset: give its path")
        corpus = Path(args.pretrain_dataset)
        jobs.append(Job("corpus", _py() + [
            "data", "metaworld", "--tasks", args.corpus_tasks, "--episodes", str(args.corpus_episodes), "--seed",
            str(args.corpus_seed), "--no-actions", "--policies", args.corpus_policies, "--keep-failures",
            "--max-steps", str(args.max_steps), "--image-size", str(size), "--out", str(corpus)],
            corpus / "meta" / "info.json", cpus=2))
        corpus_job = ("corpus",)
    prior_cells = [c for c, o in cells.items() if o.get("init") == "prior"]
    if prior_cells and not args.pretrain_dataset and source is None:
        raise ValueError(f"cells {prior_cells} start from a video prior (init=prior): give --pretrain-dataset DIR")
    for c in prior_cells:
        video_keys = sorted(k for k in model_overrides(cells[c]) if k not in ("action_hidden_dim", "action_ffn_dim"))
        if video_keys:
            raise ValueError(f"cell {c!r} starts from the study's video prior, which has the config's video expert: "
                             f"it cannot override {video_keys}")
    mixed = [c for c, o in cells.items() if "video_ratio" in o]
    if mixed and not args.video_dataset and source is None:
        raise ValueError(f"cells {mixed} co-train with action-free video (video_ratio): give --video-dataset DIR")
    per_cell = {k: _variants(v) for k, _, v in (p.partition(":") for p in args.cell_variants.split(";") if p.strip())}
    unknown = set(per_cell) - set(cells)
    if unknown:
        raise ValueError(f"--cell-variants names cells that --cells does not define: {sorted(unknown)}")
    axis_cells = {c.strip() for c in args.axis_cells.split(",") if c.strip()} or set(cells)
    if axis_cells - set(cells):
        raise ValueError(f"--axis-cells names unknown cells: {sorted(axis_cells - set(cells))}")
    conds = conditions(args)
    seeds = _int_list(args.seeds)
    axis_variants = set(_variants(args.axis_variants))
    distill = _int_list(args.distill_steps)
    if any(n < 1 for n in distill):
        raise ValueError(f"--distill-steps must be positive step counts, got {args.distill_steps!r}")
    try:
        tunes = _int_list(str(args.prefix_tune))
    except ValueError:
        raise ValueError(f"--prefix-tune takes prefix lengths such as 8 or 8,12, got {args.prefix_tune!r}") from None
    if any(n < 1 for n in tunes) or (tunes and args.prefix_train_steps < 1):
        raise ValueError(f"--prefix-tune must be positive prefix lengths with --prefix-train-steps >= 1, got "
                         f"{args.prefix_tune!r} and {args.prefix_train_steps}")
    if any(n >= cfg.model.action_horizon for n in tunes):
        raise ValueError(f"--prefix-tune {args.prefix_tune}: the committed prefix must be shorter than the chunk "
                         f"({cfg.model.action_horizon} actions)")
    if source is not None:
        _check_source(source, cells)
    # Longest trainings first within a seed (IDM runs two video copies; no_cotrain none), seeds in order: an
    # interrupted sweep has whole seeds done rather than every cell half done.
    cost = {"idm": 0, "joint": 1, "fast": 2, "no_cotrain": 3}
    runs: dict[str, dict] = {}
    train_jobs, eval_jobs = [], []

    def eval_args(episodes: int) -> list[str]:
        return ["--tasks", args.tasks, "--episodes", str(episodes), "--seeds", args.eval_seeds, "--replan",
                str(args.replan), "--max-steps", str(args.max_steps), "--workers", "1", "--videos", str(args.videos),
                "--threads", "1", "--no-progress"]

    pretrain_steps = args.pretrain_steps or args.train_steps
    for seed in seeds:
        prior_dir = out / "runs" / f"prior_s{seed}"
        if prior_cells and source is None:
            # One video prior per training seed, shared by every cell that starts from it.
            train_jobs.append(Job(
                f"pretrain_s{seed}", _py() + ["pretrain"] + _config_overrides(cfg) + [
                    "--dataset", args.pretrain_dataset, "--out", str(prior_dir), "--steps", str(pretrain_steps),
                    "--config.train.seed", str(seed), "--config.train.threads", "1", "--auto-resume",
                    "--no-progress"],
                _final_weights(prior_dir, pretrain_steps), after=corpus_job,
                priority=1, resumes_from=prior_dir / "checkpoints", gpus=args.job_gpus))
        order = sorted(((c, v) for c in cells for v in per_cell.get(c, _variants(args.variants))),
                       key=lambda cv: (cost.get(cv[1], 9), list(cells).index(cv[0])))
        for cell, variant in order:
            name = f"{cell}/{variant}_s{seed}" if cell else f"{variant}_s{seed}"
            tag = name.replace("/", "_")
            run_dir = out / "runs" / name
            spec = cells[cell]
            model_flags = [a for k, v in model_overrides(spec).items()
                           for a in (f"--config.model.{k.replace('_', '-')}", v)]
            n_demos = int(spec.get("demos", args.episodes_per_task))
            cell_data = data_for.get(n_demos, data_dir)
            after = [f"data_demos{n_demos}"] if n_demos in data_for else (["data"] if not args.dataset else [])
            study_flags = []
            if spec.get("init") == "prior":
                study_flags += ["--init-from", str(prior_dir)]
                after.append(f"pretrain_s{seed}")
                if "init_action" in spec:
                    study_flags += ["--init-action", spec["init_action"]]
            if "video_ratio" in spec:
                study_flags += ["--video-dataset", args.video_dataset, "--video-ratio", spec["video_ratio"]]
                if corpus_job and Path(args.video_dataset) == Path(args.pretrain_dataset):
                    after.append("corpus")
            if source is not None:  # another study's model: nothing to train here, only to wait for
                run_dir = source / "runs" / name
                final = _final_weights(run_dir, args.train_steps)
                train_jobs.append(Job(f"train_{tag}", _missing_model(final, source), final))
            else:
                final = _final_weights(run_dir, args.train_steps)
                train_argv = _train_argv(cfg, model_flags + study_flags, cell_data, run_dir, variant,
                                         args.train_steps, seed)
                train_jobs.append(Job(f"train_{tag}", _py() + ["train"] + train_argv, final, after=tuple(after),
                                      priority=1, resumes_from=run_dir / "checkpoints", gpus=args.job_gpus))
            along_axes = cell in axis_cells and (not axis_variants or variant in axis_variants)

            def evaluate(name: str, tag: str, run_dir: Path, variant: str, model: str, after: str,
                         model_conds: dict) -> None:
                evals = {}
                for cond, options in model_conds.items():
                    if cond != BASE and not along_axes:
                        continue
                    eval_dir = out / "eval" / name if cond == BASE else out / "eval" / name / cond
                    evals[cond] = eval_dir
                    videos = [] if cond == BASE else ["--videos", "0"]
                    compiled = ["--compile"] if args.eval_compile else []
                    eval_jobs.append(Job(f"eval_{tag}" + ("" if cond == BASE else f"_{cond}"),
                                         _py() + ["eval", "metaworld", "--checkpoint", str(run_dir), "--mode",
                                                  VARIANT_MODES[variant], "--out", str(eval_dir)]
                                         + eval_args(args.eval_episodes) + options + videos + compiled,
                                         eval_dir / "results.json", after=(after,),
                                         # the first seed's axes early too: a first look at every condition
                                         priority=0 if cond == BASE or seed == seeds[0] else 2))
                runs[name] = {"variant": model, "seed": seed, "cell": cell, "run_dir": run_dir,
                              "eval_dir": evals[BASE], "evals": evals}

            evaluate(name, tag, run_dir, variant, variant, f"train_{tag}", conds)
            if variant == "fast" and along_axes:
                for n in distill:  # a few-step sampler of this model: its step count is fixed, no `steps` axis
                    d_name = f"{cell}/fast_d{n}_s{seed}" if cell else f"fast_d{n}_s{seed}"
                    d_tag, d_dir = d_name.replace("/", "_"), out / "runs" / d_name
                    d_final = _final_weights(d_dir, args.distill_train_steps)
                    train_jobs.append(Job(f"distill_{d_tag}", _py() + [
                        "distill", "--checkpoint", str(run_dir), "--out", str(d_dir), "--steps", str(n),
                        "--train-steps", str(args.distill_train_steps), "--auto-resume", "--no-progress"],
                        d_final, after=(f"train_{tag}",), priority=1, resumes_from=d_dir / "checkpoints",
                        gpus=args.job_gpus))
                    evaluate(d_name, d_tag, d_dir, "fast", f"fast_d{n}", f"distill_{d_tag}",
                             {c: o for c, o in conds.items() if not c.startswith("steps")})
                for n in tunes:  # the same model fine-tuned to continue a committed prefix (no guidance)
                    p_name = f"{cell}/fast_p{n}_s{seed}" if cell else f"fast_p{n}_s{seed}"
                    p_tag, p_dir = p_name.replace("/", "_"), out / "runs" / p_name
                    p_final = _final_weights(p_dir, args.prefix_train_steps)
                    # The model's own demonstrations: another study's (--models-from) where it was trained there.
                    p_data, p_after = cell_data, (f"train_{tag}", *after)
                    if source is not None:
                        p_data = cell_data if args.dataset else source / cell_data.relative_to(out)
                        p_after = (f"train_{tag}",)
                    tune_flags = ["--init-from", str(run_dir), "--init-action", "copy",
                                  "--config.train.action-prefix-max", str(n), "--config.train.lr", str(args.prefix_lr)]
                    train_jobs.append(Job(f"prefix_{p_tag}", _py() + ["train"] + _train_argv(
                                          cfg, model_flags + tune_flags, p_data, p_dir, "fast",
                                          args.prefix_train_steps, seed),
                                          p_final, after=p_after, priority=1,
                                          resumes_from=p_dir / "checkpoints", gpus=args.job_gpus))
                    evaluate(p_name, p_tag, p_dir, "fast", f"fast_p{n}", f"prefix_{p_tag}",
                             {c: o for c, o in conds.items() if c == BASE or c.startswith("async_rtc")})
    jobs += train_jobs + eval_jobs
    # Batch-1 latency of each inference mode for each cell's architecture, overrides included (random weights:
    # latency does not depend on them). The config comes from ablation.json, which `cli` writes before any job runs.
    # One timing per architecture: cells that differ only in data or initialisation share their first cell's
    # (the report looks a cell's latency up through its architecture).
    # The real-time study also times the fast path at every step count it evaluates (and with RTC guidance).
    counts = sorted({10, *distill, *(int(v) for n, vs in parse_axes(args.axes) if n == "steps" for v in vs)})
    rtc = any(n == "async" for n, _ in parse_axes(args.axes))
    realtime_timing = (["--step-counts", ",".join(map(str, counts))] + (["--rtc"] if rtc else [])
                       if len(counts) > 1 or rtc else [])
    architectures: dict[str, list[str]] = {}
    for cell in cells:
        architectures.setdefault(json.dumps(model_overrides(cells[cell]), sort_keys=True), []).append(cell)
    for same in architectures.values():
        cell = same[0]
        modes = {VARIANT_MODES[v] for c in same for v in per_cell.get(c, _variants(args.variants))}
        modes_arg = ",".join(sorted(modes, key=["fast", "joint", "idm"].index))
        config_file = out / (f"config_{cell}.json" if cell else "ablation.json")  # written by `cli` before any job
        target = out / (f"latency_{cell}.json" if cell else "latency.json")
        jobs.append(Job(f"latency{'_' + cell if cell else ''}",
                        _py() + ["bench", "latency", "--config-file", str(config_file), "--modes", modes_arg,
                                 "--threads", "1", "--out", str(target)] + realtime_timing, target,
                        priority=-1, alone=True))  # first, alone: a minute or two of one idle core
    if args.baselines:
        for baseline in ("zero", "random"):
            eval_dir = out / "eval" / f"baseline_{baseline}"
            jobs.append(Job(f"eval_baseline_{baseline}", _py() + ["eval", "metaworld", "--policy", baseline, "--out",
                                                                  str(eval_dir)] + eval_args(args.baseline_episodes),
                            eval_dir / "results.json", after=("data",) if not args.dataset else ()))
            runs[f"baseline_{baseline}"] = {"variant": f"baseline ({baseline})", "seed": None, "cell": None,
                                            "run_dir": None, "eval_dir": eval_dir, "evals": {BASE: eval_dir}}
    return jobs, runs


def _missing_model(final: Path, source: Path) -> list[str]:
    """The command of a model another study trains: it runs only when that model is not there yet, and says so."""
    message = f"{final} is not there yet: {source}'s study has not trained this model; run it, then this one again"
    return [sys.executable, "-c", f"import sys; sys.exit({message!r})"]


def _check_source(source: Path, cells: dict[str, dict[str, str]]) -> None:
    """--models-from: the other study must define these cells as they are here (the same models)."""
    path = source / "cells.json"
    if not path.is_file():  # not on this machine (a published copy re-rendered): its models are reported missing
        return
    known = json.loads(path.read_text())
    for name, overrides in cells.items():
        if name and known.get(name) != overrides:
            raise ValueError(f"--models-from {source}: cell {name!r} is {overrides} here but "
                             f"{known.get(name, 'not defined')} there ({path})")


def _final_weights(run_dir: Path, steps: int) -> Path:
    """A run's last checkpoint weights: a training job is done when they exist."""
    return run_dir / "checkpoints" / f"step_{steps:07d}" / "model.safetensors"


def _train_argv(cfg: Config, flags: list[str], data: Path, run_dir: Path, variant: str, steps: int,
                seed: int) -> list[str]:
    """`fastwam train`'s arguments for one model of the study: the study's config, the model's own flags, its data,
    run, budget and seed (one thread, resumable)."""
    return _config_overrides(cfg) + flags + [
        "--dataset", str(data), "--out", str(run_dir), "--variant", variant, "--steps", str(steps),
        "--config.train.seed", str(seed), "--config.train.threads", "1", "--auto-resume", "--no-progress",
    ]


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
