"""msgpack with numpy arrays, byte-for-byte the wire format of `openpi_client.msgpack_numpy`.

Arrays travel as maps `{b"__ndarray__": True, b"data": <raw bytes>, b"dtype": "<f4", b"shape": [..]}` and numpy
scalars as `{b"__npgeneric__": True, b"data": <python value>, b"dtype": "<i8"}`, packed with msgpack's defaults
(`use_bin_type=True`). Packing an object produces exactly the bytes openpi's `packb` produces, so any openpi client
(LIBERO, RoboTwin, real robots) can talk to `fastwam serve` unchanged.

Unlike openpi's decoder, ours is written for untrusted input: object / void / complex dtypes are refused (there is
never a pickle path), the declared shape must be a list of non-negative ints, and `prod(shape) * itemsize` must equal
the length of the data *before* numpy sees it, so a message declaring an absurd shape costs nothing. Every failure is
a `MsgpackNumpyError` (a `ValueError`) whose message says what was wrong.

Decoded arrays are zero-copy, read-only views of the message bytes (as in openpi); copy them before writing in place.
"""

from __future__ import annotations

import math
from typing import Any

import msgpack
import numpy as np

__all__ = ["MsgpackNumpyError", "Packer", "pack_array", "packb", "unpack_array", "unpackb"]

# numpy dtype kinds that never go on the wire: object ("O") would need pickle, void/structured ("V") can hide
# objects, and complex ("c") is refused by openpi too, so refusing it keeps both sides symmetric.
_REFUSED_KINDS = ("V", "O", "c")


class MsgpackNumpyError(ValueError):
    """A message that cannot be packed or unpacked as msgpack-numpy; the text names the offending field."""


def pack_array(obj: Any) -> Any:
    """msgpack `default=` hook: numpy arrays / scalars -> openpi's tagged maps. Other types raise `TypeError`
    (msgpack's convention), so unsupported objects fail loudly instead of being pickled."""
    if isinstance(obj, (np.ndarray, np.generic)) and obj.dtype.kind in _REFUSED_KINDS:
        raise MsgpackNumpyError(
            f"unsupported numpy dtype {obj.dtype} (object, structured and complex arrays are refused)"
        )
    if isinstance(obj, np.ndarray):
        # Key order and value types match openpi exactly (shape is a tuple -> msgpack array) so bytes are identical.
        return {
            b"__ndarray__": True,
            b"data": obj.tobytes(),
            b"dtype": obj.dtype.str,
            b"shape": obj.shape,
        }
    if isinstance(obj, np.generic):
        return {
            b"__npgeneric__": True,
            b"data": obj.item(),
            b"dtype": obj.dtype.str,
        }
    raise TypeError(f"cannot serialize {type(obj).__name__!r} with msgpack-numpy")


def _parse_dtype(raw: Any) -> np.dtype:
    if isinstance(raw, bytes):  # older packers wrote the dtype string as bytes
        raw = raw.decode("ascii", "replace")
    if not isinstance(raw, str):
        raise MsgpackNumpyError(f"array dtype must be a string like '<f4', got {type(raw).__name__}")
    if len(raw) > 32:
        raise MsgpackNumpyError(f"unsupported array dtype {raw[:40]!r}...")
    try:
        dtype = np.dtype(raw)
    except Exception as exc:  # TypeError mostly; odd strings can raise ValueError / SyntaxError inside numpy
        raise MsgpackNumpyError(f"unknown array dtype {raw!r}") from exc
    if dtype.kind in _REFUSED_KINDS or dtype.hasobject:
        raise MsgpackNumpyError(
            f"refusing array dtype {raw!r} ({dtype}): object, structured and complex dtypes are not accepted"
        )
    return dtype


def unpack_array(obj: dict) -> Any:
    """msgpack `object_hook=`: openpi's tagged maps -> numpy arrays / scalars, validated; other maps unchanged."""
    if b"__ndarray__" in obj:
        dtype = _parse_dtype(obj.get(b"dtype"))
        shape = obj.get(b"shape")
        if not isinstance(shape, (list, tuple)) or len(shape) > 32:
            raise MsgpackNumpyError(f"array shape must be a list of at most 32 ints, got {shape!r:.80}")
        if not all(type(d) is int and d >= 0 for d in shape):
            raise MsgpackNumpyError(f"array shape must hold non-negative ints, got {list(shape)!r:.80}")
        data = obj.get(b"data")
        if not isinstance(data, bytes):
            raise MsgpackNumpyError(f"array data must be bytes, got {type(data).__name__}")
        # Python ints do not overflow, so a declared shape like [2**40, 2**40] is compared, not allocated.
        expected = math.prod(shape) * dtype.itemsize
        if expected != len(data):
            raise MsgpackNumpyError(
                f"array declares shape {tuple(shape)} dtype {dtype} ({expected} bytes) but carries {len(data)} bytes"
            )
        return np.ndarray(buffer=data, dtype=dtype, shape=tuple(shape))

    if b"__npgeneric__" in obj:
        dtype = _parse_dtype(obj.get(b"dtype"))
        value = obj.get(b"data")
        if not isinstance(value, (bool, int, float, str, bytes)):
            raise MsgpackNumpyError(f"numpy scalar data must be a number or string, got {type(value).__name__}")
        try:
            return dtype.type(value)
        except (TypeError, ValueError, OverflowError) as exc:
            raise MsgpackNumpyError(f"numpy scalar {value!r:.40} does not fit dtype {dtype}: {exc}") from exc

    return obj


def Packer(**kwargs: Any) -> msgpack.Packer:  # noqa: N802 - mirrors openpi_client.msgpack_numpy.Packer
    """A reusable `msgpack.Packer` with the numpy hook (faster than `packb` in a loop)."""
    return msgpack.Packer(default=pack_array, **kwargs)


def packb(obj: Any, **kwargs: Any) -> bytes:
    """Serialize `obj` (dicts, lists, str, bytes, numbers, numpy arrays / scalars) exactly as openpi does."""
    try:
        return msgpack.packb(obj, default=pack_array, **kwargs)
    except MsgpackNumpyError:
        raise
    except (TypeError, ValueError, OverflowError) as exc:
        raise MsgpackNumpyError(f"cannot pack message: {exc}") from exc


def unpackb(data: bytes, **kwargs: Any) -> Any:
    """Deserialize bytes from `packb` (or openpi's). Raises `MsgpackNumpyError` on anything malformed.

    msgpack bounds every container / string length by the buffer size, and nesting depth by its own stack limit,
    so hostile bytes cannot make it allocate more than a small multiple of the message size.
    """
    try:
        return msgpack.unpackb(data, object_hook=unpack_array, **kwargs)
    except MsgpackNumpyError:
        raise
    except Exception as exc:  # msgpack raises ValueError, TypeError, ExtraData, FormatError, StackError...
        reason = str(exc).strip() or _REASONS.get(type(exc).__name__, "malformed input")
        raise MsgpackNumpyError(f"invalid msgpack ({type(exc).__name__}: {reason})") from exc


# msgpack raises these without a message; an error line must still say what was wrong.
_REASONS = {
    "FormatError": "a byte that starts no msgpack value (e.g. 0xc1): the message is not msgpack",
    "StackError": "containers nested deeper than msgpack's limit",
}
