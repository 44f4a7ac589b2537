"""Hash-equivalence semantics over the database (reference §7.2-7.4).

The hot paths use fixed SQL through peewee's ``execute_sql``: one query per batch chunk.
:class:`Store` runs it on SQLite: writes run in ``BEGIN IMMEDIATE`` transactions, so two
workers reporting at once serialise on the write lock instead of failing with a snapshot
conflict half-way. :class:`hq.workers.postgresql.PostgresqlStore` runs the same SQL on
PostgreSQL, where writers are serialised per hash instead (:meth:`Store.lock_hashes`).
"""

from __future__ import annotations

import logging
import os
import pathlib
import sqlite3
import time
from contextlib import contextmanager

from peewee import OperationalError, SqliteDatabase

from hq import failpoints
from hq import protocol as p

from . import companions, errors
from .schema import TABLE_NAMES, from_key, to_key
from .timestamps import format_created, now_us

log = logging.getLogger(__name__)


def _size(path: str):
    try:
        return os.stat(path).st_size
    except OSError:
        return None


#: IN-lists are padded to one of these sizes so SQLite's statement cache holds a handful
#: of statements instead of one per distinct chunk length.
_IN_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

_OUTHASH_FIELDS = (
    "o.id, o.taskhash, o.outhash, o.created, o.owner, o.PN, o.PV, o.PR, o.task, o.outhash_siginfo"
)
#: The ``config`` row that holds the current gc mark (ref. §7.7); no row means no mark.
GC_MARK_KEY = "gc-mark"


def current_gc_mark(execute):
    """The current gc mark, or None when there is none. ``execute(sql, params)`` runs a
    statement on the caller's connection (the store's, or the importer's)."""
    row = execute("SELECT value FROM config WHERE name = ?", (GC_MARK_KEY,)).fetchone()
    return row[0] if row else None


def _placeholders(n: int) -> str:
    return ",".join("?" * n)


def _padded(keys: list) -> list:
    n = len(keys)
    for size in _IN_SIZES:
        if size >= n:
            return keys + [keys[-1]] * (size - n)
    return keys


def _keys(items: list) -> list:
    """Storage keys of many hashes. When all are lower-case hex of one even width (what
    BitBake sends), one ``fromhex`` over them all and slices: measured 0.1 us a key
    against 0.8 us through :func:`to_key` one by one."""
    width = len(items[0]) if items else 0
    if width and not width & 1:
        joined = "".join(items)
        if len(joined) == width * len(items):
            try:
                raw = bytes.fromhex(joined)
            except ValueError:
                raw = None
            if raw is not None and raw.hex() == joined:  # upper case or spaces fail here
                n = width // 2
                return [raw[i : i + n] for i in range(0, len(raw), n)]
    return [to_key(item) for item in items]


#: SQLite VM steps between two heartbeat checks during a long statement (see heartbeating).
_PROGRESS_STEPS = 20000


class StorageUnavailable(Exception):
    """Writes are refused: the database file was removed or replaced under the worker."""


def is_busy(exc: Exception) -> bool:
    return errors.kind(exc) == errors.BUSY


class Store:
    """All reads and writes a worker performs; one instance per worker process.

    ``lock_wait_s`` bounds how long a write waits for another worker's write lock. The wait
    is made of short SQLite busy timeouts, and ``on_wait`` runs between them: the worker
    heartbeats there, so the broker does not take a worker waiting its turn for a frozen one.
    """

    def __init__(self, db: SqliteDatabase, lock_wait_s: float = 5.0):
        self.db = db
        self.lock_wait_s = lock_wait_s
        self.on_wait = lambda: None
        self.reopen = None  # callable that opens the database file again (set by the worker)
        self._file_id = companions.file_id(db.database)
        # The open file's identity and its -wal's and -shm's, to tell them from a new file's
        # when there is no record (hq.workers.companions).
        self._companions = companions.identities(db.database)
        self.file_problem = ""  # why writes are refused, or "" when the file is fine
        self._reopen_when_writable = False
        self.counters: dict = {}  # cumulative, never reset: the broker keeps reset baselines
        self._uncommitted_counts: dict = {}
        self._method_ids: dict = {}
        self._uncommitted_methods: set = set()
        self.opened = 1  # times the file was opened: 2 after the first reopen, ...

    # --- what the engine decides (PostgresqlStore overrides these) ---------------------------
    key = staticmethod(to_key)  # a hash string as stored
    keys = staticmethod(_keys)  # many of them

    @staticmethod
    def adopt_key(key):
        """A key made by :func:`hq.workers.schema.to_key` (the importer's), as this engine stores it."""
        return key

    def lock_hashes(self, pairs) -> None:
        """Inside a write transaction, before touching them: serialise with other writers of
        these ``(method, hash)`` pairs. SQLite's one writer already does."""

    def executemany(self, sql: str, rows: list) -> int:
        """One statement over many parameter rows; the rows it changed."""
        return self.db.connection().executemany(sql, rows).rowcount

    def in_transaction(self) -> bool:
        return self.db.connection().in_transaction

    def facts(self) -> tuple:
        """``(facts, version)`` for the statistics: the file's size and pages; ``version``
        moves when any connection commits (see :class:`hq.workers.stats.RowCountPolicy`)."""
        db = self.db
        path = db.database
        facts = {"path": path, "file_bytes": _size(path), "wal_bytes": _size(path + "-wal")}
        for pragma in ("page_size", "page_count", "freelist_count"):
            facts[pragma] = db.execute_sql(f"PRAGMA {pragma}").fetchone()[0]
        version = (db.execute_sql("PRAGMA data_version").fetchone()[0], db.connection().total_changes)
        return facts, version

    def count_rows(self) -> dict:
        """Rows per table, counted on a short-lived read-only connection with a small page
        cache: the scan neither evicts the lookups' hot pages from the worker's cache nor
        grows the worker's memory (measured: +16 MiB RSS when counted on the main
        connection). The worker heartbeats during the scan (35 ms per million rows)."""
        uri = pathlib.Path(self.db.database).resolve().as_uri() + "?mode=ro"
        conn = sqlite3.connect(uri, uri=True, timeout=1.0)
        try:
            conn.execute("PRAGMA cache_size = -256")
            with self.heartbeating(conn):
                return {t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in TABLE_NAMES}
        finally:
            conn.close()

    def _count(self, name: str, n: int = 1) -> None:
        """Count an outcome of the write transaction in progress (kept if it commits)."""
        self._uncommitted_counts[name] = self._uncommitted_counts.get(name, 0) + n

    def connection_lost(self, exc: BaseException) -> bool:
        """Whether ``exc`` came from a database connection the server closed (dropped now, so
        the next statement connects again). A SQLite file has no connection to lose."""
        return False

    def _sql(self, sql: str, params=()):
        """Run fixed SQL through peewee (measured: 7 us a statement, against 6 us straight on
        the sqlite3 connection and ~200 us through peewee's query builder)."""
        return self.db.execute_sql(sql, params)

    def check_file(self) -> None:
        """Notice the database file being removed, replaced or made read-only under this worker.

        SQLite would keep writing to the open, unlinked file, and every report acknowledged
        after that would be lost. So writes are refused (STORAGE) until a file is back at
        the path; then the worker opens it again. Reads go on from the open file meanwhile.
        A file (or filesystem) made read-only refuses writes the same way, at once, instead
        of through the worker's still-writable descriptor; when it is writable again the
        connection is opened again, since SQLite keeps a connection it opened read-only so.
        """
        path = self.db.database
        now_id = companions.file_id(path)
        if now_id is None:
            if not self.file_problem.startswith("database file was removed"):
                log.error("database file %s was removed; refusing writes", path)
            self.file_problem = "database file was removed; restore it or restart hq"
            return
        if now_id != self._file_id:
            log.warning("database file %s was replaced; opening it again", path)
            self._reopen(replaced=True)
            return
        if None in self._companions.values():  # made since the last look (a WAL at first use)
            self._companions = companions.identities(path)
        if not os.access(path, os.W_OK):
            if not self.file_problem.startswith("database file is read-only"):
                log.error("database file %s is read-only; refusing writes", path)
            self.file_problem = "database file is read-only; make it writable again"
            self._reopen_when_writable = True
            return
        if self.file_problem:
            log.warning("database file %s is writable again; writes resume", path)
            self.file_problem = ""
        if self._reopen_when_writable:
            self._reopen()

    def _reopen(self, replaced: bool = False) -> None:
        self.file_problem = "database file changed; reopening"
        if self.reopen is None:
            return
        if replaced and not companions.set_aside(self.db.database, known=self._companions):
            # Opening the new file now would corrupt it: stay on the old one (reads go on,
            # writes are refused) and try again at the next look.
            self.file_problem = "database file replaced, and its old WAL cannot be set aside; see the log"
            return
        self.db.close()
        try:
            self.reopen()
        except Exception as exc:  # the file now at the path is not one hq can use
            log.error("cannot open the database file now at %s: %s; refusing writes", self.db.database, exc)
            self.file_problem = (
                f"database file changed and cannot be opened ({exc}); restore it or restart hq"
            )
            self._file_id = companions.file_id(self.db.database)  # not again every heartbeat
            return
        self._method_ids.clear()
        self._file_id = companions.file_id(self.db.database)
        self._companions = companions.identities(self.db.database)
        self.opened += 1
        self._reopen_when_writable = False
        self.file_problem = ""

    def close(self) -> None:
        """The worker stops: close the connection, and forget whose companions were there
        if SQLite removed them (hq.workers.companions.forget)."""
        self.db.close()
        if isinstance(self.db, SqliteDatabase):
            companions.forget(self.db.database)

    def identity(self) -> str:
        """Which database this worker answers from: the open file's device and inode, and
        how often it was opened. The broker's cache learns only while every worker reports
        the same, and forgets everything when one changes (a file replaced under hq)."""
        file_id = self._file_id or ("-", "-")
        return f"{file_id[0]}:{file_id[1]}:{self.opened}"

    def writes_failed(self, exc: Exception) -> None:
        """A write failed with ``exc``: after "read-only", reopen once the file is writable."""
        if errors.kind(exc) == errors.READ_ONLY:
            self._reopen_when_writable = True

    @contextmanager
    def heartbeating(self, connection=None):
        """Run ``on_wait`` (the worker heartbeats there) every few thousand SQLite VM steps
        of the statements inside, on ``connection`` (default: the store's): a scan or a
        delete of millions of rows does not make the broker take this worker for dead."""
        connection = connection or self.db.connection()

        def tick():
            try:
                self.on_wait()
            except Exception as exc:  # never abort the statement for a heartbeat
                log.debug("heartbeat during a statement failed: %s", exc)
            return 0

        connection.set_progress_handler(tick, _PROGRESS_STEPS)
        try:
            yield
        finally:
            try:
                connection.set_progress_handler(None, 0)
            except sqlite3.ProgrammingError:  # closed: the store reopened a replaced file
                pass

    @contextmanager
    def write_transaction(self):
        """``BEGIN IMMEDIATE`` ... ``COMMIT``, waiting up to ``lock_wait_s`` for the lock.

        Plain statements rather than peewee's ``atomic()``: when SQLite has already rolled a
        transaction back itself (disk full, I/O error), peewee's ROLLBACK fails with "no
        transaction is active" and hides the real error from the caller.
        """
        self.check_file()  # stat + access, ~3 us: no write to a file that left its path
        if self.file_problem:
            raise StorageUnavailable(self.file_problem)
        deadline = time.monotonic() + self.lock_wait_s
        while True:
            try:
                self._sql("BEGIN IMMEDIATE")
                break
            except OperationalError as exc:
                if not is_busy(exc) or time.monotonic() >= deadline:
                    raise
                self.on_wait()
        try:
            yield
            self._sql("COMMIT")
            for name, n in self._uncommitted_counts.items():  # counted once committed
                self.counters[name] = self.counters.get(name, 0) + n
        except BaseException as exc:
            self.writes_failed(exc)
            if self.in_transaction():
                self._sql("ROLLBACK")
            raise
        finally:
            self._uncommitted_methods.clear()
            self._uncommitted_counts.clear()

    def method_id(self, method: str, create: bool = False):
        """Integer id of a method string; with ``create``, add it (inside the caller's
        write transaction). Only ids read back from a committed row are cached, so a
        rolled-back insert never leaves a stale id behind."""
        mid = self._method_ids.get(method)
        if mid is not None:
            return mid
        row = self._sql("SELECT id FROM methods WHERE name = ?", (method,)).fetchone()
        if row is not None:
            if method not in self._uncommitted_methods:
                self._method_ids[method] = row[0]
            return row[0]
        if not create:
            return None
        self._uncommitted_methods.add(method)
        row = self._sql(
            "INSERT INTO methods (name) VALUES (?) ON CONFLICT (name) DO NOTHING RETURNING id", (method,)
        ).fetchone()
        if row is None:  # another writer added it meanwhile (PostgreSQL; committed, so it stays)
            row = self._sql("SELECT id FROM methods WHERE name = ?", (method,)).fetchone()
        return row[0]

    # --- lookups ----------------------------------------------------------------------
    def get_unihashes(self, method: str, taskhashes: list) -> list:
        """Unihash (str) or None for each taskhash, in order."""
        mid = self.method_id(method)
        if mid is None:
            return [None] * len(taskhashes)
        keys = self.keys(taskhashes)
        unique = list(dict.fromkeys(keys))
        params = _padded(unique)
        cursor = self._sql(
            "SELECT taskhash, unihash FROM unihashes WHERE method = ? AND taskhash IN (%s)"
            % _placeholders(len(params)),
            [mid, *params],
        )
        found = {taskhash: unihash.hex() for taskhash, unihash in cursor}
        return [found.get(key) for key in keys]

    def get_unihashes_grouped(self, groups: list) -> list:
        """``[(method, taskhashes)]`` -> one answer list per group; one query per method."""
        by_method: dict = {}
        for method, taskhashes in groups:
            by_method.setdefault(method, []).extend(taskhashes)
        if len(by_method) == len(groups):
            return [self.get_unihashes(m, t) for m, t in groups]
        answers = {m: iter(self.get_unihashes(m, t)) for m, t in by_method.items()}
        return [[next(answers[m]) for _ in t] for m, t in groups]

    def unihashes_exist(self, unihashes: list) -> list:
        """For each string: does any mapping have this unihash? Outhash rows do not count."""
        keys = [to_key(u) if len(u) == 64 else None for u in unihashes]
        wanted = [k for k in keys if isinstance(k, bytes)]
        if not wanted:
            return [False] * len(unihashes)
        prefixes = _padded(list(dict.fromkeys(k[:8] for k in wanted)))
        cursor = self._sql(
            "SELECT unihash FROM unihashes WHERE substr(unihash, 1, 8) IN (%s)"
            % _placeholders(len(prefixes)),
            prefixes,
        )
        present = {row[0] for row in cursor}
        return [k in present for k in keys]

    def _mapping(self, mid: int, key):
        row = self._sql(
            "SELECT unihash FROM unihashes WHERE method = ? AND taskhash = ?", (mid, key)
        ).fetchone()
        return row[0].hex() if row else None

    def _row(self, method: str, values: tuple, with_unihash: bool) -> dict:
        (id_, taskhash, outhash, created, owner, pn, pv, pr, task, siginfo, *rest) = values
        row = {
            "id": id_,
            "method": method,
            "taskhash": from_key(taskhash),
            "outhash": from_key(outhash),
            "created": format_created(created),
            "owner": owner,
            "PN": pn,
            "PV": pv,
            "PR": pr,
            "task": task,
            "outhash_siginfo": siginfo,
        }
        if with_unihash:
            row["unihash"] = rest[0].hex()
            row["gc_mark"] = rest[1]
        return row

    def get_full(self, method: str, taskhash: str):
        """The oldest outhash report of (method, taskhash) joined with its mapping, or None."""
        mid = self.method_id(method)
        if mid is None:
            return None
        key = self.key(taskhash)
        values = self._sql(
            f"SELECT {_OUTHASH_FIELDS}, u.unihash, u.gc_mark FROM outhashes o "
            "JOIN unihashes u ON u.method = o.method AND u.taskhash = o.taskhash "
            "WHERE o.method = ? AND substr(o.taskhash, 1, 8) = substr(?, 1, 8) "
            "AND o.taskhash = ? ORDER BY o.created, o.id LIMIT 1",
            (mid, key, key),
        ).fetchone()
        return self._row(method, values, True) if values else None

    def get_outhash(self, method: str, outhash: str, with_unihash: bool = True):
        """The oldest report of (method, outhash) (joined with its mapping), or None."""
        mid = self.method_id(method)
        if mid is None:
            return None
        key = self.key(outhash)
        if with_unihash:
            sql = (
                f"SELECT {_OUTHASH_FIELDS}, u.unihash, u.gc_mark FROM outhashes o "
                "JOIN unihashes u ON u.method = o.method AND u.taskhash = o.taskhash "
            )
        else:
            sql = f"SELECT {_OUTHASH_FIELDS} FROM outhashes o "
        values = self._sql(
            sql + "WHERE o.method = ? AND substr(o.outhash, 1, 8) = substr(?, 1, 8) "
            "AND o.outhash = ? ORDER BY o.created, o.id LIMIT 1",
            (mid, key, key),
        ).fetchone()
        return self._row(method, values, with_unihash) if values else None

    # --- writes -----------------------------------------------------------------------
    def report(self, method: str, taskhash: str, outhash: str, unihash: str, extra=None) -> str:
        return self.report_many([(method, taskhash, outhash, unihash, extra)])[0]

    def report_many(self, reports: list) -> list:
        """Several reports in one write transaction (group commit); see :meth:`_report`."""
        with self.write_transaction():  # (PostgresqlStore has its own, with its hash locks)
            failpoints.hit("store.report")  # a test widens the race window here
            mark = current_gc_mark(self._sql) or ""
            return [self._report(mark, *report) for report in reports]

    def report_equiv(self, method: str, taskhash: str, unihash: str) -> str:
        return self.report_equiv_many([(method, taskhash, unihash)])[0]

    def report_equiv_many(self, reports: list) -> list:
        with self.write_transaction():
            self.lock_hashes([(r[0], r[1]) for r in reports])
            mark = current_gc_mark(self._sql) or ""
            return [self._report_equiv(mark, *report) for report in reports]

    def _report(self, mark: str, method: str, taskhash: str, outhash: str, unihash: str, extra=None) -> str:
        """Record an output hash; return the unihash now mapped to (method, taskhash).

        §7.2: a taskhash without a mapping takes the unihash of the oldest other report with
        the same (method, outhash) and a different taskhash that has a mapping; else the
        submitted one. The first mapping of a taskhash wins and never changes. As in
        bitbake-hashserv 2.19 (not as its documentation says), that holds even when this very
        (method, taskhash, outhash) was reported before: a mapping deleted since (``remove``,
        ``gc-sweep``) while the output row stayed is made again. A new report is two
        statements: the existence check and the equivalence lookup live inside the INSERTs,
        and RETURNING gives the mapping (SQLite 3.35 or newer); a report already made, one
        or two lookups.
        """
        extra = extra or {}
        tkey, okey = self.key(taskhash), self.key(outhash)
        mid = self.method_id(method, create=True)
        sql = self._sql
        inserted = sql(
            "INSERT INTO outhashes (method, taskhash, outhash, created, owner, PN, PV, PR, task, "
            "outhash_siginfo) SELECT ?, ?, ?, ?, ?, ?, ?, ?, ?, ? WHERE NOT EXISTS (SELECT 1 FROM "
            "outhashes WHERE method = ? AND substr(taskhash, 1, 8) = substr(?, 1, 8) "
            "AND taskhash = ? AND outhash = ?)",
            (
                mid,
                tkey,
                okey,
                now_us(),
                *(extra.get(f) for f in p.REPORT_EXTRA_FIELDS),
                mid,
                tkey,
                tkey,
                okey,
            ),
        ).rowcount
        mapped = None if inserted else self._mapping(mid, tkey)
        if mapped is None:
            row = sql(
                "INSERT INTO unihashes (method, taskhash, unihash, gc_mark) VALUES (?, ?, "
                "coalesce((SELECT u.unihash FROM outhashes o JOIN unihashes u "
                "ON u.method = o.method AND u.taskhash = o.taskhash "
                "WHERE o.method = ? AND substr(o.outhash, 1, 8) = substr(?, 1, 8) "
                "AND o.outhash = ? AND o.taskhash != ? ORDER BY o.created, o.id LIMIT 1), ?), ?) "
                "ON CONFLICT DO NOTHING RETURNING unihash",
                (mid, tkey, mid, okey, okey, tkey, bytes.fromhex(unihash), mark),
            ).fetchone()
            if row is not None:
                mapped = row[0].hex()
                self._count("reports.new" if mapped == unihash else "reports.equivalent")
                return mapped
            mapped = self._mapping(mid, tkey)  # mapped before, by another report of the taskhash
        self._count("reports.existing")
        return mapped or unihash

    def _report_equiv(self, mark: str, method: str, taskhash: str, unihash: str) -> str:
        """§7.3: map (method, taskhash) to unihash unless mapped already; return the mapping."""
        tkey = self.key(taskhash)
        mid = self.method_id(method, create=True)
        self._sql(
            "INSERT INTO unihashes (method, taskhash, unihash, gc_mark) VALUES (?, ?, ?, ?) "
            "ON CONFLICT DO NOTHING",
            (mid, tkey, bytes.fromhex(unihash), mark),
        )
        return self._mapping(mid, tkey) or unihash


def store_for(db, lock_wait_s: float = 5.0) -> Store:
    """The store for a database :func:`hq.workers.schema.open_database` returned."""
    if isinstance(db, SqliteDatabase):
        return Store(db, lock_wait_s=lock_wait_s)
    from .postgresql import PostgresqlStore

    return PostgresqlStore(db, lock_wait_s=lock_wait_s)
