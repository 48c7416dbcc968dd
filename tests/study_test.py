"""Sweeps and evaluation axes through `fastwam ablate`, and the study report.

- a tiny two-cell sweep with axes runs end to end, lays its runs and evaluations out by cell / variant / condition,
  resumes with no work, refuses to rebind a cell name, and a restarted driver watches jobs still running instead of
  starting them twice;
- the report's numbers come from the hierarchical bootstrap of the files on disk (synthetic results with a known
  answer: an imagination variant that is better only under one condition is reported as paying there only).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fastwam.presets import parse_with_preset
from fastwam.study import ablate
from fastwam.study import jobs as study_jobs
from fastwam.study import plan as study_plan

TASK = "reach-v3"


def _argv(out) -> list[str]:
    return ["--preset", "tiny", "--out", str(out), "--tasks", TASK, "--episodes-per-task", "2", "--train-steps", "2",
            "--variants", "fast", "--cells", "A:video_ffn_dim=32;B:video_hidden_dim=24,video_ffn_dim=48",
            "--cell-variants", "B:fast,joint", "--axes", "replan=1;shift=colour;delay=1", "--axis-cells", "B",
            "--eval-episodes", "1", "--eval-seeds", "0", "--max-steps", "6", "--replan", "2", "--no-baselines",
            "--videos", "0", "--config.train.batch-size", "2", "--config.train.save-every", "2"]


def test_sweep_plan_layout():
    args = parse_with_preset(_argv("/tmp/x"), study_plan.AblateArgs, "test")
    jobs, runs = study_plan.plan(args)
    assert set(runs) == {"A/fast_s0", "B/fast_s0", "B/joint_s0"}
    names = {j.name for j in jobs}
    # Axes only for the axis cell; every run has its base evaluation.
    assert {"eval_A_fast_s0", "eval_B_fast_s0", "eval_B_joint_s0", "eval_B_joint_s0_replan1",
            "eval_B_fast_s0_shift_colour", "eval_B_joint_s0_delay1"} <= names
    assert not any(n.startswith("eval_A_fast_s0_") for n in names)
    by = {j.name: j for j in jobs}
    cmd = by["eval_B_joint_s0_delay1"].cmd
    assert cmd[cmd.index("--obs-delay") + 1] == "1" and cmd[cmd.index("--mode") + 1] == "joint"
    assert by["eval_B_fast_s0_shift_colour"].done.parent.name == "shift_colour"
    train = by["train_B_joint_s0"].cmd
    assert train[train.index("--config.model.video-hidden-dim") + 1] == "24"
    assert runs["B/joint_s0"]["evals"]["replan1"].parts[-3:] == ("B", "joint_s0", "replan1")
    # Base evaluations, then trainings, then the axes of later seeds (the first seed's axes early, for a first look).
    assert by["eval_B_joint_s0"].priority == 0 and by["train_B_joint_s0"].priority == 1
    assert by["eval_B_joint_s0_replan1"].priority == 0
    two = parse_with_preset(_argv("/tmp/x") + ["--seeds", "0,1", "--eval-compile"], study_plan.AblateArgs, "test")
    by2 = {j.name: j for j in study_plan.plan(two)[0]}
    assert by2["eval_B_joint_s1_replan1"].priority == 2 and by2["eval_B_joint_s1"].priority == 0
    assert "--compile" in by2["eval_B_joint_s1"].cmd and "--compile" not in by["eval_B_joint_s0"].cmd
    # What an evaluation asks for, as results.json records it; a condition's later --replan wins.
    assert ablate.eval_settings(by["eval_B_joint_s0_replan1"].cmd) == {
        "tasks": [TASK], "seeds": [0], "episodes_per_seed": 1, "replan": 1, "max_steps": 6, "modes": ["joint"]}
    assert ablate.eval_settings(by["eval_B_fast_s0_shift_colour"].cmd)["shift"] == "colour"
    with pytest.raises(ValueError, match="ModelConfig field"):
        study_plan.parse_cells("A:not_a_field=1")
    with pytest.raises(ValueError, match="axis"):
        study_plan.parse_axes("fog=1")


def test_sweep_runs_end_to_end_resumes_and_keeps_cell_names(tmp_path, capsys):
    out = tmp_path / "study"
    assert ablate.cli(_argv(out)) == 0
    first = capsys.readouterr().out
    assert "train_B_joint_s0: finished" in first and "eval_B_joint_s0_shift_colour: finished" in first
    res = json.loads((out / "eval" / "B" / "joint_s0" / "delay1" / "results.json").read_text())
    assert res["config"]["obs_delay"] == 1 and res["config"]["replan"] == 2
    assert json.loads((out / "eval" / "B" / "fast_s0" / "shift_colour" / "results.json").read_text())[
        "config"]["shift"] == "colour"
    trained = json.loads((out / "runs" / "B" / "joint_s0" / "config.json").read_text())["model"]
    assert trained["video_hidden_dim"] == 24 and trained["video_ffn_dim"] == 48
    latency = json.loads((out / "latency_B.json").read_text())
    assert set(latency["modes"]) == {"fast", "joint"}
    report = (out / "report.md").read_text()
    assert "imagination map" in report and "| B |" in report
    # The recorded command runs as it is in a shell (the cells' ";" quoted).
    import shlex

    command = json.loads((out / "ablation.json").read_text())["command"]
    assert shlex.split(command)[2:] == _argv(out)
    # Resume: nothing to do.
    assert ablate.cli(_argv(out)) == 0
    assert "starting" not in capsys.readouterr().out
    # The published folder carries the data behind every number: with the study itself gone, a copy of it re-renders
    # the same report, recorded command included.
    import shutil

    published = tmp_path / "docs" / "study"
    assert ablate.cli(_argv(out) + ["--report-only", "--publish", str(published)]) == 0
    text = (published / "report.md").read_text()
    assert "## The data behind these numbers" in text
    assert (published / "eval" / "B" / "joint_s0" / "delay1" / "results.json").is_file()
    assert (published / "runs" / "B" / "joint_s0" / "metrics.jsonl").is_file()
    assert not (published / "runs" / "B" / "joint_s0" / "checkpoints").exists()  # data, not weights
    original = (out / "report.md").read_text()
    shutil.rmtree(out)
    copy = tmp_path / "copy"
    shutil.copytree(published, copy)
    assert ablate.cli(_argv(copy) + ["--report-only"]) == 0
    assert (copy / "report.md").read_text() == original
    assert json.loads((copy / "ablation.json").read_text())["command"] == command
    # A cell name stays bound to its architecture.
    bad = [a.replace("A:video_ffn_dim=32", "A:video_ffn_dim=40") for a in _argv(copy)]
    with pytest.raises(ValueError, match="cell 'A' was defined"):
        ablate.cli(bad)


def test_restarted_driver_watches_a_running_job(tmp_path, capsys):
    """A job whose pid file names a live fastwam process is watched, not started again."""
    out = tmp_path / "o"
    done = out / "marker"
    # A stand-in job: a live process whose command line names fastwam, which writes the job's output and exits.
    script = f"import time, pathlib; time.sleep(1.5); pathlib.Path({str(done)!r}).write_text('x')  # fastwam"
    proc = subprocess.Popen([sys.executable, "-c", script])
    from pathlib import Path

    for _ in range(200):  # /proc/PID/cmdline reads empty for the first few ms of a new process
        if b"fastwam" in Path(f"/proc/{proc.pid}/cmdline").read_bytes():
            break
        time.sleep(0.01)
    (out / "logs").mkdir(parents=True)
    (out / "logs" / "j.pid").write_text(f"{proc.pid}\n")
    job = study_plan.Job("j", [sys.executable, "-c", "raise SystemExit(3)"], done)  # would fail if started again
    t0 = time.time()
    study_jobs.run_jobs([job], out, parallel=1)
    proc.wait()
    text = capsys.readouterr().out
    assert "still running" in text and "j: finished" in text and "starting" not in text
    assert done.exists() and time.time() - t0 >= 1.0
    assert not (out / "logs" / "j.pid").exists()
    assert study_jobs.load_durations(out / "logs") == {}  # its start is unknown: no duration recorded for it


def test_a_resumed_job_records_no_duration(tmp_path, capsys):
    out, work = tmp_path / "o", tmp_path / "checkpoints"
    make = [sys.executable, "-c", "import pathlib, sys; pathlib.Path(sys.argv[1]).write_text('x')"]
    fresh = study_plan.Job("fresh", make + [str(tmp_path / "a")], tmp_path / "a", resumes_from=tmp_path / "none")
    work.mkdir()  # earlier work to continue from
    resumed = study_plan.Job("resumed", make + [str(tmp_path / "b")], tmp_path / "b", resumes_from=work)
    study_jobs.run_jobs([fresh, resumed], out, parallel=1)
    assert "resumed: finished" in capsys.readouterr().out
    assert set(study_jobs.load_durations(out / "logs")) == {"fresh"}


def test_progress_estimates_pending_jobs_from_other_seeds(tmp_path):
    """A job's expected time is the median of the same job for the training seeds that finished it."""
    logs = tmp_path / "logs"
    logs.mkdir()
    assert study_jobs.load_durations(logs) == {}
    for name, minutes in [("train_M_idm_s0", 50.0), ("train_M_idm_s1", 70.0), ("train_M_idm_s3", 90.0),
                          ("eval_M_idm_s0_replan4", 9.0), ("eval_M_idm_s0", 5.0)]:
        study_jobs.record_duration(logs, name, minutes)
    durations = study_jobs.load_durations(logs)
    assert durations["train_M_idm_s1"] == 70.0
    assert sorted(p.name for p in logs.iterdir()) == ["durations.json"]  # written whole, no temporary left
    assert study_jobs.estimate_minutes("train_M_idm_s2", durations) == 70.0
    # Same job, not a prefix: the replan4 axis is not the base evaluation, and M is not L.
    assert study_jobs.estimate_minutes("eval_M_idm_s2", durations) == 5.0
    assert study_jobs.estimate_minutes("eval_M_idm_s2_replan4", durations) == 9.0
    assert study_jobs.estimate_minutes("train_L_idm_s2", durations) is None
    # 70 + 5 pending, 30 of the running job's 70 left; one job never timed is left out and said so.
    line = study_jobs.progress_line(5, 9, ["train_M_idm_s2", "eval_M_idm_s2", "train_L_idm_s0"],
                                {"train_M_idm_s4": 40.0}, durations, parallel=2)
    assert line.startswith("[ablate] 5/9 jobs done, 1 running")
    assert "~1.8 h of job time left (~0.9 h wall at 2 in parallel)" in line and "1 job(s) not yet timed" in line
    assert "left" not in study_jobs.progress_line(9, 9, [], {}, durations, parallel=2)
    # Nothing timed yet (a one-seed study): no estimate rather than a "~0.0 h left" that reads as "almost done".
    first = study_jobs.progress_line(0, 2, ["train_L_idm_s0"], {"eval_L_idm_s0": 3.0}, durations, parallel=2)
    assert "no time estimate yet" in first and "h of job time left" not in first
    (logs / "durations.json").write_text("{not json")  # a damaged file costs the estimate, not the study
    assert study_jobs.load_durations(logs) == {}


# ---------------------------------------------------------------------------------------------------------------------
# The report on synthetic results with a known answer


def _results(rate_by_task: dict[str, float], seed: int, episodes: int = 30, reward_by_task=None) -> dict:
    rng = np.random.default_rng(seed)
    cells = []
    for task, rate in rate_by_task.items():
        for eval_seed in (0, 1):
            outcomes = (rng.random(episodes) < rate).astype(int).tolist()
            cells.append({"task": task, "seed": eval_seed, "episode_success": outcomes})
            if reward_by_task is not None:  # highest shaped reward per episode (0-10)
                cells[-1]["episode_max_reward"] = np.clip(reward_by_task[task] + rng.normal(0, 0.3, episodes), 0,
                                                          10).round(4).tolist()
    return {"cells": cells}


def _synthetic_study(tmp_path, conds=("base", "replan16"), evaluated_seeds=(0, 1, 2), multi_stage_rate=None) -> dict:
    """Three planned training seeds per model; results on disk for `evaluated_seeds` only; `multi_stage_rate` (if
    given) replaces every variant's success on the multi-stage task."""
    from fastwam.study.sweep_report import MULTI_STAGE

    tasks = ["reach-v3", "drawer-open-v3", MULTI_STAGE[0]]
    rates = {"fast": 0.5, "no_cotrain": 0.2, "joint": 0.5, "idm": 0.5}
    runs = {}
    (tmp_path / "cells.json").write_text(json.dumps({"M": {"video_hidden_dim": "256"}}))
    (tmp_path / "latency_M.json").write_text(json.dumps({"params": {"video_expert": 3.8e6, "action_expert": 0.8e6},
                                                         "modes": {"fast": {"p50_ms": 10.0},
                                                                   "joint": {"p50_ms": 40.0},
                                                                   "idm": {"p50_ms": 50.0}}}))
    for variant, rate in rates.items():
        for seed in range(3):
            name = f"M/{variant}_s{seed}"
            evals = {}
            for cond in conds:
                d = tmp_path / "eval" / name / ("" if cond == "base" else cond)
                evals[cond] = d
                if seed not in evaluated_seeds:
                    continue
                d.mkdir(parents=True, exist_ok=True)
                # IDM pays only when re-planning rarely (replan16), by 30 points; everything else is equal.
                r = rate + (0.3 if (variant == "idm" and cond == "replan16") else 0.0)
                by_task = {t: r if multi_stage_rate is None or t not in MULTI_STAGE else multi_stage_rate
                           for t in tasks}
                # with the floor case, progress is recorded too: IDM gets 3 reward points further on the
                # multi-stage task (30 % of the scale), everything else is equal
                rewards = None if multi_stage_rate is None else {
                    t: 1.0 + (3.0 if (variant == "idm" and t in MULTI_STAGE) else 0.0) for t in tasks}
                (d / "results.json").write_text(json.dumps(_results(by_task, seed=seed, reward_by_task=rewards)))
            runs[name] = {"variant": variant, "seed": seed, "cell": "M", "run_dir": tmp_path / "runs" / name,
                          "eval_dir": evals["base"], "evals": evals}
    return runs


def test_study_report_known_answer(tmp_path):
    from fastwam.study.sweep_report import write_study_report

    runs = _synthetic_study(tmp_path)
    report = write_study_report(tmp_path, runs, None, ["base", "replan16"]).read_text()
    verdicts = report.split("## Verdicts")[1]
    assert re.search(r"Cell M \(3.8M video parameters\): video co-training \+[\d.]+ \[\+[\d.]+, .*\] points "
                     r"\(MDE [\d.]+\): pays\.", verdicts)
    assert re.search(r"re-plan every 16: imagination joint [-+][\d.]+ \[.*\]: unresolved; idm \+[\d.]+ \[.*\]: pays\.",
                     verdicts)
    assert re.search(r"base \(re-plan every 8\): imagination joint [-+][\d.]+ \[.*\]: unresolved;", verdicts)
    assert "4.0x" in report and "5.0x" in report  # the latency paid
    assert "multi-stage (1 tasks)" in report and "single-stage (2 tasks)" in report
    assert (tmp_path / "capacity.png").is_file() and (tmp_path / "imagination_map.png").is_file()
    assert "Partial study" not in report and "provisional" not in report and "At the floor" not in report
    single = next(line for line in report.splitlines() if line.startswith("| M | base (re-plan every 8) | single"))
    assert single.endswith("| - | - | - |")  # no progress recorded: no progress columns filled
    assert "re-plan every 16**: re-plan every 16 actions" in report  # each condition explained


def test_partial_study_report_says_so_and_marks_verdicts_provisional(tmp_path):
    from fastwam.study.sweep_report import MULTI_STAGE, write_study_report

    runs = _synthetic_study(tmp_path, conds=("base", "delay4"), evaluated_seeds=(0,), multi_stage_rate=0.0)
    # joint's second seed is evaluated before fast's: comparisons keep to the seeds both arms have
    joint1 = runs["M/joint_s1"]["eval_dir"]
    joint1.mkdir(parents=True)
    (joint1 / "results.json").write_text(json.dumps(_results({"reach-v3": 0.9, "drawer-open-v3": 0.9,
                                                               MULTI_STAGE[0]: 0.0}, seed=1)))
    report = write_study_report(tmp_path, runs, None, ["base", "delay4"]).read_text()
    imagination_map = report.split("## The imagination map")[1].split("## Task structure")[0]
    base_row = next(line for line in imagination_map.splitlines() if line.startswith("| M | base (re-plan every 8) |"))
    joint_effect = base_row.strip("| ").split(" | ")[3]
    assert float(joint_effect.split()[0]) == pytest.approx(0, abs=8)  # seed 0 only: joint = fast there
    assert "M/joint 2/3" in report
    assert "**Partial study.**" in report and "M/fast 1/3" in report and "M/idm 1/3" in report
    assert "along the axes done so far (conditions x training seeds), per model: M/fast 1/3" in report

    verdicts = report.split("## Verdicts")[1]
    assert re.search(r"video co-training .*: pays \(provisional: 1 training seed\)\.", verdicts)
    assert "observation delay 4**: observation delay of 4 steps" in report  # the designed perturbation, justified
    assert "At the floor (no episode succeeded with any variant: M multi-stage)" in report
    multi = next(line for line in report.splitlines() if line.startswith("| M | base (re-plan every 8) | multi-stage"))
    fast_progress, joint_progress, idm_progress = multi.strip("| ").split(" | ")[-3:]
    estimate = lambda cell: float(cell.split()[0])  # noqa: E731
    # progress still separates what success cannot: fast ~10 %, joint the same, idm +30 points
    assert estimate(fast_progress) == pytest.approx(10, abs=2) and estimate(joint_progress) == pytest.approx(0, abs=2)
    assert estimate(idm_progress) == pytest.approx(30, abs=3) and idm_progress.split("[")[1].startswith("+")
    cotrain = report.split("## Co-training under each evaluation condition")[1]
    assert "| M | observation delay 4 |" in cotrain and "pays (provisional: 1 training seed)" in cotrain


def test_a_study_missing_only_later_seeds_axes_is_still_partial(tmp_path):
    from fastwam.study.sweep_report import write_study_report

    runs = _synthetic_study(tmp_path, conds=("base", "replan16"))
    for seed in (1, 2):  # base complete; the replan16 evaluations of M/idm's seeds 1-2 not yet run
        (runs[f"M/idm_s{seed}"]["evals"]["replan16"] / "results.json").unlink()
    report = write_study_report(tmp_path, runs, None, ["base", "replan16"]).read_text()
    assert "**Partial study.** The base condition has every training seed of every model." in report
    assert "M/fast 3/3, M/idm 1/3, M/joint 3/3, M/no_cotrain 3/3" in report


def test_publish_copies_what_the_report_links_and_drops_the_rest(tmp_path):
    from fastwam.study.report import publish_report

    out = tmp_path / "study"
    (out / "eval" / "M" / "joint_s0" / "videos").mkdir(parents=True)
    (out / "eval" / "M" / "fast_s0" / "videos").mkdir(parents=True)
    for name in ("joint_reach-v3_seed0_ep00_success.mp4", "joint_push-v3_seed0_ep00_fail.mp4"):
        (out / "eval" / "M" / "joint_s0" / "videos" / name).write_bytes(b"x")
    (out / "eval" / "M" / "fast_s0" / "videos" / "fast_reach-v3_seed0_ep00_success.mp4").write_bytes(b"x")
    # no_cotrain is evaluated in the fast mode: its videos are named "fast_..." but it is a variant of its own
    (out / "eval" / "M" / "no_cotrain_s0" / "replan2" / "videos").mkdir(parents=True)
    (out / "eval" / "M" / "no_cotrain_s0" / "replan2" / "videos" / "fast_reach-v3_seed0_ep00_fail.mp4").write_bytes(
        b"x")
    (out / "capacity.png").write_bytes(b"png")
    (out / "ablation.json").write_text("{}")
    (out / "report.md").write_text("# R\n\n![cap](capacity.png)\n\n![gone](runs/x/samples/a.png)\n\n"
                                   "## Rollout videos\n\nWhat they show.\n\n- `eval/M/fast_s0/videos/other.mp4`\n\n"
                                   "## Latency\n\nno links here\n")
    dest = tmp_path / "docs" / "study"
    text = publish_report(out, dest, videos=3).read_text()
    assert "capacity.png" in text and "gone" not in text and "other.mp4" not in text
    # a section left without any of its links goes whole; one without links stays
    assert "## Rollout videos" not in text and "What they show" not in text and "no links here" in text
    # A report that lists the copied videos itself (here: the published one) gets no second list of them.
    (out / "report.md").write_text(text)
    assert publish_report(out, tmp_path / "again", videos=3).read_text().count("joint_push-v3") == 1
    # One video per variant first (imagination first), and every link of the published report exists.
    assert "joint_push-v3" in text and "fast_s0/videos/fast_reach-v3" in text and "joint_reach-v3" not in text
    assert "no_cotrain_s0/replan2/videos/fast_reach-v3" in text
    import re

    for link in re.findall(r"\]\(([^)]+)\)", text) + re.findall(r"`([^`\s]+\.(?:mp4|png))`", text):
        assert (dest / link).exists(), link
    assert (dest / "ablation.json").exists()


def test_recorded_command_leaves_out_report_and_publish_options():
    assert ablate._study_argv(["--out", "o", "--report-only", "--publish", "docs/x", "--publish-videos", "2",
                               "--tasks", "t"]) == ["--out", "o", "--tasks", "t"]


def test_published_metrics_keep_the_curve_and_the_final_rows():
    from fastwam.study.report import _thin_metrics

    rows = [json.dumps({"step": 10 * i, "action": 1.0 / (i + 1), "video": 0.5}) for i in range(1000)]
    thinned = _thin_metrics("\n".join(rows) + "\n").splitlines()
    assert 150 <= len(thinned) <= 220
    assert thinned[0] == rows[0] and thinned[-20:] == rows[-20:]  # the final losses the reports read, whole
    steps = [json.loads(r)["step"] for r in thinned]
    assert steps == sorted(steps)
    assert _thin_metrics("\n".join(rows[:30])).splitlines() == rows[:30]  # a short log is kept as it is


def test_report_only_keeps_the_recorded_command_of_the_same_study_only(tmp_path):
    """Re-rendering a copy of a published study keeps the study's own command; another study's options replace it."""
    record = lambda argv: ablate.study_record(parse_with_preset(argv, study_plan.AblateArgs, "t"), argv)  # noqa: E731
    path = tmp_path / "ablation.json"
    path.write_text(json.dumps(record(_argv("runs/study"))))
    assert ablate._same_study(path, record(_argv(tmp_path / "copy") + ["--report-only", "--publish", "docs/x"]))
    assert not ablate._same_study(path, record(_argv("runs/study") + ["--train-steps", "3"]))
    assert not ablate._same_study(path, record(_argv("runs/study") + ["--config.train.batch-size", "4"]))
    path.write_text("{not json")
    assert not ablate._same_study(path, record(_argv("runs/study")))


def test_a_timing_job_runs_on_an_idle_machine(tmp_path):
    """The latency job starts first and alone, and nothing starts beside it: its times are not another job's load."""
    log = tmp_path / "times.txt"
    script = ("import pathlib, sys, time; t0 = time.time(); time.sleep(1.0); "
              "open(sys.argv[1], 'a').write(f'{sys.argv[2]} {t0} {time.time()}\\n'); pathlib.Path(sys.argv[3]).touch()")

    def job(name, **kw):
        return study_plan.Job(name, [sys.executable, "-c", script, str(log), name, str(tmp_path / name)],
                              tmp_path / name, **kw)

    jobs = [job("a"), job("b"), job("latency", priority=-1, alone=True), job("c")]
    study_jobs.run_jobs(jobs, tmp_path / "o", parallel=2)
    spans = {name: (float(t0), float(t1)) for name, t0, t1 in (line.split() for line in log.read_text().splitlines())}
    lat0, lat1 = spans.pop("latency")
    assert all(t1 <= lat0 or t0 >= lat1 for t0, t1 in spans.values())  # no other job overlaps it
    assert all(t0 >= lat1 for t0, _ in spans.values())  # priority -1: it ran first
    assert spans["b"][0] < spans["a"][1]  # the others still run side by side
    # The study's latency jobs are such jobs.
    by = {j.name: j for j in study_plan.plan(parse_with_preset(_argv(tmp_path), study_plan.AblateArgs, "t"))[0]}
    assert by["latency_B"].alone and by["latency_B"].priority < 0 and not by["eval_B_fast_s0"].alone


def _prior_study(tmp_path) -> tuple[dict, object]:
    """A video-prior study on disk: 5 and 40 demos x scratch / prior x fast / no_cotrain, a video-mixing cell and
    joint / idm from the prior. Known answer: co-training pays (+30) only from the prior with 5 demos; the mixing cell
    is 20 points above scratch fast; imagination changes nothing."""
    from fastwam.study.plan import AblateArgs

    cells = {"s5": {"demos": "5"}, "p5": {"init": "prior", "demos": "5"}, "s40": {"demos": "40"},
             "p40": {"init": "prior"}, "v5": {"demos": "5", "video_ratio": "0.5"}}
    (tmp_path / "cells.json").write_text(json.dumps(cells))
    rate = {("s5", "fast"): 0.3, ("s5", "no_cotrain"): 0.3, ("p5", "fast"): 0.7, ("p5", "no_cotrain"): 0.4,
            ("s40", "fast"): 0.5, ("s40", "no_cotrain"): 0.5, ("p40", "fast"): 0.6, ("p40", "no_cotrain"): 0.6,
            ("p40", "joint"): 0.6, ("p40", "idm"): 0.6, ("v5", "fast"): 0.5}
    runs = {}
    for (cell, variant), r in rate.items():
        for seed in range(3):
            name = f"{cell}/{variant}_s{seed}"
            d = tmp_path / "eval" / name
            d.mkdir(parents=True)
            (d / "results.json").write_text(json.dumps(_results({"reach-v3": r, "drawer-open-v3": r}, seed=seed)))
            run_dir = tmp_path / "runs" / name
            run_dir.mkdir(parents=True)
            (run_dir / "metrics.jsonl").write_text("".join(
                json.dumps({"step": s, "loss": 1.0, "video": 1.0 / s, "action": 0.1, "it_s": 1.5}) + "\n"
                for s in (10, 20, 30)))
            runs[name] = {"variant": variant, "seed": seed, "cell": cell, "run_dir": run_dir, "eval_dir": d,
                          "evals": {"base": d}}
    for seed in range(3):  # the priors: their curves and, for seed 0, two imagined-frame samples
        prior = tmp_path / "runs" / f"prior_s{seed}"
        (prior / "samples").mkdir(parents=True)
        (prior / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 2.0 / s, "video": 2.0 / s,
                                                                 "action": 0.0, "it_s": 1.6}) + "\n"
                                                     for s in (100, 200)))
    import imageio.v3 as iio

    for step in (100, 200):
        iio.imwrite(tmp_path / "runs" / "prior_s0" / "samples" / f"step_{step:07d}.png", np.zeros((8, 12, 3), np.uint8))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    gen = lambda episodes, frames, **a: {"episodes": episodes, "frames": frames, "wall_seconds": 600.0,  # noqa: E731
                                         "size_bytes": 1e6, "per_task": dict.fromkeys(range(a.pop("tasks")), {}),
                                         "args": a, **({"action_free": True, "failures_kept": 7} if a.get(
                                             "keep_failures") else {})}
    (corpus / "fastwam_generation.json").write_text(json.dumps(gen(4000, 400_000, tasks=50, keep_failures=True,
                                                                    policies="expert,noisy", seed=1, max_steps=150)))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "fastwam_generation.json").write_text(json.dumps(gen(400, 34_000, tasks=10, seed=0)))
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "durations.json").write_text(json.dumps({"pretrain_s0": 61.5}))
    args = AblateArgs(config=None, episodes_per_task=40, pretrain_dataset=str(corpus), cells="")
    return runs, args


def test_prior_report_known_answer(tmp_path):
    from fastwam.study.prior_report import write_prior_report

    runs, args = _prior_study(tmp_path)
    report = write_prior_report(tmp_path, runs, args, ["base"]).read_text()
    verdicts = report.split("## Verdicts")[1]
    assert re.search(r"- 5 demos / task, from prior: video co-training \+[\d.]+ \[\+[\d.]+, .*\] points .*: pays\.",
                     verdicts)
    assert re.search(r"- 5 demos / task, from scratch: video co-training [-+][\d.]+ .*: unresolved\.", verdicts)
    assert re.search(r"- 40 demos / task, from prior: video co-training [-+][\d.]+ .*: unresolved\.", verdicts)
    assert re.search(r"Action-free clips in every batch, v5 - s5: \+[\d.]+ \[\+[\d.]+, .*: pays\.", verdicts)
    assert re.search(r"p40, base \(re-plan every 8\): imagination joint [-+][\d.]+ .*: unresolved; idm", verdicts)
    assert "The corpus holds 11.8x the frames of the full action-labelled set (400,000 vs 34,000)" in report
    assert "| 0 | 200 | 62 min | 1.6 | 0.015 |" in report  # pretraining: seed 0's time from durations.json
    assert (tmp_path / "prior_objective.png").is_file() and (tmp_path / "pretraining.png").is_file()
    assert "![imagined futures, top to bottom: the prior at step 100; the prior at step 200" in report
    assert (tmp_path / "prior_samples.png").is_file()
    # A published copy (no logs, no generation summaries, no samples) renders the same report from facts.json.
    import shutil

    for gone in ("logs", "corpus", "data", "runs/prior_s0/samples"):
        shutil.rmtree(tmp_path / gone)
    again = write_prior_report(tmp_path, runs, args, ["base"]).read_text()
    assert again == report


def test_real_time_axes_evaluate_the_same_models_with_fewer_steps_and_asynchronously():
    argv = [a if a != "replan=1;shift=colour;delay=1" else "steps=1,2;async=rtc1,naive1,sync1" for a in _argv("/tmp/x")]
    args = parse_with_preset(argv, study_plan.AblateArgs, "test")
    conds = study_plan.conditions(args)
    assert list(conds) == ["base", "steps1", "steps2", "async_rtc1", "async_naive1", "async_sync1"]
    assert conds["steps2"] == ["--steps", "2"]
    assert conds["async_rtc1"] == ["--async", "--chunking", "rtc", "--inference-delay", "1"]
    by = {j.name: j for j in study_plan.plan(args)[0]}
    settings = ablate.eval_settings(by["eval_B_fast_s0_async_naive1"].cmd)
    assert settings["chunking"] == "naive" and settings["inference_delay"] == 1
    assert ablate.eval_settings(by["eval_B_joint_s0_steps1"].cmd)["inference_steps"] == 1
    assert by["eval_B_fast_s0_steps1"].after == ("train_B_fast_s0",)  # the trained model, evaluated again
    from fastwam.study.sweep_report import _condition_text

    assert "real-time chunking" in _condition_text("async_rtc4") and "1 denoising step" in _condition_text("steps1")
    for bad in ("async=rtc", "async=smooth4", "steps=0", "steps=two"):
        with pytest.raises(ValueError, match="axis"):
            study_plan.parse_axes(bad)


def test_real_time_study_evaluates_and_distills_another_studys_models(tmp_path, capsys):
    """--models-from: the real-time study trains nothing; it distills the other study's fast models, evaluates them
    with fewer steps and asynchronously, times every step count, and reports both tables. A model the other study
    has not trained yet is one line."""
    common = ["--preset", "tiny", "--tasks", TASK, "--episodes-per-task", "2", "--train-steps", "2", "--variants",
              "fast", "--cells", "A:video_ffn_dim=32", "--eval-episodes", "1", "--eval-seeds", "0", "--max-steps", "6",
              "--replan", "2", "--no-baselines", "--videos", "0", "--config.train.batch-size", "2",
              "--config.train.save-every", "2"]
    source = tmp_path / "models"
    assert ablate.cli(common + ["--out", str(source)]) == 0
    out = tmp_path / "realtime"
    realtime = common + ["--out", str(out), "--models-from", str(source), "--axes", "steps=1;async=rtc1,naive1",
                         "--axis-variants", "fast", "--distill-steps", "1", "--distill-train-steps", "2",
                         "--prefix-tune", "2", "--prefix-train-steps", "2"]
    capsys.readouterr()
    assert ablate.cli(realtime) == 0
    log = capsys.readouterr().out
    assert "train_A_fast_s0: done already" in log and "distill_A_fast_d1_s0: finished" in log
    assert not (out / "runs" / "A" / "fast_s0").exists() and not (out / "data").exists()  # nothing trained here
    distilled = json.loads((out / "runs" / "A" / "fast_d1_s0" / "config.json").read_text())
    assert distilled["inference"]["steps"] == 1 and "models" in distilled["train"]["distill_from"]
    res = json.loads((out / "eval" / "A" / "fast_d1_s0" / "async_rtc1" / "results.json").read_text())
    assert res["config"]["chunking"] == "rtc" and res["config"]["inference_steps"] == 1
    assert not (out / "eval" / "A" / "fast_d1_s0" / "steps1").exists()  # a distilled sampler's steps are fixed
    # The prefix fine-tune: the other study's model and data, the prefix objective, evaluated sync and with rtc only.
    tuned = json.loads((out / "runs" / "A" / "fast_p2_s0" / "config.json").read_text())
    assert tuned["train"]["action_prefix_max"] == 2 and tuned["train"]["lr"] == 1e-4
    assert Path(tuned["data"]["dataset"]).resolve() == (source / "data").resolve()
    res = json.loads((out / "eval" / "A" / "fast_p2_s0" / "async_rtc1" / "results.json").read_text())
    assert res["config"]["chunking"] == "rtc" and res["config"]["rtc_method"] == "prefix"
    assert {p.name for p in (out / "eval" / "A" / "fast_p2_s0").iterdir() if p.is_dir()} == {"async_rtc1"}
    latency = json.loads((out / "latency_A.json").read_text())
    assert set(latency["step_counts"]) == {"1", "10"} and "fast_rtc" in latency["step_counts"]["1"]
    report = (out / "report.md").read_text()
    assert "## Few-step sampling: success and latency" in report and "## Asynchronous execution" in report
    assert "| A | plain, 1 step | 1 |" in report and "| A | distilled, 1 step | 1 |" in report
    assert "| A | distilled, 1 step | async rtc, delay 1 |" in report
    assert "| A | plain, 10 steps | async naive, delay 1 |" in report
    assert "(reference)" in report and (out / "realtime_steps.png").is_file()
    assert (out / "realtime_async.png").is_file()
    assert "![success and seam smoothness against the inference delay](realtime_async.png)" in report
    assert "## Against the targets" in report and "- A, plain, 10 steps, delay 1: rtc " in report
    assert "## Real-time chunking: training-time conditioning vs guidance" in report
    assert "| A | N = 2 | async rtc, delay 1 |" in report and "| A | N = 2 | synchronous |" in report
    assert "2 per prefix fine-tune (peak lr 0.0001)" in report
    # A second training seed the other study does not have: one line, the rest still runs.
    with pytest.raises(RuntimeError, match="train_A_fast_s1"):
        ablate.cli(realtime + ["--seeds", "0,1"])
    logs = "".join(p.read_text() for p in (out / "logs").glob("train_A_fast_s1*"))
    assert "is not there yet" in logs and str(source) in logs
    with pytest.raises(ValueError, match="models-from"):
        ablate.cli([a if a != "A:video_ffn_dim=32" else "A:video_ffn_dim=16" for a in realtime])


def test_models_from_needs_no_pretraining_data_and_plans_no_training(tmp_path):
    source = tmp_path / "video_prior"
    source.mkdir()
    (source / "cells.json").write_text(json.dumps({"P": {"init": "prior"}, "V": {"demos": "5", "video_ratio": "0.5"}}))
    argv = ["--preset", "tiny", "--out", str(tmp_path / "rt"), "--tasks", TASK, "--variants", "fast", "--cells",
            "P:init=prior;V:demos=5,video_ratio=0.5", "--models-from", str(source), "--axes", "async=rtc2",
            "--distill-steps", "1"]
    jobs, runs = study_plan.plan(parse_with_preset(argv, study_plan.AblateArgs, "test"))
    names = {j.name for j in jobs}
    assert not {n for n in names if n.startswith(("data", "corpus", "pretrain"))}
    train = {j.name: j for j in jobs}["train_P_fast_s0"]
    assert train.done.is_relative_to(source) and "is not there yet" in train.cmd[-1]
    assert runs["P/fast_d1_s0"]["variant"] == "fast_d1" and "async_rtc2" in runs["P/fast_d1_s0"]["evals"]
    jobs, runs = study_plan.plan(parse_with_preset(argv + ["--prefix-tune", "3"], study_plan.AblateArgs, "test"))
    tune = {j.name: j for j in jobs}["prefix_P_fast_p3_s0"]
    assert tune.after == ("train_P_fast_s0",) and tune.done.is_relative_to(tmp_path / "rt")
    cmd = " ".join(tune.cmd)
    assert f"--init-from {source / 'runs' / 'P' / 'fast_s0'} --init-action copy" in cmd
    assert "--config.train.action-prefix-max 3" in cmd and f"--dataset {source / 'data'}" in cmd
    assert "--video-dataset" not in cmd  # the tune is on the model's action data only
    assert set(runs["P/fast_p3_s0"]["evals"]) == {"base", "async_rtc2"}
    jobs, runs = study_plan.plan(parse_with_preset(argv + ["--prefix-tune", "2,3"], study_plan.AblateArgs, "test"))
    assert {"prefix_P_fast_p2_s0", "prefix_P_fast_p3_s0"} <= {j.name for j in jobs}
    assert runs["P/fast_p2_s0"]["variant"] == "fast_p2"
    for bad, message in ((["--prefix-tune", "-1"], "prefix-tune"), (["--prefix-tune", "99"], "shorter than the chunk"),
                         (["--prefix-tune", "two"], "prefix lengths such as"),
                         (["--prefix-tune", "2", "--prefix-train-steps", "0"], "prefix-train-steps")):
        with pytest.raises(ValueError, match=message):
            study_plan.plan(parse_with_preset(argv + bad, study_plan.AblateArgs, "test"))


def test_realtime_report_known_answer(tmp_path):
    """Designed outcomes: fewer steps and RTC cost nothing, naive switching loses 30 points and jerks at the seams,
    the one-step sampler is 4x faster; the report's tables and target lines must say exactly that."""
    from types import SimpleNamespace

    from fastwam.study.realtime_report import write_realtime_report

    tasks = [f"task{i}" for i in range(5)]

    def results(rate: float, seam: float, within: float) -> dict:
        k = round(10 * rate)
        cells = [{"task": t, "seed": s, "episode_success": [1] * k + [0] * (10 - k)} for t in tasks for s in (0, 1)]
        return {"partial": False, "cells": cells, "config": {"modes": ["fast"]},
                "summary": {"fast": {"smoothness": {"seam_jump": seam, "within_chunk_jump": within, "seams": 9}}}}

    design = {("fast", "base"): (0.5, 0.3, 0.1), ("fast", "steps1"): (0.5, 0.3, 0.1),
              ("fast", "async_rtc4"): (0.5, 0.12, 0.1), ("fast", "async_naive4"): (0.2, 0.4, 0.1),
              ("fast_d1", "base"): (0.5, 0.3, 0.1), ("fast_d1", "async_rtc4"): (0.5, 0.12, 0.1),
              ("fast_p4", "base"): (0.4, 0.3, 0.1), ("fast_p4", "async_rtc4"): (0.6, 0.11, 0.1)}
    runs = {}
    for seed in (0, 1, 2):
        for model in ("fast", "fast_d1", "fast_p4"):
            name = f"A/{model}_s{seed}"
            evals = {}
            for (m, cond), values in design.items():
                if m != model:
                    continue
                d = tmp_path / "eval" / name / ("" if cond == "base" else cond)
                d.mkdir(parents=True, exist_ok=True)
                (d / "results.json").write_text(json.dumps(results(*values)))
                evals[cond] = d
            runs[name] = {"variant": model, "seed": seed, "cell": "A", "run_dir": tmp_path / "runs" / name,
                          "eval_dir": evals["base"], "evals": evals}
    (tmp_path / "latency_A.json").write_text(json.dumps({"step_counts": {
        "1": {"fast": {"p50_ms": 2.5}}, "10": {"fast": {"p50_ms": 10.0}}}}))
    args = SimpleNamespace(axes="steps=1;async=rtc4,naive4", distill_steps="1", models_from="")
    report = write_realtime_report(tmp_path, runs, args, ["base", "steps1", "async_rtc4", "async_naive4"]).read_text()
    assert "| A | plain, 1 step | 1 | 50.0 [40.0, 60.0] | 50 / 50 / 50 | +0.0 [+0.0, +0.0] |" in report
    assert "| 2.5 | 4.0x |" in report
    assert "| A | plain, 10 steps | async naive, delay 4 | 20.0 [12.0, 28.0] | 20 / 20 / 20 | -30.0 [-39.0, -21.0] |" \
        in report and "| worse |" in report
    assert "| 0.400 | 0.100 | 4.00 |" in report and "| 0.120 | 0.100 | 1.20 |" in report
    targets = report.split("## Against the targets")[1]
    assert "- A, plain, 1 step: +0.0 [+0.0, +0.0] points vs plain 10 steps" in targets
    assert "at 4.0x lower latency and 10x fewer action-expert calls: the target (success within the MDE, >= 3x " \
           "faster) holds." in targets
    assert ("- A, plain, 10 steps, delay 4: rtc +0.0 [+0.0, +0.0] points vs synchronous (loses at most 2 points: yes); "
            "naive -30.0 [-39.0, -21.0] (below rtc: yes); seam / within-chunk jump 1.20 vs naive's 4.00 (closer to 1: "
            "yes).") in targets
    assert "- A, distilled, 1 step, delay 4: rtc +0.0" in targets
    # The prefix-tuned model: against the original in the same condition, not in the few-step table.
    tuned = report.split("## Real-time chunking: training-time conditioning vs guidance")[1].split("##")[0]
    assert "| A | N = 4 | async rtc, delay 4 | 50.0 [40.0, 60.0] | 60.0 [51.0, 70.0] | 60 / 60 / 60 | +10.0 [+5.0, " \
        "+16.0] | 8.3 | better | 1.20 | 1.10 |" in tuned
    assert "| A | N = 4 | synchronous | 50.0 [40.0, 60.0] | 40.0 [30.0, 50.0] | 40 / 40 / 40 | -10.0 " in tuned
    assert "prefix-tuned" not in report.split("## Few-step sampling")[1].split("##")[0]
