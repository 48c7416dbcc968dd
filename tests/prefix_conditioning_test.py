"""Training-time action conditioning (train.action_prefix_max; real-time chunking without guidance)."""

import dataclasses

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fastwam import checkpoint as ckpt_io
from fastwam.config import get_preset
from fastwam.data.synthetic import SyntheticClips
from fastwam.errors import UserError
from fastwam.model.fastwam import FastWAM, TrainingNoise
from fastwam.model.rtc import ActionGuide
from fastwam.model.visibility import FAST_RULE, VARIANTS
from fastwam.policy import FastWAMPolicy
from fastwam.train import train
from fastwam.training import init_from


def _model(cfg, seed=0):
    torch.manual_seed(seed)
    return FastWAM(cfg.model).eval()


def _inputs(cfg, b=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    m = cfg.model
    return dict(
        latents=torch.randn(b, m.latent_channels, m.latent_frames, 4, 4, generator=g),
        actions=torch.randn(b, m.action_horizon, m.action_dim, generator=g),
        state=torch.randn(b, m.state_dim, generator=g),
        text=torch.randn(b, 3, m.text_dim, generator=g),
    )


def _noise(cfg, inp, prefix_max=0, seed=0):
    return TrainingNoise.draw(VARIANTS["fast"], inp["latents"].shape, inp["actions"].shape,
                              torch.Generator().manual_seed(seed), action_prefix_max=prefix_max)


def _train_cfg(prefix_max=0, steps=3):
    cfg = get_preset("tiny")
    return cfg.replace(train=dataclasses.replace(cfg.train, steps=steps, save_every=steps, batch_size=4,
                                                 action_prefix_max=prefix_max))


@pytest.fixture(scope="module")
def prefix_run(tmp_path_factory):
    cfg = _train_cfg(prefix_max=3)
    out = tmp_path_factory.mktemp("prefix_run")
    train(cfg, out, dataset=SyntheticClips(cfg.data, num_clips=8), progress=False)
    return out


@torch.no_grad()
def test_per_action_timesteps_all_equal_give_the_one_per_chunk_velocity():
    cfg = get_preset("tiny")
    model = _model(cfg)
    inp = _inputs(cfg)
    video_ctx, action_ctx = model.condition(inp["text"], inp["state"])
    cache = model.prefill(inp["latents"][:, :, :1], video_ctx, FAST_RULE)
    x = inp["actions"]
    plain = model.action_velocity(x, 0.7, cache, action_ctx, FAST_RULE)
    none_clean = torch.zeros(x.shape[:2], dtype=torch.bool)
    torch.testing.assert_close(model.action_velocity(x, 0.7, cache, action_ctx, FAST_RULE, clean=none_clean), plain,
                               rtol=0, atol=1e-6)


def test_the_prefix_draw_leaves_every_other_draw_as_it_was():
    cfg = get_preset("tiny")
    inp = _inputs(cfg, b=64)
    plain, with_prefix = _noise(cfg, inp), _noise(cfg, inp, prefix_max=3)
    assert plain.prefix_a is None
    for name in ("sigma_v", "sigma_a", "noise_v", "noise_a"):
        assert torch.equal(getattr(plain, name), getattr(with_prefix, name)), name
    assert set(with_prefix.prefix_a.tolist()) == {0, 1, 2, 3}  # d ~ U{0..N}: plain chunks are still trained


def test_the_prefix_is_fed_clean_and_left_out_of_the_loss():
    cfg = get_preset("tiny")
    model = _model(cfg)
    inp = _inputs(cfg)
    noise = _noise(cfg, inp)
    base = model.loss(**inp, variant=VARIANTS["fast"], noise=noise).action
    noise.prefix_a = torch.zeros(3, dtype=torch.long)  # d = 0 everywhere: the plain objective, exactly
    assert torch.equal(model.loss(**inp, variant=VARIANTS["fast"], noise=noise).action, base)
    noise.prefix_a = torch.tensor([2, 4, 1])
    with_prefix = model.loss(**inp, variant=VARIANTS["fast"], noise=noise).action
    assert not torch.equal(with_prefix, base)
    # The noise at the prefix's positions reaches neither the input (the actions are clean there) nor the loss.
    other = dataclasses.replace(noise, noise_a=noise.noise_a.clone())
    other.noise_a[0, :2] += 5.0
    other.noise_a[1, :4] -= 3.0
    other.noise_a[2, :1] *= -1
    assert torch.equal(model.loss(**inp, variant=VARIANTS["fast"], noise=other).action, with_prefix)
    # ... while noise after it does.
    other.noise_a[0, 2] += 1.0
    assert not torch.equal(model.loss(**inp, variant=VARIANTS["fast"], noise=other).action, with_prefix)


@torch.no_grad()
def test_prefix_sampling_pins_the_prefix_and_reads_nothing_after_it():
    cfg = get_preset("tiny")
    model = _model(cfg)
    inp = _inputs(cfg, b=2)
    first, text, state = inp["latents"][:, :, :1], inp["text"], inp["state"]
    noise = torch.randn(2, cfg.model.action_horizon, cfg.model.action_dim, generator=torch.Generator().manual_seed(3))
    target = torch.randn_like(noise)
    h = cfg.model.action_horizon

    def sample(tgt, delay):
        guide = ActionGuide(tgt, torch.zeros(2, h), torch.tensor(delay), method="prefix")
        return model.sample(first, text, state, steps=4, action_noise=noise, guide=guide).actions

    plain = model.sample(first, text, state, steps=4, action_noise=noise).actions
    assert torch.equal(sample(target, [0, 0]), plain)  # nothing executing: plain sampling, bit for bit
    out = sample(target, [3, 1])
    assert torch.equal(out[0, :3], target[0, :3]) and torch.equal(out[1, :1], target[1, :1])
    assert torch.isfinite(out).all()
    changed_after = target.clone()
    changed_after[0, 3:] += 1.0
    changed_after[1, 1:] -= 1.0
    assert torch.equal(sample(changed_after, [3, 1]), out)  # nothing past the prefix is read
    changed_in = target.clone()
    changed_in[0, 0] += 1.0
    assert not torch.equal(sample(changed_in, [3, 1])[0, 3:], out[0, 3:])  # the rest is conditioned on the prefix


def test_a_policy_trained_with_a_prefix_continues_chunks_by_it(prefix_run):
    policy = FastWAMPolicy.from_pretrained(prefix_run)
    assert policy.metadata["realtime_method"] == "prefix"
    rng = np.random.default_rng(0)
    obs = {k: rng.integers(0, 255, size=(16, 20, 3), dtype=np.uint8) for k in policy.camera_keys}
    obs["observation/state"] = rng.normal(size=policy.cfg.model.state_dim).astype(np.float32)
    obs["prompt"] = "move the square right"
    h, a = policy.cfg.model.action_horizon, policy.cfg.model.action_dim
    prev = rng.uniform(-1, 1, size=(h - 2, a)).astype(np.float32)
    out = policy.infer(obs, prev_chunk=prev, inference_delay=2)["actions"]
    np.testing.assert_allclose(out[:2], prev[:2], atol=1e-6)  # what the robot executes meanwhile
    plain = policy.infer(obs)["actions"]
    assert np.isfinite(out).all() and not np.allclose(out[2:], plain[2:])
    guided = FastWAMPolicy.from_pretrained(prefix_run, rtc_method="guidance")
    assert guided.metadata["realtime_method"] == "guidance"
    assert not np.allclose(guided.infer(obs, prev_chunk=prev, inference_delay=2)["actions"][2:], out[2:])
    assert FastWAMPolicy.from_pretrained(prefix_run, rtc_method=None).rtc_method == "prefix"
    with pytest.raises(ValueError, match="rtc_method must be guidance or prefix"):
        FastWAMPolicy.from_pretrained(prefix_run, rtc_method="inpaint")


def test_init_action_copy_fine_tunes_a_trained_policy(prefix_run, tmp_path):
    cfg = _train_cfg(prefix_max=2, steps=1)
    cfg = cfg.replace(train=dataclasses.replace(cfg.train, init_from=str(prefix_run), init_action="copy", lr=0.0))
    train(cfg, tmp_path / "tuned", dataset=SyntheticClips(cfg.data, num_clips=8), progress=False)
    source = load_file(ckpt_io.resolve_checkpoint(prefix_run) / ckpt_io.WEIGHTS)
    tuned = load_file(ckpt_io.resolve_checkpoint(tmp_path / "tuned") / ckpt_io.WEIGHTS)
    assert set(tuned) == set(source)
    for k, v in source.items():  # lr 0: the copy is exact (Adam moves nothing)
        assert torch.equal(tuned[k], v), k


def test_init_action_copy_from_a_video_prior_is_refused(tmp_path):
    cfg = get_preset("tiny")
    prior = cfg.replace(train=dataclasses.replace(cfg.train, steps=1, save_every=1, batch_size=4, variant="video"),
                        model=dataclasses.replace(cfg.model, action_expert=False))
    train(prior, tmp_path / "prior", dataset=SyntheticClips(prior.data, num_clips=4), progress=False)
    tuned = cfg.replace(train=dataclasses.replace(cfg.train, init_from=str(tmp_path / "prior"), init_action="copy"))
    with pytest.raises(UserError, match="has no action expert"):
        init_from.initialise(FastWAM(tuned.model), tuned)


@pytest.mark.parametrize("change, message", [
    (dict(action_prefix_max=4), r"must be below the chunk length \(4\)"),
    (dict(action_prefix_max=-1), "action_prefix_max must be an integer >= 0"),
    (dict(action_prefix_max=2, variant="video"), "needs an action objective"),
])
def test_bad_prefix_settings_are_refused_in_one_line(tmp_path, change, message):
    cfg = get_preset("tiny")
    cfg = cfg.replace(train=dataclasses.replace(cfg.train, steps=1, batch_size=4, **change))
    if change.get("variant") == "video":
        cfg = cfg.replace(model=dataclasses.replace(cfg.model, action_expert=False))
    with pytest.raises(UserError, match=message):
        train(cfg, tmp_path / "run", dataset=SyntheticClips(cfg.data, num_clips=4), progress=False)


@pytest.mark.parametrize("flag, method", [("auto", "prefix"), ("guidance", "guidance")])
def test_serve_takes_the_checkpoints_method_unless_told(prefix_run, flag, method):
    from fastwam.serving import serve_cli
    from fastwam.serving.server import ServeArgs

    policy = serve_cli._load_policy(ServeArgs(checkpoint=str(prefix_run), rtc_method=flag, threads=1))
    assert policy.metadata["realtime_method"] == method
