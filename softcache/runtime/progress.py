"""A small progress reporter: samples done, samples/s and ETA on stderr.

On a terminal it redraws one line (at most ten times a second); in a log (CI, a batch job) it prints a
line every `log_every` seconds instead, so logs stay readable.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """Report progress through `total` units of work.

    Args:
        total: units expected (samples).
        desc: a short label.
        enabled: print nothing when False.
        stream: where to print (stderr by default).
        log_every: seconds between lines when `stream` is not a terminal.
        initial: units already done before this run (a resumed job).
        unit: what a unit is, for the rate (``samples``, ``tokens``, ``steps``).
    """

    def __init__(
        self,
        total: int,
        desc: str,
        *,
        enabled: bool = True,
        stream: TextIO | None = None,
        log_every: float = 10.0,
        initial: int = 0,
        unit: str = "samples",
    ) -> None:
        self.total = total
        self.desc = desc
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty()
        self.log_every = log_every
        self.unit = unit
        self.done = initial
        self._start_done = initial
        self._t0 = time.perf_counter()
        self._last_print = 0.0
        self._printed_done = -1

    def update(self, n: int) -> None:
        """Record `n` more units done."""
        self.done += n
        if not self.enabled:
            return
        now = time.perf_counter()
        interval = 0.1 if self.tty else self.log_every
        if now - self._last_print >= interval or self.done >= self.total:
            self._last_print = now
            self._print(now)

    @property
    def rate(self) -> float:
        """Units per second since this reporter started (excluding `initial`)."""
        elapsed = time.perf_counter() - self._t0
        return (self.done - self._start_done) / elapsed if elapsed > 0 else 0.0

    def close(self) -> None:
        """Finish the line."""
        if self.enabled:
            if self._printed_done != self.done:
                self._print(time.perf_counter())
            if self.tty:
                self.stream.write("\n")
            self.stream.flush()

    def _print(self, now: float) -> None:
        self._printed_done = self.done
        rate = self.rate
        remaining = (self.total - self.done) / rate if rate > 0 else float("nan")
        frac = self.done / self.total if self.total else 1.0
        width = 24
        bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
        eta = _fmt_seconds(remaining) if remaining == remaining else "?"
        line = (
            f"{self.desc} [{bar}] {self.done}/{self.total} ({frac:6.1%}) "
            f"{rate:,.0f} {self.unit}/s ETA {eta}"
        )
        if self.tty:
            self.stream.write("\r" + line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def _fmt_seconds(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
