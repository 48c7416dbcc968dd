"""`fastwam data videos`: a folder of video files -> an action-free LeRobot dataset; bad files skipped and counted."""

from __future__ import annotations

import json
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from fastwam.config import DataConfig
from fastwam.data.clips import ClipDataset
from fastwam.data.lerobot import LeRobotReader


def write_video(path: Path, frames: int, size: tuple[int, int], fps: int, pix_fmt: str = "yuv420p",
                codec: str = "libx264") -> None:
    """A moving bright band on a coloured background (frame k's band starts at row 2k)."""
    import av

    h, w = size
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps, 1))
        stream.width, stream.height, stream.pix_fmt = w, h, pix_fmt
        for k in range(frames):
            img = np.zeros((h, w, 3), np.uint8)
            img[...] = (30, 90, 160)
            img[(2 * k) % h: (2 * k) % h + 4] = 250
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fastwam", "data", "videos", *args], capture_output=True, text=True)


def test_flat_folder_resized_resampled_bad_files_skipped(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    write_video(src / "open_the-drawer.mp4", frames=30, size=(48, 80), fps=30)  # 1 s at 30 fps
    write_video(src / "b.mkv", frames=10, size=(120, 96), fps=10)
    (src / "b.json").write_text(json.dumps({"task": "close the window"}))
    write_video(src / "grey.mkv", frames=5, size=(32, 32), fps=10, pix_fmt="gray", codec="ffv1")
    (src / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 definitely not a video")
    (src / "empty.webm").write_bytes(b"")
    (src / "notes.txt").write_text("not a video")
    out = tmp_path / "out"
    proc = _run(str(src), "--out", str(out), "--preset", "tiny", "--fps", "15", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    skipped = [line for line in proc.stderr.splitlines() if line.startswith("skipped ")]
    assert len(skipped) == 3, proc.stderr
    assert any("grey.mkv" in s and "colour" in s for s in skipped)
    assert any("corrupt.mp4" in s for s in skipped) and any("empty.webm" in s for s in skipped)
    summary = json.loads((out / "fastwam_videos.json").read_text())
    assert summary["episodes"] == 2 and summary["skipped"] == 3 and summary["fps"] == 15
    reader = LeRobotReader(out)
    assert reader.fps == 15 and reader.camera_keys == ["observation.images.main"]
    assert "action" not in reader.features and "observation.state" not in reader.features
    assert [e.length for e in reader.episodes] == [15, 15]  # b: 1 s at 10 fps -> 15 at 15; a: 1 s at 30 -> 15
    assert sorted(reader.tasks) == ["close the window", "open the drawer"]
    frames = reader.decode_episode("observation.images.main", reader.episodes[1])
    assert frames.shape == (15, 8, 8, 3)  # the tiny preset's 8 x 8 camera
    assert frames[..., 2].mean() > frames[..., 0].mean()  # still the blue-ish background: colour kept
    ds = ClipDataset(DataConfig(dataset=str(out), image_size=(8, 8), num_frames=3, frame_stride=2,
                                action_horizon=4), actions=False)
    assert len(ds) == 30 and ds[0]["video"].shape == (3, 3, 8, 8)
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_episode_folders_are_cameras_and_like_matches_a_dataset(tmp_path):
    src = tmp_path / "src"
    for name, n in (("ep_a", 12), ("ep_b", 9)):
        (src / name).mkdir(parents=True)
        write_video(src / name / "scene.mp4", n, (64, 64), 20)
        write_video(src / name / "wrist.mp4", n, (40, 40), 20)
        (src / name / "task.json").write_text(json.dumps({"task": f"task {name}"}))
    (src / "ep_c").mkdir()
    write_video(src / "ep_c" / "scene.mp4", 5, (64, 64), 20)  # missing its wrist camera: skipped
    out = tmp_path / "out"
    proc = _run(str(src), "--out", str(out), "--preset", "tiny", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "ep_c" in proc.stderr and "expected ['scene', 'wrist']" in proc.stderr
    reader = LeRobotReader(out)
    assert reader.fps == 20 and reader.camera_keys == ["observation.images.scene", "observation.images.wrist"]
    assert [e.tasks[0] for e in reader.episodes] == ["task ep_a", "task ep_b"]


def test_nothing_readable_is_one_line_and_leaves_nothing(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "x.mp4").write_bytes(b"garbage")
    proc = _run(str(src), "--out", str(tmp_path / "out"), "--preset", "tiny", "--no-progress")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("fastwam data videos: error: ")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))
    proc = _run(str(tmp_path / "nope"), "--out", str(tmp_path / "out"), "--no-progress")
    assert proc.returncode == 2 and "not a folder of videos" in proc.stderr


@pytest.mark.parametrize("fps,n_src,expect", [(30, 30, 15), (10, 10, 15), (7, 3, 7)])
def test_resampling_picks_the_frame_on_screen(tmp_path, fps, n_src, expect):
    from fastwam.data.videos import read_resampled

    path = tmp_path / "v.mp4"
    write_video(path, n_src, (32, 32), fps)
    frames = read_resampled(path, 15, (32, 32))
    assert len(frames) == expect
    rows = [int(np.argmax(f[:, :, 0].astype(float).mean(1) > 200)) for f in frames]
    # frame k of the output shows the source frame on screen at k / 15 s
    assert rows == [(2 * int(np.floor(k / 15 * fps + 1e-6))) % 32 for k in range(expect)]
