"""`fastwam distill`: a few-step fast sampler distilled from a trained run (training/distill.py)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import synthetic_clips, tiny_train_config

from fastwam import checkpoint as ckpt_io
from fastwam.errors import UserError
from fastwam.loading import load_model
from fastwam.model import flow
from fastwam.model.encoders import build_codec, build_text_encoder
from fastwam.model.fastwam import FastWAM
from fastwam.train import train
from fastwam.training import distill
from fastwam.training.steps import prepare_batch

TEACHER_STEPS = 10


def _teacher_config():
    cfg = tiny_train_config(40, lr=3e-3)
    return cfg.replace(inference=dataclasses.replace(cfg.inference, steps=TEACHER_STEPS))


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    cfg = _teacher_config()
    out = tmp_path_factory.mktemp("distill") / "teacher"
    train(cfg, out, dataset=synthetic_clips(cfg), progress=False)
    return out


def _student_config(teacher: Path, steps: int = 1, train_steps: int = 40, **kw):
    ckpt = ckpt_io.resolve_checkpoint(teacher)
    return distill.student_config(ckpt_io.load_config(ckpt), str(ckpt), steps, TEACHER_STEPS, train_steps, **kw)


@pytest.fixture(scope="module")
def distilled(teacher, tmp_path_factory):
    cfg = _student_config(teacher, steps=1, train_steps=40)
    out = tmp_path_factory.mktemp("distill") / "student"
    result = train(cfg, out, dataset=synthetic_clips(cfg), progress=False)
    return out, result


def _observations(cfg, n: int = 8):
    """n clips of the training set as the sampler takes them: (first latent, text, state), and fixed noise."""
    ds = synthetic_clips(cfg)
    batch = ds.collate([ds[i] for i in range(n)])
    inputs = prepare_batch(batch, build_codec(cfg.codec), build_text_encoder(cfg.text, cfg.model.text_dim), "cpu")
    noise = torch.randn(n, cfg.model.action_horizon, cfg.model.action_dim, generator=torch.Generator().manual_seed(7))
    return inputs["latents"][:, :, :1], inputs["text"], inputs["state"], noise


def _chunk(model: FastWAM, obs, steps: int) -> torch.Tensor:
    first, text, state, noise = obs
    return model.sample(first, text, state, mode="fast", steps=steps, action_noise=noise).actions


def test_teacher_trajectory_ends_on_the_teachers_own_chunk(teacher):
    """N = 1, 10 teacher steps: the target is the teacher's ordinary 10-step chunk, bit for bit; N = 2 lands there
    too (the same path, on the student's noise levels)."""
    model = load_model(teacher)
    cfg = ckpt_io.load_config(teacher)
    obs = _observations(cfg, 4)
    reference = _chunk(model, obs, TEACHER_STEPS)
    states, sigmas, _ = distill.teacher_trajectory(model, *obs, student_steps=1, teacher_steps=TEACHER_STEPS,
                                                   shift=cfg.inference.shift)
    assert states.shape == (2, *reference.shape) and torch.equal(states[0], obs[3])
    assert torch.equal(states[-1], reference)
    assert torch.equal(sigmas, flow.euler_sigmas(1, cfg.inference.shift))
    states, sigmas, _ = distill.teacher_trajectory(model, *obs, student_steps=2, teacher_steps=TEACHER_STEPS,
                                                   shift=cfg.inference.shift)
    torch.testing.assert_close(states[-1], reference, atol=1e-6, rtol=0)
    assert torch.equal(sigmas, flow.euler_sigmas(2, cfg.inference.shift))
    fine, bounds = distill.teacher_schedule(3, TEACHER_STEPS, cfg.inference.shift)  # 3 does not divide 10: 4 each
    assert bounds == [0, 4, 8, 12] and torch.equal(fine[bounds], flow.euler_sigmas(3, cfg.inference.shift))


def test_distillation_loss_falls(distilled):
    _, result = distilled
    losses = [e["loss"] for e in result.losses]
    assert len(losses) == 40 and all(e["video"] == 0.0 and e["action"] == e["loss"] for e in result.losses)
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses


def test_the_distilled_one_step_chunk_is_closer_to_the_teachers_ten_step_chunk(teacher, distilled):
    student_run, _ = distilled
    teacher_model, student = load_model(teacher), load_model(student_run)
    cfg = ckpt_io.load_config(student_run)
    assert cfg.inference.steps == 1 and cfg.train.distill_from == str(ckpt_io.resolve_checkpoint(teacher))
    obs = _observations(cfg)
    reference = _chunk(teacher_model, obs, TEACHER_STEPS)
    undistilled = (_chunk(teacher_model, obs, 1) - reference).pow(2).mean().item()
    after = (_chunk(student, obs, 1) - reference).pow(2).mean().item()
    assert after < 0.2 * undistilled, (after, undistilled)


def test_only_the_action_expert_changes(teacher, distilled):
    student_run, _ = distilled
    before = load_file(ckpt_io.resolve_checkpoint(teacher) / ckpt_io.WEIGHTS)
    after = load_file(ckpt_io.resolve_checkpoint(student_run) / ckpt_io.WEIGHTS)
    assert before.keys() == after.keys()
    frozen = [k for k in before if not k.startswith("action.")]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("action."))


def test_a_teacher_with_an_ema_keeps_both_video_experts(tmp_path):
    """Student = teacher's weights, student EMA = teacher's EMA; neither video expert moves (the EMA update skips
    frozen tensors), the action expert of both does."""
    cfg = tiny_train_config(4, ema_decay=0.5)
    train(cfg, tmp_path / "teacher", dataset=synthetic_clips(cfg), progress=False)
    ckpt = ckpt_io.resolve_checkpoint(tmp_path / "teacher")
    student = distill.student_config(ckpt_io.load_config(ckpt), str(ckpt), 1, 3, 3)
    train(student, tmp_path / "student", dataset=synthetic_clips(cfg), progress=False)
    out = ckpt_io.resolve_checkpoint(tmp_path / "student")
    for name in (ckpt_io.WEIGHTS, ckpt_io.EMA):
        before, after = load_file(ckpt / name), load_file(out / name)
        assert all(torch.equal(before[k], after[k]) for k in before if not k.startswith("action."))
        assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("action."))
    teacher_ema = load_file(ckpt / ckpt_io.EMA)
    teacher_model = load_file(ckpt / ckpt_io.WEIGHTS)
    assert any(not torch.equal(teacher_ema[k], v) for k, v in teacher_model.items() if k.startswith("video."))


def test_distillation_resumes_exactly(teacher, tmp_path):
    cfg = _student_config(teacher, steps=2, train_steps=6)
    full = train(cfg, tmp_path / "full", dataset=synthetic_clips(cfg), progress=False)
    train(cfg, tmp_path / "split", dataset=synthetic_clips(cfg), progress=False, stop_at=3)
    train(cfg, tmp_path / "split", resume=True, dataset=synthetic_clips(cfg), progress=False)
    a, b = (ckpt_io.resolve_checkpoint(p) / ckpt_io.WEIGHTS for p in (full.run_dir, tmp_path / "split"))
    assert a.read_bytes() == b.read_bytes()


def test_resume_refuses_a_teacher_whose_weights_changed(teacher, tmp_path):
    copy = tmp_path / "teacher"
    shutil.copytree(teacher, copy)
    cfg = _student_config(copy, train_steps=4)
    train(cfg, tmp_path / "student", dataset=synthetic_clips(cfg), progress=False, stop_at=2)
    ckpt = ckpt_io.resolve_checkpoint(copy)
    model = load_model(copy)
    with torch.no_grad():
        next(model.action.parameters()).add_(1.0)
    ckpt_io._save_tensors(ckpt_io._state_dict_for_save(model), ckpt / ckpt_io.WEIGHTS)
    with pytest.raises(UserError, match="weights changed since this run recorded them"):
        train(cfg, tmp_path / "student", resume=True, dataset=synthetic_clips(cfg), progress=False)


def test_the_command(teacher, tmp_path, capsys):
    from fastwam.cli import main

    prior = tmp_path / "prior"
    cfg = _teacher_config()
    prior_cfg = cfg.replace(train=dataclasses.replace(cfg.train, variant="video"),
                            model=dataclasses.replace(cfg.model, action_expert=False))
    ckpt_io.save_checkpoint(prior, 1, prior_cfg, FastWAM(prior_cfg.model))
    out = str(tmp_path / "student")
    for argv, says in (([str(prior)], "video prior"),
                       ([str(teacher), "--steps", "0"], "--steps 0"),
                       ([str(teacher), "--steps", str(TEACHER_STEPS)], "fewer steps than its teacher's 10"),
                       ([str(tmp_path / "nothing")], "no fastwam checkpoint there")):
        assert main(["distill", "--checkpoint", *argv, "--out", out, "--synthetic", "--no-progress"]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and says in lines[0], lines
    assert not Path(out).exists()
    assert main(["distill", "--checkpoint", str(teacher), "--out", out, "--steps", "2", "--train-steps", "2",
                 "--batch-size", "4", "--synthetic", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "distill loss" in printed and "checkpoint:" in printed
    cfg = ckpt_io.load_config(out)
    teacher_ckpt = ckpt_io.resolve_checkpoint(teacher)
    tc = cfg.train
    assert (tc.distill_from, tc.distill_steps, tc.distill_teacher_steps) == (str(teacher_ckpt), 2, TEACHER_STEPS)
    assert tc.distill_teacher_step == 40 and tc.distill_teacher_sha256 == distill.file_sha256(
        teacher_ckpt / ckpt_io.WEIGHTS)
    assert cfg.inference.steps == 2 and tc.steps == 2 and cfg.model == ckpt_io.load_config(teacher).model
    from fastwam.policy import FastWAMPolicy

    assert FastWAMPolicy.from_pretrained(out).steps == 2  # a distilled run serves with the steps it was made for


GLOO_SCRIPT = """
import json, sys
import torch
torch.set_num_threads(1)
from fastwam import checkpoint as ckpt_io
from fastwam.data.synthetic import SyntheticClips
from fastwam.train import train
from fastwam.training import distill
ckpt = ckpt_io.resolve_checkpoint(sys.argv[2])
cfg = distill.student_config(ckpt_io.load_config(ckpt), str(ckpt), 2, 10, 3, batch_size=4)
res = train(cfg, sys.argv[1], dataset=SyntheticClips(cfg.data, num_clips=16), progress=False, log_all_steps=True)
if res.losses:
    print("LOSSES", json.dumps([e["loss"] for e in res.losses]))
"""


def test_two_process_gloo_distillation_matches_one_process(teacher, tmp_path):
    """DDP: the student's loss runs through the wrapped module; 2 ranks x 2 clips = 1 rank x 4 clips."""
    script = tmp_path / "run.py"
    script.write_text(GLOO_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    outs = {}
    for n in (1, 2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n), str(script),
               str(tmp_path / f"run{n}"), str(teacher)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
        assert proc.returncode == 0, proc.stderr[-3000:]
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("LOSSES")][0]
        outs[n] = json.loads(line.split(" ", 1)[1])
    assert len(outs[1]) == 3
    assert max(abs(a - b) for a, b in zip(outs[1], outs[2])) <= 1e-6, outs
    a, b = (load_file(ckpt_io.resolve_checkpoint(tmp_path / f"run{n}") / ckpt_io.WEIGHTS) for n in (1, 2))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
