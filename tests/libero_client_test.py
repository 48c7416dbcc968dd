"""The LIBERO client against a fake environment with LIBERO's observation format and a fake policy client.

Each test pins one convention of the official Fast-WAM LIBERO evaluation (listed, with these test names, in the
docstring of fastwam.eval.libero); the fakes record what the client sent and what it executed."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from fastwam.eval.libero import (
    DUMMY_ACTION,
    IMAGE_KEY,
    WRIST_KEY,
    LiberoArgs,
    build_observation,
    postprocess_actions,
    process_image,
    quat2axisangle,
    run,
)

RES = 256
# 90 degrees about z, (x, y, z, w): the axis-angle vector is (0, 0, pi/2).
QUAT_Z90 = (0.0, 0.0, math.sin(math.pi / 4), math.cos(math.pi / 4))


def _camera(bottom_channel: int, left_channel: int, h: int = RES, w: int = RES) -> np.ndarray:
    """A render whose bottom half is bright in one channel and left half in another (so a flip is visible)."""
    img = np.zeros((h, w, 3), dtype=np.uint8)
    img[h // 2:, :, bottom_channel] = 255
    img[:, : w // 2, left_channel] = 255
    return img


def _official_center_crop_resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """The official eval script's `_center_crop_resize`, restated for the test."""
    from PIL import Image

    pil_image = Image.fromarray(image)
    src_w, src_h = pil_image.size
    scale = max(width / src_w, height / src_h)
    resized = pil_image.resize((round(src_w * scale), round(src_h * scale)), resample=Image.BILINEAR)
    rw, rh = resized.size
    left = max((rw - width) // 2, 0)
    top = max((rh - height) // 2, 0)
    return np.asarray(resized.crop((left, top, left + width, top + height)), dtype=np.uint8)


def _official_gripper(chunk: np.ndarray) -> np.ndarray:
    """The official post-processing of an un-normalised chunk: 2a - 1, sign flip, np.sign."""
    a = np.array(chunk, dtype=np.float64)
    a[..., -1] = a[..., -1] * 2 - 1
    a[..., -1] = a[..., -1] * -1.0
    a[..., -1] = np.sign(a[..., -1])
    return a


class FakeEnv:
    """LIBERO's OffScreenRenderEnv surface: reset, set_init_state -> obs, step -> (obs, reward, done, info)."""

    def __init__(self, script: dict, resolution: int):
        assert resolution == RES
        self.script = script  # trial -> total env step at which `done` becomes True (None = never)
        self.trial = None
        self.init_states: list = []  # what set_init_state received, episode by episode
        self.actions: list[list[float]] = []
        self.episodes: list[list[list[float]]] = []  # every episode's executed actions
        self.closed = False

    def reset(self):
        self.actions = []
        self.episodes.append(self.actions)

    def _obs(self):
        t = len(self.actions)
        return {
            "agentview_image": _camera(0, 1),
            "robot0_eye_in_hand_image": _camera(2, 0),
            "robot0_eef_pos": np.array([0.1, 0.2, 0.3 + 0.001 * t]),
            "robot0_eef_quat": np.array(QUAT_Z90),
            "robot0_gripper_qpos": np.array([0.04, -0.04]),
        }

    def set_init_state(self, state):
        self.trial = state
        self.init_states.append(state)
        return self._obs()

    def step(self, action):
        assert len(action) == 7
        self.actions.append(list(action))
        t = len(self.actions)
        done_at = self.script.get(self.trial)
        if self.trial == "done_while_waiting":  # `done` during the wait steps must not count
            done = t == 5
        else:
            done = done_at is not None and t >= done_at
        return self._obs(), 0.0, done, {}

    def close(self):
        self.closed = True


class FakeSuite:
    def __init__(self, name: str, scripts: dict):
        self.name, self.scripts = name, scripts
        self.n_tasks = len(scripts)

    def get_task(self, i):
        return {"suite": self.name, "id": i}

    def get_task_init_states(self, i):
        return list(self.scripts[i])  # trial keys double as initial states


class FakeBackend:
    def __init__(self, plan: dict):
        self.plan = plan  # suite -> task -> {trial_key: done_at}
        self.envs = []
        self.seeds: list[int] = []

    def suite(self, name):
        return FakeSuite(name, self.plan[name])

    def make_env(self, task, resolution, seed):
        self.seeds.append(seed)
        env = FakeEnv(self.plan[task["suite"]][task["id"]], resolution)
        self.envs.append(env)
        return env, f"{task['suite']} task {task['id']}"


class FakeClient:
    """Returns 32-action chunks whose first entry encodes the call index; gripper values 0.3, -0.2, 0.0 in turn."""

    def __init__(self, metadata: dict | None = None):
        self.metadata = metadata if metadata is not None else {"fake": True}
        self.requests: list[dict] = []
        self.resets = 0

    def reset(self):
        self.resets += 1

    def infer(self, obs):
        self.requests.append(obs)
        n = len(self.requests)
        chunk = np.zeros((32, 7), dtype=np.float32)
        chunk[:, 0] = n * 100 + np.arange(32)
        chunk[:, -1] = np.array([0.3, -0.2, 0.0] * 11)[:32]
        return {"actions": chunk}


def test_both_cameras_rotated_and_resized():
    """Conventions 2-3 on what the server receives: each camera rotated 180 degrees, then resized to 224 x 224."""
    client = FakeClient()
    run(LiberoArgs(suites="libero_goal", trials=1, out=""), client=client,
        backend=FakeBackend({"libero_goal": {0: {"t0": 31}}}), log=lambda _: None)
    req = client.requests[0]
    for key, (bottom, left) in ((IMAGE_KEY, (0, 1)), (WRIST_KEY, (2, 0))):
        out = req[key]
        assert out.shape == (224, 224, 3) and out.dtype == np.uint8, key
        # After the rotation the bright-bottom channel is at the top and the bright-left channel at the right.
        assert out[5, 5, bottom] == 255 and out[218, 5, bottom] == 0, key
        assert out[5, 218, left] == 255 and out[5, 5, left] == 0, key
        expected = _official_center_crop_resize(np.ascontiguousarray(_camera(bottom, left)[::-1, ::-1]), 224, 224)
        assert np.array_equal(out, expected), key


@pytest.mark.parametrize("shape", [(256, 256), (256, 320), (300, 200), (224, 224), (128, 128)])
def test_centre_crop_resize_matches_official(shape):
    """Convention 3: PIL bilinear cover-resize + centre crop, bit for bit (a square render is a plain resize)."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(*shape, 3), dtype=np.uint8)
    out = process_image(img, 224)
    expected = _official_center_crop_resize(np.ascontiguousarray(img[::-1, ::-1]), 224, 224)
    assert out.shape == (224, 224, 3) and np.array_equal(out, expected)
    if shape[0] == shape[1]:
        from PIL import Image

        plain = np.asarray(Image.fromarray(np.ascontiguousarray(img[::-1, ::-1])).resize((224, 224), Image.BILINEAR))
        assert np.array_equal(out, plain)


def test_policy_composes_side_by_side_once():
    """Convention 4: the client sends uint8 224 x 224 images under the keys the libero_2cam224 policy reads, and the
    policy's composition is [agentview | wrist] scaled once by x * 2/255 - 1, as the official eval does."""
    from fastwam.config import get_preset
    from fastwam.data.transforms import compose_cameras
    from fastwam.policy import camera_obs_key

    data = get_preset("libero_2cam224").data
    assert [camera_obs_key(k) for k in data.cameras] == [IMAGE_KEY, WRIST_KEY]
    req = build_observation(FakeEnv({}, RES)._obs(), "pick it", 224)
    assert req[IMAGE_KEY].dtype == np.uint8 and req[WRIST_KEY].dtype == np.uint8  # not scaled by the client
    frame = compose_cameras([req[k] for k in (IMAGE_KEY, WRIST_KEY)], data).numpy()
    rgb = np.concatenate([req[IMAGE_KEY], req[WRIST_KEY]], axis=1)  # the official side-by-side layout, 224 x 448
    official = rgb.transpose(2, 0, 1).astype(np.float32) * np.float32(2.0 / 255.0) - np.float32(1.0)
    assert frame.shape == (3, 224, 448)
    np.testing.assert_allclose(frame, official, atol=1e-6)


def test_state_and_quaternion():
    np.testing.assert_allclose(quat2axisangle(QUAT_Z90), [0, 0, math.pi / 2], atol=1e-12)
    np.testing.assert_allclose(quat2axisangle((1.0, 0.0, 0.0, 0.0)), [math.pi, 0, 0], atol=1e-12)  # 180 about x
    np.testing.assert_allclose(quat2axisangle((0.0, 0.0, 0.0, 1.0)), [0, 0, 0])  # identity
    obs = FakeEnv({}, RES)._obs()
    req = build_observation(obs, "pick it", 224, mode="fast")
    assert set(req) == {"observation/image", "observation/wrist_image", "observation/state", "prompt", "mode"}
    assert req["observation/state"].dtype == np.float32 and req["observation/state"].shape == (8,)
    np.testing.assert_allclose(req["observation/state"], [0.1, 0.2, 0.3, 0, 0, math.pi / 2, 0.04, -0.04], atol=1e-6)
    assert req["observation/wrist_image"].shape == (224, 224, 3)


def test_gripper_matches_official():
    """Convention 7: `flip01` is the official 2a - 1, sign flip, np.sign; `native` only binarises (np.sign)."""
    chunk = np.zeros((8, 7))
    chunk[:, 0] = np.arange(8)  # other dimensions pass through untouched
    chunk[:, -1] = [0.0, 1.0, 0.5, 0.25, 0.75, -0.3, 1.4, 0.5000001]
    flip = postprocess_actions(chunk, "flip01")
    np.testing.assert_array_equal(flip, _official_gripper(chunk))
    assert flip[:, -1].tolist() == [1, -1, 0, 1, -1, 1, -1, -1]  # 0 (close) -> +1, 1 (open) -> -1, 0.5 -> 0
    assert postprocess_actions(chunk, "native")[:, -1].tolist() == [0, 1, 1, 1, 1, -1, 1, 1]
    assert postprocess_actions(chunk, "native", binarize=False)[:, -1].tolist() == chunk[:, -1].tolist()
    assert (postprocess_actions(chunk, "flip01")[:, :6] == chunk[:, :6]).all()
    with pytest.raises(ValueError, match=r"\[H, 7\]"):
        postprocess_actions(np.zeros((4, 6)))


def test_protocol_end_to_end(tmp_path):
    plan = {
        # total env step at which `done` turns True: 30 waits + 25 policy steps -> success after 25 policy steps
        "libero_spatial": {0: {"t0": 55, "t1": None, "t2": 31}, 1: {"t0": None, "done_while_waiting": None,
                                                                       "t2": 230}},
        "libero_10": {0: {"t0": None, "t1": 500, "t2": 745}},
    }
    backend, client = FakeBackend(plan), FakeClient()
    args = LiberoArgs(suites="libero_spatial,libero_10", trials=3, out=str(tmp_path / "r.json"))
    results = run(args, client=client, backend=backend, log=lambda _: None)

    spatial, long = results["suites"]["libero_spatial"], results["suites"]["libero_10"]
    assert (spatial["successes"], spatial["episodes"]) == (3, 6)
    assert (long["successes"], long["episodes"]) == (1, 3)  # 745 > 30 + 700: out of budget
    assert results["average_success_rate"] == pytest.approx((3 / 6 + 1 / 3) / 2)
    assert spatial["max_steps"] == 400 and long["max_steps"] == 700
    t0 = spatial["tasks"][0]["trials"]
    assert [e["success"] for e in t0] == [True, False, True]
    assert [e["steps"] for e in t0] == [25, 400, 1]
    assert [e["inferences"] for e in t0] == [3, 40, 1]
    assert [e["steps"] for e in long["tasks"][0]["trials"]] == [700, 470, 700]
    assert client.resets == 9
    assert all(env.closed for env in backend.envs)
    on_disk = json.loads((tmp_path / "r.json").read_text())
    assert on_disk["suites"]["libero_10"]["successes"] == 1 and on_disk["protocol"]["replan"] == 10

    # The first task's episodes in detail: wait steps, replanning cadence, gripper, max steps.
    env = backend.envs[0]
    episodes = env.episodes  # actions of trials t0, t1, t2
    first = episodes[0]
    assert len(first) == 30 + 25
    assert all(a == list(DUMMY_ACTION) for a in first[:30])
    policy = np.array(first[30:])
    # Chunks 1, 2, 3: the first 10 actions of each, in order.
    assert policy[:, 0].tolist() == [100 + i for i in range(10)] + [200 + i for i in range(10)] + \
        [300 + i for i in range(5)]
    assert policy[:10, -1].tolist() == [1, -1, 0, 1, -1, 0, 1, -1, 0, 1]  # np.sign: 0.3, -0.2, 0.0
    assert len(episodes[1]) == 30 + 400  # never done: the whole budget, then stop
    assert len(backend.envs[1].episodes[1]) == 30 + 400  # `done` during the waits was ignored
    # What the server saw: flipped + resized images, 8-d state, the task's description as prompt.
    req = client.requests[0]
    assert req["observation/image"].shape == (224, 224, 3) and tuple(req["observation/image"][5, 5, :2]) == (255, 0)
    assert req["prompt"] == "libero_spatial task 0"
    assert "mode" not in req


def test_initial_states_cycle():
    """Convention 11: trial i uses initial state i; more trials than states reuse them cyclically."""
    backend = FakeBackend({"libero_goal": {0: {"s0": 31, "s1": None}}})
    res = run(LiberoArgs(suites="libero_goal", trials=5, max_steps=3, out=""), client=FakeClient(), backend=backend,
              log=lambda _: None)
    assert backend.envs[0].init_states == ["s0", "s1", "s0", "s1", "s0"]
    assert [e["success"] for e in res["suites"]["libero_goal"]["tasks"][0]["trials"]] == [True, False] * 2 + [True]


def test_environment_seed_and_policy_seed():
    """Convention 12: env.seed(42) once per task; the expected policy seed (42) is recorded and a server that reports
    another seed is warned about."""
    plan = {"libero_spatial": {0: {"t0": 31}, 1: {"t0": 31}}}
    backend, logs = FakeBackend(plan), []
    res = run(LiberoArgs(suites="libero_spatial", trials=1, out=""), client=FakeClient({"seed": 42}),
              backend=backend, log=logs.append)
    assert backend.seeds == [42, 42]
    assert res["protocol"]["seed"] == 42 and res["protocol"]["policy_seed"] == 42
    assert not any("warning" in line for line in logs)
    logs.clear()
    run(LiberoArgs(suites="libero_spatial", trials=1, out=""), client=FakeClient({"seed": 0}),
        backend=FakeBackend(plan), log=logs.append)
    assert any("warning" in line and "seed 0" in line for line in logs)


def test_errors():
    with pytest.raises(ValueError, match="unknown suite"):
        run(LiberoArgs(suites="libero_100", out=""), client=FakeClient(), backend=FakeBackend({}))
    backend = FakeBackend({"libero_goal": {0: {}}})
    with pytest.raises(ValueError, match="no initial states"):
        run(LiberoArgs(suites="libero_goal", trials=3, out=""), client=FakeClient(), backend=backend,
            log=lambda _: None)


def test_over_the_wire_with_fastwam_serve(tmp_path):
    """The same client through a real `fastwam serve` websocket server (a zero-action policy, no model)."""
    server_mod = pytest.importorskip("fastwam.serving.server")
    from fastwam.serving.testing import ZeroPolicy

    policy = ZeroPolicy(image_size=224, state_dim=8, action_shape=(32, 7))
    with server_mod.PolicyServer(policy, "127.0.0.1", 0) as server:
        backend = FakeBackend({"libero_object": {0: {"t0": 55}}})
        args = LiberoArgs(host="127.0.0.1", port=server.port, suites="libero_object", trials=1,
                          out=str(tmp_path / "r.json"))
        results = run(args, backend=backend, log=lambda _: None)
    assert results["suites"]["libero_object"]["successes"] == 1
    assert results["server"]["action_shape"] == [32, 7]
    executed = np.array(backend.envs[0].episodes[0][30:])
    assert executed.shape == (25, 7) and (executed == 0).all()  # np.sign(0) = 0, as in the official script
    assert policy.resets == 1


# ---------------------------------------------------------------------------------------------------------------------
# Parallel evaluation, progress, and the real LIBERO's set-up (config, assets, a missing install)

PARALLEL_PLAN = {
    "libero_spatial": {0: {"a": 55, "b": None}, 1: {"a": 40, "b": 90}, 2: {"a": None, "b": 31}},
    "libero_goal": {0: {"a": 33, "b": 200}, 1: {"a": None, "b": None}},
}


def _plan_backend():
    return FakeBackend(PARALLEL_PLAN)


def test_workers_give_the_results_of_one_worker(tmp_path):
    """--workers N spreads whole tasks over N processes (each its own simulator and client): every trial's result is
    the one a single worker gets, and one merged results file is written."""
    import functools

    results = {}
    for workers in (1, 2):
        args = LiberoArgs(suites="libero_spatial,libero_goal", trials=3, max_steps=80, workers=workers,
                          out=str(tmp_path / f"r{workers}.json"))
        lines = []
        results[workers] = run(args, client=FakeClient(), backend=_plan_backend(), log=lines.append,
                               backend_factory=_plan_backend, client_factory=functools.partial(FakeClient, None))
        assert sum("trial" in line and "ETA" in line for line in lines) == 5 * 3, lines

    def outcomes(res):  # every trial's result, without its wall-clock timing (infer_ms_mean)
        return {s: [(t["task_id"], [(e["trial"], e["success"], e["steps"], e["inferences"]) for e in t["trials"]])
                    for t in v["tasks"]] for s, v in res["suites"].items()}

    assert outcomes(results[1]) == outcomes(results[2])
    assert {s: v["successes"] for s, v in results[2]["suites"].items()} == {"libero_spatial": 6, "libero_goal": 2}
    on_disk = json.loads((tmp_path / "r2.json").read_text())
    assert outcomes(on_disk) == outcomes(results[1])
    assert [t["task_id"] for t in on_disk["suites"]["libero_spatial"]["tasks"]] == [0, 1, 2]


def test_ray_executor_gives_the_results_of_one_worker(tmp_path):
    ray = pytest.importorskip("ray")
    import functools
    import os
    from pathlib import Path

    results = {}
    # Ray's workers import the fakes from this file: they need this folder on their path (a real run needs none).
    here = str(Path(__file__).resolve().parent)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([here, os.environ.get("PYTHONPATH", "")])}})
    try:
        for executor in ("local", "ray"):
            args = LiberoArgs(suites="libero_spatial,libero_goal", trials=3, max_steps=80, workers=2,
                              executor=executor, out=str(tmp_path / f"{executor}.json"))
            results[executor] = run(args, client=FakeClient(), backend=_plan_backend(), log=lambda _: None,
                                    backend_factory=_plan_backend,
                                    client_factory=functools.partial(FakeClient, None))
    finally:
        ray.shutdown()
    strip = lambda res: {s: [(t["task_id"], [(e["success"], e["steps"]) for e in t["trials"]]) for t in v["tasks"]]  # noqa
                         for s, v in res["suites"].items()}
    assert strip(results["ray"]) == strip(results["local"])


def test_progress_line_per_trial():
    lines = []
    run(LiberoArgs(suites="libero_goal", trials=2, max_steps=20, out=""), client=FakeClient(),
        backend=FakeBackend({"libero_goal": {0: {"a": 35, "b": None}}}), log=lines.append)
    trial_lines = [line for line in lines if line.startswith("[libero]")]
    assert len(trial_lines) == 2
    assert "libero_goal task 0 trial 1/2: success (1/1 so far), 5 steps" in trial_lines[0]
    assert "trial 2/2: failure (1/2 so far), 20 steps" in trial_lines[1] and "ms/step" in trial_lines[1]
    assert "2/2 trials, ETA 0m00s" in trial_lines[1]


def _fake_libero(root, prompt: bool = True):
    """A stand-in `libero` package whose first import asks a Y/N question when its config is missing, as LIBERO's."""
    pkg = root / "libero" / "libero"
    pkg.mkdir(parents=True)
    (root / "libero" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text(
        "import os\n"
        "config = os.path.join(os.environ.get('LIBERO_CONFIG_PATH', os.path.expanduser('~/.libero')), 'config.yaml')\n"
        "if not os.path.exists(config):\n"
        "    input('Do you want to specify a custom path for the dataset folder? (Y/N): ')\n"
        "def get_libero_path(key):\n"
        "    lines = [x for x in open(config).read().splitlines() if not x.startswith('#')]\n"
        "    return dict(x.split(': ', 1) for x in lines)[key]\n"
        "_assets_path_cache = None\n")
    (pkg / "benchmark.py").write_text("def get_benchmark_dict():\n    return {}\n")
    envs = pkg / "envs"
    envs.mkdir()
    (envs / "__init__.py").write_text("class OffScreenRenderEnv:\n    pass\n")
    return root


def _assets(root):
    from fastwam.eval.libero import ASSET_DIRS, ASSET_PROBE

    for d in ASSET_DIRS:
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / ASSET_PROBE).write_text("<mujoco/>")
    return root


def test_libero_config_is_written_without_a_prompt(tmp_path):
    """No config and no stdin (a batch job): fastwam writes LIBERO's default config first, so nothing asks."""
    import os
    import subprocess
    import sys

    site = _fake_libero(tmp_path / "site")
    assets = _assets(tmp_path / "assets")
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "LIBERO_CONFIG_PATH": str(tmp_path / "cfg"), "LIBERO_ASSETS": str(assets)}
    code = ("from fastwam.eval.libero import LiberoBackend\n"
            "b = LiberoBackend()\n"
            "import libero.libero as l\n"
            "print(l._assets_path_cache, l.get_libero_path('bddl_files'))\n")
    proc = subprocess.run([sys.executable, "-c", code], env=env, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "EOFError" not in proc.stderr
    cached, bddl = proc.stdout.split()
    assert cached == str(assets) and bddl.endswith("libero/libero/bddl_files")
    config = (tmp_path / "cfg" / "config.yaml").read_text()
    assert f"assets: {assets}" in config and "init_states:" in config
    # An existing config is left as it is.
    (tmp_path / "cfg" / "config.yaml").write_text(config + "# mine\n")
    subprocess.run([sys.executable, "-c", code], env=env, stdin=subprocess.DEVNULL, check=True, capture_output=True)
    assert (tmp_path / "cfg" / "config.yaml").read_text().endswith("# mine\n")


def test_missing_assets_and_missing_libero_are_one_line(tmp_path, monkeypatch):
    import os
    import subprocess
    import sys

    from fastwam.errors import UserError
    from fastwam.eval.libero import ASSET_PROBE, LiberoBackend

    site = _fake_libero(tmp_path / "site")
    assets = _assets(tmp_path / "assets")
    (assets / ASSET_PROBE).unlink()
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("LIBERO_CONFIG_PATH", str(tmp_path / "cfg"))
    with pytest.raises(UserError, match=r"libero_tabletop_base_style\.xml is missing"):
        LiberoBackend(str(assets))
    # The CLI: one line, exit 2, before any connection is made.
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "LIBERO_CONFIG_PATH": str(tmp_path / "cfg")}
    proc = subprocess.run([sys.executable, "-m", "fastwam", "eval", "libero", "--libero-assets", str(assets),
                           "--port", "1"], env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "libero_tabletop_base_style.xml is missing" in proc.stderr
    # Without LIBERO at all.
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "nothing")}
    code = "import sys; sys.modules['libero'] = None\nfrom fastwam.cli import main\nsys.exit(main(['eval', 'libero']))"
    proc = subprocess.run([sys.executable, "-c", code], env=env, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "LIBERO is not installed" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_one_real_libero_step(tmp_path):
    """The real simulator, where LIBERO is installed (docs/full_scale.md, 'LIBERO evaluation'): its first task's
    observation becomes a request of the server's layout, and a step executes."""
    pytest.importorskip("libero", reason="LIBERO is not installed here (pip install hf-libero==0.1.4, see "
                        "docs/full_scale.md); the fakes above pin the protocol")
    from fastwam.eval.libero import LiberoBackend

    backend = LiberoBackend()
    suite = backend.suite("libero_spatial")
    env, description = backend.make_env(suite.get_task(0), RES, 42)
    try:
        env.reset()
        obs = env.set_init_state(suite.get_task_init_states(0)[0])
        obs, _, done, _ = env.step(list(DUMMY_ACTION))
        req = build_observation(obs, description)
        assert req[IMAGE_KEY].shape == (224, 224, 3) and req["observation/state"].shape == (8,)
        assert not done and description
    finally:
        env.close()


class RealtimeClient(FakeClient):
    """FakeClient that also records the real-time fields and pins the first d actions, as FastWAMPolicy does."""

    def __init__(self):
        super().__init__()
        self.realtime: list = []

    def infer(self, obs, prev_chunk=None, inference_delay=0):
        reply = super().infer(obs)
        self.realtime.append(None if prev_chunk is None else (np.array(prev_chunk), inference_delay))
        if prev_chunk is not None:
            reply["actions"][:inference_delay] = prev_chunk[:inference_delay]
        return reply


@pytest.mark.parametrize("chunking,d", [("sync", 3), ("naive", 3), ("rtc", 3), ("naive", 10), ("rtc", 10)])
def test_asynchronous_execution(chunking, d, tmp_path):
    """--async: the next chunk is requested d actions before the segment ends; those run, then the new chunk from its
    index d. rtc sends the old chunk from the observation's time on; sync is the official loop exactly. d = replan
    (10): the request goes out as each segment starts (inference back to back), one more than otherwise in 35 steps."""
    plan = {"libero_spatial": {0: {"t0": 30 + 35}}}
    runs = {}
    for name, kw in (("today", {}), (chunking, dict(async_=True, chunking=chunking, inference_delay=d))):
        backend, client = FakeBackend(plan), RealtimeClient()
        run(LiberoArgs(suites="libero_spatial", trials=1, out=str(tmp_path / f"{name}.json"), **kw), client=client,
            backend=backend, log=lambda _: None)
        runs[name] = (np.array(backend.envs[0].episodes[0][30:]), client)
    executed, client = runs[chunking]
    if chunking == "sync":
        np.testing.assert_array_equal(executed, runs["today"][0])
        assert client.realtime == [None] * 4
        return
    # Chunk n's actions are n * 100 + index: the first segment is chunk 1's 0..9; each later one is chunk n's d..d+9
    # (in rtc its first d actions are the old chunk's, but those are never executed from the new chunk).
    expected = [100 + i for i in range(10)] + [200 + d + i for i in range(10)] + [300 + d + i for i in range(10)] + \
        [400 + d + i for i in range(5)]
    assert executed[:, 0].tolist() == expected
    calls = 4 if d < 10 else 5
    if chunking == "naive":
        assert client.realtime == [None] * calls
    else:
        assert client.realtime[0] is None and len(client.realtime) == calls
        prev, delay = client.realtime[1]  # asked when d actions of chunk 1's segment were left: from index 10 - d on
        assert delay == d and prev[:, 0].tolist() == [100 + i for i in range(10 - d, 32)]
        prev, delay = client.realtime[2]  # chunk 2's segment started at index d: d + 10 - d = 10 on
        assert prev[:, 0].tolist() == [200 + i for i in range(10, 32)]
    with pytest.raises(ValueError, match="needs --async"):
        run(LiberoArgs(inference_delay=2), client=RealtimeClient(), backend=FakeBackend(plan), log=lambda _: None)
    with pytest.raises(ValueError, match=r"0\.\.replan \(10\)"):
        run(LiberoArgs(async_=True, inference_delay=11), client=RealtimeClient(), backend=FakeBackend(plan),
            log=lambda _: None)
