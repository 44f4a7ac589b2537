"""Database administration (PROTOCOL.md §3.7, ref. §7.5-7.8): remove, clean-unused, the gc
mark-and-sweep cycle, table usage and the columns a *where* object may name.

A where object maps column names to strings, as a client sees them. They are converted the
way :mod:`.schema` stores them, so a value that cannot be stored matches nothing: a method
not in ``methods``, a unihash that is not 64 lower-case hex, a ``created`` that is not an
ISO 8601 time (the form ``get-full`` returns; without a zone it is UTC). Hashes go through
``to_key`` like every other hash.

Writes run in :meth:`Store.write_transaction` (``BEGIN IMMEDIATE``, lock wait with
heartbeats, refused when the file is gone or read-only); dry runs and reads in a read
transaction that is always rolled back. A big delete is one statement per table; while it
runs, SQLite's progress handler keeps the worker heartbeating, so the broker does not take
a worker busy deleting a million rows for a dead one.

The parse functions take one job's body and raise :class:`hq.protocol.ProtocolError`; the
:class:`Maintenance` methods return the reply as the wire has it (``{"count": N}``, ...).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from contextlib import contextmanager

from hq import protocol as p

from .schema import OUTHASH_COLUMNS, TABLE_NAMES, UNIHASH_COLUMNS
from .store import GC_MARK_KEY, Store, _padded, _placeholders, current_gc_mark
from .timestamps import now_us, parse_created

log = logging.getLogger(__name__)

MAX_MARK_BYTES = 256
#: Every column a where object may name (query-columns), mapping columns first.
QUERY_COLUMNS = tuple(dict.fromkeys(UNIHASH_COLUMNS + OUTHASH_COLUMNS))
_MAX_AGE_DIGITS = 15  # about 31 million years; keeps the cutoff inside SQLite's integers


# --- parsing one job's body ----------------------------------------------------------------


def where_object(value, what: str = "where") -> dict:
    """The usable part of a decoded where object: known columns with string values.

    ``null`` values and unknown keys are dropped (ref. §7.5). Raises ProtocolError for a
    value of another type (400) or a string SQLite cannot store, e.g. a lone surrogate (422).
    """
    if not isinstance(value, dict):
        raise p.ProtocolError(p.E_BAD_REQUEST, f"{what} must be a JSON object")
    out = {}
    for column in QUERY_COLUMNS:
        v = value.get(column)
        if v is None:
            continue
        if not isinstance(v, str):
            raise p.ProtocolError(p.E_BAD_REQUEST, f"{what} value of {column} must be a string")
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            raise p.ProtocolError(p.E_INVALID, f"{what} value of {column} is not valid Unicode") from None
        out[column] = v
    return out


def parse_where(frame) -> dict:
    return where_object(p.decode_json_object(frame, "where"))


def parse_mark(frame) -> str:
    data = bytes(frame)
    if len(data) > MAX_MARK_BYTES:
        raise p.ProtocolError(p.E_TOO_LARGE, f"mark longer than {MAX_MARK_BYTES} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise p.ProtocolError(p.E_BAD_REQUEST, "mark is not valid UTF-8") from None


def parse_max_age(frame) -> int:
    data = bytes(frame)
    if not data.isdigit() or len(data) > _MAX_AGE_DIGITS:  # bytes.isdigit: ASCII digits only
        raise p.ProtocolError(p.E_BAD_REQUEST, "max_age_seconds must be a non-negative decimal integer")
    return int(data)


def _dry_run(body: list, index: int) -> bool:
    return p.decode_flag(body[index], "dry_run") if len(body) > index else False


def parse_where_chunk(frame) -> list:
    """A gc-mark-stream chunk: one where object of JSON text per line."""
    try:
        text = bytes(frame).decode("utf-8")
    except UnicodeDecodeError:
        raise p.ProtocolError(p.E_BAD_REQUEST, "where chunk is not valid UTF-8") from None
    wheres = []
    for n, line in enumerate(text.split("\n"), 1):
        try:
            value = json.loads(line)
        except (ValueError, RecursionError):
            raise p.ProtocolError(p.E_BAD_REQUEST, f"where {n} of the chunk is not valid JSON") from None
        wheres.append(where_object(value, f"where {n} of the chunk"))
    return wheres


def parse_remove(body: list) -> tuple:
    return parse_where(body[0]), _dry_run(body, 1)


def parse_clean_unused(body: list) -> tuple:
    return parse_max_age(body[0]), _dry_run(body, 1)


def parse_gc_mark(body: list) -> tuple:
    return parse_mark(body[0]), parse_where(body[1])


def parse_gc_mark_stream(body: list) -> tuple:
    return ([(parse_mark(body[i]), parse_where_chunk(body[i + 1])) for i in range(0, len(body), 2)],)


def parse_gc_sweep(body: list) -> tuple:
    return parse_mark(body[0]), _dry_run(body, 1)


def parse_nothing(body: list) -> tuple:
    return ()


# --- the commands ----------------------------------------------------------------------------

#: A condition that no row can meet (a value that cannot be stored).
NEVER = object()


class Maintenance:
    """The administration commands over one worker's :class:`Store`."""

    def __init__(self, store: Store):
        self.store = store

    def _sql(self, sql: str, params=()):
        return self.store._sql(sql, params)

    # transactions ----------------------------------------------------------------------------
    @contextmanager
    def _writing(self, dry_run: bool = False):
        """A write transaction, or for a dry run a read transaction rolled back at the end."""
        with self.store.heartbeating():
            if not dry_run:
                with self.store.write_transaction():
                    yield
                return
            self._sql("BEGIN")
            try:
                yield
            finally:
                if self.store.in_transaction():
                    self._sql("ROLLBACK")

    def current_mark(self):
        """The current gc mark, or None when there is none."""
        return current_gc_mark(self._sql)

    # where ------------------------------------------------------------------------------------
    def _condition(self, where: dict, columns: tuple):
        """``(sql, params)`` over the given columns of ``columns``; None when none is given;
        NEVER when a value cannot match any row."""
        parts, params = [], []
        for column in columns:
            value = where.get(column)
            if value is None:
                continue
            if column == "method":
                value = self.store.method_id(value)
                if value is None:
                    return NEVER
                parts.append("method = ?")
            elif column in ("taskhash", "outhash"):
                value = self.store.key(value)
                parts.append(f"substr({column}, 1, 8) = substr(?, 1, 8) AND {column} = ?")
                params.append(value)  # the prefix lets SQLite use the 8-byte prefix indexes
            elif column == "unihash":
                if not p.is_unihash(value):
                    return NEVER
                value = bytes.fromhex(value)
                parts.append("substr(unihash, 1, 8) = substr(?, 1, 8) AND unihash = ?")
                params.append(value)
            elif column == "created":
                value = parse_created(value)
                if value is None:
                    return NEVER
                parts.append("created = ?")
            else:  # gc_mark, owner, PN, PV, PR, task, outhash_siginfo: text as stored
                parts.append(f"{column} = ?")
            params.append(value)
        if not parts:
            return None
        return " AND ".join(parts), params

    def _delete(self, table: str, condition: str, params, dry_run: bool) -> int:
        if dry_run:
            return self._sql(f"SELECT count(*) FROM {table} WHERE {condition}", params).fetchone()[0]
        return self._sql(f"DELETE FROM {table} WHERE {condition}", params).rowcount

    # commands ---------------------------------------------------------------------------------
    def remove(self, where: dict, dry_run: bool = False) -> dict:
        """Delete the outhash rows matching every given outhash column and the mappings
        matching every given mapping column; a table none of whose columns is given is not
        touched (ref. §7.5)."""
        count = 0
        with self._writing(dry_run):
            for table, columns in (("outhashes", OUTHASH_COLUMNS), ("unihashes", UNIHASH_COLUMNS)):
                condition = self._condition(where, columns)
                if condition is not None and condition is not NEVER:
                    count += self._delete(table, *condition, dry_run)
        return {"count": count}

    def clean_unused(self, max_age_s: int, dry_run: bool = False) -> dict:
        """Delete the outhash rows without a mapping for their (method, taskhash) that were
        created more than ``max_age_s`` seconds ago. (The reference adds the age instead of
        subtracting it, ref. §7.6; hq does what the name says.)"""
        cutoff = max(now_us() - max_age_s * 1_000_000, -(2**62))
        condition = (
            "created < ? AND NOT EXISTS (SELECT 1 FROM unihashes u "
            "WHERE u.method = outhashes.method AND u.taskhash = outhashes.taskhash)"
        )
        with self._writing(dry_run):
            return {"count": self._delete("outhashes", condition, (cutoff,), dry_run)}

    def _set_mark(self, mark: str) -> None:
        self._sql(
            "INSERT INTO config (name, value) VALUES (?, ?) "
            "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
            (GC_MARK_KEY, mark),
        )

    def _mark(self, mark: str, where: dict) -> int:
        condition = self._condition(where, UNIHASH_COLUMNS)
        if condition is None or condition is NEVER:
            return 0
        sql, params = condition
        return self._sql(f"UPDATE unihashes SET gc_mark = ? WHERE {sql}", [mark, *params]).rowcount

    def gc_mark(self, mark: str, where: dict) -> dict:
        """Make ``mark`` the current mark, then set it on every mapping matching the mapping
        columns of ``where``; count the mappings matched, marked before or not (ref. §7.7)."""
        with self._writing():
            self._set_mark(mark)
            return {"count": self._mark(mark, where)}

    def gc_mark_many(self, mark: str, wheres: list) -> int:
        """gc-mark for each where object of one chunk, in one transaction; the sum of the
        counts. Objects that are just ``{"unihash": U}`` (marking the unihashes found in an
        sstate cache) are one UPDATE for the whole chunk."""
        by_unihash, others = [], []
        for where in wheres:
            if len(where) == 1 and "unihash" in where:
                by_unihash.append(where["unihash"])
            else:
                others.append(where)
        with self._writing():
            self._set_mark(mark)
            count = sum(self._mark(mark, where) for where in others)
            keys = [bytes.fromhex(u) for u in by_unihash if p.is_unihash(u)]
            if keys:
                unique = list(dict.fromkeys(keys))
                prefixes = _padded(list(dict.fromkeys(k[:8] for k in unique)))
                values = _padded(unique)
                cursor = self._sql(
                    "UPDATE unihashes SET gc_mark = ? WHERE substr(unihash, 1, 8) IN (%s) "
                    "AND unihash IN (%s) RETURNING unihash"
                    % (_placeholders(len(prefixes)), _placeholders(len(values))),
                    [mark, *prefixes, *values],
                )
                matched = Counter(row[0] for row in cursor)
                count += sum(matched[k] for k in keys)  # a unihash listed twice counts twice
        return count

    def gc_mark_stream(self, groups: list) -> list:
        """``[(mark, [where, ...])]`` -> the count of each group, each its own transaction."""
        return [self.gc_mark_many(mark, wheres) for mark, wheres in groups]

    def gc_status(self) -> dict:
        """``keep``: mappings carrying the current mark ("" when there is none); ``remove``:
        all others; ``mark``: the current mark or None (ref. §7.7)."""
        with self._writing(dry_run=True):
            mark = self.current_mark()
            keep = self._sql("SELECT count(*) FROM unihashes WHERE gc_mark = ?", (mark or "",)).fetchone()[0]
            total = self._sql("SELECT count(*) FROM unihashes").fetchone()[0]
        return {"keep": keep, "remove": total - keep, "mark": mark}

    def gc_sweep(self, mark: str, dry_run: bool = False) -> dict:
        """Delete every mapping whose mark is not ``mark`` and clear the current mark, if
        ``mark`` is the current mark; refuse (422) otherwise. A dry run only counts."""
        with self._writing(dry_run):
            current = self.current_mark()
            if not current or mark != current:
                raise p.ProtocolError(p.E_INVALID, f"'{mark}' is not the current mark. Refusing to sweep")
            count = self._delete("unihashes", "gc_mark != ?", (mark,), dry_run)
            if not dry_run:
                self._sql("DELETE FROM config WHERE name = ?", (GC_MARK_KEY,))
        return {"count": count}

    def db_usage(self) -> dict:
        with self._writing(dry_run=True):
            return {
                "usage": {
                    table: {"rows": self._sql(f"SELECT count(*) FROM {table}").fetchone()[0]}
                    for table in TABLE_NAMES
                }
            }

    def query_columns(self) -> dict:
        return {"columns": list(QUERY_COLUMNS)}
