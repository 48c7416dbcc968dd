"""`fastwam serve`: an openpi-compatible websocket policy server with micro-batching across connections.

One asyncio event loop owns every connection; it decodes and validates requests (cheap: sizes are bounded by the
metadata's limits before any pixel is touched) and never runs the policy. Valid observations go to the
`MicroBatcher` (`batching.py`), which runs them in batches on the process-wide policy thread, so the loop keeps
answering pings, health checks and other clients while the model runs.

Failure isolation: a bad request only ever closes its own connection (text error with its reason, then close 1011,
as openpi does); a failing batch is retried one by one so only the culprit gets the error; a client that disconnects
while queued or in flight is skipped or its reply dropped. See `protocol.py` for the wire format and `serve_cli.py`
for the command line.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import http
import inspect
import logging
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, Literal

import websockets
from websockets.asyncio.server import Request, Response, ServerConnection, serve
from websockets.frames import CloseCode

from fastwam.serving.batching import MicroBatcher, ShuttingDown, policy_thread
from fastwam.serving.msgpack_numpy import MsgpackNumpyError, packb, unpackb
from fastwam.serving.protocol import (
    ACK_KEY,
    RESET_MESSAGE,
    Control,
    Policy,
    ProtocolError,
    describe_error,
    parse_observation_spec,
    parse_request,
)

__all__ = ["PolicyServer", "ServeArgs", "policy_thread"]

logger = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE_BYTES = 16 * 2**20  # two 224x224x3 uint8 images are ~0.3 MB; 16 MB leaves room for big cameras


class PolicyServer:
    """Serve `policy` (see `protocol.Policy`) over the openpi websocket protocol.

    `port=0` binds an ephemeral port (read `.port` after `start()`). `sock`: an already bound (not yet listening)
    socket to serve on instead of host / port (`fastwam serve` binds before loading, so a taken port fails fast).
    Use `serve_forever()` in the main thread, or `start()` / `stop()` (or `with PolicyServer(...) as server:`) to
    run it on a background thread (tests, benches).
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
        sock: socket.socket | None = None,
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
        self._sock = sock
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
        self._can_chunk_in_real_time = _accepts_kwarg(policy.infer_batch, "prev_chunks")
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
        self._batcher = MicroBatcher(
            policy,
            max_batch=self._max_batch,
            batch_timeout_s=self._batch_timeout_s,
            open_connections=self._open_connections,
            on_batch=self._count_batch,
        )
        # Created inside the serving loop (asyncio objects bind to it).
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
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
        snapshot["pending"] = len(self._batcher)
        return snapshot

    def _count(self, key: str, n: int = 1) -> None:
        with self._stats_lock:
            self._stats[key] += n

    def _count_batch(self, size: int) -> None:
        with self._stats_lock:
            self._stats["batches"] += 1
            self._stats["batch_sizes"][size] += 1

    def _open_connections(self) -> int:
        with self._stats_lock:
            return self._stats["connections_open"]

    async def _main(self, on_ready: Callable[[], None] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        worker = self._batcher.start()
        where: dict[str, Any] = {"host": self._host, "port": self._port} if self._sock is None else {"sock": self._sock}
        try:
            async with serve(
                self._handler,
                **where,
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
                self._batcher.fail_pending()
        finally:
            worker.cancel()
            self._batcher.fail_pending()
            self._bound = None
            logger.info("server stopped")

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
                except ShuttingDown:
                    await self._fail(ws, peer, "error: server is shutting down", CloseCode.GOING_AWAY)
                    return
                except ValueError as exc:  # the policy's own input check (protocol: ValueError = bad input)
                    await self._fail(ws, peer, f"error: the policy rejected the observation: {describe_error(exc)}")
                    return
                except Exception as exc:
                    # Server / policy bug: the traceback goes to the log only (it holds the server's file paths);
                    # the client gets the exception's type and message.
                    logger.error("client %s: internal error", peer, exc_info=exc)
                    await self._fail(
                        ws, peer, f"error: internal server error ({describe_error(exc)}); the server log has details"
                    )
                    return
                await ws.send(reply)
                self._count("replies")
                prev_total_ms = (time.perf_counter() - received_at) * 1000.0
        except websockets.ConnectionClosed:
            logger.info("client %s went away mid-request; reply dropped", peer)
        finally:
            with self._stats_lock:
                self._stats["connections_open"] -= 1
            self._batcher.nudge()
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
        if isinstance(request, Control):
            if request.kind == "reset":
                await self._batcher.reset()
                self._count("resets")
            return packb({ACK_KEY: request.kind})

        if request.return_video and not self._can_return_video:
            raise ProtocolError("this policy cannot return imagined video (its infer_batch takes no return_video)")
        realtime = None
        if request.prev_chunk is not None:
            if not self._can_chunk_in_real_time:
                raise ProtocolError("this policy does not take prev_chunk / inference_delay (no real-time chunking)")
            check = getattr(self._policy, "check_realtime", None)
            if check is not None:  # shape / finiteness against the model, before the request joins a batch
                try:
                    check(request.prev_chunk, request.inference_delay)
                except ValueError as e:
                    raise ProtocolError(str(e)) from None
            realtime = (request.prev_chunk, request.inference_delay)
        done = await self._batcher.submit(request.observation, request.mode, request.return_video, received_at,
                                          realtime)

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
    """checked (bound) before the checkpoint is loaded: a taken port fails at once"""
    mode: str = "fast"
    """default inference mode (fast / joint / idm); a request may override it with a "mode" key"""
    steps: int = 0
    """denoising steps per chunk; 0 = the checkpoint's (a distilled run's is the step count it was made for)"""
    rtc_method: Literal["auto", "guidance", "prefix"] = "auto"
    """how requests with prev_chunk are continued: guidance, prefix (a checkpoint trained with action_prefix_max) or
    auto (prefix when the checkpoint was trained for it)"""
    dtype: str = "auto"
    """model precision: auto = bf16 on CUDA, fp32 on CPU; or fp32 / bf16 / fp16"""
    seed: int = 0
    """seed of the sampling noise, the same for every request (42 reproduces the official LIBERO evaluation)"""
    threads: int = 0
    """torch CPU threads for inference; 0 = auto: half the usable cores on a CPU-only machine (at least 1; the event
    loop and other work need the rest), torch's default with CUDA"""
    compile: bool = False
    """torch.compile the inference stages (CUDA graphs on GPU); batch sizes 1..max_batch are run once at start-up"""
    max_batch: int = 8
    """most requests (from any connections) run in one policy.infer_batch call"""
    batch_timeout_ms: float = 2.0
    """how long a lone request waits for others to join its batch"""
    max_message_mb: float = 16.0
    """larger messages are refused (websocket close 1009)"""
    max_image_side: int = 0
    """largest camera image side accepted (advertised as max_shape); 0 = 4x the model's input side, at least 256"""
    max_prompt_chars: int = 1024
    """longest prompt accepted (advertised as max_length)"""
    fake: bool = False
    """serve `fastwam.serving.testing.ZeroPolicy` (all-zero actions) instead of a checkpoint: wire testing"""
    log_level: str = "INFO"
