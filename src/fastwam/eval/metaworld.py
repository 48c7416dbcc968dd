"""`fastwam eval metaworld`: closed-loop Meta-World evaluation with action chunking, vectorised over processes.

Protocol
- Each (task, evaluation seed s) runs `episodes` episodes. Evaluation seed s runs `MetaWorldEnv(task, EVAL_SEED_BASE
  + s)`, and episode i is that env's i-th reset (Meta-World gives each env seed 50 object/goal layouts per task, so
  episodes <= 50). The demonstration generator (`fastwam data metaworld`) uses env seeds `data_seed * 1000 + shard`,
  i.e. small numbers for every realistic data seed, hence the large base: evaluation layouts are never training
  layouts. When the checkpoint's dataset is on disk its `fastwam_generation.json` is read and an overlap is refused.
- The policy sees only the rendered camera images, the robot's own state (end-effector xyz + gripper opening) and
  the instruction. It returns a chunk of H actions; the first K (`replan`, default H/2) are executed, then it is
  asked again. An episode succeeds if Meta-World's success flag is set at any step (the episode stops there), and
  fails at `max_steps` (default 300).
- Environments step in worker processes (`EnvPool`); the policy runs in this process with ONE batched call over all
  environments waiting for a chunk. With `--pipeline on` (default for a GPU policy) the environments form two blocks
  taking turns, so the policy's call for one block overlaps the simulators stepping the other. Results do not depend
  on the number of workers or environments: each episode's layout is fixed by its spec and the policy's sampling
  noise is per observation, not per batch.

Policies: a checkpoint (in-process `FastWAMPolicy`), a websocket server (`--server ws://host:port`, one client per
environment, requests sent concurrently so the server can micro-batch them), or baselines: `zero` (all-zero
actions), `random` (uniform in the action box, seeded per episode), and `scripted` (Meta-World's expert reading the
privileged simulator state: a HARNESS CHECK ONLY, never a result about vision-based policies).

Outputs in --out: `results.json` (per task/seed/mode cells and per-mode summaries: what the policy did, the same bytes
wherever and however often it runs), `timing.json` (policy latency, throughput), `summary.md`
(tables with Wilson 95 % intervals) and `videos/` (the first `--videos` episodes of each task: real rollout, and for
joint/IDM the policy's imagined future to its right, refreshed at every re-plan).

Ctrl-C: the first one stops the evaluation after the rounds the env workers are stepping; the episodes finished so
far are written as usual, marked `"partial": true` (see `metaworld_results`), and the command exits with code 130.
A second Ctrl-C stops at once, writing nothing.

Modules: this one holds `evaluate` and the CLI; `metaworld_policies` the policy adapters, `metaworld_rollout` the
episode schedule and the rollout loop, `metaworld_results` results.json and summary.md, `videos` the videos. Their
names are importable from here too.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import tyro

from fastwam.errors import INTERRUPTED_EXIT
from fastwam.eval.envpool import EnvPool, EnvSettings
from fastwam.eval.metaworld_policies import (
    ACTION_DIM,
    BASELINES,
    DEFAULT_BASELINE_HORIZON,
    _Adapter,
    _cameras_from_keys,
    _demo_env_seeds,
    _InProcess,
    _policy_obs,
    _Random,
    _recorded_image_size,
    _resolve_policy,
    _Scripted,
    _Server,
    _set_threads,
    _Zero,
)
from fastwam.eval.metaworld_results import TIMING_FILE, _assemble, _latency, split_timing, summary_markdown
from fastwam.eval.metaworld_rollout import (
    ENV_BUILD_COST_RESETS,
    EVAL_SEED_BASE,
    LAYOUTS_PER_SEED,
    _check_seeds,
    _make_streams,
    _run_mode,
    _SlotRun,
    _Stream,
    env_seed_for,
)
from fastwam.eval.videos import VIDEO_FPS, VIDEO_MIN_HEIGHT, compose_video, write_video
from fastwam.files import write_text_atomic
from fastwam.interrupt import StopRequest

# What this module held before it was split; the helpers' own modules are the place to change them.
__all__ = [
    "ACTION_DIM", "BASELINES", "DEFAULT_BASELINE_HORIZON", "ENV_BUILD_COST_RESETS", "EVAL_SEED_BASE",
    "LAYOUTS_PER_SEED", "VIDEO_FPS", "VIDEO_MIN_HEIGHT", "EvalArgs", "cli", "compose_video", "env_seed_for",
    "evaluate", "summary_markdown", "write_video", "_Adapter", "_InProcess", "_Random", "_Scripted", "_Server",
    "_SlotRun", "_Stream", "_Zero", "_assemble", "_cameras_from_keys", "_check_seeds", "_demo_env_seeds", "_latency",
    "_make_streams", "_policy_obs", "_recorded_image_size", "_resolve_policy", "_run_mode", "_set_threads",
]
STOP_MESSAGE = "Ctrl-C: stopping after the env steps in flight, then writing the partial results (again: at once)"


def evaluate(
    policy_or_checkpoint: Any,
    tasks: str | Sequence[str],
    episodes: int = 50,
    seeds: Sequence[int] | str = (0,),
    mode: str | Sequence[str] | None = None,
    replan: int | None = None,
    max_steps: int = 300,
    workers: int = 2,
    video_episodes: int = 2,
    out_dir: str | Path | None = None,
    server: str | None = None,
    *,
    num_envs: int | None = None,
    image_size: tuple[int, int] | None = None,
    cameras: Sequence[str] | None = None,
    horizon: int | None = None,
    device: str | None = None,
    policy_seed: int = 0,
    pipeline: bool | None = None,
    threads: int | None = None,
    progress: bool = True,
    shift: str = "none",
    obs_delay: int = 0,
    compile: bool = False,
    steps: int | None = None,
    inference_delay: int = 0,
    chunking: str | None = None,
    rtc_method: str | None = None,
) -> dict:
    """Evaluate closed loop; returns the results dict (also written to out_dir/results.json when out_dir is given).

    policy_or_checkpoint: checkpoint/run directory, a FastWAMPolicy, or "scripted" | "zero" | "random" (then
    `horizon` sets the chunk length, default 16); ignored when `server` ("ws://host:port") is given.
    mode: inference mode(s) to evaluate, each in its own pass (default: the policy's own).
    replan: actions executed per chunk before asking again (default H // 2).
    num_envs: environments in flight (= the policy's batch size); default 8, whatever the number of workers: the
        batch a policy call sees is then the same with 1 or N workers, and so are the results (a batch of another
        size can round a float differently, and a closed loop amplifies that into another episode).
    pipeline: overlap the policy with the simulators (two blocks of envs in turn; needs workers >= 1). Results are
    the same either way; only the speed changes. None = only for a policy on a GPU: a CPU policy competes with the
    env workers for the same cores (measured on the 2-core box under other load: no gain, per-observation policy
    time doubled), so there lock-step is as fast and simpler.
    threads: torch intra-op threads while evaluating (restored afterwards). None = 1 for an in-process policy on
    CPU with env workers: measured on the 2-core box, torch's default 2 threads spin against busy workers and a
    small_cpu policy call goes from ~70-90 ms to 0.6-5 s.
    image_size / cameras: override what the env renders (default: what the policy was trained on; baselines render
    the env's default cameras at 64x64 when videos are asked for, and nothing otherwise).
    shift: a test-time visual shift of the rendered images ("camera", "lighting", "colour"; envs.metaworld).
    compile: torch.compile an in-process checkpoint's inference stages (see EvalArgs.compile).
    obs_delay: observation latency d (0 <= d <= replan): from the second chunk of an episode on, the policy is
    given the observation made d steps before the re-planning time (d = replan: at the start of the segment, as with
    inference that takes a whole segment and runs back to back), and the actions executed are those its chunk
    plans for "now", chunk[d : d + replan] (latency compensation, as on a real robot with a slow camera; the first
    chunk, planned while the robot is still, runs from index 0). It needs horizon >= d + replan.
    steps: denoising steps per chunk of an in-process checkpoint (default: the checkpoint's).
    chunking / inference_delay: asynchronous execution, as on a robot that keeps moving while it thinks: d =
    `inference_delay` control steps pass while a chunk is computed, the previous chunk still executing. "sync": the
    robot waits instead (today's behaviour; d costs no motion and is ignored); "naive": the new chunk takes over at
    once, from its index d (the observation is d steps old); "rtc": the same, with real-time chunking (the policy is
    given the old chunk's remaining actions, pins the first d and continues the rest; `FastWAMPolicy.infer`).
    None = synchronous without the async bookkeeping. Results record `summary[mode]["smoothness"]` either way.
    Ctrl-C (in the main thread) stops early: the episodes finished so far are returned and written, with
    `results["partial"]` true; a second Ctrl-C raises KeyboardInterrupt at once.
    """
    from fastwam.envs.metaworld import DEFAULT_CAMERAS, parse_tasks

    t_start = time.perf_counter()
    task_list = parse_tasks(tasks)
    seed_list = [int(s) for s in seeds.split(",")] if isinstance(seeds, str) else [int(s) for s in seeds]
    if not seed_list or len(set(seed_list)) != len(seed_list) or min(seed_list) < 0:
        raise ValueError(f"seeds must be distinct non-negative integers, got {seed_list}")
    if not 1 <= episodes <= LAYOUTS_PER_SEED:
        raise ValueError(f"episodes must be in 1..{LAYOUTS_PER_SEED}: each env seed has {LAYOUTS_PER_SEED} layouts "
                         f"per task, so more episodes would repeat layouts; add seeds instead")
    if max_steps < 1:
        raise ValueError("max_steps must be >= 1")
    total_per_mode = len(task_list) * len(seed_list) * episodes
    slots = num_envs or 8
    slots = max(1, min(slots, total_per_mode))
    if chunking not in (None, "sync", "naive", "rtc"):
        raise ValueError(f"unknown chunking {chunking!r}; choose from sync, naive, rtc")
    if chunking is None and inference_delay:
        raise ValueError("inference_delay needs asynchronous execution: give chunking sync, naive or rtc")
    if chunking is not None and obs_delay:
        raise ValueError("obs_delay and asynchronous execution (chunking / inference_delay) are two views of one "
                         "delay: give one")
    if inference_delay < 0:
        raise ValueError(f"inference_delay must be >= 0, got {inference_delay}")
    if chunking in ("naive", "rtc"):
        obs_delay = inference_delay  # the observation is d steps old when the new chunk takes over
    adapter = _resolve_policy(policy_or_checkpoint, server, slots, horizon, device, policy_seed, compile, steps,
                              rtc_method)
    previous_threads: int | None = None
    try:
        _check_seeds(adapter, task_list, seed_list)
        k = replan or max(1, adapter.horizon // 2)
        if not 1 <= k <= adapter.horizon:
            raise ValueError(f"replan must be in 1..{adapter.horizon} (the policy's chunk length), got {k}")
        if not 0 <= obs_delay <= k or obs_delay + k > adapter.horizon:
            what = "inference_delay" if chunking else "obs_delay"
            raise ValueError(f"{what} must be in 0..replan ({k}) with {what} + replan <= the chunk "
                             f"length ({adapter.horizon}), got {obs_delay}")
        if chunking == "rtc" and not adapter.realtime_chunking:
            raise ValueError(f"chunking rtc needs a policy that takes the previous chunk (real-time chunking); "
                             f"{adapter.name} does not")
        from fastwam.envs.metaworld import VISUAL_SHIFTS

        if shift not in VISUAL_SHIFTS:
            raise ValueError(f"unknown shift {shift!r}; choose from {', '.join(VISUAL_SHIFTS)}")
        modes = [mode] if isinstance(mode, str) else list(mode or [])
        modes = [m.strip() for ms in modes for m in ms.split(",") if m.strip()] or [adapter.default_mode]
        for m in modes:
            if m not in adapter.modes:
                raise ValueError(f"mode {m!r} is not available for policy {adapter.name}; choose from {adapter.modes}")
        if adapter.name in BASELINES:
            cams = tuple(cameras) if cameras else (DEFAULT_CAMERAS if video_episodes > 0 else ())
            size = image_size or (64, 64)
        else:
            cams = tuple(cameras) if cameras else adapter.cameras
            size = image_size or adapter.image_size
            if set(cams) != set(adapter.cameras):
                raise ValueError(f"the policy needs cameras {adapter.cameras}, got {cams}")
        if video_episodes > 0 and not cams:
            raise ValueError("videos need at least one camera")
        # Pipelining needs the envs in other processes, and a policy in this one (the expert runs in the workers).
        if pipeline is None:
            pipeline = isinstance(adapter, _InProcess) and getattr(adapter.policy, "device", None) is not None \
                and getattr(adapter.policy.device, "type", "cpu") == "cuda"
        n_groups = 2 if pipeline and workers >= 1 and not adapter.in_worker and slots >= 2 else 1
        settings = EnvSettings(image_size=(int(size[0]), int(size[1])), cameras=cams, max_steps=max_steps,
                               shift=shift)
        out = Path(out_dir) if out_dir is not None else None
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)

        from tqdm.auto import tqdm

        previous_threads = _set_threads(adapter, threads, workers)
        stop = StopRequest(STOP_MESSAGE)
        with stop.installed():  # Ctrl-C: finish the rounds in flight, keep the finished episodes
            t_pool = time.perf_counter()
            with EnvPool(slots, workers, settings) as pool:
                pool_start_s = time.perf_counter() - t_pool
                bar = tqdm(total=total_per_mode * len(modes), unit="ep", desc="eval metaworld",
                           disable=not progress, dynamic_ncols=True)
                runs = []
                try:
                    for m in modes:
                        if stop.requested:
                            break
                        runs.append(_run_mode(pool, adapter, m, task_list, seed_list, episodes, video_episodes, k,
                                              slots, n_groups, out, bar, obs_delay, stop, chunking or "sync"))
                finally:
                    bar.close()
            results = _assemble(adapter, runs, modes, task_list, seed_list, episodes, k, max_steps, settings,
                                slots, pool.workers, n_groups, pool.step_render_flag, pool_start_s,
                                time.perf_counter() - t_start)
            results["config"].update(shift=shift, obs_delay=obs_delay, compile=compile)
            if chunking is not None:
                results["config"].update(chunking=chunking, inference_delay=inference_delay)
            if rtc_method is not None or chunking == "rtc":  # what the policy did, "auto" resolved
                results["config"].update(rtc_method=rtc_method or adapter.realtime_method)
            if out is not None:  # results.json last: its presence means the evaluation ran (ablate's done marker)
                outcome, timing = split_timing(results)
                write_text_atomic(out / "summary.md", summary_markdown(results))
                write_text_atomic(out / TIMING_FILE, json.dumps(timing, indent=2) + "\n")
                write_text_atomic(out / "results.json", json.dumps(outcome, indent=2) + "\n")
    finally:
        adapter.close()
        if previous_threads is not None:
            import torch

            torch.set_num_threads(previous_threads)
    return results


@dataclass
class EvalArgs:
    """Closed-loop Meta-World evaluation (action chunking, parallel envs, batched policy, Wilson CIs, videos)."""

    checkpoint: str = ""  # checkpoint or run directory (its latest checkpoint); needed for --policy checkpoint
    policy: Literal["checkpoint", "scripted", "zero", "random"] = "checkpoint"  # scripted = harness check only
    tasks: str = "mt10"  # a task set (mt10, mt50) or comma-separated tasks
    episodes: int = 50  # per task and seed (<= 50: each env seed has 50 layouts per task)
    seeds: str = "0"  # evaluation seeds, comma-separated; seed s runs env seed 1000000 + s
    mode: str = ""  # inference mode(s), comma-separated (fast, joint, idm); empty = the checkpoint's own
    replan: int = 0  # actions executed per chunk before re-planning (0 = half the chunk)
    horizon: int = 0  # chunk length of the zero/random/scripted baselines (0 = 16)
    max_steps: int = 300
    workers: int = 2  # env worker processes (0 = step the envs in this process)
    # Environments in flight (0 = 8, whatever --workers: the same batches, so the same results, with 1 or N workers);
    # pipelined, each policy call batches half of them.
    num_envs: int = 0
    server: str = ""  # ws://host:port: evaluate through `fastwam serve` instead of loading the checkpoint
    out: str = "runs/eval/metaworld"
    videos: int = 2  # episodes recorded per task (first seed)
    image_size: int = 0  # render size override (0 = the demonstrations' size from the checkpoint's dataset)
    cameras: str = ""  # camera override, comma-separated (default: the policy's cameras)
    device: str = ""  # cuda / cpu (empty = cuda if available)
    threads: int = 0  # torch CPU threads for the policy (0 = 1 for a CPU policy with env workers, else unchanged)
    policy_seed: int = 0  # seed of the policy's sampling noise
    # Overlap policy and simulators (two env blocks in turn): same results, faster only when the policy does not
    # need the workers' CPU cores. auto = on for a GPU policy, off for a CPU one.
    pipeline: Literal["auto", "on", "off"] = "auto"
    progress: bool = True  # show a progress bar
    # Evaluation axes (see `evaluate`): a test-time visual shift, and observation latency with compensation.
    shift: Literal["none", "camera", "lighting", "colour"] = "none"
    obs_delay: int = 0  # steps the observation lags the robot at each re-plan (0..replan)
    # torch.compile the checkpoint's inference stages (small_cpu on the 2-core VM: fast calls 1.6x faster, joint /
    # idm 1.15x; the first calls of each batch shape compile; compiled actions equal eager ones to ~1e-6, see
    # `fastwam bench latency --compile`)
    compile: bool = False
    steps: int = 0  # denoising steps per chunk (0 = the checkpoint's; a distilled run's is what it was made for)
    # Asynchronous execution: the robot keeps executing the previous chunk while the next one is computed.
    async_: Annotated[bool, tyro.conf.arg(name="async")] = False
    inference_delay: int = 0  # with --async: control steps that pass while a chunk is computed (0..replan)
    # with --async: how the new chunk takes over: sync = the robot waits instead (today's behaviour), naive = switch at
    # once, rtc = real-time chunking (the new chunk's first actions are those that ran, the rest continues them)
    chunking: Literal["sync", "naive", "rtc"] = "rtc"
    # with --chunking rtc: guidance (inpainting, any model) or prefix (the executing actions given clean, for a model
    # trained with --config.train.action-prefix-max); auto = prefix if the checkpoint was trained for it
    rtc_method: Literal["auto", "guidance", "prefix"] = "auto"


def cli(argv: list[str], prog: str = "fastwam eval metaworld") -> int:
    import tyro

    args = tyro.cli(EvalArgs, args=argv, prog=prog)
    if args.policy == "checkpoint" and not args.checkpoint and not args.server:
        print(f"{prog}: give --checkpoint DIR, --server ws://host:port, or --policy scripted|zero|random",
              file=sys.stderr)
        return 2
    target = args.checkpoint if args.policy == "checkpoint" else args.policy
    if not args.async_ and args.inference_delay:
        print(f"{prog}: --inference-delay needs --async (asynchronous execution)", file=sys.stderr)
        return 2
    results = evaluate(
        target, args.tasks, episodes=args.episodes, seeds=args.seeds, mode=args.mode or None,
        replan=args.replan or None, max_steps=args.max_steps, workers=args.workers, video_episodes=args.videos,
        out_dir=args.out, server=args.server or None, num_envs=args.num_envs or None,
        image_size=(args.image_size, args.image_size) if args.image_size else None,
        cameras=[c.strip() for c in args.cameras.split(",") if c.strip()] or None,
        horizon=args.horizon or None, device=args.device or None, policy_seed=args.policy_seed,
        pipeline={"auto": None, "on": True, "off": False}[args.pipeline], threads=args.threads or None,
        progress=args.progress, shift=args.shift, obs_delay=args.obs_delay, compile=args.compile,
        steps=args.steps or None, inference_delay=args.inference_delay,
        chunking=args.chunking if args.async_ else None,
        rtc_method=None if args.rtc_method == "auto" else args.rtc_method,
    )
    print(summary_markdown(results))
    if results["partial"]:
        print(f"{prog}: interrupted: {results['episodes_done']} of {results['episodes_planned']} episodes finished; "
              f"{Path(args.out) / 'results.json'} holds them, marked partial", file=sys.stderr)
        return INTERRUPTED_EXIT
    print(f"results: {Path(args.out) / 'results.json'}\nsummary: {Path(args.out) / 'summary.md'}"
          + (f"\nvideos:  {Path(args.out) / 'videos'}" if results["videos"] else ""))
    return 0
