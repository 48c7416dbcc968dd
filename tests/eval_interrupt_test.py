"""Ctrl-C during `fastwam eval metaworld`: the episodes finished so far are kept, marked partial, with exit code 130;
the env workers shut down; a partial evaluation is neither a result (reports) nor a finished job (ablate)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("metaworld")

from fastwam.errors import INTERRUPTED_EXIT  # noqa: E402
from fastwam.eval import metaworld as mwe  # noqa: E402
from fastwam.eval.envpool import EnvSettings  # noqa: E402
from fastwam.study.plan import Job  # noqa: E402

TASK = "reach-v3"

# The zero policy, slowed a little and announcing each episode it starts: once the second one has started (one env),
# the first has finished, and the other 18 take seconds more.
SCRIPT = r"""
import sys, time
from fastwam.eval import metaworld_policies as p

started = 0

def episode_started(self, slot, spec):
    global started
    started += 1
    print(f"started {started}", flush=True)

zero_act = p._Zero.act

def act(self, obs, specs, mode, want_video):
    time.sleep(0.01)
    return zero_act(self, obs, specs, mode, want_video)

p._Zero.episode_started, p._Zero.act = episode_started, act
from fastwam.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")


def test_ctrl_c_keeps_the_finished_episodes_as_partial_results(tmp_path):
    out = tmp_path / "eval"
    cmd = [sys.executable, "-c", SCRIPT, "eval", "metaworld", "--policy", "zero", "--tasks", TASK, "--episodes", "20",
           "--seeds", "0", "--max-steps", "200", "--replan", "8", "--workers", "1", "--num-envs", "1", "--videos", "0",
           "--no-progress", "--out", str(out)]
    env = {**os.environ, "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")}
    env.pop("FASTWAM_DEBUG", None)
    # Its own process group, so the signal goes to the evaluation and its env worker as a terminal's Ctrl-C does.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        lines = []
        while "started 2" not in lines:
            line = proc.stdout.readline()
            assert line, f"the evaluation ended early:\n{proc.stderr.read()}"
            lines.append(line.strip())
        workers = _children(proc.pid)
        assert workers  # the env worker process
        os.killpg(proc.pid, signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == INTERRUPTED_EXIT, stderr
    assert "Traceback" not in stderr
    message = [line for line in stderr.splitlines() if "interrupted" in line]
    assert len(message) == 1 and message[0].startswith("fastwam eval metaworld: interrupted: ")

    res = json.loads((out / "results.json").read_text())
    assert res["partial"] is True and res["episodes_planned"] == 20
    assert 1 <= res["episodes_done"] < 20
    (cell,) = res["cells"]
    assert cell["episodes_planned"] == 20 and cell["episodes"] == res["episodes_done"]
    assert len(cell["episode_index"]) == len(cell["episode_success"]) == cell["episodes"]
    assert cell["episode_index"][0] == 0 and cell["episode_length"][0] == 200  # zero actions: fails at max_steps
    assert res["summary"]["zero"]["pooled"]["episodes"] == res["episodes_done"]
    summary = (out / "summary.md").read_text()
    assert f"Partial: stopped early (Ctrl-C) after {res['episodes_done']} of 20 episodes" in summary
    assert "Partial" in stdout
    assert not list(out.glob(".*.tmp-*"))  # written whole
    deadline = time.monotonic() + 15
    while not all(_gone(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert all(_gone(w) for w in workers), "env worker processes were left running"


def _run(mode: str, records: list[tuple[str, int, int, bool]]) -> dict:
    return {"mode": mode, "calls": [{"ms": 5.0, "batch": 1, "cells": [(TASK, 0)]}], "videos": [], "env_steps": 30,
            "rollout_s": 1.0, "overhead": {},
            "records": [{"task": t, "seed": s, "env_seed": mwe.env_seed_for(s), "episode": e, "success": ok,
                         "length": 10, "max_reward": 10.0 if ok else 1.0} for t, s, e, ok in records]}


def test_partial_results_count_what_finished_and_the_modes_not_reached():
    class Joint(mwe._Adapter):
        name, horizon, modes = "checkpoint", 16, ("fast", "joint")

    settings = EnvSettings(image_size=(32, 32), cameras=("scene",), max_steps=50)
    # fast: episodes 0 and 3 of seed 0 finished, none of seed 1; joint: not reached.
    runs = [_run("fast", [(TASK, 0, 3, True), (TASK, 0, 0, False)])]
    res = mwe._assemble(Joint(), runs, ["fast", "joint"], [TASK], [0, 1], 4, 8, 50, settings, 1, 1, 1, True, 0.1, 2.0)
    assert res["partial"] is True and (res["episodes_done"], res["episodes_planned"]) == (2, 16)
    by = {(c["mode"], c["seed"]): c for c in res["cells"]}
    assert by["fast", 0]["episode_index"] == [0, 3] and by["fast", 0]["episode_success"] == [0, 1]
    assert by["fast", 1]["episodes"] == 0 and by["joint", 0]["episodes"] == 0
    assert all(c["episodes_planned"] == 4 for c in res["cells"])
    # Means are over the cells that have episodes: seed 1's empty cell does not count as a failure.
    assert res["summary"]["fast"]["mean_success_rate"] == 0.5
    assert res["summary"]["fast"]["per_seed_mean_success_rate"] == {"0": 0.5, "1": 0.0}
    assert res["summary"]["joint"]["pooled"]["episodes"] == 0
    assert "Partial: stopped early (Ctrl-C) after 2 of 16 episodes" in mwe.summary_markdown(res)

    whole = mwe._assemble(Joint(), [_run("fast", [(TASK, 0, 0, True), (TASK, 0, 1, False)])], ["fast"], [TASK], [0],
                          2, 8, 50, settings, 1, 1, 1, True, 0.1, 2.0)
    assert whole["partial"] is False and "episodes_done" not in whole
    assert "episode_index" not in whole["cells"][0] and "Partial" not in mwe.summary_markdown(whole)


def test_a_partial_evaluation_is_not_a_finished_job(tmp_path):
    job = Job("eval_x", ["true"], tmp_path / "results.json")
    assert not job.is_done()
    job.done.write_text(json.dumps({"partial": True, "cells": []}))
    assert not job.is_done()
    job.done.write_text(json.dumps({"partial": False, "cells": []}))
    assert job.is_done()
    job.done.write_text(json.dumps({"cells": []}))  # written before results said whether they are partial
    assert job.is_done()
    job.done.write_text('{"partial": tr')  # cut short
    assert not job.is_done()
    other = Job("data", ["true"], tmp_path / "data")
    other.done.mkdir()
    assert other.is_done()
