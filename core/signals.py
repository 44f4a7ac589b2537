"""Signal handling for the daemons: handlers only record the signal; loops read the flag."""

from __future__ import annotations

import signal


class StopFlag:
    """Set by SIGTERM/SIGINT; the daemon's main loop checks it every turn."""

    def __init__(self):
        self.signum = None

    def __bool__(self) -> bool:
        return self.signum is not None

    def _handler(self, signum, frame):
        self.signum = signum

    def install(self, signals=(signal.SIGTERM, signal.SIGINT)) -> StopFlag:
        for signum in signals:
            signal.signal(signum, self._handler)
        return self
