"""Broker + workers + clients as real processes over tcp:// and ipc://."""

import multiprocessing
import random

import pytest

from helpers import Stack, maps_psycopg, seed_known
from hq.client import InvokeError, create_client

M = "TestMethod"
T1 = "35788efcb8dfb0a02659d81cf2bfd695fb30faf9"
T2 = "3bf6f1e89d26205aec90da04854fbdbf73afe6b4"
O1 = "2765d4a5884be49b28601445c2760c5f21e7e5c0ee2b7e3fce98fd7e5970796f"
U1 = "a69ec97f5af2e21e1a1f9cc8896965515d5559425666f734e245a3d40cee33d9"
U2 = "bf6e81926066f770e960f9f777cd088c62bea9addb7745f3e77deaa81a645747"


def test_reference_exchange(any_stack):
    """The byte-exact exchange of the reference's §12.1, through hq's client API."""
    with create_client(any_stack.address, timeout=10) as c:
        assert c.ping() == {"alive": True}
        assert c.report_unihash(T1, M, O1, U1) == {"taskhash": T1, "method": M, "unihash": U1}
        assert c.report_unihash(T2, M, O1, U2) == {"taskhash": T2, "method": M, "unihash": U1}
        assert c.get_taskhash(M, T1) == {"taskhash": T1, "method": M, "unihash": U1}
        row = c.get_taskhash(M, T1, True)
        assert (row["taskhash"], row["outhash"], row["unihash"], row["gc_mark"]) == (T1, O1, U1, "")
        assert c.get_taskhash(M, "0" * 40) is None
        assert c.get_taskhash(M, "0" * 40, True) is None
        row = c.get_outhash(M, O1, T2, with_unihash=False)
        assert row["taskhash"] == T1 and "unihash" not in row
        assert c.get_outhash(M, O1, T2)["unihash"] == U1
        equiv = c.report_unihash_equiv("1" * 40, M, U2)
        assert equiv == {"taskhash": "1" * 40, "method": M, "unihash": U2}
        assert c.get_unihash_batch([(M, T1), (M, "0" * 40), (M, T2)]) == [U1, None, U1]
        assert c.unihash_exists(U1) is True
        assert c.unihash_exists_batch([U2, "f" * 64]) == [True, False]
        with pytest.raises(InvokeError, match="Invalid unihash"):
            c.report_unihash("2" * 40, M, "3" * 64, "A" * 64)
        # The client keeps working after a refused request.
        assert c.get_unihash(M, T1) == U1


def test_extra_fields_are_stored(shared_stack):
    with create_client(shared_stack.address, timeout=10) as c:
        extra = {
            "owner": "alice",
            "PN": "busybox",
            "PV": "1.36",
            "PR": "r0",
            "task": "do_package",
            "outhash_siginfo": "s" * 200_000,
            "ignored": 1,
        }
        c.report_unihash("e" * 64, M, "d" * 64, U1, extra)
        row = c.get_taskhash(M, "e" * 64, True)
        assert {k: row[k] for k in ("owner", "PN", "PV", "PR", "task")} == {
            k: extra[k] for k in ("owner", "PN", "PV", "PR", "task")
        }
        assert row["outhash_siginfo"] == "s" * 200_000


def test_batches_of_any_length_and_a_generator(shared_stack):
    rng = random.Random(7)
    known = {("%064x" % rng.getrandbits(256)): ("%064x" % rng.getrandbits(256)) for _ in range(300)}
    with create_client(shared_stack.address, timeout=20) as c:
        for taskhash, unihash in known.items():
            c.report_unihash_equiv(taskhash, M, unihash)
        queries = [("%064x" % rng.getrandbits(256)) for _ in range(25_000)] + list(known)
        rng.shuffle(queries)
        methods = [M if i % 7 else "Other" for i in range(len(queries))]
        answers = c.get_unihash_batch((m, t) for m, t in zip(methods, queries))
        assert answers == [known.get(t) if m == M else None for m, t in zip(methods, queries)]
        assert c.get_unihash_batch([]) == []
        assert c.unihash_exists_batch(iter(list(known.values()) + ["0" * 64])) == [True] * 300 + [False]


def _client_process(address, seed, rounds, out):
    """One build: report fresh pairs, then look them up mixed with misses."""
    rng = random.Random(seed)
    bad = 0
    with create_client(address, timeout=30) as c:
        mine = {}
        for _ in range(rounds):
            t, o, u = ("%064x" % rng.getrandbits(256) for _ in range(3))
            got = c.report_unihash(t, M, o, u)["unihash"]
            bad += got != u
            mine[t] = u
        queries = list(mine) + ["%064x" % rng.getrandbits(256) for _ in range(len(mine))]
        rng.shuffle(queries)
        for _ in range(3):
            answers = c.get_unihash_batch([(M, t) for t in queries])
            bad += sum(a != mine.get(t) for a, t in zip(answers, queries))
    out.put((seed, bad))


def test_forty_concurrent_clients(any_stack):
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    procs = [
        ctx.Process(target=_client_process, args=(any_stack.address, seed, 50, out)) for seed in range(40)
    ]
    for proc in procs:
        proc.start()
    results = [out.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join(30)
        assert proc.exitcode == 0
    assert sorted(results) == [(seed, 0) for seed in range(40)]
    assert "database is locked" not in any_stack.log()


def _equivalent_reporter(address, outhash, seed, out):
    with create_client(address, timeout=30) as c:
        taskhash = "%064x" % random.Random(seed).getrandbits(256)
        unihash = "%064x" % random.Random(seed + 1000).getrandbits(256)
        out.put((taskhash, c.report_unihash(taskhash, M, outhash, unihash)["unihash"]))


def test_concurrent_equivalent_reports_agree(any_stack):
    """Many builds report the same outhash at once: they all end up with one unihash."""
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    procs = [
        ctx.Process(target=_equivalent_reporter, args=(any_stack.address, "c" * 64, seed, out))
        for seed in range(20)
    ]
    for proc in procs:
        proc.start()
    results = [out.get(timeout=60) for _ in procs]
    for proc in procs:
        proc.join(30)
    with create_client(any_stack.address, timeout=10) as c:
        first = c.get_outhash(M, "c" * 64, "x")["unihash"]
        assert {u for _, u in results} == {first}
        assert c.get_unihash_batch([(M, t) for t, _ in results]) == [first] * 20


def test_worker_killed_mid_batch_loses_nothing(tmp_path):
    """kill -9 a worker while a large batch is in flight: every answer still arrives, right."""
    import signal
    import threading

    from helpers import wait_for

    with Stack(tmp_path, workers=2) as stack:
        known = seed_known(stack.address, 2000, 11)
        rng = random.Random("queries")
        queries = list(known) + ["%064x" % rng.getrandbits(256) for _ in range(2000)]
        queries = queries * 50  # 200k lookups
        rng.shuffle(queries)
        result = {}

        def run():
            with create_client(stack.address, timeout=60) as c:
                result["answers"] = c.get_unihash_batch([(M, t) for t in queries])

        thread = threading.Thread(target=run)
        thread.start()
        victim = stack.children()["hq-worker-00"]
        stats_client = create_client(stack.address, timeout=10)
        # Kill once the batch is flowing through the workers.
        wait_for(
            lambda: (
                stats_client.get_stats()["broker"]["counters"].get("items.get", 0) > 0
                or stats_client.get_stats()["broker"]["inflight_jobs"] > 0
            ),
            20,
            0.001,
            "batch in flight",
        )
        victim.send_signal(signal.SIGKILL)
        thread.join(60)
        assert not thread.is_alive()
        assert result["answers"] == [known.get(t) for t in queries]
        # hq-server restarts the killed worker.
        wait_for(
            lambda: getattr(stack.children().get("hq-worker-00"), "pid", victim.pid) != victim.pid,
            15,
            what="worker restart",
        )
        counters = stats_client.get_stats()["broker"]["counters"]
        stats_client.close()
        assert counters["workers.dropped"] >= 1
        print("re-dispatched chunks:", counters.get("jobs.redispatched", 0))


def test_the_broker_answers_repeated_lookups_and_forgets_what_is_deleted(shared_stack):
    """The broker's cache on a real stack: a repeated lookup is answered without a worker,
    and after remove (and gc-sweep) the next lookups see the deletion at once."""
    t1, t2 = "c1" * 32, "c2" * 32
    with create_client(shared_stack.address, timeout=10) as c:
        c.report_unihash_equiv(t1, M, U1)
        c.report_unihash_equiv(t2, M, U2)

        def broker():
            return c.get_stats()["broker"]

        before = broker()["counters"].get("cache.hits", 0)
        assert c.get_unihash(M, t1) == U1  # learned from the worker's answer
        assert [c.get_unihash(M, t1) for _ in range(5)] == [U1] * 5
        assert c.get_unihash_batch([(M, t1), (M, t2)]) == [U1, U2]  # t2: learned now
        assert c.get_unihash_batch([(M, t2), (M, t1)]) == [U2, U1]
        after = broker()
        assert after["counters"]["cache.hits"] - before == 5 + 2
        assert after["cache"]["entries"] >= 2
        assert c.remove({"taskhash": t1}) == {"count": 1}  # its mapping (report-equiv made no outhash row)
        assert c.get_unihash(M, t1) is None
        assert c.get_unihash(M, t2) == U2
        c.gc_mark("keep-nothing", {"taskhash": "0" * 64})
        assert c.gc_sweep("keep-nothing")["count"] >= 1
        assert c.get_unihash_batch([(M, t1), (M, t2)]) == [None, None]
        # Misses are cached too, and a report of the key drops its miss.
        hits = broker()["counters"]["cache.hits"]
        assert c.get_unihash(M, t1) is None
        assert broker()["counters"]["cache.hits"] == hits + 1
        c.report_unihash_equiv(t1, M, U2)
        assert c.get_unihash(M, t1) == U2


def test_on_sqlite_no_process_loads_psycopg(shared_stack):
    """peewee imports psycopg whenever it is installed, a third of a worker's start (0.50 ->
    0.36 CPU-s here); on an SQLite file hq-server and its workers hide it. (The PostgreSQL
    tests see it loaded in their workers, so this check can see it.)"""
    pytest.importorskip("psycopg", reason="psycopg is not installed here: nothing to hide")
    with create_client(shared_stack.address) as client:
        client.get_unihash("M", "0" * 64)  # every part of the stack has run
    pids = [shared_stack.proc.pid, *(proc.pid for proc in shared_stack.processes.values())]
    assert [pid for pid in pids if maps_psycopg(pid)] == []
