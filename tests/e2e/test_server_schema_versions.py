"""Schema versions through the real ``hq-server``: a schema-1 database is migrated once,
before the workers start, and served; a database hq must not open ends hq-server at once with
one ERROR line, and is left as it was."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import time

import pytest

from hashserv_db import make_hq_schema_1, populate
from helpers import Stack, script
from hq.client import create_client
from hq.workers.schema import HQ_APPLICATION_ID, open_database

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

M = "TestMethod"
#: Pairs of reports share an outhash, so half of the taskhashes map to their pair's unihash.
REPORTS = [(M, "%064x" % i, "%064x" % (1000 + i // 2), "%064x" % (2000 + i)) for i in range(40)]


def facts(path) -> dict:
    conn = sqlite3.connect(path)
    try:
        version = conn.execute("SELECT value FROM config WHERE name = 'schema-version'").fetchone()[0]
        return {"version": version, "application_id": conn.execute("PRAGMA application_id").fetchone()[0]}
    finally:
        conn.close()


def test_hq_server_migrates_a_schema_1_database_once_and_serves_its_rows(tmp_path):
    stack = Stack(tmp_path, workers=4)
    answers = make_hq_schema_1(stack.db, REPORTS)
    assert len(set(answers.values())) == 20  # the equivalences are in the file
    stack.start()
    try:
        with create_client(stack.address, timeout=10) as client:
            assert client.get_unihash_batch([(M, t) for t in answers]) == list(answers.values())
            taskhash, outhash = REPORTS[1][1], REPORTS[1][2]
            assert client.get_outhash(M, outhash, taskhash)["unihash"] == answers[REPORTS[0][1]]
    finally:
        assert stack.stop() == 0, stack.log()
    assert facts(stack.db) == {"version": "2", "application_id": HQ_APPLICATION_ID}
    log = stack.log()
    migrated = [line for line in log.splitlines() if "migrated" in line]
    assert len(migrated) == 1, log
    assert migrated[0].endswith(f" INFO hq.workers.schema: migrated database {stack.db} from schema 1 to 2")
    assert " ERROR " not in log and "Traceback" not in log


def _newer(path):
    open_database(path).close()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("UPDATE config SET value = '3' WHERE name = 'schema-version'")
    conn.close()


def _hashserv(path):
    populate(path, tasks=60, big_siginfo=0)


REFUSED = [
    (_newer, "the database's schema is version 3, newer than this hq (2): upgrade hq"),
    (
        _hashserv,
        "it has tables unihashes_v3, outhashes_v2, users, config: a bitbake-hashserv database? "
        "copy it into hq with hq-admin import-hashserv",
    ),
]


@pytest.mark.parametrize("make,reason", REFUSED, ids=["newer-schema", "bitbake-hashserv"])
def test_hq_server_refuses_a_database_it_must_not_open_in_one_line(make, reason, tmp_path):
    path = str(tmp_path / "hq.db")
    make(path)
    with open(path, "rb") as fh:
        before = fh.read()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HQ_")}
    started = time.monotonic()
    argv = [script("hq-server"), "--db", path, "--bind", "tcp://127.0.0.1:*", "--workers", "4"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, cwd=tmp_path, env=env)
    took = time.monotonic() - started
    assert proc.returncode == 2, proc.stderr
    assert took < 5, f"took {took:.1f} s"
    errors = [line for line in proc.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, proc.stderr
    assert errors[0].endswith(f" ERROR hq.server: cannot open database {path!r}: {reason}"), proc.stderr
    assert "Traceback" not in proc.stderr
    with open(path, "rb") as fh:
        assert fh.read() == before
    assert not os.path.exists(path + "-wal") or os.path.getsize(path + "-wal") == 0
