"""Reading safetensors files without a second copy: the header's tensor table, and memory-mapped copying.

`read_header` reads a file's tensor table (names, dtypes, shapes, byte ranges) without touching the data, checking
every range against the file size (a truncated download names its file and tensor). `MappedFile.copy` copies one
tensor out of the memory-mapped file, converted to the requested dtype and straight to the requested device, 16 MB
at a time, releasing each piece's mapped pages with `madvise(MADV_DONTNEED)`: the transient cost of a big tensor is
one piece. (`safetensors.safe_open` keeps every page it touched resident until the file is closed — measured ~2x the
shard size when copying — and handing out its mmap-backed tensors without a copy would tie the parameters to a file
that a later checkpoint save may overwrite.) Used by `wan_checkpoint` to load Wan checkpoints.
"""

from __future__ import annotations

import json
import math
import mmap
from dataclasses import dataclass
from pathlib import Path

import torch

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_PAGE = mmap.PAGESIZE
CHUNK_BYTES = 16 << 20  # bytes copied (and then released from the mapping) at a time


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    name: str  # name inside the file
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int


def read_header(path: Path) -> dict[str, TensorInfo]:
    """The tensor table of a safetensors file (8-byte little-endian header length, JSON header, data)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        n = int.from_bytes(head, "little")
        if n > size - 8:
            raise ValueError(f"{path}: not a safetensors file (header length {n} exceeds the file size {size})")
        header = json.loads(f.read(n))
    base = 8 + n
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if meta["dtype"] not in _ST_DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {meta['dtype']}")
        dtype, shape = _ST_DTYPES[meta["dtype"]], tuple(meta["shape"])
        start, end = (base + o for o in meta["data_offsets"])
        if end - start != math.prod(shape) * dtype.itemsize or end > size:
            raise ValueError(f"{path}: tensor {name!r} byte range {meta['data_offsets']} does not fit shape {shape} "
                             f"{meta['dtype']} in a {size}-byte file (truncated download?)")
        out[name] = TensorInfo(path, name, dtype, shape, start, end)
    return out


class MappedFile:
    """A read-only view of one safetensors file through mmap; `copy` returns an independent tensor and drops the
    mapped pages it touched from the resident set."""

    def __init__(self, path: Path):
        self._file = open(path, "rb")
        # ACCESS_COPY: a private, writable mapping (torch.frombuffer wants a writable buffer); nothing is written.
        self._mm = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_COPY)

    def copy(self, info: TensorInfo, dtype: torch.dtype | None, device: torch.device) -> torch.Tensor:
        numel = math.prod(info.shape)
        target = dtype if dtype is not None and info.dtype.is_floating_point else info.dtype
        if numel == 0:
            return torch.empty(info.shape, dtype=target, device=device)
        out = torch.empty(info.shape, dtype=target, device=device)
        flat = out.view(-1)
        # Copy in pieces of ~CHUNK_BYTES and release each piece's pages right away, so the transient cost of a big
        # tensor (the FFN weights are 88 MB in bf16) is one piece, not the whole tensor mapped next to its copy.
        step = max(1, CHUNK_BYTES // info.dtype.itemsize)
        for first in range(0, numel, step):
            count = min(step, numel - first)
            start = info.start + first * info.dtype.itemsize
            view = torch.frombuffer(self._mm, dtype=info.dtype, count=count, offset=start)
            flat[first : first + count].copy_(view)
            del view  # the mmap cannot be closed while a tensor exports its buffer
            self._release(start, start + count * info.dtype.itemsize)
        return out

    def _release(self, start: int, end: int) -> None:
        if hasattr(self._mm, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
            # Unmodified private pages: dropping them only means a later read would fault them in again from the file.
            # Rounding out to whole pages may drop a neighbour's page too, which is equally harmless.
            lo = start // _PAGE * _PAGE
            hi = min(-(-end // _PAGE) * _PAGE, len(self._mm))
            self._mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    def close(self) -> None:
        self._mm.close()
        self._file.close()

    def __enter__(self) -> MappedFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
