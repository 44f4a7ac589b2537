"""The database schema, defined with peewee, and how a worker opens the database.

The tables keep every column of BitBake hashserv's data model (mapping with gc mark,
outhash reports with created/owner/PN/PV/PR/task/outhash_siginfo, users, config), so admin,
auth and import of an existing hashserv database need no schema change. The storage format
is hq's own, chosen for size and lookup speed:

* A hash is stored as a *key*: the raw bytes of a canonical (lower-case, even-length) hex
  string as a BLOB, anything else as the TEXT itself. SQLite never finds a BLOB equal to a
  TEXT, so every string round-trips exactly (see :func:`to_key` / :func:`from_key`), and the
  sha256 hashes BitBake sends take 32 bytes instead of 64.
* The method string, repeated in every row and index entry by the reference, is an integer
  id into ``methods``.
* ``unihashes`` is a WITHOUT ROWID table keyed on (method, taskhash): a lookup is one
  B-tree descent. Secondary indexes cover only an 8-byte prefix of a hash (hashes are
  uniformly random, so the prefix is as selective as the whole and the index a third of
  the size); queries repeat the full comparison.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time

from peewee import (
    SQL,
    AutoField,
    BigIntegerField,
    BlobField,
    CompositeKey,
    DatabaseError,
    IntegerField,
    Model,
    OperationalError,
    SqliteDatabase,
    TextField,
)

from hq.options import SYNCHRONOUS_MODES

log = logging.getLogger(__name__)

SCHEMA_VERSION = "1"

#: Deferred: each worker process calls :func:`open_database` itself (never across fork).
database = SqliteDatabase(None)



class BaseModel(Model):
    class Meta:
        database = database


class Method(BaseModel):
    id = AutoField()
    name = TextField(unique=True)

    class Meta:
        table_name = "methods"


class UnihashMapping(BaseModel):
    """(method, taskhash) -> unihash. The first mapping wins and never changes."""

    method = IntegerField()
    taskhash = BlobField()  # hash key, see to_key
    unihash = BlobField()  # always 32 bytes: unihashes are validated 64-char hex
    gc_mark = TextField(default="")

    class Meta:
        table_name = "unihashes"
        primary_key = CompositeKey("method", "taskhash")
        without_rowid = True


UnihashMapping.add_index(
    SQL("CREATE INDEX IF NOT EXISTS unihashes_unihash8 ON unihashes (substr(unihash, 1, 8))")
)


class OuthashReport(BaseModel):
    """One report of an output hash; unique on (method, taskhash, outhash)."""

    id = AutoField()
    method = IntegerField()
    taskhash = BlobField()
    outhash = BlobField()
    created = BigIntegerField()  # microseconds since the epoch, UTC
    owner = TextField(null=True)
    PN = TextField(null=True, column_name="PN")
    PV = TextField(null=True, column_name="PV")
    PR = TextField(null=True, column_name="PR")
    task = TextField(null=True)
    outhash_siginfo = TextField(null=True)

    class Meta:
        table_name = "outhashes"


OuthashReport.add_index(
    SQL(
        "CREATE INDEX IF NOT EXISTS outhashes_taskhash8 "
        "ON outhashes (method, substr(taskhash, 1, 8))"
    )
)
OuthashReport.add_index(
    SQL(
        "CREATE INDEX IF NOT EXISTS outhashes_outhash8 "
        "ON outhashes (method, substr(outhash, 1, 8), created)"
    )
)


class User(BaseModel):
    id = AutoField()
    username = TextField(unique=True)
    token = TextField()
    permissions = TextField()

    class Meta:
        table_name = "users"


class Config(BaseModel):
    name = TextField(primary_key=True)
    value = TextField()

    class Meta:
        table_name = "config"


MODELS = (Method, UnihashMapping, OuthashReport, User, Config)
#: hq's tables, as db-usage and the statistics list them.
TABLE_NAMES = tuple(m._meta.table_name for m in MODELS)

#: The columns a `where` clause may name (reference: get-db-query-columns).
UNIHASH_COLUMNS = ("method", "taskhash", "unihash", "gc_mark")
OUTHASH_COLUMNS = (
    "method",
    "taskhash",
    "outhash",
    "created",
    "owner",
    "PN",
    "PV",
    "PR",
    "task",
    "outhash_siginfo",
)


def to_key(value: str):
    """Storage key of a hash string: bytes for canonical hex, else the string itself."""
    if not len(value) & 1:
        try:
            raw = bytes.fromhex(value)
        except ValueError:
            return value
        if raw.hex() == value:  # rejects upper case and the spaces fromhex skips
            return raw
    return value


def from_key(key) -> str:
    return key.hex() if isinstance(key, bytes) else key


def pragmas(synchronous: str, busy_timeout_ms: int, cache_size_kib: int, mmap_size: int):
    # busy_timeout first: switching journal_mode can itself meet a lock held by another
    # worker opening the same file.
    return [
        ("busy_timeout", busy_timeout_ms),
        ("journal_mode", "wal"),
        ("synchronous", synchronous),
        ("cache_size", -cache_size_kib),
        ("mmap_size", mmap_size),
        ("foreign_keys", 0),
        ("temp_store", "memory"),
    ]


def check_path(path: str) -> None:
    """Refuse, with a reason a user can act on, a database path SQLite cannot use: its own
    words ("unable to open database file") do not say which part is wrong."""
    if not path:
        raise ValueError("no database file given")
    if os.path.isdir(path):
        raise ValueError("it is a directory, not a file")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ValueError(f"directory {parent} does not exist")


def open_database(
    path: str,
    synchronous: str = "normal",
    busy_timeout_ms: int = 200,
    cache_size_kib: int = 16384,
    mmap_size: int = 0,
    startup_timeout_s: float = 30.0,
) -> SqliteDatabase:
    """Open (creating if needed) the database in this process and return it.

    The schema is created only where it is missing, in one ``BEGIN IMMEDIATE`` transaction.
    Several workers may start at once on a fresh file (supervisord starts a pool together):
    lock contention while switching to WAL or creating the tables is retried until
    ``startup_timeout_s``, so a worker does not die (and supervisord does not mark it FATAL)
    because a sibling held the lock. That is normal, so it is logged at DEBUG.
    """
    if sqlite3.sqlite_version_info < (3, 35, 0):
        raise RuntimeError(f"hq needs SQLite 3.35 or newer (RETURNING); this Python has {sqlite3.sqlite_version}")
    if synchronous not in SYNCHRONOUS_MODES:
        raise ValueError(f"synchronous must be one of {', '.join(SYNCHRONOUS_MODES)}")
    check_path(path)
    database.init(
        path,
        pragmas=pragmas(synchronous, busy_timeout_ms, cache_size_kib, mmap_size),
        timeout=busy_timeout_ms / 1000.0,
        check_same_thread=False,
    )
    deadline = time.monotonic() + startup_timeout_s
    while True:
        try:
            database.connect(reuse_if_open=True)
            if not _schema_present():
                with database.atomic("IMMEDIATE"):
                    database.create_tables(MODELS, safe=True)
                    Config.insert(name="schema-version", value=SCHEMA_VERSION).on_conflict_ignore().execute()
            break
        except OperationalError as exc:
            if "unable to open" in str(exc):
                raise ValueError(f"SQLite cannot open it ({exc}): check the permissions") from None
            if "readonly" in str(exc) and database.table_exists("unihashes"):
                # A read-only file with the schema in place: serve lookups; the store
                # refuses writes with a clear reason until the file is writable again.
                log.warning("database %s is read-only; serving lookups only", path)
                break
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise
            if time.monotonic() > deadline:
                raise
            log.debug("database busy while opening (another worker is setting it up), retrying: %s", exc)
            if not database.is_closed():
                database.close()
            time.sleep(0.05)
        except DatabaseError as exc:
            if "not a database" in str(exc):
                raise ValueError("it is not an SQLite database") from None
            raise
    return database


def _schema_present() -> bool:
    """Every table is there: a read, so workers opening a ready file never queue for the
    write lock."""
    marks = ", ".join("?" * len(TABLE_NAMES))
    sql = f"SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name IN ({marks})"
    return database.execute_sql(sql, TABLE_NAMES).fetchone()[0] == len(TABLE_NAMES)


def settings_in_force(db: SqliteDatabase) -> dict:
    """The SQLite settings this connection really has (guards against silent regressions)."""
    out = {}
    for name in ("journal_mode", "synchronous", "busy_timeout", "cache_size", "mmap_size"):
        out[name] = db.execute_sql(f"PRAGMA {name}").fetchone()[0]
    out["synchronous"] = SYNCHRONOUS_MODES[out["synchronous"]] if isinstance(out["synchronous"], int) and out["synchronous"] < 4 else out["synchronous"]
    return out
