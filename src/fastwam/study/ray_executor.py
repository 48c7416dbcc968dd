"""Running a study's jobs as Ray tasks: `fastwam ablate --executor ray [--ray-address ADDR]`.

Every job (data, pretraining, training, evaluation, latency) is the same `fastwam` command the local executor runs,
started inside a Ray task that declares what the job needs (`Job.cpus`, `Job.gpus`), so Ray places it on a node with
room. Without an address a local Ray with `--parallel` CPUs is started (the same command then works on a laptop); with
one (`auto` on a cluster node, `ray://head:10001` from outside) the jobs spread over the cluster. The study's
bookkeeping is unchanged: the driver decides what is done from the files (`Job.is_done`), so a rerun resumes, the
recorded command, the report and `--publish` are the local executor's, and a job gives the same results.json
wherever it runs. The study folder (OUT, the datasets) must be on a file system every node sees, with fastwam
installed on every node; each task runs the job with its node's own Python (the driver's interpreter path, when it
is not there, is replaced by the worker's).

Ray is an optional dependency: `pip install "fastwam[ray]"`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from fastwam.errors import UserError
from fastwam.study.plan import Job

# A cluster queues what does not fit: the driver submits every ready job and lets Ray place them.
CLUSTER_CAPACITY = 10_000


def _run_job(cmd: list[str], log_path: str, env: dict[str, str], cwd: str) -> int:
    """The body of a job's Ray task: the job's command as a subprocess, its output appended to the job's log."""
    if cmd[1:3] == ["-m", "fastwam"] and not os.path.exists(cmd[0]):
        cmd = [sys.executable, *cmd[1:]]  # the driver's interpreter is not on this node: this worker's is
    with open(log_path, "a") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env}, cwd=cwd,
                                start_new_session=True)
        try:
            return proc.wait()
        finally:
            if proc.poll() is None:  # the task was cancelled (Ctrl-C on the driver): do not leave the job running
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()


class _RayHandle:
    """A submitted job, polled like a subprocess (`poll()` -> exit code or None)."""

    def __init__(self, ref):
        self.ref, self.returncode, self.pid = ref, None, None

    def poll(self) -> int | None:
        import ray

        if self.returncode is None:
            ready, _ = ray.wait([self.ref], timeout=0)
            if ready:
                try:
                    self.returncode = int(ray.get(self.ref))
                except Exception as e:  # noqa: BLE001 - a task that died (node lost, cancelled) is a failed job
                    print(f"[ablate] Ray task failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                    self.returncode = -1
        return self.returncode


class RayExecutor:
    name = "ray"

    def __init__(self, address: str = "", parallel: int = 2, jobs: list[Job] | None = None):
        try:
            import ray
        except ImportError:
            raise UserError('--executor ray needs Ray: pip install "fastwam[ray]"') from None
        self._ray = ray
        self.local = not address
        self._started = not ray.is_initialized()
        if self._started:
            kwargs = dict(include_dashboard=False, log_to_driver=False, ignore_reinit_error=True,
                          configure_logging=False)
            if self.local:
                # As many CPUs as --parallel (and at least what the largest job asks for, or it could never start).
                need = max([j.cpus for j in jobs or []] + [1.0])
                kwargs.update(num_cpus=int(max(parallel, need)), num_gpus=0 if not _has_cuda() else None)
            else:
                kwargs.update(address=address)
            ray.init(**kwargs)
        self._capacity = max(parallel, 1) if self.local else CLUSTER_CAPACITY
        self._remote = ray.remote(_run_job)
        self._refs: list = []

    def capacity(self) -> int:
        return self._capacity

    def adopt(self, job: Job, logs: Path) -> None:
        return None  # a Ray job does not outlive the driver that submitted it: rerunning starts it again (resuming)

    def start(self, job: Job, logs: Path, env: dict[str, str]) -> _RayHandle:
        overrides = {k: v for k, v in env.items() if k in ("OMP_NUM_THREADS", "TORCHINDUCTOR_COMPILE_THREADS",
                                                          "MUJOCO_GL", "FASTWAM_DEBUG", "PYTHONPATH")}
        ref = self._remote.options(num_cpus=job.cpus, num_gpus=job.gpus, max_retries=0,
                                   name=f"fastwam:{job.name}").remote(
            job.cmd, str((logs / f"{job.name}.log").resolve()), overrides, os.getcwd())
        self._refs.append(ref)
        return _RayHandle(ref)

    def finished(self, job: Job, logs: Path) -> None:
        pass

    def close(self) -> None:
        for ref in self._refs:  # whatever still runs (the driver stopped early) is cancelled with it
            try:
                self._ray.cancel(ref)
            except Exception:  # noqa: BLE001 - finished refs cannot be cancelled; nothing to do
                pass
        if self._started:
            self._ray.shutdown()


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False
