"""Meta-World env wrapper and the demonstration generator (tiny: 2 tasks x 2 episodes at 32x32)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("metaworld")

from lerobot_test import compare_to_fixture  # noqa: E402

from fastwam.config import DataConfig  # noqa: E402
from fastwam.data.clips import ClipDataset  # noqa: E402
from fastwam.data.lerobot import LeRobotReader  # noqa: E402
from fastwam.envs.metaworld import INSTRUCTIONS, MT10, TASK_SETS, MetaWorldEnv, parse_tasks  # noqa: E402

TASKS = "reach,push-v3"


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> tuple[Path, Path, dict]:
    # Each generation in a fresh process, as the CLI runs: x264 output can change in a process that has rendered with
    # EGL / llvmpipe, and other tests in this pytest worker render in-process (see `generate`). Measured: with the
    # generator called in-process, this test failed in 2 of 2 full-suite runs from a clean clone.
    base = tmp_path_factory.mktemp("mw")
    for name in ("a", "b"):
        subprocess.run([sys.executable, "-m", "fastwam", "data", "metaworld", "--tasks", TASKS, "--episodes", "2",
                        "--image-size", "32", "--workers", "1", "--no-progress", "--out", str(base / name)],
                       check=True, capture_output=True)
    summary = json.loads((base / "a" / "fastwam_generation.json").read_text())
    return base / "a", base / "b", summary


def test_task_sets():
    assert TASK_SETS["mt10"] == MT10 and len(MT10) == 10 and len(TASK_SETS["mt50"]) == 50
    assert parse_tasks("push,reach-v3, push-v3") == ["push-v3", "reach-v3"]
    assert parse_tasks("mt10")[:2] == ["reach-v3", "push-v3"]
    assert all(t in INSTRUCTIONS for t in TASK_SETS["mt50"])
    assert INSTRUCTIONS["push-v3"] == "push the puck to the goal"
    with pytest.raises(ValueError, match="unknown Meta-World task"):
        parse_tasks("push,fly-v3")


def test_env_observation_contract():
    with MetaWorldEnv("push", seed=3, image_size=(24, 32), cameras=("scene", "wrist", "corner")) as env:
        obs = env.reset()
        assert obs["task"] == "push the puck to the goal"
        assert set(obs["images"]) == {"scene", "wrist", "corner"}
        for img in obs["images"].values():
            assert img.shape == (24, 32, 3) and img.dtype == np.uint8 and img.std() > 5  # not blank
        # state = the robot's own part: end effector xyz + gripper (obs[0:4]), never the object (obs[4:7])
        assert obs["state"].dtype == np.float32 and obs["state"].shape == (4,)
        np.testing.assert_array_equal(obs["state"], env._raw_obs[:4].astype(np.float32))
        # the stock corner camera is flipped upright: equal to the raw render rotated by 180 degrees
        env._renderer.update_scene(env._mw.data, camera="corner")
        np.testing.assert_array_equal(obs["images"]["corner"], env._renderer.render()[::-1, ::-1])
        obs2, reward, success, done = env.step(env.expert_action())
        assert isinstance(reward, float) and isinstance(success, bool) and not done
        assert not np.array_equal(obs2["state"], obs["state"])
        obs3, *_ = env.step(np.zeros(4), render=False)
        assert obs3["images"] == {} and obs3["state"].shape == (4,)


def test_env_is_seeded():
    runs = []
    for _ in range(2):
        with MetaWorldEnv("reach", seed=7, image_size=16) as env:
            first = env.reset()["images"]["scene"]
            obs = first
            for _ in range(5):
                obs, *_ = env.step(env.expert_action())
            runs.append((first, obs["state"], obs["images"]["scene"]))
    for a, b in zip(*runs, strict=True):
        np.testing.assert_array_equal(a, b)
    with MetaWorldEnv("reach", seed=8, image_size=16) as env:
        assert not np.array_equal(env.reset()["images"]["scene"], runs[0][0])  # another seed, another layout


def test_generation_summary_and_content(generated):
    root, _, summary = generated
    assert summary["episodes"] == 4
    assert {t: (s["kept"], s["attempted"] >= s["kept"]) for t, s in summary["per_task"].items()} == \
        {"reach-v3": (2, True), "push-v3": (2, True)}
    assert json.loads((root / "fastwam_generation.json").read_text())["frames"] == summary["frames"]
    r = LeRobotReader(root)
    assert r.fps == 80 and r.camera_keys == ["observation.images.scene", "observation.images.wrist"]
    # episodes alternate over tasks so a held-out tail covers every task
    assert [e.tasks[0] for e in r.episodes] == [INSTRUCTIONS["reach-v3"], INSTRUCTIONS["push-v3"]] * 2
    assert all(20 < e.length < 300 for e in r.episodes)  # stopped soon after success, not at the step cap
    cols = r.read_columns(["observation.state", "action"])
    state, action = cols["observation.state"], cols["action"]
    assert np.abs(action).max() <= 1.0
    assert np.all(state[:, 2] > 0) and np.all(state[:, 1] > 0.3) and np.all(np.abs(state[:, 0]) < 0.6)  # eef xyz
    ds = ClipDataset(DataConfig(dataset=str(root), image_size=(32, 32), num_frames=3, frame_stride=8,
                                action_horizon=16, val_episodes=2))
    it = ds[0]
    assert it["video"].shape == (3, 3, 32, 64) and ds.action_dim == 4 and ds.state_dim == 4
    assert it["actions"].abs().max() <= 1 and it["task"] == INSTRUCTIONS["reach-v3"]


def test_generated_layout_matches_lerobot_fixture(generated):
    compare_to_fixture(generated[0], {"observation.images.top": "observation.images.scene"})


def test_generation_is_reproducible(generated):
    a, b, _ = generated
    for rel in ("data/chunk-000/file-000.parquet", "meta/episodes/chunk-000/file-000.parquet", "meta/tasks.parquet",
                "meta/info.json", "meta/stats.json"):
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    ra, rb = LeRobotReader(a), LeRobotReader(b)
    # Once seen failing under full-suite load in CI (frames off by a few levels from frame 13); say whether the
    # encoded files already differed (rendering / encoding) or only their decodes, should it happen again.
    same_files = {p.relative_to(a).as_posix(): p.read_bytes() == (b / p.relative_to(a)).read_bytes()
                  for p in sorted(a.glob("videos/**/*.mp4"))}
    for key in ra.video_keys:
        for ea, eb in zip(ra.episodes, rb.episodes, strict=True):
            np.testing.assert_array_equal(ra.decode_episode(key, ea), rb.decode_episode(key, eb),
                                          err_msg=f"{key} episode {ea.index}; mp4 bytes identical: {same_files}")



def test_action_free_corpus_with_perturbed_and_noisy_players_and_failures_kept(tmp_path):
    out = tmp_path / "corpus"
    proc = subprocess.run([sys.executable, "-m", "fastwam", "data", "metaworld", "--tasks", "push", "--episodes", "4",
                           "--shard-size", "4", "--image-size", "16", "--workers", "1", "--no-progress", "--no-actions",
                           "--policies", "expert,noisy,perturbed", "--noise", "0.5", "--keep-failures",
                           "--max-steps", "25", "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    r = LeRobotReader(out)
    assert "action" not in r.features and "observation.state" not in r.features
    assert r.camera_keys == ["observation.images.scene", "observation.images.wrist"]
    summary = json.loads((out / "fastwam_generation.json").read_text())
    st = summary["per_task"]["push-v3"]
    assert summary["action_free"] and summary["episodes"] == 4 and st["attempted"] == 4  # failures are kept
    assert st["policies"] == {"expert": 2, "noisy": 1, "perturbed": 1}
    assert summary["failures_kept"] >= 1 and all(e.length <= 25 for e in r.episodes)  # 25 steps: push rarely ends
    assert "action-free" in proc.stderr
    assert not (tmp_path / "corpus.shards").exists() and not list(tmp_path.glob(".corpus.tmp-*"))
    ds = ClipDataset(DataConfig(dataset=str(out), image_size=(16, 16), num_frames=3, frame_stride=4,
                                action_horizon=4), actions=False)
    assert set(ds[0]) == {"video", "video_mask", "task"}


def test_a_stopped_generation_resumes_from_its_finished_shards(tmp_path, monkeypatch, capsys):
    from fastwam.data import metaworld as gen

    args = gen.GenArgs(out=tmp_path / "d", tasks="reach", episodes=4, shard_size=2, image_size=16, workers=1,
                       progress=False, max_steps=60)
    saved = []
    real_save = gen.ShardStore.save

    def save_then_stop(self, job, res):
        real_save(self, job, res)
        saved.append(job.shard)
        if len(saved) == 1:
            raise KeyboardInterrupt  # stopped right after the first shard was kept

    monkeypatch.setattr(gen.ShardStore, "save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        gen.generate(args)
    assert not (tmp_path / "d").exists() and not list(tmp_path.glob(".d.tmp-*"))  # nothing half-written
    assert [p.name for p in (tmp_path / "d.shards").glob("*.npz")] == ["reach-v3_shard0000.npz"]
    monkeypatch.setattr(gen.ShardStore, "save", real_save)
    summary = gen.generate(args)
    assert "1 of 2 shards finished before" in capsys.readouterr().err
    assert summary["episodes"] == 4 and LeRobotReader(tmp_path / "d").total_frames == summary["frames"]
    assert not (tmp_path / "d.shards").exists()
    # Other settings cannot reuse another generation's shards.
    (tmp_path / "d2.shards").mkdir()
    (tmp_path / "d2.shards" / "settings.json").write_text(json.dumps({"episodes": 99}))
    with pytest.raises(ValueError, match="holds shards of a generation with other settings"):
        gen.generate(gen.GenArgs(out=tmp_path / "d2", tasks="reach", episodes=4, shard_size=2, image_size=16,
                                 workers=1, progress=False))
