"""Acknowledged reports survive kill -9 of workers and of the broker."""

import multiprocessing
import random
import signal
import sqlite3
import threading

import pytest

from helpers import Stack
from hq.client import create_client
from hq.workers.schema import open_database
from hq.workers.store import Store

M = "TestMethod"


def reporter(address, seed, count, out):
    """Report distinct pairs; send back what was acknowledged and what failed."""
    rng = random.Random(seed)
    acked, failed = [], 0
    with create_client(address, timeout=30) as c:
        for _ in range(count):
            t, o, u = ("%064x" % rng.getrandbits(256) for _ in range(3))
            try:
                got = c.report_unihash(t, M, o, u)["unihash"]
            except ConnectionError:
                failed += 1
                continue
            acked.append((t, o, u, got))
    out.put((acked, failed))


def run(tmp_path, clients, per_client, kill_every, workers=3):
    stack = Stack(tmp_path, workers=workers).start()
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    procs = [
        ctx.Process(target=reporter, args=(stack.address, seed, per_client, out)) for seed in range(clients)
    ]
    stop = threading.Event()
    kills = []

    def recovered() -> bool:
        """Broker and every worker back and registered: the last kill has been survived.
        (Killing again before that could starve the clients on a slow machine.)"""
        try:
            with create_client(stack.address, timeout=2) as c:
                return len(c.get_stats()["workers"]) >= workers
        except ConnectionError:
            return False

    def killer():
        rng = random.Random(99)
        broker_killed = False
        while not stop.wait(rng.uniform(*kill_every)):
            while not recovered():
                if stop.wait(0.05):
                    return
            children = stack.children()
            if not broker_killed and len(kills) == 2 and "hq-broker" in children:
                victim = children["hq-broker"]
                broker_killed = True
            else:
                names = [n for n in children if n.startswith("hq-worker")]
                if not names:
                    continue
                victim = children[rng.choice(names)]
            victim.send_signal(signal.SIGKILL)
            kills.append(victim.pid)

    thread = threading.Thread(target=killer)
    try:
        for proc in procs:
            proc.start()
        thread.start()
        results = [out.get(timeout=600) for _ in procs]
    finally:
        stop.set()
        thread.join(10)
        for proc in procs:
            proc.join(30)
    assert stack.stop() == 0
    acked = [a for r, _ in results for a in r]
    failed = sum(f for _, f in results)

    # Every acknowledged report is in the database with the acknowledged unihash.
    conn = sqlite3.connect(stack.db)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()
    db = open_database(stack.db)
    store = Store(db)
    try:
        answers = []
        for i in range(0, len(acked), 1000):
            part = acked[i : i + 1000]
            answers += store.get_unihashes(M, [t for t, _, _, _ in part])
        assert answers == [got for _, _, _, got in acked]
        assert all(got == u for _, _, u, got in acked)  # distinct outhashes: no equivalence
        # Outhash rows are there too: nothing half-written.
        for t, o, _, got in acked[:: max(1, len(acked) // 200)]:
            row = store.get_outhash(M, o)
            assert (row["taskhash"], row["unihash"]) == (t, got)
    finally:
        db.close()

    # A retried report returns the same unihash.
    with Stack(tmp_path, workers=1) as again:
        with create_client(again.address, timeout=10) as c:
            for t, o, _, got in acked[:: max(1, len(acked) // 50)]:
                assert c.report_unihash(t, M, o, "f" * 64)["unihash"] == got
    return len(acked), failed, kills


def test_acknowledged_reports_survive_kills(tmp_path):
    acked, failed, kills = run(tmp_path, clients=4, per_client=400, kill_every=(0.3, 0.6))
    assert len(kills) >= 3  # workers and the broker really died during the run
    assert acked + failed == 1600
    assert failed == 0  # the 30 s deadline covers every restart


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_acknowledged_reports_survive_kills_100k(tmp_path):
    acked, failed, kills = run(tmp_path, clients=8, per_client=12500, kill_every=(1.0, 3.0))
    print(f"acknowledged {acked}, failed {failed}, kills {len(kills)}")
    assert acked + failed == 100000
