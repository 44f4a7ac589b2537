"""Schema versions, on real SQLite files: what ``open_database`` does with a fresh file, a
file at this version, an older one (migrated once, every row kept), a newer one and a file
that is not hq's (refused, left byte for byte as it was), and with several processes opening
one old file at once (real processes, each with its own connection, as workers have)."""

from __future__ import annotations

import logging
import os
import sqlite3
import subprocess
import sys

import pytest

from hashserv_db import make_hq_schema_1, populate
from helpers import wait_for
from hq.workers import schema
from hq.workers.schema import HQ_APPLICATION_ID, SCHEMA_VERSION, TABLE_NAMES, open_database
from hq.workers.store import Store

M = "TestMethod"
#: Pairs of reports share an outhash (so half are equivalences); one taskhash is not hex.
REPORTS = [(M, "%064x" % i, "%064x" % (1000 + i // 2), "%064x" % (2000 + i)) for i in range(20)]
REPORTS.append((M, "not-a-hex-taskhash", "ab" * 32, "cd" * 32))
MIGRATED_1_TO_2 = "migrated database {} from schema 1 to 2"
NEWER = "the database's schema is version 3, newer than this hq (2): upgrade hq"
HASHSERV = (
    "it has tables unihashes_v3, outhashes_v2, users, config: a bitbake-hashserv database? "
    "copy it into hq with hq-admin import-hashserv"
)


# --- reading files behind hq's back ------------------------------------------------------------


def facts(path) -> dict:
    """The version row and application_id of an hq file, read with plain sqlite3."""
    conn = sqlite3.connect(path)
    try:
        version = conn.execute("SELECT value FROM config WHERE name = 'schema-version'").fetchone()
        return {
            "version": version and version[0],
            "application_id": conn.execute("PRAGMA application_id").fetchone()[0],
        }
    finally:
        conn.close()


def all_rows(path) -> dict:
    """table -> every row, sorted: the whole content of the file."""
    conn = sqlite3.connect(path)
    try:
        tables = [n for (n,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {t: sorted(conn.execute(f'SELECT * FROM "{t}"'), key=repr) for t in tables}
    finally:
        conn.close()


def file_bytes(path) -> tuple:
    """The database file and its WAL, byte for byte. No WAL is an empty one: a read-only
    connection leaves an empty -wal file behind, which holds nothing."""

    def read(p):
        return open(p, "rb").read() if os.path.exists(p) else b""

    return read(path), read(path + "-wal")


def set_version(path, value: str) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("UPDATE config SET value = ? WHERE name = 'schema-version'", (value,))
    conn.close()


def schema_log(caplog) -> list:
    return [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "hq.workers.schema"]


@pytest.fixture
def caplog_debug(caplog):
    caplog.set_level(logging.DEBUG, logger="hq.workers.schema")
    return caplog


# --- one process ---------------------------------------------------------------------------------


def test_the_application_id_is_the_bytes_hq_0_1():
    assert HQ_APPLICATION_ID.to_bytes(4, "big") == b"hq\x00\x01"
    assert SCHEMA_VERSION == 2


def test_a_fresh_file_gets_the_schema_the_version_and_hqs_application_id(tmp_path):
    path = str(tmp_path / "hq.db")
    open_database(path).close()
    assert facts(path) == {"version": "2", "application_id": 0x68710001}
    assert set(all_rows(path)) == set(TABLE_NAMES)
    with open(path, "rb") as fh:
        header = fh.read(100)
    assert header[68:72] == b"hq\x00\x01"  # SQLite's header field, where file(1) reads it
    assert header[18:20] == b"\x02\x02"  # WAL


def test_a_file_at_this_version_is_opened_as_it_is(tmp_path, caplog_debug):
    path = str(tmp_path / "hq.db")
    open_database(path).close()
    before = file_bytes(path)
    caplog_debug.clear()
    db = open_database(path)
    assert Store(db).get_unihashes(M, ["00" * 32]) == [None]
    db.close()
    assert file_bytes(path) == before
    assert schema_log(caplog_debug) == []


def test_a_schema_1_file_is_migrated_keeping_every_row_and_a_second_open_does_nothing(tmp_path, caplog_debug):
    path = str(tmp_path / "hq.db")
    answers = make_hq_schema_1(path, REPORTS)
    assert facts(path) == {"version": "1", "application_id": 0}
    rows = all_rows(path)
    assert len(rows["unihashes"]) == 21 and len(rows["outhashes"]) == 21 and len(rows["users"]) == 1
    caplog_debug.clear()

    db = open_database(path)
    assert Store(db).get_unihashes(M, list(answers)) == list(answers.values())
    db.close()

    assert facts(path) == {"version": "2", "application_id": HQ_APPLICATION_ID}
    rows["config"] = sorted([("gc-mark", "mark-1"), ("schema-version", "2")], key=repr)
    assert all_rows(path) == rows
    not_debug = [m for m in schema_log(caplog_debug) if m[0] != "DEBUG"]
    assert not_debug == [("INFO", MIGRATED_1_TO_2.format(path))]

    before = file_bytes(path)
    caplog_debug.clear()
    open_database(path).close()
    assert file_bytes(path) == before
    assert schema_log(caplog_debug) == []


def test_a_newer_schema_is_refused_in_one_line_and_the_file_left_as_it_was(tmp_path):
    path = str(tmp_path / "hq.db")
    open_database(path).close()
    set_version(path, "3")
    before = file_bytes(path)
    with pytest.raises(ValueError) as refused:
        open_database(path)
    assert str(refused.value) == NEWER
    assert schema.database.is_closed()
    assert file_bytes(path) == before


def test_a_bitbake_hashserv_database_is_refused_and_left_as_it_was(tmp_path):
    path = str(tmp_path / "hashserv.db")
    populate(path, tasks=60, big_siginfo=0)
    before = file_bytes(path)
    with pytest.raises(ValueError) as refused:
        open_database(path)
    assert str(refused.value) == HASHSERV
    assert file_bytes(path) == before


def _another_apps_tables(path):
    """A rollback-journal file: opening it must not even switch it to WAL."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")
    conn.execute("INSERT INTO notes (body) VALUES ('keep me')")
    conn.close()


def _many_tables(path):
    conn = sqlite3.connect(path, isolation_level=None)
    for n in range(8):
        conn.execute(f"CREATE TABLE t{n} (x)")
    conn.close()


def _another_application_id(path):
    _another_apps_tables(path)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA application_id = 252006674")  # 0x0f055112: Fossil's repositories
    conn.close()


def _hq_tables_with_another_application_id(path):
    open_database(path).close()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA application_id = 1")
    conn.close()


def _a_version_no_hq_writes(path):
    open_database(path).close()
    set_version(path, "two")


FOREIGN = [
    (_another_apps_tables, "it has tables notes and no hq schema version: not an hq database"),
    (_many_tables, "it has tables t0, t1, t2, t3, t4, t5, ... and no hq schema version: not an hq database"),
    (
        _another_application_id,
        "its SQLite application_id is 0x0f055112, not hq's (0x68710001): not an hq database",
    ),
    (
        _hq_tables_with_another_application_id,
        "its SQLite application_id is 0x00000001, not hq's (0x68710001): not an hq database",
    ),
    (_a_version_no_hq_writes, "its schema version is 'two', which no hq writes: not an hq database"),
]


@pytest.mark.parametrize("make,reason", FOREIGN, ids=[make.__name__.strip("_") for make, _ in FOREIGN])
def test_a_file_that_is_not_hqs_is_refused_and_left_as_it_was(make, reason, tmp_path):
    path = str(tmp_path / "other.db")
    make(path)
    before = file_bytes(path)
    with pytest.raises(ValueError) as refused:
        open_database(path)
    assert str(refused.value) == reason
    assert file_bytes(path) == before


# --- several processes, one file ---------------------------------------------------------------

#: A process opening the database as a worker does, logging at DEBUG to its stderr. With a
#: third argument it waits for that file to appear first, so that several start together.
OPENER = """
import logging, os, sys, time
from hq import logs
from hq.workers.schema import open_database
path, busy_timeout_ms, go = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
logs.setup("opener", "DEBUG")
logging.getLogger("peewee").setLevel(logging.INFO)
while go and not os.path.exists(go[0]):
    time.sleep(0.001)
try:
    open_database(path, busy_timeout_ms=busy_timeout_ms).close()
except ValueError as exc:
    sys.exit(f"refused: {exc}")
"""


class Opener:
    """One such process; its log in ``tmp_path/<name>.log``."""

    def __init__(self, tmp_path, name: str, path: str, busy_timeout_ms: int = 200, go=None, prefix=()):
        self.log_path = tmp_path / f"{name}.log"
        argv = [*prefix, sys.executable, "-c", OPENER, path, str(busy_timeout_ms), *([str(go)] if go else [])]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text()

    def wait(self) -> int:
        try:
            return self.proc.wait(60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


def test_workers_starting_together_migrate_a_schema_1_file_exactly_once(tmp_path):
    path = str(tmp_path / "hq.db")
    make_hq_schema_1(path, REPORTS)
    go = tmp_path / "go"
    openers = [Opener(tmp_path, f"opener-{n}", path, go=go) for n in range(4)]
    go.touch()
    assert [o.wait() for o in openers] == [0, 0, 0, 0], [o.log() for o in openers]
    logs = "".join(o.log() for o in openers)
    migrated = [line for line in logs.splitlines() if "migrated database" in line]
    assert len(migrated) == 1, logs
    assert migrated[0].endswith(" INFO hq.workers.schema: " + MIGRATED_1_TO_2.format(path))
    assert facts(path) == {"version": "2", "application_id": HQ_APPLICATION_ID}


WAITING_FOR_THE_LOCK = "has schema 1, this hq 2: bringing it up to date under the write lock"


def test_a_worker_that_waited_for_the_lock_finds_the_migration_done_and_does_not_redo_it(tmp_path):
    """The version is read again once the lock is held. Here this test is the sibling that
    migrates first: it holds the write lock while the worker reads schema 1, then migrates
    and commits; the worker, blocked in BEGIN IMMEDIATE, must find schema 2 and do nothing."""
    path = str(tmp_path / "hq.db")
    make_hq_schema_1(path)
    sibling = sqlite3.connect(path, isolation_level=None)
    sibling.execute("BEGIN IMMEDIATE")
    worker = Opener(tmp_path, "worker", path, busy_timeout_ms=60_000)
    try:
        wait_for(lambda: WAITING_FOR_THE_LOCK in worker.log(), 30, what="the worker to want the lock")
        sibling.execute(f"PRAGMA application_id = {HQ_APPLICATION_ID}")
        sibling.execute("UPDATE config SET value = '2' WHERE name = 'schema-version'")
        sibling.execute("COMMIT")
    finally:
        sibling.close()
    assert worker.wait() == 0, worker.log()
    assert "was brought to schema 2 by another process meanwhile" in worker.log()
    assert "migrated" not in worker.log()


def test_a_busy_lock_while_opening_is_retried_and_logged_at_debug(tmp_path):
    path = str(tmp_path / "hq.db")
    make_hq_schema_1(path)
    sibling = sqlite3.connect(path, isolation_level=None)
    sibling.execute("BEGIN IMMEDIATE")
    worker = Opener(tmp_path, "worker", path, busy_timeout_ms=50)
    try:
        wait_for(lambda: "database busy while opening" in worker.log(), 30, what="the worker to retry")
    finally:
        sibling.close()  # rolls back: the lock is free, schema 1 still there
    assert worker.wait() == 0, worker.log()
    busy = [line for line in worker.log().splitlines() if "database busy while opening" in line]
    assert busy and all(" DEBUG hq.workers.schema: " in line for line in busy)
    assert worker.log().count("migrated database") == 1
    assert facts(path) == {"version": "2", "application_id": HQ_APPLICATION_ID}


def _read_only(path):
    """As root, file modes bind only without CAP_DAC_OVERRIDE."""
    os.chmod(path, 0o444)
    if os.geteuid() != 0:
        return ()
    return ("setpriv", "--bounding-set=-dac_override,-dac_read_search", "--")


def test_a_read_only_file_at_this_version_still_opens(tmp_path):
    path = str(tmp_path / "hq.db")
    open_database(path).close()
    before = file_bytes(path)
    opener = Opener(tmp_path, "opener", path, prefix=_read_only(path))
    assert opener.wait() == 0, opener.log()
    assert " ERROR " not in opener.log()
    assert file_bytes(path) == before


def test_a_read_only_schema_1_file_is_refused_as_it_cannot_be_migrated(tmp_path):
    path = str(tmp_path / "hq.db")
    make_hq_schema_1(path)
    before = file_bytes(path)
    opener = Opener(tmp_path, "opener", path, prefix=_read_only(path))
    assert opener.wait() == 1
    assert opener.log().splitlines()[-1] == (
        "refused: it is read-only and its schema is version 1, older than this hq (2): "
        "make it writable so that hq can migrate it"
    )
    assert file_bytes(path) == before
