"""The ablation report is computed from the eval/training files: tables, intervals and the verdict follow the data."""

import json
from pathlib import Path

import numpy as np

from fastwam.study.report import write_report

TASKS = ("reach-v3", "push-v3")


def _write_eval(out: Path, name: str, mode: str, rate: float, rng: np.random.Generator) -> dict:
    eval_dir = out / "eval" / name
    eval_dir.mkdir(parents=True)
    cells = []
    for task in TASKS:
        for seed in (0, 1):
            outcomes = (rng.random(20) < rate).astype(int).tolist()
            cells.append({"task": task, "seed": seed, "episode_success": outcomes})
    results = {"cells": cells, "summary": {mode: {}}, "latency": {mode: {"per_obs_ms_p50": 1.0}}, "videos": []}
    (eval_dir / "results.json").write_text(json.dumps(results))
    return {"variant": name.rsplit("_s", 1)[0] if not name.startswith("baseline") else "baseline (zero)",
            "seed": 0, "run_dir": None, "eval_dir": eval_dir}


def _report(tmp_path: Path, rates: dict[str, float]) -> str:
    rng = np.random.default_rng(0)
    runs = {}
    for name, rate in rates.items():
        mode = "joint" if name.startswith("joint") else "zero" if name.startswith("baseline") else "fast"
        runs[name] = _write_eval(tmp_path, name, mode, rate, rng)
    run_dir = tmp_path / "runs" / "fast_s0"
    run_dir.mkdir(parents=True)
    runs["fast_s0"]["run_dir"] = run_dir
    (run_dir / "metrics.jsonl").write_text("\n".join(
        json.dumps({"step": s, "action": 1.0 / s, "video": 2.0 / s}) for s in range(1, 6)))
    path = write_report(tmp_path, runs, args=None)
    assert path == tmp_path / "report.md"
    assert (tmp_path / "success.png").is_file() and (tmp_path / "training_curves.png").is_file()
    return path.read_text()


def test_report_finds_a_clear_cotraining_effect(tmp_path):
    text = _report(tmp_path, {"fast_s0": 0.9, "fast_s1": 0.9, "joint_s0": 0.9, "no_cotrain_s0": 0.1,
                              "no_cotrain_s1": 0.1, "baseline_zero": 0.0})
    assert "The paper's pattern holds here" in text
    assert "video co-training changes success by +" in text and "(the interval excludes zero)" in text
    # Training seeds are pooled in the main table and listed one by one below it.
    assert "| fast | fast |" in text and "| baseline (zero) | zero |" in text
    assert "Per training seed:" in text and "(fast_s1)" in text and "(no_cotrain_s0)" in text


def test_report_does_not_claim_an_effect_it_cannot_resolve(tmp_path):
    text = _report(tmp_path, {"fast_s0": 0.5, "joint_s0": 0.5, "no_cotrain_s0": 0.5})
    assert "not confirmed at this scale" in text
    assert "Per training seed:" not in text  # one run per variant: nothing to list


def test_report_without_imagination_variants_claims_nothing_about_imagination(tmp_path):
    text = _report(tmp_path, {"fast_s0": 0.9, "no_cotrain_s0": 0.1})
    assert "co-training finding holds here (test-time imagination was not evaluated" in text
    assert "matters more than test-time imagination" not in text
