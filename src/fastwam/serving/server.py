"""`fastwam serve`: an openpi-compatible websocket policy server with micro-batching across connections.

One asyncio event loop owns every connection; it decodes and validates requests (cheap) and never runs the policy.
Valid observations go into a shared queue; a batch worker takes up to `max_batch` of them (waiting at most
`batch_timeout_ms` for company when the queue is short) and runs `policy.infer_batch` on a single dedicated thread,
so the loop keeps answering pings, health checks and other clients while the model runs, and the policy is never
called concurrently (reset included). While a batch runs, new requests pile up and form the next batch, so under load
batches grow on their own and the timeout only costs latency when the server is nearly idle.

Failure isolation: a bad request only ever closes its own connection (text error, then close 1011, as openpi does);
if `infer_batch` raises, every request of that batch is retried alone so only the culprit gets the error; a client
that disconnects while queued or in flight is skipped or its reply dropped. See `protocol.py` for the wire format.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import http
import inspect
import logging
import signal
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import websockets
from websockets.asyncio.server import Request, Response, ServerConnection, serve
from websockets.frames import CloseCode

from fastwam.serving.msgpack_numpy import MsgpackNumpyError, packb, unpackb
from fastwam.serving.protocol import (
    ACK_KEY,
    RESET_MESSAGE,
    Control,
    Policy,
    ProtocolError,
    parse_observation_spec,
    parse_request,
)

__all__ = ["PolicyServer", "cli", "policy_thread"]

logger = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE_BYTES = 16 * 2**20  # two 224x224x3 uint8 images are ~0.3 MB; 16 MB leaves room for big cameras


_POLICY_THREAD: concurrent.futures.ThreadPoolExecutor | None = None
_POLICY_THREAD_LOCK = threading.Lock()


def policy_thread() -> concurrent.futures.ThreadPoolExecutor:
    """The process-wide single thread that loads and runs policies; load a policy with `policy_thread().submit(...)`.

    Why one thread for loading and inference: torch's CPU ops use OpenMP, whose thread team belongs to the calling OS
    thread. A policy loaded (or warmed up) on the main thread and then run on another starts a second team; with more
    OpenMP threads than cores libgomp stops spin-waiting and every small op pays a futex wake-up. Measured on the
    2-core VM: `small_cpu` fast inference 39 ms on the loading thread vs 81 ms on a fresh one. Keeping all torch work
    on one thread avoids it (and keeps the policy single-threaded, which the server needs anyway).
    """
    global _POLICY_THREAD
    with _POLICY_THREAD_LOCK:
        if _POLICY_THREAD is None:
            _POLICY_THREAD = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastwam-policy")
        return _POLICY_THREAD


class _ShuttingDown(Exception):
    pass


@dataclasses.dataclass
class _Pending:
    observation: dict
    mode: str | None
    return_video: bool
    future: asyncio.Future
    received_at: float  # perf_counter() when the message arrived


@dataclasses.dataclass
class _Done:
    result: dict
    infer_ms: float
    queue_ms: float
    batch_size: int


class PolicyServer:
    """Serve `policy` (see `protocol.Policy`) over the openpi websocket protocol.

    `port=0` binds an ephemeral port (read `.port` after `start()`). Use `serve_forever()` in the main thread, or
    `start()` / `stop()` (or `with PolicyServer(...) as server:`) to run it on a background thread (tests, benches).
    """

    def __init__(
        self,
        policy: Policy,
        host: str = "0.0.0.0",
        port: int = 8000,
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_batch: int = 8,
        batch_timeout_ms: float = 2.0,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if batch_timeout_ms < 0:
            raise ValueError(f"batch_timeout_ms must be >= 0, got {batch_timeout_ms}")
        if max_message_bytes < 1024:
            raise ValueError(f"max_message_bytes must be >= 1024, got {max_message_bytes}")
        self._policy = policy
        self._host = host
        self._port = port
        self._max_message_bytes = int(max_message_bytes)
        self._max_batch = int(max_batch)
        self._batch_timeout_s = batch_timeout_ms / 1000.0
        # Validate the policy's metadata now: a malformed spec is a startup error, not a per-request surprise.
        self._specs = parse_observation_spec(policy.metadata)
        modes = policy.metadata.get("modes")
        self._modes = (
            list(modes) if isinstance(modes, (list, tuple)) and all(isinstance(m, str) for m in modes) else None
        )
        self._can_return_video = _accepts_kwarg(policy.infer_batch, "return_video")
        self.metadata: dict[str, Any] = {
            **policy.metadata,
            "server": {
                "protocol": "openpi-websocket",
                "max_message_bytes": self._max_message_bytes,
                "max_batch": self._max_batch,
                "reset_message": RESET_MESSAGE,
            },
        }
        try:
            self._metadata_bytes = packb(self.metadata)
        except MsgpackNumpyError as exc:
            raise ValueError(f"policy.metadata cannot be sent to clients: {exc}") from exc

        self._pending: collections.deque[_Pending] = collections.deque()
        self._stats_lock = threading.Lock()
        self._stats: dict[str, Any] = {
            "connections_total": 0,
            "connections_open": 0,
            "requests": 0,
            "replies": 0,
            "resets": 0,
            "errors": 0,
            "batches": 0,
            "batch_sizes": collections.Counter(),
        }
        # Created inside the serving loop (asyncio objects bind to it).
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._wakeup: asyncio.Event | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._bound: tuple[str, int] | None = None
        self._thread: threading.Thread | None = None
        self._thread_error: BaseException | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def port(self) -> int:
        if self._bound is None:
            raise RuntimeError("server is not running; call start() or serve_forever() first")
        return self._bound[1]

    @property
    def host(self) -> str:
        return self._host

    def serve_forever(self) -> None:
        """Block serving until Ctrl-C / SIGTERM."""

        async def main() -> None:
            def install_signals() -> None:
                loop = asyncio.get_running_loop()
                assert self._stop_event is not None
                try:
                    loop.add_signal_handler(signal.SIGTERM, self._stop_event.set)
                except (NotImplementedError, RuntimeError):  # not the main thread / platform without signals
                    pass

            await self._main(on_ready=install_signals)

        try:
            asyncio.run(main())
        except KeyboardInterrupt:
            logger.info("interrupted")

    def start(self, timeout_s: float = 30.0) -> PolicyServer:
        """Run the server on a daemon thread; returns once it listens (so `.port` is valid)."""
        if self._thread is not None:
            raise RuntimeError("server already started")
        ready = threading.Event()

        def target() -> None:
            try:
                asyncio.run(self._main(on_ready=ready.set))
            except BaseException as exc:  # surfaced to start() / logged; a dying thread must not be silent
                self._thread_error = exc
                logger.exception("server thread failed")
            finally:
                ready.set()

        self._thread = threading.Thread(target=target, name="fastwam-server", daemon=True)
        self._thread.start()
        if not ready.wait(timeout_s):
            raise TimeoutError(f"server did not start listening within {timeout_s} s")
        if self._bound is None:
            raise RuntimeError(f"server failed to start on {self._host}:{self._port}: {self._thread_error!r}")
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop a server started with `start()` (closes connections with 1001 and fails queued requests)."""
        loop, stop_event = self._loop, self._stop_event
        if loop is not None and stop_event is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(stop_event.set)
            except RuntimeError:  # loop closed between the check and the call
                pass
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                logger.warning("server thread did not stop within %.1f s", timeout_s)
            self._thread = None

    def __enter__(self) -> PolicyServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stats(self) -> dict[str, Any]:
        """A snapshot of counters (thread-safe): requests, replies, errors, resets, batches, batch_sizes, pending."""
        with self._stats_lock:
            snapshot = dict(self._stats)
            snapshot["batch_sizes"] = dict(sorted(self._stats["batch_sizes"].items()))
        snapshot["pending"] = len(self._pending)
        return snapshot

    def _count(self, key: str, n: int = 1) -> None:
        with self._stats_lock:
            self._stats[key] += n

    async def _main(self, on_ready: Callable[[], None] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        self._wakeup = asyncio.Event()
        # One thread: the policy is never re-entered, and reset() is ordered with inference. It is the process-wide
        # policy thread (see `policy_thread`), shared with whoever loaded the policy, so it is never shut down here.
        self._executor = policy_thread()
        worker = asyncio.create_task(self._batch_worker(), name="fastwam-batcher")
        try:
            async with serve(
                self._handler,
                self._host,
                self._port,
                max_size=self._max_message_bytes,
                # Clients send one request and wait; a small receive queue bounds what a pipelining (or hostile)
                # client can park in memory to a few max_size messages per connection (default: 16).
                max_queue=4,
                compression=None,  # images are incompressible-ish and deflate costs CPU on both sides (openpi: None)
                process_request=self._process_request,
            ) as server:
                sockname = server.sockets[0].getsockname()
                self._bound = (sockname[0], sockname[1])
                logger.info(
                    "serving on ws://%s:%d (max_batch=%d, batch_timeout_ms=%.1f, max_message_bytes=%d)",
                    self._host,
                    self._bound[1],
                    self._max_batch,
                    self._batch_timeout_s * 1000,
                    self._max_message_bytes,
                )
                if on_ready is not None:
                    on_ready()
                await self._stop_event.wait()
                # Fail queued / in-flight requests first so their handlers return and closing does not wait on them.
                worker.cancel()
                await asyncio.gather(worker, return_exceptions=True)
                self._fail_pending()
        finally:
            worker.cancel()
            self._fail_pending()
            self._bound = None
            logger.info("server stopped")

    def _fail_pending(self) -> None:
        while self._pending:
            item = self._pending.popleft()
            if not item.future.done():
                item.future.set_exception(_ShuttingDown())

    # ------------------------------------------------------------------ HTTP + connections

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        # Plain HTTP health check for load balancers / scripts; everything else continues to the websocket handshake.
        if request.path.split("?", 1)[0] == "/healthz":
            return connection.respond(http.HTTPStatus.OK, "OK\n")
        return None

    async def _handler(self, ws: ServerConnection) -> None:
        peer = _peer(ws)
        with self._stats_lock:
            self._stats["connections_total"] += 1
            self._stats["connections_open"] += 1
        logger.info("client %s connected", peer)
        prev_total_ms: float | None = None
        try:
            await ws.send(self._metadata_bytes)
            while True:
                try:
                    message = await ws.recv()
                except websockets.ConnectionClosed as exc:
                    if exc.sent is not None and exc.sent.code == CloseCode.MESSAGE_TOO_BIG:
                        self._count("errors")
                        logger.warning("client %s: message too big: %s; closed 1009", peer, exc.sent.reason)
                    return
                received_at = time.perf_counter()
                self._count("requests")
                try:
                    reply = await self._answer(message, received_at, prev_total_ms)
                except (ProtocolError, MsgpackNumpyError) as exc:
                    await self._fail(ws, peer, f"error: invalid request: {exc}")
                    return
                except _ShuttingDown:
                    await self._fail(ws, peer, "error: server is shutting down", CloseCode.GOING_AWAY)
                    return
                except ValueError as exc:  # the policy's own input check (protocol: ValueError = bad input)
                    await self._fail(ws, peer, f"error: the policy rejected the observation: {exc}")
                    return
                except Exception as exc:
                    # Server / policy bug: log it with context and, like openpi, hand the traceback to the client.
                    logger.error("client %s: internal error", peer, exc_info=exc)
                    tb = "".join(traceback.format_exception(exc))
                    await self._fail(ws, peer, f"error: internal server error: {type(exc).__name__}: {exc}\n{tb}")
                    return
                await ws.send(reply)
                self._count("replies")
                prev_total_ms = (time.perf_counter() - received_at) * 1000.0
        except websockets.ConnectionClosed:
            logger.info("client %s went away mid-request; reply dropped", peer)
        finally:
            with self._stats_lock:
                self._stats["connections_open"] -= 1
            if self._wakeup is not None:  # one fewer possible batch-mate: let a waiting batch go now
                self._wakeup.set()
            logger.info("client %s disconnected", peer)

    async def _fail(self, ws: ServerConnection, peer: str, text: str, code: int = CloseCode.INTERNAL_ERROR) -> None:
        """openpi's error convention: the message as a text frame, then close (1011 by default)."""
        self._count("errors")
        logger.warning("client %s: %s", peer, text.splitlines()[0])
        try:
            await ws.send(text)
            await ws.close(code=code, reason="request failed; see the previous text message")
        except websockets.ConnectionClosed:
            pass

    async def _answer(self, message: str | bytes, received_at: float, prev_total_ms: float | None) -> bytes:
        """Decode, validate and answer one message; returns the packed reply. Raises on any bad request."""
        if isinstance(message, str):
            raise ProtocolError(
                f"expected a binary msgpack frame, got a text frame ({len(message)} characters); "
                "pack requests with msgpack_numpy.packb"
            )
        decoded = unpackb(message)
        request = parse_request(decoded, self._specs, self._modes)
        loop = asyncio.get_running_loop()
        if isinstance(request, Control):
            if request.kind == "reset":
                assert self._executor is not None
                await loop.run_in_executor(self._executor, self._policy.reset)
                self._count("resets")
            return packb({ACK_KEY: request.kind})

        if request.return_video and not self._can_return_video:
            raise ProtocolError("this policy cannot return imagined video (its infer_batch takes no return_video)")
        future: asyncio.Future[_Done] = loop.create_future()
        self._pending.append(_Pending(request.observation, request.mode, request.return_video, future, received_at))
        assert self._wakeup is not None
        self._wakeup.set()
        done = await future

        reply = dict(done.result)
        if not isinstance(reply.get("policy_timing"), dict):
            reply["policy_timing"] = {"infer_ms": done.infer_ms}
        server_timing: dict[str, float | int] = {
            "infer_ms": done.infer_ms,
            "queue_ms": done.queue_ms,
            "batch_size": done.batch_size,
        }
        if prev_total_ms is not None:
            server_timing["prev_total_ms"] = prev_total_ms
        server_timing["total_ms"] = (time.perf_counter() - received_at) * 1000.0
        reply["server_timing"] = server_timing
        try:
            return packb(reply)
        except MsgpackNumpyError as exc:
            raise RuntimeError(f"the policy's reply cannot be encoded ({sorted(reply)}): {exc}") from exc

    # ------------------------------------------------------------------ batching

    async def _batch_worker(self) -> None:
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        while True:
            while not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
            if self._batch_timeout_s > 0 and self._could_grow():
                # Give requests that are on their way a moment to join; stops early once the batch is full or every
                # connected client is already waiting (then nobody else can join, e.g. a lone client pays nothing).
                deadline = loop.time() + self._batch_timeout_s
                while self._could_grow():
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    self._wakeup.clear()
                    try:
                        await asyncio.wait_for(self._wakeup.wait(), remaining)
                    except TimeoutError:
                        break
            batch = self._take_batch()
            if batch:
                await self._run_batch(batch)

    def _could_grow(self) -> bool:
        # Between batches every live queued request belongs to a distinct waiting connection, so open connections
        # beyond the queue length are the only possible joiners.
        with self._stats_lock:
            open_connections = self._stats["connections_open"]
        return len(self._pending) < min(self._max_batch, open_connections)

    def _take_batch(self) -> list[_Pending]:
        """Up to max_batch live requests sharing the first one's mode and return_video (one infer_batch call has
        one of each)."""
        batch: list[_Pending] = []
        later: list[_Pending] = []
        while self._pending and len(batch) < self._max_batch:
            item = self._pending.popleft()
            if item.future.done():  # its handler is gone (server stopping); nobody is waiting for it
                continue
            if batch and (item.mode, item.return_video) != (batch[0].mode, batch[0].return_video):
                later.append(item)
                continue
            batch.append(item)
        self._pending.extendleft(reversed(later))  # keep arrival order for the next round
        return batch

    async def _run_batch(self, batch: list[_Pending]) -> None:
        assert self._executor is not None
        loop = asyncio.get_running_loop()
        mode, return_video = batch[0].mode, batch[0].return_video
        started = time.perf_counter()
        try:
            results = await loop.run_in_executor(
                self._executor, self._infer_batch, [item.observation for item in batch], mode, return_video
            )
        except asyncio.CancelledError:
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(_ShuttingDown())
            raise
        except Exception as exc:
            if len(batch) > 1:
                # One bad observation must not fail its batch-mates: retry each alone so only the culprit errors.
                logger.info("batch of %d failed (%s: %s); retrying one by one", len(batch), type(exc).__name__, exc)
                for item in batch:
                    if not item.future.done():
                        await self._run_batch([item])
                return
            if not batch[0].future.done():
                batch[0].future.set_exception(exc)
            return
        infer_ms = (time.perf_counter() - started) * 1000.0
        with self._stats_lock:
            self._stats["batches"] += 1
            self._stats["batch_sizes"][len(batch)] += 1
        for item, result in zip(batch, results, strict=True):
            if not item.future.done():  # a cancelled handler (shutdown) leaves a done future; just drop the result
                item.future.set_result(_Done(result, infer_ms, (started - item.received_at) * 1000.0, len(batch)))

    def _infer_batch(self, observations: list[dict], mode: str | None, return_video: bool) -> list[dict]:
        """Runs on the policy thread."""
        # return_video only when asked, so policies without that keyword work unchanged.
        extra = {"return_video": True} if return_video else {}
        results = self._policy.infer_batch(observations, mode=mode, **extra)
        if not isinstance(results, (list, tuple)) or len(results) != len(observations):
            raise RuntimeError(
                f"policy.infer_batch returned {type(results).__name__} of length "
                f"{len(results) if hasattr(results, '__len__') else '?'} for {len(observations)} observations"
            )
        for result in results:
            if not isinstance(result, dict) or "actions" not in result:
                raise RuntimeError(f"policy.infer_batch must return dicts with 'actions', got {type(result).__name__}")
        return list(results)


def _accepts_kwarg(func: Callable[..., Any], name: str) -> bool:
    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _peer(ws: ServerConnection) -> str:
    addr = ws.remote_address
    if isinstance(addr, tuple) and len(addr) >= 2:
        return f"{addr[0]}:{addr[1]}"
    return str(addr)


# ---------------------------------------------------------------------- CLI


@dataclasses.dataclass
class ServeArgs:
    """Serve a checkpoint over the openpi websocket protocol (msgpack-numpy, GET /healthz, errors as text + 1011)."""

    checkpoint: str | None = None
    """run or checkpoint directory for `FastWAMPolicy.from_pretrained` (required unless --fake)"""
    host: str = "0.0.0.0"
    port: int = 8000
    mode: str = "fast"
    """default inference mode (fast / joint / idm); a request may override it with a "mode" key"""
    dtype: str = "auto"
    """model precision: auto = bf16 on CUDA, fp32 on CPU; or fp32 / bf16 / fp16"""
    compile: bool = False
    """torch.compile the inference stages (CUDA graphs on GPU); batch sizes 1..max_batch are run once at start-up"""
    max_batch: int = 8
    """most requests (from any connections) run in one policy.infer_batch call"""
    batch_timeout_ms: float = 2.0
    """how long a lone request waits for others to join its batch"""
    max_message_mb: float = 16.0
    """larger messages are refused (websocket close 1009)"""
    fake: bool = False
    """serve `fastwam.serving.testing.ZeroPolicy` (all-zero actions) instead of a checkpoint: wire testing"""
    log_level: str = "INFO"


def cli(argv: list[str], prog: str = "fastwam serve") -> int:
    import tyro

    args = tyro.cli(ServeArgs, args=argv, prog=prog)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if logging.getLogger().level > logging.DEBUG:
        # Our handler already logs connects / disconnects / errors with more context than websockets' own INFO lines.
        logging.getLogger("websockets").setLevel(logging.WARNING)
    if args.fake:
        from fastwam.serving.testing import ZeroPolicy

        policy: Policy = ZeroPolicy(mode=args.mode)
    elif args.checkpoint is None:
        print(f"{prog}: --checkpoint DIR is required (or --fake to serve an all-zero test policy)")
        return 2
    else:
        from fastwam.policy import FastWAMPolicy  # heavy (torch, model); only this command needs it

        logger.info("loading %s (mode=%s)", args.checkpoint, args.mode)
        policy = policy_thread().submit(
            FastWAMPolicy.from_pretrained, args.checkpoint, mode=args.mode, dtype=args.dtype, compile=args.compile
        ).result()
        if args.compile:
            logger.info("compiling for batch sizes 1..%d (slow, once)", args.max_batch)
            policy_thread().submit(policy.warmup, range(1, args.max_batch + 1)).result()
    server = PolicyServer(
        policy,
        args.host,
        args.port,
        max_message_bytes=int(args.max_message_mb * 2**20),
        max_batch=args.max_batch,
        batch_timeout_ms=args.batch_timeout_ms,
    )
    server.serve_forever()
    return 0
