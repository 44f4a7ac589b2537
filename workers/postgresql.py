"""PostgreSQL: the engine for more than one host (``--db postgresql://USER@HOST[:PORT]/DBNAME``).

Everything a worker does differently on PostgreSQL lives here; the semantics stay in
:mod:`.store`, whose SQL both engines run (``?`` placeholders become psycopg's ``%s``).

* **Driver:** psycopg 3 (the ``[postgresql]`` extra), through peewee's PostgresqlDatabase in
  autocommit mode, so hq's own ``BEGIN``/``COMMIT`` delimit every transaction, as on SQLite.
  Measured against psycopg2-binary on this machine: the same within noise (single-row
  lookup ~60-100 us, batched lookup 4.4 us a key, a locking write transaction ~0.45 ms),
  and psycopg 3 is the maintained one.
* **Keys:** a hash is stored as the string itself, in a TEXT column compared byte by byte
  (``COLLATE "C"``); the unihash column is BYTEA (32 bytes), as on SQLite.
* **Concurrency:** there is no single writer. A write transaction first takes transaction
  advisory locks on every (method, outhash) and (method, taskhash) it will touch, in one
  global order, so two workers (on any hosts) reporting the same outhash run one after the
  other, and the second sees the first's committed rows: both answer the same unihash, as
  the reference's one writer would. Taking the locks in order also keeps writes from
  deadlocking each other. A lock not had within ``lock_wait_s`` is BUSY, as on SQLite.
* **Identity:** the cluster's system identifier and the database's oid, so a broker's
  workers agree on which database they answer from wherever they run.
"""

from __future__ import annotations

import hashlib
import logging
import struct
import time
from contextlib import contextmanager

from peewee import DatabaseError, InterfaceError, OperationalError, PostgresqlDatabase

from hq import databases, failpoints
from hq import protocol as p

from . import schema
from .schema import MODELS, TABLE_NAMES, VERSION_ROW, Engine, FileContents, OuthashReport, UnihashMapping
from .store import Store
from .timestamps import now_us

log = logging.getLogger(__name__)

#: The advisory lock every process takes while it creates or migrates the schema.
SCHEMA_LOCK = 0x6871_5343  # "hqSC"


class _Database(PostgresqlDatabase):
    """peewee's PostgresqlDatabase, with hq's session settings on every connection it makes
    (also the ones it makes again after the server went away)."""

    lock_timeout_ms = 5000

    def _connect(self):
        conn = super()._connect()
        with conn.cursor() as cur:
            cur.execute(f"SET lock_timeout = {int(self.lock_timeout_ms)}")
            # Every hot statement of hq is an index lookup. psycopg prepares a statement after
            # a few runs and PostgreSQL then keeps a generic plan: made while a table is small
            # (a new database), it scans the table, and went on scanning it when it had grown
            # (measured: 1.2 ms of server CPU a report at 10k rows, 0.08 ms with this).
            cur.execute("SET enable_seqscan = off")
        return conn


postgresql_database = _Database(None, field_types={"HASHKEY": 'TEXT COLLATE "C"'})


def _driver_missing() -> bool:
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return True
    return False


def open_database(url: str, startup_timeout_s: float = 30.0, lock_wait_s: float = 5.0):
    """Connect to the database ``url`` names and bring its schema up to date (see
    :func:`hq.workers.schema.open_database`). A server that does not answer yet (starting
    up, or not reachable) is waited for until ``startup_timeout_s``; a server that answers
    with a refusal (no such database, log-in failed) is refused at once. Raises ValueError
    with a reason that never holds the password."""
    databases.check_postgresql(url)
    shown = databases.redacted(url)
    if _driver_missing():
        raise ValueError("PostgreSQL needs psycopg: pip install 'hq-hashequiv[postgresql]'")
    postgresql_database.lock_timeout_ms = max(1, int(lock_wait_s * 1000))
    postgresql_database.init(url, prefer_psycopg3=True, application_name="hq", connect_timeout=5)
    schema.database.initialize(postgresql_database)
    deadline = time.monotonic() + startup_timeout_s
    warned = False
    while True:
        try:
            postgresql_database.connect(reuse_if_open=True)
            schema.bring_up_to_date(shown, POSTGRESQL)
            return postgresql_database
        except (OperationalError, InterfaceError) as exc:
            if not postgresql_database.is_closed():
                postgresql_database.close()
            reason = _first_line(exc)
            if _refused(exc) or time.monotonic() > deadline:
                raise ValueError(reason) from None
            if not warned:
                log.warning("waiting for PostgreSQL at %s: %s", shown, reason)
                warned = True
            time.sleep(0.25)
        except DatabaseError as exc:
            if not postgresql_database.is_closed():
                postgresql_database.close()
            raise ValueError(_first_line(exc)) from None


def _refused(exc: BaseException) -> bool:
    """The server answered with a refusal that waiting will not change (no such database or
    role, log-in failed): libpq reports it as FATAL. A server starting or shutting down
    says FATAL too, and is waited for."""
    text = str(exc)
    return "FATAL" in text and "starting up" not in text and "shutting down" not in text


def _wrapped(exc: Exception) -> Exception:
    """A psycopg error as peewee's class of it (what the handlers tell apart), cause kept."""
    if isinstance(exc, DatabaseError):
        return exc
    import psycopg

    if isinstance(exc, psycopg.OperationalError):
        return OperationalError(exc)
    if isinstance(exc, psycopg.InterfaceError):
        return InterfaceError(exc)
    return DatabaseError(exc)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class PostgresqlEngine(Engine):
    """How :func:`hq.workers.schema.bring_up_to_date` reads and sets up a PostgreSQL database.
    hq's tables live in the connection's current schema (the first of its search_path)."""

    def look(self) -> FileContents:
        db = schema.database
        rows = db.execute_sql(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p') ORDER BY c.oid"
        )
        tables = tuple(name for (name,) in rows)
        version = None
        columns = {
            name
            for (name,) in db.execute_sql(
                "SELECT column_name FROM information_schema.columns "
                "WHERE table_schema = current_schema() AND table_name = 'config'"
            )
        }
        if {"name", "value"} <= columns:
            row = db.execute_sql("SELECT value FROM config WHERE name = %s", (VERSION_ROW,)).fetchone()
            version = None if row is None else row[0]
        return FileContents(tables, version, 0)

    @contextmanager
    def setup_transaction(self):
        with schema.database.atomic():
            schema.database.execute_sql("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
            yield

    def create_tables(self) -> None:
        """The models' tables, with three differences: WITHOUT ROWID is SQLite's (PostgreSQL's
        tables are heaps with a primary key index); the PN/PV/PR columns are made lower case,
        as PostgreSQL folds the unquoted names of hq's SQL (SQLite ignores case); and the
        outhash rows are indexed on whole hashes (:data:`OUTHASH_INDEXES`)."""
        meta = UnihashMapping._meta
        upper = [f for f in OuthashReport._meta.sorted_fields if f.column_name != f.column_name.lower()]
        indexes = OuthashReport._meta.indexes
        meta.without_rowid = False
        OuthashReport._meta.indexes = []
        for field in upper:
            field.column_name = field.column_name.lower()
        try:
            schema.database.create_tables(MODELS, safe=True)
            for statement in OUTHASH_INDEXES:
                schema.database.execute_sql(statement)
        finally:
            meta.without_rowid = True
            OuthashReport._meta.indexes = indexes
            for field in upper:
                field.column_name = field.column_name.upper()


#: The outhash rows' indexes on PostgreSQL: whole hashes, not SQLite's 8-byte prefixes. A
#: statement psycopg has prepared runs on a generic plan, where a prefix of a parameter
#: (``substr($2, 1, 8)``) did not match the prefix index and a lookup read every row of the
#: method (measured: 2,500 index entries a report at 10k rows); ``taskhash = $2`` matches
#: these. The second is in the order equivalence wants: the oldest report first, ``id``
#: breaking ties, so LIMIT 1 stops at the first. (The unihash prefix index stays: its
#: parameters are bytes, typed, and match.)
OUTHASH_INDEXES = (
    "CREATE INDEX IF NOT EXISTS outhashes_taskhash ON outhashes (method, taskhash)",
    "CREATE INDEX IF NOT EXISTS outhashes_outhash ON outhashes (method, outhash, created, id)",
)


POSTGRESQL = PostgresqlEngine()


def settings_in_force(db) -> dict:
    out = {"engine": "postgresql"}
    for name in ("server_version", "synchronous_commit", "default_transaction_isolation", "lock_timeout"):
        out[name] = db.execute_sql(f"SHOW {name}").fetchone()[0]
    return out


def _lock_key(method: str, value: str) -> int:
    """A signed 64-bit advisory lock key for one hash string of one method (a collision only
    makes two unrelated writes wait for each other)."""
    data = f"{method}\0{value}".encode("utf-8", "surrogatepass")
    return struct.unpack("<q", hashlib.blake2b(data, digest_size=8).digest())[0]


#: One report as one statement (the two of :meth:`Store._report` joined, PostgreSQL's
#: data-modifying WITH): insert the outhash row unless present; unless the taskhash has a
#: mapping, map it (the oldest equivalent report's unihash, else the submitted one; the
#: first mapping wins), also when the outhash row was there already, as bitbake-hashserv
#: 2.19 does; answer what was mapped now, whether the row was new, and the mapping there
#: was before. The equivalence subquery runs on the statement's snapshot,
#: which does not hold the row inserted here: it is excluded anyway (other taskhashes only).
_REPORT = (
    "WITH o AS (INSERT INTO outhashes (method, taskhash, outhash, created, owner, PN, PV, PR, task, "
    "outhash_siginfo) SELECT %(m)s, %(t)s, %(o)s, %(created)s, %(owner)s, %(PN)s, %(PV)s, %(PR)s, "
    "%(task)s, %(outhash_siginfo)s WHERE NOT EXISTS (SELECT 1 FROM outhashes WHERE method = %(m)s "
    "AND substr(taskhash, 1, 8) = substr(%(t)s, 1, 8) AND taskhash = %(t)s AND outhash = %(o)s) "
    "RETURNING 1), "
    "u AS (INSERT INTO unihashes (method, taskhash, unihash, gc_mark) SELECT %(m)s, %(t)s, "
    "coalesce((SELECT u.unihash FROM outhashes x JOIN unihashes u "
    "ON u.method = x.method AND u.taskhash = x.taskhash "
    "WHERE x.method = %(m)s AND substr(x.outhash, 1, 8) = substr(%(o)s, 1, 8) "
    "AND x.outhash = %(o)s AND x.taskhash != %(t)s ORDER BY x.created, x.id LIMIT 1), %(u)s), "
    "coalesce((SELECT value FROM config WHERE name = 'gc-mark'), '') WHERE NOT EXISTS (SELECT 1 FROM "
    "unihashes WHERE method = %(m)s AND taskhash = %(t)s) "
    "ON CONFLICT DO NOTHING RETURNING unihash) "
    "SELECT (SELECT unihash FROM u), EXISTS (SELECT 1 FROM o), "
    "(SELECT unihash FROM unihashes WHERE method = %(m)s AND taskhash = %(t)s)"
)


class PostgresqlStore(Store):
    """:class:`hq.workers.store.Store` on PostgreSQL."""

    def __init__(self, db, lock_wait_s: float = 5.0):
        super().__init__(db, lock_wait_s)
        self._translated: dict = {}
        self._identity = self._read_identity()

    # --- what differs in how statements run -----------------------------------------------
    def _psycopg(self, sql: str) -> str:
        """hq's SQL (``?`` placeholders) as psycopg takes it (``%s``, a literal ``%`` doubled)."""
        translated = self._translated.get(sql)
        if translated is None:
            translated = self._translated[sql] = sql.replace("%", "%%").replace("?", "%s")
        return translated

    def _sql(self, sql: str, params=()):
        try:
            return self.db.execute_sql(self._psycopg(sql), params)
        except (OperationalError, InterfaceError):
            self._drop_if_broken()
            raise

    def connection_lost(self, exc: BaseException) -> bool:
        if not isinstance(exc, (OperationalError, InterfaceError)):
            return False
        self._drop_if_broken()
        return self.db.is_closed()

    def _drop_if_broken(self) -> None:
        """A connection the server closed (restarted, terminated) is dropped, so the next
        statement connects again instead of failing on it forever."""
        if self.db.is_closed():
            return
        conn = self.db.connection()
        if conn.closed or conn.broken:
            try:
                self.db.close()
            except Exception:
                pass
            self._method_ids.clear()

    def executemany(self, sql: str, rows: list) -> int:
        try:
            with self.db.cursor() as cursor:
                cursor.executemany(self._psycopg(sql), rows)
                return cursor.rowcount
        except Exception as exc:
            self._drop_if_broken()
            raise _wrapped(exc) from exc

    def in_transaction(self) -> bool:
        if self.db.is_closed():
            return False
        from psycopg.pq import TransactionStatus

        return self.db.connection().info.transaction_status != TransactionStatus.IDLE

    @staticmethod
    def key(value: str):
        return value

    @staticmethod
    def keys(items: list) -> list:
        return items

    @staticmethod
    def adopt_key(key):
        return schema.from_key(key)

    def lock_hashes(self, pairs) -> None:
        """Advisory locks on ``(method, hash)`` string pairs, in one order for every process."""
        keys = sorted({_lock_key(method, value) for method, value in pairs})
        if keys:
            self._sql("SELECT count(pg_advisory_xact_lock(k)) FROM unnest(?::bigint[]) AS k", (keys,))

    @contextmanager
    def write_transaction(self):
        """``BEGIN`` ... ``COMMIT``. Lock waits are bounded by the session's lock_timeout
        (``lock_wait_s``); a connection lost is given up, to be made again at the next
        statement."""
        try:
            self._sql("BEGIN")
            yield
            self._sql("COMMIT")
            for name, n in self._uncommitted_counts.items():  # counted once committed
                self.counters[name] = self.counters.get(name, 0) + n
        except BaseException:
            self._abandon()
            raise
        finally:
            self._uncommitted_methods.clear()
            self._uncommitted_counts.clear()

    def _abandon(self) -> None:
        """Roll back what is open; a connection that cannot even do that is closed (peewee
        connects again at the next statement)."""
        try:
            if self.in_transaction():
                self._sql("ROLLBACK")
        except Exception:
            try:
                self.db.close()
            except Exception:
                pass
            self._method_ids.clear()

    # --- reports: one round trip for a whole group commit -------------------------------------
    def report_many(self, reports: list) -> list:
        """The reports of one REQUEST in one transaction, as on SQLite, sent in psycopg's
        pipeline mode: BEGIN, the hash locks, one statement per report and COMMIT go out
        together and the worker waits once (the server runs them in order, each seeing the
        ones before). Measured: see README, "Scaling out"."""
        ids = {m: self.method_id(m, create=True) for m in {r[0] for r in reports}}
        self._uncommitted_methods.clear()  # autocommit: a method added here is committed
        pairs = [(r[0], r[2]) for r in reports] + [(r[0], r[1]) for r in reports]
        keys = sorted({_lock_key(method, value) for method, value in pairs})
        created = now_us()
        conn = self.db.connection()
        cursors = []
        try:
            with conn.pipeline() as pipeline:
                conn.execute("BEGIN")
                if failpoints.ACTIVE:  # a test widens the race window: inside the transaction
                    pipeline.sync()
                    failpoints.hit("store.report")
                conn.execute("SELECT count(pg_advisory_xact_lock(k)) FROM unnest(%s::bigint[]) AS k", (keys,))
                for method, taskhash, outhash, unihash, extra in reports:
                    extra = extra or {}
                    params = {f: extra.get(f) for f in p.REPORT_EXTRA_FIELDS}
                    params.update(
                        m=ids[method], t=taskhash, o=outhash, u=bytes.fromhex(unihash), created=created
                    )
                    cursors.append(conn.execute(_REPORT, params))
                conn.execute("COMMIT")
        except Exception as exc:
            self._abandon()
            raise _wrapped(exc) from exc
        out = []
        for (_, _, _, unihash, _), cursor in zip(reports, cursors):
            mapped, inserted, existing = cursor.fetchone()
            if mapped is not None:
                mapped = mapped.hex()
                self._count_committed("reports.new" if mapped == unihash else "reports.equivalent")
                out.append(mapped)
            else:
                self._count_committed("reports.existing")
                out.append(existing.hex() if existing is not None else unihash)
        return out

    def _count_committed(self, name: str) -> None:
        self.counters[name] = self.counters.get(name, 0) + 1

    # --- no file: nothing to watch, nothing to heartbeat from -----------------------------
    def check_file(self) -> None:
        pass

    @contextmanager
    def heartbeating(self, connection=None):
        yield

    def _read_identity(self) -> str:
        try:
            (system_id,) = self.db.execute_sql("SELECT system_identifier FROM pg_control_system()").fetchone()
        except DatabaseError:  # not allowed to this role: the database alone says it
            self._abandon()
            system_id = "-"
        (oid, name, schema_name) = self.db.execute_sql(
            "SELECT oid, datname, current_schema() FROM pg_database WHERE datname = current_database()"
        ).fetchone()
        return f"postgresql:{system_id}:{oid}:{name}:{schema_name}"

    def identity(self) -> str:
        return self._identity

    # --- statistics -------------------------------------------------------------------------
    def facts(self) -> tuple:
        (size, changes) = self._sql(
            "SELECT pg_database_size(current_database()), "
            "(SELECT coalesce(sum(n_tup_ins + n_tup_upd + n_tup_del), 0) FROM pg_stat_user_tables "
            "WHERE schemaname = current_schema())"
        ).fetchone()
        facts = {"path": databases.redacted(self.db.database), "file_bytes": size, "wal_bytes": None}
        return facts, (int(changes),)

    def count_rows(self) -> dict:
        return {t: self._sql(f"SELECT count(*) FROM {t}").fetchone()[0] for t in TABLE_NAMES}
