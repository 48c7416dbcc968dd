"""Contracts of acting in real time: any step count, and real-time chunking (RTC) in the model and the policy."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from fastwam.config import get_preset
from fastwam.data.synthetic import SyntheticClips
from fastwam.model import flow
from fastwam.model.fastwam import FastWAM
from fastwam.model.rtc import ActionGuide, rtc_weights
from fastwam.policy import FastWAMPolicy
from fastwam.train import train


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg = get_preset("tiny")
    cfg = cfg.replace(
        train=dataclasses.replace(cfg.train, steps=3, save_every=3, batch_size=4),
        model=dataclasses.replace(cfg.model, action_horizon=8),
        data=dataclasses.replace(cfg.data, action_horizon=8),
    )
    out = tmp_path_factory.mktemp("realtime_run")
    train(cfg, out, dataset=SyntheticClips(cfg.data, num_clips=8), progress=False)
    return out


@pytest.fixture(scope="module")
def policy(checkpoint):
    return FastWAMPolicy.from_pretrained(checkpoint)


def _obs(policy, seed=0):
    rng = np.random.default_rng(seed)
    obs = {k: rng.integers(0, 255, size=(16, 20, 3), dtype=np.uint8) for k in policy.camera_keys}
    obs["observation/state"] = rng.normal(size=policy.cfg.model.state_dim).astype(np.float32)
    obs["prompt"] = "move the square right"
    return obs


def _inputs(cfg, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = cfg.model
    first = torch.randn(b, m.latent_channels, 1, 4, 4, generator=g)
    return first, torch.randn(b, 6, m.text_dim, generator=g), torch.randn(b, m.state_dim, generator=g), \
        torch.randn(b, m.action_horizon, m.action_dim, generator=g)


def _euler_reference(model, first, text, state, noise, steps, shift=flow.DEFAULT_SHIFT):
    """The sampler written out by hand: prefill once, then `steps` Euler steps of the action expert."""
    from fastwam.model.visibility import MODE_RULES

    rule = MODE_RULES["fast"]
    video_ctx, action_ctx = model.condition(text, state)
    cache = model.prefill(first, video_ctx, rule)
    sigmas = flow.euler_sigmas(steps, shift)
    x = noise
    for i in range(steps):
        x = x + (sigmas[i + 1] - sigmas[i]) * model.action_velocity(x, sigmas[i], cache, action_ctx, rule)
    return x


@pytest.mark.parametrize("steps", [1, 2, 4, 10])
@torch.no_grad()
def test_n_step_sampling_is_n_euler_steps(steps):
    cfg = get_preset("tiny")
    model = FastWAM(cfg.model).eval()
    first, text, state, noise = _inputs(cfg)
    out = model.sample(first, text, state, steps=steps, action_noise=noise).actions
    torch.testing.assert_close(out, _euler_reference(model, first, text, state, noise, steps), rtol=0, atol=1e-6)


def test_policy_steps_default_to_the_checkpoint_and_override_per_call(checkpoint, policy):
    obs = _obs(policy)
    n = policy.cfg.inference.steps
    assert policy.steps == n and policy.metadata["inference_steps"] == n
    assert policy.metadata["realtime_chunking"] is True
    default = policy.infer(obs)["actions"]
    np.testing.assert_array_equal(policy.infer(obs, steps=n)["actions"], default)
    one = policy.infer(obs, steps=1)["actions"]
    assert one.shape == default.shape and not np.array_equal(one, default)
    two = FastWAMPolicy.from_pretrained(checkpoint, steps=2)
    assert two.metadata["inference_steps"] == 2
    np.testing.assert_array_equal(two.infer(obs)["actions"], policy.infer(obs, steps=2)["actions"])
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="steps"):
            policy.infer(obs, steps=bad)


def test_rtc_weights_follow_the_paper():
    w = rtc_weights(8, overlap=6, delay=2)
    assert w[:2].tolist() == [1.0, 1.0] and w[6:].tolist() == [0.0, 0.0]
    soft = w[2:6]
    assert bool((soft > 0).all() and (soft < 1).all() and (soft[1:] < soft[:-1]).all())  # decaying
    assert rtc_weights(8, overlap=0, delay=0).abs().sum() == 0
    with pytest.raises(ValueError, match="inference_delay"):
        rtc_weights(8, overlap=3, delay=4)


def test_rtc_with_delay_zero_is_plain_sampling_bit_for_bit(policy):
    obs = _obs(policy)
    plain = policy.infer(obs)["actions"]
    prev = np.random.default_rng(1).uniform(-1, 1, size=(5, 4)).astype(np.float32)
    np.testing.assert_array_equal(policy.infer(obs, prev_chunk=prev, inference_delay=0)["actions"], plain)
    # In a batch where another request is guided, an unguided one still gets exactly its plain chunk.
    other = _obs(policy, seed=3)
    out = policy.infer_batch([obs, other], prev_chunks=[None, prev], inference_delays=[0, 2])
    np.testing.assert_array_equal(out[0]["actions"], policy.infer_batch([obs, other])[0]["actions"])


@pytest.mark.parametrize("mode", ["fast", "idm"])
def test_rtc_pins_the_executing_actions_and_continues_the_previous_chunk(policy, mode):
    obs = _obs(policy)
    plain = policy.infer(obs, mode=mode)["actions"]
    # A previous chunk far from what the policy would do alone: the guided chunk must bend towards it.
    prev = (plain[:6] + 0.5).astype(np.float32)
    out = policy.infer(obs, mode=mode, prev_chunk=prev, inference_delay=3)["actions"]
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(out[:3], prev[:3])  # exactly what the robot executes meanwhile
    gap = lambda a: float(np.abs(a[3:6] - prev[3:6]).mean())  # noqa: E731  the soft overlap
    assert gap(out) < gap(plain)


def test_rtc_guidance_is_finite_and_pulls_towards_the_target_in_the_model():
    cfg = get_preset("tiny")
    model = FastWAM(cfg.model).eval()
    first, text, state, noise = _inputs(cfg)
    h, a = cfg.model.action_horizon, cfg.model.action_dim
    target = torch.full((2, h, a), 2.0)
    weights = torch.stack([rtc_weights(h, h, 1), torch.zeros(h)])
    guide = ActionGuide(target, weights, torch.tensor([1, 0]))
    plain = model.sample(first, text, state, action_noise=noise).actions
    out = model.sample(first, text, state, action_noise=noise, guide=guide).actions
    assert torch.isfinite(out).all()
    assert torch.equal(out[0, :1], target[0, :1])
    torch.testing.assert_close(out[1], plain[1], rtol=0, atol=0)  # zero weight: untouched
    assert (out[0, 1:] - 2.0).abs().mean() < (plain[0, 1:] - 2.0).abs().mean()
    with pytest.raises(ValueError, match="joint"):
        model.sample(first, text, state, mode="joint", action_noise=noise, guide=guide)


@pytest.mark.parametrize("prev, delay, message", [
    (None, 2, "needs prev_chunk"),
    (np.zeros((3, 5), np.float32), 1, "shape"),
    (np.zeros((9, 4), np.float32), 1, "shape"),
    (np.full((3, 4), np.nan, np.float32), 1, "NaN"),
    (np.zeros((3, 4), np.float32), 4, "exceeds"),
    (np.zeros((3, 4), np.float32), -1, "non-negative"),
    (np.array([["a"] * 4]), 1, "numeric"),
])
def test_bad_realtime_fields_get_clear_errors(policy, prev, delay, message):
    with pytest.raises(ValueError, match=message):
        policy.infer(_obs(policy), prev_chunk=prev, inference_delay=delay)


def test_rtc_is_refused_for_joint(policy):
    with pytest.raises(ValueError, match="fast or idm"):
        policy.infer(_obs(policy), mode="joint", prev_chunk=np.zeros((4, 4), np.float32), inference_delay=1)


@pytest.mark.filterwarnings("ignore:connect\\(\\) must be used as a context manager:DeprecationWarning")
def test_realtime_fields_round_trip_over_the_wire_and_old_requests_are_unchanged(policy):
    from fastwam.serving import msgpack_numpy as mn
    from fastwam.serving.client import ServerError, WebsocketClient
    from fastwam.serving.server import PolicyServer
    from fastwam.serving.testing import ZeroPolicy

    obs, other = _obs(policy), _obs(policy, seed=5)
    prev = np.random.default_rng(2).uniform(-1, 1, size=(6, 4)).astype(np.float32)
    with PolicyServer(policy, "127.0.0.1", 0, max_batch=4, batch_timeout_ms=5) as server:
        with WebsocketClient(port=server.port) as client:
            assert client.metadata["realtime_chunking"] is True
            np.testing.assert_array_equal(client.infer(obs)["actions"], policy.infer(obs)["actions"])
            reply = client.infer(obs, prev_chunk=prev, inference_delay=2)
            np.testing.assert_array_equal(reply["actions"],
                                          policy.infer(obs, prev_chunk=prev, inference_delay=2)["actions"])
            np.testing.assert_array_equal(reply["actions"][:2], prev[:2])
            # A plain request is answered as before, even right after a guided one.
            np.testing.assert_array_equal(client.infer(other)["actions"], policy.infer(other)["actions"])
        for bad, message in ((dict(prev_chunk=prev[:, :3], inference_delay=1), "shape"),
                             (dict(inference_delay=2), "needs 'prev_chunk'"),
                             (dict(prev_chunk=prev, inference_delay=-1), "inference_delay"),
                             (dict(prev_chunk="abc", inference_delay=1), "2-D numeric array")):
            with WebsocketClient(port=server.port) as client:
                client._ws.send(mn.packb({**obs, **bad}))
                with pytest.raises(ServerError, match=message):
                    client._recv()
    zero = ZeroPolicy(image_size=16)  # its infer_batch takes no prev_chunks
    with PolicyServer(zero, "127.0.0.1", 0) as server, WebsocketClient(port=server.port) as client:
        from fastwam.serving.protocol import example_observation

        with pytest.raises(ServerError, match="no real-time chunking"):
            client.infer(example_observation(zero.metadata), prev_chunk=prev, inference_delay=1)


def test_rtc_guidance_never_overshoots_in_one_step_and_leaves_ten_steps_alone():
    guide = ActionGuide(torch.zeros(1, 4, 4), torch.ones(1, 4), torch.tensor([1]))
    assert guide.guidance_scale(1.0) == 5.0 and guide.step_scale(1.0, 0.0) == 1.0  # one step of size 1: at most 1
    sigmas = flow.euler_sigmas(10).tolist()
    for s, s_next in zip(sigmas, sigmas[1:]):  # the plain 10-step schedule: the cap never binds
        assert guide.step_scale(s, s_next) == guide.guidance_scale(s)
    # A velocity that does not depend on x: x0_hat = x - k moves one-for-one with x. One guided step with every
    # weight 1 then lands exactly on the target (with the uncapped beta = 5 it would overshoot it 4x).
    k, target = torch.full((1, 4, 4), 0.5), torch.full((1, 4, 4), -1.0)
    guide = ActionGuide(target, torch.ones(1, 4), torch.tensor([0]))
    x = torch.randn(1, 4, 4)
    v = guide.guided_velocity(lambda z: k + 0 * z, x, 1.0, 0.0)
    torch.testing.assert_close(flow.euler_step(x, v, 1.0, 0.0), target)


def test_async_runner_drives_a_real_policy_from_a_background_thread(policy):
    """The robot-side loop with the in-process policy and real threads: every request is accepted (the previous
    chunk and delay it sends are valid), the robot gets finite actions every tick, and the replies are the policy's
    own chunks (each executed action is one of them)."""
    from fastwam.serving.realtime import AsyncChunkRunner

    replies = []
    real_infer = policy.infer

    def recording_infer(obs, **kwargs):
        reply = real_infer(obs, **kwargs)
        replies.append(reply["actions"])
        return reply

    wrapped = type("Wrapped", (), {"infer": staticmethod(recording_infer), "reset": policy.reset})()
    with AsyncChunkRunner(wrapped, replan=4, chunking="rtc") as runner:
        actions = [runner.act(_obs(policy, seed=t)) for t in range(24)]
        runner.reset()
    assert all(a.shape == (policy.cfg.model.action_dim,) and np.isfinite(a).all() for a in actions)
    assert runner.stats.requests >= 24 // 4 and runner.stats.ticks == 24
    executed = np.stack(actions)
    pool = np.concatenate(replies)
    assert all(np.isclose(pool, a).all(axis=1).any() for a in executed)


def test_bench_realtime_reports_delays_stalls_and_the_loops_timing(checkpoint, capsys):
    from fastwam.bench import realtime as bench_realtime

    assert bench_realtime.cli(["--checkpoint", str(checkpoint), "--hz", "500", "--ticks", "24", "--replan", "4",
                               "--step-counts", "1,2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["replan"] == 4 and report["chunking"] == "rtc" and report["inference_delay"] == "learnt"
    assert set(report["step_counts"]) == {"1", "2"}
    for r in report["step_counts"].values():
        assert r["ticks"] == 24 and r["requests"] >= 24 // 4
        assert sum(r["delay_counts"].values()) <= r["requests"] - 1  # the episode's first chunk is no measurement
        assert r["act_ms"]["p50"] <= r["act_ms"]["max"] and r["inference_ms"]["p50"] > 0
        assert 0 <= r["planned_delay_at_end"] <= 4 and r["missed_deadlines"] >= 0


@pytest.mark.filterwarnings("ignore:connect\\(\\) must be used as a context manager:DeprecationWarning")
def test_bench_realtime_drives_a_served_policy_over_the_wire(policy, capsys):
    """`--server`: the runner's policy is a websocket client, as on a robot; the step count is the server's."""
    from fastwam.bench import realtime as bench_realtime
    from fastwam.serving.server import PolicyServer

    with PolicyServer(policy, "127.0.0.1", 0) as server:
        assert bench_realtime.cli(["--server", f"127.0.0.1:{server.port}", "--hz", "500", "--ticks", "16",
                                   "--replan", "4", "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["policy_at"] == f"127.0.0.1:{server.port}" and report["machine"]["device"] == "server"
        (n, r), = report["step_counts"].items()
        assert int(n) == policy.steps and r["ticks"] == 16 and r["requests"] >= 16 // 4
        assert r["inference_ms"]["p50"] > 0
        with pytest.raises(SystemExit, match="its own"):
            bench_realtime.cli(["--server", f"127.0.0.1:{server.port}", "--step-counts", "1,2"])
    with pytest.raises(SystemExit, match="exactly one"):
        bench_realtime.cli(["--hz", "10"])
    with pytest.raises(SystemExit, match="host:port"):
        bench_realtime.cli(["--server", "nowhere"])
