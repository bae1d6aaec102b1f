"""Ctrl-C during training: finish the current step, write a checkpoint, then stop.

A second Ctrl-C interrupts at once. Signal handlers can only be set from the main thread;
elsewhere this does nothing and Ctrl-C behaves as usual.
"""

from __future__ import annotations

import signal
import sys
import threading


class StopOnInterrupt:
    def __init__(self, announce: bool = True):
        self.announce = announce  # one notice per run: only rank 0 of several processes says it
        self.requested = False
        self._installed = False
        self._previous = None

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if self.announce:
            print("\ninterrupt: stopping after this step with a checkpoint (Ctrl-C again to abort now)",
                  file=sys.stderr, flush=True)

    def __enter__(self) -> "StopOnInterrupt":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc) -> None:
        # Restore exactly what was there: the default handler, SIG_IGN (a background job, nohup)
        # or the caller's own. None means a handler Python did not set; SIG_DFL is the closest.
        if self._installed:
            signal.signal(signal.SIGINT, signal.SIG_DFL if self._previous is None else self._previous)
            self._installed = False
            self._previous = None
