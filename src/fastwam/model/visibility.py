"""Who may attend to whom: token groups, visibility rules, and the variants built from them.

This is the only place attention masks are made. A *variant* is data — a visibility rule over token groups plus an
inference schedule and loss weights — never a subclass or a copy of the model.

Token groups (the sequence is their concatenation, in this order when present):
  VIDEO   noisy video latents; latent frame 0 is the clean observation (t = 0)
  COND    clean conditioning video (IDM only; noised with probability `cond_noise_prob` in training)
  ACTION  the noisy action chunk

Relations between a query group and a key group (True = may attend):
  NONE                 never
  ALL                  every key token
  FIRST_FRAME_CAUSAL   first-frame queries see only first-frame keys; later-frame queries see every key
  KEY_FIRST_FRAME      every query sees only the first-frame keys
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, IntEnum
from typing import Literal

import torch


class Group(IntEnum):
    VIDEO = 0
    COND = 1
    ACTION = 2


class Rel(Enum):
    NONE = "none"
    ALL = "all"
    FIRST_FRAME_CAUSAL = "first-frame causal"
    KEY_FIRST_FRAME = "first frame only"


@dataclass(frozen=True)
class VisibilityRule:
    name: str
    # (query group, key group, relation); pairs not listed are NONE.
    table: tuple[tuple[Group, Group, Rel], ...]

    def relation(self, query: Group, key: Group) -> Rel:
        for q, k, rel in self.table:
            if q == query and k == key:
                return rel
        return Rel.NONE

    def mask(self, q_group: torch.Tensor, q_first: torch.Tensor, k_group: torch.Tensor, k_first: torch.Tensor):
        """Boolean [Sq, Sk] mask from per-token group ids and first-frame flags (True = may attend)."""
        allowed = torch.zeros(len(q_group), len(k_group), dtype=torch.bool, device=q_group.device)
        for q, k, rel in self.table:
            pair = (q_group == q)[:, None] & (k_group == k)[None, :]
            if rel is Rel.ALL:
                ok = pair
            elif rel is Rel.FIRST_FRAME_CAUSAL:
                ok = pair & (~q_first[:, None] | k_first[None, :])
            elif rel is Rel.KEY_FIRST_FRAME:
                ok = pair & k_first[None, :]
            else:
                continue
            allowed |= ok
        return allowed


V, C, A = Group.VIDEO, Group.COND, Group.ACTION
FFC, ALL, KFF = Rel.FIRST_FRAME_CAUSAL, Rel.ALL, Rel.KEY_FIRST_FRAME

# Fast-WAM: actions see only the clean first frame, so future video can be dropped at test time.
FAST_RULE = VisibilityRule("fast", ((V, V, FFC), (A, A, ALL), (A, V, KFF)))
# Joint: actions see all (noisy) video; video and actions must be denoised together at test time.
JOINT_RULE = VisibilityRule("joint", ((V, V, FFC), (A, A, ALL), (A, V, ALL)))
# IDM: actions see a clean (generated, at test time) video; the noisy and clean copies never see each other.
IDM_RULE = VisibilityRule("idm", ((V, V, FFC), (C, C, FFC), (A, A, ALL), (A, C, ALL)))
# No mask at all (a single expert alone: diffusers' Wan forward).
FULL_RULE = VisibilityRule("full", tuple((q, k, ALL) for q in Group for k in Group))

InferenceMode = Literal["fast", "joint", "idm"]


@dataclass(frozen=True)
class Variant:
    """A training/inference recipe: visibility rule + inference schedule + loss weights."""

    name: str
    rule: VisibilityRule
    inference: InferenceMode
    video_loss_weight: float = 1.0
    action_loss_weight: float = 1.0
    cond_noise_prob: float = 0.0  # IDM: probability of noising the conditioning video during training


VARIANTS: dict[str, Variant] = {
    "fast": Variant("fast", FAST_RULE, "fast"),
    "joint": Variant("joint", JOINT_RULE, "joint"),
    "idm": Variant("idm", IDM_RULE, "idm", cond_noise_prob=0.5),
    # "removes only the video objective": same mask and inference as Fast-WAM, video loss weight 0.
    "no_cotrain": Variant("no_cotrain", FAST_RULE, "fast", video_loss_weight=0.0),
}

# `fastwam pretrain`'s objective: the video expert alone (no action expert, no action tokens), video loss only. Not a
# policy variant: a video prior is the starting point of one (`fastwam train --init-from`).
VIDEO_PRIOR = Variant("video", FAST_RULE, "fast", action_loss_weight=0.0)

# The rule each inference mode runs under (a fast-mode pass never holds future video, so its rule is FAST's).
MODE_RULES: dict[str, VisibilityRule] = {"fast": FAST_RULE, "joint": JOINT_RULE, "idm": IDM_RULE}


def get_variant(name: str) -> Variant:
    if name == VIDEO_PRIOR.name:
        return VIDEO_PRIOR
    try:
        return VARIANTS[name]
    except KeyError:
        raise ValueError(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}") from None


def group_table(rule: VisibilityRule, groups: tuple[Group, ...] = (V, C, A)) -> str:
    """A markdown table of the rule: rows are queries, columns keys."""
    names = [g.name.lower() for g in groups]
    lines = ["| query \\ key | " + " | ".join(names) + " |", "|---" * (len(groups) + 1) + "|"]
    for q in groups:
        lines.append(f"| {q.name.lower()} | " + " | ".join(rule.relation(q, k).value for k in groups) + " |")
    return "\n".join(lines)
