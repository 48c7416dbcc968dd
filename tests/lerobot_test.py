"""LeRobot format: the fixture written by LeRobot's own code loads here; our writer produces the same layout."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from data_helpers import LEROBOT_FIXTURE, band_row, fixture, write_synthetic

from fastwam.data.lerobot import DatasetError, LeRobotReader
from fastwam.data.lerobot_writer import LeRobotWriter, _VideoFile, iter_files


def test_fixture_metadata_and_tasks():
    r = LeRobotReader(LEROBOT_FIXTURE)
    assert r.version == "v3.0" and r.fps == fixture.FPS
    assert r.tasks == [task for task, _ in fixture.EPISODES]
    assert [e.length for e in r.episodes] == [n for _, n in fixture.EPISODES]
    assert [e.tasks for e in r.episodes] == [(task,) for task, _ in fixture.EPISODES]
    assert sorted(r.camera_keys) == sorted(fixture.CAMERAS)
    for key, (h, w) in fixture.CAMERAS.items():
        assert r.camera_shape(key) == (h, w, 3)


def test_fixture_low_dim_values_are_exact():
    r = LeRobotReader(LEROBOT_FIXTURE)
    cols = r.read_columns(["observation.state", "action", "task_index", "frame_index", "episode_index"])
    expect_state = np.concatenate([[fixture.state_value(e, t) for t in range(n)]
                                   for e, (_, n) in enumerate(fixture.EPISODES)])
    expect_action = np.concatenate([[fixture.action_value(e, t) for t in range(n)]
                                    for e, (_, n) in enumerate(fixture.EPISODES)])
    np.testing.assert_array_equal(cols["observation.state"], expect_state)
    np.testing.assert_array_equal(cols["action"], expect_action)
    np.testing.assert_array_equal(cols["task_index"], np.repeat([0, 1], [n for _, n in fixture.EPISODES]))
    assert cols["frame_index"][12] == 0 and cols["episode_index"][12] == 1


@pytest.mark.parametrize("key", list(fixture.CAMERAS))
def test_fixture_frames_are_the_right_frames(key):
    r = LeRobotReader(LEROBOT_FIXTURE)
    cam = list(fixture.CAMERAS).index(key)
    h, w = fixture.CAMERAS[key]
    for ep in r.episodes:
        frames = r.decode_episode(key, ep)
        assert frames.shape == (ep.length, h, w, 3) and frames.dtype == np.uint8
        for t, img in enumerate(frames):
            expect = fixture.frame_pattern(ep.index, t, h, w, cam)
            assert band_row(img) == band_row(expect), f"episode {ep.index} frame {t}"  # exact frame, not a neighbour
            assert np.abs(img.astype(int) - expect.astype(int)).mean() < 6  # lossy AV1, but close


def test_writer_round_trip(tmp_path):
    root = write_synthetic(tmp_path / "ds", lengths=(5, 8))
    r = LeRobotReader(root)
    assert [e.length for e in r.episodes] == [5, 8]
    cols = r.read_columns(["action", "observation.state"])
    np.testing.assert_array_equal(cols["action"][5:], np.stack([fixture.action_value(1, t) for t in range(8)]))
    for key, (h, w) in fixture.CAMERAS.items():
        cam = list(fixture.CAMERAS).index(key)
        frames = r.decode_episode(key, r.episodes[1])
        expect = np.stack([fixture.frame_pattern(1, t, h, w, cam) for t in range(8)])
        assert np.abs(frames.astype(int) - expect.astype(int)).mean() < 3
        assert [band_row(f) for f in frames] == [band_row(f) for f in expect]
    # episodes share one video file per camera, located by timestamps
    ep1 = r.episodes[1].videos["observation.images.top"]
    assert ep1.path.name == "file-000.mp4" and ep1.from_timestamp == pytest.approx(0.5)
    assert ep1.to_timestamp == pytest.approx(1.3)


def _structure(root: Path) -> dict:
    info = json.loads((root / "meta/info.json").read_text())
    files = {p for p in iter_files(root) if not p.startswith("fastwam_")}
    ep_cols = pq.read_schema(root / "meta/episodes/chunk-000/file-000.parquet").names
    data_schema = pq.read_schema(root / "data/chunk-000/file-000.parquet")
    return {
        "files": files,
        "info_keys": list(info),
        "info": info,
        "episode_columns": ep_cols,
        "data_columns": {f.name: str(f.type) for f in data_schema},
        "task_columns": pq.read_schema(root / "meta/tasks.parquet").names,
        "stats_keys": {k: sorted(v) for k, v in json.loads((root / "meta/stats.json").read_text()).items()},
    }


def compare_to_fixture(root: Path, camera_map: dict[str, str]) -> None:
    """Our dataset's v3.0 structure equals the LeRobot-written fixture's (modulo camera names)."""
    ours, ref = _structure(root), _structure(LEROBOT_FIXTURE)

    def rename(s: str) -> str:
        for a, b in camera_map.items():
            s = s.replace(a, b)
        return s

    assert {rename(f) for f in ref["files"]} == ours["files"]
    assert ours["info_keys"] == ref["info_keys"]
    assert ours["info"]["codebase_version"] == "v3.0"
    for k in ("data_path", "video_path", "chunks_size", "data_files_size_in_mb", "video_files_size_in_mb"):
        assert ours["info"][k] == ref["info"][k], k
    assert [rename(k) for k in ref["info"]["features"]] == list(ours["info"]["features"])
    for key, ft in ref["info"]["features"].items():
        mine = ours["info"]["features"][rename(key)]
        assert set(mine) == set(ft), key
        assert mine["dtype"] == ft["dtype"], key
        if ft["dtype"] == "video":
            assert mine["names"] == ft["names"] and set(mine["info"]) == set(ft["info"]), key
        else:
            assert mine["shape"] == ft["shape"], key
    assert [rename(c) for c in ref["episode_columns"]] == ours["episode_columns"]
    assert {rename(k): v for k, v in ref["data_columns"].items()} == ours["data_columns"]
    assert ours["task_columns"] == ref["task_columns"]
    assert {rename(k): v for k, v in ref["stats_keys"].items()} == ours["stats_keys"]
    r = LeRobotReader(root)
    cols = r.read_columns(["episode_index", "frame_index", "task_index", "timestamp"])
    assert cols["frame_index"][0] == 0 and cols["timestamp"].dtype == np.float32


def test_writer_layout_matches_lerobot_fixture(tmp_path):
    root = write_synthetic(tmp_path / "ds", lengths=tuple(n for _, n in fixture.EPISODES))
    compare_to_fixture(root, {})


def test_writer_stats_json_values(tmp_path):
    root = write_synthetic(tmp_path / "ds", lengths=(4, 6))
    stats = json.loads((root / "meta/stats.json").read_text())
    actions = np.concatenate([[fixture.action_value(e, t) for t in range(n)] for e, n in enumerate((4, 6))])
    np.testing.assert_allclose(stats["action"]["min"], actions.min(0), atol=1e-6)
    np.testing.assert_allclose(stats["action"]["mean"], actions.mean(0), atol=1e-6)
    assert stats["action"]["count"] == [10]
    assert np.array(stats["observation.images.top"]["mean"]).shape == (3, 1, 1)
    assert 0 <= np.min(stats["observation.images.top"]["min"]) <= np.max(stats["observation.images.top"]["max"]) <= 1


def test_writer_rejects_bad_episodes(tmp_path):
    feats = {"observation.images.cam": {"dtype": "video", "shape": [8, 8, 3], "names": ["height", "width", "channels"]},
             "action": {"dtype": "float32", "shape": [2], "names": None}}
    w = LeRobotWriter(tmp_path / "ds", 10, feats)
    with pytest.raises(ValueError, match="missing"):
        w.add_episode("t", {"action": np.zeros((3, 2), np.float32)})
    with pytest.raises(ValueError, match="uint8"):
        w.add_episode("t", {"action": np.zeros((3, 2), np.float32),
                            "observation.images.cam": np.zeros((3, 8, 8, 3), np.float32)})
    with pytest.raises(ValueError, match="share"):
        w.add_episode("t", {"action": np.zeros((2, 2), np.float32),
                            "observation.images.cam": np.zeros((3, 8, 8, 3), np.uint8)})
    w.add_episode("t", {"action": np.zeros((3, 2), np.float32),
                        "observation.images.cam": np.zeros((3, 8, 8, 3), np.uint8)})
    w.finalize()
    with pytest.raises(FileExistsError):
        LeRobotWriter(tmp_path / "ds", 10, feats)


def test_reader_errors_name_the_file(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        LeRobotReader(tmp_path / "nope")
    root = tmp_path / "ds"
    shutil.copytree(LEROBOT_FIXTURE, root)
    (root / "meta/tasks.parquet").unlink()
    with pytest.raises(DatasetError, match="tasks.parquet"):
        LeRobotReader(root)
    shutil.rmtree(root)
    shutil.copytree(LEROBOT_FIXTURE, root)
    (root / "meta/info.json").write_text("{not json")
    with pytest.raises(DatasetError, match="info.json"):
        LeRobotReader(root)


def _to_v21(src: Path, dst: Path) -> None:
    """Rewrite a v3.0 dataset in the v2.1 layout (one parquet and one mp4 per episode, jsonl metadata)."""
    r = LeRobotReader(src)
    info = json.loads((src / "meta/info.json").read_text())
    info.update(codebase_version="v2.1", data_path="data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
                video_path="videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4")
    (dst / "meta").mkdir(parents=True)
    (dst / "meta/info.json").write_text(json.dumps(info))
    (dst / "meta/tasks.jsonl").write_text("".join(json.dumps({"task_index": i, "task": t}) + "\n"
                                                  for i, t in enumerate(r.tasks)))
    (dst / "meta/episodes.jsonl").write_text("".join(
        json.dumps({"episode_index": e.index, "tasks": list(e.tasks), "length": e.length}) + "\n" for e in r.episodes))
    table = pq.read_table(src / "data/chunk-000/file-000.parquet")
    for e in r.episodes:
        (dst / "data/chunk-000").mkdir(parents=True, exist_ok=True)
        pq.write_table(table.slice(e.dataset_from_index, e.length),
                       dst / f"data/chunk-000/episode_{e.index:06d}.parquet")
        for key in r.video_keys:
            frames = r.decode_episode(key, e)
            vf = _VideoFile(dst / f"videos/chunk-000/{key}/episode_{e.index:06d}.mp4", 0, 0, r.fps, frames.shape[2],
                            frames.shape[1], "h264", "yuv444p", 0, 8)
            vf.write(frames)
            vf.close()


def test_reads_v21_layout(tmp_path):
    _to_v21(LEROBOT_FIXTURE, tmp_path / "v21")
    v3, v2 = LeRobotReader(LEROBOT_FIXTURE), LeRobotReader(tmp_path / "v21")
    assert v2.version == "v2.1" and v2.tasks == v3.tasks
    assert [(e.index, e.length, e.dataset_from_index) for e in v2.episodes] == \
        [(e.index, e.length, e.dataset_from_index) for e in v3.episodes]
    np.testing.assert_array_equal(v2.read_columns(["action"])["action"], v3.read_columns(["action"])["action"])
    a = v2.decode_episode("observation.images.top", v2.episodes[1]).astype(int)
    b = v3.decode_episode("observation.images.top", v3.episodes[1]).astype(int)
    assert np.abs(a - b).max() <= 2  # re-encoded near-losslessly (crf 0)
