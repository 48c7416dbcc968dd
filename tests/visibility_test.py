"""Contract: the who-sees-whom table of every variant, including IDM's three groups."""

import pytest
import torch

from fastwam.model.visibility import (
    FAST_RULE,
    IDM_RULE,
    JOINT_RULE,
    VARIANTS,
    Group,
    Rel,
    get_variant,
    group_table,
)

V, C, A = Group.VIDEO, Group.COND, Group.ACTION


def _tokens(layout):
    """layout: list of (group, frame) per token -> group ids, first-frame flags."""
    groups = torch.tensor([int(g) for g, _ in layout])
    first = torch.tensor([f == 0 for _, f in layout])
    return groups, first


# Two video frames x 2 tokens, two cond frames x 2 tokens, 2 action tokens.
LAYOUT = [(V, 0), (V, 0), (V, 1), (V, 1), (C, 0), (C, 0), (C, 1), (C, 1), (A, -1), (A, -1)]
IDX = {"v0": [0, 1], "v1": [2, 3], "c0": [4, 5], "c1": [6, 7], "a": [8, 9]}


def _block(mask, q, k):
    return mask[IDX[q]][:, IDX[k]]


def _expected(rule):
    """Who-sees-whom at token-block level, written out by hand from docs/reference.md, "Attention masks"."""
    if rule is FAST_RULE:
        sees = {"v0": {"v0"}, "v1": {"v0", "v1"}, "a": {"v0", "a"}, "c0": set(), "c1": set()}
    elif rule is JOINT_RULE:
        sees = {"v0": {"v0"}, "v1": {"v0", "v1"}, "a": {"v0", "v1", "a"}, "c0": set(), "c1": set()}
    else:
        sees = {"v0": {"v0"}, "v1": {"v0", "v1"}, "c0": {"c0"}, "c1": {"c0", "c1"}, "a": {"c0", "c1", "a"}}
    return sees


@pytest.mark.parametrize("rule", [FAST_RULE, JOINT_RULE, IDM_RULE], ids=lambda r: r.name)
def test_token_level_visibility(rule):
    groups, first = _tokens(LAYOUT)
    mask = rule.mask(groups, first, groups, first)
    expected = _expected(rule)
    for q in IDX:
        for k in IDX:
            block = _block(mask, q, k)
            want = k in expected[q]
            assert bool(block.all()) == want and bool(block.any()) == want, (rule.name, q, k)


def test_group_relations():
    assert FAST_RULE.relation(A, V) is Rel.KEY_FIRST_FRAME
    assert JOINT_RULE.relation(A, V) is Rel.ALL
    assert IDM_RULE.relation(A, V) is Rel.NONE and IDM_RULE.relation(A, C) is Rel.ALL
    assert IDM_RULE.relation(V, C) is Rel.NONE and IDM_RULE.relation(C, V) is Rel.NONE
    for rule in (FAST_RULE, JOINT_RULE, IDM_RULE):
        # Video never sees actions: the property that makes the video prefix cacheable.
        assert rule.relation(V, A) is Rel.NONE and rule.relation(C, A) is Rel.NONE
        assert rule.relation(V, V) is Rel.FIRST_FRAME_CAUSAL


def test_variants_are_data():
    assert set(VARIANTS) == {"fast", "joint", "idm", "no_cotrain"}
    nc, fast = get_variant("no_cotrain"), get_variant("fast")
    assert nc.rule is fast.rule and nc.inference == fast.inference == "fast"
    assert nc.video_loss_weight == 0 and fast.video_loss_weight == 1
    assert get_variant("idm").cond_noise_prob == 0.5 and get_variant("idm").inference == "idm"
    assert get_variant("joint").inference == "joint"
    with pytest.raises(ValueError, match="unknown variant"):
        get_variant("nope")


def test_group_table_markdown():
    table = group_table(FAST_RULE)
    assert "| action | first frame only | none | all |" in table
