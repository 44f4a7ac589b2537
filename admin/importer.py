"""hq-admin import-hashserv FILE: copy a database written by BitBake's ``bitbake-hashserv``
into hq, through the broker, resumably (PROTOCOL.md §3.7, ``import`` and ``import-status``).

The file is opened read-only. Each table is read in ``id`` order from just after the
server's checkpoint for this source, and sent in chunks of up to 1000 rows and about 4 MiB
of JSON; each chunk commits on the server together with its checkpoint, so an interrupted
import (Ctrl-C, a lost connection) resumes where it stopped when run again. Tables go in
the order of :data:`hq.protocol.IMPORT_TABLES` (users, config, mappings, outhash rows: a
mapping makes the outhash rows of its taskhash count for equivalence the moment they land).
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import time
import urllib.parse

from hq import config, options
from hq import protocol as p
from hq.client.client import encode_import_row
from hq.progress import Progress

from . import output

#: Tables a bitbake-hashserv database must have; users and config are imported when present.
REQUIRED_TABLES = ("unihashes_v3", "outhashes_v2")
#: JSON bytes per chunk: half of a frame, since outhash_siginfo can be large.
CHUNK_BYTES = 4 * 1024 * 1024
#: A row whose JSON alone would not fit in a frame is left out (counted invalid).
MAX_ROW_BYTES = p.MAX_FRAME_BYTES - 64 * 1024


class SourceError(Exception):
    """FILE is missing, unreadable or not a bitbake-hashserv database."""


def add_commands(sub, common) -> None:
    cmd = sub.add_parser(
        "import-hashserv",
        parents=[common],
        help="copy a bitbake-hashserv SQLite database into hq (resumable)",
        description="Copy the users, config, unihashes_v3 and outhashes_v2 tables of a "
        "bitbake-hashserv SQLite database into hq. Rows hq already has are kept (the first "
        "mapping wins); rows hq cannot hold (e.g. an invalid unihash) are counted as invalid. "
        "Each chunk commits with a checkpoint, so running the command again resumes.",
    )
    cmd.add_argument("file", metavar="FILE", help="the bitbake-hashserv database file (opened read-only)")
    cmd.add_argument(
        "--source", help="name of this source for the checkpoints (default: FILE's absolute path)"
    )
    cmd.add_argument("--restart", action="store_true", help="ignore the checkpoints and send every row again")
    cmd.add_argument(
        "--max-chunks",
        type=config.argparse_type(options.NON_NEGATIVE_INT),
        metavar="N",
        help="stop after sending N chunks (for tests and for importing in slices; run again to go on)",
    )
    cmd.add_argument(
        "--chunk-rows",
        type=_chunk_rows,
        default=p.MAX_CHUNK_ITEMS,
        help="rows per chunk, 1-1000 (default %(default)s)",
    )
    cmd.add_argument(
        "--no-users",
        action="store_true",
        help="leave the users table out (importing users needs a log-in with @user-admin)",
    )
    cmd.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")
    cmd.set_defaults(func=import_hashserv, default_timeout=600.0)


def _chunk_rows(text: str) -> int:
    value = config.argparse_type(options.POSITIVE_INT)(text)
    if value > p.MAX_CHUNK_ITEMS:
        raise argparse.ArgumentTypeError(f"{text!r}: at most {p.MAX_CHUNK_ITEMS}")
    return value


def open_source(path: str) -> sqlite3.Connection:
    """The file, read-only; raises SourceError unless it holds the hashserv tables."""
    if os.path.isdir(path):
        raise SourceError(f"{path}: is a directory, not a bitbake-hashserv database file")
    if not os.path.isfile(path):
        raise SourceError(f"{path}: no such file")
    uri = "file:" + urllib.parse.quote(os.path.abspath(path)) + "?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True)
        # Text that is not UTF-8 is kept (escaped) and refused by the server as invalid,
        # instead of failing the whole read.
        conn.text_factory = lambda data: data.decode("utf-8", "surrogateescape")
        names = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.Error as exc:
        raise SourceError(f"{path}: cannot read it as an SQLite database: {exc}") from None
    missing = [t for t in REQUIRED_TABLES if t not in names]
    if missing:
        hint = ""
        if "unihashes_v2" in names:
            hint = (
                " (it was written by an older bitbake-hashserv: run a current one on it once to upgrade it)"
            )
        conn.close()
        raise SourceError(f"{path}: not a bitbake-hashserv database: no table {', '.join(missing)}{hint}")
    for table in _tables(conn):
        have = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        lacking = [c for c in ("id", *p.IMPORT_COLUMNS[table]) if c not in have]
        if lacking:
            conn.close()
            raise SourceError(f"{path}: table {table} has no column {', '.join(lacking)}")
    return conn


def _tables(conn) -> list:
    names = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    return [t for t in p.IMPORT_TABLES if t in names]


def read_chunks(conn, table: str, after_id: int, chunk_rows: int):
    """Yield ``(last_id, lines, dropped)`` chunks of ``table`` with ids above ``after_id``:
    at most ``chunk_rows`` rows, each as its JSON line, and about CHUNK_BYTES each;
    ``dropped`` counts rows that are not sent: too big for a frame, or not what
    bitbake-hashserv writes (an id that is not a number, a value that is not text)."""
    columns = p.IMPORT_COLUMNS[table]
    cursor = conn.execute(
        f"SELECT id, {', '.join(columns)} FROM {table} WHERE id > ? ORDER BY id", (after_id,)
    )
    rows, size, dropped, last_id = [], 0, 0, after_id
    for values in cursor:
        if not isinstance(values[0], int):  # a hand-made table: a text or blob id (SQLite
            dropped += 1  # sorts it after every number), which no checkpoint can name
            continue
        try:
            line = encode_import_row(dict(zip(columns, values[1:])))
        except (TypeError, ValueError):  # a blob where bitbake-hashserv keeps text
            line = ""
        length = len(line) + 1  # ASCII: characters are bytes
        if not line or length > MAX_ROW_BYTES:
            dropped += 1
            last_id = values[0]
            continue
        if rows and (len(rows) >= chunk_rows or size + length > CHUNK_BYTES):
            yield last_id, rows, dropped
            rows, size, dropped = [], 0, 0
        rows.append(line)
        size += length
        last_id = values[0]
    if rows or dropped:
        yield last_id, rows, dropped


def import_hashserv(args, client) -> int:
    source = args.source if args.source is not None else os.path.abspath(args.file)
    try:
        p.check_text(source, "source", p.MAX_IMPORT_SOURCE_BYTES)
    except p.ProtocolError as exc:
        output.error(f"source name {source!r}: {exc.message}; name it with --source")
        return output.USAGE
    try:
        conn = open_source(args.file)
    except SourceError as exc:
        output.error(str(exc))
        return output.FAILED
    try:
        return _run(args, client, conn, source)
    finally:
        conn.close()


def _run(args, client, conn, source: str) -> int:
    tables = [t for t in _tables(conn) if not (args.no_users and t == "users")]
    checkpoints = dict.fromkeys(p.IMPORT_TABLES, 0) if args.restart else client.import_status(source)
    results = {}
    for table in tables:
        start = int(checkpoints.get(table, 0))
        results[table] = {
            "rows": conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0],
            "to_send": conn.execute(f"SELECT count(*) FROM {table} WHERE id > ?", (start,)).fetchone()[0],
            "resumed_after_id": start,
            "sent": 0,
            "imported": 0,
            "skipped": 0,
            "invalid": 0,
            "last_id": start,
        }
    total = sum(r["to_send"] for r in results.values())
    progress = Progress("hq-admin: importing", enabled=not args.quiet, plain_every_s=5.0, unit="rows")
    done = chunks = 0
    complete = True
    try:
        for table in tables:
            r = results[table]
            progress.label = f"hq-admin: importing {table}"
            for last_id, rows, dropped in read_chunks(conn, table, r["resumed_after_id"], args.chunk_rows):
                if args.max_chunks is not None and chunks >= args.max_chunks:
                    complete = False
                    break
                if rows:
                    reply = client.import_rows(source, table, last_id, rows)
                    chunks += 1
                    for key in ("imported", "skipped", "invalid"):
                        r[key] += int(reply.get(key, 0))
                r["sent"] += len(rows)
                r["invalid"] += dropped
                r["last_id"] = last_id
                done += len(rows) + dropped
                progress.update(done, total)
            if not complete:
                break
            progress.update(done, total, force=True)
    except KeyboardInterrupt:
        progress.close()
        output.error(f"interrupted after {chunks} chunks; run the same command again to resume")
        return output.INTERRUPTED
    progress.close()
    elapsed = time.monotonic() - progress.started
    for r in results.values():
        del r["to_send"]
    data = {
        "file": os.path.abspath(args.file),
        "source": source,
        "complete": complete,
        "resumed": any(r["resumed_after_id"] > 0 for r in results.values()),
        "chunks": chunks,
        "seconds": elapsed,
        "rows_per_s": done / elapsed if elapsed > 0 else 0.0,
        "tables": results,
    }
    if complete:
        title = f"imported {data['file']} (source {source})"
    else:
        title = f"stopped after {chunks} chunks (--max-chunks); run again to resume"
    headers = [
        "table",
        "rows in source",
        "resumed after id",
        "sent",
        "imported",
        "skipped (present)",
        "invalid",
        "last id",
    ]
    rows = [
        (
            t,
            *(
                output.fmt(r[k])
                for k in ("rows", "resumed_after_id", "sent", "imported", "skipped", "invalid", "last_id")
            ),
        )
        for t, r in results.items()
    ]
    summary = [(output.fmt(chunks), f"{elapsed:.3g}", f"{data['rows_per_s']:,.0f}")]
    output.emit(args, data, (title, headers, rows), (None, ["chunks sent", "seconds", "rows/s"], summary))
    return output.OK
