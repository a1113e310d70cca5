"""A progress bar for long runs, on stderr and only on a terminal.

``python -m cb_lab simulate|compare`` and ``LLMEngine.generate`` draw one once a run has taken
a second: ``label [#####.....] 312/1024 requests, 2,345 steps``. Off the terminal (a log file,
a pipe, a test) nothing is written, so output stays clean.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

__all__ = ["ProgressBar"]


class ProgressBar:
    """``label [#####.....] 312/1024 requests, 2,345 steps`` on stderr, once a run has taken ``delay`` seconds.

    Drawn only on a terminal (``enabled=None``: when the stream is a tty), so a log file gets no
    carriage-return lines.
    """

    WIDTH = 30

    def __init__(self, label: str, total: int, stream: TextIO | None = None, *, delay: float = 1.0,
                 clock: Callable[[], float] = time.perf_counter, enabled: bool | None = None) -> None:
        self.label, self.total, self.stream = label, total, stream if stream is not None else sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.delay, self.clock = delay, clock
        self.start = self.last = clock()
        self.width = 0  # of the line drawn last (0: nothing drawn yet)

    def __call__(self, steps: int, finished: int) -> None:
        now = self.clock()
        if not self.enabled or now - self.start < self.delay or (now - self.last < 0.1 and finished < self.total):
            return
        self.last = now
        filled = self.WIDTH * finished // max(self.total, 1)
        line = (f"{self.label} [{'#' * filled}{'.' * (self.WIDTH - filled)}] {finished}/{self.total} requests, "
                f"{steps:,} steps")
        self.stream.write("\r" + line.ljust(self.width))
        self.stream.flush()
        self.width = len(line)

    def close(self) -> None:
        """Clear the bar (if one was drawn), so the results start on a clean line."""
        if self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.stream.flush()
