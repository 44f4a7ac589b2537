"""Test helper: real SQLite files laid out as BitBake's ``bitbake-hashserv`` writes them, and
what hq must hold after importing one.

The schema below is written from the reference's data model (ref. §7.1) and the column
types BitBake's sqlite backend declares (every table has ``id INTEGER PRIMARY KEY
AUTOINCREMENT``; ``created`` is a ``DATETIME`` column holding ISO 8601 text). Rows are
made by :class:`HashservDB`, which applies the reference's report rule (ref. §7.2), so the
equivalences in the file are the ones a real server would have recorded.
"""

from __future__ import annotations

import datetime
import hashlib
import random
import sqlite3

SCHEMA = """
CREATE TABLE unihashes_v3 (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    method TEXT NOT NULL, taskhash TEXT NOT NULL, unihash TEXT NOT NULL, gc_mark TEXT NOT NULL,
    UNIQUE (method, taskhash));
CREATE TABLE outhashes_v2 (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    method TEXT NOT NULL, taskhash TEXT NOT NULL, outhash TEXT NOT NULL, created DATETIME,
    owner TEXT, PN TEXT, PV TEXT, PR TEXT, task TEXT, outhash_siginfo TEXT,
    UNIQUE (method, taskhash, outhash));
CREATE TABLE users (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    username TEXT NOT NULL, token TEXT NOT NULL, permissions TEXT NOT NULL,
    UNIQUE (username));
CREATE TABLE config (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL, value TEXT,
    UNIQUE (name));
CREATE INDEX taskhash_lookup_v4 ON unihashes_v3 (method, taskhash);
CREATE INDEX unihash_lookup_v1 ON unihashes_v3 (unihash);
CREATE INDEX outhash_lookup_v3 ON outhashes_v2 (method, outhash);
CREATE INDEX config_lookup ON config (name);
"""

UTC = datetime.timezone.utc
METHODS = ("oe.sstatesig.OEOuthashBasic", "TestMethod")
EXTRA = ("owner", "PN", "PV", "PR", "task", "outhash_siginfo")


def sha256(*parts) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()


class HashservDB:
    """A bitbake-hashserv database file being written, row by row."""

    def __init__(self, path):
        self.path = str(path)
        self.conn = sqlite3.connect(self.path, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode = WAL")
        self.conn.executescript(SCHEMA)
        self.conn.execute("BEGIN")

    def close(self) -> None:
        self.conn.execute("COMMIT")
        self.conn.close()

    def mark(self) -> str:
        row = self.conn.execute("SELECT value FROM config WHERE name = 'gc-mark'").fetchone()
        return row[0] if row and row[0] else ""

    def set_config(self, name: str, value) -> None:
        self.conn.execute(
            "INSERT OR REPLACE INTO config (id, name, value) "
            "VALUES ((SELECT id FROM config WHERE name = ?), ?, ?)",
            (name, name, value),
        )

    def add_user(self, username: str, token: str, permissions: str) -> None:
        self.conn.execute(
            "INSERT INTO users (username, token, permissions) VALUES (?, ?, ?)",
            (username, token, permissions),
        )

    def mapping(self, method: str, taskhash: str, unihash: str, gc_mark=None) -> None:
        """Insert a mapping row as it is (first wins), e.g. a report-equiv or a damaged row."""
        self.conn.execute(
            "INSERT OR IGNORE INTO unihashes_v3 (method, taskhash, unihash, gc_mark) VALUES (?, ?, ?, ?)",
            (method, taskhash, unihash, self.mark() if gc_mark is None else gc_mark),
        )

    def report(self, method: str, taskhash: str, outhash: str, unihash: str, created: str, **extra) -> str:
        """The reference's report (ref. §7.2): store the row; a new row takes the unihash of
        the oldest other report of (method, outhash) with a mapping; first mapping wins."""
        cur = self.conn.execute(
            "INSERT OR IGNORE INTO outhashes_v2 "
            "(method, taskhash, outhash, created, owner, PN, PV, PR, task, "
            "outhash_siginfo) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (method, taskhash, outhash, created, *(extra.get(k) for k in EXTRA)),
        )
        if cur.rowcount:
            row = self.conn.execute(
                "SELECT u.unihash FROM outhashes_v2 o JOIN unihashes_v3 u "
                "ON u.method = o.method AND u.taskhash = o.taskhash "
                "WHERE o.method = ? AND o.outhash = ? AND o.taskhash != ? ORDER BY o.created LIMIT 1",
                (method, outhash, taskhash),
            ).fetchone()
            self.mapping(method, taskhash, row[0] if row else unihash)
        row = self.conn.execute(
            "SELECT unihash FROM unihashes_v3 WHERE method = ? AND taskhash = ?", (method, taskhash)
        ).fetchone()
        return row[0] if row else unihash


def created_text(when: datetime.datetime, old_style: bool) -> str:
    """``created`` as BitBake stores it: ISO 8601 with the UTC offset (since 2025), or the
    sqlite3 module's old default, naive with a space."""
    if old_style:
        return when.replace(tzinfo=None).isoformat(" ")
    return when.astimezone(UTC).isoformat()


def populate(path, tasks: int = 3000, seed: int = 1, big_siginfo: int = 8) -> dict:
    """A realistic hashserv database: ``tasks`` reports over two methods, a third of them
    equivalent to an earlier one (same outhash, so they share its unihash), some taskhashes
    reported again with a new outhash, report-equiv mappings without outhash rows, one
    mapping with an invalid unihash, ``big_siginfo`` rows with a ~600 KiB outhash_siginfo,
    users, and a config with a gc mark. Returns facts the tests check against."""
    rng = random.Random(seed)
    db = HashservDB(path)
    db.add_user("admin", "$sha256$salt$" + sha256("admin-token"), "@all")
    db.add_user("builder", "$sha256$salt$" + sha256("builder-token"), "@read @report")
    base = datetime.datetime(2026, 1, 5, 8, 0, 0, 123456, tzinfo=UTC)
    outhashes = {m: [] for m in METHODS}
    reported = []
    equivalent = []  # (method, outhash, unihash) of equivalence classes with 2+ taskhashes
    big = set(rng.sample(range(tasks), big_siginfo))
    for i in range(tasks):
        if i == tasks // 2:
            db.set_config("gc-mark", "mark-2026")  # mappings from now on carry the mark
        method = METHODS[i % 7 == 0]
        taskhash = sha256("task", i) if i % 20 else sha256("task", i)[:40]
        if outhashes[method] and rng.random() < 0.33:
            outhash = rng.choice(outhashes[method])
        else:
            outhash = sha256("out", i)
            outhashes[method].append(outhash)
        when = base + datetime.timedelta(seconds=i * 7, microseconds=rng.randrange(10**6))
        if i % 50 == 3:
            when = when.replace(microsecond=0)  # isoformat() then has no fraction
        siginfo = None
        if i in big:
            siginfo = '{"siginfo": "' + "x" * (600 * 1024) + '"}'
        elif i % 3 == 0:
            siginfo = '{"task": "do_compile", "deps": ["a\\nb", "c"]}'
        unihash = db.report(
            method,
            taskhash,
            outhash,
            sha256("uni", i),
            created_text(when, old_style=bool(i % 2)),
            owner="builder" if i % 4 == 0 else None,
            PN=f"pkg{i % 97}",
            PV="1.0",
            PR="r0",
            task="do_compile" if i % 2 else "do_install",
            outhash_siginfo=siginfo,
        )
        reported.append((method, taskhash, outhash))
        if unihash != sha256("uni", i):
            equivalent.append((method, outhash, unihash))
        if i % 40 == 5:  # the same taskhash again with another outhash: keeps its unihash
            db.report(method, taskhash, sha256("again", i), sha256("uni-again", i), created_text(when, False))
    for i in range(20):
        db.mapping(METHODS[0], sha256("equiv", i), sha256("equiv-uni", i))
    bad_taskhash = sha256("bad")
    db.mapping(METHODS[1], bad_taskhash, "A" * 64)  # not lower-case hex: hq refuses it
    db.close()
    return {"reported": reported, "equivalent": equivalent, "bad_taskhash": bad_taskhash}


def source_mappings(path) -> dict:
    """{(method, taskhash): unihash} of every mapping row in a hashserv file."""
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        return {(m, t): u for m, t, u in conn.execute("SELECT method, taskhash, unihash FROM unihashes_v3")}


def source_outhash_rows(path) -> list:
    """Every outhash row of a hashserv file as a dict, in id order."""
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute("SELECT * FROM outhashes_v2 ORDER BY id")]


def iso_utc(created: str) -> str:
    """A source ``created`` as hq answers it: ISO 8601 in UTC (naive taken as UTC)."""
    when = datetime.datetime.fromisoformat(created)
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.astimezone(UTC).isoformat()


def expected_hq_state(path, hq_mark: str = "") -> dict:
    """What hq's tables must hold after importing the file into an empty hq:
    mappings with a valid unihash (gc mark: ``hq_mark`` if given, else the source's: an hq that
    took its mark from this file keeps the marks of its mappings)
    and every outhash row, with ``created`` as ISO text in UTC."""
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        mappings = {
            (m, t): (u, hq_mark or g)
            for m, t, u, g in conn.execute("SELECT method, taskhash, unihash, gc_mark FROM unihashes_v3")
            if len(u) == 64 and u == u.lower() and all(c in "0123456789abcdef" for c in u)
        }
        outhashes = sorted(
            (m, t, o, iso_utc(c), *rest)
            for m, t, o, c, *rest in conn.execute(
                "SELECT method, taskhash, outhash, created, owner, PN, PV, PR, task, outhash_siginfo "
                "FROM outhashes_v2"
            )
        )
        users = sorted(conn.execute("SELECT username, token, permissions FROM users"))
    return {"mappings": mappings, "outhashes": outhashes, "users": users}


#: The user an hq stack of the import tests is started with (--admin-user): importing the
#: users table needs @user-admin, which anonymous users never have. Not part of hq_state.
IMPORTER = "hq-importer"
IMPORTER_PASSWORD = "importer-password"


def hq_state(hq_db_path) -> dict:
    """The same view of an hq database file (read directly, for comparisons)."""
    from hq.workers.schema import from_key

    epoch = datetime.datetime(1970, 1, 1, tzinfo=UTC)
    with sqlite3.connect(str(hq_db_path)) as conn:
        mappings = {
            (m, from_key(t)): (u.hex(), g)
            for m, t, u, g in conn.execute(
                "SELECT m.name, u.taskhash, u.unihash, u.gc_mark "
                "FROM unihashes u JOIN methods m ON m.id = u.method"
            )
        }
        outhashes = sorted(
            (m, from_key(t), from_key(o), (epoch + datetime.timedelta(microseconds=c)).isoformat(), *rest)
            for m, t, o, c, *rest in conn.execute(
                "SELECT m.name, o.taskhash, o.outhash, o.created, o.owner, o.PN, o.PV, o.PR, o.task, "
                "o.outhash_siginfo FROM outhashes o JOIN methods m ON m.id = o.method"
            )
        )
        users = sorted(
            row
            for row in conn.execute("SELECT username, token, permissions FROM users")
            if row[0] != IMPORTER
        )
    return {"mappings": mappings, "outhashes": outhashes, "users": users}


def make_hq_schema_1(path, reports=()) -> dict:
    """An hq database file as hq's schema-1 code left it (schema 2 changed no table): hq's
    tables, a ``schema-version`` row "1", no application_id, WAL mode. ``reports``, tuples of
    (method, taskhash, outhash, unihash), go in through hq's Store; a user and a gc mark are
    added. Returns {taskhash: unihash} as the Store answered the reports. Closed on return."""
    from hq.workers import schema
    from hq.workers.store import Store

    db = schema.sqlite_database
    db.init(str(path), pragmas=[("journal_mode", "wal")])
    schema.database.initialize(db)  # hq's models use the proxy (nothing else may have set it)
    with db.atomic("IMMEDIATE"):  # what open_database did at schema 1
        db.create_tables(schema.MODELS, safe=True)
        schema.Config.insert(name="schema-version", value="1").execute()
    store = Store(db)
    answers = {
        taskhash: store.report(method, taskhash, outhash, unihash)
        for method, taskhash, outhash, unihash in reports
    }
    schema.User.insert(username="builder", token="$sha256$salt$" + sha256("t"), permissions="@read").execute()
    schema.Config.insert(name="gc-mark", value="mark-1").execute()
    db.close()
    return answers
