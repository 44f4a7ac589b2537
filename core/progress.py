"""One progress line on stderr, for the tools' long runs (hq-bench repeats, hq-admin's
import and gc-mark-stream).

On a terminal: a bar redrawn at most 5 times a second, once the run has lasted
``show_after_s``. Elsewhere (a log, a pipe): a plain line every ``plain_every_s`` seconds, or
nothing when that is None. Never anything with ``enabled=False`` (``--quiet``).
"""

from __future__ import annotations

import sys
import time

WIDTH = 30
REDRAW_S = 0.2


class Progress:
    def __init__(
        self,
        label: str,
        enabled: bool = True,
        stream=None,
        show_after_s: float = 0.0,
        plain_every_s: float | None = None,
        unit: str = "",
    ):
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and self.stream.isatty()
        self.show_after_s = show_after_s
        self.plain_every_s = plain_every_s
        self.unit = unit
        self.drawn = False
        self.begin(label)

    def begin(self, label: str) -> None:
        """A new bar: elapsed time counts from now."""
        self.label = label
        self.started = self.last = time.monotonic()

    def rate(self, done: int) -> float:
        """Items per second since :meth:`begin`."""
        elapsed = time.monotonic() - self.started
        return done / elapsed if elapsed > 0 else 0.0

    def update(self, done: int, total: int | None, force: bool = False) -> None:
        """``done`` of ``total`` items (``total`` None: a stream of unknown length, no bar)."""
        if not self.enabled:
            return
        now = time.monotonic()
        counts = (
            f"{done:,}" + ("" if total is None else f"/{total:,}") + (f" {self.unit}" if self.unit else "")
        )
        if self.unit:
            counts += f", {self.rate(done):,.0f} {self.unit}/s"
        fraction = min(1.0, done / total) if total else 1.0
        if self.tty:
            if not force and (now - self.started < self.show_after_s or now - self.last < REDRAW_S):
                return
            bar = ""
            if total is not None:
                filled = int(fraction * WIDTH)
                bar = f"[{'#' * filled}{'-' * (WIDTH - filled)}] {fraction:4.0%} "
            self.stream.write(f"\r{self.label} {bar}{counts} {now - self.started:5.1f} s\x1b[K")
            self.drawn = True
        elif self.plain_every_s is not None and (force or now - self.last >= self.plain_every_s):
            self.stream.write(
                f"{self.label}: {counts}" + ("" if total is None else f" ({fraction:.0%})") + "\n"
            )
        else:
            return
        self.stream.flush()
        self.last = now

    def note(self, text: str) -> None:
        """A status line (e.g. "repeat 2/3: populating") on a terminal, overwritten by the next draw."""
        if not self.tty:
            return
        self.stream.write(f"\r{text}\x1b[K")
        self.stream.flush()
        self.drawn = True

    def close(self) -> None:
        """Clear the bar (on a terminal), so what follows starts on a clean line."""
        if self.drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.drawn = False
