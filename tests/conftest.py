import atexit
import os
import shutil
import tempfile

import pytest
import torch

# Tests are CPU-only and small: keep them on one thread each so pytest-xdist workers do not oversubscribe 2 cores.
torch.set_num_threads(1)
os.environ.setdefault("MUJOCO_GL", "egl")
# Compiled-kernel tests start from an empty inductor cache of their own (per worker process): hermetic, as in CI, and
# immune to a truncated kernel that an interrupted compile left in the user's cache ("file too short" on import).
os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="fastwam_inductor_")
atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)


@pytest.fixture(autouse=True)
def _no_debug_traces(monkeypatch):
    """Every test starts without FASTWAM_DEBUG: `fastwam --debug` run in-process sets it for the subprocesses a command
    starts, and it would otherwise leak into later tests' subprocesses, whose one-line errors then carry tracebacks."""
    monkeypatch.delenv("FASTWAM_DEBUG", raising=False)
    yield
    os.environ.pop("FASTWAM_DEBUG", None)


@pytest.fixture
def record_fsyncs(monkeypatch):
    """`record_fsyncs(probe)` starts recording every `os.fsync` as (the synced path, `probe()` at that moment); it
    returns the list the calls go into. Linux only (the path is read through /proc/self/fd)."""
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("names an fd through /proc (Linux)")
    real_fsync = os.fsync

    def start(probe):
        calls = []

        def recording_fsync(fd):
            calls.append((os.readlink(f"/proc/self/fd/{fd}"), probe()))
            real_fsync(fd)

        monkeypatch.setattr(os, "fsync", recording_fsync)
        return calls

    return start


@pytest.fixture
def tiny_cfg():
    from fastwam.config import get_preset

    return get_preset("tiny")
