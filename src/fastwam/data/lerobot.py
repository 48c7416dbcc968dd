"""Read LeRobot datasets (format v3.0, and v2.1) with pyarrow and PyAV only; `lerobot_writer.py` writes v3.0.

Why not the `lerobot` package itself: on Python 3.11 it pins torch < 2.11 (and torchvision, diffusers < 0.36), and the
standalone `lerobot-dataset` imports torchvision, which does not work beside this project's local CPU torch wheel.
So the format is implemented here from LeRobot's documented layout, and compatibility is proven both ways in tests
(a fixture written by LeRobot's own code loads here; datasets written here were loaded with LeRobot's reader, see
tests/fixtures/make_lerobot_fixture.py and the README).

v3.0 layout (paths relative to the dataset root)::

    meta/info.json                                  codebase_version, fps, features, path templates, totals
    meta/stats.json                                 per-feature min/max/mean/std/count/q01/q10/q50/q90/q99
    meta/tasks.parquet                              task string (pandas index) -> task_index
    meta/episodes/chunk-000/file-000.parquet        one row per episode: length, tasks, data/video locations, stats
    data/chunk-000/file-000.parquet                 one row per frame: low-dim features + timestamp/indexes
    videos/<video_key>/chunk-000/file-000.mp4       many episodes per file, located by from/to timestamps
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fastwam.errors import UserError

CODEBASE_VERSION = "v3.0"
INFO_PATH = "meta/info.json"
STATS_PATH = "meta/stats.json"
TASKS_PATH = "meta/tasks.parquet"
EPISODES_DIR = "meta/episodes"
CHUNK_FILE = "chunk-{chunk_index:03d}/file-{file_index:03d}"
EPISODES_PATH = EPISODES_DIR + "/" + CHUNK_FILE + ".parquet"
DATA_PATH = "data/" + CHUNK_FILE + ".parquet"
VIDEO_PATH = "videos/{video_key}/" + CHUNK_FILE + ".mp4"
# v2.1 (read only)
LEGACY_EPISODES_PATH = "meta/episodes.jsonl"
LEGACY_TASKS_PATH = "meta/tasks.jsonl"

# Columns LeRobot adds to every dataset, in its order.
DEFAULT_FEATURES: dict[str, dict[str, Any]] = {
    "timestamp": {"dtype": "float32", "shape": [1], "names": None},
    "frame_index": {"dtype": "int64", "shape": [1], "names": None},
    "episode_index": {"dtype": "int64", "shape": [1], "names": None},
    "index": {"dtype": "int64", "shape": [1], "names": None},
    "task_index": {"dtype": "int64", "shape": [1], "names": None},
}
CAMERA_DTYPES = ("video", "image")


class DatasetError(UserError):
    """A dataset on disk is missing something or does not match what is asked of it. Names the file and field."""


# ---------------------------------------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True)
class VideoRef:
    """Where one episode of one camera lives: a file and the [from, to) timestamps inside it."""

    path: Path
    from_timestamp: float
    to_timestamp: float


@dataclass(frozen=True)
class Episode:
    index: int
    length: int
    tasks: tuple[str, ...]
    dataset_from_index: int  # global frame index (the `index` column) of the first frame
    dataset_to_index: int  # exclusive
    videos: dict[str, VideoRef] = field(default_factory=dict)


def _load_json(path: Path) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found (is this a LeRobot dataset root?)") from None
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: not valid JSON ({e})") from None


def _read_parquet(path: Path, columns: list[str] | None = None) -> pa.Table:
    try:
        return pq.read_table(path, columns=columns)
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found") from None
    except (pa.ArrowInvalid, OSError) as e:
        raise DatasetError(f"{path}: cannot read parquet ({e})") from None


def column_to_numpy(col: pa.ChunkedArray | pa.Array, where: str) -> np.ndarray:
    """An arrow column of scalars or (fixed-size) lists of numbers -> numpy [N] or [N, D]."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    t = col.type
    if pa.types.is_fixed_size_list(t) or pa.types.is_list(t) or pa.types.is_large_list(t):
        if col.null_count:
            raise DatasetError(f"{where}: contains null rows")
        n = len(col)
        flat = col.flatten().to_numpy(zero_copy_only=False)
        if n == 0:
            return flat.reshape(0, 0)
        if flat.size % n:
            raise DatasetError(f"{where}: rows have different lengths")
        arr = flat.reshape(n, flat.size // n)
        if not pa.types.is_fixed_size_list(t):  # variable lists: check every row really has the same length
            offsets = col.offsets.to_numpy()
            if not np.all(np.diff(offsets) == arr.shape[1]):
                raise DatasetError(f"{where}: rows have different lengths")
        return arr
    if col.null_count:
        raise DatasetError(f"{where}: contains null values")
    return col.to_numpy(zero_copy_only=False)


class LeRobotReader:
    """Metadata, low-dim columns and decoded video frames of a local LeRobot dataset (v3.0 or v2.1)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetError(f"{self.root}: dataset directory not found")
        self.info: dict[str, Any] = _load_json(self.root / INFO_PATH)
        _check_info(self.info, self.root / INFO_PATH)
        self.version = str(self.info["codebase_version"])
        self.fps = int(self.info["fps"])
        self.features: dict[str, dict[str, Any]] = self.info["features"]
        if self.version.startswith("v3"):
            self.tasks = self._load_tasks_v3()
            self.episodes = self._load_episodes_v3()
        else:
            self.tasks = self._load_tasks_v2()
            self.episodes = self._load_episodes_v2()
        self.episodes.sort(key=lambda e: e.dataset_from_index)
        self.total_frames = sum(e.length for e in self.episodes)

    # -- metadata -----------------------------------------------------------------------------------------------------
    @property
    def camera_keys(self) -> list[str]:
        return [k for k, ft in self.features.items() if ft["dtype"] in CAMERA_DTYPES]

    @property
    def video_keys(self) -> list[str]:
        return [k for k, ft in self.features.items() if ft["dtype"] == "video"]

    def camera_shape(self, key: str) -> tuple[int, int, int]:
        """(H, W, C) of a camera feature from its names (LeRobot stores HWC, but honour CHW names if given)."""
        ft = self.features[key]
        shape = [int(s) for s in ft["shape"]]
        names = ft.get("names") or ["height", "width", "channels"]
        if len(shape) != 3:
            raise DatasetError(f"{self.root / INFO_PATH}: feature {key!r} has shape {shape}, expected 3 dims")
        if list(names)[:1] == ["channels"] or list(names)[:1] == ["channel"]:
            return shape[1], shape[2], shape[0]
        return shape[0], shape[1], shape[2]

    def _load_tasks_v3(self) -> list[str]:
        path = self.root / TASKS_PATH
        table = _read_parquet(path)
        if "task_index" not in table.column_names:
            raise DatasetError(f"{path}: missing column 'task_index'")
        task_col = None
        if "task" in table.column_names:
            task_col = "task"
        else:  # LeRobot writes a pandas DataFrame indexed by the task string
            meta = table.schema.metadata or {}
            pandas_meta = json.loads(meta.get(b"pandas", b"{}"))
            idx = [c for c in pandas_meta.get("index_columns", []) if isinstance(c, str)]
            if idx and idx[0] in table.column_names:
                task_col = idx[0]
        if task_col is None:
            raise DatasetError(f"{path}: no task string column (expected 'task' or a pandas index)")
        indices = column_to_numpy(table["task_index"], f"{path}:task_index").astype(int).tolist()
        names = table[task_col].to_pylist()
        tasks: list[str | None] = [None] * (max(indices) + 1 if indices else 0)
        for i, name in zip(indices, names, strict=True):
            tasks[i] = name
        if any(t is None for t in tasks):
            raise DatasetError(f"{path}: task_index values are not 0..N-1")
        return tasks  # type: ignore[return-value]

    def _load_tasks_v2(self) -> list[str]:
        path = self.root / LEGACY_TASKS_PATH
        rows = _read_jsonl(path)
        tasks: dict[int, str] = {}
        for r in rows:
            if "task_index" not in r or "task" not in r:
                raise DatasetError(f"{path}: rows need 'task_index' and 'task'")
            tasks[int(r["task_index"])] = r["task"]
        return [tasks[i] for i in range(len(tasks))]

    def _load_episodes_v3(self) -> list[Episode]:
        paths = sorted((self.root / EPISODES_DIR).glob("chunk-*/file-*.parquet"))
        if not paths:
            raise DatasetError(f"{self.root / EPISODES_DIR}: no episode metadata parquet files")
        video_keys = self.video_keys
        video_path_tpl = self.info.get("video_path") or VIDEO_PATH
        episodes = []
        for path in paths:
            names = pq.read_schema(path).names
            need = ["episode_index", "length", "tasks", "dataset_from_index", "dataset_to_index"]
            for key in video_keys:
                need += [f"videos/{key}/{s}" for s in ("chunk_index", "file_index", "from_timestamp", "to_timestamp")]
            missing = [c for c in need if c not in names]
            if missing:
                raise DatasetError(f"{path}: missing column(s) {missing}")
            for row in _read_parquet(path, columns=need).to_pylist():
                videos = {}
                for key in video_keys:
                    p = f"videos/{key}/"
                    rel = video_path_tpl.format(video_key=key, chunk_index=int(row[p + "chunk_index"]),
                                                file_index=int(row[p + "file_index"]))
                    videos[key] = VideoRef(self.root / rel, float(row[p + "from_timestamp"]),
                                           float(row[p + "to_timestamp"]))
                episodes.append(Episode(int(row["episode_index"]), int(row["length"]), tuple(row["tasks"] or ()),
                                        int(row["dataset_from_index"]), int(row["dataset_to_index"]), videos))
        return episodes

    def _load_episodes_v2(self) -> list[Episode]:
        path = self.root / LEGACY_EPISODES_PATH
        rows = sorted(_read_jsonl(path), key=lambda r: int(r["episode_index"]))
        chunks_size = int(self.info.get("chunks_size", 1000))
        video_tpl = self.info.get("video_path")
        episodes, start = [], 0
        for r in rows:
            ep, length = int(r["episode_index"]), int(r["length"])
            videos = {}
            for key in self.video_keys:
                if not video_tpl:
                    raise DatasetError(f"{self.root / INFO_PATH}: video features but no 'video_path'")
                rel = video_tpl.format(episode_chunk=ep // chunks_size, video_key=key, episode_index=ep)
                videos[key] = VideoRef(self.root / rel, 0.0, length / self.fps)
            episodes.append(Episode(ep, length, tuple(r.get("tasks", ())), start, start + length, videos))
            start += length
        return episodes

    # -- low-dim data -------------------------------------------------------------------------------------------------
    def data_files(self) -> list[Path]:
        if self.version.startswith("v3"):
            files = sorted((self.root / "data").glob("chunk-*/file-*.parquet"))
        else:
            files = sorted((self.root / "data").glob("chunk-*/episode_*.parquet"))
        if not files:
            raise DatasetError(f"{self.root / 'data'}: no data parquet files")
        return files

    def read_columns(self, keys: Sequence[str]) -> dict[str, np.ndarray]:
        """Columns over all frames, ordered by the global `index` column (row i = frame with index i)."""
        keys = list(dict.fromkeys(list(keys) + ["index"]))
        parts: dict[str, list[np.ndarray]] = {k: [] for k in keys}
        for path in self.data_files():
            names = pq.read_schema(path).names
            missing = [k for k in keys if k not in names]
            if missing:
                raise DatasetError(f"{path}: missing column(s) {missing}")
            table = _read_parquet(path, columns=keys)
            for k in keys:
                parts[k].append(column_to_numpy(table[k], f"{path}:{k}"))
        out = {k: np.concatenate(v) if len(v) > 1 else v[0] for k, v in parts.items()}
        index = out["index"].astype(np.int64)
        order = np.argsort(index, kind="stable")
        if not np.array_equal(index[order], np.arange(len(index))):
            raise DatasetError(f"{self.root / 'data'}: the 'index' column is not 0..{len(index) - 1}")
        if len(index) != self.total_frames:
            raise DatasetError(f"{self.root / 'data'}: {len(index)} frames but the episodes list {self.total_frames}")
        if not np.all(order[:-1] < order[1:]):
            out = {k: v[order] for k, v in out.items()}
        return out

    # -- frames -------------------------------------------------------------------------------------------------------
    def decode_episode(self, key: str, ep: Episode) -> np.ndarray:
        """uint8 [length, H, W, 3] of one camera over one episode."""
        if self.features[key]["dtype"] == "image":
            return self._decode_image_column(key, ep)
        ref = ep.videos[key]
        frames = decode_video(ref.path, self.fps, ref.from_timestamp, ep.length, where=key)
        return frames

    def decode_file(self, key: str, path: Path) -> dict[int, np.ndarray]:
        """Decode one whole video file once: {frame number (timestamp * fps, rounded): uint8 HxWx3}."""
        return decode_video_file(path, self.fps, where=key)

    def _decode_image_column(self, key: str, ep: Episode) -> np.ndarray:
        from PIL import Image  # images-in-parquet datasets only

        frames = []
        for path in self.data_files():
            table = _read_parquet(path, columns=[key, "index"])
            index = table["index"].to_numpy()
            sel = np.nonzero((index >= ep.dataset_from_index) & (index < ep.dataset_to_index))[0]
            if not len(sel):
                continue
            col = table[key].take(pa.array(sel))
            for idx, item in zip(index[sel], col.to_pylist(), strict=True):
                data = item.get("bytes") if isinstance(item, dict) else None
                if data is None and isinstance(item, dict) and item.get("path"):
                    data = (self.root / item["path"]).read_bytes()
                if data is None:
                    raise DatasetError(f"{path}:{key}: frame {idx} has no image bytes")
                frames.append((int(idx), np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))))
        frames.sort(key=lambda f: f[0])
        if len(frames) != ep.length:
            raise DatasetError(f"{self.root / 'data'}:{key}: episode {ep.index} has {len(frames)} of {ep.length} "
                               "images")
        return np.stack([f[1] for f in frames])


def _check_info(info: Any, path: Path) -> None:
    """The fields of meta/info.json this reader relies on, with their types, so a bad value is named up front."""
    fix = "fix that field, or re-export the dataset with LeRobot"
    if not isinstance(info, dict):
        raise DatasetError(f"{path}: expected a JSON object, got {type(info).__name__}")
    for key in ("codebase_version", "fps", "features"):
        if key not in info:
            raise DatasetError(f"{path}: missing field {key!r}")
    version = info["codebase_version"]
    if not isinstance(version, str) or not version.startswith(("v2", "v3")):
        raise DatasetError(f"{path}: codebase_version {version!r} is not supported (v2.1 or v3.0)")
    fps = info["fps"]
    if isinstance(fps, bool) or not isinstance(fps, int | float) or fps != int(fps) or fps < 1:
        raise DatasetError(f"{path}: field 'fps' must be a positive whole number of frames per second, got {fps!r}; "
                           f"{fix}")
    for key in ("chunks_size", "total_episodes", "total_frames"):
        value = info.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise DatasetError(f"{path}: field {key!r} must be a non-negative integer, got {value!r}; {fix}")
    for key in ("data_path", "video_path"):
        if info.get(key) is not None and not isinstance(info[key], str):
            raise DatasetError(f"{path}: field {key!r} must be a path template string, got {info[key]!r}; {fix}")
    features = info["features"]
    if not isinstance(features, dict):
        raise DatasetError(f"{path}: field 'features' must be an object {{name: {{dtype, shape, ...}}}}; {fix}")
    for key, ft in features.items():
        if not isinstance(ft, dict) or "dtype" not in ft or "shape" not in ft:
            raise DatasetError(f"{path}: feature {key!r} lacks 'dtype' or 'shape'")
        if not isinstance(ft["dtype"], str):
            raise DatasetError(f"{path}: feature {key!r}: 'dtype' must be a string, got {ft['dtype']!r}; {fix}")
        shape = ft["shape"]
        if not isinstance(shape, list) or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0
                                                  for n in shape):
            raise DatasetError(f"{path}: feature {key!r}: 'shape' must be a list of non-negative integers, got "
                               f"{shape!r}; {fix}")


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    try:
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: not valid JSON lines ({e})") from None


def _open_video(path: Path, where: str):
    import av

    try:
        container = av.open(str(path))
    except FileNotFoundError:
        raise DatasetError(f"{path}: video file for {where!r} not found") from None
    except Exception as e:  # noqa: BLE001 - PyAV raises many error types for broken files
        raise DatasetError(f"{path}: cannot open video for {where!r} ({type(e).__name__}: {e})") from None
    if not container.streams.video:
        container.close()
        raise DatasetError(f"{path}: no video stream for {where!r}")
    stream = container.streams.video[0]
    stream.thread_type = "SLICE"  # measured: frame threading is slower for small frames (0.52 vs 0.33 ms at 64 px)
    return container, stream


def decode_video_file(path: Path, fps: int, where: str = "video") -> dict[int, np.ndarray]:
    """All frames of a file keyed by their frame number round(timestamp * fps)."""
    container, stream = _open_video(path, where)
    frames: dict[int, np.ndarray] = {}
    try:
        for frame in container.decode(stream):
            if frame.pts is None:
                continue
            frames[int(round(float(frame.pts * stream.time_base) * fps))] = frame.to_ndarray(format="rgb24")
    except Exception as e:  # noqa: BLE001
        raise DatasetError(f"{path}: corrupt video for {where!r} ({type(e).__name__}: {e})") from None
    finally:
        container.close()
    if not frames:
        raise DatasetError(f"{path}: no decodable frames for {where!r}")
    return frames


def decode_video(path: Path, fps: int, from_timestamp: float, length: int, where: str = "video") -> np.ndarray:
    """uint8 [length, H, W, 3]: the frames at from_timestamp + i/fps, seeking to the nearest keyframe first."""
    container, stream = _open_video(path, where)
    first = int(round(from_timestamp * fps))
    out: list[np.ndarray | None] = [None] * length
    try:
        if first > 0:
            container.seek(int(math.floor(from_timestamp / stream.time_base)), stream=stream, backward=True)
        for frame in container.decode(stream):
            if frame.pts is None:
                continue
            k = int(round(float(frame.pts * stream.time_base) * fps)) - first
            if k >= length:
                break
            if k >= 0:
                out[k] = frame.to_ndarray(format="rgb24")
    except Exception as e:  # noqa: BLE001
        raise DatasetError(f"{path}: corrupt video for {where!r} ({type(e).__name__}: {e})") from None
    finally:
        container.close()
    missing = [i for i, f in enumerate(out) if f is None]
    if missing:
        raise DatasetError(f"{path}: video for {where!r} lacks {len(missing)} of {length} frames from "
                           f"t={from_timestamp:.4f}s "
                           f"(first missing frame {missing[0]}); truncated or corrupt file?")
    return np.stack(out)  # type: ignore[arg-type]
