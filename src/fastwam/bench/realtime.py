"""`fastwam bench realtime`: a robot loop at a fixed control rate driven by `AsyncChunkRunner` (JSON).

What a deployment needs to know before it runs: at this control rate, on this machine, how many ticks does an
inference take (the `inference_delay` that real-time chunking will plan with), does the robot ever stall waiting for
a chunk, and does the control loop keep its deadline while inference runs beside it? The robot here is a stand-in: it
hands the runner the same observation every tick (a checkpoint's example observation) and sleeps to the next control
period; the policy is the checkpoint's, in this process, on the runner's background thread. Per step count:

- `delay_counts`: measured inference delays in ticks (observation -> first tick its reply was in);
- `stalls` / `stall_s`: ticks at which the chunk ran out before the reply came, and the time waited;
- `act_ms`: what one `runner.act` call took (p50 / p99 / max): the control loop's own cost, which is ~0 unless a
  stall or the first chunk of the episode made it wait;
- `missed_deadlines`: ticks whose control period had already passed when the loop got to them;
- `inference_ms`: the policy calls themselves (p50 / p90), measured on the background thread.

Two threads share the CPU's cores with the policy here; on a robot the loop runs on its own core or machine.

With `--server URI` the policy is a `fastwam serve` instead (a `WebsocketClient`, as on a robot): the delays then
include the wire and the server's batching, `inference_ms` is the round trip, and the step count is the server's.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import sys
import time
from pathlib import Path
from typing import Literal

import numpy as np
import tyro

from fastwam.serving.realtime import AsyncChunkRunner

__all__ = ["BenchRealtimeArgs", "cli", "run"]


@dataclasses.dataclass
class BenchRealtimeArgs:
    """A robot loop at --hz driven by AsyncChunkRunner with a checkpoint's policy in this process."""

    checkpoint: str = ""
    """run or checkpoint directory (the policy runs in this process)"""
    server: str = ""
    """or: a running `fastwam serve`, host:port or ws://host:port (the policy runs there; the round trip is timed)"""
    hz: float = 20.0
    """control rate of the simulated robot (ticks per second)"""
    ticks: int = 200
    """control ticks per step count (one episode)"""
    replan: int = 0
    """actions executed per chunk (0 = half the chunk, as evaluation's default)"""
    chunking: Literal["sync", "naive", "rtc"] = "rtc"
    inference_delay: int = -1
    """plan every request with this delay in ticks (-1 = learn it: the largest of the last five measured)"""
    step_counts: str = ""
    """denoising steps per chunk to run, e.g. 1,10 (empty = the checkpoint's)"""
    threads: int = 1
    """torch CPU threads of the policy"""
    json: bool = False
    """print one JSON object instead of a table"""
    out: str = ""
    """also write the JSON report to this file"""


def _stats_ms(xs: list[float]) -> dict:
    if not xs:
        return {}
    a = np.asarray(xs) * 1000
    return {"p50": round(float(np.median(a)), 3), "p90": round(float(np.percentile(a, 90)), 3),
            "p99": round(float(np.percentile(a, 99)), 3), "max": round(float(a.max()), 3)}


class _TimedPolicy:
    """The policy with its calls timed (on the thread that makes them)."""

    def __init__(self, policy):
        self.policy = policy
        self.seconds: list[float] = []

    def infer(self, obs, **kwargs):
        t0 = time.perf_counter()
        reply = self.policy.infer(obs, **kwargs)
        self.seconds.append(time.perf_counter() - t0)
        return reply

    def reset(self):
        self.policy.reset()


def robot_loop(runner: AsyncChunkRunner, observation: dict, hz: float, ticks: int) -> dict:
    """Call `runner.act` once per control period for `ticks` periods; the loop's own timings."""
    period = 1.0 / hz
    act_s, missed = [], 0
    deadline = time.perf_counter()
    for _ in range(ticks):
        t0 = time.perf_counter()
        if t0 > deadline + period:  # this tick's period was over before the loop got to it
            missed += 1
        runner.act(observation)
        act_s.append(time.perf_counter() - t0)
        deadline += period
        time.sleep(max(0.0, deadline - time.perf_counter()))
    return {"act_ms": _stats_ms(act_s), "missed_deadlines": missed}


def _connect(server: str):
    from fastwam.serving.client import WebsocketClient

    if server.startswith(("ws://", "wss://")):
        return WebsocketClient(server)
    host, _, port = server.rpartition(":")
    if not host or not port.isdigit():
        raise SystemExit(f"--server must be host:port or ws://host:port (got {server!r})")
    return WebsocketClient(host, int(port))


def run(args: BenchRealtimeArgs, policy=None) -> dict:
    """`policy`: an already-loaded policy (tests); default: the checkpoint's, from disk, or the --server's client."""
    if args.hz <= 0 or args.ticks < 1:
        raise SystemExit(f"--hz must be positive and --ticks >= 1 (got {args.hz}, {args.ticks})")
    if policy is None and bool(args.checkpoint) == bool(args.server):
        raise SystemExit("give exactly one of --checkpoint (the policy in this process) and --server (a fastwam serve)")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    client = None
    if policy is None and args.server:
        policy = client = _connect(args.server)
    elif policy is None:
        from fastwam.policy import FastWAMPolicy

        policy = FastWAMPolicy.from_pretrained(args.checkpoint)
    try:
        return _run(args, policy, remote=client is not None)
    finally:
        if client is not None:
            client.close()


def _run(args: BenchRealtimeArgs, policy, remote: bool) -> dict:
    import torch

    from fastwam.serving.protocol import example_observation

    metadata = policy.metadata
    horizon, own_steps = int(metadata["action_shape"][0]), int(metadata["inference_steps"])
    replan = args.replan or max(1, horizon // 2)
    observation = example_observation(metadata, seed=0)
    counts = [int(x) for x in args.step_counts.split(",") if x.strip()] or [own_steps]
    if remote and counts != [own_steps]:
        raise SystemExit(f"--step-counts with --server: the server samples with its own {own_steps} step(s); "
                         f"start it with `fastwam serve --steps N` to time another count")
    results = {}
    for n in counts:
        timed = _TimedPolicy(policy)
        infer_kwargs = {} if remote else {"steps": n}
        timed.infer(observation, **infer_kwargs)  # warm-up (allocation, the connection), untimed
        timed.seconds.clear()
        delay = None if args.inference_delay < 0 else args.inference_delay
        with AsyncChunkRunner(timed, replan, args.chunking, delay, infer_kwargs=infer_kwargs) as runner:
            loop = robot_loop(runner, observation, args.hz, args.ticks)
            runner.reset(reset_policy=False)
        stats = runner.stats.as_dict()
        results[str(n)] = {**stats, **loop, "inference_ms": _stats_ms(timed.seconds),
                           "planned_delay_at_end": runner.planned_delay}
    return {
        "benchmark": "realtime",
        "checkpoint": metadata.get("checkpoint"),
        "policy_at": args.server if remote else "this process",
        "hz": args.hz,
        "ticks": args.ticks,
        "replan": replan,
        "action_horizon": horizon,
        "chunking": args.chunking,
        "inference_delay": "learnt" if args.inference_delay < 0 else args.inference_delay,
        "threads": torch.get_num_threads(),
        "machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                    "device": "server" if remote else str(policy.device)},
        "step_counts": results,
    }


def cli(argv: list[str], prog: str = "fastwam bench realtime") -> int:
    args = tyro.cli(BenchRealtimeArgs, args=argv, prog=prog)
    report = run(args)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{report['hz']:g} Hz, replan {report['replan']} of {report['action_horizon']}, {report['chunking']}",
          file=sys.stderr)
    for n, r in report["step_counts"].items():
        delays = ", ".join(f"{d}: {c}" for d, c in r["delay_counts"].items()) or "-"
        print(f"{n:>3} step(s): inference p50 {r['inference_ms'].get('p50', float('nan')):.1f} ms; delays (ticks: "
              f"requests) {delays}; stalls {r['stalls']}; act p50 {r['act_ms']['p50']:.3f} ms, max "
              f"{r['act_ms']['max']:.1f} ms; missed deadlines {r['missed_deadlines']}")
    return 0
