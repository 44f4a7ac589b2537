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
import re
import sqlite3
import time
from typing import NamedTuple

from peewee import (
    SQL,
    AutoField,
    BigIntegerField,
    BlobField,
    CompositeKey,
    DatabaseError,
    DatabaseProxy,
    Field,
    IntegerField,
    Model,
    SqliteDatabase,
    TextField,
)
from playhouse.migrate import SchemaMigrator

from hq import databases
from hq import protocol as p
from hq.options import SYNCHRONOUS_MODES

from . import companions, errors
from .filesystem import check_local

log = logging.getLogger(__name__)

#: The schema this code reads and writes; the ``schema-version`` row of ``config`` says which
#: one a file has, and it is the only source of truth for it (see :func:`open_database`).
#:
#: 1. The tables below.
#: 2. The same tables; the file carries :data:`HQ_APPLICATION_ID`.
SCHEMA_VERSION = 2
VERSION_ROW = "schema-version"

#: SQLite's ``PRAGMA application_id`` of every hq file (schema 2 on): the bytes 68 71 00 01,
#: "hq" then 0 and 1. It tells hq's files apart from other applications' (hq refuses those
#: before writing anything into them); file(1) shows it as "application id 1752236033". It
#: is fixed: it does not follow SCHEMA_VERSION.
HQ_APPLICATION_ID = 0x68710001


class HashKeyField(Field):
    """A hash as stored (see :func:`to_key`). The column type is the engine's: BLOB on SQLite
    (raw bytes or text); on PostgreSQL, TEXT compared byte by byte (the string itself)."""

    field_type = "HASHKEY"


#: Deferred: each worker process calls :func:`open_database` itself (never across fork),
#: which points the proxy at this SQLite database or at :mod:`.postgresql`'s.
database = DatabaseProxy()
sqlite_database = SqliteDatabase(None, field_types={"HASHKEY": "BLOB"})


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
    taskhash = HashKeyField()  # hash key, see to_key
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
    taskhash = HashKeyField()
    outhash = HashKeyField()
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
    SQL("CREATE INDEX IF NOT EXISTS outhashes_taskhash8 ON outhashes (method, substr(taskhash, 1, 8))")
)
OuthashReport.add_index(
    SQL("CREATE INDEX IF NOT EXISTS outhashes_outhash8 ON outhashes (method, substr(outhash, 1, 8), created)")
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
OUTHASH_COLUMNS = ("method", "taskhash", "outhash", "created", *p.REPORT_EXTRA_FIELDS)


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
    """The settings every connection gets as it opens. They change nothing in the file:
    ``journal_mode = wal`` (which does) is set by :func:`open_database` only once it knows
    the file is hq's."""
    return [
        ("busy_timeout", busy_timeout_ms),
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
    check_local(path)


def open_database(
    path: str,
    synchronous: str = "normal",
    busy_timeout_ms: int = 200,
    cache_size_kib: int = 16384,
    mmap_size: int = 0,
    startup_timeout_s: float = 30.0,
    lock_wait_s: float = 5.0,
):
    """Open (creating if needed) the database in this process and return it.

    ``path`` is an SQLite file, or a ``postgresql://`` URL (:mod:`.postgresql`, which takes
    only ``startup_timeout_s`` and ``lock_wait_s`` of these settings). What the database holds decides what
    happens (:func:`_schema_of`): an empty one gets the schema; one at an older schema
    version is migrated (:data:`MIGRATIONS`); one at this version is opened as it is; a
    newer one, or one that is not hq's, is refused with ValueError and nothing is written
    into it.

    Creating and migrating take one write transaction (on SQLite ``BEGIN IMMEDIATE``).
    Several workers may start at once on one file (supervisord starts a pool together):
    lock contention while switching to WAL or setting up the schema is retried until
    ``startup_timeout_s``, so a worker does not die (and supervisord does not mark it
    FATAL) because a sibling held the lock. That is normal, so it is logged at DEBUG.
    """
    if databases.is_postgresql(path):
        from . import postgresql  # psycopg is needed only here: the [postgresql] extra

        return postgresql.open_database(path, startup_timeout_s, lock_wait_s)
    if sqlite3.sqlite_version_info < (3, 35, 0):
        raise RuntimeError(
            f"hq needs SQLite 3.35 or newer (RETURNING); this Python has {sqlite3.sqlite_version}"
        )
    if synchronous not in SYNCHRONOUS_MODES:
        raise ValueError(f"synchronous must be one of {', '.join(SYNCHRONOUS_MODES)}")
    check_path(path)
    if not companions.set_aside(path):  # a WAL left by a file this one replaced
        raise ValueError("the WAL beside it is a replaced file's and cannot be set aside (see the log)")
    sqlite_database.init(
        path,
        pragmas=pragmas(synchronous, busy_timeout_ms, cache_size_kib, mmap_size),
        timeout=busy_timeout_ms / 1000.0,
        check_same_thread=False,
    )
    database.initialize(sqlite_database)
    try:
        _open_until(path, time.monotonic() + startup_timeout_s)
    except BaseException:
        if not database.is_closed():  # a refused file is not left open (nor its WAL behind)
            database.close()
        raise
    companions.record(path)
    return sqlite_database


def _open_until(path: str, deadline: float) -> None:
    """Connect and bring the schema up to date, retrying while another worker holds the lock."""
    while True:
        try:
            database.connect(reuse_if_open=True)
            bring_up_to_date(path, SQLITE)
            return
        except DatabaseError as exc:  # OperationalError included
            kind = errors.kind(exc)
            if kind == errors.CANNOT_OPEN:
                raise ValueError(f"SQLite cannot open it ({exc}): check the permissions") from None
            if kind == errors.NOT_A_DATABASE:
                raise ValueError("it is not an SQLite database") from None
            if kind == errors.READ_ONLY and _serves_read_only(path):
                return
            if kind != errors.BUSY or time.monotonic() > deadline:
                raise
            log.debug("database busy while opening (another worker is setting it up), retrying: %s", exc)
            if not database.is_closed():
                database.close()
            time.sleep(0.05)


class Engine:
    """What opening a database needs from its engine; SQLite's here, PostgreSQL's in
    :mod:`.postgresql`."""

    def look(self) -> FileContents:
        """Read (never write) what decides how to open the database."""
        raise NotImplementedError

    def prepare(self) -> None:
        """Settings the database keeps, made once it is known to be hq's (or empty)."""

    def setup_transaction(self):
        """The transaction that creates or migrates the schema, one process at a time."""
        raise NotImplementedError

    def create_tables(self) -> None:
        database.create_tables(MODELS, safe=True)

    def mark_as_hq(self) -> None:
        """Mark the database as hq's where the engine has a place for it."""


class SqliteEngine(Engine):
    def look(self) -> FileContents:
        return _look_at_file()

    def prepare(self) -> None:
        database.execute_sql("PRAGMA journal_mode = wal")  # stays set in the file

    def setup_transaction(self):
        return database.atomic("IMMEDIATE")

    def mark_as_hq(self) -> None:
        _mark_as_hq()


SQLITE = SqliteEngine()


def bring_up_to_date(path: str, engine: Engine) -> None:
    """Create or migrate the schema as the database needs; refuse one that is not hq's.

    The first look is a read, so workers opening a ready database never queue for the
    write lock. A database that needs work is looked at again once the lock is held: a
    sibling may have done the work while this worker waited, and must not be redone (each
    migration step runs, and is logged, exactly once).
    """
    version = _schema_of(engine.look())  # refuses before anything is written
    engine.prepare()
    if version == SCHEMA_VERSION:
        return
    log.debug(
        "database %s has schema %s, this hq %s: bringing it up to date under the write lock",
        path,
        version or "none",
        SCHEMA_VERSION,
    )
    with engine.setup_transaction():
        version = _schema_of(engine.look())
        if version == SCHEMA_VERSION:
            log.debug("database %s was brought to schema %s by another process meanwhile", path, version)
            return
        migrated = _create_schema(engine) if version == 0 else _migrate(version, engine)
    for old in migrated:  # once committed
        log.info("migrated database %s from schema %s to %s", path, old, old + 1)


def _serves_read_only(path: str) -> bool:
    """A file SQLite will not let this process write. At this schema version it serves
    lookups, and the store refuses writes with a clear reason until the file is writable
    again; at an older version it cannot be migrated, so it is refused. False for a file
    with no schema yet (the caller reports SQLite's own error)."""
    version = _schema_of(_look_at_file())
    if version == 0:
        return False
    if version < SCHEMA_VERSION:
        raise ValueError(
            f"it is read-only and its schema is version {version}, older than this hq "
            f"({SCHEMA_VERSION}): make it writable so that hq can migrate it"
        )
    log.warning("database %s is read-only; serving lookups only", path)
    return True


# --- what a file holds, and what hq may do with it ----------------------------------------

_HASHSERV_TABLE = re.compile(r"(unihashes|outhashes)_v\d+")
_TABLES_NAMED = 6  # a refusal names this many of a foreign file's tables


class FileContents(NamedTuple):
    """What :func:`open_database` looks at before it writes anything."""

    tables: tuple  # table names in creation order, SQLite's own (sqlite_*) left out
    version: object  # the value of config's schema-version row; None if there is none
    application_id: int  # 0 where it was never set


def _look_at_file() -> FileContents:
    """Read (never write) what decides how to open the file."""
    rows = database.execute_sql("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY rowid")
    tables = tuple(name for (name,) in rows if not name.startswith("sqlite_"))
    version = None
    config_columns = {row[1] for row in database.execute_sql("PRAGMA table_info(config)")}
    if {"name", "value"} <= config_columns:  # bitbake-hashserv has a config table too
        row = database.execute_sql("SELECT value FROM config WHERE name = ?", (VERSION_ROW,)).fetchone()
        version = None if row is None else row[0]
    return FileContents(tables, version, _application_id())


def _schema_of(found: FileContents) -> int:
    """The schema version the file is at (0: none yet, a fresh file), or ValueError with a
    one-line reason when hq must not open it. Pure: it decides from what was read."""
    if found.application_id not in (0, HQ_APPLICATION_ID):
        raise ValueError(
            f"its SQLite application_id is {found.application_id:#010x}, not hq's "
            f"({HQ_APPLICATION_ID:#010x}): not an hq database"
        )
    if not found.tables:
        return 0
    if found.version is None:
        raise ValueError(_not_hq_reason(found.tables))
    try:
        version = int(found.version)
    except (TypeError, ValueError):
        version = 0
    if version < 1:
        raise ValueError(f"its schema version is {found.version!r}, which no hq writes: not an hq database")
    if version > SCHEMA_VERSION:
        raise ValueError(
            f"the database's schema is version {version}, newer than this hq ({SCHEMA_VERSION}): upgrade hq"
        )
    return version


def _not_hq_reason(tables: tuple) -> str:
    """Why a file with tables and no schema version is refused, saying what it looks like."""
    named = ", ".join(tables[:_TABLES_NAMED]) + (", ..." if len(tables) > _TABLES_NAMED else "")
    if any(_HASHSERV_TABLE.fullmatch(name) for name in tables):
        return (
            f"it has tables {named}: a bitbake-hashserv database? "
            "copy it into hq with hq-admin import-hashserv"
        )
    return f"it has tables {named} and no hq schema version: not an hq database"


# --- creating and migrating, inside the caller's BEGIN IMMEDIATE transaction --------------


def _create_schema(engine: Engine) -> list:
    """A fresh database gets the current schema at once: there is nothing to migrate."""
    engine.create_tables()
    Config.insert(name=VERSION_ROW, value=str(SCHEMA_VERSION)).execute()
    engine.mark_as_hq()
    return []


def _migrate(version: int, engine: Engine) -> list:
    """Step the file from ``version`` up to SCHEMA_VERSION; the versions it stepped from."""
    migrator = SchemaMigrator.from_database(database)
    stepped = []
    for old in range(version, SCHEMA_VERSION):
        MIGRATIONS[old](migrator, engine)
        stepped.append(old)
    Config.update(value=str(SCHEMA_VERSION)).where(Config.name == VERSION_ROW).execute()
    return stepped


def _migrate_1_to_2(migrator: SchemaMigrator, engine: Engine) -> None:
    """Schema 2: the file carries hq's application_id. No table changes."""
    engine.mark_as_hq()


#: version -> the step that takes a file at that version to the next one. Each step gets a
#: playhouse.migrate migrator for table changes (``migrate(migrator.add_column(...))``) and
#: the engine (for what only one engine has), runs
#: inside the caller's transaction and never commits; the caller writes the new version.
MIGRATIONS = {1: _migrate_1_to_2}


# --- SQLite only: application_id is a field of SQLite's file header. PostgreSQL has no such
# thing: there the version row decides.


def _application_id() -> int:
    return database.execute_sql("PRAGMA application_id").fetchone()[0]


def _mark_as_hq() -> None:
    database.execute_sql(f"PRAGMA application_id = {HQ_APPLICATION_ID}")  # transactional, like a row


def settings_in_force(db) -> dict:
    """The settings this connection really has (guards against silent regressions)."""
    if not isinstance(db, SqliteDatabase):
        from . import postgresql

        return postgresql.settings_in_force(db)
    out = {"engine": "sqlite"}
    for name in ("journal_mode", "synchronous", "busy_timeout", "cache_size", "mmap_size"):
        out[name] = db.execute_sql(f"PRAGMA {name}").fetchone()[0]
    out["synchronous"] = (
        SYNCHRONOUS_MODES[out["synchronous"]]
        if isinstance(out["synchronous"], int) and out["synchronous"] < 4
        else out["synchronous"]
    )
    return out
