"""Mixture of transformers: one attention per layer over the tokens of several experts, and the K/V cache.

Per layer, each stream's own expert block makes its q/k/v (own norms, own RoPE); the streams' tokens are
concatenated and ONE attention runs with the visibility mask of the variant; each stream then applies its own
output projection, cross-attention and FFN. The K/V of a prefix (the clean first frame in fast mode, the generated
video in IDM mode) can be recorded once and reused by every later denoising step: queries of later streams attend
to [cached K/V ; own K/V], which is exactly the full masked forward as long as the prefix tokens never look at the
later ones — the property the visibility rules guarantee and the tests check.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
from torch.utils.checkpoint import checkpoint

from fastwam.model.attention import attention_plan, get_attention_backend, joint_attention
from fastwam.model.visibility import Group, VisibilityRule


@dataclass
class Stream:
    """The tokens of one group on their way through the layers."""

    group: Group
    expert: torch.nn.Module  # VideoExpert or ActionExpert (has .blocks)
    x: torch.Tensor  # [B, S, D_expert]
    temb: torch.Tensor  # [B, S or 1, D_expert]  (for the output head)
    time_mod: torch.Tensor  # [B, S or 1, 6, D_expert]
    rope: tuple[torch.Tensor, torch.Tensor]  # cos, sin [S, head_dim / 2]
    first_frame: torch.Tensor  # bool [S]: token belongs to latent frame 0
    # [B, L, D_expert] text (+ state) context projected by this expert, or its per-layer cross-attention K/V from
    # `Expert.cross_kv` (samplers compute those once: the context does not change over the denoising steps).
    context: torch.Tensor | list[tuple[torch.Tensor, torch.Tensor]]

    def __len__(self) -> int:
        return self.x.shape[1]

    def group_ids(self) -> torch.Tensor:
        return torch.full((len(self),), int(self.group), dtype=torch.long, device=self.x.device)


Layout = tuple  # (mask [Sq, Sk] bool or None, attention plan or None): what every layer of one forward shares


Part = tuple  # (group, number of tokens, number of leading tokens in latent frame 0): one stream, by shape alone


@dataclass
class KVCache:
    """Per-layer keys/values [B, H, S_prefix, Dh] of a prefix, and the prefix's streams by shape (what the mask needs:
    per-token group ids and first-frame flags follow from them, `part_tokens`)."""

    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)
    parts: tuple[Part, ...] = ()

    def __len__(self) -> int:
        return sum(n for _, n, _ in self.parts)

    def action_layout(self, rule: VisibilityRule, num_tokens: int) -> Layout:
        """The (mask, plan) of `num_tokens` action queries against [this prefix ; themselves]."""
        return parts_layout(rule, [(Group.ACTION, num_tokens, 0)], self.keys[0].device, self)


def part_tokens(parts: list[Part], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token group ids [S] and first-frame flags [S] of streams described by `parts`."""
    group_ids = torch.cat([torch.full((n,), int(g), dtype=torch.long, device=device) for g, n, _ in parts])
    first_frame = torch.cat([torch.arange(n, device=device) < first for _, n, first in parts])
    return group_ids, first_frame


def parts_layout(rule: VisibilityRule, parts: list[Part], device, cache: KVCache | None = None) -> Layout:
    """The layout of a forward over streams known by their shapes (`parts`), attending to `cache` if given: what a
    sampler builds before a denoising loop, so that the loop itself never builds a mask.

    Memoised on (rule, shapes, device): building a layout reads the device back (`mask.all()`, the split plan's host
    copy), which would stall the queue before every request's denoising loop; a request with known shapes skips it.
    """
    prefix = cache.parts if cache is not None else ()
    parts = tuple(tuple(p) for p in parts)
    return _parts_layout(rule, parts, prefix, torch.device(device), get_attention_backend())


@functools.lru_cache(maxsize=256)
def _parts_layout(rule: VisibilityRule, parts: tuple, prefix: tuple, device: torch.device, backend: str) -> Layout:
    # `backend` is part of the key only: the split plan depends on the attention backend selected when it is built.
    return _layout(rule, *_with_prefix(*part_tokens(list(parts), device), prefix))


def build_mask(rule: VisibilityRule, streams: list[Stream], cache: KVCache | None) -> torch.Tensor | None:
    """Boolean [Sq, Sk] mask for the streams' queries against [cache ; streams] keys; None when nothing is hidden."""
    return _mask(rule, *_stream_tokens(streams, cache))


def _stream_tokens(streams: list[Stream], cache: KVCache | None):
    q_group = torch.cat([s.group_ids() for s in streams])
    return _with_prefix(q_group, torch.cat([s.first_frame for s in streams]), cache.parts if cache else ())


def _with_prefix(q_group, q_first, prefix: tuple[Part, ...]):
    """(query groups, query first-frame flags, key groups, key flags): the keys are [prefix ; queries]."""
    if not prefix:
        return q_group, q_first, q_group, q_first
    p_group, p_first = part_tokens(list(prefix), q_group.device)
    return q_group, q_first, torch.cat([p_group, q_group]), torch.cat([p_first, q_first])


def _mask(rule: VisibilityRule, q_group, q_first, k_group, k_first) -> torch.Tensor | None:
    mask = rule.mask(q_group, q_first, k_group, k_first)
    if not mask.any(dim=1).all():
        raise ValueError(f"rule {rule.name!r} leaves some query tokens with nothing to attend to")
    return None if mask.all() else mask


def _layout(rule: VisibilityRule, q_group, q_first, k_group, k_first) -> Layout:
    mask = _mask(rule, q_group, q_first, k_group, k_first)
    # GPU: per-query-block unmasked attention instead of the dense mask (see attention.py); None = dense path.
    return mask, attention_plan(mask, q_group.device)


def run_layers(
    streams: list[Stream],
    rule: VisibilityRule,
    cache: KVCache | None = None,
    record: KVCache | None = None,
    grad_checkpointing: bool = False,
    need_output: bool = True,
    layout: Layout | None = None,
) -> list[torch.Tensor]:
    """Run every MoT layer over `streams`; returns each stream's final tokens.

    cache:  attend to these prefix K/V as well (they were recorded by an earlier call).
    record: store this call's per-layer K/V (for later calls to use as a prefix; the caller sets its `parts`).
    need_output: False skips the last layer's output half (only the recorded K/V are wanted).
    layout: the (mask, plan) of this call, when the caller built it already (see `KVCache.action_layout`).
    """
    if layout is None:
        if cache is not None and len(cache) and all(s.group == Group.ACTION for s in streams):
            layout = cache.action_layout(rule, sum(len(s) for s in streams))
        else:
            layout = _layout(rule, *_stream_tokens(streams, cache))
    mask, plan = layout
    xs = [s.x for s in streams]
    num_layers = len(streams[0].expert.blocks)
    for i in range(num_layers):
        prefix = (cache.keys[i], cache.values[i]) if cache is not None and len(cache) else None
        last = i == num_layers - 1
        if grad_checkpointing and torch.is_grad_enabled():
            xs = checkpoint(_layer, i, streams, xs, mask, prefix, record, plan=plan, use_reentrant=False)
        else:
            xs = _layer(i, streams, xs, mask, prefix, record, skip_output=last and not need_output, plan=plan)
    return xs


def _layer(i, streams, xs, mask, prefix, record, skip_output: bool = False, plan=None):
    blocks = [s.expert.blocks[i] for s in streams]
    mods = [b.modulation(s.time_mod) for b, s in zip(blocks, streams)]
    qkv = [b.attention_inputs(x, m, s.rope) for b, x, m, s in zip(blocks, xs, mods, streams)]
    q, k, v = (torch.cat(t, dim=2) for t in zip(*qkv))
    if record is not None:
        record.keys.append(k)
        record.values.append(v)
    if skip_output:
        return xs
    if prefix is not None:
        k = torch.cat([prefix[0], k], dim=2)
        v = torch.cat([prefix[1], v], dim=2)
    out = joint_attention(q, k, v, mask, plan).split([x.shape[1] for x in xs], dim=2)
    ctx = [s.context[i] if isinstance(s.context, list) else b.attn2.context_kv(s.context)
           for b, s in zip(blocks, streams)]
    return [b.finish(x, o, m, c) for b, x, o, m, c in zip(blocks, xs, out, mods, ctx)]
