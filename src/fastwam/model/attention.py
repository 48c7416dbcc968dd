"""The one joint-attention function every MoT layer calls, with two interchangeable backends.

dense  one `scaled_dot_product_attention` with the boolean [Sq, Sk] mask. On CPU this is the fastest correct choice
       (docs/reference.md, "CPU measurements": no FlexAttention CPU backward; bf16, compile slower), so it is the
       CPU default.
split  no mask at all: the queries are cut into blocks of consecutive rows that see exactly the same keys, and each
       block runs one plain, unmasked SDPA over the key ranges it may see. Every visibility rule of this model gives
       only a handful of such blocks (fast mode: first-frame video -> first-frame keys; later video -> all video;
       actions -> [first frame ; actions]), and an unmasked SDPA is eligible for the flash / cuDNN kernels on GPU,
       which a dense mask rules out. Softmax over a subset of keys is exactly softmax with the others masked out,
       so the two backends agree to rounding.

The plan (query blocks and their key ranges) is derived from the dense mask that `mot.build_mask` builds once per
forward — the mask stays the single source of truth — and reused by every layer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

Backend = Literal["auto", "dense", "split"]
_BACKEND: Backend = "auto"  # auto: split on CUDA, dense elsewhere
# A mask needing more query blocks than this (nothing in this model comes close) is left to the dense path.
MAX_BLOCKS = 16


@dataclass(frozen=True)
class QueryBlock:
    """Query rows `q` (a contiguous range) see exactly the keys in `keys` (contiguous ranges, in order)."""

    q: slice
    keys: tuple[slice, ...]


AttentionPlan = tuple[QueryBlock, ...]


def set_attention_backend(name: Backend) -> None:
    global _BACKEND
    if name not in ("auto", "dense", "split"):
        raise ValueError(f"unknown attention backend {name!r}; choose auto, dense or split")
    _BACKEND = name


def get_attention_backend() -> Backend:
    return _BACKEND


@contextlib.contextmanager
def attention_backend(name: Backend) -> Iterator[None]:
    previous = _BACKEND
    set_attention_backend(name)
    try:
        yield
    finally:
        set_attention_backend(previous)


def plan_from_mask(mask: torch.Tensor, max_blocks: int = MAX_BLOCKS) -> AttentionPlan | None:
    """Query blocks of a boolean [Sq, Sk] mask; None when it needs more than `max_blocks` (use the dense path)."""
    m = mask.detach().to("cpu", torch.bool)  # tiny (Sq x Sk bools); one transfer per forward, not per layer
    sq = m.shape[0]
    starts = [0] + (torch.nonzero((m[1:] != m[:-1]).any(dim=1)).flatten() + 1).tolist()
    if len(starts) > max_blocks:
        return None
    blocks = []
    for start, end in zip(starts, starts[1:] + [sq]):
        row = m[start].to(torch.int8)
        edges = torch.diff(torch.cat([torch.zeros(1, dtype=torch.int8), row, torch.zeros(1, dtype=torch.int8)]))
        run_starts = torch.nonzero(edges == 1).flatten().tolist()
        run_ends = torch.nonzero(edges == -1).flatten().tolist()
        if not run_starts:
            raise ValueError(f"query rows {start}..{end - 1} may attend to nothing")
        blocks.append(QueryBlock(slice(start, end), tuple(slice(a, b) for a, b in zip(run_starts, run_ends))))
    return tuple(blocks)


def attention_plan(mask: torch.Tensor | None, device: torch.device | str) -> AttentionPlan | None:
    """The split plan for `mask` when the selected backend splits on `device`; None means: use the dense path."""
    if mask is None:
        return None
    backend = _BACKEND
    if backend == "auto":
        backend = "split" if torch.device(device).type == "cuda" else "dense"
    return plan_from_mask(mask) if backend == "split" else None


def _gather(x: torch.Tensor, ranges: tuple[slice, ...]) -> torch.Tensor:
    # One range is a view (no copy); several are concatenated (only the fast-mode action block: prefix + own keys).
    return x[:, :, ranges[0]] if len(ranges) == 1 else torch.cat([x[:, :, r] for r in ranges], dim=2)


def joint_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    plan: AttentionPlan | None = None,
) -> torch.Tensor:
    """q [B, H, Sq, Dh], k/v [B, H, Sk, Dh], mask [Sq, Sk] bool (True = may attend) or None -> [B, H, Sq, Dh].

    With a `plan` (from `attention_plan` / `plan_from_mask` of this same mask) the mask is not used: each query block
    runs unmasked over its own key ranges.
    """
    if plan is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    outs = [F.scaled_dot_product_attention(q[:, :, b.q], _gather(k, b.keys), _gather(v, b.keys)) for b in plan]
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
