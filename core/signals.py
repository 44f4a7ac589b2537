"""Signal handling for the daemons: handlers only record the signal; loops read the flag.

A loop that waits (in ``zmq.Poller.poll`` or between supervision ticks) would see the flag
only when its wait ends: pyzmq and ``time.sleep`` resume an interrupted wait. So the flag
also has a file descriptor that becomes readable when a signal arrives (Python's
``signal.set_wakeup_fd``): a loop polls it beside its sockets and stops at once.
"""

from __future__ import annotations

import os
import select
import signal


class StopFlag:
    """Set by SIGTERM/SIGINT; the daemon's main loop checks it every turn, and polls
    :attr:`fd` (readable once a signal came) so that a wait ends when one does."""

    def __init__(self):
        self.signum = None
        self.fd: int | None = None  # the read end of the wake-up pipe, once installed

    def __bool__(self) -> bool:
        return self.signum is not None

    def _handler(self, signum, frame):
        self.signum = signum

    def install(self, signals=(signal.SIGTERM, signal.SIGINT)) -> StopFlag:
        """Handle ``signals`` (from the main thread, as Python requires)."""
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        os.set_blocking(write_fd, False)
        signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        self.fd = read_fd
        for signum in signals:
            signal.signal(signum, self._handler)
        return self

    def drain(self) -> None:
        """Empty the wake-up pipe (a signal that did not stop the loop must not keep waking it)."""
        if self.fd is None:
            return
        try:
            while os.read(self.fd, 512):
                pass
        except BlockingIOError:
            pass

    def wait(self, timeout_s: float) -> bool:
        """Sleep up to ``timeout_s``, less if a signal comes; whether the flag is set."""
        if not self:
            fds = [] if self.fd is None else [self.fd]
            if select.select(fds, [], [], max(0.0, timeout_s))[0]:
                self.drain()
        return bool(self)
