"""Ctrl-C (SIGINT) as a request to stop at the next safe point, instead of an exception wherever the program is.

Long commands (`fastwam train`, `fastwam eval metaworld`) install a `StopRequest` around their loop and check
`requested` between steps: the first Ctrl-C lets the current step finish and the command keep what it has (a
checkpoint, the episodes done so far), then exit with `errors.INTERRUPTED_EXIT`; a second Ctrl-C raises
KeyboardInterrupt at once (the CLI reports it in one line).
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator


class StopRequest:
    """Set by Ctrl-C (SIGINT) while installed; `message` is printed on the first one.

    A second Ctrl-C raises KeyboardInterrupt at once. Outside the main thread no handler can be installed and Ctrl-C
    keeps its default behaviour.
    """

    message = "Ctrl-C: stopping (Ctrl-C again to stop at once)"

    def __init__(self, message: str | None = None) -> None:
        self.requested = False
        if message is not None:
            self.message = message

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopRequest]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = signal.getsignal(signal.SIGINT)

        def on_sigint(signum, frame):
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True
            print(f"\n{self.message}", file=sys.stderr, flush=True)

        signal.signal(signal.SIGINT, on_sigint)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)
