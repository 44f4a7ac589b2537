"""A one-line progress bar on stderr, for runs long enough to wonder about."""

from __future__ import annotations

import sys
import time

#: Nothing is drawn before a run has lasted this long: short runs stay quiet.
SHOW_AFTER_S = 1.0
WIDTH = 30


class Progress:
    """``update(done, total)`` redraws at most 5 times a second; ``close()`` clears the line.

    Off when stderr is not a terminal or ``enabled`` is false (``--quiet``).
    """

    def __init__(self, label: str, enabled: bool = True, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = enabled and self.stream.isatty()
        self.label = label
        self.started = time.monotonic()
        self.drawn = False
        self.last = 0.0

    def begin(self, label: str) -> None:
        """A new bar: elapsed time counts from now."""
        self.label = label
        self.started = time.monotonic()
        self.last = 0.0

    def update(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self.started < SHOW_AFTER_S or now - self.last < 0.2:
            return
        self.last = now
        fraction = min(1.0, done / total) if total else 0.0
        filled = int(fraction * WIDTH)
        bar = "#" * filled + "-" * (WIDTH - filled)
        self.stream.write(f"\r{self.label} [{bar}] {fraction:4.0%} {now - self.started:5.1f} s")
        self.stream.flush()
        self.drawn = True

    def note(self, text: str) -> None:
        """A status line (e.g. "repeat 2/3: populating"), overwritten by the next draw."""
        if not self.enabled:
            return
        self.stream.write(f"\r{text}\x1b[K")
        self.stream.flush()
        self.drawn = True

    def close(self) -> None:
        if self.drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.drawn = False
