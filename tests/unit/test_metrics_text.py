"""The metrics renderer on a Scheduler driven without sockets, and the HTTP side without sockets."""

import math

from prometheus_client.parser import text_string_to_metric_families

from hq import options
from hq import protocol as p
from hq.broker.histogram import EXPORT_BOUNDS
from hq.broker.metrics import CONTENT_TYPE, HttpEndpoint, render
from hq.broker.scheduler import Scheduler

M = b"TestMethod"


def parse(text: str) -> dict:
    """{(sample name, sorted label pairs): value}, through prometheus_client's parser."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            assert key not in out, f"duplicate series {key}"
            out[key] = s.value
    return out


def types(text: str) -> dict:
    return {f.name: f.type for f in text_string_to_metric_families(text)}


def value(samples: dict, name: str, **labels) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def ready(s, worker_id, name, pid=1, now=0.0, settings=None):
    info = {"name": name, "pid": pid}
    if settings is not None:
        info["settings"] = settings
    s.on_worker([worker_id, *p.encode_ready(info)], now)


def heartbeat(s, worker_id, stats, now):
    s.on_worker([worker_id, *p.encode_heartbeat(stats)], now)


def lookup(s, worker_id, client, request_id, hashes, start, elapsed):
    s.on_client([client, *p.encode_request(request_id, p.GET, [M, p.pack_items(hashes)])], start)
    (frames,) = [f for f in s.to_workers if f[2] == p.REQUEST]
    s.to_workers.clear()
    _, jobs = p.decode_broker_message(frames[1:])[1][1:]
    ((job_id, body),) = jobs
    s.on_worker([worker_id, *p.encode_job_reply(job_id, p.OK, [body[1]])], start + elapsed)
    s.to_clients.clear()


def stats_request(s, command, now):
    s.on_client([b"admin", *p.encode_request(b"s", command)], now)
    s.to_clients.clear()


WORKER_STATS = {
    "counters": {
        "jobs.get": 3,
        "errors.422": 1,
        "lookups": 10,
        "lookups.hit": 4,
        "lookups.miss": 6,
        "exists": 2,
        "exists.hit": 1,
        "reports.new": 5,
        "reports.equivalent": 2,
        "store.something_new": 9,
    },
    "uptime_s": 12.5,
    "settings": {"journal_mode": "wal", "synchronous": "normal", "busy_timeout": 200},
    "db": {
        "path": "/x/hq.db",
        "file_bytes": 8192,
        "wal_bytes": None,
        "page_size": 4096,
        "page_count": 2,
        "freelist_count": 0,
        "rows": {"unihashes": 7, "outhashes": 5},
        "rows_age_s": 1.5,
    },
}


def test_render_exports_the_raw_cumulative_values_as_valid_text():
    s = Scheduler(options.namespace(options.BROKER, heartbeat_interval_s=1.0, cache_entries=0), now=0.0)
    ready(s, b"w1", "hq-worker-00")
    heartbeat(s, b"w1", WORKER_STATS, 0.5)
    for i, elapsed in enumerate([0.001, 0.002, 0.004, 0.100]):
        lookup(s, b"w1", b"c", b"r%d" % i, ["a", "b"], 1.0 + i, elapsed)
    s.on_client([b"c", *p.encode_request(b"bad", b"no-such-command")], 6.0)
    s.to_clients.clear()

    text = render(s, 10.0, {200: 3, 404: 1})
    samples = parse(text)
    assert value(samples, "hq_broker_uptime_seconds") == 10.0
    assert value(samples, "hq_requests_total", command="get") == 4
    assert value(samples, "hq_requests_total", command="report") == 0  # listed from 0
    assert value(samples, "hq_items_total", command="get") == 8
    assert value(samples, "hq_requests_malformed_total") == 1
    assert value(samples, "hq_errors_total", code="404") == 1
    assert value(samples, "hq_workers") == 1
    assert value(samples, "hq_queued_jobs") == 0 and value(samples, "hq_inflight_jobs") == 0
    assert value(samples, "hq_broker_events_total", event="workers.registered") == 1
    assert value(samples, "hq_metrics_http_responses_total", code="200") == 3

    # The latency histogram: cumulative buckets on the export bounds, +Inf = count.
    buckets = [
        (float(dict(labels)["le"]), n)
        for (name, labels), n in samples.items()
        if name == "hq_request_duration_seconds_bucket" and dict(labels)["command"] == "get"
    ]
    buckets.sort()
    assert [b for b, _ in buckets] == [*EXPORT_BOUNDS, math.inf]
    counts = [n for _, n in buckets]
    assert counts == sorted(counts) and counts[-1] == 4
    assert value(samples, "hq_request_duration_seconds_count", command="get") == 4
    assert abs(value(samples, "hq_request_duration_seconds_sum", command="get") - 0.107) < 1e-9
    le = {b: n for b, n in buckets}
    assert le[2.0**-9] == 1 and le[2.0**-8] == 2 and le[2.0**-7] == 3 and le[2.0**-3] == 4

    # The worker's own counters, labelled by its name.
    w = {"worker": "hq-worker-00"}
    assert value(samples, "hq_worker_jobs_total", command="get", **w) == 3
    assert value(samples, "hq_worker_errors_total", code="422", **w) == 1
    assert value(samples, "hq_worker_lookups_total", **w) == 10
    assert value(samples, "hq_worker_lookup_hits_total", **w) == 4
    assert value(samples, "hq_worker_lookup_misses_total", **w) == 6
    assert value(samples, "hq_worker_exists_hits_total", **w) == 1
    assert value(samples, "hq_worker_reports_total", result="new", **w) == 5
    assert value(samples, "hq_worker_reports_total", result="existing", **w) == 0
    assert value(samples, "hq_worker_events_total", event="store.something_new", **w) == 9
    assert value(samples, "hq_worker_uptime_seconds", **w) == 12.5
    assert value(samples, "hq_worker_restarts_total", **w) == 0
    assert value(samples, "hq_db_file_bytes", **w) == 8192
    assert ("hq_db_wal_bytes", tuple(w.items())) not in samples  # None: no sample, no crash
    assert value(samples, "hq_db_rows", table="unihashes", **w) == 7
    assert (
        value(
            samples,
            "hq_sqlite_settings_info",
            journal_mode="wal",
            synchronous="normal",
            busy_timeout="200",
            **w,
        )
        == 1
    )

    kinds = types(text)
    assert kinds["hq_requests"] == "counter" and kinds["hq_request_duration_seconds"] == "histogram"
    assert kinds["hq_queued_jobs"] == "gauge" and kinds["hq_sqlite_settings_info"] == "gauge"
    for line in text.splitlines():
        if not line.startswith("#"):
            assert line.startswith("hq_"), line
    assert all(name.endswith("_total") for name in _sample_names(text, "counter"))


def _sample_names(text, kind):
    return {s.name for f in text_string_to_metric_families(text) if f.type == kind for s in f.samples}


def test_reset_stats_does_not_move_the_exported_counters():
    s = Scheduler(options.namespace(options.BROKER, heartbeat_interval_s=1.0, cache_entries=0), now=0.0)
    ready(s, b"w1", "hq-worker-00")
    heartbeat(s, b"w1", WORKER_STATS, 0.5)
    lookup(s, b"w1", b"c", b"r1", ["a"], 1.0, 0.01)
    before = parse(render(s, 2.0))
    stats_request(s, p.RESET_STATS, 2.0)
    heartbeat(s, b"w1", WORKER_STATS, 2.5)
    after = parse(render(s, 3.0))
    for key, old in before.items():
        name = key[0]
        if name.endswith(("_total", "_bucket", "_count", "_sum")) and key in after:
            assert after[key] >= old, key
    assert value(after, "hq_requests_total", command="get") == 1
    assert value(after, "hq_requests_total", command="reset-stats") == 1
    assert value(after, "hq_worker_lookups_total", worker="hq-worker-00") == 10


def test_worker_names_are_escaped_and_made_unique():
    s = Scheduler(options.namespace(options.BROKER), now=0.0)
    odd = 'we"ird\\name\nline'
    ready(s, b"w1", odd, pid=1)
    ready(s, b"w2", "same", pid=2)
    ready(s, b"w3", "same", pid=3)  # two processes claim one name: still one series each
    text = render(s, 1.0)
    samples = parse(text)
    names = {dict(labels)["worker"] for (name, labels) in samples if name == "hq_worker_inflight_jobs"}
    assert odd in names and "same" in names and len(names) == 3
    assert 'worker="we\\"ird\\\\name\\nline"' in text


def test_settings_fall_back_to_ready_info_and_junk_stats_are_skipped():
    s = Scheduler(options.namespace(options.BROKER), now=0.0)
    ready(s, b"w1", "hq-worker-00", settings={"journal_mode": "wal", "bad key!": "x"})
    heartbeat(s, b"w1", {"counters": {"lookups": "many"}, "uptime_s": [1], "db": "nope"}, 0.5)
    samples = parse(render(s, 1.0))
    assert (
        value(samples, "hq_sqlite_settings_info", worker="hq-worker-00", journal_mode="wal", bad_key_="x")
        == 1
    )
    assert not any(name == "hq_worker_lookups_total" for name, _ in samples)
    assert not any(name == "hq_worker_uptime_seconds" for name, _ in samples)


def test_a_restarted_worker_counts_a_restart():
    s = Scheduler(options.namespace(options.BROKER), now=0.0)
    ready(s, b"id1", "hq-worker-00", pid=1)
    s.on_worker([b"id1", *p.DISCONNECT_MESSAGE], 0.1)
    ready(s, b"id2", "hq-worker-00", pid=2, now=0.2)
    samples = parse(render(s, 1.0))
    assert value(samples, "hq_worker_restarts_total", worker="hq-worker-00") == 1


# --- HTTP, without sockets -------------------------------------------------------------------


def endpoint(**kw):
    calls = []

    def fake_render():
        calls.append(1)
        return "hq_up 1\n"

    ep = HttpEndpoint(fake_render, **kw)
    return ep, calls


def sent(ep):
    """{conn_id: [data...]} of the outbox, emptied."""
    out = {}
    for conn_id, data in ep.outbox:
        out.setdefault(conn_id, []).append(data)
    ep.outbox.clear()
    return out


def test_a_request_in_pieces_is_answered_once_complete_then_closed():
    ep, calls = endpoint()
    ep.on_message(b"c1", b"", 0.0)  # connect
    ep.on_message(b"c1", b"GET /metrics HTTP/1.1\r\nHost: x\r\n", 0.1)
    assert ep.outbox == [] and calls == []
    ep.on_message(b"c1", b"Accept: */*\r\n\r\n", 0.2)
    ((conn, (response, close)),) = sent(ep).items()
    assert conn == b"c1" and close == b""
    head, body = response.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert f"Content-Type: {CONTENT_TYPE}".encode() in head
    assert b"Content-Length: %d" % len(body) in head and b"Connection: close" in head
    assert body == b"hq_up 1\n" and ep.conns == {}
    ep.on_message(b"c1", b"more bytes", 0.3)  # late data of a closed connection: ignored
    ep.on_message(b"c1", b"", 0.3)  # and its late disconnect notification
    assert ep.outbox == [] and ep.conns == {}
    assert ep.responses == {200: 1}


def answer_to(request: bytes) -> bytes:
    ep, _ = endpoint()
    ep.on_message(b"c", b"", 0.0)
    ep.on_message(b"c", request, 0.0)
    response, close = sent(ep)[b"c"]
    assert close == b""
    return response


def test_status_codes():
    assert answer_to(b"GET / HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.1 200 ")
    assert answer_to(b"GET /metrics?x=1 HTTP/1.1\n\n").startswith(b"HTTP/1.1 200 ")
    assert answer_to(b"GET /other HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 404 ")
    response = answer_to(b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
    assert response.startswith(b"HTTP/1.1 405 ") and b"Allow: GET, HEAD" in response
    assert answer_to(b"\x16\x03\x01garbage\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    assert answer_to(b"GET /metrics\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    head = answer_to(b"HEAD /metrics HTTP/1.1\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and head.endswith(b"\r\n\r\n")


def test_oversized_headers_are_refused_without_buffering_more():
    ep, calls = endpoint(max_request_bytes=100)
    ep.on_message(b"c", b"", 0.0)
    ep.on_message(b"c", b"GET /metrics HTTP/1.1\r\n", 0.0)
    ep.on_message(b"c", b"X: " + b"a" * 100, 0.0)
    response, close = sent(ep)[b"c"]
    assert response.startswith(b"HTTP/1.1 400 ") and close == b"" and calls == []
    assert ep.conns == {}


def test_connections_are_bounded_and_time_out():
    ep, _ = endpoint(max_connections=3, request_timeout_s=10.0)
    for i in range(4):
        ep.on_message(b"c%d" % i, b"", float(i))
        ep.on_message(b"c%d" % i, b"GET /metrics HTTP/1.1\r\n", float(i))
    assert list(ep.conns) == [b"c1", b"c2", b"c3"]
    assert sent(ep) == {b"c0": [b""]}  # the oldest was closed to make room
    assert ep.next_wakeup(5.0) == 6.0
    ep.tick(11.5)
    out = sent(ep)
    assert set(out) == {b"c1"} and out[b"c1"][0].startswith(b"HTTP/1.1 408 ")
    ep.on_message(b"c2", b"", 12.0)  # the peer hung up: forgotten, nothing sent
    assert list(ep.conns) == [b"c3"] and ep.outbox == []
    ep.tick(20.0)
    assert ep.conns == {} and ep.next_wakeup(20.0) == math.inf


def test_a_rendering_error_is_a_500_not_a_crash():
    def broken():
        raise RuntimeError("boom")

    ep = HttpEndpoint(broken)
    ep.on_message(b"c", b"", 0.0)
    ep.on_message(b"c", b"GET /metrics HTTP/1.1\r\n\r\n", 0.0)
    assert sent(ep)[b"c"][0].startswith(b"HTTP/1.1 500 ")
