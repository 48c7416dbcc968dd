"""What `fastwam serve` expects from a policy and from a client (the openpi websocket protocol, plus validation).

Wire protocol (see docs/reference.md, "Serving wire format"):

1. On connect the server sends one binary message: the policy's `metadata` (msgpack), e.g.
   `{"observation_spec": {"observation/image": {"shape": [-1, -1, 3], "dtype": "uint8", "preferred_shape":
   [224, 224, 3], "max_shape": [896, 896, 3]}, ..., "prompt": {"shape": [], "dtype": "str", "max_length": 1024}},
   "action_shape": [32, 7], "mode": "fast", "checkpoint": "run/step_0020000", "server": {...}}`. It never holds a
   filesystem path of the server's.
2. Each binary message from the client is one request, a msgpack map:
   - an observation: every key of `observation_spec` with the declared dtype and shape (`None` / `-1` in a spec
     shape matches any length up to `max_shape`, when the spec gives one: per-request work stays bounded).
     Strings: a str, or a 0-d numpy string array (openpi's own server accepts both), at most `max_length`
     characters. Float arrays may come as any float width (LIBERO sends float64 state); they are
     cast to the declared dtype. Integer / bool arrays must match exactly (a float image is a bug, not a cast).
     Optional `"mode": "fast" | "joint" | "idm"` picks the inference mode for this request, and
     `"return_video": True` asks a joint / IDM policy for its imagined frames (reply key `"imagined"`).
     Real-time chunking (optional; metadata `"realtime_chunking": true` says the policy takes it):
     `"prev_chunk"`: float array [L, D], the previous chunk's actions from this observation's time on, and
     `"inference_delay"`: int d >= 0, how many of them the robot executes while this request is computed. The
     reply's first d actions are then exactly those, and the rest continues them. A request without them (every
     openpi client) is answered as before. Other keys
     outside the spec are passed to the policy unvalidated (it ignores what it does not know).
     Reply: `{"actions": float32 [H, D], ..., "policy_timing": {"infer_ms"}, "server_timing": {"infer_ms",
     "queue_ms", "batch_size", "total_ms", "prev_total_ms"}}`.
   - a reset: `{"reset": True}` (canonical; also accepted: `{"__ctrl__": "reset" | "episode_start"}`,
     `{"type": "reset"}`, `{"command": "reset"}`). Calls `policy.reset()`; reply `{"__ack__": "reset"}`.
     `{"__ctrl__": "episode_end"}` is acknowledged with `{"__ack__": "episode_end"}` and does nothing else.
3. Any bad request gets one text message starting with "error:" that names the key / shape / dtype at fault, then
   the connection is closed with code 1011 (openpi's behaviour; `WebsocketClientPolicy.infer` raises it as a
   `RuntimeError`). A message over the size limit is closed by websockets itself with code 1009.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = [
    "ACK_KEY",
    "INFERENCE_DELAY_KEY",
    "MODE_KEY",
    "PREV_CHUNK_KEY",
    "RETURN_VIDEO_KEY",
    "Control",
    "FieldSpec",
    "InferRequest",
    "Policy",
    "ProtocolError",
    "as_text",
    "describe_error",
    "example_observation",
    "parse_observation_spec",
    "parse_request",
    "realtime_kwargs",
    "validate_observation",
]

MODE_KEY = "mode"
RETURN_VIDEO_KEY = "return_video"
PREV_CHUNK_KEY = "prev_chunk"
INFERENCE_DELAY_KEY = "inference_delay"
MAX_INFERENCE_DELAY = 10_000
_REQUEST_OPTIONS = (MODE_KEY, RETURN_VIDEO_KEY, PREV_CHUNK_KEY, INFERENCE_DELAY_KEY)  # request keys beside the spec's
ACK_KEY = "__ack__"
RESET_MESSAGE: dict[str, Any] = {"reset": True}
# Spelled-out list of what counts as a control message, so the docs, server and client agree.
_CTRL_KEY = "__ctrl__"
_CTRL_ALIASES = {"reset": "reset", "episode_start": "reset", "episode_end": "episode_end"}


@runtime_checkable
class Policy(Protocol):
    """What the server drives. `fastwam.policy.FastWAMPolicy` implements it; so do the test doubles.

    `metadata` is JSON-able: `{"observation_spec": {key: {"shape": [...], "dtype": "uint8" | "float32" | "str"}},
    "action_shape": [H, D], "mode": "fast", "checkpoint": "<a name, not a path>"}` and optionally `"modes": [...]`
    (accepted per-request modes); a spec entry may bound free dimensions with `"max_shape"` and strings with
    `"max_length"`, and the server enforces both before the policy sees the request. `infer_batch` gets
    observations that already passed `validate_observation` and returns one dict per observation, each with
    `"actions"` (float32 [H, D]); it raises `ValueError` with a clear message on input it cannot use. It may also
    accept `return_video: bool`; the server passes it only when a request asks.
    """

    metadata: dict

    def infer_batch(self, observations: list[dict], mode: str | None = None) -> list[dict]: ...

    def infer(self, observation: dict, mode: str | None = None) -> dict: ...

    def reset(self) -> None: ...


class ProtocolError(ValueError):
    """A request that breaks the protocol; the message is sent to the client verbatim."""


def describe_error(exc: BaseException) -> str:
    """`Type: message`, never an empty reason: some exceptions (msgpack's FormatError, a bare AssertionError) carry
    no text, and an error line without its reason helps nobody."""
    text = str(exc).strip()
    if not text:
        doc = (type(exc).__doc__ or "").strip().splitlines()
        text = doc[0].rstrip(".") if doc else "no detail given"
    return f"{type(exc).__name__}: {text}"


@dataclasses.dataclass(frozen=True)
class FieldSpec:
    key: str
    shape: tuple[int | None, ...]  # None = any length
    dtype: str  # "str" or a numpy dtype name ("uint8", "float32", ...)
    preferred_shape: tuple[int, ...] | None = None  # what the policy resizes to, if it accepts any size
    max_shape: tuple[int, ...] | None = None  # upper bound of every dimension (free ones included)
    max_length: int | None = None  # strings: most characters accepted

    @property
    def is_str(self) -> bool:
        return self.dtype == "str"

    def describe(self) -> str:
        if self.is_str:
            return "a string"
        dims = ", ".join("*" if d is None else str(d) for d in self.shape)
        bound = f" up to {self.max_shape}" if self.max_shape is not None and None in self.shape else ""
        return f"{self.dtype} array of shape ({dims}{',' if len(self.shape) == 1 else ''}){bound}"


def parse_observation_spec(metadata: dict) -> dict[str, FieldSpec]:
    """Read `metadata["observation_spec"]`; raises ValueError if the *policy's* metadata is malformed."""
    if not isinstance(metadata, dict) or not isinstance(metadata.get("observation_spec"), dict):
        raise ValueError("policy.metadata must be a dict with an 'observation_spec' dict")
    specs: dict[str, FieldSpec] = {}
    for key, entry in metadata["observation_spec"].items():
        if not isinstance(key, str) or not isinstance(entry, dict):
            raise ValueError(f"observation_spec[{key!r}] must map a string key to {{'shape': [...], 'dtype': ...}}")
        dtype = entry.get("dtype")
        if dtype != "str":
            try:
                np.dtype(dtype)
            except TypeError as exc:
                raise ValueError(f"observation_spec[{key!r}] has unknown dtype {dtype!r}") from exc
        shape = entry.get("shape", [])
        if not isinstance(shape, (list, tuple)) or not all(d is None or (type(d) is int) for d in shape):
            raise ValueError(f"observation_spec[{key!r}] shape must be a list of ints (None / -1 = any), got {shape!r}")
        preferred = entry.get("preferred_shape")
        if not (isinstance(preferred, (list, tuple)) and len(preferred) == len(shape)):
            preferred = None
        max_shape = entry.get("max_shape")
        if max_shape is not None and not (
            isinstance(max_shape, (list, tuple))
            and len(max_shape) == len(shape)
            and all(type(d) is int and d >= 1 for d in max_shape)
        ):
            raise ValueError(
                f"observation_spec[{key!r}] max_shape must be {len(shape)} positive ints, got {max_shape!r}"
            )
        max_length = entry.get("max_length")
        if max_length is not None and not (type(max_length) is int and max_length >= 1):
            raise ValueError(f"observation_spec[{key!r}] max_length must be a positive int, got {max_length!r}")
        specs[key] = FieldSpec(
            key,
            tuple(None if d is None or d < 0 else d for d in shape),
            str(dtype),
            tuple(int(d) for d in preferred) if preferred is not None else None,
            tuple(max_shape) if max_shape is not None else None,
            max_length,
        )
    for reserved in (MODE_KEY, RETURN_VIDEO_KEY):
        if reserved in specs:
            raise ValueError(f"observation_spec may not use the reserved request key {reserved!r}")
    return specs


def as_text(value: Any) -> str | None:
    """A str, or the text of a 0-d numpy string array (openpi clients may send `np.asarray(prompt)`); else None."""
    if isinstance(value, str):  # np.str_ is a str subclass
        return str(value)
    if isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind == "U":
        return str(value.item())
    return None


def _validate_field(spec: FieldSpec, value: Any) -> Any:
    key = spec.key
    if spec.is_str:
        text = as_text(value)
        if text is None:
            raise ProtocolError(
                f"observation key {key!r} must be a string (or a 0-d numpy string array), got {_type_name(value)}"
            )
        if spec.max_length is not None and len(text) > spec.max_length:
            raise ProtocolError(
                f"observation key {key!r} is {len(text)} characters long; this server accepts at most "
                f"{spec.max_length}"
            )
        return text
    if not isinstance(value, np.ndarray):
        raise ProtocolError(f"observation key {key!r} must be a numpy {spec.describe()}, got {_type_name(value)}")
    want = np.dtype(spec.dtype)
    if value.ndim != len(spec.shape) or any(
        d is not None and d != v for d, v in zip(spec.shape, value.shape, strict=True)
    ):
        raise ProtocolError(f"observation key {key!r} has shape {value.shape}; expected {spec.describe()}")
    if spec.max_shape is not None and any(v > m for v, m in zip(value.shape, spec.max_shape, strict=True)):
        hint = f" (the policy works at {spec.preferred_shape}: resize before sending)" if spec.preferred_shape else ""
        raise ProtocolError(
            f"observation key {key!r} has shape {value.shape}; this server accepts at most {spec.max_shape}{hint}"
        )
    if want.kind == "f":
        if value.dtype.kind != "f":
            raise ProtocolError(
                f"observation key {key!r} has dtype {value.dtype}; expected {spec.dtype} (any float width is cast)"
            )
        if value.dtype != want:
            with np.errstate(over="ignore"):  # overflow to inf is reported just below, by name
                value = value.astype(want)
        bad = value.size - int(np.count_nonzero(np.isfinite(value)))
        if bad:
            raise ProtocolError(f"observation key {key!r} contains {bad} non-finite value(s) (NaN or inf)")
        return value
    if value.dtype != want:
        raise ProtocolError(f"observation key {key!r} has dtype {value.dtype}; expected {spec.dtype}")
    return value


def validate_observation(observation: Any, specs: dict[str, FieldSpec]) -> dict:
    """Check an observation against the spec; return it with floats cast to the declared dtype.

    Raises ProtocolError naming the first missing key / wrong type, shape or dtype / non-finite field.
    """
    if not isinstance(observation, dict):
        raise ProtocolError(f"an observation must be a map of key -> value, got {_type_name(observation)}")
    missing = [k for k in specs if k not in observation]
    if missing:
        raise ProtocolError(f"missing observation key(s) {missing}; the policy expects {sorted(specs)}")
    clean = dict(observation)
    for key, spec in specs.items():
        clean[key] = _validate_field(spec, observation[key])
    return clean


@dataclasses.dataclass
class InferRequest:
    observation: dict
    mode: str | None
    return_video: bool = False
    prev_chunk: np.ndarray | None = None  # float32 [L, D] (real-time chunking), checked against the policy later
    inference_delay: int = 0


@dataclasses.dataclass
class Control:
    kind: str  # "reset" | "episode_end"


def _control_kind(message: dict, specs: dict[str, FieldSpec]) -> str | None:
    """Which control message this is, or None for an ordinary observation."""
    if "reset" in message and "reset" not in specs:
        if message["reset"] is not True and not (type(message["reset"]) is int and message["reset"] == 1):
            raise ProtocolError(f"a reset message is {{'reset': True}}, got {{'reset': {message['reset']!r:.40}}}")
        return "reset"
    if _CTRL_KEY in message:
        ctrl = message[_CTRL_KEY]
        if not isinstance(ctrl, str) or ctrl not in _CTRL_ALIASES:
            raise ProtocolError(
                f"unknown control message {{'__ctrl__': {ctrl!r:.40}}}; accepted: {sorted(_CTRL_ALIASES)}"
            )
        return _CTRL_ALIASES[ctrl]
    for alias in ("type", "command"):
        if alias not in specs and isinstance(message.get(alias), str) and message[alias] == "reset":
            return "reset"
    return None


def parse_request(message: Any, specs: dict[str, FieldSpec], modes: list[str] | None = None) -> InferRequest | Control:
    """Classify and validate one decoded client message."""
    if not isinstance(message, dict):
        raise ProtocolError(
            f"a request must be a msgpack map (an observation dict or {RESET_MESSAGE}), got {_type_name(message)}"
        )
    bad_keys = [k for k in message if not isinstance(k, str)]
    if bad_keys:
        raise ProtocolError(f"request keys must be strings, got {_type_name(bad_keys[0])} key {bad_keys[0]!r:.60}")
    kind = _control_kind(message, specs)
    if kind is not None:
        stray = [k for k in message if k in specs]
        if stray:
            raise ProtocolError(
                f"a reset / control message must not carry observation keys (got {stray}); send {RESET_MESSAGE} "
                "alone, then the observation"
            )
        return Control(kind)
    mode = None
    if MODE_KEY in message:
        mode = message[MODE_KEY]
        if not isinstance(mode, str):
            raise ProtocolError(f"request key {MODE_KEY!r} must be a string, got {_type_name(mode)}")
        if modes is not None and mode not in modes:
            raise ProtocolError(f"unknown mode {mode!r:.40}; this policy serves {modes}")
    return_video = message.get(RETURN_VIDEO_KEY, False)
    if not isinstance(return_video, bool):
        raise ProtocolError(f"request key {RETURN_VIDEO_KEY!r} must be true or false, got {_type_name(return_video)}")
    prev_chunk, delay = _realtime_fields(message)
    observation = validate_observation(
        {k: v for k, v in message.items() if k not in _REQUEST_OPTIONS}, specs
    )
    return InferRequest(observation, mode, return_video, prev_chunk, delay)


def realtime_kwargs(realtime: Any) -> dict:
    """Per request None or (prev_chunk, inference_delay) -> the `infer_batch` keywords `prev_chunks` and
    `inference_delays`, or {} when no request carries them (so policies without those keywords work unchanged)."""
    if not realtime or all(r is None for r in realtime):
        return {}
    return {"prev_chunks": [None if r is None else r[0] for r in realtime],
            "inference_delays": [0 if r is None else r[1] for r in realtime]}


def _realtime_fields(message: dict) -> tuple[np.ndarray | None, int]:
    """The optional real-time-chunking fields, type-checked (their shape is the policy's to check)."""
    delay = message.get(INFERENCE_DELAY_KEY, 0)
    if isinstance(delay, (bool, np.bool_)) or not isinstance(delay, (int, np.integer)) \
            or not 0 <= delay <= MAX_INFERENCE_DELAY:
        raise ProtocolError(f"request key {INFERENCE_DELAY_KEY!r} must be an integer in 0..{MAX_INFERENCE_DELAY}, "
                            f"got {delay!r:.40}")
    prev = message.get(PREV_CHUNK_KEY)
    if prev is None:
        if delay:
            raise ProtocolError(f"{INFERENCE_DELAY_KEY!r} > 0 needs {PREV_CHUNK_KEY!r} (the actions that run "
                                "meanwhile)")
        return None, 0
    if not isinstance(prev, np.ndarray) or prev.dtype.kind not in "fiu" or prev.ndim != 2:
        raise ProtocolError(f"request key {PREV_CHUNK_KEY!r} must be a 2-D numeric array [L, action_dim], got "
                            f"{_type_name(prev)}")
    return prev.astype(np.float32), int(delay)


def example_observation(metadata: dict, *, seed: int = 0, prompt: str = "pick up the black bowl") -> dict:
    """An observation that satisfies `metadata["observation_spec"]`: random uint8 images, zero floats, a prompt."""
    rng = np.random.default_rng(seed)
    obs: dict[str, Any] = {}
    for key, spec in parse_observation_spec(metadata).items():
        # Free dimensions: the policy's preferred size if it says one, else 64 (enough for any resize / crop).
        shape = spec.preferred_shape or tuple(64 if d is None else d for d in spec.shape)
        if spec.is_str:
            obs[key] = prompt
        elif np.dtype(spec.dtype) == np.uint8:
            obs[key] = rng.integers(0, 256, size=shape, dtype=np.uint8)
        else:
            obs[key] = np.zeros(shape, dtype=spec.dtype)
    return obs


def _type_name(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"array {value.dtype}{list(value.shape)}"
    return type(value).__name__
