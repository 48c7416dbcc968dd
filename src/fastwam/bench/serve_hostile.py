"""`fastwam bench serve --bystander / --unique-prompts N / --fuzz N`: what hostile clients cost everyone else.

- bystander: one client's latency (closed loop, the policy's preferred image size) alone, next to a neighbour that
  sends preferred-size observations back to back, and next to one that sends the largest images and prompt the
  metadata allows. The neighbour's message is packed once and runs in this process (a thread sharing the GIL with
  the server: a worse case than a separate client machine).
- unique_prompts: N requests, each with a new prompt of the largest allowed length; the process's RSS is sampled
  throughout (the text-embedding cache must stay bounded).
- fuzz: N hostile messages (`fastwam.serving.fuzz`, the seeded fuzz test's cases) with a bystander checked every 48.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import numpy as np

from fastwam.bench.memory import _rss_bytes
from fastwam.serving.client import WebsocketClient
from fastwam.serving.fuzz import fuzz_cases, run_fuzz
from fastwam.serving.msgpack_numpy import packb, unpackb
from fastwam.serving.protocol import example_observation, parse_observation_spec

__all__ = ["bystander", "fuzz", "largest_observation", "unique_prompts"]


def largest_observation(metadata: dict, seed: int = 1) -> dict:
    """Every bounded field at its declared maximum (`max_shape`, `max_length`), random pixels."""
    rng = np.random.default_rng(seed)
    obs = example_observation(metadata, seed=seed)
    for key, spec in parse_observation_spec(metadata).items():
        if spec.is_str and spec.max_length is not None:
            obs[key] = "".join(rng.choice(list("abcdefgh "), size=spec.max_length))
        elif spec.max_shape is not None:
            obs[key] = rng.integers(0, 256, size=spec.max_shape, dtype=np.uint8).astype(spec.dtype)
    return obs


def _stats(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    return {"n": len(values), "p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)),
            "mean_ms": float(a.mean())}


def _time_bystander(port: int, obs: dict, requests: int, warmup: int) -> list[float]:
    with WebsocketClient("127.0.0.1", port, recv_timeout_s=600) as client:
        for _ in range(warmup):
            client.infer(obs)
        times = []
        for _ in range(requests):
            t0 = time.perf_counter()
            client.infer(obs)
            times.append((time.perf_counter() - t0) * 1000.0)
    return times


def _neighbour(port: int, message: bytes, stop: threading.Event, out: dict[str, Any]) -> None:
    """Send `message` back to back until `stop`; records its own latencies and any error."""
    times: list[float] = []
    try:
        with WebsocketClient("127.0.0.1", port, recv_timeout_s=600) as client:
            while not stop.is_set():
                t0 = time.perf_counter()
                client._ws.send(message)  # pre-packed: the neighbour's own packing must not load the machine
                reply = client._ws.recv(timeout=600)
                times.append((time.perf_counter() - t0) * 1000.0)
                if isinstance(reply, str):
                    raise RuntimeError(reply)
                unpackb(reply)
    except Exception as exc:  # reported in the JSON
        out["error"] = f"{type(exc).__name__}: {exc}"
    out["latency"] = _stats(times) if times else None


def bystander(port: int, metadata: dict, requests: int, warmup: int) -> dict[str, Any]:
    obs = example_observation(metadata, seed=0)
    phases: dict[str, Any] = {"alone": {"bystander": _stats(_time_bystander(port, obs, requests, warmup))}}
    for name, neighbour_obs in (("normal_neighbour", example_observation(metadata, seed=1)),
                                ("largest_neighbour", largest_observation(metadata))):
        message = packb(neighbour_obs)
        stop, out = threading.Event(), {}
        thread = threading.Thread(target=_neighbour, args=(port, message, stop, out), daemon=True)
        thread.start()
        try:
            times = _time_bystander(port, obs, requests, warmup)
        finally:
            stop.set()
            thread.join(600)
        phases[name] = {"bystander": _stats(times), "neighbour": out.get("latency"),
                        "neighbour_message_bytes": len(message), "neighbour_error": out.get("error")}
    alone, normal = phases["alone"]["bystander"], phases["normal_neighbour"]["bystander"]
    largest = phases["largest_neighbour"]["bystander"]
    phases["ratio"] = {f"{stat}_vs_{base}": largest[stat] / ref[stat]
                       for stat in ("p50_ms", "p99_ms") for base, ref in (("alone", alone), ("normal", normal))}
    return phases


def unique_prompts(port: int, metadata: dict, n: int, policy: Any, samples: int = 10) -> dict[str, Any]:
    specs = parse_observation_spec(metadata)
    text_key = next(k for k, s in specs.items() if s.is_str)
    length = specs[text_key].max_length or 1024
    obs = example_observation(metadata, seed=0)
    rss: list[tuple[int, int]] = []
    with WebsocketClient("127.0.0.1", port, recv_timeout_s=600) as client:
        client.infer(obs)
        rss.append((0, _rss_bytes()))
        for i in range(1, n + 1):
            prompt = f"{i:08d} " + "pick up the bowl and place it on the plate " * (length // 43 + 1)
            client.infer({**obs, text_key: prompt[:length]})
            if i % max(1, n // samples) == 0 or i == n:
                rss.append((i, _rss_bytes()))
    values = [b for _, b in rss]
    cache = getattr(policy, "text_cache", None)
    return {"prompts": n, "prompt_chars": length, "rss_mb": [(i, round(b / 2**20, 1)) for i, b in rss],
            "rss_start_mb": values[0] / 2**20, "rss_end_mb": values[-1] / 2**20,
            "rss_growth_mb": (values[-1] - values[0]) / 2**20, "rss_max_growth_mb": (max(values) - values[0]) / 2**20,
            "text_cache": cache.stats() if cache is not None else None}


def fuzz(port: int, metadata: dict, n: int, max_message_bytes: int, expected: Any, seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    server_log = logging.getLogger("fastwam.serving.server")
    level = server_log.level
    server_log.setLevel(logging.ERROR)  # one warning per refused message would be thousands of lines on stderr
    started = time.perf_counter()
    try:
        report = run_fuzz(port, fuzz_cases(rng, n, metadata, max_message_bytes), rng, expected=expected,
                          metadata=metadata, atol=1e-5)  # batched vs single float arithmetic (policy_test: 1e-5)
    finally:
        server_log.setLevel(level)
    report["wall_s"] = time.perf_counter() - started
    return report
