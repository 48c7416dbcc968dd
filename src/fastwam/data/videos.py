"""`fastwam data videos SRC --out DIR`: a folder of video files -> an action-free LeRobot v3.0 dataset.

Robot labs hold far more video than action-labelled demonstrations (teleoperation nobody logged, failed or exploratory
runs, other robots, people doing the task). This turns such video into a dataset that `fastwam pretrain --dataset`
and `fastwam train --video-dataset` read: camera features only, no `action`, no `observation.state`.

SRC holds episodes in one of two ways:
- video files (`.mp4`, `.webm`, `.mkv`, `.mov`, `.avi`) directly in SRC: one episode each, one camera (`--camera`);
- one folder per episode, holding one file per camera named after it (`scene.mp4`, `wrist.mp4`): every episode needs
  the same cameras.
Every video, whatever its size and frame rate, is resampled to `--fps` (nearest frame in time) and resized to the
preset's camera size (cover, then centre-crop: the transform training and serving use). `--like DIR` takes fps,
camera names and image size from an existing action-labelled dataset, so its clips mix with that dataset's.
The instruction of an episode is, in order: `--task`, a sidecar JSON (`clip.json` beside `clip.mp4`, or `task.json`
in an episode folder) with a "task" field, or the file / folder name with `_` and `-` read as spaces.

Bad inputs are skipped with one line each and counted (a file that will not open or decode, no video stream, no
frames, a grey-scale or otherwise non-colour stream, an episode folder missing a camera); the dataset is written
under a temporary name and renamed into place at the end, so an interrupted run leaves nothing half-written.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fastwam.config import Config
from fastwam.errors import UserError
from fastwam.presets import PresetArgs

VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".mov", ".avi")
# Pixel formats that carry no colour: such a stream would become three equal channels, not an RGB camera.
_GREY_FORMATS = ("gray", "ya8", "ya16", "monob", "monow", "pal8")


@dataclass
class VideosArgs(PresetArgs):
    """Turn a folder of videos into an action-free LeRobot v3.0 dataset (for fastwam pretrain / train
    --video-dataset)."""

    config: Config
    src: str = ""  # folder of video files, or of one folder per episode (one file per camera)
    out: str = ""  # dataset directory to create
    fps: int = 0  # frames per second of the dataset (0: the first video's own rate, rounded)
    task: str = ""  # the instruction of every episode (default: a sidecar JSON, else the file name)
    camera: str = "main"  # camera name for videos directly in SRC (one camera each)
    like: str = ""  # a LeRobot dataset to match: its fps, camera names and image size (instead of the preset's)
    max_episodes: int = 0  # stop after this many episodes (0: all)
    crf: int = 12  # x264 quality of the written videos (lower = better)
    overwrite: bool = False
    progress: bool = True


@dataclass
class Episode:
    name: str
    cameras: dict[str, Path]  # camera name -> video file
    task: str


class BadVideo(Exception):
    """A video that cannot be used; the message says why (one line)."""


def find_episodes(src: Path, camera: str, task: str) -> tuple[list[Episode], list[str]]:
    """The episodes under SRC, sorted by name, and one line per entry skipped while listing them."""
    if not src.is_dir():
        raise UserError(f"{src}: not a folder of videos")
    skipped, episodes = [], []
    entries = sorted(src.iterdir())
    files = [p for p in entries if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES]
    folders = [p for p in entries if p.is_dir()]
    for f in files:
        episodes.append(Episode(f.stem, {camera: f}, task or _task_for(f.with_suffix(".json"), f.stem)))
    camera_sets = {}
    for d in folders:
        vids = {p.stem: p for p in sorted(d.iterdir()) if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES}
        if vids:
            camera_sets[d] = vids
    if camera_sets:
        if files:
            raise UserError(f"{src}: holds both video files and episode folders; use one layout")
        names = sorted({frozenset(v) for v in camera_sets.values()}, key=len, reverse=True)
        wanted = sorted(max(names, key=lambda s: sum(set(v) == s for v in camera_sets.values())))
        for d, vids in camera_sets.items():
            if sorted(vids) != wanted:
                skipped.append(f"{d}: cameras {sorted(vids)}, expected {wanted}")
                continue
            episodes.append(Episode(d.name, {c: vids[c] for c in wanted}, task or _task_for(d / "task.json", d.name)))
    if not episodes and not skipped:
        raise UserError(f"{src}: no video files ({', '.join(VIDEO_SUFFIXES)}) and no episode folders holding some")
    return episodes, skipped


def _task_for(sidecar: Path, name: str) -> str:
    if sidecar.is_file():
        try:
            data = json.loads(sidecar.read_text())
        except (OSError, ValueError):
            data = None
        if isinstance(data, dict) and isinstance(data.get("task"), str) and data["task"].strip():
            return data["task"].strip()
    return " ".join(name.replace("_", " ").replace("-", " ").split())


def probe_fps(path: Path) -> float:
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise BadVideo("no video stream")
            rate = container.streams.video[0].average_rate or container.streams.video[0].base_rate
            return float(rate) if rate else 0.0
    except BadVideo:
        raise
    except Exception as e:  # noqa: BLE001 - PyAV raises many error types for broken files
        raise BadVideo(f"cannot open ({type(e).__name__}: {e})") from None


def read_resampled(path: Path, fps: int, size: tuple[int, int]) -> np.ndarray:
    """uint8 [N, h, w, 3]: the frame shown at each time k / fps of the video, resized (cover) and centre-cropped."""
    import av

    from fastwam.data.transforms import resize_crop

    try:
        container = av.open(str(path))
    except Exception as e:  # noqa: BLE001
        raise BadVideo(f"cannot open ({type(e).__name__}: {e})") from None
    try:
        if not container.streams.video:
            raise BadVideo("no video stream")
        stream = container.streams.video[0]
        fmt = stream.codec_context.pix_fmt or ""
        if fmt.startswith(_GREY_FORMATS):
            raise BadVideo(f"pixel format {fmt} has no colour channels (expected an RGB / YUV colour video)")
        times, frames = [], []
        for frame in container.decode(stream):
            if frame.pts is None:
                continue
            if frame.format.name.startswith(_GREY_FORMATS):
                raise BadVideo(f"pixel format {frame.format.name} has no colour channels")
            times.append(float(frame.pts * stream.time_base))
            frames.append(resize_crop(frame.to_ndarray(format="rgb24"), size).numpy()[0])
    except BadVideo:
        raise
    except Exception as e:  # noqa: BLE001
        raise BadVideo(f"corrupt video ({type(e).__name__}: {e})") from None
    finally:
        container.close()
    if not frames:
        raise BadVideo("no decodable frames")
    order = np.argsort(times, kind="stable")
    times_arr = np.asarray(times)[order] - min(times)
    stack = np.stack(frames)[order]
    # The video lasts until its last frame ends (a frame shows for the typical gap between frames); output frame k
    # is the source frame on screen at time k / fps: the last one that started by then.
    step = float(np.median(np.diff(times_arr))) if len(times_arr) > 1 else 1.0 / fps
    n = max(1, int(np.ceil((times_arr[-1] + step) * fps - 1e-6)))
    wanted = np.arange(n) / fps
    idx = np.clip(np.searchsorted(times_arr, wanted + 1e-6, side="right") - 1, 0, len(stack) - 1)
    return stack[idx]


def convert(args: VideosArgs) -> dict[str, Any]:
    from tqdm.auto import tqdm

    from fastwam.data.lerobot_writer import LeRobotWriter, dataset_size_bytes

    if not args.src or not args.out:
        raise UserError("give the video folder and --out DIR: fastwam data videos --src SRC --out DIR")
    src, out = Path(args.src), Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        raise FileExistsError(f"{out} exists and is not empty (--overwrite replaces it)")
    episodes, skipped = find_episodes(src, args.camera, args.task)
    if args.max_episodes > 0:
        episodes = episodes[: args.max_episodes]
    size = tuple(args.config.data.image_size)
    cameras = sorted({c for e in episodes for c in e.cameras})
    fps = args.fps
    if args.like:
        from fastwam.data.lerobot import LeRobotReader

        like = LeRobotReader(args.like)
        fps = fps or like.fps
        like_cams = sorted(k.removeprefix("observation.images.") for k in like.camera_keys)
        if like_cams != cameras:
            if len(cameras) == 1 and len(like_cams) == 1:
                episodes = [Episode(e.name, {like_cams[0]: next(iter(e.cameras.values()))}, e.task) for e in episodes]
                cameras = like_cams
            else:
                raise UserError(f"--like {args.like}: its cameras are {like_cams}, the videos' {cameras}; name each "
                                "episode folder's files after them")
        size = like.camera_shape(like.camera_keys[0])[:2]
    for line in skipped:
        print(f"skipped {line}", file=sys.stderr)
    if fps <= 0:
        for e in episodes:
            try:
                fps = round(probe_fps(next(iter(e.cameras.values()))))
                break
            except BadVideo:
                continue
        if fps <= 0:
            fps = 30
    features = {f"observation.images.{c}": {"dtype": "video", "shape": [size[0], size[1], 3],
                                            "names": ["height", "width", "channels"]} for c in cameras}
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    t0 = time.perf_counter()
    writer = LeRobotWriter(tmp, fps, features, robot_type=None, crf=args.crf, overwrite=True)
    kept = 0
    try:
        for e in tqdm(episodes, unit="ep", desc="videos", disable=not args.progress, dynamic_ncols=True):
            try:
                data = {f"observation.images.{c}": read_resampled(p, fps, size) for c, p in e.cameras.items()}
            except BadVideo as bad:
                where = next(iter(e.cameras.values())) if len(e.cameras) == 1 else src / e.name
                skipped.append(f"{where}: {bad}")
                print(f"skipped {where}: {bad}", file=sys.stderr)
                continue
            n = min(len(v) for v in data.values())  # cameras of one episode may end a frame apart
            writer.add_episode(e.task, {k: v[:n] for k, v in data.items()})
            kept += 1
        if kept == 0:
            raise UserError(f"{src}: none of the {len(episodes)} episode(s) could be read ({len(skipped)} skipped)")
        writer.finalize()
        summary = {"dataset": str(out), "source": str(src), "fps": fps, "image_size": list(size), "cameras": cameras,
                   "episodes": kept, "frames": writer.total_frames, "skipped": len(skipped),
                   "skipped_entries": skipped, "tasks": sorted(writer.tasks), "wall_seconds": round(
                       time.perf_counter() - t0, 1), "size_bytes": dataset_size_bytes(tmp)}
        (tmp / "fastwam_videos.json").write_text(json.dumps(summary, indent=2) + "\n")
    except BaseException:
        writer._close_files()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return summary


def cli(argv: list[str], prog: str = "fastwam data videos") -> int:
    from fastwam.presets import parse_with_preset

    # SRC may come first, as a positional word (the usage the README shows): fastwam data videos SRC --out DIR.
    if argv and not argv[0].startswith("-"):
        argv = ["--src", argv[0], *argv[1:]]
    args = parse_with_preset(argv, VideosArgs, prog)
    s = convert(args)
    print(f"wrote {s['dataset']}: {s['episodes']} episodes, {s['frames']} frames at {s['fps']} fps, cameras "
          f"{s['cameras']} at {s['image_size'][0]}x{s['image_size'][1]}, {s['size_bytes'] / 1e6:.1f} MB; "
          f"skipped {s['skipped']}", file=sys.stderr)
    return 0
