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


# --------------------------------------------------------------------------------------------- bounded work, metadata


def _strings(value):
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, str):
        yield value


def test_metadata_names_the_checkpoint_without_paths_and_declares_limits(checkpoint):
    from fastwam.serving import msgpack_numpy as mn

    policy = FastWAMPolicy.from_pretrained(checkpoint)
    meta = policy.metadata
    assert str(checkpoint).encode() not in mn.packb(meta)
    assert not [s for s in _strings(meta) if s.startswith("/") or "/tmp" in s or "\\" in s]
    assert meta["checkpoint"] == f"{checkpoint.name}/step_0000003" and meta["checkpoint_step"] == 3
    assert len(meta["checkpoint_sha256"]) == 16
    for key in policy.camera_keys:
        assert meta["observation_spec"][key]["max_shape"] == [256, 256, 3]  # max(256, 4 x the 8 px input)
    assert meta["observation_spec"]["prompt"]["max_length"] == 1024


def test_served_policy_refuses_images_and_prompts_beyond_its_declared_limits(checkpoint):
    from fastwam.serving.client import ServerError, WebsocketClient
    from fastwam.serving.server import PolicyServer

    policy = FastWAMPolicy.from_pretrained(checkpoint, max_image_side=32, max_prompt_chars=20)
    spec = policy.metadata["observation_spec"]
    assert spec[policy.camera_keys[0]]["max_shape"] == [32, 32, 3] and spec["prompt"]["max_length"] == 20
    largest = _obs(policy, prompt="x" * 20)
    largest[policy.camera_keys[1]] = np.zeros((32, 32, 3), np.uint8)
    too_wide = dict(largest, **{policy.camera_keys[1]: np.zeros((2, 33, 3), np.uint8)})
    with PolicyServer(policy, "127.0.0.1", 0) as server:
        with WebsocketClient(port=server.port) as client:
            np.testing.assert_allclose(client.infer(largest)["actions"], policy.infer(largest)["actions"], atol=1e-5)
        refused = [(too_wide, "has shape (2, 33, 3); this server accepts at most (32, 32, 3)"),
                   (_obs(policy, prompt="x" * 21), "'prompt' is 21 characters long; this server accepts at most 20")]
        for obs, message in refused:
            with WebsocketClient(port=server.port) as client, pytest.raises(ServerError) as info:
                client.infer(obs)
            assert message in str(info.value)


def test_wide_images_are_cropped_before_resizing(checkpoint, monkeypatch):
    """resize_crop scales to cover the target first: a 2 x 100,000 image became 8 x 400,000 floats. The policy crops
    such an image to at most 2x the target's aspect ratio first; ordinary images reach it untouched."""
    from fastwam import policy as policy_module
    from fastwam.policy import crop_to_aspect

    wide = np.arange(2 * 640 * 3, dtype=np.int64).astype(np.uint8).reshape(2, 640, 3)
    cropped = crop_to_aspect(wide, (8, 8))
    assert cropped.shape == (2, 4, 3) and np.shares_memory(cropped, wide)  # a view: no copy of the excess
    np.testing.assert_array_equal(cropped, wide[:, 318:322])
    assert crop_to_aspect(wide.transpose(1, 0, 2), (8, 8)).shape == (4, 2, 3)
    for shape in [(16, 20, 3), (480, 640, 3), (720, 1280, 3)]:  # every real camera: preprocessing stays training's
        normal = np.zeros(shape, np.uint8)
        assert crop_to_aspect(normal, (8, 8)) is normal

    seen = []
    real = policy_module.compose_cameras
    monkeypatch.setattr(policy_module, "compose_cameras",
                        lambda images, cfg: seen.append([i.shape for i in images]) or real(images, cfg))
    policy = FastWAMPolicy.from_pretrained(checkpoint)
    seen.clear()
    obs = _obs(policy)
    obs[policy.camera_keys[0]] = wide
    assert np.isfinite(policy.infer(obs)["actions"]).all()
    assert seen == [[(2, 4, 3), (16, 20, 3)]]


def test_prompt_may_be_a_0d_string_array(checkpoint):
    policy = FastWAMPolicy.from_pretrained(checkpoint)
    as_str = policy.infer(_obs(policy, prompt="move the square right"))["actions"]
    as_array = policy.infer(_obs(policy, prompt=np.asarray("move the square right")))["actions"]
    np.testing.assert_array_equal(as_str, as_array)


def test_text_embedding_cache_is_a_bounded_lru(checkpoint):
    policy = FastWAMPolicy.from_pretrained(checkpoint, text_cache_entries=8)
    first = policy.infer(_obs(policy, prompt="task 0"))["actions"]
    for i in range(1, 40):
        policy.infer(_obs(policy, prompt=f"task {i}"))
    assert len(policy.text_cache) == 8 and "task 39" in policy.text_cache and "task 0" not in policy.text_cache
    hits = policy.text_cache.hits
    policy.infer(_obs(policy, prompt="task 39"))
    assert policy.text_cache.hits == hits + 1
    np.testing.assert_array_equal(policy.infer(_obs(policy, prompt="task 0"))["actions"], first)  # re-encoded alike
    small = FastWAMPolicy.from_pretrained(checkpoint, text_cache_mb=2e-3)  # ~2 KB: a handful of tiny embeddings
    for i in range(40):
        small.infer(_obs(small, prompt=f"task {i}"))
    assert small.text_cache.nbytes <= 2e-3 * 2**20 and 1 <= len(small.text_cache) < 40


def test_serve_seed_reaches_the_policy_and_its_metadata(checkpoint):
    """`fastwam serve --seed 42` (the official LIBERO evaluation's noise) samples with that seed on every request."""
    from fastwam.serving.serve_cli import _load_policy
    from fastwam.serving.server import ServeArgs

    served = _load_policy(ServeArgs(checkpoint=str(checkpoint), seed=42, threads=1))
    assert served.seed == 42 and served.metadata["seed"] == 42
    obs = _obs(served)
    again = FastWAMPolicy.from_pretrained(checkpoint, seed=42, device="cpu")
    other = FastWAMPolicy.from_pretrained(checkpoint, seed=0, device="cpu")
    np.testing.assert_array_equal(served.infer(obs)["actions"], again.infer(obs)["actions"])
    assert not np.array_equal(served.infer(obs)["actions"], other.infer(obs)["actions"])
