"""The clip loader: shapes, ranges, padding masks, splits, equality with the inference transform, bad input."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from data_helpers import LEROBOT_FIXTURE, band_row, edit_info, fixture, write_synthetic

from fastwam.config import DataConfig
from fastwam.data.clips import ClipDataset, collate, make_dataloader
from fastwam.data.lerobot import DatasetError, LeRobotReader
from fastwam.data.normalize import NormStats
from fastwam.data.transforms import compose_cameras


def _cfg(root: Path, **kw) -> DataConfig:
    base = dict(dataset=str(root), image_size=(16, 16), num_frames=3, frame_stride=4, action_horizon=5)
    base.update(kw)
    return DataConfig(**base)


def test_fixture_sample_shapes_ranges_and_content():
    ds = ClipDataset(_cfg(LEROBOT_FIXTURE))
    assert len(ds) == 21 and ds.action_dim == 4 and ds.state_dim == 4 and ds.fps == fixture.FPS
    assert ds.camera_keys == sorted(fixture.CAMERAS)  # default: every camera, sorted
    it = ds[3]
    assert it["video"].shape == (3, 3, 16, 32) and it["video"].dtype == torch.float32
    assert it["video"].min() >= -1 and it["video"].max() <= 1
    assert it["actions"].shape == (5, 4) and it["state"].shape == (4,)
    assert it["task"] == "push the puck to the goal" and ds[15]["task"] == "open the drawer"
    # normalised with min/max over the whole dataset: raw = unnormalize(item)
    raw = ds.normalizer.unnormalize("action", it["actions"]).numpy()
    np.testing.assert_allclose(raw, np.stack([fixture.action_value(0, t) for t in range(3, 8)]), atol=1e-5)
    np.testing.assert_allclose(ds.normalizer.unnormalize("state", it["state"]).numpy(), fixture.state_value(0, 3),
                               atol=1e-5)
    # frames k = t0 + k * stride: the band of the top camera sits where the LeRobot pattern put it
    cfg = _cfg(LEROBOT_FIXTURE, image_size=(48, 64), cameras=("top",))
    top = ClipDataset(cfg)[3]["video"]
    frames = ((top.permute(1, 2, 3, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
    assert [band_row(f) for f in frames] == [band_row(fixture.frame_pattern(0, t, 48, 64, 0)) for t in (3, 7, 11)]


def test_video_equals_the_inference_transform():
    """Training frames == compose_cameras() on the decoded camera images (what the policy does at inference)."""
    cfg = _cfg(LEROBOT_FIXTURE, image_size=(24, 20))
    ds = ClipDataset(cfg)
    r = LeRobotReader(LEROBOT_FIXTURE)
    ep = r.episodes[1]
    raw = {k: r.decode_episode(k, ep) for k in ds.camera_keys}
    it = ds[12 + 2]  # episode 1, t0 = 2
    for k, t in enumerate((2, 6)):
        expect = compose_cameras([raw[c][t] for c in ds.camera_keys], cfg)
        torch.testing.assert_close(it["video"][:, k], expect, rtol=0, atol=0)


def test_episode_end_padding_masks():
    ds = ClipDataset(_cfg(LEROBOT_FIXTURE))
    last = ds[11]  # episode 0 has 12 steps: t0 = 11 is its last
    assert last["video_mask"].tolist() == [True, False, False]
    assert last["action_mask"].tolist() == [True, False, False, False, False]
    assert torch.equal(last["video"][:, 1], last["video"][:, 0])
    assert torch.equal(last["video"][:, 2], last["video"][:, 0])
    assert torch.equal(last["actions"][1:], last["actions"][:1].expand(4, 4))
    mid = ds[6]  # t0 = 6: frames 6, 10, (14 > 11); actions 6..10 all inside
    assert mid["video_mask"].tolist() == [True, True, False] and mid["action_mask"].all()
    edge = ds[4]  # frame 4 + 2 * 4 = 12 is exactly one past the last step (11)
    assert edge["video_mask"].tolist() == [True, True, False]
    assert ds[8]["action_mask"].tolist() == [True, True, True, True, False]  # actions 8..12
    first = ds[12]  # first step of episode 1 never reads episode 0
    assert first["video_mask"].all() and first["task"] == "open the drawer"


def test_split_stats_lazy_and_batches(tmp_path):
    root = write_synthetic(tmp_path / "ds", lengths=(6, 7, 8, 9))
    cfg = _cfg(root, val_episodes=1)
    train = ClipDataset(cfg, "train")
    val = ClipDataset(cfg, "val", stats=train.stats)
    assert train.num_episodes == 3 and val.num_episodes == 1 and len(train) == 21 and len(val) == 9
    assert val.episodes[0].index == 3  # the val split is the last episodes
    assert ClipDataset(cfg, "val").stats.to_dict() == train.stats.to_dict()  # stats cover all episodes
    lazy = ClipDataset(dataclasses.replace(cfg, cache_in_memory=False))
    for i in (0, 7, 20):
        for key in ("video", "actions", "state", "video_mask"):
            assert torch.equal(lazy[i][key], train[i][key])
    idx = [0, 5, 13, 20]
    a, b = train.get_batch(idx), collate([train[i] for i in idx])
    assert a["task"] == b["task"]
    for key in ("video", "video_mask", "actions", "action_mask", "state"):
        assert torch.equal(a[key], b[key]), key
    assert train.collate is collate and b["video"].shape == (4, 3, 3, 16, 32)
    batches = list(make_dataloader(train, 8, shuffle=True, seed=1))
    assert len(batches) == 2 and batches[0]["actions"].shape == (8, 5, 4)
    with pytest.raises(ValueError, match="val_episodes"):
        ClipDataset(_cfg(root), "val")


def test_three_cameras_robotwin_and_camera_selection(tmp_path):
    cams = {"observation.images.top": (24, 32), "observation.images.left": (16, 16),
            "observation.images.right": (16, 16)}
    root = write_synthetic(tmp_path / "ds", lengths=(5, 5), cameras=cams)
    ds = ClipDataset(_cfg(root, image_size=(16, 20), layout="robotwin", cameras=("top", "left", "right")))
    assert ds.camera_keys == list(cams) and ds[0]["video"].shape == (3, 3, 24, 20)
    two = ClipDataset(_cfg(root, cameras=("observation.images.right", "top")))
    assert two.camera_keys == ["observation.images.right", "observation.images.top"]
    with pytest.raises(DatasetError, match="1 or 2 cameras"):
        ClipDataset(_cfg(root))  # 3 cameras side by side


def test_norm_stats_round_trip_through_json(tmp_path):
    ds = ClipDataset(_cfg(LEROBOT_FIXTURE, normalizer="z_score"))
    ds.stats.save(tmp_path / "norm.json")
    again = ClipDataset(_cfg(LEROBOT_FIXTURE, normalizer="z_score"), stats=NormStats.load(tmp_path / "norm.json"))
    assert torch.equal(again[5]["actions"], ds[5]["actions"])


# ---------------------------------------------------------------------------------------------------------------------
# Bad input: each error names the file and the field, at construction.


@pytest.fixture
def copy_fixture(tmp_path) -> Path:
    root = tmp_path / "ds"
    shutil.copytree(LEROBOT_FIXTURE, root)
    return root


def test_missing_feature_in_info(copy_fixture):
    edit_info(copy_fixture, lambda info: info["features"].pop("action"))
    with pytest.raises(DatasetError, match=r"info\.json.*'action' not found"):
        ClipDataset(_cfg(copy_fixture))


def test_missing_column_in_data(copy_fixture):
    path = copy_fixture / "data/chunk-000/file-000.parquet"
    pq.write_table(pq.read_table(path).drop(["observation.state"]), path)
    with pytest.raises(DatasetError, match=r"file-000\.parquet.*observation\.state"):
        ClipDataset(_cfg(copy_fixture))


def test_wrong_dimensions(copy_fixture):
    def widen(info):
        info["features"]["action"]["shape"] = [7]
    edit_info(copy_fixture, widen)
    with pytest.raises(DatasetError, match=r"file-000\.parquet:action.*\[7\]"):
        ClipDataset(_cfg(copy_fixture))


def test_wrong_video_resolution(copy_fixture):
    def taller(info):
        info["features"]["observation.images.top"]["shape"] = [96, 64, 3]
    edit_info(copy_fixture, taller)
    with pytest.raises(DatasetError, match=r"file-000\.mp4.*observation\.images\.top.*96x64"):
        ClipDataset(_cfg(copy_fixture))


def test_stats_of_another_dataset(copy_fixture):
    other = NormStats.compute({"action": np.zeros((3, 7)), "state": np.zeros((3, 4))})
    with pytest.raises(DatasetError, match="action dim 7"):
        ClipDataset(_cfg(copy_fixture), stats=other)


def test_unknown_camera(copy_fixture):
    with pytest.raises(DatasetError, match=r"info\.json.*unknown camera 'front'"):
        ClipDataset(_cfg(copy_fixture, cameras=("front", "top")))


@pytest.mark.parametrize("cache", [True, False])
def test_corrupt_video(copy_fixture, cache):
    path = copy_fixture / "videos/observation.images.wrist/chunk-000/file-000.mp4"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated: a copy that died half-way
    with pytest.raises(DatasetError, match=r"observation\.images\.wrist.*file-000\.mp4|file-000\.mp4.*wrist"):
        ClipDataset(_cfg(copy_fixture, cache_in_memory=cache))


def test_garbage_and_missing_video(copy_fixture):
    path = copy_fixture / "videos/observation.images.top/chunk-000/file-000.mp4"
    path.write_bytes(b"\x00" * 4096)
    with pytest.raises(DatasetError, match=r"file-000\.mp4.*observation\.images\.top"):
        ClipDataset(_cfg(copy_fixture))
    path.unlink()
    with pytest.raises(DatasetError, match="not found"):
        ClipDataset(_cfg(copy_fixture))


def test_nan_values_and_bad_episode_index(copy_fixture):
    path = copy_fixture / "data/chunk-000/file-000.parquet"
    table = pq.read_table(path)
    ep = table["episode_index"].to_numpy().copy()
    ep[3] = 1
    pq.write_table(table.set_column(table.schema.get_field_index("episode_index"), "episode_index",
                                    pa.array(ep)), path)
    with pytest.raises(DatasetError, match="episode_index"):
        ClipDataset(_cfg(copy_fixture))
    act = table["action"].combine_chunks().flatten().to_numpy().copy()
    act[5] = np.nan
    col = pa.FixedSizeListArray.from_arrays(pa.array(act, pa.float32()), 4)
    pq.write_table(table.set_column(table.schema.get_field_index("action"), "action", col), path)
    with pytest.raises(DatasetError, match="action.*NaN"):
        ClipDataset(_cfg(copy_fixture))


def test_not_a_dataset(tmp_path):
    with pytest.raises(DatasetError, match="empty"):
        ClipDataset(DataConfig())
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta/info.json").write_text(json.dumps({"codebase_version": "v3.0", "fps": 10}))
    with pytest.raises(DatasetError, match="missing field 'features'"):
        ClipDataset(_cfg(tmp_path))


@pytest.mark.parametrize("field, value, says", [
    ("fps", "eighty", r"'fps' must be a positive whole number.*'eighty'"),
    ("fps", 0, r"'fps' must be a positive whole number.*0"),
    ("features", ["action"], r"'features' must be an object"),
    ("total_frames", "many", r"'total_frames' must be a non-negative integer"),
])
def test_bad_info_field_is_named(copy_fixture, field, value, says):
    edit_info(copy_fixture, lambda info: info.__setitem__(field, value))
    with pytest.raises(DatasetError, match=r"info\.json: .*" + says):
        ClipDataset(_cfg(copy_fixture))


def test_bad_feature_shape_is_named(copy_fixture):
    edit_info(copy_fixture, lambda info: info["features"]["observation.images.top"].__setitem__("shape", "8x8"))
    with pytest.raises(DatasetError, match=r"info\.json: feature 'observation\.images\.top': 'shape' must be a list"):
        ClipDataset(_cfg(copy_fixture))
