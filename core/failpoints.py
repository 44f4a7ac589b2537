"""Failpoints: named places where a test makes one real process misbehave on purpose.

A process reads ``HQ_FAILPOINTS`` from its environment once, at import. The value is a
``;``-separated list of ``NAME=ACTION`` or ``NAME=ACTION*COUNT`` (only the first COUNT hits
act). Actions:

``sleep(SECONDS)``
    block the calling thread, as a handler stuck in C code, on a slow disk or in a long
    query would: the process stops heartbeating, which only the broker's own liveness
    check notices.
``exit(CODE)``
    leave the process at once with ``os._exit(CODE)``, as a crash at that point would.

Failpoints in hq: ``worker.request`` (a worker got a REQUEST, before running it);
``store.report`` (inside a report's write transaction, before its hash locks).

Example: ``HQ_FAILPOINTS='worker.request=sleep(10)*1' hq-worker ...``. With the variable
unset, :func:`hit` is a function that does nothing.
"""

from __future__ import annotations

import logging
import os
import re
import time

log = logging.getLogger(__name__)

_SPEC = re.compile(r"^\s*([\w.-]+)\s*=\s*(sleep|exit)\(([0-9.]+)\)\s*(?:\*\s*(\d+))?\s*$")


class Failpoint:
    __slots__ = ("name", "action", "arg", "remaining")

    def __init__(self, name: str, action: str, arg: float, count):
        self.name = name
        self.action = action
        self.arg = arg
        self.remaining = count  # None: every hit

    def fire(self) -> None:
        if self.remaining is not None:
            if self.remaining <= 0:
                return
            self.remaining -= 1
        log.warning("failpoint %s: %s(%s)", self.name, self.action, self.arg)
        if self.action == "sleep":
            time.sleep(self.arg)
        else:
            os._exit(int(self.arg))


def parse(text: str) -> dict:
    """``NAME=ACTION[*COUNT];...`` -> {name: Failpoint}; ValueError on a bad entry."""
    points = {}
    for entry in filter(str.strip, text.split(";")):
        match = _SPEC.match(entry)
        if match is None:
            raise ValueError(
                f"bad failpoint {entry!r}: expected NAME=sleep(S) or NAME=exit(N), optionally *COUNT"
            )
        name, action, arg, count = match.groups()
        points[name] = Failpoint(name, action, float(arg), None if count is None else int(count))
    return points


ACTIVE = parse(os.environ.get("HQ_FAILPOINTS", ""))


def _hit(name: str) -> None:
    point = ACTIVE.get(name)
    if point is not None:
        point.fire()


def _nothing(name: str) -> None:
    pass


hit = _hit if ACTIVE else _nothing
