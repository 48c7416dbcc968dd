"""Closed-loop Meta-World evaluation: statistics by hand, the harness with the scripted expert, a tiny checkpoint
in-process and over the websocket server, reproducibility across worker / environment counts, the CLI."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

pytest.importorskip("metaworld")

from fastwam.eval import metaworld as mwe  # noqa: E402
from fastwam.eval import stats  # noqa: E402

TASK = "drawer-close-v3"  # short expert episodes (~80 steps), so the tiny dataset is quick to make


# ---------------------------------------------------------------------------------------------------------------------
# Statistics


def _wilson_by_hand(k: int, n: int) -> tuple[float, float]:
    z = 1.959963984540054
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


def test_wilson_matches_hand_computed_values():
    # Published / hand-computed 95 % Wilson bounds.
    assert stats.wilson_interval(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert stats.wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert stats.wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert stats.wilson_interval(42, 50) == pytest.approx((0.7149, 0.9166), abs=1e-4)
    for k, n in [(1, 3), (25, 50), (49, 50), (3, 80)]:
        assert stats.wilson_interval(k, n) == pytest.approx(_wilson_by_hand(k, n), abs=1e-12)
    # The ends are exact, n = 0 is "no information", bad input is refused.
    assert stats.wilson_interval(0, 7)[0] == 0.0 and stats.wilson_interval(7, 7)[1] == 1.0
    assert stats.wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError, match="0 <= k <= n"):
        stats.wilson_interval(5, 4)
    assert stats.rate_summary(8, 10) == {"successes": 8, "episodes": 10, "success_rate": 0.8,
                                         "ci95": list(stats.wilson_interval(8, 10))}


def test_bootstrap_difference_intervals():
    same = stats.bootstrap_diff_ci([(20, 40), (30, 40)], [(20, 40), (30, 40)], n_boot=2000)
    assert same["diff"] == 0 and same["ci95"][0] < 0 < same["ci95"][1]
    far = stats.bootstrap_diff_ci({"a": (45, 50), "b": (40, 50)}, {"b": (5, 50), "a": (10, 50)}, n_boot=2000)
    assert far["diff"] == pytest.approx(0.7) and far["ci95"][0] > 0.5 and far["p_boot"] < 0.01
    # Same layouts in both arms, one extra success: the paired interval is far narrower than the unpaired one.
    rng = np.random.default_rng(0)
    a = [rng.random(50) < 0.6 for _ in range(3)]
    b = [x.copy() for x in a]
    b[0][np.flatnonzero(~a[0])[:3]] = True
    paired = stats.bootstrap_diff_ci(b, a, paired=True, n_boot=2000)
    unpaired = stats.bootstrap_diff_ci(b, a, n_boot=2000)
    assert paired["diff"] == pytest.approx(0.02)
    assert paired["ci95"][0] >= 0 and paired["ci95"][1] - paired["ci95"][0] < (unpaired["ci95"][1] -
                                                                                unpaired["ci95"][0]) / 2
    with pytest.raises(ValueError, match="paired"):
        stats.bootstrap_diff_ci([(1, 2)], [(1, 2)], paired=True)
    with pytest.raises(ValueError, match="different cells"):
        stats.bootstrap_diff_ci({"a": (1, 2)}, {"b": (1, 2)})


def test_markdown_tables():
    table = stats.success_table({"t1": {"fast": (8, 10), "joint": (10, 10)}, "t2": {"fast": (0, 10)}})
    lines = table.strip().splitlines()
    assert lines[0] == "| task | fast | joint |" and lines[1] == "|:---|---:|---:|"
    assert "80.0 [49.0, 94.3] (8/10)" in lines[2] and "| - |" in lines[3]
    assert lines[4].startswith("| mean over rows") and "40.0" in lines[4] and "(8/20)" in lines[4]
    assert stats.markdown_table(["a|b"], [["x"]]).splitlines()[0] == "| a\\|b |"


# ---------------------------------------------------------------------------------------------------------------------
# The harness with Meta-World's scripted expert


def test_scripted_expert_scores_near_100_through_the_harness(tmp_path):
    tasks = ["drawer-close-v3", "button-press-topdown-v3", "reach-v3"]
    res = mwe.evaluate("scripted", tasks, episodes=3, seeds=[0], workers=1, num_envs=3, video_episodes=0,
                       max_steps=200, out_dir=tmp_path, progress=False)
    s = res["summary"]["scripted"]
    assert s["pooled"]["episodes"] == 9
    assert s["pooled"]["successes"] >= 8, res["cells"]  # docs/reference.md, "Meta-World measurements": 100 %
    assert res["config"]["harness_check_only"] is True
    assert all(c["env_seed"] == mwe.EVAL_SEED_BASE for c in res["cells"])
    assert all(0 < n < 200 for c in res["cells"] for n, ok in zip(c["episode_length"], c["episode_success"]) if ok)
    assert "harness check" in (tmp_path / "summary.md").read_text()
    # the episode's highest shaped reward: Meta-World's rewards run 0-10, and a solved episode got far along them
    rewards = [(r, ok) for c in res["cells"] for r, ok in zip(c["episode_max_reward"], c["episode_success"])]
    assert len(rewards) == 9 and all(0.0 <= r <= 10.0 for r, _ in rewards)
    assert all(r > 5.0 for r, ok in rewards if ok)


def test_progress_tells_apart_policies_that_all_fail():
    """With too few steps to succeed, the expert still climbs Meta-World's shaped reward; zero actions do not."""
    runs = {p: mwe.evaluate(p, ["pick-place-v3"], episodes=2, seeds=[0], workers=0, num_envs=2, video_episodes=0,
                            max_steps=35, progress=False)["cells"][0] for p in ("scripted", "zero")}
    assert runs["scripted"]["episode_success"] == runs["zero"]["episode_success"] == [0, 0]
    # measured: expert 0.15-0.19 (reaching for the object), zero actions 0.003-0.023
    assert min(runs["scripted"]["episode_max_reward"]) > 4 * max(runs["zero"]["episode_max_reward"])


def test_episodes_do_not_depend_on_workers_or_env_count():
    """Episode i of a seed is the same layout whichever slot / process runs it: the expert's lengths match."""
    one = mwe.evaluate("scripted", [TASK], episodes=4, seeds=[1], workers=0, num_envs=1, video_episodes=0,
                       max_steps=200, progress=False)
    many = mwe.evaluate("scripted", [TASK], episodes=4, seeds=[1], workers=2, num_envs=3, video_episodes=0,
                        max_steps=200, progress=False)
    assert one["cells"][0]["episode_length"] == many["cells"][0]["episode_length"]
    assert len(set(one["cells"][0]["episode_length"])) > 1  # different layouts really are different episodes


# ---------------------------------------------------------------------------------------------------------------------
# A tiny checkpoint trained on real (tiny) Meta-World demos


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from fastwam.config import get_preset
    from fastwam.data.metaworld import GenArgs, generate
    from fastwam.train import train

    root = tmp_path_factory.mktemp("tiny_mw")
    cfg = get_preset("tiny")  # 8x8 images: the demos are rendered at that size
    generate(GenArgs(out=root / "data", tasks=TASK, episodes=2, image_size=cfg.data.image_size[0], workers=0,
                     shard_size=2, progress=False))
    cfg = cfg.replace(data=dataclasses.replace(cfg.data, dataset=str(root / "data")),
                      train=dataclasses.replace(cfg.train, steps=2, save_every=2, batch_size=2))
    return train(cfg, root / "run", progress=False).checkpoint


def _check_results_file(out, modes, batch):
    from fastwam.eval.metaworld_results import load_results

    outcome = json.loads((out / "results.json").read_text())
    # results.json holds what the policy did; every wall-clock measurement is in timing.json beside it.
    assert set(outcome) >= {"config", "cells", "summary", "videos"} and not {"latency", "throughput"} & set(outcome)
    assert not any("latency" in c for c in outcome["cells"])
    assert not any("rollout_s" in v for v in outcome["summary"].values())
    assert all(v.startswith("videos/") for v in outcome["videos"])
    res = load_results(out)
    assert set(res) >= {"config", "cells", "summary", "latency", "throughput", "videos"}
    assert res["config"]["cameras"] == ["scene", "wrist"] and res["config"]["image_size"] == [8, 8]
    assert [c["mode"] for c in res["cells"]] == modes
    for c in res["cells"]:
        assert c["episodes"] == 2 and c["task"] == TASK and c["env_seed"] == mwe.EVAL_SEED_BASE
        assert c["ci95"] == pytest.approx(list(stats.wilson_interval(c["successes"], 2)))
        assert len(c["episode_length"]) == 2 and all(1 <= n <= 12 for n in c["episode_length"])
        assert c["mean_episode_length"] == pytest.approx(np.mean(c["episode_length"]))
        assert c["latency"]["calls"] > 0 and c["latency"]["infer_batch_ms_p50"] > 0
        assert c["latency"]["per_obs_ms_p50"] <= c["latency"]["infer_batch_ms_p50"]
    for m in modes:
        assert 0 <= res["summary"][m]["mean_success_rate"] <= 1 and res["latency"][m]["mean_batch"] == batch
    assert res["throughput"]["env_steps"] == sum(sum(c["episode_length"]) for c in res["cells"])
    md = (out / "summary.md").read_text()
    assert "| task | " + " | ".join(modes) + " |" in md
    return res


def test_tiny_checkpoint_eval_writes_results_and_videos(tiny_checkpoint, tmp_path):
    import imageio.v3 as iio
    import torch

    torch.set_num_threads(2)  # evaluate() drops to 1 thread beside env workers, then restores this
    try:
        res = mwe.evaluate(str(tiny_checkpoint), TASK, episodes=2, seeds=[0], mode=["fast", "joint"], max_steps=12,
                           workers=1, num_envs=2, video_episodes=1, out_dir=tmp_path, pipeline=True, progress=False)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
    # 2 envs, 1 worker: pipelined as two blocks of one env, so each policy call has a batch of 1.
    res_file = _check_results_file(tmp_path, ["fast", "joint"], batch=1)
    assert res_file["config"]["pipeline_groups"] == 2
    assert res["config"]["horizon"] == 4 and res["config"]["replan"] == 2  # K = H / 2 by default
    assert len(res["videos"]) == 2  # first episode of the task, once per mode
    for path in res["videos"]:
        frames = iio.imread(tmp_path / path)
        length = res["cells"][0]["episode_length"][0]
        assert frames.shape[0] == length + 1 and frames.shape[1] >= mwe.VIDEO_MIN_HEIGHT
    fast, joint = (iio.imread(tmp_path / p) for p in sorted(res["videos"]))  # joint_... sorts after fast_...
    assert joint.shape[2] > fast.shape[2]  # joint puts the imagined future beside the real rollout


def test_tiny_checkpoint_over_websocket_server_matches_in_process(tiny_checkpoint, tmp_path):
    from fastwam.policy import FastWAMPolicy
    from fastwam.serving.server import PolicyServer

    policy = FastWAMPolicy.from_pretrained(tiny_checkpoint, device="cpu")
    # Pipelined (2 env blocks, a worker process) here, lock-step in-process below: the episodes must not differ.
    local = mwe.evaluate(policy, TASK, episodes=2, seeds=[0], mode="joint", max_steps=12, workers=1, num_envs=2,
                         video_episodes=1, out_dir=tmp_path / "local", pipeline=True, progress=False)
    assert local["config"]["pipeline_groups"] == 2
    with PolicyServer(policy, "127.0.0.1", 0, max_batch=8, batch_timeout_ms=2) as server:
        remote = mwe.evaluate(None, TASK, episodes=2, seeds=[0], mode="joint", max_steps=12, workers=0, num_envs=2,
                              video_episodes=1, out_dir=tmp_path / "remote", progress=False,
                              server=f"ws://127.0.0.1:{server.port}")
    _check_results_file(tmp_path / "remote", ["joint"], batch=2)
    assert remote["config"]["policy"] == "server" and remote["config"]["pipeline_groups"] == 1
    for a, b in zip(local["cells"], remote["cells"]):
        assert a["episode_length"] == b["episode_length"] and a["episode_success"] == b["episode_success"]
    assert len(remote["videos"]) == 1  # imagined frames came over the wire too


def test_workers_against_one_server_give_the_results_of_one_worker(tiny_checkpoint, tmp_path):
    """--workers N: N simulator processes, their observations sent to one server (which micro-batches them); the
    per-episode results are those of one worker, and results.json is the same file but for the worker count."""
    import json

    from fastwam.policy import FastWAMPolicy
    from fastwam.serving.server import PolicyServer

    policy = FastWAMPolicy.from_pretrained(tiny_checkpoint, device="cpu")
    files = {}
    with PolicyServer(policy, "127.0.0.1", 0, max_batch=8, batch_timeout_ms=2) as server:
        for workers in (1, 2):
            mwe.evaluate(None, [TASK], episodes=3, seeds=[0, 1], max_steps=12, workers=workers, num_envs=4,
                         video_episodes=0, out_dir=tmp_path / f"w{workers}", progress=False,
                         server=f"ws://127.0.0.1:{server.port}")
            files[workers] = json.loads((tmp_path / f"w{workers}" / "results.json").read_text())
    assert files[2]["config"].pop("workers") == 2 and files[1]["config"].pop("workers") == 1
    assert files[1] == files[2]


def test_demonstration_seeds_are_refused():
    class Fake(mwe._Zero):
        demo_seeds = {TASK: {mwe.env_seed_for(3)}}

    with pytest.raises(ValueError, match="used for the demonstrations"):
        mwe._check_seeds(Fake(4), [TASK], [0, 3])
    mwe._check_seeds(Fake(4), [TASK], [0, 1])  # no overlap: fine


def test_cli_baselines_and_errors(tmp_path, capsys):
    code = mwe.cli(["--policy", "zero", "--tasks", TASK, "--episodes", "2", "--seeds", "0,1", "--max-steps", "8",
                    "--workers", "0", "--num-envs", "2", "--videos", "0", "--out", str(tmp_path), "--no-progress"],
                   prog="fastwam eval metaworld")
    assert code == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["summary"]["zero"]["pooled"] == {"successes": 0, "episodes": 4, "success_rate": 0.0,
                                                "ci95": [0.0, stats.wilson_interval(0, 4)[1]]}
    assert [c["seed"] for c in res["cells"]] == [0, 1]
    assert "results:" in capsys.readouterr().out
    assert mwe.cli(["--tasks", TASK], prog="fastwam eval metaworld") == 2  # neither checkpoint nor server
    with pytest.raises(ValueError, match="50 layouts"):
        mwe.evaluate("random", TASK, episodes=51, progress=False)
    with pytest.raises(ValueError, match="unknown Meta-World task"):
        mwe.evaluate("zero", "no-such-task", episodes=1, progress=False)
    with pytest.raises(ValueError, match="replan"):
        mwe.evaluate("zero", TASK, episodes=1, replan=17, workers=0, video_episodes=0, progress=False)


def test_rollout_videos_are_h264_mp4_of_every_frame(tmp_path, recwarn):
    import av

    frames = np.random.default_rng(0).integers(0, 256, size=(9, 33, 65, 3), dtype=np.uint8)  # odd size on purpose
    path = mwe.write_video(tmp_path / "clip", frames, fps=10)
    assert path.suffix == ".mp4" and not [w for w in recwarn if "gif" in str(w.message)]
    with av.open(str(path)) as container:
        assert container.streams.video[0].codec_context.name == "h264"
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(decoded) == 9 and decoded[0].shape == (34, 66, 3)  # padded to even for yuv420p


# ---------------------------------------------------------------------------------------------------------------------
# Hierarchical bootstrap (training seeds, then episodes paired on layouts)


def _runs(rates_per_seed, cells=4, episodes=40, seed=0):
    """One dict per training seed: cell -> outcomes with (about) the given success rate, on shared layouts."""
    rng = np.random.default_rng(seed)
    return [{f"c{c}": (rng.random(episodes) < r).astype(int).tolist() for c in range(cells)} for r in rates_per_seed]


def test_hierarchical_bootstrap_without_seed_variance_is_the_episode_bootstrap():
    one = _runs([0.6])[0]
    other = _runs([0.4], seed=1)[0]
    # Three identical seeds per arm: resampling seeds changes nothing, exactly.
    h = stats.hierarchical_bootstrap([one] * 3, [other] * 3, n_boot=3000)
    flat = stats.hierarchical_bootstrap([one] * 3, [other] * 3, n_boot=3000, resample_seeds=False)
    assert h["ci95"] == flat["ci95"] and h["estimate"] == flat["estimate"]
    # ... and it is the paired episode bootstrap of `bootstrap_diff_ci` (same statistic, independent draws).
    e = stats.bootstrap_diff_ci(one, other, paired=True, n_boot=3000)
    assert h["estimate"] == pytest.approx(e["diff"])
    assert h["ci95"] == pytest.approx(e["ci95"], abs=0.015)
    assert h["per_seed_a"] == [pytest.approx(np.mean([np.mean(v) for v in one.values()]))] * 3


def test_hierarchical_bootstrap_widens_with_seed_variance():
    calm = stats.hierarchical_bootstrap(_runs([0.5, 0.5, 0.5]), _runs([0.5, 0.5, 0.5], seed=1), n_boot=3000)
    noisy = stats.hierarchical_bootstrap(_runs([0.2, 0.5, 0.8]), _runs([0.5, 0.5, 0.5], seed=1), n_boot=3000)
    width = lambda r: r["ci95"][1] - r["ci95"][0]  # noqa: E731
    assert width(noisy) > 2 * width(calm)
    assert noisy["mde80"] > 2 * calm["mde80"] and noisy["se"] > calm["se"]
    # The seeds' spread is what widens it: the same data without seed resampling is as narrow as the calm case.
    narrow = stats.hierarchical_bootstrap(_runs([0.2, 0.5, 0.8]), _runs([0.5, 0.5, 0.5], seed=1), n_boot=3000,
                                          resample_seeds=False)
    assert width(narrow) < 1.5 * width(calm)
    assert len(noisy["per_seed_a"]) == 3 and noisy["per_seed_a"][0] < noisy["per_seed_a"][2]


def test_hierarchical_bootstrap_single_rate_and_errors():
    r = stats.hierarchical_bootstrap(_runs([0.7, 0.7]), n_boot=2000)
    assert r["ci95"][0] < r["estimate"] < r["ci95"][1] and "per_seed_b" not in r
    with pytest.raises(ValueError, match="same cells"):
        stats.hierarchical_bootstrap([{"a": [1]}], [{"b": [1]}])
    with pytest.raises(ValueError, match="episode counts"):
        stats.hierarchical_bootstrap([{"a": [1, 0]}, {"a": [1]}])
    with pytest.raises(ValueError, match="paired"):
        stats.hierarchical_bootstrap([{"a": [1, 0]}], [{"a": [1]}])
    # scores in [0, 1] (e.g. progress) are outcomes too; anything outside, or NaN, is refused
    score = stats.hierarchical_bootstrap([{"a": [0.25, 0.75]}], n_boot=200)
    assert score["estimate"] == pytest.approx(0.5) and 0.25 <= score["ci95"][0] <= score["ci95"][1] <= 0.75
    for bad in ([1.5, 0.0], [float("nan"), 0.0], [-0.1, 0.0]):
        with pytest.raises(ValueError, match=r"in \[0, 1\]"):
            stats.hierarchical_bootstrap([{"a": bad}])


def test_real_time_chunking_in_process_equals_over_the_wire(tiny_checkpoint, tmp_path):
    """--async --chunking rtc with a checkpoint: the policy continues the old chunk (in process and through
    `fastwam serve`, which must give the same episodes), and --steps reaches the policy."""
    from fastwam.policy import FastWAMPolicy
    from fastwam.serving.server import PolicyServer

    policy = FastWAMPolicy.from_pretrained(tiny_checkpoint, device="cpu")
    kw = dict(episodes=2, seeds=[0], max_steps=12, workers=0, num_envs=2, video_episodes=0, progress=False,
              chunking="rtc", inference_delay=1)
    local = mwe.evaluate(policy, TASK, out_dir=tmp_path / "local", **kw)
    with PolicyServer(policy, "127.0.0.1", 0, max_batch=8, batch_timeout_ms=2) as server:
        remote = mwe.evaluate(None, TASK, out_dir=tmp_path / "remote", server=f"ws://127.0.0.1:{server.port}", **kw)
    for a, b in zip(local["cells"], remote["cells"]):
        assert a["episode_length"] == b["episode_length"] and a["episode_max_reward"] == b["episode_max_reward"]
    smooth = local["summary"]["fast"]["smoothness"]
    assert smooth == remote["summary"]["fast"]["smoothness"] and smooth["seams"] > 0
    assert np.isfinite(smooth["seam_jump"]) and local["config"]["chunking"] == "rtc"
    one = mwe.evaluate(str(tiny_checkpoint), TASK, episodes=1, seeds=[0], max_steps=4, workers=0, num_envs=1,
                       video_episodes=0, progress=False, steps=1)
    assert one["config"]["inference_steps"] == 1
