"""Running a study's jobs on this machine: dependencies, `--parallel` at a time, logs, pid files, time estimates.

A restarted driver watches the jobs an earlier one left running (their pid files) instead of starting them twice.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from fastwam.files import write_text_atomic
from fastwam.study.plan import Job


class _Adopted:
    """A job a previous driver started that is still running (its pid file names a live fastwam process): watched
    instead of started twice, so the study's driver can be stopped and restarted at any time."""

    def __init__(self, pid: int):
        self.pid, self.returncode = pid, None

    def poll(self) -> int | None:
        if _alive_fastwam(self.pid):
            return None
        self.returncode = 0  # unknown: the job counts as done if its output exists
        return self.returncode


def _alive_fastwam(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return b"fastwam" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return False


def _adopt(pid_file: Path) -> _Adopted | None:
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    return _Adopted(pid) if _alive_fastwam(pid) else None


def _seedless(name: str) -> str:
    """"eval_M_idm_s2_replan4" -> "eval_M_idm_s*_replan4": the same job for another training seed."""
    return re.sub(r"_s\d+(?=_|$)", "_s*", name)


def load_durations(logs: Path) -> dict[str, float]:
    """Minutes each finished job took (OUT/logs/durations.json); {} when there is none or it is unreadable."""
    try:
        data = json.loads((logs / "durations.json").read_text())
        return {str(k): float(v) for k, v in data.items()}
    except (OSError, ValueError, AttributeError, TypeError):
        return {}


def record_duration(logs: Path, name: str, minutes: float) -> None:
    durations = load_durations(logs)
    durations[name] = round(minutes, 2)
    write_text_atomic(logs / "durations.json", json.dumps(durations, indent=1, sort_keys=True) + "\n")


def estimate_minutes(name: str, durations: dict[str, float]) -> float | None:
    """The median time of the same job for the training seeds that ran it start to finish; None when none has."""
    same = [m for n, m in durations.items() if _seedless(n) == _seedless(name)]
    return statistics.median(same) if same else None


def progress_line(n_done: int, n_total: int, pending: list[str], running: dict[str, float],
                  durations: dict[str, float], parallel: int) -> str:
    """"[ablate] 150/230 jobs done; ~5.9 h of job time left (~3.0 h wall at 2 in parallel) ...": the estimate
    counts the pending jobs and the running ones' remainders (running maps a name to minutes elapsed)."""
    left, unknown = 0.0, 0
    for name, elapsed in [*((n, 0.0) for n in pending), *running.items()]:  # a pending job has 0 minutes elapsed
        est = estimate_minutes(name, durations)
        if est is None:
            unknown += 1
        else:
            left += max(est - elapsed, 0.0)
    line = f"[ablate] {n_done}/{n_total} jobs done, {len(running)} running"
    n_left = len(pending) + len(running)
    if n_left and unknown == n_left:
        # Nothing to estimate from (the first training seed, or a one-seed study such as the demo): "~0.0 h left"
        # would read as "almost done".
        line += "; no time estimate yet (no remaining job has been timed for another training seed)"
    elif n_left:
        line += (f"; ~{left / 60:.1f} h of job time left (~{left / 60 / max(parallel, 1):.1f} h wall at {parallel} "
                 f"in parallel), from the times other training seeds took")
        if unknown:
            line += f"; {unknown} job(s) not yet timed for any seed, not counted"
    return line


class LocalExecutor:
    """Jobs as subprocesses of this driver, `parallel` at a time. Each running job's pid is in OUT/logs/NAME.pid: a
    driver started while an earlier one's jobs still run (after a crash, or stopped to change the plan) watches those
    jobs instead of starting them again."""

    name = "local"

    def __init__(self, parallel: int):
        self.parallel = parallel

    def capacity(self) -> int:
        return self.parallel

    def adopt(self, job: Job, logs: Path) -> _Adopted | None:
        return _adopt(logs / f"{job.name}.pid")

    def start(self, job: Job, logs: Path, env: dict[str, str]):
        log = open(logs / f"{job.name}.log", "a")
        log.write(f"$ {' '.join(job.cmd)}\n")
        log.flush()
        proc = subprocess.Popen(job.cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        (logs / f"{job.name}.pid").write_text(f"{proc.pid}\n")
        return proc

    def finished(self, job: Job, logs: Path) -> None:
        (logs / f"{job.name}.pid").unlink(missing_ok=True)

    def close(self) -> None:
        pass


def job_environment() -> dict[str, str]:
    """One thread per job, compilation included (inductor would start a compile worker per core)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "TORCHINDUCTOR_COMPILE_THREADS": "1",
            "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")}


def run_jobs(jobs: list[Job], out: Path, parallel: int, executor=None) -> None:
    """Run pending jobs respecting dependencies; logs in OUT/logs/NAME.log. The executor starts and watches them:
    `LocalExecutor(parallel)` (the default) runs them here, `ray_executor.RayExecutor` as Ray tasks. Whatever the
    executor, a job counts as done only when its output exists (`Job.is_done`), so a rerun resumes the study."""
    executor = executor or LocalExecutor(parallel)
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    pending = [j for j in jobs if not j.is_done()]
    done = {j.name for j in jobs} - {j.name for j in pending}
    for j in jobs:
        if j.name in done:
            print(f"[ablate] {j.name}: done already, skipping")
    running: dict[str, tuple[Any, float]] = {}
    resumed: set[str] = set()  # jobs that continue earlier work: their time is not the job's duration
    for j in list(pending):
        adopted = executor.adopt(j, logs)
        if adopted is not None:
            pending.remove(j)
            running[j.name] = (adopted, time.time())
            resumed.add(j.name)  # its start time is unknown
            print(f"[ablate] {j.name}: still running (pid {adopted.pid}) from an earlier driver; watching it")
    failed: list[str] = []
    by_name = {j.name: j for j in jobs}

    def report_progress() -> None:
        now = time.time()
        print(progress_line(len(done), len(jobs), [j.name for j in pending],
                            {n: (now - t0) / 60 for n, (_, t0) in running.items()}, load_durations(logs),
                            executor.capacity()), flush=True)

    report_progress()
    env = job_environment()
    try:
        while pending or running:
            finished = False
            for name, (proc, t0) in list(running.items()):
                if proc.poll() is not None:
                    del running[name]
                    job = by_name[name]
                    executor.finished(job, logs)
                    if proc.returncode == 0 and job.is_done():
                        done.add(name)
                        minutes = (time.time() - t0) / 60
                        print(f"[ablate] {name}: finished in {minutes:.1f} min")
                        if name not in resumed:
                            record_duration(logs, name, minutes)
                        finished = True
                    else:
                        failed.append(name)
                        print(f"[ablate] {name}: FAILED (exit {proc.returncode}); see {logs / (name + '.log')}")
            ready = sorted((j for j in pending if all(a in done for a in j.after)), key=lambda j: j.priority)
            blocked = [j for j in pending if any(a in failed for a in j.after)]
            for j in blocked:
                pending.remove(j)
                failed.append(j.name)
                print(f"[ablate] {j.name}: skipped (a job it needs failed)")
            while ready and len(running) < executor.capacity():
                if running and (ready[0].alone or any(by_name[n].alone for n in running)):
                    break  # a timing job waits for an idle machine, and keeps it idle while it runs
                job = ready.pop(0)
                pending.remove(job)
                if job.resumes_from is not None and job.resumes_from.exists():
                    resumed.add(job.name)
                print(f"[ablate] {job.name}: starting")
                running[job.name] = (executor.start(job, logs, env), time.time())
            if finished:  # after the next jobs started, so "running" counts them
                report_progress()
            time.sleep(1.0)
    finally:
        executor.close()
    if failed:
        raise RuntimeError(f"ablation jobs failed: {', '.join(failed)} (logs in {logs}); rerun to retry them")
