"""A progress line for a command that runs longer than a few seconds: percent done and the time left.

Shared by every long command of the CLI (``agent simulate``, ``run train``, ``run score``, ``demo``):
the caller says how much of the work is done (a share, 0..1) and :class:`Progress` decides whether
and how to show it.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

__all__ = ["Progress", "duration"]


class Progress:
    """A progress line on stderr -- percent done and the time left -- once a run has taken longer than
    ``after`` seconds. On a terminal it rewrites itself; elsewhere it is quiet unless ``verbose``, and
    then prints a line every tenth."""

    def __init__(self, label: str, *, stream: TextIO | None = None, verbose: bool = False, after: float = 3.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.label, self.after, self.clock = label, after, clock
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.enabled = self.tty or verbose
        self.started = clock()
        self.shown = -1.0
        self.width = 0

    def text(self, share: float) -> str:
        """``<label>: 40%, 12 s so far, about 18 s left`` (empty before ``after`` seconds or without a share)."""
        elapsed = self.clock() - self.started
        if elapsed < self.after or share <= 0 or share >= 1:
            return ""
        left = elapsed * (1 - share) / share
        return f"{self.label}: {share:4.0%}, {duration(elapsed)} so far, about {duration(left)} left"

    def __call__(self, share: float) -> None:
        if not self.enabled or (not self.tty and share < self.shown + 0.1):
            return
        line = self.text(share)
        if not line:
            return
        if self.tty:
            self.stream.write("\r" + line.ljust(self.width))
            self.width = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
        self.shown = share

    def close(self) -> None:
        """Wipe the line on a terminal (the results follow)."""
        if self.tty and self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.stream.flush()
            self.width = 0


def duration(seconds: float) -> str:
    """``42 s`` or ``3 min 07 s``."""
    seconds = int(round(seconds))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"
