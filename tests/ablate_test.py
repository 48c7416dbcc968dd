"""`fastwam ablate` end to end on the tiny preset: demos -> trainings -> evaluations -> report, then a resumed run."""

import dataclasses
import json
import shutil

import pytest

from fastwam.study import ablate
from fastwam.study import jobs as study_jobs
from fastwam.study import plan as study_plan

TASK = "reach-v3"


def _argv(out) -> list[str]:
    return ["--preset", "tiny", "--out", str(out), "--tasks", TASK, "--episodes-per-task", "2",
            "--train-steps", "2", "--variants", "fast,no_cotrain", "--eval-episodes", "1", "--eval-seeds", "0",
            "--max-steps", "8", "--replan", "2",
            "--baseline-episodes", "1", "--videos", "1", "--config.train.batch-size", "2",
            "--config.train.save-every", "2"]


def test_plan_orders_jobs_and_passes_the_config_on(tmp_path):
    from fastwam.train import parse_with_preset

    args = parse_with_preset(_argv(tmp_path) + ["--config.train.lr", "0.002"], study_plan.AblateArgs, "test")
    jobs, runs = study_plan.plan(args)
    names = [j.name for j in jobs]
    assert names[0] == "data" and set(runs) == {"fast_s0", "no_cotrain_s0", "baseline_zero", "baseline_random"}
    # The costlier training first; every evaluation waits for its training, every training for the data.
    assert names.index("train_fast_s0") < names.index("train_no_cotrain_s0")
    by_name = {j.name: j for j in jobs}
    assert by_name["eval_fast_s0"].after == ("train_fast_s0",) and by_name["train_fast_s0"].after == ("data",)
    train_cmd = by_name["train_no_cotrain_s0"].cmd
    assert train_cmd[train_cmd.index("--preset") + 1] == "tiny"
    assert train_cmd[train_cmd.index("--config.train.lr") + 1] == "0.002"
    assert train_cmd[train_cmd.index("--variant") + 1] == "no_cotrain"
    eval_cmd = by_name["eval_no_cotrain_s0"].cmd
    assert eval_cmd[eval_cmd.index("--mode") + 1] == "fast"  # no_cotrain is evaluated in the fast mode


def test_ablate_runs_end_to_end_and_resumes(tmp_path, capsys):
    out = tmp_path / "ablation"
    assert ablate.cli(_argv(out) + ["--config.model.video-ffn-dim", "48"]) == 0
    first = capsys.readouterr().out
    assert "train_fast_s0: finished" in first and "eval_baseline_random: finished" in first
    assert "[ablate] 8/8 jobs done" in first  # the progress line after the last job
    assert set(study_jobs.load_durations(out / "logs")) == {
        "data", "train_fast_s0", "train_no_cotrain_s0", "eval_fast_s0", "eval_no_cotrain_s0", "eval_baseline_zero",
        "eval_baseline_random", "latency"}
    for name in ("fast_s0", "no_cotrain_s0", "baseline_zero", "baseline_random"):
        results = json.loads((out / "eval" / name / "results.json").read_text())
        assert results["cells"][0]["task"] == TASK and results["cells"][0]["episodes"] == 1
    report = (out / "report.md").read_text()
    assert "| fast | fast |" in report and "| no_cotrain | fast |" in report and "video co-training" in report
    assert "- `eval/fast_s0/videos/fast_reach-v3_seed0_ep00_" in report  # linked from the study's folder
    assert json.loads((out / "ablation.json").read_text())["args"]["train_steps"] == 2
    # Latency is timed for the study's model, overrides included, not for the preset's.
    from fastwam.config import get_preset
    from fastwam.model.fastwam import FastWAM

    latency = json.loads((out / "latency.json").read_text())
    trained = json.loads((out / "runs" / "fast_s0" / "config.json").read_text())["model"]
    assert trained["video_ffn_dim"] == 48
    expected = FastWAM(dataclasses.replace(get_preset("tiny").model, video_ffn_dim=48)).num_parameters()
    assert latency["params"] == expected

    # Re-running the same command does no work again: every job's output is there.
    assert ablate.cli(_argv(out) + ["--config.model.video-ffn-dim", "48"]) == 0
    second = capsys.readouterr().out
    assert "starting" not in second and second.count("done already, skipping") == 8
    # Other evaluation settings than the finished evaluations had: refused, nothing touched (a job is done when its
    # results.json exists, so they would be skipped and reported as answering the new command). The baselines keep
    # their own --baseline-episodes: one more evaluation differs, no_cotrain's.
    before = {p: p.read_bytes() for p in [*out.glob("eval/*/results.json"), out / "ablation.json"]}
    with pytest.raises(ValueError, match=r"eval_fast_s0: .* episodes_per_seed 1 \(this command: 2\) \(1 more"):
        ablate.cli(_argv(out) + ["--config.model.video-ffn-dim", "48", "--eval-episodes", "2"])
    with pytest.raises(ValueError, match=r"max_steps 8 \(this command: 9\)"):
        ablate.cli(_argv(out) + ["--config.model.video-ffn-dim", "48", "--max-steps", "9", "--report-only"])
    assert {p: p.read_bytes() for p in before} == before
    # --report-only re-renders the report; the recorded command stays the study's own.
    assert ablate.cli(_argv(out) + ["--config.model.video-ffn-dim", "48", "--report-only"]) == 0
    command = json.loads((out / "ablation.json").read_text())["command"]
    assert "--report-only" not in command and "--config.model.video-ffn-dim 48" in command
    # Published with its data, the report is recomputed from a copy of the published folder alone.
    original = (out / "report.md").read_text()
    assert ablate.cli(_argv(out) + ["--config.model.video-ffn-dim", "48", "--report-only", "--publish",
                                    str(tmp_path / "pub")]) == 0
    shutil.rmtree(out)
    shutil.copytree(tmp_path / "pub", tmp_path / "copy")
    assert ablate.cli(_argv(tmp_path / "copy") + ["--config.model.video-ffn-dim", "48", "--report-only"]) == 0
    assert (tmp_path / "copy" / "report.md").read_text() == original


def test_ray_executor_gives_the_local_executors_results_byte_for_byte(tmp_path, capsys):
    """The same tiny study under `--executor ray` (a local Ray) and the local executor: every results.json, the
    outcome of an evaluation, is the same file; a rerun under Ray finds everything done."""
    pytest.importorskip("ray")
    import subprocess
    import sys

    data = tmp_path / "data"
    subprocess.run([sys.executable, "-m", "fastwam", "data", "metaworld", "--tasks", TASK, "--episodes", "2",
                    "--image-size", "8", "--workers", "1", "--no-progress", "--out", str(data)], check=True,
                   capture_output=True)
    study = ["--dataset", str(data), "--no-baselines", "--videos", "0", "--config.model.video-ffn-dim", "48"]
    local, ray_out = tmp_path / "local", tmp_path / "ray"
    assert ablate.cli(_argv(local) + study) == 0
    assert ablate.cli(_argv(ray_out) + study + ["--executor", "ray"]) == 0
    printed = capsys.readouterr().out
    assert "train_fast_s0: finished" in printed
    outcomes = sorted(p.relative_to(local) for p in local.glob("eval/**/results.json"))
    assert [str(p) for p in outcomes] == ["eval/fast_s0/results.json", "eval/no_cotrain_s0/results.json"]
    for rel in outcomes:
        assert (ray_out / rel).read_bytes() == (local / rel).read_bytes(), rel
    for rel in ("runs/fast_s0/checkpoints/step_0000002/model.safetensors",):
        assert (ray_out / rel).read_bytes() == (local / rel).read_bytes(), rel
    recorded = [json.loads((d / "ablation.json").read_text()) for d in (local, ray_out)]
    assert recorded[0]["command"].replace(str(local), "X") == recorded[1]["command"].replace(str(ray_out), "X")
    assert "executor" not in recorded[1]["args"] and "--executor" not in recorded[1]["command"]
    # Resumable under Ray as under the local executor: nothing left to run.
    assert ablate.cli(_argv(ray_out) + study + ["--executor", "ray"]) == 0
    again = capsys.readouterr().out
    assert "train_fast_s0: done already, skipping" in again and "starting" not in again
