"""`fastwam bench memory` machinery on a tiny checkpoint (the real run writes GBs; see docs/full_scale.md)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fastwam.bench import official_memory
from fastwam.bench.memory import MemoryArgs, _shapes, run
from fastwam.config import get_preset
from fastwam.formats.official import fastwam_to_official_key, official_to_fastwam_key, read_official_checkpoint


def test_shapes_are_the_5b_model():
    one, two = _shapes(1), _shapes(2)
    per_layer = sum(torch.Size(s).numel() for s in two.values()) - sum(torch.Size(s).numel() for s in one.values())
    fixed = sum(torch.Size(s).numel() for s in one.values()) - per_layer
    # 30 layers of the 5B shape: ~5.0B parameters (Wan2.2-TI2V-5B).
    assert 4.9e9 < fixed + 30 * per_layer < 5.1e9
    assert one["blocks.0.ffn.net.0.proj.weight"] == (14336, 3072)
    assert one["patch_embedding.weight"] == (3072, 48, 1, 2, 2)


def test_measures_an_existing_checkpoint(tmp_path):
    pytest.importorskip("diffusers")
    from diffusers import WanTransformer3DModel

    WanTransformer3DModel(num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4, text_dim=8,
                          freq_dim=16, ffn_dim=32, num_layers=2).to(torch.bfloat16).save_pretrained(tmp_path)
    report = run(MemoryArgs(path=str(tmp_path), dtype="bf16"))
    assert 0 < report["param_bytes"] <= report["checkpoint_bytes"]  # the file adds only its header
    assert report["peak_rss_bytes"] >= report["rss_before_load_bytes"] > 0
    assert {"ratio_peak_to_checkpoint", "ratio_loader_to_checkpoint", "pass", "machine"} <= set(report)


# --- `--official`: fastwam import official on an official-layout checkpoint -----------------------------------------


def test_official_names_invert_the_import_mapping_for_every_key():
    shapes = official_memory.model_shapes(official_memory.five_b_model())
    names = {k: fastwam_to_official_key(k) for k in shapes}
    assert len(set(names.values())) == len(names) == 1651
    mot = {n: k for k, (part, n) in names.items() if part == "mot"}
    assert all(official_to_fastwam_key(n) == k for n, k in mot.items())
    assert {n for k, (part, n) in names.items() if part == "proprio_encoder"} == {"weight", "bias"}
    # The released libero_2cam224 file: 825 video + 824 action tensors, 4,999,787,712 + 1,020,886,023 parameters.
    assert sum(n.startswith("mixtures.video.") for n in mot) == 825
    assert sum(n.startswith("mixtures.action.") for n in mot) == 824
    count = {p: sum(torch.Size(s).numel() for k, s in shapes.items() if k.startswith(p)) for p in ("video.", "action.")}
    assert count == {"video.": 4_999_787_712, "action.": 1_020_886_023}
    for name in ("mixtures.video.blocks.0.self_attn.q.weight", "mixtures.video.blocks.0.ffn.0.weight",
                 "mixtures.video.blocks.0.modulation", "mixtures.video.blocks.0.norm3.weight",
                 "mixtures.video.head.head.weight", "mixtures.video.head.modulation",
                 "mixtures.video.time_projection.1.weight", "mixtures.action.head.weight",
                 "mixtures.action.action_encoder.weight"):
        assert name in mot


def test_official_synthetic_checkpoint_reads_back(tmp_path):
    model = dataclasses.replace(get_preset("small_cpu").model, num_layers=2, video_hidden_dim=0, video_ffn_dim=512)
    path = tmp_path / "official.pt"
    info = official_memory.write_official_checkpoint(path, model)
    assert not (tmp_path / "official.pt.zeros").exists()
    ckpt = read_official_checkpoint(path)
    shapes = official_memory.model_shapes(model)
    assert {k: tuple(t.shape) for k, t in ckpt.tensors.items()} == shapes
    assert all(t.dtype == torch.bfloat16 and not t.any() for t in ckpt.tensors.values())
    assert ckpt.dtype == "torch.bfloat16" and info["tensors"] == len(shapes) and info["num_layers"] == 2


def test_official_layers_for_size():
    model = official_memory.five_b_model()
    assert official_memory.layers_for_size(model, 12.04, 2) == 30
    assert official_memory.layers_for_size(model, 0.01, 2) == 1


def test_official_mode_reports_json(tmp_path):
    # A 1-layer small_cpu-shaped checkpoint (~1.4 MB): the whole pipeline, the JSON contract, temporaries removed.
    # (video_hidden_dim 0: an official checkpoint's video expert is always as wide as its attention)
    model = dataclasses.replace(get_preset("small_cpu").model, num_layers=1, video_hidden_dim=0, video_ffn_dim=512)
    report = official_memory.run_official(MemoryArgs(official=True, dir=str(tmp_path / "work")), model=model)
    assert report["mode"] == "official" and report["num_layers"] == 1
    assert 0 < report["output_bytes"] and 0 < report["checkpoint_bytes"] < 5e6
    assert report["peak_rss_bytes"] >= report["rss_before_load_bytes"] > 0
    assert report["target_ratio"] == 1.3 and isinstance(report["pass"], bool)
    assert {"ratio_peak_to_checkpoint", "ratio_loader_to_checkpoint", "import_seconds", "write_seconds",
            "machine"} <= set(report)
    assert report["machine"]["torch"] == torch.__version__
    assert list((tmp_path / "work").iterdir()) == []  # --dir without --keep: what it wrote is gone


def test_official_mode_refuses_without_disk_room(tmp_path, monkeypatch):
    import shutil

    from fastwam.errors import UserError

    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**12, 10**12 - 10**6, 10**6))
    with pytest.raises(UserError, match="needs about 24.*GB"):
        official_memory.run_official(MemoryArgs(official=True, dir=str(tmp_path)))
    assert list(tmp_path.iterdir()) == []
