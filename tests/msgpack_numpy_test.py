"""fastwam.serving.msgpack_numpy: round trips, refusal of unsafe input, byte-compatibility with openpi-client."""

from __future__ import annotations

import re

import msgpack
import numpy as np
import pytest

from fastwam.serving import msgpack_numpy as mn

DTYPES = [np.uint8, np.int8, np.int16, np.uint16, np.int32, np.int64, np.float16, np.float32, np.float64, np.bool_]
SHAPES = [(), (0,), (5,), (2, 3), (2, 3, 4), (1, 1, 1, 1)]


def _arrays() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    out = []
    for dtype in DTYPES:
        for shape in SHAPES:
            out.append(np.asarray(rng.standard_normal(shape) * 50).astype(dtype))  # asarray: keep () as a 0-d array
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    out += [base[:, ::2], base.T, np.asfortranarray(base)]  # non-contiguous layouts travel as C-order bytes
    out += [np.array([b"ab", b"c"]), np.array(["xy", "z"]), base.astype(">f8")]  # bytes, unicode, big-endian
    return out


def _nested() -> dict:
    return {
        "observation/image": np.arange(48, dtype=np.uint8).reshape(4, 4, 3),
        "observation/state": np.linspace(-1, 1, 8, dtype=np.float32),
        "prompt": "put the bowl on the plate",
        "scalars": [np.float32(1.5), np.int64(-3), np.bool_(True), np.uint8(7), np.float64(np.pi)],
        "nested": {"a": {"b": [np.zeros((2, 2), np.float64), {"c": None, "d": b"raw"}]}, "n": 3, "x": 2.5},
    }


def _assert_same(a, b) -> None:
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for key in a:
            _assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, list) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_same(x, y)
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    elif isinstance(a, (np.float64, np.str_, np.bytes_)):
        # Subclasses of float / str / bytes: msgpack packs them natively, so they come back as plain Python values
        # (openpi does the same; the bytes-identity tests below pin it).
        assert type(b) in (float, str, bytes) and a == b
    elif isinstance(a, np.generic):
        assert type(a) is type(b) and a == b
    else:
        assert a == b and type(a) is type(b)


@pytest.mark.parametrize("index", range(len(_arrays())))
def test_array_round_trip(index: int) -> None:
    array = _arrays()[index]
    back = mn.unpackb(mn.packb(array))
    _assert_same(array, back)


def test_nested_round_trip_and_packer() -> None:
    obj = _nested()
    _assert_same(obj, mn.unpackb(mn.packb(obj)))
    assert mn.Packer().pack(obj) == mn.packb(obj)


def test_decoded_arrays_are_read_only_views() -> None:
    back = mn.unpackb(mn.packb(np.ones(3, np.float32)))
    assert not back.flags.writeable  # zero-copy, as in openpi; callers copy before writing


@pytest.mark.parametrize(
    "obj",
    [np.array([1, "a"], dtype=object), np.zeros(2, dtype=[("a", "f4")]), np.zeros(2, np.complex64), np.complex128(1j)],
)
def test_pack_refuses_unsafe_dtypes(obj) -> None:
    with pytest.raises(mn.MsgpackNumpyError, match="dtype"):
        mn.packb({"x": obj})


def test_pack_refuses_unknown_objects() -> None:
    with pytest.raises(mn.MsgpackNumpyError, match="set"):
        mn.packb({"x": {1, 2}})


def _tagged(data: bytes, dtype: str, shape) -> bytes:
    return msgpack.packb({"x": {b"__ndarray__": True, b"data": data, b"dtype": dtype, b"shape": shape}})


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (_tagged(b"\0" * 8, "|O", [1]), "refusing array dtype"),
        (_tagged(b"\0" * 8, "i4,O", [1]), "refusing array dtype"),
        (_tagged(b"\0" * 8, "V8", [1]), "refusing array dtype"),
        (_tagged(b"\0" * 8, "<c8", [1]), "refusing array dtype"),
        (_tagged(b"\0" * 8, "not-a-dtype", [2]), "unknown array dtype"),
        (_tagged(b"\0" * 8, 5, [2]), "dtype must be a string"),
        (_tagged(b"\0" * 8, "<f4", [3]), r"shape \(3,\) dtype float32 \(12 bytes\) but carries 8 bytes"),
        (_tagged(b"\0" * 12, "|u1", [2**31, 2**31, 3]), "but carries 12 bytes"),  # huge declared shape: no allocation
        (_tagged(b"\0" * 8, "<f4", [-2]), "non-negative ints"),
        (_tagged(b"\0" * 8, "<f4", "2"), "shape must be a list"),
        (_tagged(b"\0" * 8, "<f4", [2.0]), "non-negative ints"),
        (_tagged("text", "<f4", [1]), "data must be bytes"),
        (msgpack.packb({"x": {b"__npgeneric__": True, b"data": 1, b"dtype": "|O"}}), "refusing array dtype"),
        (msgpack.packb({"x": {b"__npgeneric__": True, b"data": [1], b"dtype": "<f4"}}), "scalar data must be"),
        (msgpack.packb({"x": {b"__npgeneric__": True, b"data": 300, b"dtype": "|u1"}}), "does not fit dtype"),
        (b"\xc1", "invalid msgpack"),
        (b"", "invalid msgpack"),
        (mn.packb({"a": np.zeros(10, np.float32)})[:-7], "invalid msgpack"),
        (msgpack.packb(1) + b"\x01", "invalid msgpack"),
        (b"\x91" * 5000 + b"\x00", "invalid msgpack"),  # nesting deeper than msgpack's stack
    ],
)
def test_unpack_rejects_malformed(payload: bytes, match: str) -> None:
    with pytest.raises(mn.MsgpackNumpyError, match=match) as info:
        mn.unpackb(payload)
    assert not re.search(r"\(\w+: \)", str(info.value)), str(info.value)  # every error says what was wrong


def test_msgpack_errors_without_text_get_a_reason() -> None:
    # msgpack's FormatError and StackError carry no message ("invalid msgpack (FormatError: )" said nothing).
    with pytest.raises(mn.MsgpackNumpyError, match=r"FormatError: a byte that starts no msgpack value"):
        mn.unpackb(b"\xc1")
    with pytest.raises(mn.MsgpackNumpyError, match=r"StackError: containers nested deeper than msgpack's limit"):
        mn.unpackb(b"\x91" * 5000 + b"\x00")


# ----------------------------------------------------------------------------- openpi-client compatibility

openpi = pytest.importorskip(
    "openpi_client.msgpack_numpy", reason="install with `pip install --no-deps openpi-client==0.1.2`"
)


@pytest.mark.parametrize("index", range(len(_arrays())))
def test_array_bytes_identical_to_openpi(index: int) -> None:
    array = _arrays()[index]
    assert mn.packb({"a": array}) == openpi.packb({"a": array})
    _assert_same(array, openpi.unpackb(mn.packb(array)))
    _assert_same(array, mn.unpackb(openpi.packb(array)))


def test_nested_bytes_identical_to_openpi() -> None:
    obj = _nested()
    ours, theirs = mn.packb(obj), openpi.packb(obj)
    assert ours == theirs
    assert openpi.Packer().pack(obj) == mn.Packer().pack(obj)
    _assert_same(obj, openpi.unpackb(ours))
    _assert_same(obj, mn.unpackb(theirs))
