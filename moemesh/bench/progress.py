"""The progress bar on stderr: requests done (of the total, or time elapsed of the duration), failures, tokens/s.

On a terminal it redraws one line at most 10 times a second; otherwise (a log file, CI) it prints a line per tenth
of the run, so logs stay short.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from moemesh.bench.stats import RequestRecord

WIDTH = 30


class Progress:
    def __init__(self, total: int | None, duration_s: float | None, stream: TextIO | None = None,
                 enabled: bool = True) -> None:
        self.total, self.duration_s = total, duration_s
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and self.stream.isatty()
        self.done = self.failed = self.tokens = 0
        self._start = time.monotonic()
        self._drawn_at = 0.0
        self._last_tenth = -1

    def fraction(self) -> float:
        parts = []
        if self.total:
            parts.append(self.done / self.total)
        if self.duration_s:
            parts.append((time.monotonic() - self._start) / self.duration_s)
        return min(1.0, max(parts)) if parts else 0.0

    def update(self, record: RequestRecord) -> None:
        self.done += 1
        self.failed += 0 if record.ok else 1
        self.tokens += record.output_tokens if record.ok else 0
        if not self.enabled:
            return
        now = time.monotonic()
        tenth = int(self.fraction() * 10)
        if self.tty and now - self._drawn_at >= 0.1:
            self._drawn_at = now
            self.stream.write("\r" + self.line())
        elif not self.tty and tenth > self._last_tenth:
            self._last_tenth = tenth
            self.stream.write(self.line() + "\n")
        self.stream.flush()

    def line(self) -> str:
        elapsed = max(time.monotonic() - self._start, 1e-9)
        filled = int(self.fraction() * WIDTH)
        of = f"/{self.total}" if self.total else ""
        return (f"bench [{'#' * filled}{'.' * (WIDTH - filled)}] {self.done}{of} requests, {self.failed} failed, "
                f"{self.tokens / elapsed:.1f} tok/s, {elapsed:.0f} s")

    def close(self) -> None:
        if self.enabled and (self.tty or self._last_tenth < 10):  # a log already has its 100% line
            self.stream.write(("\r" if self.tty else "") + self.line() + "\n")
            self.stream.flush()
