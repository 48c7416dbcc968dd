"""Process memory readings shared by the memory benchmarks (`bench/memory.py` and `bench/official_memory.py`)."""

from __future__ import annotations

import os
import platform

TARGET_RATIO = 1.2
_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field} (Linux only)")


def _rss_bytes() -> int:
    return _status_bytes("VmRSS")


def _peak_rss_bytes() -> int:
    # VmHWM: the high-water mark of this process image's resident set (file pages included). Not ru_maxrss: Linux
    # carries the parent's peak across fork + exec into it, so it would report the checkpoint writer's peak.
    return _status_bytes("VmHWM")


def _machine() -> dict:
    import torch

    mem = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    return {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "ram_bytes": mem,
            "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()}


def peak_report(peak: int, ckpt_bytes: int, rss_before: int, target: float = TARGET_RATIO) -> dict:
    """The ratios every memory report carries, with the machine that measured them."""
    return {
        "peak_rss_gb": peak / 1e9,
        "ratio_peak_to_checkpoint": peak / ckpt_bytes,
        # What the loader itself adds on top of the interpreter + torch import.
        "ratio_loader_to_checkpoint": (peak - rss_before) / ckpt_bytes,
        "target_ratio": target,
        "pass": peak / ckpt_bytes <= target,
        "machine": _machine(),
    }
