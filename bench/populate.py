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
second instead of minutes.
"""

from __future__ import annotations

import hashlib
import sqlite3

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
        seen: set = set()
        outhash_rows = []
        mapping_rows = []
        created = now_us()
        to_key = schema.to_key
        for n, (taskhash, outhash, unihash) in enumerate(rows):
            if taskhash in seen:  # the first mapping of a taskhash wins, as in Store.report
                continue
            seen.add(taskhash)
            if n < corrupt:
                unihash = corrupted(unihash)
            tkey = to_key(taskhash)
            outhash_rows.append((mid, tkey, to_key(outhash), created + n))
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
