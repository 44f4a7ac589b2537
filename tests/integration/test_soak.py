"""Resources over time: client churn, connect/close cycles, worker kills. Nothing grows."""

import multiprocessing
import os
import random
import signal
import time

import psutil
import pytest

from helpers import Stack, wait_for
from hq.client import create_client
from hq.workers.schema import open_database
from hq.workers.store import Store

M = "TestMethod"


def broker_state(client) -> tuple:
    b = client.get_stats()["broker"]
    return b["pending_requests"], b["queued_jobs"], b["inflight_jobs"], b["clients_queued"]


def test_connect_request_close_cycles_leave_nothing_behind(tmp_path, cycles=1000):
    with Stack(tmp_path, workers=2) as stack:
        broker = stack.children()["hq-broker"]
        with create_client(stack.address, timeout=10) as probe:
            probe.ping()
            fds_before = broker.num_fds()
            for i in range(cycles):
                with create_client(stack.address, timeout=10) as c:
                    assert c.get_unihash(M, "%064x" % i) is None
            # The broker lets go of every connection it accepted (ZMTP close on the peer).
            wait_for(lambda: broker.num_fds() <= fds_before + 2, 10, 0.05, "broker fds back to baseline")
            assert broker_state(probe) == (0, 0, 0, 0)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ten_thousand_cycles(tmp_path):
    test_connect_request_close_cycles_leave_nothing_behind(tmp_path, cycles=10_000)


def churn_client(address, known, seed, rounds, out):
    rng = random.Random(f"churn-{seed}")  # never the seed of the populated stream
    hits = rng.sample(list(known), 2000)
    queries = hits + ["%064x" % rng.getrandbits(256) for _ in range(2000)]
    wrong = []
    with create_client(address, timeout=30) as c:
        for _ in range(rounds):
            batch = rng.sample(queries, 200)
            answers = c.get_unihash_batch([(M, t) for t in batch])
            wrong += [("get", t, a, known.get(t)) for a, t in zip(answers, batch) if a != known.get(t)]
            t, o, u = ("%064x" % rng.getrandbits(256) for _ in range(3))
            got = c.report_unihash(t, M, o, u)["unihash"]
            if got != u:
                wrong.append(("report", t, got, u))
            time.sleep(0.05)  # pacing: a steady load, not a flood
    out.put(wrong)


def populate(path: str, n: int) -> dict:
    """n mappings written straight into a new database (as Store would write them)."""
    db = open_database(path)
    store = Store(db)
    rng = random.Random("soak")
    known = {"%064x" % rng.getrandbits(256): "%064x" % rng.getrandbits(256) for _ in range(n)}
    with store.write_transaction():
        mid = store.method_id(M, create=True)
        db.connection().executemany(
            "INSERT INTO unihashes (method, taskhash, unihash, gc_mark) VALUES (?, ?, ?, '')",
            [(mid, bytes.fromhex(t), bytes.fromhex(u)) for t, u in known.items()],
        )
    db.close()
    return known


def sample(stack) -> dict:
    out = {}
    for name, proc in stack.children().items():
        try:
            out[name] = (proc.pid, proc.memory_info().rss, proc.num_fds())
        except psutil.Error:
            pass
    wal = stack.db + "-wal"
    out["wal"] = os.path.getsize(wal) if os.path.exists(wal) else 0
    return out


SOAK_S = float(os.environ.get("HQ_SOAK_S", "600"))


@pytest.mark.slow
@pytest.mark.timeout(SOAK_S + 300)
def test_soak(tmp_path):
    """10 minutes (HQ_SOAK_S): a new client every 2 s, a worker killed every 60 s."""
    duration = SOAK_S
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    # A database bigger than the workers' page cache (16 MiB each), so the caches are full
    # by the first sample and RSS growth after it can only be a leak.
    known = populate(str(tmp_path / "hq.db"), 200_000)
    with Stack(tmp_path, workers=2) as stack:
        with create_client(stack.address, timeout=60) as warm:  # fill both page caches
            for _ in range(3):
                assert warm.get_unihash_batch([(M, t) for t in known]) == list(known.values())
        start = time.monotonic()
        procs, samples, kills = [], {}, 0
        next_client = next_kill = start
        first_sample_at = start + duration / 5
        while time.monotonic() - start < duration:
            now = time.monotonic()
            if now >= next_client:
                proc = ctx.Process(target=churn_client, args=(stack.address, known, len(procs), 40, out))
                proc.start()
                procs.append(proc)
                next_client += 2.0
            if now - start > 30 and now >= next_kill:
                workers = [p for n, p in stack.children().items() if n.startswith("hq-worker")]
                random.Random(kills).choice(workers).send_signal(signal.SIGKILL)
                kills += 1
                next_kill = now + 60.0
            if "mid" not in samples and now >= first_sample_at:
                samples["mid"] = sample(stack)
            for proc in procs:
                if proc.exitcode is None:
                    proc.join(0)
            time.sleep(0.2)
        for proc in procs:
            proc.join(60)
        wrong = [out.get(timeout=60) for _ in procs]
        samples["end"] = sample(stack)
    mid, end = samples["mid"], samples["end"]
    print("mid", mid, "\nend", end, "\nkills", kills, "clients", len(procs))
    assert [w for ws in wrong for w in ws] == []
    assert end["hq-broker"][1] < mid["hq-broker"][1] * 1.05  # broker RSS
    assert end["hq-broker"][2] <= mid["hq-broker"][2] + 5  # broker fds
    worker_rss_mid = max(v[1] for k, v in mid.items() if k.startswith("hq-worker"))
    assert max(v[1] for k, v in end.items() if k.startswith("hq-worker")) < worker_rss_mid * 1.05
    assert end["wal"] < 64 * 2**20
