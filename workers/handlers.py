"""What a worker does with one job: decode the body, call the store, encode the reply.

No sockets here. :meth:`Handlers.handle` never raises: a bad body becomes its protocol
error code, a refused write becomes STORAGE, and anything unexpected becomes INTERNAL
with a logged traceback, so one bad request never takes a worker down.
"""

from __future__ import annotations

import logging
import sqlite3

import peewee

from hq import permissions as perms
from hq import protocol as p

from . import errors
from . import importer as imp
from . import maintenance as mt
from . import users as us
from .store import StorageUnavailable, Store, is_busy

log = logging.getLogger(__name__)


def _method(frame) -> str:
    return p.decode_text(frame, "method", p.MAX_METHOD_BYTES)


def _hash(frame, what: str) -> str:
    return p.decode_text(frame, what, p.MAX_HASH_BYTES)


def _extra(body: list, index: int) -> dict:
    if len(body) <= index:
        return {}
    extra = p.decode_json_object(body[index], "extra")
    out = {}
    for name in p.REPORT_EXTRA_FIELDS:
        value = extra.get(name)
        if value is not None:
            value = value if isinstance(value, str) else str(value)
            try:
                value.encode("utf-8")  # JSON may carry lone surrogates, which SQLite refuses
            except UnicodeEncodeError:
                raise p.ProtocolError(p.E_INVALID, f"extra field {name} is not valid Unicode") from None
            out[name] = value
    return out


#: Commands whose second run answers as the first did: the reads, and the reports (a report
#: run again finds its own rows and answers the unihash they mapped).
RERUNNABLE = frozenset(
    {
        p.PING,
        p.GET,
        p.EXISTS,
        p.GET_FULL,
        p.GET_OUTHASH,
        p.REPORT,
        p.REPORT_EQUIV,
        p.GC_STATUS,
        p.DB_USAGE,
        p.QUERY_COLUMNS,
        p.IMPORT_STATUS,
        p.GET_USER,
        p.GET_ALL_USERS,
    }
)


class Handlers:
    """Each command is a pair: ``parse`` (one job's body -> arguments, raising ProtocolError)
    and ``run`` (the arguments of every job in a REQUEST -> one reply body per job).

    Running a REQUEST's jobs together is what makes the broker's merging pay: all the
    lookups of one method are one SQL query, and all the reports one transaction (group
    commit: one fsync, one write lock, every reply after the commit).
    """

    def __init__(self, store: Store, read_only: bool = False):
        self.store = store
        self.read_only = read_only  # hq-worker --read-only: see permissions.READ_ONLY_REFUSED
        self.table = {
            p.PING: (lambda body: None, lambda args: [[] for _ in args]),
            p.GET: (self.parse_get, self.run_get),
            p.EXISTS: (self.parse_exists, self.run_exists),
            p.GET_FULL: (self.parse_get_full, self.run_each(self.get_full)),
            p.GET_OUTHASH: (self.parse_get_outhash, self.run_each(self.get_outhash)),
            p.REPORT: (self.parse_report, self.run_reports),
            p.REPORT_EQUIV: (self.parse_report_equiv, self.run_report_equivs),
        }
        # Database administration (PROTOCOL.md §3.7): the SQL and body parsing live in
        # maintenance.py; the import of a bitbake-hashserv database in importer.py.
        admin = self.maintenance = mt.Maintenance(store)
        importer = self.importer = imp.Importer(store)
        self.table.update(
            {
                p.REMOVE: (mt.parse_remove, self.run_each(_json(admin.remove))),
                p.CLEAN_UNUSED: (mt.parse_clean_unused, self.run_each(_json(admin.clean_unused))),
                p.GC_MARK: (mt.parse_gc_mark, self.run_each(_json(admin.gc_mark))),
                p.GC_MARK_STREAM: (mt.parse_gc_mark_stream, self.run_each(_counts(admin.gc_mark_stream))),
                p.GC_STATUS: (mt.parse_nothing, self.run_each(_json(admin.gc_status))),
                p.GC_SWEEP: (mt.parse_gc_sweep, self.run_each(_json(admin.gc_sweep))),
                p.DB_USAGE: (mt.parse_nothing, self.run_each(_json(admin.db_usage))),
                p.QUERY_COLUMNS: (mt.parse_nothing, self.run_each(_json(admin.query_columns))),
                p.IMPORT: (imp.parse_import, self.run_each(_json(importer.import_chunk))),
                p.IMPORT_STATUS: (imp.parse_import_status, self.run_each(_json(importer.status))),
            }
        )
        # Users (ref. §6): the broker has checked the caller's permissions.
        users = self.users = us.Users(store)
        self.table.update(
            {
                p.AUTH: (us.parse_auth, self.run_each(_json(users.auth))),
                p.BECOME_USER: (us.parse_name, self.run_each(_json(users.become))),
                p.GET_USER: (us.parse_name, self.run_each(_json(users.get))),
                p.GET_ALL_USERS: (mt.parse_nothing, self.run_each(_json(users.get_all))),
                p.NEW_USER: (us.parse_name_perms, self.run_each(_json(users.new))),
                p.SET_USER_PERMS: (us.parse_name_perms, self.run_each(_json(users.set_perms))),
                p.REFRESH_TOKEN: (us.parse_name, self.run_each(_json(users.refresh_token))),
                p.DELETE_USER: (us.parse_name, self.run_each(_json(users.delete))),
                p.ADMIN_BOOTSTRAP: (us.parse_bootstrap, self.run_each(_json(users.bootstrap))),
                p.BACKFILL: (imp.parse_backfill, self.run_each(importer.backfill)),
            }
        )

    def handle(self, command: bytes, credentials: bytes, body: list) -> tuple:
        """Return (status, reply body frames) for one job."""
        ((_, status, reply),) = self.handle_jobs(command, credentials, [(b"", body)])
        return status, reply

    def handle_jobs(self, command: bytes, credentials: bytes, jobs: list) -> list:
        """Return ``[(job_id, status, reply body frames)]``, one per job, in order."""
        entry = self.table.get(command)
        if entry is None:
            text = b"unknown command " + repr(command[:40]).encode()
            return [(job_id, p.E_UNKNOWN_COMMAND, [text]) for job_id, _ in jobs]
        parse, run = entry
        results: dict = {}
        parsed: list = []
        if self.read_only and command in perms.READ_ONLY_REFUSED:  # (a writing broker sends
            # none while a worker that writes is registered; with none, refused, not stored)
            return [(job_id, *self._read_only_refusal(command)) for job_id, _ in jobs]
        if command == p.REPORT:
            try:
                username, write = p.decode_actor(credentials)
            except p.ProtocolError as exc:
                return [(job_id, *self._error(command, exc)) for job_id, _ in jobs]
            if write and self.read_only:
                return [(job_id, *self._read_only_refusal(command)) for job_id, _ in jobs]
            run = self._reporter(username, write)
        for job_id, body in jobs:
            try:
                if command not in p.BROKER_ONLY_COMMANDS:  # the broker's own: no client shape
                    p.check_body_shape(command, body)
                parsed.append((job_id, parse(body)))
            except Exception as exc:  # ProtocolError: its code; a parser bug: INTERNAL, logged
                results[job_id] = self._error(command, exc)
        if parsed:
            try:
                bodies = self._run(command, run, [args for _, args in parsed])
                for (job_id, _), reply in zip(parsed, bodies):
                    results[job_id] = (p.OK, reply)
            except Exception as exc:
                error = self._error(command, exc)
                for job_id, _ in parsed:
                    results[job_id] = error
        return [(job_id, *results[job_id]) for job_id, _ in jobs]

    def _run(self, command: bytes, run, many: list) -> list:
        """``run(many)``; run once more, on a new connection, when the database connection
        turns out to be lost (PostgreSQL restarted, the backend was terminated) and the
        command gives the same answer when run twice (:data:`RERUNNABLE`). So a connection
        lost between requests costs a build nothing; any other write answers STORAGE."""
        try:
            return run(many)
        except Exception as exc:
            if command not in RERUNNABLE or not self.store.connection_lost(exc):
                raise
            log.warning(
                "database connection lost (%s); running %s again on a new connection",
                (errors.reason(exc).strip().splitlines() or [type(exc).__name__])[0],
                command.decode(errors="replace"),
            )
        return run(many)

    @staticmethod
    def _read_only_refusal(command: bytes) -> tuple:
        text = f"{command.decode(errors='replace')} is not available on a read-only worker (--read-only)"
        return p.E_UNKNOWN_COMMAND, [text.encode()]

    @staticmethod
    def _error(command: bytes, exc: Exception) -> tuple:
        name = command.decode(errors="replace")
        if isinstance(exc, p.ProtocolError):
            return exc.code, [exc.message.encode("utf-8", "replace")[: p.MAX_ERROR_BYTES]]
        if isinstance(exc, StorageUnavailable):
            return p.E_STORAGE, [str(exc).encode()[: p.MAX_ERROR_BYTES]]
        if isinstance(exc, (sqlite3.OperationalError, peewee.OperationalError)):
            # The text never says "database is locked" to a client: a lock not had within
            # lock_wait is BUSY (retried); disk full or a read-only file is STORAGE.
            if is_busy(exc):
                return p.E_BUSY, [b"database busy, retry"]
            log.warning("storage error on %s: %s", name, exc)
            return p.E_STORAGE, [b"storage unavailable: " + _storage_reason(exc)]
        if isinstance(exc, (sqlite3.DatabaseError, peewee.DatabaseError)):
            log.error("database error on %s: %s", name, exc)
            return p.E_STORAGE, [b"storage error"]
        log.error("internal error handling %s", name, exc_info=exc)
        return p.E_INTERNAL, [b"internal error"]

    @staticmethod
    def run_each(fn):
        return lambda many: [fn(*args) for args in many]

    # --- lookups ----------------------------------------------------------------------
    @staticmethod
    def parse_get(body: list) -> list:
        return [(_method(body[i]), p.unpack_items(body[i + 1], "taskhash")) for i in range(0, len(body), 2)]

    def run_get(self, many: list) -> list:
        groups = [group for groups in many for group in groups]
        answers = iter(self.store.get_unihashes_grouped(groups))
        return [[p.pack_unihashes(next(answers)) for _ in groups] for groups in many]

    @staticmethod
    def parse_exists(body: list) -> list:
        return [p.unpack_items(frame, "unihash") for frame in body]

    def run_exists(self, many: list) -> list:
        flat = [u for chunks in many for chunk in chunks for u in chunk]
        flags = self.store.unihashes_exist(flat)
        out, at = [], 0
        for chunks in many:
            frames = []
            for chunk in chunks:
                frames.append(p.pack_flags(flags[at : at + len(chunk)]))
                at += len(chunk)
            out.append(frames)
        return out

    @staticmethod
    def parse_get_full(body: list) -> tuple:
        return _method(body[0]), _hash(body[1], "taskhash")

    def get_full(self, method: str, taskhash: str) -> list:
        return [p.encode_json(self.store.get_full(method, taskhash))]

    @staticmethod
    def parse_get_outhash(body: list) -> tuple:
        _hash(body[2], "taskhash")  # used only by an upstream lookup, which hq lacks so far
        return _method(body[0]), _hash(body[1], "outhash"), p.decode_flag(body[3], "with_unihash")

    def get_outhash(self, method: str, outhash: str, with_unihash: bool) -> list:
        return [p.encode_json(self.store.get_outhash(method, outhash, with_unihash))]

    # --- writes -------------------------------------------------------------------------
    @staticmethod
    def parse_report(body: list) -> tuple:
        return (
            _method(body[0]),
            _hash(body[1], "taskhash"),
            _hash(body[2], "outhash"),
            p.decode_unihash(body[3]),
            _extra(body, 4),
        )

    def run_reports(self, many: list) -> list:
        return [[u.encode()] for u in self.store.report_many(many)]

    def _reporter(self, username, write: bool):
        """How this REQUEST's reports run: written, with the logged-in user as their owner
        (as the reference records it), or (read-only server, or no ``@report``) answered
        with the unihash of the outhash's oldest report, or the submitted one, storing nothing."""
        if not write:
            return self.run_lookup_reports
        if username is None:
            return self.run_reports
        return lambda many: self.run_reports([(*r[:4], {**r[4], "owner": username}) for r in many])

    def run_lookup_reports(self, many: list) -> list:
        out = []
        for method, _taskhash, outhash, unihash, _extra in many:
            row = self.store.get_outhash(method, outhash, True)
            out.append([((row or {}).get("unihash") or unihash).encode()])
        return out

    @staticmethod
    def parse_report_equiv(body: list) -> tuple:
        _extra(body, 3)  # accepted and ignored, as the reference does
        return _method(body[0]), _hash(body[1], "taskhash"), p.decode_unihash(body[2])

    def run_report_equivs(self, many: list) -> list:
        return [[u.encode()] for u in self.store.report_equiv_many(many)]


def _json(fn):
    """A reply of one JSON frame from what ``fn`` returns."""
    return lambda *args: [p.encode_json(fn(*args))]


def _counts(fn):
    """A reply of one ASCII decimal frame per count ``fn`` returns (gc-mark-stream)."""
    return lambda *args: [b"%d" % n for n in fn(*args)]


def _storage_reason(exc: Exception) -> bytes:
    return errors.reason(exc).encode()  # busy/locked never gets here: that is BUSY, not STORAGE
