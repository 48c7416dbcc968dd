"""hf:// checkpoints: resolved through huggingface_hub's cache, offline, for load_model, policies (serve / eval) and
the importers. The cache is built here in huggingface_hub's own layout; nothing touches the network."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_helpers import synthetic_clips, tiny_train_config

import fastwam
from fastwam import hub
from fastwam.train import train

pytest.importorskip("huggingface_hub")

COMMITS = ("a" * 40, "b" * 40)


def _put(cache: Path, repo: str, commit: str, files: dict[str, Path | bytes], ref: str | None = "main") -> None:
    """Files into the cache as huggingface_hub lays it out: snapshots/COMMIT/PATH (refs/REF names the commit)."""
    root = cache / ("models--" + repo.replace("/", "--"))
    for rel, src in files.items():
        dst = root / "snapshots" / commit / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(src if isinstance(src, bytes) else src.read_bytes())
    if ref:
        (root / "refs").mkdir(parents=True, exist_ok=True)
        (root / "refs" / ref).write_text(commit)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("hubruns")
    out = []
    for seed in (0, 1):
        cfg = tiny_train_config(4, seed=seed)
        train(cfg, base / f"run{seed}", dataset=synthetic_clips(cfg), progress=False)
        out.append(base / f"run{seed}")
    return tuple(out)


@pytest.fixture
def cache(tmp_path, monkeypatch, runs) -> Path:
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run0, run1 = runs
    ckpt0 = run0 / "checkpoints" / "step_0000004"
    ckpt1 = run1 / "checkpoints" / "step_0000004"
    policy_files = lambda ckpt: {n: ckpt / n for n in ("config.json", "model.safetensors", "norm_stats.json")}  # noqa
    # org/policy: a checkpoint at the root (main), and another at commit b (a pinned revision, tag v2).
    _put(cache, "org/policy", COMMITS[0], policy_files(ckpt0))
    _put(cache, "org/policy", COMMITS[1], policy_files(ckpt1), ref="v2")
    # org/runs: a run directory in a sub-folder (checkpoints/latest + that checkpoint; no optimiser state).
    run_files = {f"fast_s0/checkpoints/{k}": v for k, v in policy_files(ckpt0).items()}
    run_files = {k.replace("checkpoints/", "checkpoints/step_0000004/"): v for k, v in run_files.items()}
    run_files["fast_s0/checkpoints/latest"] = b"step_0000004\n"
    _put(cache, "org/runs", COMMITS[0], run_files)
    return cache


def _weights(model) -> torch.Tensor:
    return model.video.proj_out.weight


def test_parse():
    ref = hub.parse("hf://org/name/sub/dir@v1.0")
    assert (ref.repo_id, ref.path, ref.revision) == ("org/name", "sub/dir", "v1.0")
    assert hub.parse("hf://org/name") == hub.HubRef("org/name")
    assert str(hub.parse("hf://org/name/x@main")) == "hf://org/name/x@main"
    for bad in ("hf://org", "hf://org/name@", "org/name"):
        with pytest.raises(hub.HubError):
            hub.parse(bad)


def test_load_model_and_policy_from_the_cache_offline(cache, runs):
    local = fastwam.load_model(runs[0])
    cached = fastwam.load_model("hf://org/policy")
    assert torch.equal(_weights(cached), _weights(local))
    pinned = fastwam.load_model(f"hf://org/policy@{COMMITS[1]}")
    tagged = fastwam.load_model("hf://org/policy@v2")
    assert torch.equal(_weights(pinned), _weights(fastwam.load_model(runs[1])))
    assert torch.equal(_weights(tagged), _weights(pinned)) and not torch.equal(_weights(pinned), _weights(local))
    in_run = fastwam.load_model("hf://org/runs/fast_s0")  # a run directory: its checkpoints/latest
    assert torch.equal(_weights(in_run), _weights(local))
    policy = fastwam.FastWAMPolicy.from_pretrained("hf://org/runs/fast_s0")  # what serve and eval load
    assert policy.infer(policy.blank_observation())["actions"].shape[-1] == policy.cfg.model.action_dim


def test_offline_and_not_cached_is_one_clear_line(cache):
    with pytest.raises(hub.HubError, match="not a fastwam checkpoint|neither a fastwam checkpoint"):
        fastwam.load_model("hf://org/missing")
    with pytest.raises(hub.HubError, match="HF_HUB_OFFLINE=1"):
        hub.resolve_file("hf://org/policy/nothing.pt")
    with pytest.raises(hub.HubError, match="neither a fastwam checkpoint"):
        fastwam.load_model("hf://org/runs/other")


def test_serve_and_eval_cli_say_offline_in_one_line(cache, tmp_path):
    env = {**__import__("os").environ}
    for argv in (["serve", "--checkpoint", "hf://org/missing", "--port", "0"],
                 ["eval", "metaworld", "--checkpoint", "hf://org/missing", "--tasks", "reach", "--episodes", "1",
                  "--out", str(tmp_path / "e")]):
        proc = subprocess.run([sys.executable, "-m", "fastwam", *argv], capture_output=True, text=True, env=env,
                              timeout=300)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip().splitlines()[-1].startswith(f"fastwam {argv[0]}"), proc.stderr
        assert "hf://org/missing" in proc.stderr and "Traceback" not in proc.stderr


def test_import_official_reads_hub_files(cache, tmp_path):
    fixture = Path(__file__).resolve().parent / "fixtures" / "official_tiny"
    _put(cache, "org/official", COMMITS[0], {"ckpt/checkpoint.pt": fixture / "checkpoint.pt",
                                             "ckpt/dataset_stats.json": fixture / "dataset_stats.json"})
    from fastwam.hub import local_file

    assert Path(local_file("hf://org/official/ckpt/checkpoint.pt")).read_bytes() == \
        (fixture / "checkpoint.pt").read_bytes()
    assert local_file("plain/path.pt") == "plain/path.pt"
    shutil.rmtree(cache / "models--org--official" / "snapshots")
    with pytest.raises(hub.HubError, match="HF_HUB_OFFLINE"):
        local_file("hf://org/official/ckpt/checkpoint.pt")


def test_a_folder_from_the_cache(cache):
    _put(cache, "org/lerobot", COMMITS[0], {"pol/config.json": b"{}", "pol/model.safetensors": b"x"})
    folder = hub.resolve_folder("hf://org/lerobot/pol")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    with pytest.raises(hub.HubError, match="no files there"):
        hub.resolve_folder("hf://org/lerobot/other")
