"""Several brokers, each with its own workers, on one PostgreSQL database: clients, the
gateway and hq-admin take all their addresses, spread over them, fail over when one dies
(0 wrong answers), and no broker answers from a stale cache of what another one changed.

Each broker and its workers run on a "host" of their own: a network namespace (as root),
reached over a veth pair; elsewhere distinct loopback addresses stand in, with a warning
saying so in the test output."""

from __future__ import annotations

import random
import subprocess
import threading
import warnings

import psutil
import pytest

from helpers import Gateway, Hosts, Stack, script, wait_for
from hq.client import create_client

M = "TestMethod"


@pytest.fixture
def two(tmp_path, postgresql_url, request):
    """Two hq-servers (2 workers each) on one PostgreSQL schema, on hosts a and b (with the
    environment of an indirect parameter, if any)."""
    hosts = Hosts(2)
    db = postgresql_url
    if hosts.namespaces:
        db = Hosts.database_url(postgresql_url)
        if db is None:
            hosts.close()
            hosts.why_not = "no PostgreSQL Unix socket to reach from a namespace"
            hosts.addresses = ["127.0.0.2", "127.0.0.3"]
            db = postgresql_url
    if not hosts.namespaces:
        warnings.warn(
            f"network namespaces unavailable ({hosts.why_not}): "
            f"the two hosts are loopback addresses {', '.join(hosts.addresses)}",
            stacklevel=1,
        )
    stacks = []
    try:
        for i, name in enumerate(("a", "b")):
            (tmp_path / name).mkdir()
            bind = f"tcp://{hosts.addresses[i]}:*"
            env = getattr(request, "param", None)
            stacks.append(Stack(tmp_path / name, bind=bind, env=env, db=db, prefix=hosts.argv(i, [])).start())
        print(
            "hosts: network namespaces" if hosts.namespaces else f"hosts: loopback ({hosts.why_not})",
            ", ".join(s.address for s in stacks),
        )
        yield stacks
        for s in stacks:
            if not getattr(s, "killed", False):
                assert s.stop() == 0, s.log()
    finally:
        for s in stacks:
            s.stop()
        hosts.close()


def both(stacks) -> str:
    return ",".join(s.address for s in stacks)


def kill_host(stack) -> None:
    """The host dies: hq-server, its broker and its workers, SIGKILL, all at once (nothing
    restarts the broker)."""
    processes = [psutil.Process(stack.proc.pid), *stack.processes.values()]
    for proc in processes:
        proc.kill()
    psutil.wait_procs(processes, timeout=10)
    stack.proc.wait(10)
    stack.killed = True


def requests_seen(stack) -> int:
    with create_client(stack.address, timeout=10) as client:
        return client.get_stats()["requests"]["num"]


def test_what_one_broker_changes_the_other_answers_at_once(two):
    a, b = two
    assert a.address.split("//")[1].split(":")[0] != b.address.split("//")[1].split(":")[0]  # two hosts
    with create_client(a.address) as via_a, create_client(b.address) as via_b:
        assert via_b.get_unihash(M, "1" * 64) is None  # a miss, asked on b first
        via_a.report_unihash_equiv("1" * 64, M, "2" * 64)
        assert via_b.get_unihash(M, "1" * 64) == "2" * 64  # not a remembered miss
        assert via_b.get_unihash(M, "1" * 64) == "2" * 64
        assert via_a.remove({"taskhash": "1" * 64}) == {"count": 1}
        assert via_b.get_unihash(M, "1" * 64) is None  # not a remembered hit
    stats = requests_seen(b)
    assert stats > 0


def test_clients_spread_over_the_brokers_and_finish_when_one_dies(two):
    """16 clients, each given both brokers, run the farm burst in waves; host a dies in the
    middle (its broker and workers killed): every answer is right and every client
    finishes, through b, well within its deadline."""
    a, b = two
    rng = random.Random(7)
    known = {"%064x" % rng.getrandbits(256): "%064x" % rng.getrandbits(256) for _ in range(3000)}
    with create_client(b.address, timeout=30) as client:
        for taskhash, unihash in known.items():
            client.report_unihash_equiv(taskhash, M, unihash)
    keys = list(known)
    progress = [0] * 16
    killed = threading.Event()
    wrong, failures = [], []

    def burst(i):
        try:
            with create_client(both(two), timeout=20) as client:
                for wave in range(0, len(keys), 100):
                    if wave == 1500:  # half-way: wait until a's broker is gone
                        killed.wait(60)
                    chunk = keys[wave : wave + 100]
                    answers = client.get_unihash_batch([(M, t) for t in chunk])
                    wrong.extend(t for t, u in zip(chunk, answers) if u != known[t])
                    progress[i] += len(chunk)
        except Exception as exc:
            failures.append((i, exc))

    threads = [threading.Thread(target=burst, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    try:
        wait_for(
            lambda: sum(progress) >= 16 * 1000 or failures, timeout=60, what="the first half of the burst"
        )
        assert requests_seen(a) > 1 and requests_seen(b) > 1  # both brokers had clients
        kill_host(a)
    finally:
        killed.set()
        for t in threads:
            t.join(120)
    assert not failures, failures
    assert wrong == []
    assert progress == [len(keys)] * 16


def test_hq_admin_and_the_gateway_take_several_brokers(two, tmp_path, hashserv):
    shown = subprocess.run(
        [script("hq-admin"), "stats", "--address", both(two)], capture_output=True, text=True, timeout=60
    )
    assert shown.returncode == 0, shown.stderr
    assert "postgresql" in shown.stdout
    gateway = Gateway(tmp_path, both(two))
    try:
        client = hashserv.create_client(gateway.tcp)
        try:
            client.report_unihash_equiv("3" * 64, M, "4" * 64)
            before = [requests_seen(s) for s in two]
            for _ in range(5):
                assert client.get_unihash(M, "3" * 64) == "4" * 64
            grew = [requests_seen(s) - n for s, n in zip(two, before)]
            (used,) = [s for s, n in zip(two, grew) if n > 2]  # the one the gateway's link is on
            kill_host(used)
            for _ in range(20):  # the link moves to the other broker at once
                assert client.get_unihash(M, "3" * 64) == "4" * 64
        finally:
            client.close()
    finally:
        assert gateway.stop() == 0, gateway.log()


def test_an_admin_write_a_dead_broker_held_is_not_sent_to_another(two):
    """A remove whose broker dies may have run there: the client says so (as after a
    reconnect) instead of running it a second time on the other broker."""
    workers = [proc for s in two for name, proc in s.processes.items() if name.startswith("hq-worker")]
    with create_client(two[0].address) as client:
        client.report_unihash_equiv("5" * 64, M, "6" * 64)
    for proc in workers:  # nothing answers: the remove stays with its broker
        proc.suspend()
    outcome = []

    def remove():
        try:
            with create_client(both(two), timeout=30) as client:
                outcome.append(client.remove({"taskhash": "5" * 64}))
        except Exception as exc:
            outcome.append(exc)

    thread = threading.Thread(target=remove)
    thread.start()
    try:

        def holder():
            for s in two:
                with create_client(s.address, timeout=5) as client:
                    broker = client.get_stats()["broker"]
                if broker["queued_jobs"] + broker["inflight_jobs"]:
                    return s
            return None

        held = wait_for(holder, timeout=20, what="a broker to hold the remove")
        kill_host(held)
    finally:
        for proc in workers:
            if proc.is_running():
                proc.resume()
        thread.join(60)
    (result,) = outcome
    assert isinstance(result, ConnectionError) and "may or may not have run" in str(result), result
    (other,) = [s for s in two if s is not held]
    with create_client(other.address) as client:
        assert client.get_unihash(M, "5" * 64) == "6" * 64  # not removed a second time elsewhere


@pytest.mark.parametrize("two", [{"HQ_FAILPOINTS": "store.report=sleep(0.1)"}], indirect=True)
def test_reports_of_one_outhash_through_both_hosts_agree(two):
    """8 clients, half on each host, report different taskhashes with the same outhashes at
    once; each report's transaction is held open 0.1 s before its hash locks, so the two
    hosts' workers write at the same time: one unihash per outhash, everywhere."""
    answers, failures = {}, []
    start = threading.Barrier(8)

    def report(i):
        try:
            with create_client(two[i % 2].address, timeout=60) as client:
                start.wait()
                answers[i] = [
                    client.report_unihash(
                        "%064x" % (i * 100 + k + 1), M, "%064x" % (7000 + k), "%064x" % (9000 + i)
                    )["unihash"]
                    for k in range(4)
                ]
        except Exception as exc:
            failures.append((i, exc))

    threads = [threading.Thread(target=report, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not failures, failures
    for k in range(4):
        assert len({answers[i][k] for i in range(8)}) == 1, k
    with create_client(two[1].address) as client:
        keys = [(M, "%064x" % (i * 100 + k + 1)) for i in range(8) for k in range(4)]
        assert client.get_unihash_batch(keys) == [answers[i][k] for i in range(8) for k in range(4)]
