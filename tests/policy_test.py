"""Contracts of FastWAMPolicy: training preprocessing, un-normalisation, batching, determinism, clear errors."""

import dataclasses

import numpy as np
import pytest
import torch

from fastwam.config import get_preset
from fastwam.data.synthetic import SyntheticClips
from fastwam.data.transforms import compose_cameras
from fastwam.policy import FastWAMPolicy
from fastwam.train import train


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg = get_preset("tiny")
    cfg = cfg.replace(train=dataclasses.replace(cfg.train, steps=3, save_every=3, batch_size=4))
    out = tmp_path_factory.mktemp("policy_run")
    data = SyntheticClips(cfg.data, num_clips=8)
    train(cfg, out, dataset=data, progress=False)
    return out


def _obs(policy, seed=0, prompt="move the square right"):
    rng = np.random.default_rng(seed)
    obs = {k: rng.integers(0, 255, size=(16, 20, 3), dtype=np.uint8) for k in policy.camera_keys}
    obs["observation/state"] = rng.normal(size=policy.cfg.model.state_dim).astype(np.float32)
    obs["prompt"] = prompt
    return obs


def test_from_pretrained_metadata_and_shapes(checkpoint):
    policy = FastWAMPolicy.from_pretrained(checkpoint)
    meta = policy.metadata
    assert meta["mode"] == "fast" and meta["action_shape"] == [4, 4]
    assert meta["frame_stride"] == policy.cfg.data.frame_stride
    assert set(meta["observation_spec"]) == {*policy.camera_keys, "observation/state", "prompt"}
    out = policy.infer(_obs(policy))
    assert out["actions"].shape == (4, 4) and out["actions"].dtype == np.float32
    assert np.isfinite(out["actions"]).all()


def test_bf16_policy_matches_fp32_closely(checkpoint):
    # "auto" is fp32 on CPU; bf16 (the CUDA default) must give nearly the same actions, finite, as float32 arrays.
    fp32 = FastWAMPolicy.from_pretrained(checkpoint)
    bf16 = FastWAMPolicy.from_pretrained(checkpoint, dtype="bf16")
    assert fp32.dtype == torch.float32 and bf16.dtype == torch.bfloat16
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    obs = _obs(fp32)
    a32, a16 = fp32.infer(obs)["actions"], bf16.infer(obs)["actions"]
    assert a16.dtype == np.float32 and np.isfinite(a16).all()
    assert np.abs(a16 - a32).max() <= 0.05 * (np.abs(a32).max() + 1.0)
    with pytest.raises(ValueError, match="unknown dtype"):
        FastWAMPolicy.from_pretrained(checkpoint, dtype="int8")


def test_actions_are_unnormalised_with_the_checkpoint_stats(checkpoint):
    policy = FastWAMPolicy.from_pretrained(checkpoint)
    obs = _obs(policy)
    raw = policy.infer(obs)["actions"]
    # Recompute by hand: the model's normalised output, then the checkpoint's normaliser.
    frames = torch.stack([compose_cameras([obs[k] for k in policy.camera_keys], policy.cfg.data)])
    first = policy.codec.encode(frames[:, :, None])
    state = policy.normalizer.normalize("state", torch.as_tensor(obs["observation/state"])[None])
    text = policy.text_encoder([obs["prompt"]])
    a_noise, _ = policy._noise(first)
    normed = policy.model.sample(first, text, state, "fast", steps=policy.cfg.inference.steps, action_noise=a_noise)
    expected = policy.normalizer.unnormalize("action", normed.actions)[0].numpy()
    np.testing.assert_allclose(raw, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", ["fast", "joint", "idm"])
def test_batch_equals_single_and_is_deterministic(checkpoint, mode):
    policy = FastWAMPolicy.from_pretrained(checkpoint, mode=mode)
    observations = [_obs(policy, seed=i, prompt=p) for i, p in enumerate(["move the square right",
                                                                            "move the square down", "go"])]
    batch = policy.infer_batch(observations)
    for obs, res in zip(observations, batch):
        np.testing.assert_allclose(policy.infer(obs)["actions"], res["actions"], rtol=0, atol=1e-5)
    again = FastWAMPolicy.from_pretrained(checkpoint, mode=mode).infer_batch(observations)
    for a, b in zip(batch, again):
        np.testing.assert_array_equal(a["actions"], b["actions"])


def test_imagined_video_for_joint_and_idm(checkpoint):
    policy = FastWAMPolicy.from_pretrained(checkpoint, mode="joint")
    out = policy.infer(_obs(policy), return_video=True)
    cfg = policy.cfg
    h, w = cfg.data.image_size
    assert out["imagined"].dtype == np.uint8
    assert out["imagined"].shape[0] == cfg.model.latent_frames and out["imagined"].shape[-1] == 3
    assert out["imagined"].shape[1] == h


@pytest.mark.parametrize("mutate, message", [
    (lambda o, p: o.pop(p.camera_keys[0]), "missing key"),
    (lambda o, p: o.__setitem__(p.camera_keys[0], np.zeros((8, 8), np.uint8)), r"\[H, W, 3\]"),
    (lambda o, p: o.__setitem__(p.camera_keys[0], np.zeros((8, 8, 3), np.float32)), "uint8"),
    (lambda o, p: o.__setitem__("observation/state", np.zeros(3, np.float32)), "shape"),
    (lambda o, p: o.__setitem__("observation/state", np.full(4, np.nan, np.float32)), "NaN"),
    (lambda o, p: o.__setitem__("prompt", ""), "prompt"),
])
def test_bad_observations_get_clear_errors(checkpoint, mutate, message):
    policy = FastWAMPolicy.from_pretrained(checkpoint)
    obs = _obs(policy)
    mutate(obs, policy)
    with pytest.raises(ValueError, match=message):
        policy.infer(obs)
    with pytest.raises(ValueError, match="unknown mode"):
        policy.infer(_obs(policy), mode="dream")


def test_real_openpi_client_gets_the_in_process_actions_from_a_checkpoint(checkpoint):
    """`fastwam serve` on a trained checkpoint: the unmodified openpi client gets exactly the in-process actions,
    also with 4 clients at once (micro-batched)."""
    pytest.importorskip("openpi_client", reason="install with `pip install --no-deps openpi-client==0.1.2`")
    import threading

    from openpi_client.websocket_client_policy import WebsocketClientPolicy

    from fastwam.serving.server import PolicyServer

    policy = FastWAMPolicy.from_pretrained(checkpoint)
    observations = [_obs(policy, seed=i) for i in range(4)]
    expected = [policy.infer(o)["actions"] for o in observations]
    with PolicyServer(policy, "127.0.0.1", 0, max_batch=4, batch_timeout_ms=5) as server:
        client = WebsocketClientPolicy(host="127.0.0.1", port=server.port)
        assert client.get_server_metadata()["action_shape"] == [4, 4]
        reply = client.infer(observations[0])
        np.testing.assert_allclose(reply["actions"], expected[0], rtol=0, atol=1e-5)
        assert reply["policy_timing"]["infer_ms"] > 0 and "server_timing" in reply
        results, errors = [None] * 4, []

        def worker(i):
            try:
                c = WebsocketClientPolicy(host="127.0.0.1", port=server.port)
                for _ in range(3):
                    results[i] = c.infer(observations[i])["actions"]
            except Exception as e:  # noqa: BLE001 - surfaced below
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not errors, errors
        for got, want in zip(results, expected):
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_compiled_policy_gives_the_eager_actions(checkpoint, monkeypatch):
    from fastwam.model.fastwam import FastWAM

    real = FastWAM.compile_inference
    # Dynamo tracing without code generation keeps this fast; compile_test.py covers inductor's kernels.
    monkeypatch.setattr(FastWAM, "compile_inference", lambda self, **kw: real(self, backend="eager"))
    torch._dynamo.reset()
    eager = FastWAMPolicy.from_pretrained(checkpoint)
    compiled = FastWAMPolicy.from_pretrained(checkpoint, compile=True)
    assert compiled.model._compiled and not eager.model._compiled
    compiled.warmup(batch_sizes=(1, 2))
    obs = [_obs(eager, seed=i) for i in range(2)]
    for a, b in zip(eager.infer_batch(obs), compiled.infer_batch(obs)):
        np.testing.assert_array_equal(a["actions"], b["actions"])
