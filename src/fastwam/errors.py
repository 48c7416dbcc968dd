"""User errors: mistakes the user can fix — a bad file, field or value, a missing dataset, a run directory in use.

Raise `UserError` (or a subclass: `checkpoint.CheckpointError`, `data.lerobot.DatasetError`) with a message that names
the file or field and says what to do. The CLI (`fastwam.cli.main`) prints it as one line and exits with code 2;
`FASTWAM_DEBUG=1` (or `fastwam --debug ...`) shows the traceback too. It subclasses ValueError, the convention for bad
input everywhere in this package, so code and tests that catch ValueError keep working, and the CLI reports a plain
ValueError the same way.
"""

from __future__ import annotations

import os

DEBUG_ENV = "FASTWAM_DEBUG"
USER_ERROR_EXIT = 2
INTERRUPTED_EXIT = 130  # the shell's convention for a process ended by SIGINT


class UserError(ValueError):
    """A problem in what the user gave (file, field, value): reported as one line, exit code 2."""


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")
