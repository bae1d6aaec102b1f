"""Ctrl-C during training: finish the current step, write a checkpoint, then stop.

A second Ctrl-C interrupts at once. Signal handlers can only be set from the main thread;
elsewhere this does nothing and Ctrl-C behaves as usual.
"""

from __future__ import annotations

import signal
import sys
import threading


class StopOnInterrupt:
    def __init__(self):
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\ninterrupt: stopping after this step with a checkpoint (Ctrl-C again to abort now)",
              file=sys.stderr, flush=True)

    def __enter__(self) -> "StopOnInterrupt":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
