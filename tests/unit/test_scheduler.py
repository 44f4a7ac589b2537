"""Broker scheduling without sockets: the time is an argument, so nothing sleeps."""

import pytest

from hq import options
from hq import protocol as p
from hq.broker.scheduler import Scheduler

M = b"TestMethod"


def make(**kw):
    kw.setdefault("merge_items", 1)  # most tests look at turns one job at a time
    kw.setdefault("heartbeat_interval_s", 1.0)
    kw.setdefault("heartbeat_liveness", 3)
    kw.setdefault("request_timeout_s", 10.0)
    kw.setdefault("cache_entries", 0)  # their fake workers echo; the cache has its own tests
    return Scheduler(options.namespace(options.BROKER, **kw))


def ready(s, worker_id, now=0.0):
    s.on_worker([worker_id, *p.encode_ready({"name": worker_id.decode(), "pid": 1})], now)


def get_request(client_id, request_id, chunks):
    """A GET request with one chunk per entry of ``chunks`` (each a list of hashes)."""
    body = []
    for items in chunks:
        body += [M, p.pack_items(items)]
    return [client_id, *p.encode_request(request_id, p.GET, body)]


def take_messages(s):
    """REQUESTs sent to workers since the last call: [(worker_id, command, [(job_id, body)])]."""
    out = []
    for frames in s.to_workers:
        if frames[2] == p.REQUEST:
            command, _, jobs = p.decode_broker_message(frames[1:])[1]
            out.append((frames[0], command, jobs))
    s.to_workers.clear()
    return out


def take_jobs(s):
    """Jobs sent to workers since the last call: [(worker_id, job_id, body)]."""
    return [(w, job_id, body) for w, _, jobs in take_messages(s) for job_id, body in jobs]


def answer(s, worker_id, job_id, body, now=0.0, status=p.OK):
    s.on_worker([worker_id, *p.encode_job_reply(job_id, status, body)], now)


def echo_reply(body):
    """A worker's answer to a GET chunk: the taskhashes themselves as 'unihashes'."""
    return [body[1]]


def replies(s):
    out = [p.decode_reply(frames[1:]) for frames in s.to_clients]
    s.to_clients.clear()
    return out


def test_batch_is_split_into_chunks_and_reassembled_in_order():
    s = make()
    ready(s, b"w1")
    ready(s, b"w2")
    s.on_client(get_request(b"c1", b"r1", [["a"], ["b", "c"], ["d"]]), 0.0)
    jobs = take_jobs(s)
    assert [w for w, _, _ in jobs] == [b"w1", b"w2"]  # spread over both workers
    # Answer out of order: the second chunk first.
    answer(s, jobs[1][0], jobs[1][1], echo_reply(jobs[1][2]))
    jobs += take_jobs(s)  # w2 takes the third chunk
    assert len(jobs) == 3
    answer(s, jobs[2][0], jobs[2][1], echo_reply(jobs[2][2]))
    assert replies(s) == []
    answer(s, jobs[0][0], jobs[0][1], echo_reply(jobs[0][2]))
    (reply,) = replies(s)
    assert reply.request_id == b"r1" and reply.status == p.OK
    assert reply.body == [b"a", b"b\nc", b"d"]


def test_a_single_lookup_waits_at_most_one_chunk_behind_a_big_batch():
    s = make()
    ready(s, b"w1")
    s.on_client(get_request(b"greedy", b"r1", [["x%d" % i] for i in range(10)]), 0.0)
    s.on_client(get_request(b"light", b"r1", [["y"]]), 0.0)
    (first,) = take_jobs(s)
    answer(s, b"w1", first[1], echo_reply(first[2]))
    (second,) = take_jobs(s)
    assert second[2] == [M, b"y"]  # the light client's turn comes next
    answer(s, b"w1", second[1], echo_reply(second[2]))
    assert [r.body for r in replies(s)] == [[b"y"]]


def test_round_robin_between_many_clients():
    s = make()
    ready(s, b"w1")
    for c in (b"a", b"b", b"c"):
        s.on_client(get_request(c, b"r", [[c.decode() + "%d" % i] for i in range(3)]), 0.0)
    order = []
    for _ in range(9):
        (job,) = take_jobs(s)
        order.append(job[2][1][:1])
        answer(s, b"w1", job[1], echo_reply(job[2]))
    # Every client gets one chunk per round: no two turns in a row for anyone.
    assert all(len(set(order[i : i + 3])) == 3 for i in range(0, 9, 3)), order
    assert sorted(order) == [b"a"] * 3 + [b"b"] * 3 + [b"c"] * 3


def test_worker_credit_limits_jobs_in_flight():
    s = make(worker_credit=2)
    ready(s, b"w1")
    s.on_client(get_request(b"c", b"r", [["a"], ["b"], ["c"]]), 0.0)
    jobs = take_jobs(s)
    assert len(jobs) == 2
    answer(s, b"w1", jobs[0][1], echo_reply(jobs[0][2]))
    assert len(take_jobs(s)) == 1


def test_silent_worker_is_dropped_and_its_work_redispatched():
    s = make()
    ready(s, b"w1", 0.0)
    s.on_client(get_request(b"c", b"r", [["a"]]), 0.0)
    (job,) = take_jobs(s)
    ready(s, b"w2", 2.0)
    s.on_worker([b"w2", *p.HEARTBEAT_MESSAGE], 2.5)
    s.tick(2.9)
    assert b"w1" in s.workers  # 3 intervals have not passed yet
    s.tick(3.0)
    assert b"w1" not in s.workers
    (again,) = take_jobs(s)
    assert again[0] == b"w2" and again[2] == job[2]
    # The frozen worker wakes up and answers: its reply is stale and dropped.
    answer(s, b"w1", job[1], [b"stale"], 3.1)
    assert replies(s) == []
    assert s.counters["replies.stale"] == 1
    answer(s, b"w2", again[1], echo_reply(again[2]), 3.2)
    assert [r.body for r in replies(s)] == [[b"a"]]
    assert s.counters["jobs.redispatched"] == 1


def test_a_poison_job_is_abandoned_after_it_loses_max_attempts_workers():
    # A request that stalls or kills every worker it reaches must not take the pool down
    # in turn: after max_attempts losses it is answered INTERNAL, and other work goes on.
    s = make(max_attempts=3)
    for w in (b"w1", b"w2", b"w3", b"w4"):
        ready(s, w)
    s.on_client(get_request(b"c", b"poison", [["p"]]), 0.0)
    for lost in range(3):
        (job,) = take_jobs(s)
        assert job[2] == [M, b"p"]
        s.on_worker([job[0], *p.DISCONNECT_MESSAGE], 0.1 * (lost + 1))
    (reply,) = replies(s)
    assert reply.request_id == b"poison" and reply.status == p.E_INTERNAL
    assert b"3 workers" in reply.body[0]
    assert take_jobs(s) == []  # not dispatched to the last worker
    assert s.counters["jobs.abandoned"] == 1
    s.on_client(get_request(b"c", b"next", [["n"]]), 1.0)
    (job,) = take_jobs(s)
    answer(s, job[0], job[1], echo_reply(job[2]), 1.1)
    assert [(r.request_id, r.body) for r in replies(s)] == [(b"next", [b"n"])]


def test_a_job_lost_with_fewer_than_max_attempts_workers_is_still_answered():
    s = make(max_attempts=3)
    for w in (b"w1", b"w2", b"w3"):
        ready(s, w)
    s.on_client(get_request(b"c", b"r", [["a"]]), 0.0)
    for lost in range(2):
        (job,) = take_jobs(s)
        s.on_worker([job[0], *p.DISCONNECT_MESSAGE], 0.1 * (lost + 1))
    (job,) = take_jobs(s)
    answer(s, job[0], job[1], echo_reply(job[2]), 0.5)
    assert [(r.status, r.body) for r in replies(s)] == [(p.OK, [b"a"])]


def test_heartbeats_keep_a_worker_alive_and_are_sent_to_idle_workers():
    s = make()
    ready(s, b"w1", 0.0)
    for t in (1.0, 2.0, 3.0, 4.0):
        s.on_worker([b"w1", *p.HEARTBEAT_MESSAGE], t - 0.1)
        assert s.next_wakeup(t - 0.1) == pytest.approx(0.1)
        s.tick(t)
    assert b"w1" in s.workers
    beats = [f for f in s.to_workers if f[2] == p.HEARTBEAT]
    assert len(beats) >= 4


def test_unknown_worker_is_told_to_register_again():
    s = make()
    s.on_worker([b"ghost", *p.HEARTBEAT_MESSAGE], 0.0)
    assert s.to_workers == [[b"ghost", *p.DISCONNECT_MESSAGE]]
    s.to_workers.clear()
    answer(s, b"ghost", b"1", [b"x"])
    assert s.to_workers == [[b"ghost", *p.DISCONNECT_MESSAGE]]


def test_worker_disconnect_redispatches():
    s = make()
    ready(s, b"w1")
    ready(s, b"w2")
    s.on_client(get_request(b"c", b"r", [["a"], ["b"], ["c"]]), 0.0)
    jobs = take_jobs(s)
    s.on_worker([b"w1", *p.DISCONNECT_MESSAGE], 0.1)
    assert b"w1" not in s.workers
    answer(s, b"w2", jobs[1][1], echo_reply(jobs[1][2]), 0.2)
    later = take_jobs(s)
    assert later[0][2] == jobs[0][2]  # w1's chunk went back to the front of the queue


def test_no_workers_means_unavailable_after_the_request_timeout():
    s = make(request_timeout_s=5.0)
    s.on_client(get_request(b"c", b"r", [["a"]]), 0.0)
    s.tick(4.9)
    assert replies(s) == []
    assert s.next_wakeup(4.9) == pytest.approx(0.1)
    s.tick(5.0)
    (reply,) = replies(s)
    assert reply.status == p.E_UNAVAILABLE and reply.request_id == b"r"
    # Its queued chunk is gone at once: it no longer counts against the queue bounds.
    assert (len(s.queue), s.queue.queues) == (0, {})
    ready(s, b"w1", 6.0)
    assert take_jobs(s) == []  # the timed-out job is not run


def test_queues_are_bounded_per_client_and_in_total():
    s = make(max_client_jobs=4, max_queued_jobs=6)
    # Distinct chunks: identical ones of other requests would join a queued one (collapse).
    s.on_client(get_request(b"a", b"r1", [["a%d" % i] for i in range(4)]), 0.0)
    s.on_client(get_request(b"a", b"r2", [["a9"]]), 0.0)
    (busy,) = replies(s)
    assert busy.status == p.E_BUSY and busy.request_id == b"r2"
    s.on_client(get_request(b"b", b"r1", [["b0"], ["b1"]]), 0.0)
    assert replies(s) == []
    s.on_client(get_request(b"c", b"r1", [["c0"]]), 0.0)
    assert replies(s)[0].status == p.E_BUSY


def test_worker_error_fails_the_request_once():
    s = make()
    ready(s, b"w1")
    ready(s, b"w2")
    s.on_client(get_request(b"c", b"r", [["a"], ["b"], ["c"]]), 0.0)
    jobs = take_jobs(s)
    answer(s, b"w1", jobs[0][1], [b"bad taskhash"], status=p.E_INVALID)
    (reply,) = replies(s)
    assert reply.status == p.E_INVALID and reply.body == [b"bad taskhash"]
    answer(s, b"w2", jobs[1][1], echo_reply(jobs[1][2]))
    assert replies(s) == []  # the rest of a failed request is not answered again
    assert take_jobs(s) == []  # and its queued chunk is not run
    assert len(s.queue) == 0


def test_duplicate_pending_request_id_is_refused():
    s = make()
    s.on_client(get_request(b"c", b"r", [["a"]]), 0.0)
    s.on_client(get_request(b"c", b"r", [["a"]]), 0.0)
    (reply,) = replies(s)
    assert reply.status == p.E_BAD_REQUEST
    s.on_client(get_request(b"other", b"r", [["a"]]), 0.0)  # ids are per client
    assert replies(s) == []


def test_malformed_request_gets_an_error_with_its_id():
    s = make()
    s.on_client([b"c", p.CLIENT_PROTOCOL, b"r9", b"nonsense", b""], 0.0)
    (reply,) = replies(s)
    assert (reply.request_id, reply.status) == (b"r9", p.E_UNKNOWN_COMMAND)


def test_stats_and_reset_stats():
    s = make()
    ready(s, b"w1")
    s.on_client(get_request(b"c", b"r", [["a", "b"]]), 0.0)
    (job,) = take_jobs(s)
    answer(s, b"w1", job[1], echo_reply(job[2]), 0.25)
    replies(s)
    s.on_client([b"c", *p.encode_request(b"s", p.STATS)], 1.0)
    import json

    stats = json.loads(replies(s)[0].body[0])
    assert stats["requests"]["num"] == 1
    assert stats["requests"]["max_time"] == pytest.approx(0.25)
    assert stats["broker"]["counters"]["items.get"] == 2
    assert [w["name"] for w in stats["workers"]] == ["w1"]
    s.on_client([b"c", *p.encode_request(b"t", p.RESET_STATS)], 1.0)
    assert json.loads(replies(s)[0].body[0])["requests"]["num"] == 1  # values before reset
    s.on_client([b"c", *p.encode_request(b"u", p.STATS)], 1.0)
    assert json.loads(replies(s)[0].body[0])["requests"]["num"] == 0


def stats_of(s, now=1.0, command=p.STATS):
    import json

    s.on_client([b"admin", *p.encode_request(b"s", command)], now)
    return json.loads(replies(s)[-1].body[0])


def heartbeat(s, worker_id, counters, now):
    s.on_worker([worker_id, *p.encode_heartbeat({"counters": counters, "uptime_s": now})], now)


def test_latency_histogram_per_command_and_reset_keeps_raw_counters_growing():
    s = make()
    ready(s, b"w1")
    for i, elapsed in enumerate([0.001, 0.002, 0.004, 0.100]):
        s.on_client(get_request(b"c", b"r%d" % i, [["a"]]), 10.0 * i)
        (job,) = take_jobs(s)
        answer(s, b"w1", job[1], echo_reply(job[2]), 10.0 * i + elapsed)
    replies(s)
    latency = stats_of(s, 50.0)["broker"]["latency"]["get"]
    assert latency["count"] == 4 and latency["max_s"] == pytest.approx(0.100)
    assert 0.002 <= latency["p50_s"] <= 0.002 * 1.19 + 1e-9  # within one bucket (2^(1/4))
    assert latency["p99_s"] == pytest.approx(0.100)
    before = stats_of(s, 50.0, p.RESET_STATS)
    assert before["broker"]["counters"]["requests.get"] == 4
    after = stats_of(s, 50.0)
    assert after["broker"]["latency"]["get"]["count"] == 0
    assert "requests.get" not in after["broker"]["counters"]
    # The raw values keep growing (the metrics endpoint exports them as counters).
    assert s.counters["requests.get"] == 4 and s.latency[p.GET].count == 4


def test_worker_counters_come_from_heartbeats_and_reset_by_baseline():
    s = make()
    ready(s, b"w1", 0.0)
    heartbeat(s, b"w1", {"lookups": 100, "lookups.hit": 40}, 0.5)
    (w,) = stats_of(s, 0.6)["workers"]
    assert w["counters"] == {"lookups": 100, "lookups.hit": 40} and w["restarts"] == 0
    stats_of(s, 0.7, p.RESET_STATS)
    heartbeat(s, b"w1", {"lookups": 130, "lookups.hit": 40}, 1.0)
    (w,) = stats_of(s, 1.1)["workers"]
    assert w["counters"] == {"lookups": 30}  # since the reset; unchanged counters left out


def test_a_worker_registering_again_under_its_name_counts_a_restart():
    s = make()
    s.on_worker([b"id1", *p.encode_ready({"name": "hq-worker-00", "pid": 1})], 0.0)
    heartbeat(s, b"id1", {"lookups": 50}, 0.1)
    stats_of(s, 0.2, p.RESET_STATS)
    s.on_worker([b"id1", *p.DISCONNECT_MESSAGE], 0.3)
    s.on_worker([b"id2", *p.encode_ready({"name": "hq-worker-00", "pid": 2})], 0.4)
    heartbeat(s, b"id2", {"lookups": 7}, 0.5)
    data = stats_of(s, 0.6)
    (w,) = data["workers"]
    assert (w["pid"], w["restarts"]) == (2, 1)
    assert w["counters"] == {"lookups": 7}  # the new process from zero, not 7 - 50
    assert data["broker"]["counters"]["workers.restarted"] == 1


def test_admin_writes_wait_admin_timeout_while_lookups_time_out_as_usual():
    s = make(request_timeout_s=10.0, admin_request_timeout_s=600.0)
    s.on_client([b"admin", *p.encode_request(b"sweep", p.GC_SWEEP, [b"m"])], 0.0)
    s.on_client(get_request(b"c", b"get", [["a"]]), 1.0)
    assert s.next_wakeup(1.0) == pytest.approx(1.0)  # heartbeat interval, not a deadline
    s.tick(11.5)
    assert [(r.request_id, r.status) for r in replies(s)] == [(b"get", p.E_UNAVAILABLE)]
    s.tick(599.0)
    assert replies(s) == []
    s.tick(600.0)
    assert [(r.request_id, r.status) for r in replies(s)] == [(b"sweep", p.E_UNAVAILABLE)]
    assert s.stats(600.0)["broker"]["pending_requests"] == 0


def test_an_admin_write_is_answered_and_forgotten_like_any_request():
    s = make()
    ready(s, b"w1")
    s.on_client([b"admin", *p.encode_request(b"rm", p.REMOVE, [b'{"method":"M"}'])], 0.0)
    s.on_client([b"admin", *p.encode_request(b"rm", p.REMOVE, [b'{"method":"M"}'])], 0.0)
    assert replies(s)[0].status == p.E_BAD_REQUEST  # request id in use, also among admin writes
    (job,) = take_jobs(s)
    answer(s, b"w1", job[1], [b'{"count":3}'], 0.5)
    assert [(r.request_id, r.body) for r in replies(s)] == [(b"rm", [b'{"count":3}'])]
    assert s.slow_pending == {} and s.stats(1.0)["broker"]["pending_requests"] == 0


@pytest.mark.parametrize(
    "junk",
    [
        {"counters": {"lookups": "many"}},
        {"counters": None},
        {"counters": {"lookups": None}},
        {"counters": {"x": True}},
        {"settings": [1]},
        {"db": "big"},
        {"uptime_s": "long"},
    ],
)
def test_a_heartbeat_with_malformed_stats_is_ignored_not_fatal(junk):
    s = make()
    ready(s, b"w1", 0.0)
    heartbeat(s, b"w1", {"lookups": 5}, 0.1)
    s.on_worker([b"w1", *p.encode_heartbeat(junk)], 0.2)
    assert s.counters["workers.bad_stats"] == 1
    stats_of(s, 0.3, p.RESET_STATS)  # once crashed the broker
    (w,) = stats_of(s, 0.4)["workers"]
    assert w["counters"] == {}  # the last good stats, and the reset baseline taken from them
    assert b"w1" in s.workers  # the heartbeat still counted as a sign of life


def test_a_worker_running_a_long_command_is_not_expired_until_admin_timeout():
    # A sweep of millions of rows ends in a COMMIT that cannot heartbeat for seconds.
    s = make(heartbeat_liveness=3, admin_request_timeout_s=100.0)  # liveness 3 s
    ready(s, b"w1", 0.0)
    ready(s, b"w2", 0.0)
    s.on_client([b"admin", *p.encode_request(b"sweep", p.GC_SWEEP, [b"m"])], 0.0)
    ((sweeper, job_id, _),) = take_jobs(s)
    s.on_worker([b"w1" if sweeper == b"w2" else b"w2", *p.HEARTBEAT_MESSAGE], 40.0)
    s.tick(50.0)
    assert sweeper in s.workers and s.counters.get("jobs.redispatched", 0) == 0
    answer(s, sweeper, job_id, [b'{"count":1}'], 60.0)
    assert replies(s)[0].status == p.OK
    s.tick(62.0)
    assert sweeper in s.workers  # normal liveness again from its last message (60 s)
    s.tick(63.5)
    assert sweeper not in s.workers


def test_shutdown_answers_pending_requests():
    s = make()
    ready(s, b"w1")
    s.on_client(get_request(b"c", b"r", [["a"]]), 0.0)
    s.shutdown(1.0)
    (reply,) = replies(s)
    assert reply.status == p.E_UNAVAILABLE
    assert [b"w1", *p.DISCONNECT_MESSAGE] in s.to_workers


def test_small_jobs_of_several_clients_are_merged_into_one_request():
    s = make(merge_items=1000)
    ready(s, b"w1")
    s.on_client(get_request(b"first", b"r", [["f"]]), 0.0)  # w1 is busy with this one
    for c in (b"a", b"b", b"c"):
        s.on_client(get_request(c, b"r", [[c.decode()], [c.decode() + "2"]]), 0.0)
    ((_, _, (job0,)),) = take_messages(s)
    answer(s, b"w1", job0[0], echo_reply(job0[1]))
    ((worker, command, jobs),) = take_messages(s)
    # Every queued chunk in one REQUEST, in fair order: each client's first, then its second.
    assert command == p.GET
    assert [body[1] for _, body in jobs][:3] == [b"a", b"b", b"c"]
    assert [body[1] for _, body in jobs][3:] == [b"a2", b"b2", b"c2"]
    assert s.counters["jobs.merged"] == 6
    s.on_worker([b"w1", *p.encode_results([(j, p.OK, echo_reply(b)) for j, b in jobs])], 0.1)
    got = {frames[0]: p.decode_reply(frames[1:]).body for frames in s.to_clients}
    assert got[b"a"] == [b"a", b"a2"] and got[b"c"] == [b"c", b"c2"]


def test_one_clients_queued_reports_share_one_worker_request():
    """A gateway's connections share one client: their reports, queued behind the write in
    flight, go to a worker together (one transaction), not one REQUEST each."""
    s = make(merge_items=1000)
    ready(s, b"w1")
    for n in range(5):
        body = [b"m", b"t%d" % n, b"o", b"u" * 8, b"{}"]
        s.on_client([b"gateway", *p.encode_request(b"r%d" % n, p.REPORT, body)], 0.0)
    ((_, command, first),) = take_messages(s)
    assert command == p.REPORT and len(first) == 1  # the first went alone: nothing else queued yet
    s.on_worker([b"w1", *p.encode_results([(j, p.OK, [b"u" * 8]) for j, _ in first])], 0.1)
    ((_, command, rest),) = take_messages(s)
    assert command == p.REPORT and [body[1] for _, body in rest] == [b"t1", b"t2", b"t3", b"t4"]


def test_merging_respects_the_item_budget_and_the_command():
    s = make(merge_items=5)
    ready(s, b"w1")
    s.on_client(get_request(b"first", b"r", [["f"]]), 0.0)
    s.on_client(get_request(b"a", b"r", [["1", "2", "3"]]), 0.0)
    s.on_client(get_request(b"b", b"r", [["4", "5", "6"]]), 0.0)  # would exceed 5 items
    s.on_client([b"c", *p.encode_request(b"r", p.PING)], 0.0)
    ((_, _, (job0,)),) = take_messages(s)
    answer(s, b"w1", job0[0], echo_reply(job0[1]))
    sizes = []
    while True:
        messages = take_messages(s)
        if not messages:
            break
        ((_, command, jobs),) = messages
        sizes.append((command, len(jobs)))
        s.on_worker(
            [
                b"w1",
                *p.encode_results([(j, p.OK, echo_reply(b) if command == p.GET else []) for j, b in jobs]),
            ],
            0.1,
        )
    assert sorted(sizes) == [(p.GET, 1), (p.GET, 1), (p.PING, 1)]


def test_a_merged_request_lost_with_its_worker_is_redispatched_whole():
    s = make(merge_items=1000)
    ready(s, b"w1")
    ready(s, b"w2")
    s.on_client(get_request(b"x", b"r", [["x"]]), 0.0)
    s.on_client(get_request(b"y", b"r", [["y"]]), 0.0)
    (m1, m2) = take_messages(s)  # one job each, on two workers
    s.on_client(get_request(b"a", b"r", [["a"]]), 0.0)
    s.on_client(get_request(b"b", b"r", [["b"]]), 0.0)
    s.on_worker([m1[0], *p.encode_results([(j, p.OK, echo_reply(b)) for j, b in m1[2]])], 0.1)
    ((victim, _, merged),) = take_messages(s)
    assert len(merged) == 2
    s.on_worker([victim, *p.DISCONNECT_MESSAGE], 0.2)
    s.on_worker([m2[0], *p.encode_results([(j, p.OK, echo_reply(b)) for j, b in m2[2]])], 0.3)
    ((_, _, again),) = take_messages(s)
    assert sorted(b[1] for _, b in again) == [b"a", b"b"]


def test_a_client_coming_back_with_its_next_wave_does_not_jump_the_queue():
    """Runqueue waves: a client whose wave was answered sends the next one at once. It must
    not overtake clients whose waves are still waiting (no starvation)."""
    s = make()
    ready(s, b"w1")
    for c in (b"a", b"b", b"c", b"d"):
        s.on_client(get_request(c, b"w0", [[c.decode()] * 10]), 0.0)
    served = []
    for step in range(16):
        (job,) = take_jobs(s)
        client = s.jobs[job[1]].request.client_id
        served.append(client)
        answer(s, b"w1", job[1], echo_reply(job[2]))
        wave = [[f"{client.decode()}{step}"] * 10]
        s.on_client(get_request(client, b"w%d" % (step + 1), wave), 0.0)  # next wave
    # Every client gets one wave per round; nobody waits two rounds.
    assert all(sorted(served[i : i + 4]) == [b"a", b"b", b"c", b"d"] for i in range(0, 16, 4)), served


def test_fair_share_is_by_items_not_by_messages():
    s = make()
    ready(s, b"w1")
    s.on_client(get_request(b"big", b"r", [["x"] * 100] * 5), 0.0)  # 5 chunks of 100 items
    s.on_client(get_request(b"small", b"r", [["y"]] * 50), 0.0)  # 50 chunks of 1 item
    order = []
    while True:
        jobs = take_jobs(s)
        if not jobs:
            break
        (job,) = jobs
        order.append(s.jobs[job[1]].request.client_id)
        answer(s, b"w1", job[1], echo_reply(job[2]))
    # After big's first 100-item chunk, small runs 100 items' worth of chunks first.
    assert order[0] == b"big"
    assert order[1:51] == [b"small"] * 50


def report_request(client_id, request_id):
    body = [M, b"1" * 64, b"2" * 64, b"3" * 64]
    return [client_id, *p.encode_request(request_id, p.REPORT, body)]


def test_one_write_request_in_flight_reads_go_around_it():
    s = make()
    ready(s, b"w1")
    ready(s, b"w2")
    s.on_client(report_request(b"a", b"r"), 0.0)
    s.on_client(report_request(b"b", b"r"), 0.0)
    s.on_client(get_request(b"c", b"r", [["x"]]), 0.0)
    first = take_messages(s)
    # w1 writes a's report; w2 takes c's lookup, not b's report (a second writer would wait
    # on SQLite's lock), although b's report is older.
    assert [(w, cmd) for w, cmd, _ in first] == [(b"w1", p.REPORT), (b"w2", p.GET)]
    ((_, _, ((job_a, _),)), (_, _, ((job_c, body_c),))) = first
    answer(s, b"w2", job_c, echo_reply(body_c))
    assert take_messages(s) == []  # b still waits for the write in flight
    answer(s, b"w1", job_a, [b"3" * 64])
    ((worker, command, jobs),) = take_messages(s)
    assert command == p.REPORT and len(jobs) == 1


def test_the_write_slot_is_freed_when_its_worker_is_lost():
    s = make()
    ready(s, b"w1")
    ready(s, b"w2")
    s.on_client(report_request(b"a", b"r"), 0.0)
    s.on_client(report_request(b"b", b"r"), 0.0)
    ((writer, _, _),) = take_messages(s)
    s.on_worker([writer, *p.DISCONNECT_MESSAGE], 0.1)
    ((other, command, jobs),) = take_messages(s)
    assert other != writer and command == p.REPORT  # a's report, re-dispatched


def ready_on(s, worker_id, db_id, now=0.0):
    info = {"name": worker_id.decode(), "pid": 1, "db_id": db_id}
    s.on_worker([worker_id, *p.encode_ready(info)], now)


def test_on_a_database_server_each_worker_writes_and_nothing_is_cached():
    """Workers on PostgreSQL (their identity says so): writes go to every worker at once,
    and the broker caches nothing (another broker may write or delete any mapping)."""
    s = make(cache_entries=100)
    for w in (b"w1", b"w2", b"w3"):
        ready_on(s, w, "postgresql:7:16384:hq:public")
    assert s.shared_db and s.cache.max_entries == 0
    for client in (b"a", b"b", b"c"):
        s.on_client(report_request(client, b"r"), 0.0)
    sent = take_messages(s)
    assert sorted(w for w, cmd, _ in sent if cmd == p.REPORT) == [b"w1", b"w2", b"w3"]
    s.on_client(get_request(b"d", b"g", [["x"]]), 0.0)
    assert take_messages(s) == []  # every worker holds a write: the lookup waits for a credit
    for w, _, ((job_id, _),) in sent:
        answer(s, w, job_id, [b"3" * 64])
    (w, cmd, ((job, body),)) = take_messages(s)[0]
    answer(s, w, job, echo_reply(body))
    s.on_client(get_request(b"d", b"g2", [["x"]]), 0.0)
    assert [cmd for _, cmd, _ in take_messages(s)] == [p.GET]  # asked again: not cached


def test_workers_on_a_file_keep_one_writer_and_the_cache():
    s = make(cache_entries=100)
    for w in (b"w1", b"w2"):
        ready_on(s, w, "2049:1234:1")
    assert not s.shared_db and s.cache.max_entries == 100 and s.max_writers == 1


def ready_read_only(s, worker_id, now=0.0):
    info = {"name": worker_id.decode(), "pid": 2, "read_only": True}
    s.on_worker([worker_id, *p.encode_ready(info)], now)


def test_a_read_only_worker_is_given_no_writes_while_one_that_writes_is_there(caplog):
    """hq-worker --read-only under a broker that writes: reports skip it, even when its slot
    is the first free one, and lookups still go to it."""
    s = make(cache_entries=100)
    ready_read_only(s, b"ro")
    ready(s, b"rw")
    assert "runs --read-only under a broker that writes" in caplog.text
    for client in (b"a", b"b"):
        s.on_client(get_request(client, b"g", [["x"]]), 0.0)
    assert sorted(w for w, cmd, _ in take_messages(s)) == [b"ro", b"rw"]  # both serve lookups
    s = make(cache_entries=100)
    ready_read_only(s, b"ro")
    ready(s, b"rw")
    s.on_client(report_request(b"a", b"r"), 0.0)  # "ro" holds the first free slot
    ((writer, command, ((job_id, _),)),) = take_messages(s)
    assert (writer, command) == (b"rw", p.REPORT)
    s.on_client(get_request(b"b", b"g", [["x"]]), 0.0)  # the passed slot is still free
    assert [(w, cmd) for w, cmd, _ in take_messages(s)] == [(b"ro", p.GET)]
    answer(s, b"rw", job_id, [b"3" * 64])
    s.on_client(report_request(b"c", b"r"), 0.0)
    assert [(w, cmd) for w, cmd, _ in take_messages(s)] == [(b"rw", p.REPORT)]
    stats = s.stats(0.0)["workers"]
    assert sorted((w["name"], w["read_only"]) for w in stats) == [("ro", True), ("rw", False)]


def test_the_admin_user_set_up_at_start_waits_for_a_worker_that_writes():
    s = make()
    s.bootstrap_admin("admin", "sha256:x")
    ready_read_only(s, b"ro")
    assert take_messages(s) == []  # (it would store it, perhaps in another file)
    ready(s, b"rw")
    assert [(w, cmd) for w, cmd, _ in take_messages(s)] == [(b"rw", p.ADMIN_BOOTSTRAP)]


def test_with_only_read_only_workers_writes_still_go_to_them():
    """None writes: the write is not held forever; the worker answers it with its refusal."""
    s = make()
    ready_read_only(s, b"ro")
    s.on_client(report_request(b"a", b"r"), 0.0)
    assert [(w, cmd) for w, cmd, _ in take_messages(s)] == [(b"ro", p.REPORT)]


def test_the_cache_is_off_while_a_read_only_worker_is_registered():
    """It takes no lock on the file: another broker may be writing it, unseen."""
    s = make(cache_entries=100)
    ready(s, b"rw")
    assert s.cache.max_entries == 100
    ready_read_only(s, b"ro")
    assert s.cache.max_entries == 0 and s.max_writers == 1
    s.on_worker([b"ro", *p.DISCONNECT_MESSAGE], 0.1)
    assert s.cache.max_entries == 100
    ro_broker = make(cache_entries=100, read_only=True)  # a mirror: no cache anyway
    ready_read_only(ro_broker, b"ro")
    assert ro_broker.cache.max_entries == 0


# --- identical lookups of several clients: one job (Scheduler._collapse) -----------------------
WAVE = ["%064x" % i for i in range(5)]


def busy_worker(s):
    """One worker, kept busy with a lookup of its own, so that what follows stays queued."""
    ready(s, b"w1")
    s.on_client(get_request(b"other", b"r", [["f" * 64]]), 0.0)
    ((_, job_id, body),) = take_jobs(s)
    return job_id, body


def test_identical_queued_lookups_of_several_clients_run_once():
    s = make()
    held = busy_worker(s)
    for client in (b"a", b"b", b"c"):
        s.on_client(get_request(client, b"r", [WAVE]), 0.0)
    answer(s, b"w1", held[0], echo_reply(held[1]))
    replies(s)
    jobs = take_jobs(s)
    assert len(jobs) == 1 and s.counters["jobs.collapsed"] == 2
    answer(s, b"w1", jobs[0][1], echo_reply(jobs[0][2]))
    got = replies(s)
    assert sorted(r.request_id for r in got) == [b"r"] * 3
    assert all(r.status == p.OK and r.body == [p.pack_items(WAVE)] for r in got)


def test_a_lookup_arriving_after_the_identical_one_was_dispatched_runs_again():
    s = make()
    ready(s, b"w1")
    s.on_client(get_request(b"a", b"r", [WAVE]), 0.0)
    (first,) = take_jobs(s)
    s.on_client(get_request(b"b", b"r", [WAVE]), 0.0)  # the first may have read already: no
    answer(s, b"w1", first[1], echo_reply(first[2]))
    assert len(take_jobs(s)) == 1 and "jobs.collapsed" not in s.counters


def test_followers_are_answered_when_the_leaders_own_request_is_gone():
    s = make(request_timeout_s=1.0)
    held = busy_worker(s)
    s.on_client(get_request(b"a", b"r", [WAVE]), 0.0)
    s.on_client(get_request(b"b", b"r", [WAVE]), 0.5)
    s.on_worker([b"w1", *p.HEARTBEAT_MESSAGE], 1.2)
    s.tick(1.2)  # a's request (and the held one) time out; b's has 0.3 s left
    assert sorted(r.request_id for r in replies(s) if r.status == p.E_UNAVAILABLE) == [b"r", b"r"]
    answer(s, b"w1", held[0], echo_reply(held[1]), now=1.2)
    (job,) = take_jobs(s)  # a's job still runs, for b
    answer(s, b"w1", job[1], echo_reply(job[2]), now=1.3)
    (reply,) = replies(s)
    assert reply.status == p.OK and reply.body == [p.pack_items(WAVE)]


def test_followers_survive_the_loss_of_the_leaders_worker():
    s = make(max_attempts=2)
    held = busy_worker(s)
    s.on_client(get_request(b"a", b"r", [WAVE]), 0.0)
    s.on_client(get_request(b"b", b"r", [WAVE]), 0.0)
    answer(s, b"w1", held[0], echo_reply(held[1]))
    replies(s)
    take_jobs(s)
    s.on_worker([b"w1", *p.DISCONNECT_MESSAGE], 0.1)  # lost once: re-dispatched
    ready(s, b"w2", 0.1)
    (job,) = take_jobs(s)
    s.on_client(get_request(b"c", b"r", [WAVE]), 0.1)  # dispatched again: c gets its own job
    s.on_worker([b"w2", *p.DISCONNECT_MESSAGE], 0.2)  # lost twice: given up, for all of them
    got = replies(s)
    assert sorted(r.request_id for r in got if r.status == p.E_INTERNAL) == [b"r", b"r"]
