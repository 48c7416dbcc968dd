"""Runs are never lost or shadowed: run-directory rules, resume checks, Ctrl-C, metrics, checkpoint files."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from train_helpers import synthetic_clips as _data
from train_helpers import tiny_train_config as _cfg

from fastwam import checkpoint as ckpt_io
from fastwam.cli import main
from fastwam.errors import UserError
from fastwam.model.fastwam import FastWAM
from fastwam.train import train


def _metric_steps(run_dir) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines]


def test_a_new_run_refuses_a_directory_that_holds_checkpoints(tmp_path):
    cfg = _cfg(steps=4)
    first = train(cfg, tmp_path / "run", dataset=_data(cfg), progress=False)
    weights = (first.checkpoint / "model.safetensors").read_bytes()
    with pytest.raises(UserError, match=r"already holds a run \(checkpoints up to step_0000004\).*--resume.*--out"):
        train(_cfg(steps=2), tmp_path / "run", dataset=_data(cfg), progress=False)
    # Nothing of the first run changed: its checkpoint is still `latest`, byte for byte.
    assert ckpt_io.resolve_checkpoint(tmp_path / "run") == first.checkpoint
    assert (first.checkpoint / "model.safetensors").read_bytes() == weights


def test_latest_always_names_the_checkpoint_just_written(tmp_path):
    cfg = _cfg()
    model = FastWAM(cfg.model)
    for step in (20, 30):
        ckpt_io.save_checkpoint(tmp_path, step, cfg, model, keep_last=1)
    # A lower step written later (a run restarted from an earlier point) is kept and becomes `latest`.
    written = ckpt_io.save_checkpoint(tmp_path, 10, cfg, model, keep_last=1)
    assert written.is_dir() and ckpt_io.resolve_checkpoint(tmp_path) == written
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_0000010"
    assert [p.name for p in ckpt_io.list_checkpoints(tmp_path)] == ["step_0000010"]
    ckpt_io.save_checkpoint(tmp_path, 40, cfg, model, keep_last=2)
    ckpt_io.save_checkpoint(tmp_path, 15, cfg, model, keep_last=2)
    assert [p.name for p in ckpt_io.list_checkpoints(tmp_path)] == ["step_0000015", "step_0000040"]
    assert ckpt_io.resolve_checkpoint(tmp_path).name == "step_0000015"


@pytest.mark.parametrize("steps", [0, -5])
def test_steps_must_be_positive(tmp_path, steps):
    cfg = _cfg(steps=steps)
    with pytest.raises(UserError, match=r"train\.steps must be an integer >= 1"):
        train(cfg, tmp_path / "run", dataset=_data(cfg), progress=False)
    assert not (tmp_path / "run").exists()


def test_resume_needs_a_checkpoint_and_says_what_it_resumes(tmp_path, capsys):
    cfg = _cfg(steps=8)
    with pytest.raises(ckpt_io.CheckpointError, match="holds no checkpoint to continue from"):
        train(cfg, tmp_path / "run", resume=True, dataset=_data(cfg), progress=False)
    train(cfg, tmp_path / "run", dataset=_data(cfg), progress=False, stop_at=4)
    capsys.readouterr()
    res = train(cfg, tmp_path / "run", resume=True, dataset=_data(cfg), progress=False)
    assert res.step == 8
    assert f"resuming from step 4: {tmp_path / 'run' / 'checkpoints' / 'step_0000004'}" in capsys.readouterr().err
    # "auto" (what `fastwam ablate` reruns with) starts where there is nothing, resumes where there is something.
    auto = train(cfg, tmp_path / "auto", resume="auto", dataset=_data(cfg), progress=False, stop_at=4)
    assert auto.step == 4
    assert train(cfg, tmp_path / "auto", resume="auto", dataset=_data(cfg), progress=False).step == 8
    with pytest.raises(UserError, match="--steps 6 is below the step the run is at \\(8"):
        train(_cfg(steps=6), tmp_path / "run", resume=True, dataset=_data(cfg), progress=False)


def test_resume_refuses_changed_settings_unless_accepted(tmp_path, capsys):
    cfg = _cfg(steps=8)
    train(cfg, tmp_path / "run", dataset=_data(cfg), progress=False, stop_at=4)
    changed = cfg.replace(train=dataclasses.replace(cfg.train, lr=2e-3, seed=3, log_every=2))
    with pytest.raises(ckpt_io.CheckpointError, match=r"changed settings \(train\.lr: 0\.001 -> 0\.002, "
                                                      r"train\.seed: 0 -> 3\).*--accept-changes"):
        train(changed, tmp_path / "run", resume=True, dataset=_data(cfg), progress=False)
    # Settings that cannot change the weights (logging cadence) are taken without asking, and reported.
    only_logging = cfg.replace(train=dataclasses.replace(cfg.train, steps=6, log_every=2))
    capsys.readouterr()
    train(only_logging, tmp_path / "run", resume=True, dataset=_data(cfg), progress=False)
    assert "train.log_every: 1 -> 2" in capsys.readouterr().err
    assert ckpt_io.load_config(tmp_path / "run").train.log_every == 2
    # Accepted: the run continues under the new settings, recorded in its checkpoints.
    res = train(changed, tmp_path / "run", resume=True, dataset=_data(cfg), progress=False, accept_changes=True)
    saved = ckpt_io.load_config(res.checkpoint)
    assert res.step == 8 and saved.train.lr == 2e-3 and saved.train.seed == 3
    # The model can never change, accepted or not.
    wider = cfg.replace(train=dataclasses.replace(cfg.train, steps=12),
                        model=dataclasses.replace(cfg.model, action_ffn_dim=32))
    with pytest.raises(ckpt_io.CheckpointError, match=r"model\.action_ffn_dim: 16 -> 32"):
        train(wider, tmp_path / "run", resume=True, dataset=_data(cfg), progress=False, accept_changes=True)


def test_metrics_hold_each_step_once_after_a_resume(tmp_path):
    cfg = _cfg(steps=8)
    run = tmp_path / "run"
    train(cfg, run, dataset=_data(cfg), progress=False, log_all_steps=True)
    # As after a crash between checkpoints: the last checkpoint is step 4, metrics went to step 8 (and a torn line).
    shutil.rmtree(run / "checkpoints" / "step_0000008")
    (run / "checkpoints" / "latest").write_text("step_0000004")
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 9, "loss": 0.')
    train(cfg, run, resume=True, dataset=_data(cfg), progress=False, log_all_steps=True)
    assert _metric_steps(run) == list(range(1, 9))


def test_stale_temporaries_are_removed_and_live_ones_kept(tmp_path):
    cfg = _cfg()
    model = FastWAM(cfg.model)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    root = tmp_path / "checkpoints"
    root.mkdir()
    (root / f"step_0000004.tmp-{dead_pid}").mkdir()
    (root / f"step_0000004.tmp-{dead_pid}" / "model.safetensors").write_bytes(b"partial")
    (root / f"latest.tmp-{dead_pid}").write_text("step_0000004")
    (root / f".latest.tmp-{dead_pid}").write_text("step_0000004")  # the name fastwam.files gives it
    live = root / f"step_0000008.tmp-{os.getppid()}"  # a writer that is still running
    live.mkdir()
    ckpt_io.save_checkpoint(tmp_path, 12, cfg, model)
    left = sorted(p.name for p in root.iterdir())
    assert left == ["latest", live.name, "step_0000012"]


def test_rotation_never_leaves_a_half_deleted_checkpoint(tmp_path):
    cfg = _cfg()
    model = FastWAM(cfg.model)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    root = tmp_path / "checkpoints"
    for step in (4, 8):
        ckpt_io.save_checkpoint(tmp_path, step, cfg, model, keep_last=2)
    # What a kill during rotation leaves now: the old checkpoint already renamed out of the namespace, half deleted.
    half = root / f".deleting-step_0000002-{int(dead.stdout)}"
    half.mkdir()
    (half / "config.json").write_text("{}")
    assert [p.name for p in ckpt_io.list_checkpoints(tmp_path)] == ["step_0000004", "step_0000008"]
    ckpt_io.save_checkpoint(tmp_path, 12, cfg, model, keep_last=2)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_0000008", "step_0000012"]


def test_resume_before_the_first_checkpoint_cleans_the_unfinished_write(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    tmp = tmp_path / "checkpoints" / f"step_0000004.tmp-{int(dead.stdout)}"
    tmp.mkdir(parents=True)
    (tmp / "model.safetensors").write_bytes(b"partial")
    cfg = _cfg()
    with pytest.raises(ckpt_io.CheckpointError, match="holds no checkpoint.*removed 1 unfinished"):
        train(cfg, tmp_path, resume=True, dataset=_data(cfg), progress=False)
    assert not tmp.exists()


def test_a_checkpoint_reaches_the_disk_before_its_name_does(tmp_path, record_fsyncs):
    """Every file of the new checkpoint is fsynced while it still has its temporary name (a power cut cannot leave a
    published step directory with unwritten weights); the rename and the `latest` pointer are synced after."""
    cfg = _cfg()
    model = FastWAM(cfg.model)
    optimizer = torch.optim.AdamW(model.parameters())
    final = tmp_path / "checkpoints" / "step_0000003"
    synced = record_fsyncs(probe=final.exists)
    ckpt_io.save_checkpoint(tmp_path, 3, cfg, model, norm_stats={"a": 1}, optimizer=optimizer)
    tmp_name = f"step_0000003.tmp-{os.getpid()}"
    before = {path.replace(tmp_name, final.name) for path, published in synced if not published}
    written = {str(p) for p in final.rglob("*")} | {str(final)}
    assert written <= before, sorted(written - before)
    after = [path for path, published in synced if published]
    assert str(tmp_path / "checkpoints") in after and any(".latest.tmp-" in path for path in after)


def test_identical_tensors_give_identical_files_with_one_mode(tmp_path):
    cfg = _cfg()
    model = FastWAM(cfg.model)
    optimizer = torch.optim.AdamW(model.parameters())
    files = set()
    for i in range(6):  # safetensors wrote a two-entry metadata map in a random order: 6 tries catch it w.p. 31/32
        ckpt = ckpt_io.save_checkpoint(tmp_path / f"run{i}", 4, cfg, model, {"a": 1}, optimizer, {"seed": 0})
        files.add((ckpt / "model.safetensors").read_bytes())
    assert len(files) == 1
    # A state dict in another key order gives the same bytes too.
    shuffled = dict(reversed(list(model.state_dict().items())))
    ckpt_io._save_tensors(shuffled, tmp_path / "shuffled.safetensors")
    assert (tmp_path / "shuffled.safetensors").read_bytes() in files
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in ckpt.rglob("*") if p.is_file()}
    assert set(modes.values()) == {0o666 & ~umask}, modes
    assert "model.safetensors" in modes and "optimizer.safetensors" in modes and "config.json" in modes


def test_damaged_checkpoint_files_are_named(tmp_path):
    cfg = _cfg(steps=4)
    res = train(cfg, tmp_path / "run", dataset=_data(cfg), progress=False)
    model = FastWAM(ckpt_io.load_config(res.checkpoint).model)
    weights = res.checkpoint / "model.safetensors"
    data = weights.read_bytes()
    for broken in (b"", data[: len(data) // 2]):
        weights.write_bytes(broken)
        with pytest.raises(ckpt_io.CheckpointError, match=r"model\.safetensors: cannot read it .*truncated"):
            ckpt_io.load_weights(model, weights)
    stats = res.checkpoint / "norm_stats.json"
    stats.write_text(stats.read_text()[:20])
    with pytest.raises(ckpt_io.CheckpointError, match=r"norm_stats\.json: not valid JSON"):
        ckpt_io.load_norm_stats(res.checkpoint)


INTERRUPTED_TRAIN = textwrap.dedent("""
    import os, signal, sys
    from fastwam.data import synthetic
    fetch = synthetic.SyntheticClips.__getitem__
    calls = [0]
    def getitem(self, i):  # Ctrl-C arrives while step 4 loads its batch (2 clips a step)
        calls[0] += 1
        if calls[0] == 7:
            os.kill(os.getpid(), signal.SIGINT)
        return fetch(self, i)
    synthetic.SyntheticClips.__getitem__ = getitem
    from fastwam.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def test_ctrl_c_saves_a_checkpoint_and_resume_is_bit_exact(tmp_path, capsys):
    args = ["train", "--preset", "tiny", "--synthetic", "--steps", "10", "--no-progress",
            "--config.train.save-every", "100", "--config.train.threads", "1", "--config.train.log-every", "1"]
    proc = subprocess.run([sys.executable, "-c", INTERRUPTED_TRAIN, *args, "--out", str(tmp_path / "a")],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 130, proc.stderr
    assert "Traceback" not in proc.stderr
    message = proc.stderr.strip().splitlines()[-1]
    assert message.startswith("fastwam train: interrupted at step 4; saved ") and "--resume" in message, proc.stderr
    assert [p.name for p in ckpt_io.list_checkpoints(tmp_path / "a")] == ["step_0000004"]
    # Resumed here (same command plus --resume) it ends where a run that was never interrupted ends, byte for byte.
    assert main(args + ["--out", str(tmp_path / "a"), "--resume"]) == 0
    assert main(args + ["--out", str(tmp_path / "b")]) == 0
    a, b = (ckpt_io.resolve_checkpoint(tmp_path / r) for r in ("a", "b"))
    assert a.name == b.name == "step_0000010"
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert _metric_steps(tmp_path / "a") == _metric_steps(tmp_path / "b") == list(range(1, 11))
