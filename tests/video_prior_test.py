"""The video prior: action-free datasets, `fastwam pretrain`, `--init-from`, and co-training with action-free clips."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from data_helpers import write_synthetic
from safetensors.torch import load_file
from train_helpers import synthetic_clips, tiny_train_config

from fastwam import checkpoint as ckpt_io
from fastwam.config import DataConfig, get_preset
from fastwam.data.clips import ClipDataset
from fastwam.data.lerobot import DatasetError
from fastwam.errors import UserError
from fastwam.model.fastwam import FastWAM
from fastwam.model.visibility import get_variant
from fastwam.model.weights import ACTION_RANDOM_PREFIXES, resize_tensor
from fastwam.train import train
from fastwam.training.steps import MixedBatches

CAMS = {"observation.images.top": (16, 16), "observation.images.wrist": (16, 16)}


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> tuple[Path, Path]:
    """(action-labelled, action-free) datasets with the same two cameras."""
    base = tmp_path_factory.mktemp("vp")
    labelled = write_synthetic(base / "labelled", lengths=(14, 12, 10), cameras=CAMS)
    video = write_synthetic(base / "video", lengths=(16, 13, 11, 9), cameras=CAMS, actions=False,
                            tasks=("open the drawer", "close the window", "push the puck to the goal"))
    return labelled, video


def _tiny(dataset: Path, steps: int = 8, **train_kw):
    cfg = tiny_train_config(steps, **train_kw)
    return cfg.replace(data=dataclasses.replace(cfg.data, dataset=str(dataset), frame_stride=2))


def _pretrain_config(cfg):
    return cfg.replace(train=dataclasses.replace(cfg.train, variant="video"),
                       model=dataclasses.replace(cfg.model, action_expert=False))


# ---------------------------------------------------------------------------------------------------------------------
# Action-free datasets


def test_action_free_dataset_loads_for_video_and_is_refused_for_actions(datasets):
    _, video = datasets
    cfg = DataConfig(dataset=str(video), image_size=(8, 8), num_frames=3, frame_stride=2, action_horizon=4)
    ds = ClipDataset(cfg, actions=False)
    item = ds[0]
    assert set(item) == {"video", "video_mask", "task"} and item["video"].shape == (3, 3, 8, 16)
    assert ds.stats is None and len(ds) == 16 + 13 + 11 + 9
    with pytest.raises(DatasetError, match=r"'action' not found.*action-free, video-only dataset.*fastwam pretrain"):
        ClipDataset(cfg)


def test_train_cli_refuses_an_action_free_dataset_in_one_line(datasets, tmp_path):
    _, video = datasets
    proc = subprocess.run([sys.executable, "-m", "fastwam", "train", "--preset", "tiny", "--dataset", str(video),
                           "--out", str(tmp_path / "run"), "--steps", "2", "--no-progress"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "action-free, video-only dataset" in lines[0], proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


# ---------------------------------------------------------------------------------------------------------------------
# fastwam pretrain


@pytest.fixture(scope="module")
def prior(datasets, tmp_path_factory) -> tuple[Path, list[dict]]:
    _, video = datasets
    out = tmp_path_factory.mktemp("prior") / "run"
    cfg = _pretrain_config(_tiny(video, steps=40, lr=3e-3))
    result = train(cfg, out, progress=False)
    return out, result.losses


def test_pretraining_loss_falls_and_the_prior_has_no_action_expert(prior):
    out, losses = prior
    video = [e["video"] for e in losses]
    assert all(e["action"] == 0.0 for e in losses)
    assert sum(video[-5:]) / 5 < 0.7 * sum(video[:5]) / 5, video
    ckpt = ckpt_io.resolve_checkpoint(out)
    keys = load_file(ckpt / ckpt_io.WEIGHTS)
    assert keys and all(k.startswith("video.") for k in keys)
    assert not (ckpt / ckpt_io.NORM_STATS).exists()
    cfg = ckpt_io.load_config(ckpt)
    assert cfg.model.action_expert is False and cfg.train.variant == "video"


def test_a_video_prior_cannot_be_served(prior):
    from fastwam.validate import load_checked

    with pytest.raises(ckpt_io.CheckpointError, match="video prior.*--init-from"):
        load_checked(prior[0])


def test_pretrain_resumes(datasets, tmp_path):
    _, video = datasets
    cfg = _pretrain_config(_tiny(video, steps=8))
    full = train(cfg, tmp_path / "full", progress=False)
    train(cfg, tmp_path / "split", progress=False, stop_at=4)
    train(cfg, tmp_path / "split", resume=True, progress=False)
    a, b = (ckpt_io.resolve_checkpoint(p) / ckpt_io.WEIGHTS for p in (full.run_dir, tmp_path / "split"))
    assert a.read_bytes() == b.read_bytes()


# ---------------------------------------------------------------------------------------------------------------------
# --init-from


def test_init_from_copies_the_video_expert_and_interpolates_the_action_expert(datasets, prior, tmp_path):
    labelled, _ = datasets
    src = ckpt_io.resolve_checkpoint(prior[0])
    video_sd = {k[len("video."):]: v for k, v in load_file(src / ckpt_io.WEIGHTS).items()}
    cfg = _tiny(labelled, steps=1)
    cfg = cfg.replace(train=dataclasses.replace(cfg.train, init_from=str(prior[0]), lr=0.0))
    train(cfg, tmp_path / "run", progress=False)  # lr 0: the weights stay the initialisation (Adam moves nothing)
    ckpt = ckpt_io.resolve_checkpoint(tmp_path / "run")
    weights = load_file(ckpt / ckpt_io.WEIGHTS)
    for k, v in video_sd.items():
        assert torch.equal(weights[f"video.{k}"], v), k
    interpolated = [k for k in weights if k.startswith("action.") and not k[7:].startswith(ACTION_RANDOM_PREFIXES)]
    assert interpolated
    for k in interpolated:
        expected = resize_tensor(video_sd[k[len("action."):]], tuple(weights[k].shape))
        assert torch.equal(weights[k], expected), k
    recorded = ckpt_io.load_config(ckpt).train
    assert recorded.init_from == str(prior[0]) and recorded.init_from_step == 40
    assert len(recorded.init_from_sha256) == 64
    assert ckpt_io.load_config(ckpt).codec == ckpt_io.load_config(src).codec


def test_init_action_random_leaves_the_action_expert_unrelated(datasets, prior, tmp_path):
    labelled, _ = datasets
    cfg = _tiny(labelled, steps=1)
    cfg = cfg.replace(train=dataclasses.replace(cfg.train, init_from=str(prior[0]), init_action="random", lr=0.0))
    train(cfg, tmp_path / "run", progress=False)
    weights = load_file(ckpt_io.resolve_checkpoint(tmp_path / "run") / ckpt_io.WEIGHTS)
    fresh = FastWAM(ckpt_io.load_config(tmp_path / "run").model)
    video = weights["video.blocks.0.attn1.to_q.weight"]
    action = weights["action.blocks.0.attn1.to_q.weight"]
    assert not torch.equal(action, resize_tensor(video, tuple(action.shape)))
    assert action.shape == fresh.action.blocks[0].attn1.to_q.weight.shape


def test_init_from_shape_mismatch_names_the_tensor(datasets, prior, tmp_path):
    labelled, _ = datasets
    cfg = _tiny(labelled, steps=1)
    cfg = cfg.replace(model=dataclasses.replace(cfg.model, video_ffn_dim=48),
                      train=dataclasses.replace(cfg.train, init_from=str(prior[0])))
    with pytest.raises(UserError, match=r"video\.blocks\.0\.ffn\.\S+ is \(\d+, \d+\) in the source and"):
        train(cfg, tmp_path / "run", progress=False)
    with pytest.raises(UserError, match="no fastwam checkpoint"):
        train(cfg.replace(train=dataclasses.replace(cfg.train, init_from=str(tmp_path))), tmp_path / "r2",
              progress=False)


def test_init_from_resume_does_not_need_the_source(datasets, prior, tmp_path):
    import shutil

    labelled, _ = datasets
    source = tmp_path / "source"
    shutil.copytree(prior[0], source)
    cfg = _tiny(labelled, steps=6)
    cfg = cfg.replace(train=dataclasses.replace(cfg.train, init_from=str(source)))
    full = train(cfg, tmp_path / "full", progress=False)
    train(cfg, tmp_path / "split", progress=False, stop_at=4)
    shutil.rmtree(source)
    train(cfg, tmp_path / "split", resume=True, progress=False)
    a, b = (ckpt_io.resolve_checkpoint(p) / ckpt_io.WEIGHTS for p in (full.run_dir, tmp_path / "split"))
    assert a.read_bytes() == b.read_bytes()


# ---------------------------------------------------------------------------------------------------------------------
# Action-free clips in a policy's batch


def _batch(b=4, generator_seed=0):
    cfg = get_preset("tiny").model
    g = torch.Generator().manual_seed(generator_seed)
    return cfg, {"latents": torch.randn(b, cfg.latent_channels, 3, 4, 4, generator=g),
                 "actions": torch.randn(b, cfg.action_horizon, cfg.action_dim, generator=g),
                 "state": torch.randn(b, cfg.state_dim, generator=g),
                 "text": torch.randn(b, 4, cfg.text_dim, generator=g)}


def _grads(model, inputs, labelled, variant="fast"):
    model.zero_grad(set_to_none=True)
    out = model.loss(**inputs, variant=get_variant(variant), generator=torch.Generator().manual_seed(3),
                     labelled=labelled)
    out.total.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("variant", ["fast", "joint", "idm"])
def test_action_free_clips_never_reach_the_action_loss(variant):
    cfg, inputs = _batch()
    torch.manual_seed(0)
    model = FastWAM(cfg)
    labelled = torch.tensor([True, False, True, False])
    out, grads = _grads(model, inputs, labelled, variant)
    poisoned = {**inputs, "actions": inputs["actions"].clone(), "state": inputs["state"].clone()}
    poisoned["actions"][~labelled] = float("nan")  # whatever an action-free clip holds, it is not read
    poisoned["state"][~labelled] = 1e6
    out2, grads2 = _grads(model, poisoned, labelled, variant)
    assert torch.equal(out.total, out2.total) and torch.equal(out.action, out2.action)
    assert grads.keys() == grads2.keys()
    for k in grads:
        assert torch.equal(grads[k], grads2[k]), k
    # The action loss is the mean over the labelled clips alone: the same as a batch of just those clips (whose
    # video loss differs only through the batch mean, so compare the action loss).
    alone = {k: v[labelled] for k, v in inputs.items()}
    noise_gen = torch.Generator().manual_seed(3)
    from fastwam.model.fastwam import TrainingNoise

    noise = TrainingNoise.draw(get_variant(variant), inputs["latents"].shape, inputs["actions"].shape, noise_gen)
    full = model.loss(**inputs, variant=get_variant(variant), noise=noise, labelled=labelled)
    values = [getattr(noise, f.name) for f in dataclasses.fields(noise)]
    sub = TrainingNoise(*[None if t is None else t[labelled] for t in values])
    part = model.loss(**alone, variant=get_variant(variant), noise=sub)
    torch.testing.assert_close(full.action, part.action)


def test_a_batch_of_only_action_free_clips_leaves_the_action_expert_unchanged():
    cfg, inputs = _batch()
    torch.manual_seed(0)
    model = FastWAM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    # A labelled step first, so the optimiser has momentum for every parameter.
    _grads(model, inputs, torch.ones(4, dtype=torch.bool))
    opt.step()
    frozen = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("action.", "state_proj."))}
    video_before = model.video.proj_out.weight.clone()
    opt.zero_grad(set_to_none=True)
    _, grads = _grads(model, inputs, torch.zeros(4, dtype=torch.bool))
    assert not any(k.startswith(("action.", "state_proj.")) for k in grads)
    opt.step()
    for k, v in frozen.items():
        assert torch.equal(model.state_dict()[k], v), k
    assert not torch.equal(model.video.proj_out.weight, video_before)  # the video expert did learn


def test_mixed_batches_are_exact_and_deterministic():
    mix = MixedBatches(labelled_size=10, video_size=7, batch=8, ratio=0.25, seed=3)
    assert (mix.labelled, mix.video) == (6, 2)
    for step in range(12):
        batch = mix.indices(step)
        assert sum(free for free, _ in batch) == 2 and len(batch) == 8
        assert all(0 <= i < (7 if free else 10) for free, i in batch)
    again = MixedBatches(10, 7, 8, 0.25, 3)
    assert [again.indices(s) for s in range(5)] == [mix.indices(s) for s in range(5)]
    assert MixedBatches(10, 7, 8, 0.25, 4).indices(0) != mix.indices(0)
    for ratio in (0.0, 1.0, 0.01):
        with pytest.raises(ValueError, match="video_ratio"):
            MixedBatches(10, 7, 8, ratio, 0)


def test_video_dataset_cotraining_logs_its_mix_and_resumes_exactly(datasets, tmp_path):
    labelled, video = datasets
    cfg = _tiny(labelled, steps=6)
    cfg = cfg.replace(data=dataclasses.replace(cfg.data, video_dataset=str(video), video_ratio=0.5))
    full = train(cfg, tmp_path / "full", progress=False)
    assert all((e["clips_labelled"], e["clips_action_free"]) == (2, 2) for e in full.losses)
    train(cfg, tmp_path / "split", progress=False, stop_at=3)
    train(cfg, tmp_path / "split", resume=True, progress=False)
    a, b = (ckpt_io.resolve_checkpoint(p) / ckpt_io.WEIGHTS for p in (full.run_dir, tmp_path / "split"))
    assert a.read_bytes() == b.read_bytes()
    logged = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in logged] == list(range(1, 7))


def test_video_dataset_with_other_cameras_is_refused(datasets, tmp_path):
    labelled, _ = datasets
    other = write_synthetic(tmp_path / "other", lengths=(9, 8), cameras={"observation.images.front": (16, 16)},
                            actions=False)
    cfg = _tiny(labelled, steps=2)
    cfg = cfg.replace(data=dataclasses.replace(cfg.data, video_dataset=str(other)))
    with pytest.raises(DatasetError, match="--video-dataset.*unknown camera"):
        train(cfg, tmp_path / "run", progress=False)


def test_synthetic_dataset_still_trains_without_a_mix(tmp_path):
    cfg = tiny_train_config(2)
    result = train(cfg, tmp_path / "run", dataset=synthetic_clips(cfg), progress=False)
    assert "clips_labelled" not in result.losses[-1]


def test_the_commands(datasets, tmp_path, capsys):
    """`fastwam pretrain`, then `fastwam train --init-from --video-dataset`, from the command line."""
    from fastwam.cli import main

    labelled, video = datasets
    common = ["--preset", "tiny", "--steps", "2", "--no-progress", "--config.data.frame-stride", "2",
              "--config.train.batch-size", "4"]
    assert main(["pretrain", "--dataset", str(video), "--out", str(tmp_path / "prior"), *common]) == 0
    assert main(["train", "--dataset", str(labelled), "--out", str(tmp_path / "policy"), "--init-from",
                 str(tmp_path / "prior"), "--init-action", "random", "--video-dataset", str(video), "--video-ratio",
                 "0.25", *common]) == 0
    cfg = ckpt_io.load_config(tmp_path / "policy")
    assert cfg.train.init_from == str(tmp_path / "prior") and cfg.train.init_action == "random"
    assert cfg.data.video_dataset == str(video) and cfg.data.video_ratio == 0.25 and cfg.model.action_expert
    err = capsys.readouterr().err
    assert "init-from" in err and "1 action-free clips" in err
    for argv, says in ((["train", "--dataset", str(labelled), "--out", str(tmp_path / "x"), "--variant", "video"],
                        "fastwam pretrain"),
                       (["train", "--dataset", str(labelled), "--out", str(tmp_path / "x"), "--init-action", "random"],
                        "--init-action needs --init-from"),
                       (["train", "--dataset", str(labelled), "--out", str(tmp_path / "x"), "--video-ratio", "0.5"],
                        "--video-ratio needs --video-dataset"),
                       (["serve", "--checkpoint", str(tmp_path / "prior"), "--port", "0"], "video prior")):
        assert main(argv + (common[:2] if argv[0] == "train" else [])) == 2
        assert says in capsys.readouterr().err
