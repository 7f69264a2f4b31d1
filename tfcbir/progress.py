"""A one-line progress bar with values, rate and ETA (a plain line every so often off a TTY).

Training counts steps; other long jobs (the analysis report's parts, embedding images) name
their own ``unit`` and may show a ``text`` label, e.g. the part being worked on.
"""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(
        self,
        total: int,
        start: int = 0,
        stream=None,
        every_s: float = 10.0,
        unit: str = "steps",
    ):
        self.total, self.start, self.unit = total, start, unit
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.every_s = every_s
        self.t0 = self.last_print = time.monotonic()

    def rate(self, step: int) -> float:
        elapsed = time.monotonic() - self.t0
        return (step - self.start) / elapsed if elapsed > 0 else 0.0

    def update(self, step: int, text: str = "", **values) -> None:
        """Show ``step`` of ``total``, the named ``values`` (numbers) and ``text``."""
        now = time.monotonic()
        if not self.tty and now - self.last_print < self.every_s and step < self.total:
            return
        self.last_print = now
        rate = self.rate(step)
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        width = 24
        done = int(width * step / max(self.total, 1))
        bar = "=" * done + ">" * (done < width) + "." * (width - done - 1)
        shown = " ".join([f"{k} {v:.4g}" for k, v in values.items()] + ([text] if text else []))
        line = f"{step}/{self.total} [{bar}] {shown} {rate:.2f} {self.unit}/s ETA {_clock(eta)}"
        if self.tty:
            self.stream.write("\r" + line + "\x1b[K")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def note(self, text: str) -> None:
        """A message on its own line, not overwritten by the bar."""
        self.stream.write(("\n" if self.tty else "") + text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _clock(seconds: float) -> str:
    if seconds != seconds:  # NaN: no rate yet
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
