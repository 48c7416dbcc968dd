"""FastWAMPolicy: a checkpoint as a policy — observation dicts in, un-normalised action chunks out.

Pre-processing is exactly training's: the same `compose_cameras` (camera layout, resize + centre crop, [-1, 1]),
the same codec, the same normaliser and statistics (stored with the checkpoint), and the same cached text
embeddings. Observations use the openpi convention: camera `observation.images.X` of the dataset arrives as
`observation/X` (uint8 H x W x 3), the state as `observation/state`, the instruction as `prompt`.

Sampling is deterministic: every observation's noise comes from generators seeded with the policy's seed (default 0;
42 reproduces the official LIBERO evaluation, which seeds every call with 42; see `_noise`), so a
batch of B observations gives the same actions as B single calls, in-process or over the wire.

Bounded work per request: `metadata` declares the largest image side (`max_image_side`) and prompt length
(`max_prompt_chars`) a client may send, and `fastwam serve` refuses anything beyond them before the policy sees it
(in-process callers are trusted and not limited). Whatever its size, an image far wider or taller than the model's
input is centre-cropped before resizing (`crop_to_aspect`), and prompt embeddings are cached in a bounded LRU.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

from fastwam import validate
from fastwam.config import Config
from fastwam.data.normalize import Normalizer, NormStats
from fastwam.data.transforms import camera_sizes, compose_cameras
from fastwam.loading import model_from_weights, resolve_dtype
from fastwam.lru import LRUCache
from fastwam.model.encoders import build_codec, build_text_encoder
from fastwam.model.fastwam import FastWAM
from fastwam.model.rtc import DEFAULT_MAX_GUIDANCE, ActionGuide, rtc_weights
from fastwam.model.visibility import MODE_RULES, get_variant
from fastwam.serving.protocol import as_text

STATE_KEY, PROMPT_KEY = "observation/state", "prompt"
MAX_PROMPT_CHARS = 1024  # LIBERO's longest instruction is ~100; the encoders read 16-128 words / tokens of it anyway
MAX_ASPECT = 2.0  # images more than this much wider / taller than the model's input are cropped before resizing


def default_max_image_side(image_size: tuple[int, int]) -> int:
    """Largest camera side a server accepts by default: 4x the model's input side, at least 256 (LIBERO 224 -> 896).

    Resizing costs ~10 ns per pixel and camera on the 2-core VM, all of it on the one policy thread that every
    client waits for: two 640 x 640 images cost ~12 ms (decode + resize), more than a whole `tiny` inference, and
    a bystander's latency doubled. Clients resize to `preferred_shape` anyway (openpi, LIBERO, RoboTwin, Meta-World);
    `fastwam serve --max-image-side` raises the bound for one that cannot.
    """
    return max(256, 4 * max(image_size))


def crop_to_aspect(image: np.ndarray, size: tuple[int, int], max_ratio: float = MAX_ASPECT) -> np.ndarray:
    """A centre-cropped view of `image` ([H, W, 3]) at most `max_ratio` x wider or taller than `size` = (h, w).

    Why: `resize_crop` scales an image to *cover* its target before the centre crop, so a 2 x 100,000 image became
    8 x 400,000 floats (GBs for a 598 KiB request). Cropping the excess first bounds the resized image to
    `max_ratio` x the target's area. Images within the ratio (every real camera) are returned unchanged, so their
    preprocessing stays exactly training's.
    """
    h, w = image.shape[:2]
    th, tw = size
    if w * th > max_ratio * h * tw:  # too wide
        keep = max(1, int(max_ratio * h * tw / th))
        return image[:, (w - keep) // 2 : (w - keep) // 2 + keep]
    if h * tw > max_ratio * w * th:  # too tall
        keep = max(1, int(max_ratio * w * th / tw))
        return image[(h - keep) // 2 : (h - keep) // 2 + keep]
    return image


def camera_obs_key(dataset_key: str) -> str:
    """`observation.images.wrist_image` -> `observation/wrist_image` (openpi's naming)."""
    prefix = "observation.images."
    name = dataset_key[len(prefix):] if dataset_key.startswith(prefix) else dataset_key
    return f"observation/{name}"


class FastWAMPolicy:
    def __init__(
        self,
        cfg: Config,
        model: FastWAM,
        norm_stats: dict,
        mode: str | None = None,
        device: str | torch.device = "cpu",
        seed: int = 0,
        checkpoint: str = "",
        dtype: str | torch.dtype = "auto",
        compile: bool = False,
        *,
        checkpoint_info: dict | None = None,
        max_image_side: int = 0,
        max_prompt_chars: int = MAX_PROMPT_CHARS,
        text_cache_entries: int = 1024,
        text_cache_mb: float = 256.0,
        steps: int | None = None,
        rtc_method: str | None = None,
    ):
        """`checkpoint`: a display name for `metadata` (never a path: metadata goes to every client);
        `checkpoint_info`: its step / sha256 (`validate.checkpoint_identity`). `max_image_side` (0 =
        `default_max_image_side`) and `max_prompt_chars`: the limits `metadata` declares to clients. The
        prompt-embedding cache keeps at most `text_cache_entries` prompts and `text_cache_mb` MiB (least recently
        used go first). `steps`: Euler denoising steps per chunk (default: the checkpoint's `inference.steps`, which a
        distilled run sets to the step count it was made for). `rtc_method`: how a request's previous chunk is
        continued (`model/rtc.py`): "guidance" (any model) or "prefix" (a model trained with train.action_prefix_max);
        default: prefix when the checkpoint was trained for it, else guidance."""
        self.cfg = cfg
        self.rtc_method = rtc_method or ("prefix" if cfg.train.action_prefix_max > 0 else "guidance")
        if self.rtc_method not in ("guidance", "prefix"):
            raise ValueError(f"rtc_method must be guidance or prefix, got {rtc_method!r}")
        self.steps = int(steps) if steps else int(cfg.inference.steps)
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.device = torch.device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.model = model.to(self.device, self.dtype).eval()
        if compile:  # one graph per inference stage (CUDA graphs on GPU); the first request per shape compiles
            self.model.compile_inference()
        self.codec = build_codec(cfg.codec).to(self.device).eval()
        self.text_encoder = build_text_encoder(cfg.text, cfg.model.text_dim).to(self.device).eval()
        self.normalizer = Normalizer(NormStats.from_dict(norm_stats), cfg.data.normalizer)
        self.mode = mode or get_variant(cfg.train.variant).inference
        self._check_mode(self.mode)
        self.seed = seed
        self.checkpoint = checkpoint
        self.checkpoint_info = dict(checkpoint_info or {})
        if not cfg.data.cameras:
            raise ValueError("the checkpoint's config names no cameras (data.cameras is empty)")
        self.camera_keys = [camera_obs_key(k) for k in cfg.data.cameras]
        self.max_image_side = int(max_image_side) or default_max_image_side(cfg.data.image_size)
        self.max_prompt_chars = int(max_prompt_chars)
        self.text_cache: LRUCache[str, torch.Tensor] = LRUCache(
            text_cache_entries, int(text_cache_mb * 2**20),
            lambda text, emb: emb.element_size() * emb.nelement() + sys.getsizeof(text),
        )

    # -----------------------------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls, path: str | Path, mode: str | None = None, device: str | None = None, seed: int = 0, use_ema: bool = True,
        dtype: str | torch.dtype = "auto", compile: bool = False, steps: int | None = None,
        rtc_method: str | None = None, **limits,
    ) -> FastWAMPolicy:
        """Load a checkpoint directory (or a run directory: its latest checkpoint) from local disk only.

        Everything is validated here (`fastwam.validate`): config types and ranges, finite norm stats of the model's
        dimensions, complete and finite weights, and one blank inference. A bad checkpoint raises
        `CheckpointError` with one line naming the file and field, instead of failing every request later.
        `limits` (max_image_side, max_prompt_chars, text_cache_entries, text_cache_mb) go to the constructor.
        `steps`: denoising steps per chunk (default: the checkpoint's).
        """

        checked = validate.load_checked(path, use_ema=use_ema)
        model = model_from_weights(checked.config.model, checked.weights)
        validate.check_finite_weights(model, checked.weights)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        policy = cls(checked.config, model, checked.norm_stats, mode=mode, device=device, seed=seed,
                     checkpoint=checked.identity["name"], dtype=dtype, compile=compile,
                     checkpoint_info=checked.identity, steps=steps, rtc_method=rtc_method, **limits)
        validate.check_inference(policy, checked.path)
        return policy

    @property
    def metadata(self) -> dict:
        h, w = self.cfg.data.image_size
        side = self.max_image_side
        spec = {key: {"shape": [-1, -1, 3], "dtype": "uint8", "preferred_shape": [h, w, 3],
                      "max_shape": [side, side, 3]} for key in self.camera_keys}
        spec[STATE_KEY] = {"shape": [self.cfg.model.state_dim], "dtype": "float32"}
        spec[PROMPT_KEY] = {"shape": [], "dtype": "str", "max_length": self.max_prompt_chars}
        return {
            "policy": "fastwam",
            "observation_spec": spec,
            "action_shape": [self.cfg.model.action_horizon, self.cfg.model.action_dim],
            "mode": self.mode,
            "modes": list(MODE_RULES),
            "variant": self.cfg.train.variant,
            "inference_steps": self.steps,
            # Real-time chunking: a request may carry `prev_chunk` (the previous chunk's actions from the
            # observation's time on, [L, A]) and `inference_delay` (how many of them run while this one is computed).
            "realtime_chunking": True,
            "realtime_method": self.rtc_method,  # guidance, or prefix (trained with train.action_prefix_max)
            # Actions are predicted at the dataset's control rate; video frames are `frame_stride` steps apart.
            "frame_stride": self.cfg.data.frame_stride,
            # A name, step and content hash, never a path: metadata is sent to every client.
            "checkpoint": self.checkpoint,
            "checkpoint_step": self.checkpoint_info.get("step"),
            "checkpoint_sha256": self.checkpoint_info.get("sha256"),
            "seed": self.seed,  # the sampling noise's seed (the official LIBERO evaluation uses 42 on every call)
        }

    def warmup(self, batch_sizes=(1,), mode: str | None = None) -> None:
        """Run blank observations of each batch size once: with `compile`, this is when the graphs are built (slow),
        so that no real request pays for it."""
        obs = self.blank_observation()
        for b in batch_sizes:
            self.infer_batch([obs] * b, mode=mode)

    def blank_observation(self) -> dict:
        """Black images of the model's size, a zero state and a short prompt (warm-up, load-time check)."""
        h, w = self.cfg.data.image_size
        obs: dict = {key: np.zeros((h, w, 3), np.uint8) for key in self.camera_keys}
        obs[STATE_KEY] = np.zeros(self.cfg.model.state_dim, np.float32)
        obs[PROMPT_KEY] = "warm up"
        return obs

    def reset(self) -> None:
        """Episode boundary. The policy keeps no per-episode state (each chunk is conditioned on one frame)."""

    # -----------------------------------------------------------------------------------------------------------------

    def _check_mode(self, mode: str) -> None:
        if mode not in MODE_RULES:
            raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODE_RULES)}")

    def validate(self, obs: dict) -> None:
        """Raise ValueError naming the first problem with an observation."""
        if not isinstance(obs, dict):
            raise ValueError(f"an observation must be a dict, got {type(obs).__name__}")
        for key in self.camera_keys:
            if key not in obs:
                raise ValueError(f"missing key {key!r} (expected keys: {', '.join(self.camera_keys)}, "
                                 f"{STATE_KEY}, {PROMPT_KEY})")
            img = obs[key]
            if not isinstance(img, np.ndarray) or img.dtype != np.uint8:
                raise ValueError(f"{key!r} must be a uint8 array, got {getattr(img, 'dtype', type(img).__name__)}")
            if img.ndim != 3 or img.shape[2] != 3 or img.shape[0] < 2 or img.shape[1] < 2:
                raise ValueError(f"{key!r} must have shape [H, W, 3], got {list(img.shape)}")
        if STATE_KEY not in obs:
            raise ValueError(f"missing key {STATE_KEY!r}")
        state = np.asarray(obs[STATE_KEY])
        if state.dtype.kind not in "fiu":
            raise ValueError(f"{STATE_KEY!r} must be numeric, got dtype {state.dtype}")
        if state.shape != (self.cfg.model.state_dim,):
            raise ValueError(f"{STATE_KEY!r} must have shape [{self.cfg.model.state_dim}], got {list(state.shape)}")
        if not np.isfinite(state).all():
            raise ValueError(f"{STATE_KEY!r} contains NaN or inf")
        prompt = as_text(obs.get(PROMPT_KEY))
        if prompt is None or not prompt.strip():
            raise ValueError(f"{PROMPT_KEY!r} must be a non-empty string")

    @torch.no_grad()
    def infer_batch(
        self, observations: list[dict], mode: str | None = None, return_video: bool = False, *,
        prev_chunks: list | None = None, inference_delays: list[int] | None = None, steps: int | None = None,
    ) -> list[dict]:
        """Action chunks for a batch of observations (see `infer`). `prev_chunks` / `inference_delays`: one entry per
        observation (None / 0 for plain sampling)."""
        mode = mode or self.mode
        self._check_mode(mode)
        if not observations:
            return []
        for obs in observations:
            self.validate(obs)
        steps = self._check_steps(steps)
        guide, pinned = self._guide(len(observations), prev_chunks, inference_delays, mode)
        t0 = time.perf_counter()
        sizes = camera_sizes(self.cfg.data, len(self.camera_keys))
        frames = torch.stack([
            compose_cameras([crop_to_aspect(obs[k], size) for k, size in zip(self.camera_keys, sizes, strict=True)],
                            self.cfg.data)
            for obs in observations
        ]).to(self.device)
        first = self.codec.encode(frames[:, :, None]).to(self.dtype)
        # np.stack copies, so read-only request buffers (msgpack decodes to them) are never wrapped by torch.
        state = torch.from_numpy(np.stack([np.asarray(obs[STATE_KEY], dtype=np.float32) for obs in observations]))
        state = self.normalizer.normalize("state", state).to(self.device, self.dtype)
        text = torch.stack([self._embed(as_text(obs[PROMPT_KEY])) for obs in observations]).to(self.device, self.dtype)
        m = self.cfg.model
        noise = [self._noise(first) for _ in observations]
        out = self.model.sample(
            first, text, state, mode=mode, steps=steps, shift=self.cfg.inference.shift, guide=guide,
            action_noise=torch.cat([a for a, _ in noise]).to(self.device),
            video_noise=None if mode == "fast" else torch.cat([v for _, v in noise]).to(self.device),
            return_video=return_video,
        )
        actions = self.normalizer.unnormalize("action", out.actions.float().cpu()).numpy().astype(np.float32)
        for i, prev, d in pinned:  # exactly what runs meanwhile (no round trip through the normaliser)
            actions[i, :d] = prev[:d]
        infer_ms = (time.perf_counter() - t0) * 1000
        results = []
        for i in range(len(observations)):
            res = {"actions": actions[i].reshape(m.action_horizon, m.action_dim), "mode": mode,
                   "policy_timing": {"infer_ms": infer_ms, "batch_size": len(observations)}}
            if return_video and out.video is not None:
                video = self.codec.decode(out.video[i : i + 1].float())[0]  # [3, F, H, W]
                res["imagined"] = ((video.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 3, 0).cpu().numpy()
            results.append(res)
        return results

    def infer(self, obs: dict, mode: str | None = None, return_video: bool = False, *,
              prev_chunk: np.ndarray | None = None, inference_delay: int = 0, steps: int | None = None) -> dict:
        """One observation -> {"actions": [Ha, A] un-normalised, ...}.

        Real-time chunking (`model/rtc.py`): `prev_chunk` holds the previous chunk's actions from the time of `obs`
        on ([L, A], L <= Ha, un-normalised, as this policy returned them), `inference_delay` d how many of them the
        robot executes while this chunk is computed. The new chunk's first d actions are exactly those, and the rest
        of the overlap is guided to continue them. d = 0 (or no `prev_chunk`) is plain sampling, bit for bit.
        `steps`: denoising steps for this call (default: the policy's).
        """
        return self.infer_batch([obs], mode=mode, return_video=return_video, prev_chunks=[prev_chunk],
                                inference_delays=[inference_delay], steps=steps)[0]

    def _check_steps(self, steps: int | None) -> int:
        if steps is None:
            return self.steps
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= steps <= 1000:
            raise ValueError(f"steps must be an integer in 1..1000, got {steps!r}")
        return int(steps)

    def check_realtime(self, prev_chunk, inference_delay) -> tuple[np.ndarray | None, int]:
        """Validate one request's real-time-chunking fields -> (prev_chunk float32 [L, A] or None, delay)."""
        m = self.cfg.model
        d = inference_delay if inference_delay is not None else 0
        if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 0:
            raise ValueError(f"inference_delay must be a non-negative integer, got {inference_delay!r}")
        if prev_chunk is None:
            if d:
                raise ValueError("inference_delay > 0 needs prev_chunk (the actions that run meanwhile)")
            return None, 0
        prev = np.asarray(prev_chunk)
        if prev.dtype.kind not in "fiu":
            raise ValueError(f"prev_chunk must be numeric, got dtype {prev.dtype}")
        if prev.ndim != 2 or prev.shape[1] != m.action_dim or not 1 <= prev.shape[0] <= m.action_horizon:
            raise ValueError(f"prev_chunk must have shape [L, {m.action_dim}] with 1 <= L <= {m.action_horizon}, "
                             f"got {list(prev.shape)}")
        if not np.isfinite(prev).all():
            raise ValueError("prev_chunk contains NaN or inf")
        if d > prev.shape[0]:
            raise ValueError(f"inference_delay ({d}) exceeds prev_chunk's length ({prev.shape[0]})")
        return prev.astype(np.float32), int(d)

    def _guide(self, n: int, prev_chunks, delays, mode: str) -> tuple[ActionGuide | None, list]:
        """The batch's `ActionGuide` (None when no observation carries a previous chunk to continue) and the pinned
        actions [(index, prev_chunk, delay)]."""
        prev_chunks = list(prev_chunks) if prev_chunks is not None else [None] * n
        delays = list(delays) if delays is not None else [0] * n
        if len(prev_chunks) != n or len(delays) != n:
            raise ValueError(f"prev_chunks / inference_delays need one entry per observation ({n})")
        checked = [self.check_realtime(p, d) for p, d in zip(prev_chunks, delays)]
        # d = 0 is plain sampling: nothing runs during inference, so there is nothing the new chunk must continue.
        pinned = [(i, p, d) for i, (p, d) in enumerate(checked) if p is not None and d > 0]
        if not pinned:
            return None, []
        if mode == "joint":
            raise ValueError("real-time chunking (prev_chunk with inference_delay > 0) needs mode fast or idm")
        m = self.cfg.model
        target = torch.zeros(n, m.action_horizon, m.action_dim)
        weights = torch.zeros(n, m.action_horizon)
        for i, prev, d in pinned:
            target[i, : len(prev)] = self.normalizer.normalize("action", torch.from_numpy(prev))
            weights[i] = rtc_weights(m.action_horizon, len(prev), d)
        delay = torch.tensor([d for _, d in checked])
        return ActionGuide(target, weights, delay, DEFAULT_MAX_GUIDANCE, self.rtc_method), pinned

    def _embed(self, prompt: str) -> torch.Tensor:
        """The prompt's text embedding, through the bounded LRU (`text_cache`) rather than the encoder's own cache,
        which keeps every prompt it ever saw (fine for training's few instructions, not for a server's clients)."""
        emb = self.text_cache.get(prompt)
        if emb is None:
            emb = self.text_encoder.encode_one(prompt)
            self.text_cache.put(prompt, emb)
        return emb

    def _noise(self, first: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-observation noise from the policy seed (batch-size independent), drawn as the official evaluation
        draws it: the action noise from a CPU generator seeded with `seed`, the video noise (every latent frame,
        frame 0 then replaced by the observation) from a second generator seeded alike. With seed 42 this is the
        official LIBERO evaluation's noise on every call (its Joint / IDM action noise equals its fast one)."""
        m = self.cfg.model
        a = torch.randn(1, m.action_horizon, m.action_dim, generator=torch.Generator().manual_seed(self.seed))
        v = torch.randn(1, first.shape[1], m.latent_frames, *first.shape[3:],
                        generator=torch.Generator().manual_seed(self.seed))
        return a, v[:, :, 1:]
