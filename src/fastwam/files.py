"""Writing files so that a process stopped at any moment leaves either the old file or the new one, never half of one.

Evaluation results, run records and the study driver's bookkeeping are read back by the next run (`--resume`, a
restarted `fastwam ablate`); a truncated JSON file there would turn an interruption into a crash. Every such write goes
through `replacing`: the bytes go to a hidden temporary file beside the target (same directory, so the same file
system), which then takes the target's name in one `os.replace`, atomic on POSIX and Windows. The temporary file is
fsynced before the rename and the directory after it, so a power cut (not only a killed process) also leaves a whole
file: without that, some file systems can commit the rename before the data and leave an empty file behind.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; on leaving the block without an error it replaces `path` in one step.

    On an error the temporary file is removed and `path` is left as it was. The name carries the pid so concurrent
    writers (ranks, parallel jobs) never share a temporary file.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def fsync_path(path: Path) -> None:
    """Flush a file's (or a directory's entries') data to the disk; directories cannot be opened on Windows: skipped."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if path.is_dir():
            return
        raise
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` to `path` atomically (see `replacing`)."""
    with replacing(path) as tmp:
        tmp.write_text(text)
