"""A dependency-free progress bar: redraws one line on a terminal, prints sparse lines in logs."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, desc: str = "", enabled: bool = True, stream=None):
        self.total, self.desc, self.enabled = total, desc, enabled and total > 0
        self.stream = stream or sys.stderr
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self.n, self.start, self.postfix = 0, time.perf_counter(), ""
        self._last_pct = -1

    def update(self, n: int = 1, **postfix) -> None:
        self.n += n
        if postfix:
            self.postfix = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in postfix.items())
        if not self.enabled:
            return
        pct = int(100 * self.n / self.total)
        if not self.tty and pct // 10 == self._last_pct // 10 and self.n < self.total:
            return  # in a log file, one line per 10%
        self._last_pct = pct
        elapsed = time.perf_counter() - self.start
        eta = elapsed / self.n * (self.total - self.n) if self.n else 0.0
        width = 24
        filled = int(width * self.n / self.total)
        line = f"{self.desc} [{'#' * filled}{'.' * (width - filled)}] {self.n}/{self.total} {elapsed:.0f}s<{eta:.0f}s {self.postfix}"
        self.stream.write(("\r" + line) if self.tty else line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()
