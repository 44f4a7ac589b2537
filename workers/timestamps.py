"""The ``created`` time of an outhash row: stored as integer microseconds since the epoch,
UTC (8 bytes, and it sorts), shown and taken as ISO 8601 text as BitBake's server does."""

from __future__ import annotations

import datetime
import time

_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
_US = datetime.timedelta(microseconds=1)


def now_us() -> int:
    return time.time_ns() // 1000


def format_created(us: int) -> str:
    return (_EPOCH + us * _US).isoformat()


def parse_created(text: str):
    """Microseconds since the epoch of an ISO 8601 time, or None when it is not one.

    BitBake writes ``2026-11-27T12:14:00.721026+00:00`` since 2025 and
    ``2026-11-27 12:14:00.721026`` (no zone) before; a time without a zone is taken as UTC,
    and a trailing ``Z`` means UTC."""
    text = text.strip()
    if text[-1:] in ("Z", "z"):
        text = text[:-1] + "+00:00"
    try:
        when = datetime.datetime.fromisoformat(text)
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return (when - _EPOCH) // _US
