"""Contracts of the training loop: every variant trains; resume is exact; checkpoints survive kills; DDP == 1 proc."""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import pytest
from safetensors.torch import load_file
from train_helpers import synthetic_clips as _data
from train_helpers import tiny_train_config as _cfg

from fastwam import checkpoint as ckpt_io
from fastwam.config import get_preset
from fastwam.model.fastwam import FastWAM
from fastwam.train import StepBatches, lr_scale, train


@pytest.mark.parametrize("variant", ["fast", "joint", "idm", "no_cotrain"])
def test_each_variant_trains_with_finite_falling_loss(tmp_path, variant):
    cfg = _cfg(steps=40, variant=variant, lr=3e-3, warmup_frac=0.0)
    res = train(cfg, tmp_path / variant, dataset=_data(cfg), progress=False, log_all_steps=True)
    losses = [e["loss"] for e in res.losses]
    assert len(losses) == 40 and all(map(lambda x: x == x and abs(x) < 1e6, losses))
    first, last = sum(losses[:8]) / 8, sum(losses[-8:]) / 8
    assert last < first, (variant, first, last)
    if variant == "no_cotrain":
        assert all(e["video"] == 0 for e in res.losses)
    else:
        assert all(e["video"] > 0 for e in res.losses)


def test_dct_codec_statistics_are_fitted_on_the_data_and_stored(tmp_path):
    from fastwam.config import CodecConfig
    from fastwam.policy import FastWAMPolicy

    cfg = _cfg(steps=4).replace(codec=CodecConfig(kind="dct", space_factor=2, dct_diagonals=2))
    train(cfg, tmp_path / "run", dataset=_data(cfg), progress=False)
    saved = ckpt_io.load_config(ckpt_io.resolve_checkpoint(tmp_path / "run"))
    assert saved.model.latent_channels == 9 and len(saved.codec.latents_std) == 9
    assert all(s > 0 for s in saved.codec.latents_std)
    # The policy rebuilds exactly that codec from the checkpoint alone.
    policy = FastWAMPolicy.from_pretrained(tmp_path / "run")
    assert policy.codec.std.tolist() == pytest.approx(list(saved.codec.latents_std))
    # Resuming keeps the stored statistics even if the data changed meanwhile.
    train(cfg.replace(train=dataclasses.replace(cfg.train, steps=8)), tmp_path / "run",
          dataset=_data(cfg, n=9), progress=False, resume=True)
    resumed = ckpt_io.load_config(ckpt_io.resolve_checkpoint(tmp_path / "run"))
    assert resumed.codec == saved.codec


def test_resume_equals_straight_run(tmp_path):
    cfg = _cfg(steps=8)
    data = _data(cfg)
    straight = train(cfg, tmp_path / "straight", dataset=data, progress=False, log_all_steps=True)
    half = train(cfg, tmp_path / "resumed", dataset=data, progress=False, log_all_steps=True, stop_at=4)
    rest = train(cfg, tmp_path / "resumed", resume=True, dataset=data, progress=False, log_all_steps=True)
    assert half.step == 4 and rest.step == 8
    resumed_losses = [e["loss"] for e in half.losses + rest.losses]
    straight_losses = [e["loss"] for e in straight.losses]
    assert max(abs(a - b) for a, b in zip(resumed_losses, straight_losses)) <= 1e-6
    a = load_file(str(straight.checkpoint / "model.safetensors"))
    b = load_file(str(rest.checkpoint / "model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    # A resume with a different model shape is refused with a clear message.
    bad = cfg.replace(model=dataclasses.replace(cfg.model, num_layers=3))
    with pytest.raises(ckpt_io.CheckpointError, match="model.num_layers: 2 -> 3"):
        train(bad, tmp_path / "resumed", resume=True, dataset=data, progress=False)


def test_checkpoint_round_trip_and_retention(tmp_path):
    cfg = _cfg(steps=12)
    res = train(cfg, tmp_path / "run", dataset=_data(cfg), progress=False)
    steps = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*"))
    assert steps == ["step_0000008", "step_0000012"]  # keep_last = 2
    ck = ckpt_io.resolve_checkpoint(tmp_path / "run")
    assert ck == res.checkpoint
    saved_cfg = ckpt_io.load_config(ck)
    model = FastWAM(saved_cfg.model)
    ckpt_io.load_weights(model, ck / "model.safetensors")
    state = json.loads((ck / "train_state" / "state.json").read_text())
    assert state["step"] == 12
    assert set(json.loads((ck / "norm_stats.json").read_text())) == {"action", "state"}
    # Only safetensors and JSON on disk: no pickle anywhere.
    for f in ck.rglob("*"):
        if f.is_file():
            assert f.suffix in (".json", ".safetensors"), f


def test_mismatched_or_incomplete_checkpoints_fail_clearly(tmp_path):
    cfg = _cfg(steps=4)
    res = train(cfg, tmp_path / "run", dataset=_data(cfg), progress=False)
    weights = load_file(str(res.checkpoint / "model.safetensors"))
    other = FastWAM(dataclasses.replace(ckpt_io.load_config(res.checkpoint).model, action_hidden_dim=16))
    with pytest.raises(ckpt_io.CheckpointError, match="shape mismatch"):
        ckpt_io.load_weights(other, res.checkpoint / "model.safetensors")
    from safetensors.torch import save_file

    del weights["state_proj.weight"]
    save_file(weights, str(tmp_path / "partial.safetensors"))
    model = FastWAM(ckpt_io.load_config(res.checkpoint).model)
    with pytest.raises(ckpt_io.CheckpointError, match="missing 1 tensor.*state_proj.weight"):
        ckpt_io.load_weights(model, tmp_path / "partial.safetensors")
    with pytest.raises(ckpt_io.CheckpointError, match="no checkpoint found"):
        ckpt_io.resolve_checkpoint(tmp_path / "nowhere")
    (tmp_path / "badcfg").mkdir()
    (tmp_path / "badcfg" / "model.safetensors").write_bytes(b"")
    (tmp_path / "badcfg" / "config.json").write_text(json.dumps({"model": {"hidden": 1}}))
    with pytest.raises(ckpt_io.CheckpointError, match="unknown ModelConfig field"):
        ckpt_io.load_config(tmp_path / "badcfg")


def test_killed_during_checkpoint_write_keeps_previous(tmp_path):
    """SIGKILL a process in the middle of writing a checkpoint: the previous one stays loadable and `latest`."""
    cfg = _cfg(steps=4)
    res = train(cfg, tmp_path / "run", dataset=_data(cfg), progress=False)
    script = textwrap.dedent(f"""
        import os, signal, dataclasses
        import safetensors.torch as st
        from fastwam import checkpoint as ck
        from fastwam.config import get_preset
        from fastwam.model.fastwam import FastWAM
        cfg = ck.load_config({str(res.checkpoint)!r})
        model = FastWAM(cfg.model)
        real = st.save_file
        def dying_save(tensors, path, metadata=None):
            real(dict(list(tensors.items())[:3]), path)  # a partial file, then the process dies
            os.kill(os.getpid(), signal.SIGKILL)
        ck.save_file = dying_save
        ck.save_checkpoint({str(tmp_path / 'run')!r}, 999, cfg, model)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert proc.returncode == -9
    ck = ckpt_io.resolve_checkpoint(tmp_path / "run")
    assert ck.name == "step_0000004"
    model = FastWAM(ckpt_io.load_config(ck).model)
    ckpt_io.load_weights(model, ck / "model.safetensors")
    # A later save removes the dead writer's temporary (a full model file) and resume still works.
    assert list((tmp_path / "run" / "checkpoints").glob("*.tmp-*"))
    again = train(_cfg(steps=6), tmp_path / "run", resume=True, dataset=_data(cfg), progress=False)
    assert again.step == 6
    assert not list((tmp_path / "run" / "checkpoints").glob("*.tmp-*"))


def test_non_finite_loss_stops_with_clear_error(tmp_path):
    cfg = _cfg(steps=4)
    data = _data(cfg)
    data.items[0]["actions"] = data.items[0]["actions"] * float("nan")
    with pytest.raises(FloatingPointError, match="non-finite loss"):  # a UserError too: one line in the CLI
        train(cfg.replace(train=dataclasses.replace(cfg.train, batch_size=16)), tmp_path / "nan", dataset=data,
              progress=False)


def test_schedule_and_batches():
    tc = get_preset("tiny").train.__class__(steps=100, warmup_frac=0.1, min_lr_frac=0.01)
    assert lr_scale(0, tc) == pytest.approx(0.1)
    assert lr_scale(9, tc) == pytest.approx(1.0)
    assert lr_scale(99, tc) == pytest.approx(0.01, abs=1e-3)
    b = StepBatches(10, 4, seed=0)
    epoch0 = b.indices(0) + b.indices(1) + b.indices(2)[:2]
    assert sorted(epoch0) == list(range(10))  # each clip once per epoch
    assert StepBatches(10, 4, seed=0).indices(5) == b.indices(5)


GLOO_SCRIPT = """
import dataclasses, json, sys
import torch
torch.set_num_threads(1)
from fastwam.config import get_preset
from fastwam.data.synthetic import SyntheticClips
from fastwam.train import train
cfg = get_preset("tiny")
cfg = cfg.replace(train=dataclasses.replace(cfg.train, steps=3, batch_size=4, save_every=100, log_every=1))
if sys.argv[2] == "prior":  # `fastwam pretrain`: the video expert alone
    cfg = cfg.replace(train=dataclasses.replace(cfg.train, variant="video"),
                      model=dataclasses.replace(cfg.model, action_expert=False))
res = train(cfg, sys.argv[1], dataset=SyntheticClips(cfg.data, num_clips=16), progress=False, log_all_steps=True)
if res.losses:
    print("LOSSES", json.dumps([e["loss"] for e in res.losses]))
"""


@pytest.mark.parametrize("objective", ["policy", "prior"])
def test_two_process_gloo_matches_one_process(tmp_path, objective):
    script = tmp_path / "run.py"
    script.write_text(GLOO_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    outs = {}
    for n in (1, 2):
        # --standalone: the launcher picks a free port itself (a fixed or pid-derived one can be taken).
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n), str(script),
               str(tmp_path / f"run{n}"), objective]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
        assert proc.returncode == 0, proc.stderr[-3000:]
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("LOSSES")][0]
        outs[n] = json.loads(line.split(" ", 1)[1])
    assert len(outs[1]) == 3
    assert max(abs(a - b) for a, b in zip(outs[1], outs[2])) <= 1e-5, outs
