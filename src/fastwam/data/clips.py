"""The training sample: clips cut from any local LeRobot dataset (v3.0, or v2.1).

Every frame of every episode in the split starts one clip (LeRobot's convention). A clip starting at step t0 holds
- "video": float32 [3, T, H, W_total] in [-1, 1], frame k = step t0 + k * frame_stride, cameras composed by
  `transforms.compose_cameras` (the policy calls the same function at inference);
- "video_mask": bool [T], False where a frame lies past the episode end (those repeat the last frame);
- "actions": float32 [action_horizon, A] normalised, steps t0 .. t0 + H - 1 (past the end: the last action repeated);
- "action_mask": bool [H]; "state": float32 [S] normalised (step t0); "task": the instruction.
A dataset without actions (no `action` feature, and usually no state: video recorded without a policy's log) loads
with `actions=False`, for whatever needs only video (`fastwam pretrain`, co-training's action-free clips): its items
hold "video", "video_mask" and "task". Asked for actions, it is refused with one line saying what it is.
Action/state dims, fps and camera resolutions come from the dataset's metadata, never from the preset. Everything is
checked when the dataset is built, so a bad dataset fails before training starts, with the file and field named.

Speed: with `cache_in_memory` every needed frame is decoded once (file by file, streaming) and kept as uint8 already
resized to the layout's per-camera size, so an item is a gather plus a cast. Without it, whole episodes are decoded on
demand and the most recent ones kept (per worker).
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from fastwam.config import DataConfig
from fastwam.data.lerobot import INFO_PATH, DatasetError, Episode, LeRobotReader, _open_video
from fastwam.data.normalize import Normalizer, NormStats
from fastwam.data.transforms import camera_sizes, canvas_size, layout_cameras, resize_crop, to_model_range

log = logging.getLogger(__name__)

CAMERA_PREFIX = "observation.images."
# Datasets whose decoded frames take at least this much go to the shared, memory-mapped frame cache (see
# `ClipDataset._shared_cache`); smaller ones are decoded into each process's memory.
SHARED_CACHE_MIN_BYTES = 1 << 30


def frame_cache_dir() -> Path:
    return Path(os.environ.get("FASTWAM_CACHE_DIR") or Path.home() / ".cache" / "fastwam" / "frames")
_LAZY_EPISODES = 16  # decoded episodes kept per camera when not caching everything


def resolve_cameras(reader: LeRobotReader, cameras: Sequence[str]) -> list[str]:
    """Camera feature keys in layout order: `cameras` as given (full keys or short names), else all sorted."""
    info = reader.root / INFO_PATH
    available = reader.camera_keys
    if not cameras:
        if not available:
            raise DatasetError(f"{info}: no camera features (dtype 'video' or 'image')")
        return sorted(available)
    keys = []
    for name in cameras:
        key = name if name in reader.features else CAMERA_PREFIX + name
        if key not in available:
            raise DatasetError(f"{info}: unknown camera {name!r}; the dataset has {sorted(available)}")
        keys.append(key)
    return keys


def _vector_dim(reader: LeRobotReader, key: str, role: str) -> int:
    info = reader.root / INFO_PATH
    if key not in reader.features:
        hint = ""
        if role == "action" and not any(k in reader.features for k in ("action", "actions")):
            hint = (" (an action-free, video-only dataset: use it with `fastwam pretrain --dataset` or "
                    "`fastwam train --video-dataset`, not as a policy's --dataset)")
        raise DatasetError(f"{info}: {role} feature {key!r} not found; features are {sorted(reader.features)}{hint}")
    shape = list(reader.features[key]["shape"])
    if len(shape) != 1 or shape[0] < 1:
        raise DatasetError(f"{info}: {role} feature {key!r} must be a 1-D vector, has shape {shape}")
    return int(shape[0])


def collate(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors along a new batch dim; strings (the task) become a list."""
    if not items:
        raise ValueError("cannot collate an empty batch")
    out: dict[str, Any] = {}
    for key, value in items[0].items():
        if isinstance(value, torch.Tensor) and value.device.type == "cpu":
            # numpy stacks single-threaded: torch's intra-op threads stall when training keeps the cores busy
            out[key] = torch.from_numpy(np.stack([it[key].numpy() for it in items]))
        elif isinstance(value, torch.Tensor):
            out[key] = torch.stack([it[key] for it in items])
        else:
            out[key] = [it[key] for it in items]
    return out


class ClipDataset(Dataset):
    collate = staticmethod(collate)  # the trainer calls `dataset.collate(items)`

    def __init__(self, cfg: DataConfig, split: Literal["train", "val"] = "train", stats: NormStats | None = None,
                 actions: bool = True):
        """actions=False: video only (any dataset, with or without actions): items without actions and state."""
        if not cfg.dataset:
            raise DatasetError("DataConfig.dataset is empty: pass the path of a LeRobot dataset directory")
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if cfg.num_frames < 1 or cfg.frame_stride < 1 or cfg.action_horizon < 1:
            raise ValueError("num_frames, frame_stride and action_horizon must be >= 1")
        self.cfg, self.split = cfg, split
        self.reader = reader = LeRobotReader(cfg.dataset)
        self.root = reader.root
        self.fps = reader.fps
        info = reader.root / INFO_PATH

        # -- schema -------------------------------------------------------------------------------------------------
        self.camera_keys = resolve_cameras(reader, cfg.cameras)
        try:
            self.camera_sizes = camera_sizes(cfg, len(self.camera_keys))
            self.frame_size = canvas_size(cfg, len(self.camera_keys))
        except ValueError as e:
            raise DatasetError(f"{info}: cameras {self.camera_keys}: {e}") from None
        self.camera_shapes = {k: reader.camera_shape(k) for k in self.camera_keys}
        for key, (_, _, c) in self.camera_shapes.items():
            if c != 3:
                raise DatasetError(f"{info}: camera {key!r} has {c} channels, expected 3 (RGB)")
        self.state_key, self.action_key = cfg.state_key, cfg.action_key
        self.labelled = actions
        vectors = []
        if actions:
            # Actions first: a video-only dataset is named as such, before its missing state is.
            self.action_dim = _vector_dim(reader, cfg.action_key, "action")
            self.state_dim = _vector_dim(reader, cfg.state_key, "state")
            vectors = [(cfg.action_key, self.action_dim), (cfg.state_key, self.state_dim)]

        # -- low-dim columns ----------------------------------------------------------------------------------------
        cols = reader.read_columns([k for k, _ in vectors] + ["episode_index", "task_index"])
        files = reader.data_files()
        data_dir = files[0] if len(files) == 1 else reader.root / "data"
        arrays = {}
        for key, dim in vectors:
            a = cols[key]
            if a.ndim != 2 or a.shape[1] != dim:
                raise DatasetError(f"{data_dir}:{key}: values have shape {a.shape[1:]}, info.json declares [{dim}]")
            a = a.astype(np.float32)
            if not np.isfinite(a).all():
                raise DatasetError(f"{data_dir}:{key}: contains NaN or infinite values")
            arrays[key] = a
        episodes = reader.episodes
        if not episodes:
            raise DatasetError(f"{info}: the dataset has no episodes")
        ep_col = cols["episode_index"]
        for ep in episodes:
            if ep.length < 1 or ep.dataset_to_index - ep.dataset_from_index != ep.length:
                raise DatasetError(f"{reader.root / 'meta/episodes'}: episode {ep.index} has inconsistent indexes")
            seg = ep_col[ep.dataset_from_index : ep.dataset_to_index]
            if len(seg) != ep.length or not np.all(seg == ep.index):
                raise DatasetError(f"{data_dir}:episode_index: rows {ep.dataset_from_index}..{ep.dataset_to_index - 1}"
                                   f" do not all belong to episode {ep.index}")
        task_index = cols["task_index"].astype(np.int64)
        if task_index.min() < 0 or task_index.max() >= len(reader.tasks):
            raise DatasetError(f"{data_dir}:task_index: values outside 0..{len(reader.tasks) - 1} (meta/tasks.parquet)")

        # -- normalisation (over all episodes so both splits share it) ------------------------------------------------
        self.stats, self.normalizer = None, None
        if actions:
            if stats is None:
                stats = NormStats.compute({"action": arrays[cfg.action_key], "state": arrays[cfg.state_key]})
            for role, dim in (("action", self.action_dim), ("state", self.state_dim)):
                if role not in stats.stats or stats.dim(role) != dim:
                    got = stats.dim(role) if role in stats.stats else None
                    raise DatasetError(f"{info}: given norm stats have {role} dim {got}, the dataset has {dim}")
            self.stats = stats
            self.normalizer = Normalizer(stats, cfg.normalizer)
            self._actions = np.asarray(self.normalizer.normalize("action", arrays[cfg.action_key]), dtype=np.float32)
            self._states = np.asarray(self.normalizer.normalize("state", arrays[cfg.state_key]), dtype=np.float32)
        self._task_index = task_index
        self.tasks = list(reader.tasks)

        # -- split ---------------------------------------------------------------------------------------------------
        n_val = cfg.val_episodes
        if n_val < 0 or (n_val > 0 and n_val >= len(episodes)):
            raise DatasetError(f"{info}: val_episodes={n_val} but the dataset has {len(episodes)} episodes")
        if split == "val" and n_val == 0:
            raise ValueError("split='val' needs DataConfig.val_episodes > 0")
        self.episodes: list[Episode] = episodes[len(episodes) - n_val :] if split == "val" else episodes[
            : len(episodes) - n_val]
        lengths = np.array([e.length for e in self.episodes], dtype=np.int64)
        self._ep_length = lengths
        self._ep_data_start = np.array([e.dataset_from_index for e in self.episodes], dtype=np.int64)
        self._ep_cache_start = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        self._sample_ep = np.repeat(np.arange(len(self.episodes)), lengths)
        self._sample_t0 = np.concatenate([np.arange(n) for n in lengths]).astype(np.int64)
        self._frame_offsets = np.arange(cfg.num_frames, dtype=np.int64) * cfg.frame_stride
        self._action_offsets = np.arange(cfg.action_horizon, dtype=np.int64)

        # -- frames --------------------------------------------------------------------------------------------------
        self._cache: list[np.ndarray] | None = None
        self._lazy: list[OrderedDict[int, np.ndarray]] = [OrderedDict() for _ in self.camera_keys]
        if cfg.cache_in_memory and self._cache_bytes() >= SHARED_CACHE_MIN_BYTES:
            self._cache = self._shared_cache()
        elif cfg.cache_in_memory and self._fits_in_memory():
            self._cache = self._decode_all()
        else:
            self._check_videos()

    # -- properties ---------------------------------------------------------------------------------------------------
    @property
    def num_episodes(self) -> int:
        return len(self.episodes)

    def __len__(self) -> int:
        return len(self._sample_ep)

    def describe(self) -> dict[str, Any]:
        return {
            "dataset": str(self.root), "split": self.split, "episodes": self.num_episodes, "clips": len(self),
            "fps": self.fps, "cameras": self.camera_keys, "camera_shapes": self.camera_shapes,
            "frame_size": self.frame_size, "action_dim": getattr(self, "action_dim", None),
            "state_dim": getattr(self, "state_dim", None), "cached": self._cache is not None,
        }

    # -- decoding -----------------------------------------------------------------------------------------------------
    def _cache_bytes(self) -> int:
        return sum(int(self._ep_length.sum()) * h * w * 3 for h, w in self.camera_sizes)

    def _shared_cache(self) -> list[np.ndarray]:
        """Decoded frames of a large dataset in memory-mapped files under the frame cache directory
        (`FASTWAM_CACHE_DIR`, default ~/.cache/fastwam/frames): decoded once, then shared by every process that
        trains on the same dataset (two trainings side by side hold one copy in the page cache, not two in their own
        memory: a 400k-frame corpus at two 64 x 64 cameras is 9.8 GB). The file name is a hash of the dataset's
        location, its info.json and episode list, the split and the cameras' sizes, so a changed dataset gets a new
        file; files are written under a temporary name and renamed, and a lock makes a second process wait for the
        first one's decode instead of repeating it."""
        import fcntl
        import hashlib
        import json as json_lib

        info = self.root / INFO_PATH
        st = info.stat()
        key = json_lib.dumps([str(self.root.resolve()), st.st_mtime_ns, st.st_size, self.camera_keys,
                              [list(s) for s in self.camera_sizes],
                              [(e.index, e.length, e.dataset_from_index) for e in self.episodes]])
        digest = hashlib.sha256(key.encode()).hexdigest()[:24]
        folder = frame_cache_dir()
        folder.mkdir(parents=True, exist_ok=True)
        paths = [folder / f"{digest}_{c}.npy" for c in range(len(self.camera_keys))]
        with open(folder / f"{digest}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes (also when the process dies)
            if not all(p.is_file() for p in paths):
                log.warning("decoding %s into the shared frame cache %s (%.1f GB; once per dataset)", self.root,
                            folder, self._cache_bytes() / 1e9)
                total = int(self._ep_length.sum())
                tmps = [p.with_name(f".{p.name}.tmp-{os.getpid()}") for p in paths]
                try:
                    arrays = [np.lib.format.open_memmap(t, mode="w+", dtype=np.uint8, shape=(total, h, w, 3))
                              for t, (h, w) in zip(tmps, self.camera_sizes, strict=True)]
                    self._decode_all(arrays)
                    for a in arrays:
                        a.flush()
                    del arrays
                    for t, p in zip(tmps, paths, strict=True):
                        os.replace(t, p)
                finally:
                    for t in tmps:
                        t.unlink(missing_ok=True)
        return [np.load(p, mmap_mode="r") for p in paths]

    def _fits_in_memory(self) -> bool:
        need = self._cache_bytes()
        avail = _available_memory()
        if avail is not None and need > 0.5 * avail:
            log.warning("not caching frames: %.1f GB needed, %.1f GB available", need / 1e9, avail / 1e9)
            return False
        return True

    def _decode_all(self, into: list[np.ndarray] | None = None) -> list[np.ndarray]:
        """Decode every needed frame once, file by file, into per-camera uint8 arrays resized to the layout (new
        arrays, or the given ones)."""
        total = int(self._ep_length.sum())
        caches = []
        jobs = []  # one per (camera, video file); PyAV decodes and converts without the GIL, so threads overlap
        for c, (key, size) in enumerate(zip(self.camera_keys, self.camera_sizes, strict=True)):
            cache = np.empty((total, size[0], size[1], 3), np.uint8) if into is None else into[c]
            caches.append(cache)
            if self.reader.features[key]["dtype"] == "image":
                for i, ep in enumerate(self.episodes):
                    cache[self._ep_cache_start[i] : self._ep_cache_start[i] + ep.length] = self._episode_frames(c, ep)
                continue
            by_file: dict[str, list[int]] = {}
            for i, ep in enumerate(self.episodes):
                by_file.setdefault(str(ep.videos[key].path), []).append(i)
            jobs += [(c, path, ep_ids, cache) for path, ep_ids in by_file.items()]
        workers = max(1, min(len(jobs), os.cpu_count() or 1))
        if workers == 1:
            for job in jobs:
                self._decode_file_into(*job)
        else:
            with ThreadPoolExecutor(workers) as pool:
                for fut in [pool.submit(self._decode_file_into, *job) for job in jobs]:
                    fut.result()  # re-raises the first DatasetError
        return caches

    def _decode_file_into(self, cam: int, path: str, ep_ids: list[int], cache: np.ndarray) -> None:
        key, size = self.camera_keys[cam], self.camera_sizes[cam]
        # frame number in the file -> (episode position in split, frame within episode)
        want: dict[int, tuple[int, int]] = {}
        for i in ep_ids:
            first = int(round(self.episodes[i].videos[key].from_timestamp * self.fps))
            for t in range(self.episodes[i].length):
                want[first + t] = (i, t)
        pending: dict[int, list[np.ndarray | None]] = {i: [None] * self.episodes[i].length for i in ep_ids}
        done = set()
        container, stream = _open_video(path, key)
        expect_hw = self.camera_shapes[key][:2]
        try:
            for frame in container.decode(stream):
                if frame.pts is None:
                    continue
                n = int(round(float(frame.pts * stream.time_base) * self.fps))
                if n not in want:
                    continue
                img = frame.to_ndarray(format="rgb24")
                if img.shape[:2] != expect_hw:
                    raise DatasetError(f"{path}: frames of {key!r} are {img.shape[0]}x{img.shape[1]}, info.json "
                                       f"declares {expect_hw[0]}x{expect_hw[1]}")
                i, t = want[n]
                pending[i][t] = img
                if all(f is not None for f in pending[i]):
                    start = self._ep_cache_start[i]
                    cache[start : start + len(pending[i])] = resize_crop(np.stack(pending[i]), size).numpy()
                    done.add(i)
                    pending[i] = []
        except DatasetError:
            raise
        except Exception as e:  # noqa: BLE001 - PyAV raises many error types for broken streams
            raise DatasetError(f"{path}: corrupt video for {key!r} ({type(e).__name__}: {e})") from None
        finally:
            container.close()
        for i in ep_ids:
            if i not in done:
                ep = self.episodes[i]
                got = sum(f is not None for f in pending[i])
                raise DatasetError(f"{path}: video for {key!r} has {got} of {ep.length} frames of episode {ep.index} "
                                   f"(from t={ep.videos[key].from_timestamp:.4f}s); truncated or corrupt file?")

    def _episode_frames(self, cam: int, ep: Episode) -> np.ndarray:
        key = self.camera_keys[cam]
        frames = self.reader.decode_episode(key, ep)
        expect_hw = self.camera_shapes[key][:2]
        if frames.shape[1:3] != expect_hw:
            where = ep.videos[key].path if key in ep.videos else self.root / "data"
            raise DatasetError(f"{where}: frames of {key!r} are {frames.shape[1]}x{frames.shape[2]}, info.json "
                               f"declares {expect_hw[0]}x{expect_hw[1]}")
        return resize_crop(frames, self.camera_sizes[cam]).numpy()

    def _check_videos(self) -> None:
        """Without a full decode: every referenced file opens, and the last episode in each decodes completely."""
        for cam, key in enumerate(self.camera_keys):
            if self.reader.features[key]["dtype"] != "video":
                continue
            last: dict[str, Episode] = {}
            for ep in self.episodes:
                path = str(ep.videos[key].path)
                if path not in last or ep.videos[key].from_timestamp > last[path].videos[key].from_timestamp:
                    last[path] = ep
            for ep in last.values():
                self._lazy_frames(cam, self.episodes.index(ep))

    def _lazy_frames(self, cam: int, i: int) -> np.ndarray:
        lru = self._lazy[cam]
        if i in lru:
            lru.move_to_end(i)
            return lru[i]
        frames = self._episode_frames(cam, self.episodes[i])
        lru[i] = frames
        if len(lru) > _LAZY_EPISODES:
            lru.popitem(last=False)
        return frames

    # -- items --------------------------------------------------------------------------------------------------------
    def _indices(self, i: int) -> tuple[int, int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        ep, t0 = int(self._sample_ep[i]), int(self._sample_t0[i])
        length = int(self._ep_length[ep])
        fidx = t0 + self._frame_offsets
        aidx = t0 + self._action_offsets
        return ep, t0, np.minimum(fidx, length - 1), fidx < length, np.minimum(aidx, length - 1), aidx < length

    def __getitem__(self, i: int) -> dict[str, Any]:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        ep, t0, fidx, vmask, aidx, amask = self._indices(i)
        if self._cache is not None:
            rows = self._ep_cache_start[ep] + fidx
            cams = [c[rows] for c in self._cache]
        else:
            cams = [self._lazy_frames(c, ep)[fidx] for c in range(len(self.camera_keys))]
        video = to_model_range(layout_cameras(cams, self.cfg))  # [3, T, H, W]
        d0 = int(self._ep_data_start[ep])
        if not self.labelled:
            return {"video": video, "video_mask": torch.from_numpy(vmask),
                    "task": self.tasks[int(self._task_index[d0 + t0])]}
        return {
            "video": video,
            "video_mask": torch.from_numpy(vmask),
            "actions": torch.from_numpy(self._actions[d0 + aidx]),
            "action_mask": torch.from_numpy(amask),
            "state": torch.from_numpy(self._states[d0 + t0]),
            "task": self.tasks[int(self._task_index[d0 + t0])],
        }

    def get_batch(self, indices: Sequence[int]) -> dict[str, Any]:
        """Vectorised `collate([self[i] for i in indices])` (cached datasets; falls back to per-item otherwise)."""
        if self._cache is None or not self.labelled:
            return collate([self[int(i)] for i in indices])
        idx = np.asarray(indices, dtype=np.int64)
        ep, t0 = self._sample_ep[idx], self._sample_t0[idx]
        length = self._ep_length[ep][:, None]
        fidx, aidx = t0[:, None] + self._frame_offsets, t0[:, None] + self._action_offsets
        vmask, amask = fidx < length, aidx < length
        fidx, aidx = np.minimum(fidx, length - 1), np.minimum(aidx, length - 1)
        rows = self._ep_cache_start[ep][:, None] + fidx  # [B, T]
        cams = [c[rows] for c in self._cache]  # [B, T, h, w, 3]
        video = to_model_range(layout_cameras(cams, self.cfg), channel_dim=1)  # [B, 3, T, H, W]
        d0 = self._ep_data_start[ep]
        return {
            "video": video,
            "video_mask": torch.from_numpy(vmask),
            "actions": torch.from_numpy(self._actions[d0[:, None] + aidx]),
            "action_mask": torch.from_numpy(amask),
            "state": torch.from_numpy(self._states[d0 + t0]),
            "task": [self.tasks[int(k)] for k in self._task_index[d0 + t0]],
        }


class _BatchSampler(torch.utils.data.Sampler[list[int]]):
    def __init__(self, n: int, batch_size: int, shuffle: bool, drop_last: bool, seed: int):
        self.n, self.batch_size, self.shuffle, self.drop_last, self.seed = n, batch_size, shuffle, drop_last, seed
        self.epoch = 0

    def __iter__(self):
        g = np.random.default_rng((self.seed, self.epoch))
        self.epoch += 1
        order = g.permutation(self.n) if self.shuffle else np.arange(self.n)
        stop = self.n - self.n % self.batch_size if self.drop_last else self.n
        for s in range(0, stop, self.batch_size):
            yield order[s : s + self.batch_size].tolist()

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)


def make_dataloader(ds: ClipDataset, batch_size: int, *, shuffle: bool = True, drop_last: bool = True,
                    num_workers: int | None = None, seed: int = 0) -> DataLoader:
    """A DataLoader yielding collated batches; each batch is built with the vectorised `get_batch`."""
    workers = ds.cfg.num_workers if num_workers is None else num_workers
    sampler = _BatchSampler(len(ds), batch_size, shuffle, drop_last, seed)
    return DataLoader(_Batched(ds), batch_size=None, sampler=sampler, num_workers=workers,
                      persistent_workers=workers > 0)


class _Batched(Dataset):
    """Adapter so a DataLoader's sampler can hand whole index lists to `get_batch`."""

    def __init__(self, ds: ClipDataset):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, indices: list[int]) -> dict[str, Any]:
        return self.ds.get_batch(indices)


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None
