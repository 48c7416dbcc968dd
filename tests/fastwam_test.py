"""Contracts of the model: future-video independence, cache equivalence, batching, overfitting, full-scale sizes."""

import pytest
import torch

from fastwam.config import get_preset
from fastwam.model import flow
from fastwam.model.fastwam import FastWAM
from fastwam.model.visibility import FAST_RULE, IDM_RULE, JOINT_RULE, VARIANTS


def _model(cfg, seed=0):
    torch.manual_seed(seed)
    return FastWAM(cfg.model).eval()


def _inputs(cfg, b=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    m = cfg.model
    h = w = 4
    return dict(
        latents=torch.randn(b, m.latent_channels, m.latent_frames, h, w, generator=g),
        actions=torch.randn(b, m.action_horizon, m.action_dim, generator=g),
        state=torch.randn(b, m.state_dim, generator=g),
        text=torch.randn(b, 3, m.text_dim, generator=g),
    )


def _action_velocity_full(model, latents, actions, sigma, inp, rule):
    video_ctx, action_ctx = model.contexts(inp["text"], inp["state"])
    _, v_a = model.velocities(latents, actions, sigma, video_ctx, action_ctx, rule)
    return v_a


@torch.no_grad()
def test_future_video_independence(tiny_cfg):
    model, inp = _model(tiny_cfg), _inputs(tiny_cfg)
    sigma = torch.tensor([0.7, 0.3])
    lat = inp["latents"]
    other = lat.clone()
    other[:, :, 1:] = torch.randn_like(other[:, :, 1:]) * 100.0  # any other finite values
    fast_a = _action_velocity_full(model, lat, inp["actions"], sigma, inp, FAST_RULE)
    fast_b = _action_velocity_full(model, other, inp["actions"], sigma, inp, FAST_RULE)
    assert torch.equal(fast_a, fast_b), "fast mask: action output must not depend on future video (bit for bit)"
    joint_a = _action_velocity_full(model, lat, inp["actions"], sigma, inp, JOINT_RULE)
    joint_b = _action_velocity_full(model, other, inp["actions"], sigma, inp, JOINT_RULE)
    assert (joint_a - joint_b).abs().max() > 1e-3, "joint mask: actions must see future video"
    # The first frame does matter under the fast mask.
    first = lat.clone()
    first[:, :, :1] += 1.0
    assert (fast_a - _action_velocity_full(model, first, inp["actions"], sigma, inp, FAST_RULE)).abs().max() > 1e-3


@torch.no_grad()
def test_cached_fast_inference_equals_full_masked_forward(tiny_cfg):
    model, inp = _model(tiny_cfg), _inputs(tiny_cfg)
    steps, b = 4, inp["latents"].shape[0]
    noise = torch.randn_like(inp["actions"])
    video_ctx, action_ctx = model.contexts(inp["text"], inp["state"])
    cache = model.prefill(inp["latents"][:, :, :1], video_ctx, FAST_RULE)
    sigmas = flow.euler_sigmas(steps).tolist()
    x_cached, x_full = noise.clone(), noise.clone()
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        v_cached = model.action_velocity(x_cached, s, cache, action_ctx, FAST_RULE)
        # Full masked forward over all video frames (future frames arbitrary) + actions.
        v_full = _action_velocity_full(model, inp["latents"], x_full, torch.full((b,), s), inp, FAST_RULE)
        assert (v_cached - v_full).abs().max() <= 1e-5
        x_cached = flow.euler_step(x_cached, v_cached, s, s_next)
        x_full = flow.euler_step(x_full, v_full, s, s_next)
    out = model.sample(inp["latents"][:, :, :1], inp["text"], inp["state"], "fast", steps=steps, action_noise=noise)
    assert (out.actions - x_full).abs().max() <= 1e-5


def test_fast_sampling_builds_its_masks_once_per_shape(tiny_cfg, monkeypatch):
    """Mask building syncs with the device: no denoising step builds one, and a request of a known shape builds none."""
    from fastwam.model import mot

    model, inp = _model(tiny_cfg), _inputs(tiny_cfg)
    mot._parts_layout.cache_clear()
    calls = []
    real = mot._mask
    monkeypatch.setattr(mot, "_mask", lambda *a, **k: calls.append(1) or real(*a, **k))
    noise = torch.randn_like(inp["actions"])
    out = model.sample(inp["latents"][:, :, :1], inp["text"], inp["state"], "fast", steps=6, action_noise=noise)
    assert len(calls) == 2  # the prefill's layout, then the action steps' (not one per step)
    again = model.sample(inp["latents"][:, :, :1], inp["text"], inp["state"], "fast", steps=6, action_noise=noise)
    assert len(calls) == 2 and torch.equal(out.actions, again.actions)


@torch.no_grad()
def test_idm_cache_equals_full_masked_forward(tiny_cfg):
    """IDM: actions over the cached clean video == full forward over [noisy video | cond video | actions]."""
    model, inp = _model(tiny_cfg), _inputs(tiny_cfg)
    video_ctx, action_ctx = model.contexts(inp["text"], inp["state"])
    cond = inp["latents"]
    cache = model.prefill(cond, video_ctx, IDM_RULE, group=VARIANTS["idm"].rule.table[1][0])
    x_a, s = inp["actions"], 0.6
    v_cached = model.action_velocity(x_a, s, cache, action_ctx, IDM_RULE)
    from fastwam.model.mot import run_layers
    from fastwam.model.visibility import Group

    sig = torch.full((x_a.shape[0],), s)
    noisy = torch.randn_like(cond)
    streams = [
        model.video.to_stream(noisy, model.video.token_timesteps(noisy, sig), video_ctx, Group.VIDEO),
        model.video.to_stream(cond, torch.zeros(x_a.shape[0], 1), video_ctx, Group.COND),
        model.action.to_stream(x_a, 1000.0 * sig, action_ctx),
    ]
    out = run_layers(streams, IDM_RULE)
    v_full = model.action.head(out[-1], streams[-1].temb)
    assert (v_cached - v_full).abs().max() <= 1e-5


@pytest.mark.parametrize("mode", ["fast", "joint", "idm"])
@torch.no_grad()
def test_batch_equals_single_calls(tiny_cfg, mode):
    model, inp = _model(tiny_cfg), _inputs(tiny_cfg, b=3)
    m = tiny_cfg.model
    first = inp["latents"][:, :, :1]
    a_noise = torch.randn(3, m.action_horizon, m.action_dim)
    v_noise = torch.randn(3, m.latent_channels, m.latent_frames - 1, 4, 4)
    batch = model.sample(first, inp["text"], inp["state"], mode, steps=3, action_noise=a_noise, video_noise=v_noise)
    for i in range(3):
        single = model.sample(
            first[i : i + 1], inp["text"][i : i + 1], inp["state"][i : i + 1], mode, steps=3,
            action_noise=a_noise[i : i + 1], video_noise=v_noise[i : i + 1],
        )
        assert (single.actions - batch.actions[i : i + 1]).abs().max() <= 1e-5


@torch.no_grad()
def test_sampling_modes_and_video(tiny_cfg):
    model, inp = _model(tiny_cfg), _inputs(tiny_cfg)
    first = inp["latents"][:, :, :1]
    g = torch.Generator().manual_seed(0)
    fast = model.sample(first, inp["text"], inp["state"], "fast", steps=2, generator=g, return_video=True)
    assert fast.video is None and fast.actions.shape == inp["actions"].shape
    for mode in ("joint", "idm"):
        out = model.sample(first, inp["text"], inp["state"], mode, steps=2, generator=g, return_video=True)
        assert out.video.shape == inp["latents"].shape
        assert torch.equal(out.video[:, :, :1], first), "the observed frame is never changed"
        assert torch.isfinite(out.actions).all()
    with pytest.raises(ValueError, match="unknown inference mode"):
        model.sample(first, inp["text"], inp["state"], "dream")
    with pytest.raises(ValueError, match=r"\[B, C, 1, H, W\]"):
        model.sample(inp["latents"], inp["text"], inp["state"], "fast")


def test_seeded_sampling_is_deterministic(tiny_cfg):
    model, inp = _model(tiny_cfg), _inputs(tiny_cfg)
    first = inp["latents"][:, :, :1]
    a = model.sample(first, inp["text"], inp["state"], generator=torch.Generator().manual_seed(3)).actions
    b = model.sample(first, inp["text"], inp["state"], generator=torch.Generator().manual_seed(3)).actions
    assert torch.equal(a, b)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_each_variant_overfits_a_fixed_batch(tiny_cfg, variant):
    """With noise and noise levels fixed, the flow loss is a regression every variant can drive down 10x."""
    torch.manual_seed(0)
    model = FastWAM(tiny_cfg.model).train()
    inp = _inputs(tiny_cfg)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(150):
        out = model.loss(**inp, variant=VARIANTS[variant], generator=torch.Generator().manual_seed(0))
        opt.zero_grad()
        out.total.backward()
        opt.step()
        losses.append(out.total.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] / 10, (variant, losses[0], losses[-1])


def test_no_cotrain_has_no_video_loss_but_same_action_loss(tiny_cfg):
    model, inp = _model(tiny_cfg), _inputs(tiny_cfg)
    fast = model.loss(**inp, variant=VARIANTS["fast"], generator=torch.Generator().manual_seed(0))
    nc = model.loss(**inp, variant=VARIANTS["no_cotrain"], generator=torch.Generator().manual_seed(0))
    assert fast.video > 0 and nc.video == 0
    # Dropping the (untrained) future frames does not change the action loss: future-video independence again.
    torch.testing.assert_close(fast.action, nc.action, rtol=0, atol=1e-6)


def test_padding_masks_exclude_padded_steps(tiny_cfg):
    from fastwam.model.fastwam import _weighted_sample_mean

    model, inp = _model(tiny_cfg), _inputs(tiny_cfg)
    m = tiny_cfg.model
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    no_actions = torch.zeros(2, m.action_horizon, dtype=torch.bool)
    only_first_frame = torch.zeros(2, m.latent_frames, dtype=torch.bool)
    only_first_frame[:, 0] = True
    out = model.loss(**inp, variant=VARIANTS["fast"], latent_mask=only_first_frame, action_mask=no_actions,
                     generator=g())
    assert out.action == 0 and out.video == 0  # frame 0 is never in the video loss; everything else is padding
    full = model.loss(**inp, variant=VARIANTS["fast"], generator=g())
    partial_mask = torch.ones(2, m.action_horizon, dtype=torch.bool)
    partial_mask[1, 2:] = False
    partial = model.loss(**inp, variant=VARIANTS["fast"], action_mask=partial_mask, generator=g())
    assert full.action > 0 and partial.action > 0 and partial.action != full.action
    # The official reduction: each sample's mean over its unmasked elements, times its weight, then the batch mean.
    err = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    want = (1.0 * (1 + 2) / 2 + 2.0 * 4 / 1) / 2
    assert _weighted_sample_mean(err, mask, torch.tensor([1.0, 2.0])).item() == pytest.approx(want)
    # A sample that is all padding contributes 0 (its mean is guarded, not NaN).
    assert _weighted_sample_mean(err, torch.zeros_like(mask), torch.ones(2)).item() == 0.0


def test_libero_preset_parameter_counts():
    """The paper's shapes on the meta device: a ~5B Wan2.2 video expert and a ~1B action expert."""
    cfg = get_preset("libero_2cam224").model
    with torch.device("meta"):
        model = FastWAM(cfg)
    counts = model.num_parameters()
    assert 4.8e9 < counts["video_expert"] < 5.2e9, counts
    assert 0.8e9 < counts["action_expert"] < 1.3e9, counts
