"""Copying a database written by BitBake's ``bitbake-hashserv`` into hq (``import``,
``import-status``; PROTOCOL.md §3.7).

hq-admin reads the source file and sends its rows here, chunk by chunk, in source ``id``
order. Each chunk is converted to hq's storage exactly as a report would be (methods
interned, hashes as keys, unihashes as 32-byte blobs, ``created`` as microseconds since
the epoch) and inserted in ONE write transaction together with the checkpoint
``import:<table>:<source>`` = the chunk's last source id, in hq's ``config`` table. So an
import that is interrupted resumes exactly after the last committed chunk, and running a
chunk twice (a re-dispatch, a resend) changes nothing: mappings are ``ON CONFLICT DO NOTHING``
(first mapping wins), an outhash row already present is skipped.

Rows hq cannot hold (a unihash that is not 64 lower-case hex, a hash hq's protocol cannot
carry, an unreadable ``created``, ...) are left out and counted as ``invalid``: one bad row
never blocks the rest of the import.
"""

from __future__ import annotations

import json
from typing import NamedTuple

from hq import protocol as p

from .schema import from_key, to_key
from .store import GC_MARK_KEY, Store, current_gc_mark
from .timestamps import parse_created

#: The only source config row hq uses; every other (hq's own ``schema-version``,
#: checkpoints, names hq does not know) is skipped.
IMPORTED_CONFIG = (GC_MARK_KEY,)

_MAX_ID_DIGITS = 18  # below 2**63, SQLite's integer range


def _mark_from(source: str) -> str:
    """The ``config`` row saying hq's current gc mark was taken from ``source``."""
    return f"import:gc-mark-from:{source}"


def checkpoint_name(table: str, source: str) -> str:
    """The ``config`` row holding the last source id imported from ``source``'s ``table``."""
    return f"import:{table}:{source}"


class Chunk(NamedTuple):
    source: str
    table: str
    last_id: int
    rows: list  # converted rows, ready for SQL
    invalid: int  # rows left out because hq cannot hold them


class _Invalid(Exception):
    """This row cannot be stored by hq; it is skipped and counted."""


# --- parse: one job's body -> Chunk (raises ProtocolError) ------------------------------------


def parse_source(frame) -> str:
    return p.decode_text(frame, "source", p.MAX_IMPORT_SOURCE_BYTES)


def parse_import_status(body: list) -> tuple:
    return (parse_source(body[0]),)


def parse_import(body: list) -> Chunk:
    source = parse_source(body[0])
    table = bytes(body[1]).decode("ascii", "replace")
    if table not in p.IMPORT_TABLES:
        raise p.ProtocolError(
            p.E_INVALID, f"cannot import table {table[:40]!r}; tables: {', '.join(p.IMPORT_TABLES)}"
        )
    raw_id = bytes(body[2])
    if not raw_id.isdigit() or len(raw_id) > _MAX_ID_DIGITS:
        raise p.ProtocolError(p.E_BAD_REQUEST, "last_id must be a non-negative decimal integer")
    data = bytes(body[3])
    n = p.count_items(data)
    if n > p.MAX_CHUNK_ITEMS:
        raise p.ProtocolError(p.E_TOO_LARGE, f"chunk of {n} rows exceeds {p.MAX_CHUNK_ITEMS}")
    try:
        lines = data.decode("utf-8").split("\n")
    except UnicodeDecodeError:
        raise p.ProtocolError(p.E_BAD_REQUEST, "rows are not valid UTF-8") from None
    convert = _CONVERTERS[table]
    rows, invalid = [], 0
    for number, row in enumerate(list(_json_rows(lines)), 1):  # 400 before 422
        missing = [c for c in p.IMPORT_COLUMNS[table] if c not in row]
        if missing:
            raise p.ProtocolError(p.E_INVALID, f"row {number} of {table} lacks {', '.join(missing)}")
        try:
            rows.append(convert(row))
        except _Invalid:
            invalid += 1
    return Chunk(source, table, int(raw_id), rows, invalid)


def _json_rows(lines: list):
    """One JSON object per line, else 400 naming the line."""
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):
            raise p.ProtocolError(p.E_BAD_REQUEST, f"row {number} is not valid JSON") from None
        if not isinstance(row, dict):
            raise p.ProtocolError(p.E_BAD_REQUEST, f"row {number} is not a JSON object")
        yield row


def _hash(row: dict, name: str, max_bytes: int = p.MAX_HASH_BYTES) -> str:
    """A method, taskhash or outhash hq's protocol can carry (§3.2), else the row is invalid."""
    value = row[name]
    if not isinstance(value, str):
        raise _Invalid(name)
    try:
        return p.check_text(value, name, max_bytes)
    except p.ProtocolError:
        raise _Invalid(name) from None


def _text(row: dict, name: str, optional: bool = True):
    """A text column; ``None`` when optional; numbers as their ``str()``, like ``report``."""
    value = row[name]
    if value is None and optional:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise _Invalid(name)
    try:
        value.encode("utf-8")  # JSON may carry lone surrogates, which SQLite refuses
    except UnicodeEncodeError:
        raise _Invalid(name) from None
    return value


def created_us(value) -> int:
    """The source's ``created`` (ISO 8601 text, see :func:`parse_created`) as microseconds
    since the epoch, UTC. A missing ``created`` becomes 0, which sorts first as SQLite's NULL
    does, so the oldest-report order is the source's."""
    if value is None:
        return 0
    if not isinstance(value, str):
        raise _Invalid("created")
    us = parse_created(value)
    if us is None:
        raise _Invalid("created")
    return us


def _mapping_row(row: dict) -> tuple:
    unihash = row["unihash"]
    if not p.is_unihash(unihash):  # hq's protocol carries only valid unihashes
        raise _Invalid("unihash")
    mark = row["gc_mark"]
    if mark is not None and not isinstance(mark, str):
        raise _Invalid("gc_mark")
    return (
        _hash(row, "method"),
        to_key(_hash(row, "taskhash")),
        bytes.fromhex(unihash),
        _text(row, "gc_mark") or "",
    )


def _outhash_row(row: dict) -> tuple:
    extra = tuple(_text(row, name) for name in p.REPORT_EXTRA_FIELDS)
    siginfo = extra[-1]
    if siginfo is not None and len(siginfo.encode("utf-8")) > p.MAX_EXTRA_BYTES:
        raise _Invalid("outhash_siginfo")  # as report: a bigger one could not be read back
    return (
        _hash(row, "method"),
        to_key(_hash(row, "taskhash")),
        to_key(_hash(row, "outhash")),
        created_us(row["created"]),
        *extra,
    )


def _user_row(row: dict) -> tuple:
    username = _text(row, "username", optional=False)
    if not username:
        raise _Invalid("username")
    return username, _text(row, "token", optional=False), _text(row, "permissions", optional=False)


def _config_row(row: dict) -> tuple:
    return _text(row, "name", optional=False), _text(row, "value")


_CONVERTERS = {
    "users": _user_row,
    "config": _config_row,
    "unihashes_v3": _mapping_row,
    "outhashes_v2": _outhash_row,
}


def parse_backfill(body: list) -> tuple:
    """``backfill`` (the broker's own, --upstream): what the upstream answered, stored as an
    import's. Either three frames, mappings packed as a GET chunk and its answer are
    (method, LF-joined taskhashes, LF-joined unihashes: a cold burst's hundreds of
    thousands), or one frame, a JSON list of full rows (with an outhash and its fields, from
    get-outhash or get with all). -> (mapping rows, outhash rows); a row hq cannot hold is
    left out."""
    if len(body) == 3:
        return _parse_packed_mappings(body), []
    if len(body) != 1:
        raise p.ProtocolError(p.E_BAD_REQUEST, "backfill takes 1 or 3 body frames")
    try:
        rows = json.loads(bytes(body[0]))
    except (ValueError, RecursionError):
        raise p.ProtocolError(p.E_BAD_REQUEST, "backfill is not JSON") from None
    if not isinstance(rows, list):
        raise p.ProtocolError(p.E_BAD_REQUEST, "backfill is not a JSON list")
    mappings, outhashes = [], []
    for row in rows:
        try:
            if not isinstance(row, dict):
                raise _Invalid("row")
            mappings.append(_mapping_row({**row, "gc_mark": ""}))  # the upstream's mark is not ours
            if "outhash" in row:
                outhashes.append(_outhash_row({name: row.get(name) for name in _OUTHASH_FIELDS}))
        except (_Invalid, KeyError):
            continue
    return mappings, outhashes


def _parse_packed_mappings(body: list) -> list:
    method = p.decode_text(body[0], "method", p.MAX_METHOD_BYTES)
    taskhashes = p.unpack_items(body[1], "taskhash")
    unihashes = p.unpack_unihashes(body[2], len(taskhashes))
    return [
        (method, to_key(taskhash), bytes.fromhex(unihash), "")
        for taskhash, unihash in zip(taskhashes, unihashes)
        if unihash is not None
    ]


_OUTHASH_FIELDS = ("method", "taskhash", "outhash", "created", *p.REPORT_EXTRA_FIELDS)


# --- run: write a parsed chunk -----------------------------------------------------------


class Importer:
    """Writes parsed chunks into a worker's :class:`Store`; reads the checkpoints."""

    def __init__(self, store: Store):
        self.store = store

    def import_chunk(self, source: str, table: str, last_id: int, rows: list, invalid: int) -> dict:
        """Insert a parsed :class:`Chunk`'s rows and its checkpoint in one transaction;
        return ``{"imported", "skipped", "invalid"}``, which add up to the chunk's rows."""
        with self.store.write_transaction():
            imported = _WRITERS[table](self, rows, source)
            self._set_config(checkpoint_name(table, source), str(last_id))
        return {"imported": imported, "skipped": len(rows) - imported, "invalid": invalid}

    def backfill(self, mappings: list, outhashes: list) -> list:
        """Store what an upstream answered, first mapping wins, in one transaction; the
        reply frame is the number of mappings stored."""
        with self.store.write_transaction():
            stored = self._write_mappings(mappings, "") if mappings else 0
            if outhashes:
                self._write_outhashes(outhashes, "")
        return [b"%d" % stored]

    def status(self, source: str) -> dict:
        """``{table: last source id imported}``, 0 for a table not imported from ``source``."""
        names = {checkpoint_name(t, source): t for t in p.IMPORT_TABLES}
        cursor = self.store._sql(
            "SELECT name, value FROM config WHERE name IN (%s)" % ",".join("?" * len(names)), list(names)
        )
        out = dict.fromkeys(p.IMPORT_TABLES, 0)
        for name, value in cursor:
            out[names[name]] = int(value) if str(value).isdigit() else 0
        return out

    # Each writer returns how many rows it inserted; the others were already present
    # (or, for config, are not used by hq).

    def _method_ids(self, rows: list) -> dict:
        return {m: self.store.method_id(m, create=True) for m in {row[0] for row in rows}}

    def _sql(self, sql: str, params=()):
        return self.store._sql(sql, params)

    def _set_config(self, name: str, value: str) -> None:
        self._sql(
            "INSERT INTO config (name, value) VALUES (?, ?) "
            "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
            (name, value),
        )

    def _adopted(self, rows: list, hashes: int) -> list:
        """Rows whose first ``hashes`` columns after the method are keys, as this engine
        stores them; their (method, taskhash) pairs locked against concurrent reports."""
        adopt = self.store.adopt_key
        if adopt is not Store.adopt_key:
            rows = [(m, *(adopt(k) for k in row[:hashes]), *row[hashes:]) for m, *row in rows]
        self.store.lock_hashes([(row[0], from_key(row[1])) for row in rows])
        return rows

    def _write_mappings(self, rows: list, source: str) -> int:
        """First mapping wins. While hq has a current gc mark an imported mapping gets it,
        as a mapping reported now would (so the next sweep keeps it); without one, or when
        the current mark is the one taken from this same source (a gc cycle in progress
        there), it keeps the source's mark, so the cycle goes on as it would have there."""
        mark = current_gc_mark(self._sql)
        if mark and self._sql("SELECT 1 FROM config WHERE name = ?", (_mark_from(source),)).fetchone():
            mark = ""
        rows = self._adopted(rows, 1)
        ids = self._method_ids(rows)
        return self.store.executemany(
            "INSERT INTO unihashes (method, taskhash, unihash, gc_mark) VALUES (?, ?, ?, ?) "
            "ON CONFLICT DO NOTHING",
            [(ids[m], t, u, mark or g) for m, t, u, g in rows],
        )

    def _write_outhashes(self, rows: list, source: str) -> int:
        """The row unless (method, taskhash, outhash) is present: the statement of report."""
        rows = self._adopted(rows, 2)
        ids = self._method_ids(rows)
        return self.store.executemany(
            "INSERT INTO outhashes (method, taskhash, outhash, created, owner, PN, PV, PR, task, "
            "outhash_siginfo) SELECT ?, ?, ?, ?, ?, ?, ?, ?, ?, ? WHERE NOT EXISTS (SELECT 1 FROM "
            "outhashes WHERE method = ? AND substr(taskhash, 1, 8) = substr(?, 1, 8) "
            "AND taskhash = ? AND outhash = ?)",
            [(ids[m], t, o, *rest, ids[m], t, t, o) for m, t, o, *rest in rows],
        )

    def _write_users(self, rows: list, source: str) -> int:
        """Users as they are (the token column holds BitBake's salted token hash); a user
        name hq already has is kept."""
        return self.store.executemany(
            "INSERT INTO users (username, token, permissions) VALUES (?, ?, ?) ON CONFLICT DO NOTHING", rows
        )

    def _write_config(self, rows: list, source: str) -> int:
        """Only ``gc-mark``, and only into an hq with no mark and no mappings yet: a mark
        taken over in the middle of hq's own data would make hq's unmarked mappings
        candidates for the next sweep."""
        imported = 0
        for name, value in rows:
            if name not in IMPORTED_CONFIG or not value:
                continue
            if current_gc_mark(self._sql) or self._sql("SELECT 1 FROM unihashes LIMIT 1").fetchone():
                continue
            self._set_config(name, value)
            self._set_config(_mark_from(source), value)
            imported += 1
        return imported


_WRITERS = {
    "users": Importer._write_users,
    "config": Importer._write_config,
    "unihashes_v3": Importer._write_mappings,
    "outhashes_v2": Importer._write_outhashes,
}
