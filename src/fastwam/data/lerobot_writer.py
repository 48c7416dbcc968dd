"""Write LeRobot v3.0 datasets (the layout is described in `lerobot.py`, which reads them), with their statistics.

The files are those LeRobot's own writer produces — data and episode parquet files, tasks as a pandas-indexed table,
stats.json and per-episode `stats/...` columns in LeRobot's layout, videos with many episodes per file — so LeRobot
reads them (tests/fixtures/check_with_lerobot.py checked that) and `LeRobotReader` round-trips them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fastwam.data.lerobot import (
    CAMERA_DTYPES,
    CODEBASE_VERSION,
    DATA_PATH,
    DEFAULT_FEATURES,
    EPISODES_PATH,
    INFO_PATH,
    STATS_PATH,
    TASKS_PATH,
    VIDEO_PATH,
)

STAT_NAMES = ("min", "max", "mean", "std", "count", "q01", "q10", "q50", "q90", "q99")
_QUANTILES = {"q01": 0.01, "q10": 0.10, "q50": 0.50, "q90": 0.90, "q99": 0.99}


# ---------------------------------------------------------------------------------------------------------------------
# Statistics in LeRobot's layout (meta/stats.json and the per-episode `stats/...` columns)


def array_stats(x: np.ndarray) -> dict[str, np.ndarray]:
    """LeRobot stats of a low-dim feature over frames: x [N, D] (or [N])."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    out = {"min": x.min(0), "max": x.max(0), "mean": x.mean(0), "std": x.std(0), "count": np.array([len(x)])}
    qs = np.quantile(x, list(_QUANTILES.values()), axis=0)
    out.update({name: qs[i] for i, name in enumerate(_QUANTILES)})
    return out


def image_histogram(frames: np.ndarray) -> np.ndarray:
    """Per-channel 256-bin histograms [C, 256] of uint8 frames [N, H, W, C] (exact and cheap for uint8)."""
    c = frames.shape[-1]
    flat = frames.reshape(-1, c)
    return np.stack([np.bincount(flat[:, i], minlength=256) for i in range(c)]).astype(np.int64)


def histogram_stats(hist: np.ndarray, num_frames: int) -> dict[str, np.ndarray]:
    """LeRobot image stats (values in [0, 1], shape [C, 1, 1]) from per-channel uint8 histograms."""
    values = np.arange(256, dtype=np.float64) / 255.0
    out: dict[str, list[float]] = {k: [] for k in STAT_NAMES if k != "count"}
    for h in hist:
        total = h.sum()
        nz = np.nonzero(h)[0]
        mean = float((h * values).sum() / total)
        out["min"].append(values[nz[0]])
        out["max"].append(values[nz[-1]])
        out["mean"].append(mean)
        out["std"].append(float(np.sqrt((h * (values - mean) ** 2).sum() / total)))
        cdf = np.cumsum(h) / total
        for name, q in _QUANTILES.items():
            out[name].append(values[int(np.searchsorted(cdf, q))])
    res = {k: np.array(v, dtype=np.float64).reshape(-1, 1, 1) for k, v in out.items()}
    res["count"] = np.array([num_frames])
    return res


def _stats_to_json(stats: dict[str, dict[str, np.ndarray]]) -> dict[str, dict[str, Any]]:
    return {k: {s: np.asarray(v).tolist() for s, v in st.items()} for k, st in stats.items()}


# ---------------------------------------------------------------------------------------------------------------------
# Writing


def _arrow_type(dtype: str) -> pa.DataType:
    try:
        return pa.from_numpy_dtype(np.dtype(dtype))
    except TypeError:
        raise ValueError(f"unsupported feature dtype {dtype!r}") from None


def _hf_feature(ft: dict[str, Any]) -> dict[str, Any]:
    """The `datasets` feature description LeRobot stores in the data parquet's `huggingface` metadata."""
    shape = list(ft["shape"])
    if shape == [1]:
        return {"dtype": ft["dtype"], "_type": "Value"}
    return {"feature": {"dtype": ft["dtype"], "_type": "Value"}, "length": shape[0], "_type": "List"}


class LeRobotWriter:
    """Write a LeRobot v3.0 dataset episode by episode (streams video and parquet; small memory footprint).

    features: {key: {"dtype": "video" | "float32" | ..., "shape": [...], "names": [...]}} without the default columns.
    Video features take uint8 [L, H, W, 3] per episode; others [L, *shape]. Video codec defaults to H.264 in
    yuv444p at crf 12 (tiny frames keep small coloured markers; LeRobot's own default is AV1 4:2:0 crf 30, which
    blurs 2-pixel targets at 64x64); one thread and fixed settings make output byte-reproducible.
    """

    def __init__(self, root: str | os.PathLike, fps: int, features: dict[str, dict[str, Any]], *,
                 robot_type: str | None = None, vcodec: str = "h264", pix_fmt: str = "yuv444p", crf: int = 12,
                 gop: int = 8, chunks_size: int = 1000, data_files_size_in_mb: int = 100,
                 video_files_size_in_mb: int = 200, overwrite: bool = False):
        self.root = Path(root)
        if self.root.exists() and any(self.root.iterdir()):
            if not overwrite:
                raise FileExistsError(f"{self.root} exists and is not empty")
            import shutil

            shutil.rmtree(self.root)
        self.root.mkdir(parents=True, exist_ok=True)
        for key in features:
            if key in DEFAULT_FEATURES:
                raise ValueError(f"feature {key!r} is added automatically")
        self.fps = int(fps)
        self.features = {k: {**v, "shape": list(v["shape"])} for k, v in features.items()}
        self.video_keys = [k for k, v in self.features.items() if v["dtype"] == "video"]
        self.data_keys = [k for k, v in self.features.items() if v["dtype"] not in CAMERA_DTYPES]
        if any(v["dtype"] == "image" for v in self.features.values()):
            raise ValueError("image (PNG-in-parquet) features are not written; use dtype 'video'")
        self.robot_type = robot_type
        self.vcodec, self.pix_fmt, self.crf, self.gop = vcodec, pix_fmt, crf, gop
        self.chunks_size = chunks_size
        self.data_files_size_in_mb = data_files_size_in_mb
        self.video_files_size_in_mb = video_files_size_in_mb
        self.tasks: dict[str, int] = {}
        self.episodes: list[dict[str, Any]] = []
        self.total_frames = 0
        self._low_dim: dict[str, list[np.ndarray]] = {k: [] for k in self.data_keys}
        self._hist: dict[str, np.ndarray] = {}
        self._schema = self._data_schema()
        self._data_writer: pq.ParquetWriter | None = None
        self._data_loc = (0, 0)
        self._video: dict[str, _VideoFile] = {}
        self._video_info: dict[str, dict[str, Any]] = {}
        self._finalized = False

    def __enter__(self) -> LeRobotWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finalize()
        else:
            self._close_files()

    # -- schema -------------------------------------------------------------------------------------------------------
    def _all_features(self) -> dict[str, dict[str, Any]]:
        return {**self.features, **DEFAULT_FEATURES}

    def _data_schema(self) -> pa.Schema:
        fields = []
        for key, ft in self._all_features().items():
            if ft["dtype"] in CAMERA_DTYPES:
                continue
            t = _arrow_type(ft["dtype"])
            shape = list(ft["shape"])
            if shape == [1]:
                fields.append(pa.field(key, t))
            elif len(shape) == 1:
                fields.append(pa.field(key, pa.list_(t, shape[0])))
            else:
                raise ValueError(f"feature {key!r}: only 1-D low-dim features are written (shape {shape})")
        hf = {"info": {"features": {k: _hf_feature(ft) for k, ft in self._all_features().items()
                                    if ft["dtype"] not in CAMERA_DTYPES}}}
        return pa.schema(fields, metadata={"huggingface": json.dumps(hf)})

    # -- episodes -----------------------------------------------------------------------------------------------------
    def add_episode(self, task: str, data: dict[str, np.ndarray]) -> int:
        """Append one episode (all frames share `task`). Returns its episode index."""
        if self._finalized:
            raise RuntimeError("writer already finalized")
        missing = set(self.features) - set(data)
        extra = set(data) - set(self.features)
        if missing or extra:
            raise ValueError(f"episode keys mismatch: missing {sorted(missing)}, unexpected {sorted(extra)}")
        lengths = {k: len(v) for k, v in data.items()}
        length = next(iter(lengths.values()))
        if length == 0 or any(n != length for n in lengths.values()):
            raise ValueError(f"episode arrays must share a non-zero length, got {lengths}")
        for key in self.video_keys:
            v = data[key]
            if v.dtype != np.uint8 or v.ndim != 4 or list(v.shape[1:]) != self.features[key]["shape"]:
                raise ValueError(f"{key}: expected uint8 [L, {self.features[key]['shape']}], got {v.dtype} {v.shape}")
        ep = len(self.episodes)
        task_index = self.tasks.setdefault(task, len(self.tasks))
        start = self.total_frames

        cols: dict[str, np.ndarray] = {}
        for key in self.data_keys:
            arr = np.asarray(data[key], dtype=self.features[key]["dtype"]).reshape(length, -1)
            if arr.shape[1] != self.features[key]["shape"][0]:
                raise ValueError(f"{key}: expected [L, {self.features[key]['shape'][0]}], got {arr.shape}")
            cols[key] = arr
        frame_index = np.arange(length, dtype=np.int64)
        cols["timestamp"] = (frame_index / self.fps).astype(np.float32)
        cols["frame_index"] = frame_index
        cols["episode_index"] = np.full(length, ep, np.int64)
        cols["index"] = np.arange(start, start + length, dtype=np.int64)
        cols["task_index"] = np.full(length, task_index, np.int64)

        row: dict[str, Any] = {"episode_index": ep, "tasks": [task], "length": length}
        row.update(self._write_data(cols, length))
        row["dataset_from_index"], row["dataset_to_index"] = start, start + length
        for key in self.video_keys:
            row.update(self._write_video(key, data[key]))
        ep_stats: dict[str, dict[str, np.ndarray]] = {}
        for key in self.features:
            if key in self.video_keys:
                h = image_histogram(data[key])
                self._hist[key] = self._hist.get(key, 0) + h
                ep_stats[key] = histogram_stats(h, length)
            else:
                ep_stats[key] = array_stats(cols[key])
                self._low_dim[key].append(cols[key])
        for key in DEFAULT_FEATURES:
            ep_stats[key] = array_stats(cols[key])
        for key, st in ep_stats.items():
            for name in STAT_NAMES:
                row[f"stats/{key}/{name}"] = np.asarray(st[name]).tolist()
        row["meta/episodes/chunk_index"], row["meta/episodes/file_index"] = 0, 0
        self.episodes.append(row)
        self.total_frames += length
        return ep

    def _write_data(self, cols: dict[str, np.ndarray], length: int) -> dict[str, int]:
        arrays = []
        for f in self._schema:
            v = cols[f.name]
            if pa.types.is_fixed_size_list(f.type):
                arrays.append(pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1), f.type.value_type),
                                                                f.type.list_size))
            else:
                arrays.append(pa.array(v.reshape(-1), f.type))
        table = pa.Table.from_arrays(arrays, schema=self._schema)
        chunk, file = self._data_loc
        if self._data_writer is not None:
            size_mb = os.path.getsize(self._data_writer_path) / 1e6
            if size_mb >= self.data_files_size_in_mb:
                self._data_writer.close()
                self._data_writer = None
                chunk, file = self._data_loc = _next_file(chunk, file, self.chunks_size)
        if self._data_writer is None:
            path = self.root / DATA_PATH.format(chunk_index=chunk, file_index=file)
            path.parent.mkdir(parents=True, exist_ok=True)
            self._data_writer_path = path
            self._data_writer = pq.ParquetWriter(path, self._schema, compression="snappy", use_dictionary=True)
        self._data_writer.write_table(table)
        return {"data/chunk_index": chunk, "data/file_index": file}

    def _write_video(self, key: str, frames: np.ndarray) -> dict[str, Any]:
        vf = self._video.get(key)
        if vf is not None and vf.size_mb() >= self.video_files_size_in_mb:
            vf.close()
            chunk, file = _next_file(vf.chunk, vf.file, self.chunks_size)
            vf = None
        else:
            chunk, file = (vf.chunk, vf.file) if vf is not None else (0, 0)
        if vf is None:
            path = self.root / VIDEO_PATH.format(video_key=key, chunk_index=chunk, file_index=file)
            vf = self._video[key] = _VideoFile(path, chunk, file, self.fps, frames.shape[2], frames.shape[1],
                                               self.vcodec, self.pix_fmt, self.crf, self.gop)
        start = vf.num_frames
        vf.write(frames)
        p = f"videos/{key}/"
        return {p + "chunk_index": chunk, p + "file_index": file, p + "from_timestamp": start / self.fps,
                p + "to_timestamp": vf.num_frames / self.fps}

    def _close_files(self) -> None:
        if self._data_writer is not None:
            self._data_writer.close()
            self._data_writer = None
        for vf in self._video.values():
            vf.close()

    # -- metadata -----------------------------------------------------------------------------------------------------
    def finalize(self) -> Path:
        if self._finalized:
            return self.root
        if not self.episodes:
            raise ValueError("no episodes were added")
        self._close_files()
        self._finalized = True
        self._write_tasks()
        self._write_episodes()
        self._write_stats()
        self._write_info()
        return self.root

    def _write_tasks(self) -> None:
        names = list(self.tasks)
        # The same table pandas writes for DataFrame({"task_index": ...}, index=tasks): LeRobot reads it with pandas.
        pandas_meta = {
            "index_columns": ["__index_level_0__"],
            "column_indexes": [{"name": None, "field_name": None, "pandas_type": "unicode", "numpy_type": "object",
                                "metadata": {"encoding": "UTF-8"}}],
            "columns": [
                {"name": "task_index", "field_name": "task_index", "pandas_type": "int64", "numpy_type": "int64",
                 "metadata": None},
                {"name": None, "field_name": "__index_level_0__", "pandas_type": "unicode", "numpy_type": "object",
                 "metadata": None},
            ],
            "attributes": {}, "creator": {"library": "pyarrow", "version": pa.__version__}, "pandas_version": "2.2.3",
        }
        schema = pa.schema([pa.field("task_index", pa.int64()), pa.field("__index_level_0__", pa.string())],
                           metadata={"pandas": json.dumps(pandas_meta)})
        table = pa.Table.from_arrays([pa.array([self.tasks[n] for n in names], pa.int64()), pa.array(names)],
                                     schema=schema)
        (self.root / TASKS_PATH).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, self.root / TASKS_PATH)

    def _write_episodes(self) -> None:
        path = self.root / EPISODES_PATH.format(chunk_index=0, file_index=0)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(self.episodes), path, compression="snappy")

    def _write_stats(self) -> None:
        stats: dict[str, dict[str, np.ndarray]] = {}
        for key in self.features:
            if key in self.video_keys:
                stats[key] = histogram_stats(self._hist[key], self.total_frames)
            else:
                stats[key] = array_stats(np.concatenate(self._low_dim[key]))
        for key in DEFAULT_FEATURES:  # cheap to rebuild from the episode lengths
            lengths = [e["length"] for e in self.episodes]
            if key == "timestamp":
                v = np.concatenate([np.arange(n) / self.fps for n in lengths]).astype(np.float32)
            elif key == "frame_index":
                v = np.concatenate([np.arange(n) for n in lengths])
            elif key == "episode_index":
                v = np.concatenate([np.full(n, i) for i, n in enumerate(lengths)])
            elif key == "index":
                v = np.arange(self.total_frames)
            else:
                v = np.concatenate([np.full(e["length"], self.tasks[e["tasks"][0]]) for e in self.episodes])
            stats[key] = array_stats(v)
        _write_json(self.root / STATS_PATH, _stats_to_json(stats))

    def _write_info(self) -> None:
        features = {}
        for key, ft in self._all_features().items():
            features[key] = dict(ft)
            if key in self.video_keys:
                vf = self._video[key]
                features[key]["info"] = {
                    "video.height": vf.height, "video.width": vf.width, "video.codec": vf.codec_name,
                    "video.pix_fmt": self.pix_fmt, "video.is_depth_map": False, "video.fps": self.fps,
                    "video.channels": 3, "has_audio": False,
                }
        info = {
            "codebase_version": CODEBASE_VERSION,
            "robot_type": self.robot_type,
            "total_episodes": len(self.episodes),
            "total_frames": self.total_frames,
            "total_tasks": len(self.tasks),
            "chunks_size": self.chunks_size,
            "data_files_size_in_mb": self.data_files_size_in_mb,
            "video_files_size_in_mb": self.video_files_size_in_mb,
            "fps": self.fps,
            "splits": {"train": f"0:{len(self.episodes)}"},
            "data_path": DATA_PATH,
            "video_path": VIDEO_PATH if self.video_keys else None,
            "features": features,
        }
        _write_json(self.root / INFO_PATH, info)


def _next_file(chunk: int, file: int, chunks_size: int) -> tuple[int, int]:
    return (chunk + 1, 0) if file >= chunks_size - 1 else (chunk, file + 1)


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=4, ensure_ascii=False)
        f.write("\n")


class _VideoFile:
    """One mp4 being appended to: frame i has pts i in time base 1/fps, so timestamps are exact multiples of 1/fps."""

    def __init__(self, path: Path, chunk: int, file: int, fps: int, width: int, height: int, vcodec: str,
                 pix_fmt: str, crf: int, gop: int):
        import av

        self.path, self.chunk, self.file, self.width, self.height = path, chunk, file, width, height
        path.parent.mkdir(parents=True, exist_ok=True)
        self.container = av.open(str(path), "w")
        options = {"crf": str(crf), "g": str(gop)}
        if vcodec in ("h264", "libx264"):
            options.update({"threads": "1", "preset": "medium"})  # one thread: identical bytes on any machine
        elif vcodec == "libsvtav1":
            options.update({"preset": "8"})
        self.stream = self.container.add_stream(vcodec, rate=Fraction(fps, 1), options=options)
        self.stream.width, self.stream.height, self.stream.pix_fmt = width, height, pix_fmt
        self.stream.codec_context.thread_count = 1
        self.time_base = Fraction(1, fps)
        self.stream.codec_context.time_base = self.time_base
        self.codec_name = self.stream.codec_context.codec.canonical_name
        self.num_frames = 0
        self._closed = False

    def write(self, frames: np.ndarray) -> None:
        import av

        for img in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
            frame.pts = self.num_frames
            frame.time_base = self.time_base
            self.num_frames += 1
            for packet in self.stream.encode(frame):
                self.container.mux(packet)

    def size_mb(self) -> float:
        # PyAV creates the file at the first muxed packet; the encoder may still be holding every frame so far.
        return os.path.getsize(self.path) / 1e6 if self.path.exists() else 0.0

    def close(self) -> None:
        if self._closed:
            return
        for packet in self.stream.encode():
            self.container.mux(packet)
        self.container.close()
        self._closed = True


def dataset_size_bytes(root: str | os.PathLike) -> int:
    return sum(p.stat().st_size for p in Path(root).rglob("*") if p.is_file())


def iter_files(root: str | os.PathLike) -> Iterable[str]:
    """Relative paths of every file in a dataset, sorted (for layout comparisons)."""
    root = Path(root)
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
