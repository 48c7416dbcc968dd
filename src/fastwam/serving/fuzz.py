"""Hostile traffic for a running `fastwam serve`: seeded malformed, oversized, truncated and abandoned messages, each
checked for the answer it must get, while a bystander client stays connected and must keep being served correctly.

Shared by the seeded fuzz test (tests/server_test.py, a few hundred messages) and `fastwam bench serve --fuzz N`
(10,000), so the documented number comes from the same cases the test pins. Cases are built from the server's own
metadata (any observation spec), and every error text must carry a reason (`error: ...` with no empty `( : )`).
"""

from __future__ import annotations

import base64
import collections
import re
import socket
import struct
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from fastwam.serving import msgpack_numpy as mn
from fastwam.serving.client import WebsocketClient
from fastwam.serving.protocol import example_observation, parse_observation_spec

__all__ = ["KINDS", "exchange", "frame", "fuzz_cases", "raw_websocket", "run_fuzz"]

KINDS = 19  # case kinds, cycled through in order (see `fuzz_cases`)
_EMPTY_REASON = re.compile(r"\(\w+: \)|:\s*$")  # "invalid msgpack (FormatError: )" or a message ending at its colon


def exchange(port: int, payload: bytes | str, timeout: float = 10.0) -> tuple[object, int | None, str]:
    """Connect, read the metadata, send one frame; return (first reply or None, close code, close reason).

    A binary (successful) reply returns at once with code None; otherwise waits for the server's close."""
    reply: object = None
    with connect(f"ws://127.0.0.1:{port}", max_size=None, open_timeout=timeout, close_timeout=2) as ws:
        ws.recv(timeout=timeout)
        try:
            ws.send(payload)
            reply = ws.recv(timeout=timeout)
            if isinstance(reply, bytes):
                return reply, None, ""
            ws.recv(timeout=timeout)  # the close that follows an error text
        except ConnectionClosed as exc:
            return reply, (exc.rcvd.code if exc.rcvd else None), (exc.rcvd.reason if exc.rcvd else "")
        except OSError:  # the server may drop the TCP stream while a big frame is still being written
            return reply, None, ""
    raise AssertionError(f"server neither replied with data nor closed after an error: {reply!r:.200}")


def raw_websocket(port: int, key: bytes, timeout: float = 10.0) -> socket.socket:
    """A hand-made websocket handshake, so a caller can send partial frames and drop the TCP stream."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.sendall(
        (
            f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {base64.b64encode(key).decode()}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    head = b""
    while b"\r\n\r\n" not in head and len(head) < 65536:
        chunk = sock.recv(4096)
        if not chunk:
            break
        head += chunk
    if not head.startswith(b"HTTP/1.1 101"):
        sock.close()
        raise AssertionError(f"websocket handshake refused: {head[:100]!r}")
    return sock


def frame(payload: bytes, opcode: int = 2, mask: bytes = b"\x01\x02\x03\x04") -> bytes:
    """One masked client frame (binary by default)."""
    n = len(payload)
    if n < 126:
        header = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 65536:
        header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    masked = (np.frombuffer(payload, np.uint8) ^ np.resize(np.frombuffer(mask, np.uint8), n)).tobytes()
    return header + mask + masked


def _wrong_shape(rng: np.random.Generator, ndim: int) -> tuple[int, ...]:
    """A shape with a different number of dimensions than the spec's, so it is wrong whatever the free dims."""
    rank = int(rng.choice([r for r in range(5) if r != ndim]))
    return tuple(int(d) for d in rng.integers(1, 12, size=rank))


def fuzz_cases(rng: np.random.Generator, n: int, metadata: dict, max_message_bytes: int) -> list[tuple[str, Any]]:
    """(kind, payload) pairs; the kind says what a correct server response is: "error" (text + 1011), "1009", "ok"
    (a reply with actions), "maybe" (either), or a transport action ("drop", "half_frame", "tcp_junk")."""
    specs = parse_observation_spec(metadata)
    arrays = [k for k, s in specs.items() if not s.is_str]
    floats = [k for k in arrays if np.dtype(specs[k].dtype).kind == "f"]
    texts = [k for k, s in specs.items() if s.is_str]
    bounded = [k for k in arrays if specs[k].max_shape is not None]
    good = mn.packb(example_observation(metadata, seed=0))
    cases: list[tuple[str, Any]] = []
    for i in range(n):
        obs = example_observation(metadata, seed=int(rng.integers(1000)))
        kind = i % KINDS
        key = arrays[int(rng.integers(len(arrays)))] if arrays else None
        if kind == 0:
            cases.append(("error", rng.bytes(int(rng.integers(0, 300)))))  # random bytes
        elif kind == 1:
            cases.append(("error", good[: int(rng.integers(1, len(good) - 1))]))  # truncated msgpack
        elif kind == 2:
            value = [1, "x", None, 2.5, [1, 2], b"bin", True][int(rng.integers(7))]
            cases.append(("error", mn.packb(value)))  # not a map
        elif kind == 3:
            drop = [k for k in specs if rng.random() < 0.5] or [list(specs)[int(rng.integers(len(specs)))]]
            cases.append(("error", mn.packb({k: v for k, v in obs.items() if k not in drop})))
        elif kind == 4 and key is not None:
            wrong = np.zeros(_wrong_shape(rng, len(specs[key].shape)), obs[key].dtype)
            cases.append(("error", mn.packb({**obs, key: wrong})))
        elif kind == 5 and key is not None:
            choices = [np.int16, np.int64, np.bool_, np.uint16, np.int8, np.int32]
            if np.dtype(specs[key].dtype).kind != "f":
                choices.append(np.float64)
            dtype = choices[int(rng.integers(len(choices)))]
            cases.append(("error", mn.packb({**obs, key: np.zeros(obs[key].shape, dtype)})))
        elif kind == 6 and floats:
            fkey = floats[int(rng.integers(len(floats)))]
            value = obs[fkey].copy()
            value.flat[int(rng.integers(value.size))] = [np.nan, np.inf, -np.inf][int(rng.integers(3))]
            cases.append(("error", mn.packb({**obs, fkey: value})))
        elif kind == 7 and key is not None:
            shape = [int(x) for x in rng.integers(2**20, 2**40, size=len(specs[key].shape))]
            fake = {b"__ndarray__": True, b"data": b"\0" * 16, b"dtype": "|u1", b"shape": shape}
            cases.append(("error", msgpack.packb({**obs, key: fake}, default=mn.pack_array)))
        elif kind == 8:
            cases.append(("1009", rng.bytes(max_message_bytes + int(rng.integers(1, 4096)))))  # oversized frame
        elif kind == 9:
            cases.append(("error", "".join(chr(int(c)) for c in rng.integers(32, 127, size=int(rng.integers(1, 50))))))
        elif kind == 10:
            cases.append(("drop", mn.packb(obs)))  # valid request, then the client vanishes
        elif kind == 11:
            flipped = bytearray(good)
            for _ in range(int(rng.integers(1, 4))):
                flipped[int(rng.integers(len(flipped)))] ^= 1 << int(rng.integers(8))
            cases.append(("maybe", bytes(flipped)))  # may still be valid (a flipped pixel): any sane answer
        elif kind == 12:
            weird: list[dict] = [{"__ctrl__": 5}, {"reset": "yes"}, {1: 2}, {"mode": None, **obs}]
            weird += [{k: obs[k]} for k in texts]
            cases.append(("error", msgpack.packb(weird[int(rng.integers(len(weird)))], default=mn.pack_array)))
        elif kind == 13 and key is not None:
            bad_dtype = ["|O", "V4", "<c16", "zz", "<f4,|O"][int(rng.integers(5))]
            fake = {b"__ndarray__": True, b"data": b"\0" * 32, b"dtype": bad_dtype, b"shape": [2]}
            cases.append(("error", msgpack.packb({**obs, key: fake}, default=mn.pack_array)))
        elif kind == 14:
            cases.append(("half_frame", mn.packb(obs)))  # disconnect in the middle of a frame
        elif kind == 15:
            cases.append(("tcp_junk", rng.bytes(int(rng.integers(1, 200)))))  # not even HTTP
        elif kind == 16 and bounded:
            # Legal-looking but beyond the declared bound in one dimension (the 2 x 100,000 image attack, scaled
            # to fit the message limit): refused before any pixel is processed.
            bkey = bounded[int(rng.integers(len(bounded)))]
            limit = specs[bkey].max_shape
            assert limit is not None
            axis = int(rng.integers(len(limit) - 1))
            shape = [min(2, m) for m in limit[:-1]] + [limit[-1]]
            shape[axis] = limit[axis] + 1 + int(rng.integers(16))
            cases.append(("error", mn.packb({**obs, bkey: np.zeros(shape, specs[bkey].dtype)})))
        elif kind == 17 and texts and specs[texts[0]].max_length is not None:
            limit = specs[texts[0]].max_length
            assert limit is not None
            cases.append(("error", mn.packb({**obs, texts[0]: "x" * (limit + 1 + int(rng.integers(1000)))})))
        elif kind == 18 and texts:
            cases.append(("ok", mn.packb({**obs, texts[0]: np.asarray(obs[texts[0]])})))  # openpi's 0-d string array
        else:  # a kind this spec cannot express: a plain valid request
            cases.append(("ok", mn.packb(obs)))
    return cases


def _check(kind: str, reply: object, code: int | None) -> str | None:
    """None if the server answered as `kind` requires, else what was wrong."""
    if kind == "1009":
        return None if code in (1009, None) else f"expected close 1009, got {code}"  # None: TCP dropped first
    is_error = code == 1011 and isinstance(reply, str) and reply.startswith("error:")
    if is_error and _EMPTY_REASON.search(reply):  # type: ignore[arg-type]
        return f"error without a reason: {reply!r:.200}"
    is_ok = isinstance(reply, bytes) and "actions" in mn.unpackb(reply)
    if kind == "error":
        return None if is_error else f"expected an error text + close 1011, got {code} {reply!r:.200}"
    if kind == "ok":
        return None if is_ok else f"expected actions, got {code} {reply!r:.200}"
    return None if is_ok or is_error else f"expected actions or a clean error, got {code} {reply!r:.200}"


def run_fuzz(
    port: int,
    cases: list[tuple[str, Any]],
    rng: np.random.Generator,
    *,
    expected: Callable[[dict], np.ndarray],
    metadata: dict,
    bystander_every: int = 48,
    atol: float = 0.0,
    timeout: float = 10.0,
) -> dict[str, Any]:
    """Send every case on its own connection while a bystander (one connection throughout) asks every
    `bystander_every` cases for an observation whose actions must equal `expected(obs)` (within `atol`: a real
    model's batched float arithmetic differs from a single call's by ~1e-7 when a fuzz request shares the batch);
    returns a summary whose `violations` lists (at most 20 of) the cases answered wrongly."""
    violations: list[str] = []
    kinds: collections.Counter[str] = collections.Counter()
    checks = wrong = 0
    max_diff = 0.0
    with WebsocketClient(port=port, connect_timeout_s=timeout, recv_timeout_s=60) as bystander:
        for index, (kind, payload) in enumerate(cases):
            kinds[kind] += 1
            problem = None
            if kind == "tcp_junk":
                with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
                    sock.sendall(payload + b"\r\n\r\n")
                    sock.recv(4096)  # websockets answers a bad HTTP request and closes
            elif kind in ("drop", "half_frame"):
                sock = raw_websocket(port, rng.bytes(16), timeout)
                data = frame(payload)
                sock.sendall(data if kind == "drop" else data[: len(data) // 2])
                sock.close()
            else:
                reply, code, _ = exchange(port, payload, timeout)
                problem = _check(kind, reply, code)
            if index % bystander_every == 0 or index == len(cases) - 1:
                obs = example_observation(metadata, seed=index)
                got, want = np.asarray(bystander.infer(obs)["actions"]), np.asarray(expected(obs))
                diff = float(np.abs(got - want).max()) if got.shape == want.shape else float("inf")
                max_diff = max(max_diff, diff)
                if not diff <= atol:
                    problem = f"{problem or ''} the bystander got wrong actions (off by {diff:.3g})".strip()
                checks += 1
            if problem is not None:
                wrong += 1
                if len(violations) < 20:
                    violations.append(f"case {index} ({kind}): {problem}")
    return {"messages": len(cases), "kinds": dict(sorted(kinds.items())), "bystander_checks": checks,
            "bystander_max_diff": max_diff, "wrong_answers": wrong, "violations": violations}
