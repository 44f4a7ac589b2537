"""The broker's side of --upstream without sockets: the scheduler's questions to the agent,
their deadlines, what an answer changes, and what is backfilled (the agent's answers are
given by hand here; the agent itself meets real upstreams in tests/integration)."""

import json

import pytest

from hq import addresses, options
from hq import protocol as p
from hq.broker import upstream as upstream_stage
from hq.broker.scheduler import Scheduler
from hq.broker.upstream import UpstreamStage

M = b"TestMethod"
QUIET = upstream_stage.BACKFILL_QUIET_S  # after the upstream's last answer, backfills wait this
T1, T2 = b"1" * 40, b"2" * 40
U1, U2 = "d" * 64, "e" * 64


def make(**kw):
    kw.setdefault("heartbeat_interval_s", 1.0)
    kw.setdefault("request_timeout_s", 10.0)
    kw.setdefault("upstream", "127.0.0.1:1")
    kw.setdefault("upstream_timeout_s", 2.0)
    return Scheduler(options.namespace(options.BROKER, **kw))


def ready(s, worker_id=b"w1", now=0.0):
    s.on_worker([worker_id, *p.encode_ready({"name": worker_id.decode(), "pid": 1})], now)


def jobs(s):
    out = []
    for frames in s.to_workers:
        if frames[2] == p.REQUEST:
            command, _, batch = p.decode_broker_message(frames[1:])[1]
            out += [(command, job_id, body) for job_id, body in batch]
    s.to_workers.clear()
    return out


def answer(s, job_id, body, now=0.0):
    s.on_worker([b"w1", *p.encode_job_reply(job_id, p.OK, body)], now)


def questions(s):
    """(id, kind, question) of each question for the agent: lookups as [[method, taskhash],
    ...] from their packed frames, the others from their JSON."""
    out = []
    for frames in s.upstream.outbox:
        if frames[1] == b"get":  # method, LF-joined taskhashes, pair after pair
            pairs = zip(frames[2::2], frames[3::2])
            asked = [[m.decode(), t.decode()] for m, chunk in pairs for t in chunk.split(b"\n")]
        else:
            asked = json.loads(frames[2])
        out.append((frames[0], frames[1], asked))
    s.upstream.outbox.clear()
    return out


def unihashes(*values) -> bytes:
    """The agent's packed answer to a lookup question: LF-joined, empty for a miss."""
    return b"\n".join((v or "").encode() for v in values)


def replies(s):
    out = [p.decode_reply(frames[1:]) for frames in s.to_clients]
    s.to_clients.clear()
    return out


def lookup(s, taskhashes, now=0.0):
    s.on_client([b"c1", *p.encode_request(b"r1", p.GET, [M, b"\n".join(taskhashes)])], now)
    ((command, job_id, body),) = jobs(s)
    assert command == p.GET
    return job_id


def test_only_misses_go_upstream_and_its_hits_are_answered_then_backfilled():
    s = make()
    ready(s)
    job = lookup(s, [T1, T2])
    answer(s, job, [b"\n" + U2.encode()])  # T1 a miss, T2 a hit
    ((qid, kind, asked),) = questions(s)
    assert kind == b"get" and asked == [[M.decode(), T1.decode()]]
    s.on_upstream([qid, b"ok", unihashes(U1)], 0.1)
    (reply,) = replies(s)
    assert reply.status == p.OK and p.unpack_unihashes(reply.body[0], 2) == [U1, U2]
    s.tick(0.1 + QUIET)
    ((command, _, body),) = jobs(s)  # the backfill, off the reply path: packed as a GET chunk
    assert command == p.BACKFILL
    assert body == [M, T1, U1.encode()]
    assert s.counters["upstream.hits"] == 1 and s.stats(0.2)["broker"]["upstream"]["backfill_pending"] == 1


def test_the_upstreams_hits_land_in_place_in_chunks_missed_whole_or_in_part():
    T3, T4, U3 = b"3" * 40, b"4" * 40, "f" * 64
    s = make()
    ready(s)
    s.on_client([b"c1", *p.encode_request(b"r1", p.GET, [M, T1 + b"\n" + T2, M, T3 + b"\n" + T4])], 0.0)
    local = {T1 + b"\n" + T2: b"\n", T3 + b"\n" + T4: b"\n" + U2.encode()}  # T4 known here
    while pending := jobs(s):  # a chunk a job, one at a time on the one worker
        for _, job_id, body in pending:
            answer(s, job_id, [local[chunk] for chunk in body[1::2]])
    ((qid, _, asked),) = questions(s)
    assert asked == [[M.decode(), t.decode()] for t in (T1, T2, T3)]
    s.on_upstream([qid, b"ok", unihashes(U1, None), unihashes(U3)], 0.1)
    (reply,) = replies(s)
    assert [p.unpack_unihashes(chunk, 2) for chunk in reply.body] == [[U1, None], [U3, U2]]
    backfilled = []
    for now in (0.1 + QUIET, 0.2 + QUIET, 0.3 + QUIET):  # the backfills, one at a time
        s.tick(now)
        for command, job_id, body in jobs(s):
            assert command == p.BACKFILL
            backfilled.append(body)
            answer(s, job_id, [b"1"], now)
    assert backfilled == [[M, T1 + b"\n" + T3, (U1 + "\n" + U3).encode()]], backfilled
    assert s.counters["upstream.hits"] == 2 and s.counters["upstream.misses"] == 1


def test_a_backfill_waits_for_a_worker_longer_than_a_clients_request():
    """Backfills queue behind the burst that made them; one that expired with a client's
    timeout would be lost, and its lookups asked of the upstream again."""
    s = make(request_timeout_s=10.0, admin_request_timeout_s=600.0)
    ready(s)
    answer(s, lookup(s, [T1]), [b""])
    ((qid, _, _),) = questions(s)
    s.on_upstream([qid, b"ok", unihashes(U1)], 0.1)
    assert [r.status for r in replies(s)] == [p.OK]
    s.tick(0.1 + QUIET)
    ((command, _, _),) = jobs(s)  # with the worker, which is slow to answer
    assert command == p.BACKFILL
    for now in (11.0, 300.0):
        s.on_worker([b"w1", *p.HEARTBEAT_MESSAGE], now)
        s.tick(now)
        assert s.stats(now)["broker"]["upstream"]["backfill_pending"] == 1
        assert "upstream.backfill_failed" not in s.counters


def test_no_miss_no_question():
    s = make()
    ready(s)
    answer(s, lookup(s, [T1]), [U1.encode()])
    assert questions(s) == [] and [r.status for r in replies(s)] == [p.OK]


def test_an_upstream_that_times_out_or_errs_leaves_the_local_answer():
    for outcome in ("timeout", "error", "garbage", "a wrong shape", "a bad unihash"):
        s = make()
        ready(s)
        answer(s, lookup(s, [T1]), [b""])
        ((qid, _, _),) = questions(s)
        if outcome == "timeout":
            s.tick(1.9)
            assert replies(s) == []
            s.tick(2.0)
            s.on_upstream([qid, b"ok", unihashes(U1)], 2.1)  # late: dropped
        elif outcome == "error":
            s.on_upstream([qid, b"error", b"refused"], 0.1)
        elif outcome == "garbage":
            s.on_upstream([qid, b"ok", b"{not json"], 0.1)
        elif outcome == "a wrong shape":
            s.on_upstream([qid, b"ok", unihashes(U1, U2)], 0.1)
        else:
            s.on_upstream([qid, b"ok", unihashes("x" * 64)], 0.1)
        (reply,) = replies(s)
        assert reply.status == p.OK and p.unpack_unihashes(reply.body[0], 1) == [None], outcome
        s.tick(2.2)
        assert jobs(s) == [], f"{outcome}: nothing to backfill"


def test_a_report_waits_for_the_upstream_and_takes_its_unihash():
    s = make()
    ready(s)
    body = [M, T2, b"a" * 64, U2.encode()]
    s.on_client([b"c1", *p.encode_request(b"r1", p.REPORT, body)], 0.0)
    assert jobs(s) == []  # not before the upstream has answered
    ((qid, kind, asked),) = questions(s)
    assert kind == b"outhash" and asked == [M.decode(), "a" * 64, T2.decode()]
    s.on_upstream([qid, b"ok", json.dumps({"unihash": U1, "outhash": "a" * 64}).encode()], 0.1)
    s.tick(0.1)
    ((command, _, job_body),) = jobs(s)
    assert command == p.REPORT and job_body[3] == U1.encode() and job_body[:3] == body[:3]


def test_a_report_goes_on_unchanged_when_the_upstream_does_not_know_or_does_not_answer():
    for outcome in (b"null", None):
        s = make()
        ready(s)
        body = [M, T2, b"a" * 64, U2.encode()]
        s.on_client([b"c1", *p.encode_request(b"r1", p.REPORT, body)], 0.0)
        ((qid, _, _),) = questions(s)
        if outcome is None:
            s.tick(2.0)
        else:
            s.on_upstream([qid, b"ok", outcome], 0.1)
        s.tick(2.0)
        ((command, _, job_body),) = jobs(s)
        assert command == p.REPORT and job_body == body


def test_with_an_upstream_the_cache_keeps_no_miss():
    s = make(cache_entries=100)
    ready(s)
    job = lookup(s, [T1])
    answer(s, job, [b""])
    ((qid, _, _),) = questions(s)
    s.on_upstream([qid, b"ok", b"[null]"], 0.1)
    replies(s)
    lookup(s, [T1], now=0.2)  # a job for a worker again (lookup() checks), not a cached miss


def test_questions_expire_in_order_and_late_answers_are_dropped():
    stage = UpstreamStage(1.0)
    seen = []
    stage.ask(b"get", [], 0.0, lambda r, e, now: seen.append(("a", r, e)))
    stage.ask(b"get", [], 0.5, lambda r, e, now: seen.append(("b", r, e)))
    assert stage.next_deadline() == 1.0
    assert stage.expire(1.0) == 1 and seen == [("a", None, "timeout")]
    (qa, _, _), (qb, _, _) = stage.outbox
    assert stage.on_answer([qa, b"ok", b"[]"], 1.1) is None  # late
    assert stage.on_answer([qb, b"ok", b"[]"], 1.2) == (pytest.approx(0.7), None)
    assert seen[-1] == ("b", [], None)


def test_an_upstream_address_with_a_password_is_not_shown():
    assert addresses.redacted("wss://bob:secret@hash.example.com:443/x") == "wss://***@hash.example.com:443/x"
    assert addresses.redacted("hash.example.com:8686") == "hash.example.com:8686"
    # a password holding an @ (the URL parser reads up to the last one): none of it shown
    assert addresses.redacted("ws://bob:p@ss@hash.example.com:1/x@y") == "ws://***@hash.example.com:1/x@y"
    s = make(upstream="ws://bob:secret@127.0.0.1:1")
    assert "secret" not in json.dumps(s.stats(0.0))


def test_a_backfill_refused_for_a_full_queue_answers_nobody():
    """The broker's own backfill requests have no client: a BUSY for one must not become a
    message to a client id None (the socket loop could not send it)."""
    s = make(max_queued_jobs=1)
    ready(s)
    job = lookup(s, [T1])
    answer(s, job, [b""])
    ((qid, _, _),) = questions(s)
    s.on_client([b"c2", *p.encode_request(b"r2", p.GET, [M, T2])], 0.0)  # the worker takes it
    ((_, held, _),) = jobs(s)
    s.on_client([b"c3", *p.encode_request(b"r3", p.GET, [M, b"3" * 40])], 0.0)  # queued: full
    s.on_upstream([qid, b"ok", unihashes(U1)], 0.1)
    assert all(frames[0] is not None for frames in s.to_clients)
    assert [r.status for r in replies(s)] == [p.OK]  # c1's answer, the upstream's unihash
    s.tick(0.1 + QUIET)
    assert s.counters["upstream.backfill_failed"] == 1
    assert s.stats(0.2 + QUIET)["broker"]["upstream"]["backfill_pending"] == 0


def test_what_arrives_while_a_backfill_waits_goes_in_the_next_one(monkeypatch):
    """Backfills are written thousands of mappings at a time: while one waits in the queue,
    the upstream's later answers gather, and go together in the next."""
    monkeypatch.setattr(upstream_stage, "BACKFILL_HOLD_S", 0.0)  # not held for the lookups
    s = make()
    ready(s)
    taskhashes = [b"%040x" % i for i in range(5)]
    asked = []
    for n, taskhash in enumerate(taskhashes):
        s.on_client([b"c1", *p.encode_request(b"r%d" % n, p.GET, [M, taskhash])], 0.0)
        ((_, job_id, _),) = jobs(s)
        answer(s, job_id, [b""])
        ((qid, _, _),) = questions(s)
        asked.append(qid)
    for qid, unihash in zip(asked, (U1, U2, U1, U2, U1)):
        s.on_upstream([qid, b"ok", unihashes(unihash)], 0.1)
    assert [r.status for r in replies(s)] == [p.OK] * 5
    assert s.stats(0.1)["broker"]["upstream"]["backfill_pending"] == 2  # one queued, one to come
    s.tick(0.1)
    ((command, first, body),) = jobs(s)
    assert command == p.BACKFILL and body == [M, taskhashes[0], U1.encode()]
    s.tick(0.1)  # the first is with the worker (writes one at a time): the next is queued
    assert jobs(s) == []
    answer(s, first, [b"1"], 0.2)
    s.tick(0.2)
    ((command, second, body),) = jobs(s)
    assert body == [M, b"\n".join(taskhashes[1:]), b"\n".join(u.encode() for u in (U2, U1, U2, U1))]
    answer(s, second, [b"4"], 0.3)
    assert s.counters["upstream.backfilled"] == 5
    assert s.stats(0.3)["broker"]["upstream"]["backfill_pending"] == 0


def test_the_backfill_buffer_is_bounded(monkeypatch):
    """With the writer stuck, mappings beyond the bound are not held (they are asked of the
    upstream again next time), and counted."""
    monkeypatch.setattr(upstream_stage, "MAX_BUFFERED_ROWS", 3)
    buffer = upstream_stage.BackfillBuffer()
    assert buffer.add(M, [T1, T2], [b"u1", b"u2"], 0.0) == 0
    assert buffer.add(M, [b"t3", b"t4"], [b"u3", b"u4"], 0.0) == 1
    assert buffer.add(b"other", [b"t5"], [b"u5"], 0.0) == 1 and buffer.rows == 3
    assert buffer.take(2) == ([M, T1 + b"\n" + T2, b"u1\nu2"], 2)
    assert buffer.take() == ([M, b"t3", b"u3"], 1) and buffer.take() is None and buffer.rows == 0


def test_a_malformed_answer_to_a_backfill_is_counted_not_fatal():
    s = make()
    ready(s)
    answer(s, lookup(s, [T1]), [b""])
    ((qid, _, _),) = questions(s)
    s.on_upstream([qid, b"ok", unihashes(U1)], 0.1)
    replies(s)
    s.tick(0.1 + QUIET)
    ((command, job_id, _),) = jobs(s)
    assert command == p.BACKFILL
    answer(s, job_id, [b"lots"], now=0.2)
    assert s.counters["upstream.backfill_failed"] == 1
    assert s.stats(0.3)["broker"]["upstream"]["backfill_pending"] == 0


def two_misses_asked():
    """A scheduler with two lookups' misses (T1, then T2) waiting on the upstream; their
    question ids."""
    s = make(upstream_timeout_s=100.0, request_timeout_s=100.0)
    ready(s)
    asked = []
    for client, taskhash in ((b"c1", T1), (b"c2", T2)):
        s.on_client([client, *p.encode_request(b"r", p.GET, [M, taskhash])], 0.0)
        ((_, job_id, _),) = jobs(s)
        answer(s, job_id, [b""])
        ((qid, _, _),) = questions(s)
        asked.append(qid)
    return s, asked


def test_backfills_wait_while_lookups_wait_on_the_upstream():
    """Writing backfills takes the CPUs that the burst still waiting on the upstream needs:
    they are held while lookups wait on it."""
    s, (first, second) = two_misses_asked()
    s.on_upstream([first, b"ok", unihashes(U1)], 0.1)
    s.tick(0.1)
    assert jobs(s) == []  # the second lookup still waits on the upstream
    assert s.stats(0.1)["broker"]["upstream"]["backfill_pending"] == 1
    s.on_upstream([second, b"ok", unihashes(U2)], 0.2)
    s.tick(0.2)
    assert jobs(s) == []  # nothing waits now, but the burst may go on: held a moment more
    assert 0 < s.next_wakeup(0.2) <= QUIET  # the hold's end wakes the broker
    s.tick(0.2 + QUIET)
    ((command, _, body),) = jobs(s)  # quiet since: both in one write
    assert command == p.BACKFILL and body == [M, T1 + b"\n" + T2, (U1 + "\n" + U2).encode()]


def test_the_backfills_held_go_once_the_buffer_is_three_quarters_full(monkeypatch):
    monkeypatch.setattr(upstream_stage, "MAX_BUFFERED_ROWS", 4)
    s, (first, _) = two_misses_asked()
    s.on_upstream([first, b"ok", unihashes(U1)], 0.1)
    s.tick(0.1)
    assert jobs(s) == []  # the second lookup waits on the upstream: held
    s.backfill_buffer.add(M, [b"t2", b"t3"], [b"u2", b"u3"], 0.1)  # 3 of 4 held
    s.tick(0.1)
    ((command, _, body),) = jobs(s)
    assert command == p.BACKFILL and body == [M, T1 + b"\nt2\nt3", U1.encode() + b"\nu2\nu3"]


def test_backfills_are_held_at_most_the_hold_time():
    """However long the upstream keeps lookups waiting, a backfill waits BACKFILL_HOLD_S."""
    s, (first, _) = two_misses_asked()
    s.on_upstream([first, b"ok", unihashes(U1)], 1.0)
    hold = upstream_stage.BACKFILL_HOLD_S
    for now in (1.0 + hold - 0.01, 1.0 + hold):
        s.on_worker([b"w1", *p.HEARTBEAT_MESSAGE], now)  # the worker stays alive meanwhile
        s.tick(now)
        if now < 1.0 + hold:
            assert jobs(s) == []
    ((command, _, body),) = jobs(s)
    assert command == p.BACKFILL and body == [M, T1, U1.encode()]


def test_a_reports_question_to_the_upstream_does_not_hold_the_backfills():
    """Only lookups waiting on the upstream hold backfills: the get-outhash asked before each
    report does not (a build reporting for minutes would hold them BACKFILL_HOLD_S)."""
    s = make(upstream_timeout_s=100.0, request_timeout_s=100.0)
    ready(s)
    answer(s, lookup(s, [T1]), [b""])
    ((qid, _, _),) = questions(s)
    s.on_upstream([qid, b"ok", unihashes(U1)], 0.1)
    replies(s)
    s.on_client([b"c2", *p.encode_request(b"r2", p.REPORT, [M, T2, b"a" * 64, U2.encode()])], 0.2)
    ((_, kind, _),) = questions(s)
    assert kind == b"outhash" and s.upstream.waiting  # the report's question waits
    s.tick(0.1 + QUIET)
    ((command, _, body),) = jobs(s)
    assert command == p.BACKFILL and body == [M, T1, U1.encode()]
