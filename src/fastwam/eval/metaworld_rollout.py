"""The rollout loop of `fastwam eval metaworld`: which episodes run, on which env slot, and the pipelined loop.

Episodes are named by (task, evaluation seed, index): evaluation seed s runs `MetaWorldEnv(task, EVAL_SEED_BASE + s)`
and episode i is that env's i-th reset (one of the seed's 50 layouts). They are scheduled as contiguous runs of one
(task, seed) ("streams"), so a slot mostly resets the same env in order. `_run_mode` rolls out every episode of one
inference mode over an `EnvPool`, with ONE batched policy call per round; it stops early, keeping the episodes that
finished, when its `stop` flag is raised (Ctrl-C in `evaluate`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fastwam.eval.envpool import EnvPool, EpisodeSpec
from fastwam.eval.metaworld_policies import ACTION_DIM, _Adapter, _Server
from fastwam.eval.videos import compose_video, write_video

EVAL_SEED_BASE = 1_000_000  # evaluation seed s -> env seed EVAL_SEED_BASE + s (demos use data_seed * 1000 + shard)
LAYOUTS_PER_SEED = 50  # Meta-World's MT1 task list per env seed
ENV_BUILD_COST_RESETS = 150  # building a MetaWorldEnv (~1.5 s) costs about as much as 150 image-less resets


def env_seed_for(seed: int) -> int:
    return EVAL_SEED_BASE + int(seed)


def _check_seeds(adapter: _Adapter, tasks: Sequence[str], seeds: Sequence[int]) -> None:
    demo = getattr(adapter, "demo_seeds", None)
    if demo is None:
        return
    for t in tasks:
        clash = demo.get(t, set()) & {env_seed_for(s) for s in seeds}
        if clash:
            raise ValueError(f"evaluation env seeds {sorted(clash)} of {t} were used for the demonstrations: "
                             f"evaluation would replay training layouts; pick other --seeds")


@dataclass
class _Stream:
    task: str
    seed: int
    start: int
    stop: int
    record_below: int  # episodes < this are recorded as video

    def spec(self, i: int) -> EpisodeSpec:
        return EpisodeSpec(self.task, self.seed, env_seed_for(self.seed), i, record=i < self.record_below)


def _make_streams(tasks: Sequence[str], seeds: Sequence[int], episodes: int, videos: int, slots: int) -> deque:
    pairs = [(t, s) for t in tasks for s in seeds]
    # Enough streams (~2 per slot) that the last ones finish together; no more, since every stream that does not
    # continue a slot's previous one may cost building an env (~1.5 s) and fast-forwarding through layouts.
    per_pair = max(1, min(episodes, math.ceil(2 * slots / len(pairs))))
    size = math.ceil(episodes / per_pair)
    streams: deque = deque()
    for k in range(per_pair):  # chunk-major order: first chunks of every pair first
        for t, s in pairs:
            lo, hi = k * size, min(episodes, (k + 1) * size)
            if lo < hi:
                streams.append(_Stream(t, s, lo, hi, videos if s == seeds[0] else 0))
    return streams


@dataclass
class _SlotRun:
    stream: _Stream | None = None
    spec: EpisodeSpec | None = None
    obs: dict | None = None
    imagined: list = dataclasses.field(default_factory=list)  # (step, uint8 [F, H, W, 3]) per re-plan, if recorded
    steps: int = 0
    plan: np.ndarray | None = None  # the last full chunk the policy returned (real-time chunking continues it)
    plan_lag: int = 0  # index of `plan` the executed segment started at
    sent: np.ndarray | None = None  # the segment sent to the env in the round in flight
    segments: list = dataclasses.field(default_factory=list)  # the episode's executed segments (smoothness)


class _Smoothness:
    """Mean L2 jump between consecutive executed actions, at chunk seams vs within a chunk's segment.

    A seam is the step from the last action executed from one chunk to the first from the next; a policy whose new
    chunks continue the old ones has seam jumps like its within-chunk jumps, an abrupt switch has larger ones. Sums are
    exactly rounded (`math.fsum`), so the means do not depend on the order episodes finish in (workers, env count),
    and the means are kept to 6 decimals, like `episode_max_reward`'s 4: a server that batches concurrent requests
    differently can change actions in their last bits without changing an episode.
    """

    def __init__(self):
        self.seam: list[float] = []
        self.within: list[float] = []

    def add_episode(self, segments: list[np.ndarray]) -> None:
        segments = [s.astype(np.float64) for s in segments if len(s)]
        for j, seg in enumerate(segments):
            if len(seg) > 1:
                self.within += np.linalg.norm(np.diff(seg, axis=0), axis=1).tolist()
            if j:
                self.seam.append(float(np.linalg.norm(seg[0] - segments[j - 1][-1])))

    def summary(self) -> dict:
        mean = lambda xs: round(math.fsum(xs) / len(xs), 6) if xs else None  # noqa: E731
        return {"seam_jump": mean(self.seam), "within_chunk_jump": mean(self.within), "seams": len(self.seam)}


def _run_mode(pool: EnvPool, adapter: _Adapter, mode: str, tasks: list[str], seeds: list[int], episodes: int,
              videos: int, k: int, slots: int, groups: int, out: Path | None, bar: Any, delay: int = 0,
              stop: Any = None, chunking: str = "sync") -> dict:
    """Roll out every episode of one mode (or, once `stop.requested` is set, the episodes that finish in the rounds
    already sent to the workers: the pool is left idle, and the episodes not finished are dropped).

    The slots are split into `groups` contiguous blocks (a block spans all workers, as slot i lives on worker
    i % workers). With 2 groups the loop is a two-stage pipeline: while the workers step block A with its new chunks,
    this process runs the ONE batched policy call for block B (every env that is waiting for a chunk), and so on in
    turn; on a 2-core machine the policy and the simulators then overlap instead of waiting for each other. With 1
    group it is plain lock-step (all envs step, then one policy call for all).

    `delay` d > 0: the observation is made d steps before the old segment ends, and those d steps run while the new
    chunk is computed (asynchronous execution); the new chunk is then executed from index d. With `chunking` "rtc"
    the policy is also given the old chunk's remaining actions and d (real-time chunking: the new chunk's first d
    actions are the ones that ran, the rest continues them); otherwise it switches to the new chunk abruptly.
    """
    streams = _make_streams(tasks, seeds, episodes, videos, slots)
    runs = [_SlotRun() for _ in range(slots)]
    records: list[dict] = []
    calls: list[dict] = []  # one per batched policy call: ms, batch size, cells in it
    video_paths: list[str] = []
    env_steps, successes = 0, 0
    t0 = time.perf_counter()
    want_imagined = mode in ("joint", "idm")
    reserved: dict[int, _Stream] = {}  # slot -> stream it starts if its running episode ends (in-flight rounds)
    overhead: dict[str, int] = {}  # envs built, layouts skipped by fast-forwarding
    smooth = _Smoothness()

    def stopping() -> bool:
        return stop is not None and bool(stop.requested)

    def take_stream(i: int) -> _Stream | None:
        """The free stream cheapest for slot i: one of its env's (task, seed) not yet passed, nearest first (each
        layout in between costs one image-less reset, ~9 ms), else the first in queue order (a new env, ~1.5 s)."""
        taken = {id(s) for s in reserved.values()}
        free = [s for s in streams if id(s) not in taken]
        cur = runs[i].spec  # the slot's env has been reset cur.episode + 1 times

        def cost(s: _Stream) -> int:
            if cur is not None and (s.task, s.seed) == (cur.task, cur.seed) and s.start > cur.episode:
                return s.start - cur.episode - 1
            return ENV_BUILD_COST_RESETS + s.start

        return min(free, key=cost) if free else None  # min() keeps queue order among equal costs

    def policy_chunks(active: list[int]) -> dict[int, np.ndarray | None]:
        if adapter.in_worker:
            return {i: None for i in active}
        want = [bool(runs[i].spec.record and want_imagined) for i in active]  # type: ignore[union-attr]
        obs = [runs[i].obs for i in active]
        realtime = None
        if chunking == "rtc" and delay:
            # The old chunk from the observation's time on: its first `delay` actions run while this call computes.
            realtime = [(runs[i].plan[runs[i].plan_lag + k - delay:], delay)
                        if runs[i].steps > 0 and runs[i].plan is not None else None for i in active]
        tc = time.perf_counter()
        extra = {"realtime": realtime} if realtime is not None else {}  # adapters without it work unchanged
        if isinstance(adapter, _Server):
            replies = adapter.act_slots(active, obs, mode, want, **extra)  # type: ignore[arg-type]
        else:
            replies = adapter.act(obs, [runs[i].spec for i in active], mode, want, **extra)  # type: ignore[arg-type,misc]
        calls.append({"ms": (time.perf_counter() - tc) * 1000, "batch": len(active),
                      "cells": sorted({(runs[i].spec.task, runs[i].spec.seed) for i in active})})  # type: ignore
        chunks: dict[int, np.ndarray | None] = {}
        for i, rep in zip(active, replies):
            a = np.asarray(rep["actions"], dtype=np.float32)
            if a.ndim != 2 or a.shape[1] != ACTION_DIM or a.shape[0] < k + delay:
                raise ValueError(f"the policy returned actions of shape {list(a.shape)}; expected [>= {k + delay}, "
                                 f"{ACTION_DIM}]")
            lag = delay if runs[i].steps > 0 else 0  # the first chunk of an episode is planned at rest
            chunks[i] = a[lag: lag + k]
            runs[i].plan, runs[i].plan_lag = a, lag
            if rep.get("imagined") is not None:
                runs[i].imagined.append((runs[i].steps, np.asarray(rep["imagined"], dtype=np.uint8)))
        return chunks

    def commands_for(active: list[int], chunks: dict[int, np.ndarray | None]) -> list[dict]:
        commands = []
        for i in active:
            run = runs[i]
            cmd: dict[str, Any] = {"slot": i}
            if chunks[i] is None:
                cmd["expert_steps"] = k
            else:
                cmd["actions"] = chunks[i]
            run.sent = chunks[i]
            if delay:
                cmd["obs_after"] = k - delay
            nxt = run.spec.episode + 1  # type: ignore[union-attr]
            if nxt < run.stream.stop:  # type: ignore[union-attr]
                cmd["next"] = run.stream.spec(nxt)  # type: ignore[union-attr]
            else:
                s = take_stream(i)
                if s is not None:
                    reserved[i] = s
                    cmd["next"] = s.spec(s.start)
            commands.append(cmd)
        return commands

    def process(replies: list[dict]) -> None:
        nonlocal env_steps, successes
        for r in replies:
            i, run = r["slot"], runs[r["slot"]]
            for key, v in r.get("overhead", {}).items():
                overhead[key] = overhead.get(key, 0) + v
            tentative = reserved.pop(i, None)
            env_steps += r["steps"]
            run.steps += r["steps"]
            if run.sent is not None:
                run.segments.append(run.sent[: r["steps"]])
                run.sent = None
            if r["ended"] is None:
                run.obs = r["obs"]
                continue
            e = r["ended"]
            spec: EpisodeSpec = e["spec"]
            records.append({"task": spec.task, "seed": spec.seed, "env_seed": spec.env_seed,
                            "episode": spec.episode, "success": bool(e["success"]), "length": int(e["length"]),
                            "max_reward": float(e["max_reward"])})
            successes += bool(e["success"])
            if e["frames"] is not None and out is not None:
                outcome = "success" if e["success"] else "fail"
                name = f"{mode}_{spec.task}_seed{spec.seed}_ep{spec.episode:02d}_{outcome}"
                frames = compose_video(e["frames"], run.imagined, adapter.frame_stride)
                written = write_video(out / "videos" / name, frames)
                video_paths.append(f"videos/{written.name}")  # relative to the evaluation's folder, wherever it is
            smooth.add_episode(run.segments)
            run.imagined, run.steps, run.segments, run.plan = [], 0, [], None
            bar.update(1)
            bar.set_postfix(mode=mode, success=f"{successes}/{len(records)}",
                            steps_s=f"{env_steps / max(time.perf_counter() - t0, 1e-9):.0f}")
            if r["started"] is not None:
                if tentative is not None and r["started"] == tentative.spec(tentative.start):
                    streams.remove(tentative)
                    run.stream = tentative
                run.spec, run.obs = r["started"], r["obs"]
                adapter.episode_started(i, run.spec)
            else:
                run.spec, run.obs = None, None

    # Start: one stream per slot.
    begin = []
    for i in range(0 if stopping() else slots):
        s = take_stream(i)
        if s is None:
            break
        streams.remove(s)
        runs[i].stream, runs[i].spec = s, s.spec(s.start)
        begin.append({"slot": i, "begin": runs[i].spec})
    for r in pool.run(begin):
        for key, v in r.get("overhead", {}).items():
            overhead[key] = overhead.get(key, 0) + v
        runs[r["slot"]].obs = r["obs"]
        adapter.episode_started(r["slot"], runs[r["slot"]].spec)  # type: ignore[arg-type]

    groups = max(1, min(groups, slots))
    bounds = [round(g * slots / groups) for g in range(groups + 1)]
    blocks = [range(bounds[g], bounds[g + 1]) for g in range(groups)]
    inflight: deque = deque()
    g = 0
    while inflight or (not stopping() and any(r.spec is not None for r in runs)):
        busy = {i for ticket_slots, _ in inflight for i in ticket_slots}
        active = [] if stopping() else [i for i in blocks[g] if runs[i].spec is not None and i not in busy]
        if active:
            commands = commands_for(active, policy_chunks(active))
            inflight.append((active, pool.submit(commands)))
        # Collect the oldest round once the pipeline is full, or when this block had nothing to submit.
        if inflight and (len(inflight) >= groups or not active):
            process(pool.collect(inflight.popleft()[1]))
        g = (g + 1) % groups
    return {"mode": mode, "records": records, "calls": calls, "videos": video_paths, "env_steps": env_steps,
            "rollout_s": time.perf_counter() - t0, "overhead": overhead, "smoothness": smooth.summary()}
