"""`fastwam bench serve`: websocket server latency / throughput under N concurrent clients (JSON).

Starts `PolicyServer` in this process on a free loopback port (a background thread) and drives it with N client
threads, each on its own connection sending `--requests` observations back to back (closed loop, like evaluation
workers). Reports client-side p50 / p99 latency and throughput per client count, the mean batch size the server
formed, and the in-process `policy.infer` latency on the same observation, so the wire's overhead is visible.

Clients share the process (and its GIL) with the server, so with a zero-cost policy (`--fake`) the numbers are an
upper bound on protocol overhead, not a lower one; with a real checkpoint the model dominates.

`--bystander`, `--unique-prompts N` and `--fuzz N` measure hostile clients instead of the client sweep (see
`serve_hostile.py`): a bystander's latency beside a neighbour sending the largest allowed images, RSS over N unique
prompts, and N hostile messages.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import sys
import threading
import time
from typing import Any

import numpy as np

from fastwam.bench import serve_hostile
from fastwam.serving.client import WebsocketClient
from fastwam.serving.msgpack_numpy import packb
from fastwam.serving.protocol import Policy, example_observation
from fastwam.serving.server import PolicyServer, policy_thread

__all__ = ["BenchServeArgs", "cli", "run"]


@dataclasses.dataclass
class BenchServeArgs:
    """Measure `fastwam serve` latency / throughput with N concurrent clients on loopback."""

    checkpoint: str | None = None
    """run or checkpoint directory (required unless --fake)"""
    clients: str = "1,4,8"
    """comma-separated client counts to measure, e.g. 1,4,8"""
    requests: int = 50
    """timed requests per client (after --warmup untimed ones)"""
    warmup: int = 2
    mode: str = "fast"
    max_batch: int = 8
    batch_timeout_ms: float = 2.0
    fake: bool = False
    """bench the wire with `ZeroPolicy` (all-zero actions, no model) instead of a checkpoint"""
    image_size: int = 224
    """camera resolution of the --fake policy's observation spec"""
    fake_latency_ms: float = 0.0
    """--fake only: simulated cost per infer_batch call (shows what micro-batching buys)"""
    fake_per_item_ms: float = 0.0
    """--fake only: simulated extra cost per observation in a batch"""
    in_process_iters: int = 20
    """timed in-process policy.infer calls for the comparison"""
    threads: int = 0
    """torch CPU threads, as `fastwam serve --threads` (0 = auto: half the usable cores on CPU)"""
    max_image_side: int = 0
    """as `fastwam serve --max-image-side` (0 = the policy's default)"""
    bystander: bool = False
    """instead of the client sweep: one client's latency alone, beside a neighbour sending preferred-size images,
    and beside one sending the largest images the metadata allows (--requests timed requests each)"""
    unique_prompts: int = 0
    """instead of the client sweep: send N requests with N distinct maximum-length prompts; report RSS over time"""
    fuzz: int = 0
    """instead of the client sweep: send N hostile messages (the fuzz test's cases) with a bystander checked"""
    json: bool = False
    """print one JSON object instead of a table"""


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else float("nan")


def _machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["cuda"] = torch.cuda.is_available()
    except ImportError:  # --fake works without torch
        info["torch_threads"] = None
    return info


def _load_policy(args: BenchServeArgs) -> Policy:
    if args.fake:
        from fastwam.serving.testing import ZeroPolicy

        return ZeroPolicy(
            image_size=args.image_size,
            mode=args.mode,
            latency_ms=args.fake_latency_ms,
            per_item_ms=args.fake_per_item_ms,
        )
    if args.checkpoint is None:
        raise SystemExit("fastwam bench serve: --checkpoint DIR is required (or --fake)")
    from fastwam.policy import FastWAMPolicy

    return FastWAMPolicy.from_pretrained(args.checkpoint, mode=args.mode, max_image_side=args.max_image_side)


def _run_clients(port: int, n_clients: int, args: BenchServeArgs, metadata: dict) -> dict[str, Any]:
    observations = [example_observation(metadata, seed=i) for i in range(n_clients)]
    clients = [WebsocketClient("127.0.0.1", port, connect_timeout_s=30, recv_timeout_s=600) for _ in range(n_clients)]
    latencies: list[list[float]] = [[] for _ in range(n_clients)]
    server_infer: list[list[float]] = [[] for _ in range(n_clients)]
    server_queue: list[list[float]] = [[] for _ in range(n_clients)]
    errors: list[str] = []
    barrier = threading.Barrier(n_clients + 1, timeout=600)

    def worker(i: int) -> None:
        client, obs = clients[i], observations[i]
        try:
            for _ in range(args.warmup):
                client.infer(obs)
            barrier.wait()
            for _ in range(args.requests):
                t0 = time.perf_counter()
                reply = client.infer(obs)
                latencies[i].append((time.perf_counter() - t0) * 1000.0)
                server_infer[i].append(float(reply["server_timing"]["infer_ms"]))
                server_queue[i].append(float(reply["server_timing"]["queue_ms"]))
        except Exception as exc:  # reported in the JSON rather than killing the bench
            errors.append(f"client {i}: {type(exc).__name__}: {exc}")
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(n_clients)]
    for thread in threads:
        thread.start()
    try:
        barrier.wait()
    except threading.BrokenBarrierError:
        pass
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    wall_s = time.perf_counter() - start
    for client in clients:
        client.close()
    flat = [x for xs in latencies for x in xs]
    return {
        "clients": n_clients,
        "requests": len(flat),
        "errors": len(errors),
        "error_messages": errors[:5],
        "p50_ms": _percentile(flat, 50),
        "p99_ms": _percentile(flat, 99),
        "mean_ms": float(np.mean(flat)) if flat else float("nan"),
        "throughput_rps": len(flat) / wall_s if wall_s > 0 else float("nan"),
        "server_infer_p50_ms": _percentile([x for xs in server_infer for x in xs], 50),
        "server_queue_p50_ms": _percentile([x for xs in server_queue for x in xs], 50),
    }


def run(args: BenchServeArgs) -> dict[str, Any]:
    client_counts = [int(x) for x in args.clients.replace(" ", "").split(",") if x]
    if not client_counts or min(client_counts) < 1:
        raise SystemExit(f"fastwam bench serve: --clients must list positive ints, got {args.clients!r}")
    if not args.fake:
        from fastwam.serving.serve_cli import set_threads

        set_threads(args.threads)  # on the policy thread, as `fastwam serve` does
    # Load and time in-process on the server's policy thread, as `fastwam serve` does (see `policy_thread`).
    policy = policy_thread().submit(_load_policy, args).result()
    obs = example_observation(policy.metadata, seed=0)

    def time_in_process() -> list[float]:
        for _ in range(2):  # warm caches / lazy init before timing
            policy.infer(obs)
        times = []
        for _ in range(args.in_process_iters):
            t0 = time.perf_counter()
            policy.infer(obs)
            times.append((time.perf_counter() - t0) * 1000.0)
        return times

    in_process = policy_thread().submit(time_in_process).result()

    server = PolicyServer(policy, "127.0.0.1", 0, max_batch=args.max_batch, batch_timeout_ms=args.batch_timeout_ms)
    server.start()
    results = []
    hostile: dict[str, Any] = {}
    try:
        if args.bystander:
            hostile["bystander"] = serve_hostile.bystander(server.port, server.metadata, args.requests, args.warmup)
        if args.unique_prompts:
            hostile["unique_prompts"] = serve_hostile.unique_prompts(
                server.port, server.metadata, args.unique_prompts, policy
            )
        if args.fuzz:
            expected = _in_process_actions(policy)
            hostile["fuzz"] = serve_hostile.fuzz(
                server.port, server.metadata, args.fuzz, server.metadata["server"]["max_message_bytes"], expected
            )
            hostile["fuzz"]["server_stats"] = server.stats()
        for n in client_counts if not hostile else []:
            before = server.stats()["batch_sizes"]
            row = _run_clients(server.port, n, args, server.metadata)
            after = server.stats()["batch_sizes"]
            sizes = {k: after.get(k, 0) - before.get(k, 0) for k in after}
            batches = sum(sizes.values())
            row["mean_batch_size"] = sum(k * v for k, v in sizes.items()) / batches if batches else float("nan")
            row["max_batch_size"] = max((k for k, v in sizes.items() if v), default=0)
            results.append(row)
    finally:
        server.stop()

    in_p50 = _percentile(in_process, 50)
    return {
        "bench": "serve",
        "checkpoint": None if args.fake else args.checkpoint,
        "policy": policy.metadata.get("checkpoint"),
        "fake": (
            {"latency_ms": args.fake_latency_ms, "per_item_ms": args.fake_per_item_ms, "image_size": args.image_size}
            if args.fake
            else False
        ),
        "mode": args.mode,
        "server": {"max_batch": args.max_batch, "batch_timeout_ms": args.batch_timeout_ms, "transport": "ws loopback"},
        "observation_bytes": len(packb(obs)),
        "action_shape": policy.metadata.get("action_shape"),
        "requests_per_client": args.requests,
        "in_process": {"infer_p50_ms": in_p50, "infer_p99_ms": _percentile(in_process, 99), "n": len(in_process)},
        "wire_overhead_p50_ms": (results[0]["p50_ms"] - in_p50) if results and results[0]["clients"] == 1 else None,
        "results": results,
        **hostile,
        "machine": _machine(),
    }


def _in_process_actions(policy: Policy) -> Any:
    """obs -> the policy's actions computed in process, on the policy thread (what a served reply must equal)."""
    return lambda obs: policy_thread().submit(policy.infer, obs).result()["actions"]


def _table(report: dict[str, Any]) -> str:
    lines = [
        f"policy: {report['policy']}  mode: {report['mode']}  observation: {report['observation_bytes']} bytes",
        f"in-process policy.infer p50 {report['in_process']['infer_p50_ms']:.2f} ms",
        f"{'clients':>7} {'p50 ms':>9} {'p99 ms':>9} {'req/s':>9} {'batch':>6} {'errors':>6}",
    ]
    for name in ("bystander", "unique_prompts", "fuzz"):
        if name in report:
            lines.append(f"{name}: {json.dumps(report[name])}")
    for row in report["results"]:
        lines.append(
            f"{row['clients']:>7} {row['p50_ms']:>9.2f} {row['p99_ms']:>9.2f} {row['throughput_rps']:>9.1f} "
            f"{row['mean_batch_size']:>6.2f} {row['errors']:>6}"
        )
    machine = report["machine"]
    lines.append(f"machine: {machine['cpu_count']} CPUs, torch threads {machine['torch_threads']}")
    return "\n".join(lines)


def cli(argv: list[str], prog: str = "fastwam bench serve") -> int:
    import tyro

    args = tyro.cli(BenchServeArgs, args=argv, prog=prog)
    report = run(args)
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(_table(report))
    failed = any(row["errors"] for row in report["results"]) or report.get("fuzz", {}).get("wrong_answers", 0)
    return 1 if failed else 0
