"""The database's failures, told apart in one place.

sqlite3 raises ``OperationalError`` for most of them, and peewee re-raises its own class over
it; Python 3.11+ carries SQLite's result code (``sqlite_errorcode``), older Pythons only the
message text. psycopg (PostgreSQL) carries the SQLSTATE (``sqlstate``). :func:`kind` uses a
code where there is one and the text otherwise."""

from __future__ import annotations

BUSY = "busy"  # another connection holds the lock (SQLITE_BUSY, SQLITE_LOCKED)
READ_ONLY = "read-only"  # the file or its directory cannot be written (SQLITE_READONLY)
FULL = "full"  # the disk or the database is full (SQLITE_FULL)
CANNOT_OPEN = "cannot-open"  # no such file, no permission (SQLITE_CANTOPEN)
NOT_A_DATABASE = "not-a-database"  # the file is not SQLite (SQLITE_NOTADB)
OTHER = "other"

_CODES = {5: BUSY, 6: BUSY, 8: READ_ONLY, 13: FULL, 14: CANNOT_OPEN, 26: NOT_A_DATABASE}
#: PostgreSQL: lock_timeout, a deadlock, a serialization failure are BUSY (retry); a full
#: disk, a read-only server (a standby, default_transaction_read_only) are STORAGE.
_SQLSTATES = {"55P03": BUSY, "40P01": BUSY, "40001": BUSY, "53100": FULL, "25006": READ_ONLY}
_TEXTS = (
    (("locked", "busy"), BUSY),
    (("readonly", "read-only"), READ_ONLY),
    (("full",), FULL),
    (("unable to open",), CANNOT_OPEN),
    (("not a database",), NOT_A_DATABASE),
)
#: What a client is told when a write is refused (the STORAGE status's text).
_REASONS = {FULL: "database or disk is full", READ_ONLY: "database is read-only"}


def kind(exc: BaseException) -> str:
    for candidate in (exc, exc.__cause__, exc.__context__):
        code = getattr(candidate, "sqlite_errorcode", None)
        if isinstance(code, int) and code & 0xFF in _CODES:
            return _CODES[code & 0xFF]
        state = getattr(candidate, "sqlstate", None)
        if state in _SQLSTATES:
            return _SQLSTATES[state]
    text = str(exc).lower()
    for needles, name in _TEXTS:
        if any(n in text for n in needles):
            return name
    return OTHER


def reason(exc: BaseException) -> str:
    """One short line for a client or a log."""
    return _REASONS.get(kind(exc)) or str(exc)[:200]
