"""A small synchronous client for `fastwam serve` (any openpi-protocol server works too).

    with WebsocketClient("127.0.0.1", 8000) as client:
        obs = example_observation(client.metadata)
        print(client.infer(obs)["actions"])

One client = one connection; it is not thread-safe (use one per thread). The openpi package's
`WebsocketClientPolicy` speaks the same protocol; this one adds connect retries while the server is still loading a
checkpoint, `reset()` that the server really receives, per-request `mode`, and a typed `ServerError`.
"""

from __future__ import annotations

import inspect
import time
from typing import Any

import numpy as np
import websockets
from websockets.sync.client import ClientConnection, connect

from fastwam.serving.msgpack_numpy import Packer, packb, unpackb
from fastwam.serving.protocol import (
    ACK_KEY,
    INFERENCE_DELAY_KEY,
    MODE_KEY,
    PREV_CHUNK_KEY,
    RESET_MESSAGE,
    describe_error,
)

__all__ = ["ServerError", "WebsocketClient"]

# websockets >= 17 deprecates a bare `connect()` unless `legacy=True` says we manage the connection ourselves;
# older versions (>= 13, the floor we support) do not know the flag.
_CONNECT_KWARGS: dict[str, Any] = {"legacy": True} if "legacy" in inspect.signature(connect).parameters else {}


class ServerError(RuntimeError):
    """The server answered with an error (its text names what was wrong) or closed the connection."""


class WebsocketClient:
    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 8000,
        *,
        connect_timeout_s: float = 30.0,
        recv_timeout_s: float | None = None,
    ) -> None:
        """Connect (retrying while the port refuses, up to `connect_timeout_s`: `fastwam serve` refuses connections
        until its checkpoint is loaded; 0 = one attempt) and read the server's metadata."""
        self.uri = host if host.startswith(("ws://", "wss://")) else f"ws://{host}:{port}"
        self._recv_timeout_s = recv_timeout_s
        self._packer = Packer()
        self._ws = self._connect(connect_timeout_s)
        try:
            first = self._ws.recv(timeout=max(connect_timeout_s, 10.0))
        except TimeoutError as exc:
            self._ws.close()
            raise ServerError(f"{self.uri} sent no metadata within {max(connect_timeout_s, 10.0)} s") from exc
        if isinstance(first, str):
            self._ws.close()
            raise ServerError(f"{self.uri} sent text instead of metadata: {first[:200]}")
        self.metadata: dict = unpackb(first)

    def _connect(self, timeout_s: float) -> ClientConnection:
        deadline = time.monotonic() + timeout_s
        delay = 0.05
        while True:
            try:
                # No size limit on replies: the server already bounds what it sends; compression off as in openpi.
                return connect(
                    self.uri, compression=None, max_size=None, open_timeout=max(timeout_s, 1.0), **_CONNECT_KWARGS
                )
            except (ConnectionRefusedError, ConnectionResetError) as exc:  # server still starting / loading
                # (before the OSError clause below: these are OSErrors too, and the only ones worth a retry)
                if time.monotonic() + delay > deadline:
                    waited = f"within {timeout_s} s" if timeout_s > 0 else "(no retries asked for)"
                    raise ServerError(
                        f"could not connect to {self.uri} {waited}: {describe_error(exc)}; is `fastwam serve` "
                        "running on that host and port (it refuses connections until its checkpoint is loaded)?"
                    ) from exc
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
            except (OSError, websockets.exceptions.InvalidHandshake, websockets.exceptions.InvalidURI) as exc:
                raise ServerError(
                    f"could not connect to {self.uri}: {describe_error(exc)}; is it a `fastwam serve` (openpi "
                    "websocket) server?"
                ) from exc

    def infer(self, observation: dict, mode: str | None = None, *, prev_chunk=None, inference_delay: int = 0) -> dict:
        """Send one observation; returns the reply dict (`actions`, `policy_timing`, `server_timing`, ...).

        Real-time chunking: `prev_chunk` = the previous chunk's actions from this observation's time on ([L, D]),
        `inference_delay` = how many of them run while this request is computed (the reply's first ones equal them)."""
        message = dict(observation)
        if mode is not None:
            message[MODE_KEY] = mode
        if prev_chunk is not None:
            message[PREV_CHUNK_KEY] = np.asarray(prev_chunk, dtype=np.float32)
            message[INFERENCE_DELAY_KEY] = int(inference_delay)
        self._ws.send(self._packer.pack(message))
        return self._recv()

    def reset(self) -> None:
        """Ask the server to reset the policy (between episodes); waits for the acknowledgement."""
        self._ws.send(packb(RESET_MESSAGE))
        reply = self._recv()
        if reply.get(ACK_KEY) != "reset":
            raise ServerError(f"unexpected reply to reset: {reply!r:.200}")

    def _recv(self) -> Any:
        try:
            reply = self._ws.recv(timeout=self._recv_timeout_s)
        except websockets.ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd is not None else None
            reason = exc.rcvd.reason if exc.rcvd is not None else ""
            raise ServerError(f"server closed the connection (code {code}: {reason or 'no reason'})") from exc
        if isinstance(reply, str):  # openpi convention: a text frame is an error, and the connection closes after it
            raise ServerError(reply)
        return unpackb(reply)

    def close(self) -> None:
        self._ws.close()

    def __enter__(self) -> WebsocketClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
