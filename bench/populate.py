"""Bulk-load known keys into a database before the stack starts.

The rows are exactly what :meth:`hq.workers.store.Store.report` writes for a new report
of a fresh (taskhash, outhash) with no equivalent: one ``methods`` row for the method,
one ``outhashes`` row (method id, taskhash and outhash keys, ``created`` in µs, optional
fields NULL) and one ``unihashes`` row (method id, taskhash key, unihash key, the current
gc mark), keys made by :func:`hq.workers.schema.to_key`. The schema comes from
:func:`hq.workers.schema.open_database`, so it is always the workers' own. The e2e tests
compare the result with a database filled through ``Store.report``.

Instead of one ``BEGIN IMMEDIATE`` transaction per report, everything goes in one
transaction of ``executemany`` with ``synchronous=OFF``: ~180k keys load in about a
second instead of minutes. On PostgreSQL (``hq-bench --db``), :func:`populate_postgresql`
writes the same rows with COPY into a schema of the run's own (:func:`fresh_schema`).
"""

from __future__ import annotations

import hashlib
import sqlite3
from urllib.parse import parse_qsl, quote, urlencode

from hq.workers import schema
from hq.workers.timestamps import now_us

from .keys import METHOD


def create_schema(path: str) -> None:
    """Create the workers' schema in a new file (peewee, in this process), then close it."""
    db = schema.open_database(path)
    db.close()


def corrupted(unihash: str) -> str:
    """A different, valid unihash: what ``--corrupt-keys`` stores instead of the real one."""
    return hashlib.sha256(b"corrupt:" + unihash.encode("ascii")).hexdigest()


def populate(path: str, rows, method: str = METHOD, corrupt: int = 0) -> int:
    """Write ``rows`` of (taskhash, outhash, unihash); return the number of keys written.

    The first ``corrupt`` rows get a unihash other than the given one: the clients still
    expect the given one, so the run must report wrong answers (this is how the tests make
    sure a benchmark can fail).
    """
    create_schema(path)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA synchronous = OFF")
        conn.execute("PRAGMA cache_size = -262144")
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT OR IGNORE INTO methods (name) VALUES (?)", (method,))
        (mid,) = conn.execute("SELECT id FROM methods WHERE name = ?", (method,)).fetchone()
        row = conn.execute("SELECT value FROM config WHERE name = 'gc-mark'").fetchone()
        gc_mark = row[0] if row else ""
        outhash_rows = []
        mapping_rows = []
        to_key = schema.to_key
        for taskhash, outhash, unihash, created in _reports(rows, corrupt):
            tkey = to_key(taskhash)
            outhash_rows.append((mid, tkey, to_key(outhash), created))
            mapping_rows.append((mid, tkey, bytes.fromhex(unihash), gc_mark))
        conn.executemany(
            "INSERT INTO outhashes (method, taskhash, outhash, created) VALUES (?, ?, ?, ?)", outhash_rows
        )
        conn.executemany(
            "INSERT OR IGNORE INTO unihashes (method, taskhash, unihash, gc_mark) VALUES (?, ?, ?, ?)",
            mapping_rows,
        )
        conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    return len(mapping_rows)


def _reports(rows, corrupt: int):
    """(taskhash, outhash, unihash, created) of each row a report would store: the first
    mapping of a taskhash wins, as in Store.report; the first ``corrupt`` rows corrupted."""
    seen: set = set()
    created = now_us()
    for n, (taskhash, outhash, unihash) in enumerate(rows):
        if taskhash in seen:
            continue
        seen.add(taskhash)
        yield taskhash, outhash, corrupted(unihash) if n < corrupt else unihash, created + n


def fresh_schema(url: str, name: str) -> str:
    """Make schema ``name`` (dropping one left by an earlier run) in the database of ``url``;
    the URL whose connections use it."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")
        conn.execute(f"CREATE SCHEMA {name}")
    base, _, query = url.partition("?")
    params = dict(parse_qsl(query))
    params["options"] = f"{params.get('options', '')} -csearch_path={name}".strip()
    return f"{base}?{urlencode(params, quote_via=quote)}"


def drop_schema(url: str, name: str) -> None:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")


def populate_postgresql(url: str, rows, method: str = METHOD, corrupt: int = 0) -> int:
    """:func:`populate` into the PostgreSQL database (and schema) of ``url``."""
    db = schema.open_database(url)
    try:
        conn = db.connection()
        with conn.transaction(), conn.cursor() as cur:
            cur.execute("INSERT INTO methods (name) VALUES (%s) ON CONFLICT DO NOTHING", (method,))
            (mid,) = cur.execute("SELECT id FROM methods WHERE name = %s", (method,)).fetchone()
            row = cur.execute("SELECT value FROM config WHERE name = 'gc-mark'").fetchone()
            gc_mark = row[0] if row else ""
            reports = list(_reports(rows, corrupt))
            with cur.copy("COPY outhashes (method, taskhash, outhash, created) FROM STDIN") as copy:
                for taskhash, outhash, _, created in reports:
                    copy.write_row((mid, taskhash, outhash, created))
            with cur.copy("COPY unihashes (method, taskhash, unihash, gc_mark) FROM STDIN") as copy:
                for taskhash, _, unihash, _ in reports:
                    copy.write_row((mid, taskhash, bytes.fromhex(unihash), gc_mark))
            cur.execute("ANALYZE")
    finally:
        db.close()
    return len(reports)
