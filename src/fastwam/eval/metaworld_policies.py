"""Policy adapters for `fastwam eval metaworld`: what the harness needs from anything that produces action chunks.

An adapter states its chunk length, cameras, render size and inference modes, and answers a batch of observations
with a batch of chunks. Four kinds: a checkpoint in this process (`_InProcess`, a `FastWAMPolicy`), a websocket
server (`_Server`, one client per environment, requests sent concurrently so the server can micro-batch them), and
the baselines `zero` (all-zero actions), `random` (uniform in the action box, seeded per episode) and `scripted`
(Meta-World's expert reading the privileged simulator state inside the env worker: a harness check only).
`_resolve_policy` turns what the user gave into one of them.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from fastwam.eval.envpool import EpisodeSpec
from fastwam.serving.protocol import realtime_kwargs

ACTION_DIM = 4
BASELINES = ("scripted", "zero", "random")
DEFAULT_BASELINE_HORIZON = 16  # chunk length of the baselines (matches the small_cpu preset)


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
    realtime_chunking: bool = False  # takes the previous chunk and the inference delay (real-time chunking)
    realtime_method: str | None = None  # how it does: guidance, or prefix (trained with train.action_prefix_max)

    def _read_realtime(self, meta: dict) -> None:
        """Whether and how the policy does real-time chunking, from its metadata (guidance unless it says)."""
        self.realtime_chunking = bool(meta.get("realtime_chunking"))
        self.realtime_method = meta.get("realtime_method", "guidance" if self.realtime_chunking else None)

    def act(self, obs: list[dict], specs: list[EpisodeSpec], mode: str, want_video: list[bool],
            realtime: list | None = None) -> list[dict]:
        """`realtime`: per observation, None or (previous chunk from the observation's time on, inference delay)."""
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
        self._read_realtime(meta)

    def act(self, obs, specs, mode, want_video, realtime=None):
        pobs = [_policy_obs(o, self.cameras) for o in obs]

        def call(idx: list[int], **kw) -> list[dict]:
            kw |= realtime_kwargs(None if realtime is None else [realtime[i] for i in idx])
            return self.policy.infer_batch([pobs[i] for i in idx], mode=mode, **kw)

        if mode == "fast" or not any(want_video):
            return call(list(range(len(obs))))
        # Only the recorded episodes need decoded video; one extra call keeps the others from paying for decoding.
        vid = [i for i, w in enumerate(want_video) if w]
        rest = [i for i, w in enumerate(want_video) if not w]
        out: list[dict] = [{}] * len(obs)
        for idx, rv in ((vid, True), (rest, False)):
            if idx:
                for i, r in zip(idx, call(idx, return_video=rv)):
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
        self._read_realtime(meta)
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

    def act(self, obs, specs, mode, want_video, realtime=None):
        raise NotImplementedError("use act_slots")  # needs slot ids to pick the connection

    def act_slots(self, slots: list[int], obs: list[dict], mode: str, want_video: list[bool],
                  realtime: list | None = None) -> list[dict]:
        def one(i: int) -> dict:
            message = _policy_obs(obs[i], self.cameras)
            if want_video[i] and mode != "fast":
                message["return_video"] = True
            rt = realtime[i] if realtime is not None else None
            if rt is not None:  # what a real robot client sends (see WebsocketClient.infer)
                return self._client(slots[i]).infer(message, mode=mode, prev_chunk=rt[0], inference_delay=rt[1])
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

    def act(self, obs, specs, mode, want_video, realtime=None):
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

    def act(self, obs, specs, mode, want_video, realtime=None):
        return [{"actions": self._rngs[s].uniform(-1, 1, (self.horizon, ACTION_DIM)).astype(np.float32)}
                for s in specs]


class _Scripted(_Adapter):
    def __init__(self, horizon: int):
        self.name, self.horizon, self.default_mode, self.modes = "scripted", horizon, "scripted", ("scripted",)
        self.in_worker = True


def _resolve_policy(policy_or_checkpoint: Any, server: str | None, num_slots: int, horizon: int | None,
                    device: str | None, policy_seed: int, compile: bool = False,
                    steps: int | None = None, rtc_method: str | None = None) -> _Adapter:
    if server:
        return _Server(server, num_slots)
    p = policy_or_checkpoint
    if isinstance(p, str) and p in BASELINES and not Path(p).exists():
        h = horizon or DEFAULT_BASELINE_HORIZON
        return {"scripted": lambda: _Scripted(h), "zero": lambda: _Zero(h),
                "random": lambda: _Random(h, policy_seed)}[p]()
    if isinstance(p, (str, Path)):
        from fastwam.policy import FastWAMPolicy

        return _InProcess(FastWAMPolicy.from_pretrained(p, device=device, seed=policy_seed, compile=compile,
                                                        steps=steps, rtc_method=rtc_method))
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
