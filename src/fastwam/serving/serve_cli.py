"""The `fastwam serve` command line: bind the port, set torch's threads, load (and check) a policy, serve it.

Order matters: the port is bound first, so a port that is already taken fails in a second, not after minutes of
loading and `--compile`; the bound socket starts listening only when the server is ready, so until then clients are
refused (and `WebsocketClient` retries) rather than left hanging in a handshake.
"""

from __future__ import annotations

import logging
import os
import socket

from fastwam.serving.batching import policy_thread
from fastwam.serving.protocol import Policy
from fastwam.serving.server import PolicyServer, ServeArgs

__all__ = ["PortUnavailable", "bind_socket", "default_threads", "main", "set_threads"]

logger = logging.getLogger("fastwam.serving.server")


class PortUnavailable(ValueError):
    """The port cannot be bound (taken, or not allowed); the message says which and what to do."""


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port but not listening yet (see the module docstring)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        raise PortUnavailable(f"--host {host!r} cannot be resolved ({exc.strerror}); use an address such as 0.0.0.0") \
            from None
    sock = socket.socket(family, kind, proto)
    # As asyncio does: restart right after a stop (TIME_WAIT). Linux still refuses a port another socket listens on.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise PortUnavailable(
            f"cannot listen on {host}:{port} ({exc.strerror or exc}); another server probably holds the port: "
            "stop it or pick another --port"
        ) from None
    return sock


def default_threads(cuda: bool) -> int | None:
    """Threads for `--threads 0`: half the usable cores on CPU (measured on the busy 2-core VM: p99 254 ms with
    torch's default 2 threads vs 72 ms with 1), None (torch's default) with CUDA, where the GPU does the work."""
    if cuda:
        return None
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, usable // 2)


def set_threads(requested: int) -> int:
    """Apply `--threads` (0 = `default_threads`) on the policy thread; returns the count now in effect. Call it from
    any thread but the policy thread itself (it waits for that thread)."""
    import torch

    n = requested or default_threads(torch.cuda.is_available())
    if n:
        # On the policy thread: OpenMP's thread team belongs to the thread that runs the ops (see `policy_thread`).
        policy_thread().submit(torch.set_num_threads, n).result()
    return policy_thread().submit(torch.get_num_threads).result()


def _load_policy(args: ServeArgs) -> Policy:
    from fastwam.policy import FastWAMPolicy  # heavy (torch, model); only this command needs it

    threads = set_threads(args.threads)
    logger.info("loading %s (mode=%s, %d torch thread(s))", args.checkpoint, args.mode, threads)
    policy = policy_thread().submit(
        FastWAMPolicy.from_pretrained, args.checkpoint, mode=args.mode, dtype=args.dtype, compile=args.compile,
        seed=args.seed, steps=args.steps or None, rtc_method=None if args.rtc_method == "auto" else args.rtc_method,
        max_image_side=args.max_image_side, max_prompt_chars=args.max_prompt_chars,
    ).result()
    meta = policy.metadata
    logger.info("loaded %s (step %s, sha256 %s)", meta["checkpoint"], meta["checkpoint_step"],
                meta["checkpoint_sha256"])
    if args.compile:
        logger.info("compiling for batch sizes 1..%d (slow, once)", args.max_batch)
        policy_thread().submit(policy.warmup, range(1, args.max_batch + 1)).result()
    return policy


def main(argv: list[str], prog: str = "fastwam serve") -> int:
    import tyro

    args = tyro.cli(ServeArgs, args=argv, prog=prog)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if logging.getLogger().level > logging.DEBUG:
        # Our handler already logs connects / disconnects / errors with more context than websockets' own INFO lines.
        logging.getLogger("websockets").setLevel(logging.WARNING)
    if not args.fake and args.checkpoint is None:
        raise ValueError("--checkpoint DIR is required (or --fake to serve an all-zero test policy)")
    sock = bind_socket(args.host, args.port)  # before anything slow
    try:
        if args.fake:
            from fastwam.serving.testing import ZeroPolicy

            policy: Policy = ZeroPolicy(mode=args.mode)
        else:
            policy = _load_policy(args)
        server = PolicyServer(
            policy,
            args.host,
            args.port,
            max_message_bytes=int(args.max_message_mb * 2**20),
            max_batch=args.max_batch,
            batch_timeout_ms=args.batch_timeout_ms,
            sock=sock,
        )
    except BaseException:
        sock.close()
        raise
    server.serve_forever()
    return 0
