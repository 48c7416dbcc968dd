"""The evaluation axes of the imagination study produce the observations they claim to.

- visual shifts change what the cameras see, never the physics (same actions -> same states), and only the images
  they say (the camera shift moves the scene camera, not the wrist one);
- observation latency gives the policy the observation made `d` steps before re-planning and executes the actions
  its chunk plans for "now", chunk[d : d + replan] (checked against a replay of the same actions);
- re-planning after K actions executes exactly K actions of each chunk.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("metaworld")

from fastwam.envs.metaworld import VISUAL_SHIFTS, MetaWorldEnv  # noqa: E402
from fastwam.eval import metaworld as mwe  # noqa: E402

TASK = "reach-v3"


def _images_and_states(shift: str, actions: np.ndarray):
    with MetaWorldEnv(TASK, mwe.env_seed_for(0), image_size=(32, 32), shift=shift) as env:
        obs = env.reset()
        images, states = [obs["images"]], [obs["state"]]
        for a in actions:
            obs, *_ = env.step(a)
            images.append(obs["images"])
            states.append(obs["state"])
    return images, np.stack(states)


def test_visual_shifts_change_pixels_not_physics():
    actions = np.random.default_rng(0).uniform(-1, 1, size=(6, 4)).astype(np.float32)
    base_images, base_states = _images_and_states("none", actions)
    for shift in VISUAL_SHIFTS[1:]:
        images, states = _images_and_states(shift, actions)
        np.testing.assert_array_equal(states, base_states)  # the same physics
        for cam in ("scene", "wrist"):
            diff = np.mean([np.abs(a[cam].astype(int) - b[cam].astype(int)).mean()
                            for a, b in zip(images, base_images)])
            if shift == "camera" and cam == "wrist":
                assert diff == 0, "the camera shift moves the scene camera only"
            else:
                assert diff > 2.0, (shift, cam, diff)  # a visible change (mean absolute difference, 0..255)
    with pytest.raises(ValueError, match="unknown visual shift"):
        MetaWorldEnv(TASK, 0, shift="fog")


class _Recorder(mwe._Adapter):
    """A policy that returns the same chunk every time (row j distinct) and records the states it was shown."""

    def __init__(self, horizon: int = 16):
        self.name, self.horizon, self.cameras, self.image_size = "recorder", horizon, ("scene",), (32, 32)
        self.default_mode, self.modes = "fast", ("fast",)
        j = np.arange(horizon, dtype=np.float32)
        self.chunk = np.stack([0.6 * np.sin(j), 0.6 * np.cos(j), 0.3 * np.sin(2 * j), np.zeros_like(j)], axis=1)
        self.seen: list[np.ndarray] = []

    def act(self, obs, specs, mode, want_video):
        self.seen += [np.asarray(o["state"]) for o in obs]
        return [{"actions": self.chunk} for _ in obs]


def _replay(chunk: np.ndarray, executed: list[slice], steps: int) -> np.ndarray:
    """States after 0, 1, ..., steps actions when the given chunk slices are executed one after another."""
    with MetaWorldEnv(TASK, mwe.env_seed_for(0), image_size=(32, 32), cameras=("scene",)) as env:
        states = [env.reset(render=False)["state"]]
        for part in executed:
            for a in chunk[part]:
                if len(states) > steps:
                    break
                states.append(env.step(a, render=False)[0]["state"])
    return np.stack(states)


@pytest.mark.parametrize("delay", [0, 4, 8])  # 8 = replan: observed at the segment's start (back-to-back inference)
def test_observation_delay_lags_the_observation_and_compensates_the_actions(delay, tmp_path):
    k, steps = 8, 24
    rec = _Recorder()
    res = mwe.evaluate(rec, TASK, episodes=1, seeds=[0], replan=k, max_steps=steps, workers=0, video_episodes=0,
                       num_envs=1, progress=False, obs_delay=delay, out_dir=tmp_path)
    assert res["config"]["obs_delay"] == delay and res["cells"][0]["episode_length"] == [steps]
    # Executed: chunk[0:k] first (planned at rest), then chunk[d:d+k] for every later plan.
    executed = [slice(0, k)] + [slice(delay, delay + k)] * (steps // k)
    states = _replay(rec.chunk, executed, steps)
    # The policy saw the reset state, then the state d steps before each re-planning time (k, 2k).
    assert len(rec.seen) == steps // k
    for call, seen in enumerate(rec.seen):
        at = 0 if call == 0 else call * k - delay
        np.testing.assert_allclose(seen, states[at], atol=1e-6, err_msg=f"call {call}: expected the state at {at}")


def test_delay_and_shift_are_validated():
    rec = _Recorder(horizon=16)
    with pytest.raises(ValueError, match="obs_delay"):
        mwe.evaluate(rec, TASK, episodes=1, replan=8, obs_delay=9, workers=0, video_episodes=0, progress=False)
    with pytest.raises(ValueError, match="obs_delay"):
        mwe.evaluate(rec, TASK, episodes=1, replan=12, obs_delay=6, workers=0, video_episodes=0, progress=False)
    with pytest.raises(ValueError, match="unknown shift"):
        mwe.evaluate(rec, TASK, episodes=1, replan=8, shift="fog", workers=0, video_episodes=0, progress=False)


def test_shift_reaches_the_rendered_images(tmp_path):
    """The evaluator renders with the shift: the first observation differs from the unshifted one."""
    firsts = {}
    for shift in ("none", "colour"):
        class First(_Recorder):
            def act(self, obs, specs, mode, want_video):
                firsts.setdefault(shift, obs[0]["images"]["scene"].copy())
                return super().act(obs, specs, mode, want_video)

        res = mwe.evaluate(First(), TASK, episodes=1, seeds=[0], replan=8, max_steps=8, workers=0, video_episodes=0,
                           num_envs=1, progress=False, shift=shift)
        assert res["config"]["shift"] == shift
    assert np.abs(firsts["none"].astype(int) - firsts["colour"].astype(int)).mean() > 2.0


def test_compile_reaches_the_policy(monkeypatch, tmp_path):
    """`eval metaworld --compile` loads the checkpoint with compiled inference (the policy's own tests check that
    compiled actions equal eager ones)."""
    from fastwam import policy as policy_module

    seen = {}

    def fake_from_pretrained(path, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setattr(policy_module.FastWAMPolicy, "from_pretrained", staticmethod(fake_from_pretrained))
    with pytest.raises(RuntimeError, match="stop here"):
        mwe.evaluate(str(tmp_path), TASK, episodes=1, workers=0, video_episodes=0, progress=False, compile=True)
    assert seen["compile"] is True


class _Continuing(_Recorder):
    """A real-time-chunking policy stand-in: returns the same chunk, its first d rows replaced by the previous chunk's
    (as `FastWAMPolicy` pins them), and records what it was given."""

    realtime_chunking = True

    def __init__(self, horizon: int = 16):
        super().__init__(horizon)
        self.given: list = []

    def act(self, obs, specs, mode, want_video, realtime=None):
        self.seen += [np.asarray(o["state"]) for o in obs]
        self.given += list(realtime) if realtime is not None else [None] * len(obs)
        out = []
        for i in range(len(obs)):
            chunk = self.chunk.copy()
            if realtime is not None and realtime[i] is not None:
                prev, d = realtime[i]
                chunk[:d] = prev[:d]
            out.append({"actions": chunk})
        return out


@pytest.mark.parametrize("chunking,d", [("naive", 4), ("rtc", 4), ("naive", 8), ("rtc", 8)])
def test_async_execution_runs_the_old_chunk_during_inference_and_continues_it(chunking, d, tmp_path):
    k, steps = 8, 24  # d = k: inference takes the whole segment (run back to back); all the old chunk left is pinned
    rec = _Continuing()
    res = mwe.evaluate(rec, TASK, episodes=1, seeds=[0], replan=k, max_steps=steps, workers=0, video_episodes=0,
                       num_envs=1, progress=False, chunking=chunking, inference_delay=d, out_dir=tmp_path)
    assert res["config"]["chunking"] == chunking and res["config"]["inference_delay"] == d
    assert res["config"]["obs_delay"] == d  # the observation is d steps old when the new chunk takes over
    # The first chunk is planned at rest (nothing to continue); every later one is given the old chunk from the
    # observation's time on (plan[lag + k - d:], lag = 0 for the first plan, d after) and d.
    if chunking == "naive":
        assert rec.given == [None] * 3
    else:
        assert rec.given[0] is None
        for call, (prev, delay) in enumerate(rec.given[1:], start=1):
            lag = 0 if call == 1 else d
            assert delay == d
            np.testing.assert_array_equal(prev, rec.chunk[lag + k - d:])
    # Executed: chunk[0:k], then chunk[d:d+k] per later plan; the smoothness summary is measured on exactly those.
    segs = [rec.chunk[0:k]] + [rec.chunk[d:d + k]] * 2
    seam = np.mean([np.linalg.norm(b[0] - a[-1]) for a, b in zip(segs, segs[1:])])
    within = np.mean(np.concatenate([np.linalg.norm(np.diff(s, axis=0), axis=1) for s in segs]))
    smooth = res["summary"]["fast"]["smoothness"]
    assert smooth["seams"] == 2
    assert smooth["seam_jump"] == pytest.approx(seam) and smooth["within_chunk_jump"] == pytest.approx(within)


def test_sync_execution_is_todays_evaluation_exactly(tmp_path):
    k, steps = 8, 24
    runs = {}
    for name, kw in {"today": {}, "sync0": dict(chunking="sync"), "sync4": dict(chunking="sync", inference_delay=4)
                     }.items():
        rec = _Recorder()
        res = mwe.evaluate(rec, TASK, episodes=2, seeds=[0], replan=k, max_steps=steps, workers=0, video_episodes=0,
                           num_envs=1, progress=False, **kw)
        runs[name] = ([{k: v for k, v in c.items() if k != "latency"} for c in res["cells"]], rec.seen)
    for name in ("sync0", "sync4"):  # the robot waits: the delay costs no motion
        assert runs[name][0] == runs["today"][0]
        np.testing.assert_array_equal(np.stack(runs[name][1]), np.stack(runs["today"][1]))


def test_async_options_are_validated():
    rec = _Recorder(horizon=16)
    kw = dict(episodes=1, replan=8, workers=0, video_episodes=0, progress=False)
    with pytest.raises(ValueError, match="inference_delay must be in"):
        mwe.evaluate(rec, TASK, chunking="naive", inference_delay=9, **kw)
    with pytest.raises(ValueError, match="needs asynchronous execution"):
        mwe.evaluate(rec, TASK, inference_delay=2, **kw)
    with pytest.raises(ValueError, match="one delay"):
        mwe.evaluate(rec, TASK, chunking="naive", inference_delay=2, obs_delay=2, **kw)
    with pytest.raises(ValueError, match="real-time chunking"):  # this adapter cannot continue a chunk
        mwe.evaluate(rec, TASK, chunking="rtc", inference_delay=2, **kw)
    with pytest.raises(ValueError, match="unknown chunking"):
        mwe.evaluate(rec, TASK, chunking="smooth", **kw)
