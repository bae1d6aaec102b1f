"""One self-overwriting status line on stderr (no dependency); plain lines when not a terminal."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, label: str = "", enabled: bool = True, min_interval: float = 0.5):
        self.total, self.label, self.enabled, self.min_interval = total, label, enabled, min_interval
        self.tty = sys.stderr.isatty()
        self.last = 0.0
        self.width = 0

    def update(self, step: int, **fields):
        """Show fields at most every min_interval seconds (every 10% of the run when not a terminal)."""
        if not self.enabled:
            return
        now = time.monotonic()
        tenth = max(1, self.total // 10)
        due = now - self.last >= self.min_interval if self.tty else step % tenth == 0
        if not (due or step == self.total):
            return
        self.last = now
        text = f"{self.label}step {step}/{self.total} " + " ".join(f"{k} {v}" for k, v in fields.items())
        if self.tty:
            sys.stderr.write("\r" + text.ljust(self.width))
            self.width = len(text)
        else:
            sys.stderr.write(text + "\n")
        sys.stderr.flush()

    def close(self):
        if self.enabled and self.tty and self.width:
            sys.stderr.write("\n")
            sys.stderr.flush()
