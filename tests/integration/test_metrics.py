"""The broker's Prometheus endpoint over real HTTP: valid text, values that move, hostile clients."""

import http.client
import os
import random
import socket

import pytest
from prometheus_client.parser import text_string_to_metric_families

from helpers import Stack, wait_for
from hq.client import create_client

M = "TestMethod"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def metrics_stack(tmp_path_factory):
    port = free_port()
    s = Stack(tmp_path_factory.mktemp("metrics"), workers=2, args=("--metrics", f"tcp://127.0.0.1:{port}"))
    s.metrics_port = port
    s.start()
    yield s
    assert s.stop() == 0, s.log()


def get(port: int, path: str = "/metrics", method: str = "GET"):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        return response.status, response, response.read()
    finally:
        conn.close()


def scrape(stack) -> dict:
    """{(sample name, sorted label pairs): value} of one scrape, checked by prometheus_client."""
    status, response, body = get(stack.metrics_port)
    assert status == 200, body
    assert response.getheader("Content-Type") == CONTENT_TYPE
    assert int(response.getheader("Content-Length")) == len(body)
    out = {}
    for family in text_string_to_metric_families(body.decode("utf-8")):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def total(samples: dict, name: str, **labels) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (over workers, say)."""
    want = set(labels.items())
    return sum(v for (n, pairs), v in samples.items() if n == name and want <= set(pairs))


def random_hashes(rng, n):
    return ["%064x" % rng.getrandbits(256) for _ in range(n)]


def test_values_move_with_lookups_and_reports(metrics_stack):
    rng = random.Random(11)
    before = scrape(metrics_stack)
    known = dict(zip(random_hashes(rng, 40), random_hashes(rng, 40)))
    unknown = random_hashes(rng, 60)
    outhash, shared_unihash = random_hashes(rng, 2)
    with create_client(metrics_stack.address, timeout=10) as client:
        for taskhash, unihash in known.items():
            client.report_unihash_equiv(taskhash, M, unihash)
        t1, t2 = random_hashes(rng, 2)
        client.report_unihash(t1, M, outhash, shared_unihash)  # new
        client.report_unihash(t2, M, outhash, random_hashes(rng, 1)[0])  # equivalent to t1's
        client.report_unihash(t1, M, outhash, shared_unihash)  # existing
        queries = list(known) + unknown
        rng.shuffle(queries)
        answers = client.get_unihash_batch([(M, t) for t in queries])
        assert sum(a is not None for a in answers) == len(known)

    def moved():
        now = scrape(metrics_stack)
        lookups = total(now, "hq_worker_lookups_total") - total(before, "hq_worker_lookups_total")
        reports = total(now, "hq_worker_reports_total") - total(before, "hq_worker_reports_total")
        return now if lookups >= 100 and reports >= 3 else None

    after = wait_for(moved, timeout=10, what="worker counters to arrive in heartbeats")

    def delta(name, **labels):
        return total(after, name, **labels) - total(before, name, **labels)

    assert delta("hq_requests_total", command="get") >= 1
    assert delta("hq_requests_total", command="report-equiv") == 40
    assert delta("hq_requests_total", command="report") == 3
    assert delta("hq_items_total", command="get") == 100
    assert delta("hq_items_total", command="report-equiv") == 40
    assert delta("hq_worker_lookups_total") == 100
    assert delta("hq_worker_lookup_hits_total") == 40
    assert delta("hq_worker_lookup_misses_total") == 60
    assert delta("hq_worker_reports_total", result="new") == 1
    assert delta("hq_worker_reports_total", result="equivalent") == 1
    assert delta("hq_worker_reports_total", result="existing") == 1
    assert delta("hq_request_duration_seconds_count", command="get") >= 1
    assert delta("hq_request_duration_seconds_count", command="report-equiv") == 40
    inf = total(after, "hq_request_duration_seconds_bucket", command="report-equiv", le="+Inf")
    assert inf == total(after, "hq_request_duration_seconds_count", command="report-equiv")
    assert total(after, "hq_request_duration_seconds_sum", command="report-equiv") > 0
    assert total(after, "hq_broker_uptime_seconds") > total(before, "hq_broker_uptime_seconds")
    # Row counts and database size are there (refreshed every stats-rows-interval).
    assert total(after, "hq_db_file_bytes") > 0
    assert any(n == "hq_db_rows" for n, _ in after)


def test_counters_do_not_go_down_after_reset_stats(metrics_stack):
    with create_client(metrics_stack.address, timeout=10) as client:
        client.get_unihash_batch([(M, "%064x" % i) for i in range(10)])
        before = scrape(metrics_stack)
        client.reset_stats()
        assert client.get_stats()["requests"]["num"] == 0  # the reset did happen
        client.get_unihash(M, "1" * 64)
    after = wait_for(lambda: scrape(metrics_stack), what="a scrape")
    checked = 0
    for key, old in before.items():
        if key[0].endswith(("_total", "_bucket", "_count", "_sum")) and key in after:
            assert after[key] >= old, key
            checked += 1
    assert checked > 50
    assert after[("hq_requests_total", (("command", "reset-stats"),))] >= 1


def test_worker_labels_name_the_workers(metrics_stack):
    samples = scrape(metrics_stack)
    names = {dict(labels)["worker"] for name, labels in samples if name == "hq_worker_inflight_jobs"}
    assert names == {"hq-worker-00", "hq-worker-01"}
    info = [dict(labels) for name, labels in samples if name == "hq_sqlite_settings_info"]
    assert {i["worker"] for i in info} == names
    assert all(
        i["journal_mode"] == "wal" and i["synchronous"] == "normal" and i["busy_timeout"] for i in info
    )
    assert total(samples, "hq_workers") == 2
    assert all(total(samples, "hq_worker_restarts_total", worker=n) == 0 for n in names)


def test_http_answers(metrics_stack):
    port = metrics_stack.metrics_port
    assert get(port, "/")[0] == 200
    status, response, body = get(port, "/metrics", "HEAD")
    assert status == 200 and body == b"" and int(response.getheader("Content-Length")) > 1000
    assert get(port, "/nope")[0] == 404
    status, response, _ = get(port, "/metrics", "POST")
    assert status == 405 and response.getheader("Allow") == "GET, HEAD"
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"\x00\x01 this is not http\r\n\r\n")
        assert read_all(s).startswith(b"HTTP/1.1 400 ")
    samples = scrape(metrics_stack)
    for code in ("200", "400", "404", "405"):
        assert total(samples, "hq_metrics_http_responses_total", code=code) >= 1


def read_all(sock) -> bytes:
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def test_slow_and_garbage_clients_do_not_stop_scrapes_or_lookups(metrics_stack):
    port = metrics_stack.metrics_port
    broker_pid = metrics_stack.children()["hq-broker"].pid
    slow = []
    try:
        # Slowloris: partial headers, never finished, on more connections than are tracked.
        for _ in range(80):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            slow.append(s)
        # 100 KiB of garbage with no end of headers: answered 400 after 8 KiB, then closed.
        with socket.create_connection(("127.0.0.1", port), timeout=5) as g:
            try:
                g.sendall(os.urandom(100 * 1024).replace(b"\n", b"x"))
            except (BrokenPipeError, ConnectionResetError):
                pass  # closed on us mid-send: that is the point
            assert read_all(g).startswith(b"HTTP/1.1 400 ")
        # Scrapes and lookups still go through while the slow connections hang.
        for _ in range(5):
            assert scrape(metrics_stack)[("hq_workers", ())] == 2
        with create_client(metrics_stack.address, timeout=10) as client:
            assert client.get_unihash_batch([(M, "%064x" % i) for i in range(500)]) == [None] * 500
        # The broker keeps at most 64 of them: the oldest were closed to make room.
        slow[0].settimeout(5)
        assert read_all(slow[0]) == b""
    finally:
        for s in slow:
            s.close()
    assert metrics_stack.children()["hq-broker"].pid == broker_pid
    assert "Traceback" not in metrics_stack.log()


def test_metrics_are_off_by_default(stack):
    # No --metrics: no HTTP endpoint (the broker logs the address when it binds one).
    with create_client(stack.address, timeout=10) as client:
        client.ping()
    assert "Prometheus" not in stack.log()
