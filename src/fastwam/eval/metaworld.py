"""`fastwam eval metaworld`: closed-loop Meta-World evaluation with action chunking, vectorised over processes.

Protocol
- Each (task, evaluation seed s) runs `episodes` episodes. Evaluation seed s runs `MetaWorldEnv(task, EVAL_SEED_BASE
  + s)`, and episode i is that env's i-th reset (Meta-World gives each env seed 50 object/goal layouts per task, so
  episodes <= 50). The demonstration generator (`fastwam data metaworld`) uses env seeds `data_seed * 1000 + shard`,
  i.e. small numbers for every realistic data seed, hence the large base: evaluation layouts are never training
  layouts. When the checkpoint's dataset is on disk its `fastwam_generation.json` is read and an overlap is refused.
- The policy sees only the rendered camera images, the robot's own state (end-effector xyz + gripper opening) and
  the instruction. It returns a chunk of H actions; the first K (`replan`, default H/2) are executed, then it is
  asked again. An episode succeeds if Meta-World's success flag is set at any step (the episode stops there), and
  fails at `max_steps` (default 300).
- Environments step in worker processes (`EnvPool`); the policy runs in this process with ONE batched call over all
  environments waiting for a chunk. With `--pipeline on` (default for a GPU policy) the environments form two blocks
  taking turns, so the policy's call for one block overlaps the simulators stepping the other. Results do not depend
  on the number of workers or environments: each episode's layout is fixed by its spec and the policy's sampling
  noise is per observation, not per batch.

Policies: a checkpoint (in-process `FastWAMPolicy`), a websocket server (`--server ws://host:port`, one client per
environment, requests sent concurrently so the server can micro-batch them), or baselines: `zero` (all-zero
actions), `random` (uniform in the action box, seeded per episode), and `scripted` (Meta-World's expert reading the
privileged simulator state: a HARNESS CHECK ONLY, never a result about vision-based policies).

Outputs in --out: `results.json` (per task/seed/mode cells, per-mode summaries, latency, throughput), `summary.md`
(tables with Wilson 95 % intervals) and `videos/` (the first `--videos` episodes of each task: real rollout, and for
joint/IDM the policy's imagined future to its right, refreshed at every re-plan).
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import sys
import time
import warnings
import zlib
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from fastwam.eval.envpool import EnvPool, EnvSettings, EpisodeSpec
from fastwam.eval.stats import fmt_rate, markdown_table, percentile, rate_summary

EVAL_SEED_BASE = 1_000_000  # evaluation seed s -> env seed EVAL_SEED_BASE + s (demos use data_seed * 1000 + shard)
LAYOUTS_PER_SEED = 50  # Meta-World's MT1 task list per env seed
ACTION_DIM = 4
VIDEO_FPS = 40  # control runs at 80 Hz; half speed is easier to watch
BASELINES = ("scripted", "zero", "random")
ENV_BUILD_COST_RESETS = 150  # building a MetaWorldEnv (~1.5 s) costs about as much as 150 image-less resets
DEFAULT_BASELINE_HORIZON = 16  # chunk length of the baselines (matches the small_cpu preset)
VIDEO_MIN_HEIGHT = 192  # tiny renders are upscaled (nearest) so a video is watchable


def env_seed_for(seed: int) -> int:
    return EVAL_SEED_BASE + int(seed)


# ---------------------------------------------------------------------------------------------------------------------
# Policy adapters: what the harness needs from anything that produces action chunks


class _Adapter:
    name: str = ""
    horizon: int = DEFAULT_BASELINE_HORIZON
    cameras: tuple[str, ...] = ()
    image_size: tuple[int, int] = (64, 64)
    default_mode: str = ""
    modes: tuple[str, ...] = ()
    in_worker: bool = False  # the scripted expert acts inside the env worker (it needs the simulator state)
    frame_stride: int = 1  # env steps between imagined frames
    info: dict = {}

    def act(self, obs: list[dict], specs: list[EpisodeSpec], mode: str, want_video: list[bool]) -> list[dict]:
        raise NotImplementedError

    def episode_started(self, slot: int, spec: EpisodeSpec) -> None:
        pass

    def close(self) -> None:
        pass


def _policy_obs(obs: dict, cameras: Sequence[str]) -> dict:
    """MetaWorldEnv observation -> the openpi-style dict the policy / server takes."""
    out = {f"observation/{c}": obs["images"][c] for c in cameras}
    out["observation/state"] = np.asarray(obs["state"], dtype=np.float32)
    out["prompt"] = obs["task"]
    return out


def _cameras_from_keys(keys: Sequence[str]) -> tuple[str, ...]:
    cams = []
    for k in keys:
        if not k.startswith("observation/"):
            raise ValueError(f"camera key {k!r} does not start with 'observation/'")
        cams.append(k.split("/", 1)[1])
    return tuple(cams)


def _recorded_image_size(cfg: Any, cameras: Sequence[str]) -> tuple[int, int] | None:
    """The resolution the checkpoint's demonstrations were rendered at (from the dataset's info.json), if on disk.

    The policy resizes whatever it gets to cfg.data.image_size, but rendering at the recorded size and letting the
    same resize run reproduces the training pixels exactly; rendering directly at the model size would not (no
    anti-aliasing in the renderer).
    """
    root = getattr(getattr(cfg, "data", None), "dataset", "")
    info = Path(root) / "meta" / "info.json" if root else None
    if info is None or not info.is_file():
        return None
    feats = json.loads(info.read_text()).get("features", {})
    keys = [f"observation.images.{c}" for c in cameras]
    sizes = {tuple(feats[k]["shape"][:2]) for k in keys if k in feats}
    return tuple(int(x) for x in sizes.pop()) if len(sizes) == 1 else None  # type: ignore[return-value]


def _demo_env_seeds(cfg: Any) -> dict[str, set[int]] | None:
    root = getattr(getattr(cfg, "data", None), "dataset", "")
    gen = Path(root) / "fastwam_generation.json" if root else None
    if gen is None or not gen.is_file():
        return None
    per_task = json.loads(gen.read_text()).get("per_task", {})
    return {t: set(int(s) for s in v.get("env_seeds", [])) for t, v in per_task.items()}


class _InProcess(_Adapter):
    """A `FastWAMPolicy` (or anything with its `infer_batch` / `camera_keys` / `metadata`) in this process."""

    def __init__(self, policy: Any):
        self.policy = policy
        meta = policy.metadata
        self.name = "checkpoint"
        self.horizon = int(meta["action_shape"][0])
        if int(meta["action_shape"][1]) != ACTION_DIM:
            raise ValueError(f"the policy outputs {meta['action_shape'][1]}-dim actions; Meta-World takes {ACTION_DIM}")
        self.cameras = _cameras_from_keys(policy.camera_keys)
        cfg = getattr(policy, "cfg", None)
        spec = meta["observation_spec"][policy.camera_keys[0]]
        model_size = tuple(spec.get("preferred_shape", spec["shape"])[:2])
        recorded = _recorded_image_size(cfg, self.cameras)
        self.image_size = recorded or model_size  # type: ignore[assignment]
        self.default_mode = meta.get("mode", "fast")
        self.modes = tuple(meta.get("modes", (self.default_mode,)))
        self.frame_stride = int(cfg.data.frame_stride) if cfg is not None else 1
        self.info = {"checkpoint": meta.get("checkpoint", ""), "variant": meta.get("variant"),
                     "inference_steps": meta.get("inference_steps"), "model_image_size": list(model_size),
                     "image_size_source": "dataset" if recorded else "model (dataset not found)"}
        self.demo_seeds = _demo_env_seeds(cfg)
        self.info["demo_seed_check"] = "no overlap" if self.demo_seeds is not None else "not checked (no dataset)"

    def act(self, obs, specs, mode, want_video):
        pobs = [_policy_obs(o, self.cameras) for o in obs]
        if mode == "fast" or not any(want_video):
            return self.policy.infer_batch(pobs, mode=mode)
        # Only the recorded episodes need decoded video; one extra call keeps the others from paying for decoding.
        vid = [i for i, w in enumerate(want_video) if w]
        rest = [i for i, w in enumerate(want_video) if not w]
        out: list[dict] = [{}] * len(obs)
        for idx, rv in ((vid, True), (rest, False)):
            if idx:
                for i, r in zip(idx, self.policy.infer_batch([pobs[i] for i in idx], mode=mode, return_video=rv)):
                    out[i] = r
        return out


class _Server(_Adapter):
    """Evaluate through `fastwam serve` (or any openpi-protocol server): one websocket client per env slot."""

    def __init__(self, url: str, num_slots: int):
        from fastwam.serving.client import WebsocketClient

        self._cls = WebsocketClient
        self.url = url if url.startswith(("ws://", "wss://")) else f"ws://{url}"
        first = WebsocketClient(self.url)
        self.clients: dict[int, Any] = {0: first}
        meta = first.metadata
        spec = meta.get("observation_spec", {})
        keys = sorted(k for k in spec if k.startswith("observation/") and k != "observation/state")
        if not keys:
            raise ValueError(f"{self.url}: the server's observation_spec names no observation/<camera> keys")
        self.name = "server"
        self.cameras = _cameras_from_keys(keys)
        s = spec[keys[0]]
        shape = s.get("preferred_shape") or s.get("shape")
        if not shape or int(shape[0]) <= 0:
            raise ValueError(f"{self.url}: the server does not state an image size for {keys[0]}; pass --image-size")
        self.image_size = (int(shape[0]), int(shape[1]))
        self.horizon = int(meta["action_shape"][0])
        self.default_mode = meta.get("mode", "fast")
        self.modes = tuple(meta.get("modes", (self.default_mode,)))
        # Imagined frames are `frame_stride` env steps apart; FastWAMPolicy's metadata does not say so yet (1 then
        # only misaligns the video's "really happened" row, never the results).
        self.frame_stride = int(meta.get("frame_stride", 1))
        self.info = {"server": self.url, "server_checkpoint": meta.get("checkpoint", "")}
        self.demo_seeds = None
        self.pool = ThreadPoolExecutor(max_workers=max(1, num_slots))
        self.server_infer_ms: list[float] = []
        self._slot_of: dict[int, int] = {}

    def _client(self, i: int) -> Any:
        if i not in self.clients:
            self.clients[i] = self._cls(self.url)
        return self.clients[i]

    def episode_started(self, slot, spec):
        self._client(slot).reset()  # openpi convention: tell the server an episode starts

    def act(self, obs, specs, mode, want_video):
        raise NotImplementedError("use act_slots")  # needs slot ids to pick the connection

    def act_slots(self, slots: list[int], obs: list[dict], mode: str, want_video: list[bool]) -> list[dict]:
        def one(i: int) -> dict:
            message = _policy_obs(obs[i], self.cameras)
            if want_video[i] and mode != "fast":
                message["return_video"] = True
            return self._client(slots[i]).infer(message, mode=mode)

        replies = list(self.pool.map(one, range(len(obs))))
        for r in replies:
            ms = (r.get("policy_timing") or {}).get("infer_ms")
            if ms is not None:
                self.server_infer_ms.append(float(ms))
        return replies

    def close(self):
        self.pool.shutdown(wait=True)
        for c in self.clients.values():
            c.close()


class _Zero(_Adapter):
    def __init__(self, horizon: int):
        self.name, self.horizon, self.default_mode, self.modes = "zero", horizon, "zero", ("zero",)

    def act(self, obs, specs, mode, want_video):
        return [{"actions": np.zeros((self.horizon, ACTION_DIM), np.float32)} for _ in obs]


class _Random(_Adapter):
    """Uniform actions in Meta-World's box, from an RNG seeded by the episode (reproducible, slot-independent)."""

    def __init__(self, horizon: int, seed: int):
        self.name, self.horizon, self.default_mode, self.modes = "random", horizon, "random", ("random",)
        self.seed = seed
        self._rngs: dict[EpisodeSpec, np.random.Generator] = {}

    def episode_started(self, slot, spec):
        self._rngs[spec] = np.random.default_rng(
            [self.seed, zlib.crc32(spec.task.encode()), spec.env_seed, spec.episode])

    def act(self, obs, specs, mode, want_video):
        return [{"actions": self._rngs[s].uniform(-1, 1, (self.horizon, ACTION_DIM)).astype(np.float32)}
                for s in specs]


class _Scripted(_Adapter):
    def __init__(self, horizon: int):
        self.name, self.horizon, self.default_mode, self.modes = "scripted", horizon, "scripted", ("scripted",)
        self.in_worker = True


# ---------------------------------------------------------------------------------------------------------------------
# Scheduling: contiguous runs of episodes ("streams") of one (task, seed), so a slot mostly resets the same env in order


@dataclass
class _Stream:
    task: str
    seed: int
    start: int
    stop: int
    record_below: int  # episodes < this are recorded as video

    def spec(self, i: int) -> EpisodeSpec:
        return EpisodeSpec(self.task, self.seed, env_seed_for(self.seed), i, record=i < self.record_below)


def _make_streams(tasks: Sequence[str], seeds: Sequence[int], episodes: int, videos: int, slots: int) -> deque:
    pairs = [(t, s) for t in tasks for s in seeds]
    # Enough streams (~2 per slot) that the last ones finish together; no more, since every stream that does not
    # continue a slot's previous one may cost building an env (~1.5 s) and fast-forwarding through layouts.
    per_pair = max(1, min(episodes, math.ceil(2 * slots / len(pairs))))
    size = math.ceil(episodes / per_pair)
    streams: deque = deque()
    for k in range(per_pair):  # chunk-major order: first chunks of every pair first
        for t, s in pairs:
            lo, hi = k * size, min(episodes, (k + 1) * size)
            if lo < hi:
                streams.append(_Stream(t, s, lo, hi, videos if s == seeds[0] else 0))
    return streams


@dataclass
class _SlotRun:
    stream: _Stream | None = None
    spec: EpisodeSpec | None = None
    obs: dict | None = None
    imagined: list = dataclasses.field(default_factory=list)  # (step, uint8 [F, H, W, 3]) per re-plan, if recorded
    steps: int = 0


# ---------------------------------------------------------------------------------------------------------------------
# Videos


def _resize(img: np.ndarray, h: int, w: int) -> np.ndarray:
    from PIL import Image

    if img.shape[:2] == (h, w):
        return img
    return np.asarray(Image.fromarray(img).resize((w, h), Image.BILINEAR))


def compose_video(real: np.ndarray, imagined: list[tuple[int, np.ndarray]], stride: int) -> np.ndarray:
    """One video frame per real step. `real`: [T+1, h, w, 3] (cameras side by side), `imagined`: (t0, [F, h', w', 3])
    for each re-plan of the episode, frame j of a plan made at step t0 predicting step t0 + j*stride.

    Without imagined frames: the rollout alone. With them, each frame shows the live step t on the left (2x), and on
    the right for the latest plan (t0 <= t) two rows: on top what really happened at t0, t0+stride, ... (grey once
    the episode has ended), below what the policy imagined for those same steps. The re-plan interval is often
    shorter than `stride`, so showing only the imagined frame "for now" would never show a future frame.
    """
    n, h, w, _ = real.shape
    frames = real
    if imagined:
        white = lambda hh, ww: np.full((hh, ww, 3), 255, np.uint8)  # noqa: E731
        grey = np.full((h, w, 3), 128, np.uint8)
        out = []
        for t in range(n):
            t0, vid = max((c for c in imagined if c[0] <= t), key=lambda c: c[0], default=imagined[0])
            top, bottom = [], []
            for j in range(len(vid)):
                when = t0 + j * max(1, stride)
                top += [real[when] if when < n else grey, white(h, 2)]
                bottom += [_resize(vid[j], h, w), white(h, 2)]
            grid = np.concatenate([np.concatenate(top[:-1], 1), white(2, len(vid) * (w + 2) - 2),
                                   np.concatenate(bottom[:-1], 1)], axis=0)
            live = real[t].repeat(2, axis=0).repeat(2, axis=1)
            live = np.pad(live, ((0, grid.shape[0] - live.shape[0]), (0, 0), (0, 0)), constant_values=255)
            out.append(np.concatenate([live, white(grid.shape[0], 6), grid], axis=1))
        frames = np.stack(out)
    scale = max(1, math.ceil(VIDEO_MIN_HEIGHT / frames.shape[1]))
    if scale > 1:
        frames = frames.repeat(scale, axis=1).repeat(scale, axis=2)
    ph, pw = frames.shape[1] % 2, frames.shape[2] % 2  # H.264 with yuv420p needs even sides
    if ph or pw:
        frames = np.pad(frames, ((0, 0), (0, ph), (0, pw), (0, 0)))
    return frames


def write_video(path: Path, frames: np.ndarray, fps: int = VIDEO_FPS) -> Path:
    """frames uint8 [T, H, W, 3] -> PATH.mp4 (H.264, yuv420p: plays everywhere), written with PyAV (a dependency
    already, for the datasets; imageio's mp4 writer would need imageio-ffmpeg). Odd sizes are padded by one pixel
    (yuv420p needs even ones). Falls back to a gif if this PyAV build cannot encode H.264."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    mp4 = path.with_suffix(".mp4")
    frames = np.asarray(frames, dtype=np.uint8)
    _, h, w, _ = frames.shape
    frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    try:
        with av.open(str(mp4), "w") as container:
            stream = container.add_stream("libx264", rate=fps, options={"crf": "18"})
            stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
            for f in frames:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
            container.mux(stream.encode())
        return mp4
    except Exception as exc:  # noqa: BLE001 - no H.264 encoder in this PyAV build: a gif needs only pillow
        import imageio.v2 as imageio

        warnings.warn(f"mp4 writing failed ({exc}); writing a gif instead", stacklevel=2)
        mp4.unlink(missing_ok=True)
        imageio.mimsave(path.with_suffix(".gif"), list(frames), duration=1000 / fps, loop=0)
        return path.with_suffix(".gif")


# ---------------------------------------------------------------------------------------------------------------------
# The harness


def _resolve_policy(policy_or_checkpoint: Any, server: str | None, num_slots: int, horizon: int | None,
                    device: str | None, policy_seed: int) -> _Adapter:
    if server:
        return _Server(server, num_slots)
    p = policy_or_checkpoint
    if isinstance(p, str) and p in BASELINES and not Path(p).exists():
        h = horizon or DEFAULT_BASELINE_HORIZON
        return {"scripted": lambda: _Scripted(h), "zero": lambda: _Zero(h),
                "random": lambda: _Random(h, policy_seed)}[p]()
    if isinstance(p, (str, Path)):
        from fastwam.policy import FastWAMPolicy

        return _InProcess(FastWAMPolicy.from_pretrained(p, device=device, seed=policy_seed))
    if isinstance(p, _Adapter):
        return p
    if hasattr(p, "infer_batch") and hasattr(p, "camera_keys") and hasattr(p, "metadata"):
        return _InProcess(p)
    raise TypeError(f"cannot evaluate {type(p).__name__}: give a checkpoint path, a FastWAMPolicy, "
                    f"one of {BASELINES}, or server=")


def _set_threads(adapter: _Adapter, threads: int | None, workers: int) -> int | None:
    """Set torch's intra-op threads for an in-process policy; returns the previous count to restore (or None)."""
    if not isinstance(adapter, _InProcess):
        return None  # no torch work in this process
    import torch

    device = getattr(getattr(adapter.policy, "device", None), "type", "cpu")
    n = threads if threads else (1 if device == "cpu" and workers >= 1 else None)
    if not n or n == torch.get_num_threads():
        return None
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    return previous


def _check_seeds(adapter: _Adapter, tasks: Sequence[str], seeds: Sequence[int]) -> None:
    demo = getattr(adapter, "demo_seeds", None)
    if demo is None:
        return
    for t in tasks:
        clash = demo.get(t, set()) & {env_seed_for(s) for s in seeds}
        if clash:
            raise ValueError(f"evaluation env seeds {sorted(clash)} of {t} were used for the demonstrations: "
                             f"evaluation would replay training layouts; pick other --seeds")


def evaluate(
    policy_or_checkpoint: Any,
    tasks: str | Sequence[str],
    episodes: int = 50,
    seeds: Sequence[int] | str = (0,),
    mode: str | Sequence[str] | None = None,
    replan: int | None = None,
    max_steps: int = 300,
    workers: int = 2,
    video_episodes: int = 2,
    out_dir: str | Path | None = None,
    server: str | None = None,
    *,
    num_envs: int | None = None,
    image_size: tuple[int, int] | None = None,
    cameras: Sequence[str] | None = None,
    horizon: int | None = None,
    device: str | None = None,
    policy_seed: int = 0,
    pipeline: bool | None = None,
    threads: int | None = None,
    progress: bool = True,
    shift: str = "none",
    obs_delay: int = 0,
) -> dict:
    """Evaluate closed loop; returns the results dict (also written to out_dir/results.json when out_dir is given).

    policy_or_checkpoint: checkpoint/run directory, a FastWAMPolicy, or "scripted" | "zero" | "random" (then
    `horizon` sets the chunk length, default 16); ignored when `server` ("ws://host:port") is given.
    mode: inference mode(s) to evaluate, each in its own pass (default: the policy's own).
    replan: actions executed per chunk before asking again (default H // 2).
    num_envs: environments in flight (= the policy's batch size); default 8 per worker (8 with workers=0).
    pipeline: overlap the policy with the simulators (two blocks of envs in turn; needs workers >= 1). Results are
    the same either way; only the speed changes. None = only for a policy on a GPU: a CPU policy competes with the
    env workers for the same cores (measured on the 2-core box under other load: no gain, per-observation policy
    time doubled), so there lock-step is as fast and simpler.
    threads: torch intra-op threads while evaluating (restored afterwards). None = 1 for an in-process policy on
    CPU with env workers: measured on the 2-core box, torch's default 2 threads spin against busy workers and a
    small_cpu policy call goes from ~70-90 ms to 0.6-5 s.
    image_size / cameras: override what the env renders (default: what the policy was trained on; baselines render
    the env's default cameras at 64x64 when videos are asked for, and nothing otherwise).
    shift: a test-time visual shift of the rendered images ("camera", "lighting", "colour"; envs.metaworld).
    obs_delay: observation latency d (0 <= d < replan): from the second chunk of an episode on, the policy is
    given the observation made d steps before the re-planning time, and the actions executed are those its chunk
    plans for "now", chunk[d : d + replan] (latency compensation, as on a real robot with a slow camera; the first
    chunk, planned while the robot is still, runs from index 0). It needs horizon >= d + replan.
    """
    from fastwam.envs.metaworld import DEFAULT_CAMERAS, parse_tasks

    t_start = time.perf_counter()
    task_list = parse_tasks(tasks)
    seed_list = [int(s) for s in seeds.split(",")] if isinstance(seeds, str) else [int(s) for s in seeds]
    if not seed_list or len(set(seed_list)) != len(seed_list) or min(seed_list) < 0:
        raise ValueError(f"seeds must be distinct non-negative integers, got {seed_list}")
    if not 1 <= episodes <= LAYOUTS_PER_SEED:
        raise ValueError(f"episodes must be in 1..{LAYOUTS_PER_SEED}: each env seed has {LAYOUTS_PER_SEED} layouts "
                         f"per task, so more episodes would repeat layouts; add seeds instead")
    if max_steps < 1:
        raise ValueError("max_steps must be >= 1")
    total_per_mode = len(task_list) * len(seed_list) * episodes
    slots = num_envs or 8 * max(1, workers)
    slots = max(1, min(slots, total_per_mode))
    adapter = _resolve_policy(policy_or_checkpoint, server, slots, horizon, device, policy_seed)
    previous_threads: int | None = None
    try:
        _check_seeds(adapter, task_list, seed_list)
        k = replan or max(1, adapter.horizon // 2)
        if not 1 <= k <= adapter.horizon:
            raise ValueError(f"replan must be in 1..{adapter.horizon} (the policy's chunk length), got {k}")
        if not 0 <= obs_delay < k or obs_delay + k > adapter.horizon:
            raise ValueError(f"obs_delay must be in 0..replan-1 ({k - 1}) with obs_delay + replan <= the chunk "
                             f"length ({adapter.horizon}), got {obs_delay}")
        from fastwam.envs.metaworld import VISUAL_SHIFTS

        if shift not in VISUAL_SHIFTS:
            raise ValueError(f"unknown shift {shift!r}; choose from {', '.join(VISUAL_SHIFTS)}")
        modes = [mode] if isinstance(mode, str) else list(mode or [])
        modes = [m.strip() for ms in modes for m in ms.split(",") if m.strip()] or [adapter.default_mode]
        for m in modes:
            if m not in adapter.modes:
                raise ValueError(f"mode {m!r} is not available for policy {adapter.name}; choose from {adapter.modes}")
        if adapter.name in BASELINES:
            cams = tuple(cameras) if cameras else (DEFAULT_CAMERAS if video_episodes > 0 else ())
            size = image_size or (64, 64)
        else:
            cams = tuple(cameras) if cameras else adapter.cameras
            size = image_size or adapter.image_size
            if set(cams) != set(adapter.cameras):
                raise ValueError(f"the policy needs cameras {adapter.cameras}, got {cams}")
        if video_episodes > 0 and not cams:
            raise ValueError("videos need at least one camera")
        # Pipelining needs the envs in other processes, and a policy in this one (the expert runs in the workers).
        if pipeline is None:
            pipeline = isinstance(adapter, _InProcess) and getattr(adapter.policy, "device", None) is not None \
                and getattr(adapter.policy.device, "type", "cpu") == "cuda"
        n_groups = 2 if pipeline and workers >= 1 and not adapter.in_worker and slots >= 2 else 1
        settings = EnvSettings(image_size=(int(size[0]), int(size[1])), cameras=cams, max_steps=max_steps,
                               shift=shift)
        out = Path(out_dir) if out_dir is not None else None
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)

        from tqdm.auto import tqdm

        previous_threads = _set_threads(adapter, threads, workers)
        t_pool = time.perf_counter()
        with EnvPool(slots, workers, settings) as pool:
            pool_start_s = time.perf_counter() - t_pool
            bar = tqdm(total=total_per_mode * len(modes), unit="ep", desc="eval metaworld", disable=not progress,
                       dynamic_ncols=True)
            runs = []
            try:
                for m in modes:
                    runs.append(_run_mode(pool, adapter, m, task_list, seed_list, episodes, video_episodes, k,
                                          slots, n_groups, out, bar, obs_delay))
            finally:
                bar.close()
        results = _assemble(adapter, runs, modes, task_list, seed_list, episodes, k, max_steps, settings, slots,
                            pool.workers, n_groups, pool.step_render_flag, pool_start_s,
                            time.perf_counter() - t_start)
        results["config"].update(shift=shift, obs_delay=obs_delay)
    finally:
        adapter.close()
        if previous_threads is not None:
            import torch

            torch.set_num_threads(previous_threads)
    if out is not None:
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        (out / "summary.md").write_text(summary_markdown(results))
    return results


def _run_mode(pool: EnvPool, adapter: _Adapter, mode: str, tasks: list[str], seeds: list[int], episodes: int,
              videos: int, k: int, slots: int, groups: int, out: Path | None, bar: Any, delay: int = 0) -> dict:
    """Roll out every episode of one mode.

    The slots are split into `groups` contiguous blocks (a block spans all workers, as slot i lives on worker
    i % workers). With 2 groups the loop is a two-stage pipeline: while the workers step block A with its new chunks,
    this process runs the ONE batched policy call for block B (every env that is waiting for a chunk), and so on in
    turn; on a 2-core machine the policy and the simulators then overlap instead of waiting for each other. With 1
    group it is plain lock-step (all envs step, then one policy call for all).
    """
    streams = _make_streams(tasks, seeds, episodes, videos, slots)
    runs = [_SlotRun() for _ in range(slots)]
    records: list[dict] = []
    calls: list[dict] = []  # one per batched policy call: ms, batch size, cells in it
    video_paths: list[str] = []
    env_steps, successes = 0, 0
    t0 = time.perf_counter()
    want_imagined = mode in ("joint", "idm")
    reserved: dict[int, _Stream] = {}  # slot -> stream it starts if its running episode ends (in-flight rounds)
    overhead: dict[str, int] = {}  # envs built, layouts skipped by fast-forwarding

    def take_stream(i: int) -> _Stream | None:
        """The free stream cheapest for slot i: one of its env's (task, seed) not yet passed, nearest first (each
        layout in between costs one image-less reset, ~9 ms), else the first in queue order (a new env, ~1.5 s)."""
        taken = {id(s) for s in reserved.values()}
        free = [s for s in streams if id(s) not in taken]
        cur = runs[i].spec  # the slot's env has been reset cur.episode + 1 times

        def cost(s: _Stream) -> int:
            if cur is not None and (s.task, s.seed) == (cur.task, cur.seed) and s.start > cur.episode:
                return s.start - cur.episode - 1
            return ENV_BUILD_COST_RESETS + s.start

        return min(free, key=cost) if free else None  # min() keeps queue order among equal costs

    def policy_chunks(active: list[int]) -> dict[int, np.ndarray | None]:
        if adapter.in_worker:
            return {i: None for i in active}
        want = [bool(runs[i].spec.record and want_imagined) for i in active]  # type: ignore[union-attr]
        obs = [runs[i].obs for i in active]
        tc = time.perf_counter()
        if isinstance(adapter, _Server):
            replies = adapter.act_slots(active, obs, mode, want)  # type: ignore[arg-type]
        else:
            replies = adapter.act(obs, [runs[i].spec for i in active], mode, want)  # type: ignore[arg-type,misc]
        calls.append({"ms": (time.perf_counter() - tc) * 1000, "batch": len(active),
                      "cells": sorted({(runs[i].spec.task, runs[i].spec.seed) for i in active})})  # type: ignore
        chunks: dict[int, np.ndarray | None] = {}
        for i, rep in zip(active, replies):
            a = np.asarray(rep["actions"], dtype=np.float32)
            if a.ndim != 2 or a.shape[1] != ACTION_DIM or a.shape[0] < k + delay:
                raise ValueError(f"the policy returned actions of shape {list(a.shape)}; expected [>= {k + delay}, "
                                 f"{ACTION_DIM}]")
            lag = delay if runs[i].steps > 0 else 0  # the first chunk of an episode is planned at rest
            chunks[i] = a[lag: lag + k]
            if rep.get("imagined") is not None:
                runs[i].imagined.append((runs[i].steps, np.asarray(rep["imagined"], dtype=np.uint8)))
        return chunks

    def commands_for(active: list[int], chunks: dict[int, np.ndarray | None]) -> list[dict]:
        commands = []
        for i in active:
            run = runs[i]
            cmd: dict[str, Any] = {"slot": i}
            if chunks[i] is None:
                cmd["expert_steps"] = k
            else:
                cmd["actions"] = chunks[i]
            if delay:
                cmd["obs_after"] = k - delay
            nxt = run.spec.episode + 1  # type: ignore[union-attr]
            if nxt < run.stream.stop:  # type: ignore[union-attr]
                cmd["next"] = run.stream.spec(nxt)  # type: ignore[union-attr]
            else:
                s = take_stream(i)
                if s is not None:
                    reserved[i] = s
                    cmd["next"] = s.spec(s.start)
            commands.append(cmd)
        return commands

    def process(replies: list[dict]) -> None:
        nonlocal env_steps, successes
        for r in replies:
            i, run = r["slot"], runs[r["slot"]]
            for key, v in r.get("overhead", {}).items():
                overhead[key] = overhead.get(key, 0) + v
            tentative = reserved.pop(i, None)
            env_steps += r["steps"]
            run.steps += r["steps"]
            if r["ended"] is None:
                run.obs = r["obs"]
                continue
            e = r["ended"]
            spec: EpisodeSpec = e["spec"]
            records.append({"task": spec.task, "seed": spec.seed, "env_seed": spec.env_seed,
                            "episode": spec.episode, "success": bool(e["success"]), "length": int(e["length"])})
            successes += bool(e["success"])
            if e["frames"] is not None and out is not None:
                outcome = "success" if e["success"] else "fail"
                name = f"{mode}_{spec.task}_seed{spec.seed}_ep{spec.episode:02d}_{outcome}"
                frames = compose_video(e["frames"], run.imagined, adapter.frame_stride)
                video_paths.append(str(write_video(out / "videos" / name, frames)))
            run.imagined, run.steps = [], 0
            bar.update(1)
            bar.set_postfix(mode=mode, success=f"{successes}/{len(records)}",
                            steps_s=f"{env_steps / max(time.perf_counter() - t0, 1e-9):.0f}")
            if r["started"] is not None:
                if tentative is not None and r["started"] == tentative.spec(tentative.start):
                    streams.remove(tentative)
                    run.stream = tentative
                run.spec, run.obs = r["started"], r["obs"]
                adapter.episode_started(i, run.spec)
            else:
                run.spec, run.obs = None, None

    # Start: one stream per slot.
    begin = []
    for i in range(slots):
        s = take_stream(i)
        if s is None:
            break
        streams.remove(s)
        runs[i].stream, runs[i].spec = s, s.spec(s.start)
        begin.append({"slot": i, "begin": runs[i].spec})
    for r in pool.run(begin):
        for key, v in r.get("overhead", {}).items():
            overhead[key] = overhead.get(key, 0) + v
        runs[r["slot"]].obs = r["obs"]
        adapter.episode_started(r["slot"], runs[r["slot"]].spec)  # type: ignore[arg-type]

    groups = max(1, min(groups, slots))
    bounds = [round(g * slots / groups) for g in range(groups + 1)]
    blocks = [range(bounds[g], bounds[g + 1]) for g in range(groups)]
    inflight: deque = deque()
    g = 0
    while inflight or any(r.spec is not None for r in runs):
        busy = {i for ticket_slots, _ in inflight for i in ticket_slots}
        active = [i for i in blocks[g] if runs[i].spec is not None and i not in busy]
        if active:
            commands = commands_for(active, policy_chunks(active))
            inflight.append((active, pool.submit(commands)))
        # Collect the oldest round once the pipeline is full, or when this block had nothing to submit.
        if inflight and (len(inflight) >= groups or not active):
            process(pool.collect(inflight.popleft()[1]))
        g = (g + 1) % groups
    return {"mode": mode, "records": records, "calls": calls, "videos": video_paths, "env_steps": env_steps,
            "rollout_s": time.perf_counter() - t0, "overhead": overhead}


# ---------------------------------------------------------------------------------------------------------------------
# Results


def _latency(calls: list[dict]) -> dict:
    if not calls:
        return {"calls": 0}
    ms = [c["ms"] for c in calls]
    per_obs = [c["ms"] / c["batch"] for c in calls]
    return {"calls": len(calls), "mean_batch": statistics.fmean(c["batch"] for c in calls),
            "infer_batch_ms_p50": percentile(ms, 0.5), "infer_batch_ms_p90": percentile(ms, 0.9),
            "per_obs_ms_p50": percentile(per_obs, 0.5)}


def _assemble(adapter: _Adapter, runs: list[dict], modes: list[str], tasks: list[str], seeds: list[int],
              episodes: int, k: int, max_steps: int, settings: EnvSettings, slots: int, workers: int, groups: int,
              render_flag: bool, pool_start_s: float, wall_s: float) -> dict:
    cells, summary, latency, videos = [], {}, {}, []
    for run in runs:
        m = run["mode"]
        latency[m] = _latency(run["calls"])
        videos += run["videos"]
        per_task = {}
        for t in tasks:
            for s in seeds:
                recs = sorted((r for r in run["records"] if r["task"] == t and r["seed"] == s),
                              key=lambda r: r["episode"])
                kk = sum(r["success"] for r in recs)
                cell = {"task": t, "seed": s, "env_seed": env_seed_for(s), "mode": m, **rate_summary(kk, len(recs)),
                        "mean_episode_length": statistics.fmean(r["length"] for r in recs) if recs else 0.0,
                        "latency": _latency([c for c in run["calls"] if any(tuple(x) == (t, s) for x in c["cells"])]),
                        "episode_success": [int(r["success"]) for r in recs],
                        "episode_length": [r["length"] for r in recs]}
                cells.append(cell)
            tc = [c for c in cells if c["task"] == t and c["mode"] == m]
            ks, ns = sum(c["successes"] for c in tc), sum(c["episodes"] for c in tc)
            per_task[t] = {**rate_summary(ks, ns),
                           "mean_episode_length": statistics.fmean(c["mean_episode_length"] for c in tc)}
        mc = [c for c in cells if c["mode"] == m]
        ks, ns = sum(c["successes"] for c in mc), sum(c["episodes"] for c in mc)
        summary[m] = {
            "mean_success_rate": statistics.fmean(v["success_rate"] for v in per_task.values()),
            "pooled": {**rate_summary(ks, ns)},
            "per_seed_mean_success_rate": {
                str(s): statistics.fmean(c["success_rate"] for c in mc if c["seed"] == s) for s in seeds},
            "tasks": per_task,
            "env_steps": run["env_steps"],
            "rollout_s": run["rollout_s"],
            "env_steps_per_s": run["env_steps"] / max(run["rollout_s"], 1e-9),
            "envs_built": run["overhead"].get("envs_built", 0),
            "skipped_resets": run["overhead"].get("skipped_resets", 0),
        }
    total_steps = sum(r["env_steps"] for r in runs)
    rollout_s = sum(r["rollout_s"] for r in runs)
    return {
        "config": {
            "policy": adapter.name, **adapter.info, "modes": modes, "tasks": tasks, "seeds": seeds,
            "env_seeds": [env_seed_for(s) for s in seeds], "env_seed_rule": f"env_seed = {EVAL_SEED_BASE} + seed",
            "episodes_per_seed": episodes, "episode_rule": "episode i = the env's i-th reset (layout i of the seed)",
            "horizon": adapter.horizon, "replan": k, "max_steps": max_steps,
            "image_size": list(settings.image_size), "cameras": list(settings.cameras),
            "num_envs": slots, "workers": workers, "pipeline_groups": groups,
            "harness_check_only": adapter.name == "scripted",
        },
        "cells": cells,
        "summary": summary,
        "latency": latency,
        "throughput": {"env_steps": total_steps, "rollout_s": rollout_s,
                       "env_steps_per_s": total_steps / max(rollout_s, 1e-9),
                       "pool_start_s": pool_start_s, "wall_s": wall_s, "render_every_step": not render_flag},
        "videos": videos,
    }


def summary_markdown(results: dict) -> str:
    cfg = results["config"]
    lines = [f"# Meta-World evaluation: {cfg['policy']}", ""]
    if cfg.get("checkpoint"):
        lines.append(f"Checkpoint: `{cfg['checkpoint']}`  ")
    if cfg.get("server"):
        lines.append(f"Server: `{cfg['server']}`  ")
    lines.append(f"Tasks: {len(cfg['tasks'])}; seeds {cfg['seeds']} (env seeds {cfg['env_seeds']}); "
                 f"{cfg['episodes_per_seed']} episodes per task and seed; chunk {cfg['horizon']}, execute "
                 f"{cfg['replan']}, max {cfg['max_steps']} steps; cameras {cfg['cameras']} at "
                 f"{cfg['image_size'][0]}x{cfg['image_size'][1]}.")
    if cfg.get("harness_check_only"):
        lines += ["", "**Scripted expert with privileged simulator state: a harness check, not a result.**"]
    lines += ["", "Success rate in % with Wilson 95 % interval (successes/episodes), seeds pooled per task.", ""]
    modes = cfg["modes"]
    cells = {t: {} for t in cfg["tasks"]}
    for c in results["cells"]:
        cur = cells[c["task"]].get(c["mode"], (0, 0))
        cells[c["task"]][c["mode"]] = (cur[0] + c["successes"], cur[1] + c["episodes"])
    rows = [[t, *[fmt_rate(*cells[t][m]) for m in modes]] for t in cfg["tasks"]]
    means = ["**mean over tasks**"]
    for m in modes:
        s = results["summary"][m]
        p = s["pooled"]
        means.append(f"{100 * s['mean_success_rate']:.1f} [{100 * p['ci95'][0]:.1f}, {100 * p['ci95'][1]:.1f}] "
                     f"({p['successes']}/{p['episodes']})")
    lines.append(markdown_table(["task", *modes], rows + [means]))
    lines.append("The mean row's interval pools all episodes (tasks differ in difficulty; compare policies with "
                 "`fastwam.eval.stats.bootstrap_diff_ci` on the per-episode outcomes in results.json).")
    lines += ["", "## Per seed (mean success over tasks, %)", ""]
    lines.append(markdown_table(["mode", *[f"seed {s}" for s in cfg["seeds"]]],
                                [[m, *[f"{100 * results['summary'][m]['per_seed_mean_success_rate'][str(s)]:.1f}"
                                       for s in cfg["seeds"]]] for m in modes]))
    lines += ["", "## Episode length and speed", ""]
    rows = []
    for m in modes:
        s, lat = results["summary"][m], results["latency"][m]
        mean_len = statistics.fmean(v["mean_episode_length"] for v in s["tasks"].values())
        rows.append([m, f"{mean_len:.0f}", f"{lat.get('infer_batch_ms_p50', 0):.1f}",
                     f"{lat.get('per_obs_ms_p50', 0):.2f}", f"{lat.get('mean_batch', 0):.1f}",
                     f"{s['env_steps_per_s']:.0f}"])
    lines.append(markdown_table(["mode", "mean episode length", "policy call p50 (ms)", "per observation p50 (ms)",
                                 "mean batch", "env steps/s"], rows))
    t = results["throughput"]
    lines.append(f"{cfg['num_envs']} environments over {cfg['workers']} worker process(es) "
                 f"({'pipelined' if cfg.get('pipeline_groups', 1) > 1 else 'lock-step'}); "
                 f"{t['env_steps']} env steps in {t['rollout_s']:.1f} s of rollout ({t['env_steps_per_s']:.0f}/s), "
                 f"{t['wall_s']:.1f} s wall in all.")
    if results["videos"]:
        lines += ["", "## Videos", "",
                  "Cameras side by side. Joint / IDM: left, the live rollout (2x); right, for the latest re-plan, "
                  "what really happened at the planned frames (top; grey after the episode ended) and what the policy "
                  "imagined for them (bottom).", ""]
        lines += [f"- `{Path(v).name}`" for v in results["videos"]]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------------
# CLI


@dataclass
class EvalArgs:
    """Closed-loop Meta-World evaluation (action chunking, parallel envs, batched policy, Wilson CIs, videos)."""

    checkpoint: str = ""  # checkpoint or run directory (its latest checkpoint); needed for --policy checkpoint
    policy: Literal["checkpoint", "scripted", "zero", "random"] = "checkpoint"  # scripted = harness check only
    tasks: str = "mt10"  # a task set (mt10, mt50) or comma-separated tasks
    episodes: int = 50  # per task and seed (<= 50: each env seed has 50 layouts per task)
    seeds: str = "0"  # evaluation seeds, comma-separated; seed s runs env seed 1000000 + s
    mode: str = ""  # inference mode(s), comma-separated (fast, joint, idm); empty = the checkpoint's own
    replan: int = 0  # actions executed per chunk before re-planning (0 = half the chunk)
    horizon: int = 0  # chunk length of the zero/random/scripted baselines (0 = 16)
    max_steps: int = 300
    workers: int = 2  # env worker processes (0 = step the envs in this process)
    num_envs: int = 0  # environments in flight (0 = 8 per worker); pipelined, each policy call batches half of them
    server: str = ""  # ws://host:port: evaluate through `fastwam serve` instead of loading the checkpoint
    out: str = "runs/eval/metaworld"
    videos: int = 2  # episodes recorded per task (first seed)
    image_size: int = 0  # render size override (0 = the demonstrations' size from the checkpoint's dataset)
    cameras: str = ""  # camera override, comma-separated (default: the policy's cameras)
    device: str = ""  # cuda / cpu (empty = cuda if available)
    threads: int = 0  # torch CPU threads for the policy (0 = 1 for a CPU policy with env workers, else unchanged)
    policy_seed: int = 0  # seed of the policy's sampling noise
    # Overlap policy and simulators (two env blocks in turn): same results, faster only when the policy does not
    # need the workers' CPU cores. auto = on for a GPU policy, off for a CPU one.
    pipeline: Literal["auto", "on", "off"] = "auto"
    progress: bool = True  # show a progress bar
    # Evaluation axes (see `evaluate`): a test-time visual shift, and observation latency with compensation.
    shift: Literal["none", "camera", "lighting", "colour"] = "none"
    obs_delay: int = 0  # steps the observation lags the robot at each re-plan (0..replan-1)


def cli(argv: list[str], prog: str = "fastwam eval metaworld") -> int:
    import tyro

    args = tyro.cli(EvalArgs, args=argv, prog=prog)
    if args.policy == "checkpoint" and not args.checkpoint and not args.server:
        print(f"{prog}: give --checkpoint DIR, --server ws://host:port, or --policy scripted|zero|random",
              file=sys.stderr)
        return 2
    target = args.checkpoint if args.policy == "checkpoint" else args.policy
    results = evaluate(
        target, args.tasks, episodes=args.episodes, seeds=args.seeds, mode=args.mode or None,
        replan=args.replan or None, max_steps=args.max_steps, workers=args.workers, video_episodes=args.videos,
        out_dir=args.out, server=args.server or None, num_envs=args.num_envs or None,
        image_size=(args.image_size, args.image_size) if args.image_size else None,
        cameras=[c.strip() for c in args.cameras.split(",") if c.strip()] or None,
        horizon=args.horizon or None, device=args.device or None, policy_seed=args.policy_seed,
        pipeline={"auto": None, "on": True, "off": False}[args.pipeline], threads=args.threads or None,
        progress=args.progress, shift=args.shift, obs_delay=args.obs_delay,
    )
    print(summary_markdown(results))
    print(f"results: {Path(args.out) / 'results.json'}\nsummary: {Path(args.out) / 'summary.md'}"
          + (f"\nvideos:  {Path(args.out) / 'videos'}" if results["videos"] else ""))
    return 0
