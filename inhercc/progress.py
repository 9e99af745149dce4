"""The one progress bar (calibration, sensitivity, distillation)."""

from __future__ import annotations

import sys
import time


class Progress:
    """A progress bar on stderr: redrawn in place on a terminal, a line per quarter otherwise (logs)."""

    def __init__(self, total: int, label: str, enabled: bool = True) -> None:
        self.total, self.label, self.enabled = max(1, total), label, enabled
        self.done, self.t0, self.tty = 0, time.perf_counter(), enabled and sys.stderr.isatty()
        self._quarter = 0

    def step(self, n: int = 1) -> None:
        self.done += n
        if not self.enabled:
            return
        frac = min(1.0, self.done / self.total)
        if not self.tty and int(4 * frac) <= self._quarter:
            return
        self._quarter = int(4 * frac)
        bar = "#" * int(24 * frac) + "." * (24 - int(24 * frac))
        line = f"{self.label} [{bar}] {self.done}/{self.total} {time.perf_counter() - self.t0:.1f}s"
        sys.stderr.write(f"\r{line}" if self.tty else f"{line}\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()
