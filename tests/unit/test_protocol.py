"""The wire protocol as pure functions: round trips, every malformed input, and a decoder fuzz.

No sockets. Body values are checked where the workers check them, through
:class:`~hq.workers.handlers.Handlers` on a real SQLite store. The fuzz runs 2 x 1000
examples by default; set ``HQ_FUZZ_EXAMPLES`` for a longer run (E1 asks for 10k+).
"""

from __future__ import annotations

import json
import os
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hq import options
from hq import protocol as p
from hq.broker.scheduler import Scheduler
from hq.workers.handlers import Handlers
from hq.workers.schema import open_database
from hq.workers.store import Store

M = "TestMethod"
T1 = "35788efcb8dfb0a02659d81cf2bfd695fb30faf9"
T2 = "3bf6f1e89d26205aec90da04854fbdbf73afe6b4"
O1 = "2765d4a5884be49b28601445c2760c5f21e7e5c0ee2b7e3fce98fd7e5970796f"
U1 = "a69ec97f5af2e21e1a1f9cc8896965515d5559425666f734e245a3d40cee33d9"
U2 = "bf6e81926066f770e960f9f777cd088c62bea9addb7745f3e77deaa81a645747"
RID = b"r-1"

#: The error codes a malformed request may get: the caller's fault, never the server's.
REFUSALS = frozenset(
    {p.E_BAD_REQUEST, p.E_UNAUTHORIZED, p.E_UNKNOWN_COMMAND, p.E_TOO_LARGE, p.E_INVALID, p.E_VERSION}
)

#: The reference tests' invalid unihashes (bitbake lib/hashserv/tests.py).
INVALID_UNIHASHES = ["${@os.system('true')}", "a" * 63, "a" * 65, "A" * 64, ""]


def b(text: str) -> bytes:
    return text.encode("utf-8")


def valid_body(command: bytes) -> list:
    """A well-formed body for each client command."""
    return {
        p.PING: [],
        p.GET: [b(M), p.pack_items([T1, T2])],
        p.GET_FULL: [b(M), b(T1)],
        p.GET_OUTHASH: [b(M), b(O1), b(T1), b"1"],
        p.REPORT: [b(M), b(T1), b(O1), b(U1)],
        p.REPORT_EQUIV: [b(M), b(T1), b(U1)],
        p.EXISTS: [p.pack_items([U1, U2])],
        p.STATS: [],
        p.RESET_STATS: [],
        p.REMOVE: [b'{"taskhash":"%s"}' % b(T1), b"1"],
        p.CLEAN_UNUSED: [b"3600"],
        p.GC_MARK: [b"m1", b'{"unihash":"%s"}' % b(U1)],
        p.GC_MARK_STREAM: [b"m1", p.pack_items(['{"unihash":"%s"}' % U1, '{"unihash":"%s"}' % U2])],
        p.GC_STATUS: [],
        p.GC_SWEEP: [b"m1"],
        p.DB_USAGE: [],
        p.QUERY_COLUMNS: [],
        p.IMPORT: [b"/srv/hashserv.db", b"unihashes_v3", b"7", b'{"id":7}'],
        p.IMPORT_STATUS: [b"/srv/hashserv.db"],
        p.AUTH: [b"admin", b"password"],
        p.BECOME_USER: [b"bob"],
        p.NEW_USER: [b"bob", b'["@read"]'],
        p.DELETE_USER: [b""],
        p.GET_USER: [b"bob"],
        p.GET_ALL_USERS: [],
        p.SET_USER_PERMS: [b"bob", b'["@read", "@report"]'],
        p.REFRESH_TOKEN: [b""],
    }[command]


def table(rows) -> list:
    """pytest params from (id, *values) rows."""
    return [pytest.param(*row[1:], id=row[0]) for row in rows]


def refused(frames: list, code: int, request_id: bytes | None) -> p.ProtocolError:
    with pytest.raises(p.ProtocolError) as info:
        p.decode_request(frames)
    assert (info.value.code, info.value.request_id) == (code, request_id), info.value.message
    return info.value


def batch(command: bytes, chunks: list) -> list:
    """A GET or EXISTS body: one chunk per list of items."""
    body = []
    for items in chunks:
        if command == p.GET:
            body.append(b(M))
        body.append(p.pack_items(items))
    return body


def items(n: int, width: int = 40) -> list:
    return [f"{i:0{width}x}" for i in range(n)]


@pytest.fixture(scope="module")
def handlers(tmp_path_factory):
    """Worker handlers on a real SQLite file (open_database sets up a module-global db)."""
    db = open_database(str(tmp_path_factory.mktemp("protocol") / "hq.db"))
    yield Handlers(Store(db))
    db.close()


# --- round trips ---------------------------------------------------------------------------


@pytest.mark.parametrize("command", sorted(p.CLIENT_COMMANDS))
def test_request_round_trip(command):
    body = valid_body(command)
    frames = p.encode_request(RID, command, body, credentials=b"token")
    assert frames[:4] == [p.CLIENT_PROTOCOL, RID, command, b"token"]
    request = p.decode_request(frames)
    assert request == p.Request(RID, command, b"token", body, p.chunk_counts(command, body))


def test_request_id_and_credentials_at_their_limits():
    rid = b"x" * p.MAX_REQUEST_ID_BYTES
    creds = b"c" * p.MAX_CREDENTIALS_BYTES
    assert p.decode_request(p.encode_request(rid, p.PING, credentials=creds)).request_id == rid
    assert p.decode_request(p.encode_request(b"1", p.PING)).request_id == b"1"


def test_report_with_extra_round_trip():
    extra = {"owner": "me", "PN": "zlib", "outhash_siginfo": "x" * 1000}
    body = [*valid_body(p.REPORT), p.encode_json(extra)]
    request = p.decode_request(p.encode_request(RID, p.REPORT, body))
    assert p.decode_json_object(request.body[4], "extra") == extra
    equiv = [*valid_body(p.REPORT_EQUIV), p.encode_json(extra)]
    assert p.decode_request(p.encode_request(RID, p.REPORT_EQUIV, equiv)).body == equiv


@pytest.mark.parametrize("status", [p.OK, *sorted(p.STATUS_NAMES)])
def test_reply_round_trip(status):
    frames = p.encode_reply(RID, status, [b"one", b"", b"three"])
    assert frames[:3] == [p.CLIENT_PROTOCOL, RID, str(status).encode()]
    assert p.decode_reply(frames) == p.Reply(RID, status, [b"one", b"", b"three"])


def test_error_round_trip_and_bound():
    reply = p.decode_reply(p.encode_error(RID, p.E_INVALID, "Invalid unihash"))
    assert (reply.request_id, reply.status, p.error_text(reply.body)) == (RID, p.E_INVALID, "Invalid unihash")
    # An unreadable envelope gets an empty request id.
    assert p.decode_reply(p.encode_error(None, p.E_BAD_REQUEST, "x")).request_id == b""
    # Long messages are cut to MAX_ERROR_BYTES, even in the middle of a character.
    for message in ("e" * 5000, "é" * 5000, "\udcff" * 10):
        frames = p.encode_error(RID, p.E_INTERNAL, message)
        assert len(frames) == 4 and len(frames[3]) <= p.MAX_ERROR_BYTES
        p.error_text(frames[3:])  # decodes, with replacement characters if cut
    assert p.error_text([]) == ""


@pytest.mark.parametrize(
    "frames",
    [
        [],
        [p.CLIENT_PROTOCOL, RID],
        [b"HQC02", RID, b"0"],
        [p.CLIENT_PROTOCOL, RID, b"ok"],
        [p.CLIENT_PROTOCOL, RID, b""],
    ],
)
def test_malformed_reply(frames):
    with pytest.raises(p.ProtocolError) as info:
        p.decode_reply(frames)
    assert info.value.code == p.E_BAD_REQUEST


def test_worker_messages_round_trip():
    info = {"name": "w1", "pid": 42, "settings": {"journal_mode": "wal"}}
    assert p.decode_worker_message(p.encode_ready(info)) == (p.READY, info)
    assert p.decode_worker_message(p.HEARTBEAT_MESSAGE) == (p.HEARTBEAT, ())
    assert p.decode_worker_message(p.DISCONNECT_MESSAGE) == (p.DISCONNECT, ())
    reply = p.encode_job_reply(b"1f", p.OK, [b"a", b"b"])
    assert p.decode_worker_message(reply) == (p.REPLY, [(b"1f", p.OK, [b"a", b"b"])])
    assert p.decode_worker_message(p.encode_job_reply(b"2", p.E_STORAGE)) == (
        p.REPLY,
        [(b"2", p.E_STORAGE, [])],
    )
    results = [(b"a", p.OK, [b"x", b""]), (b"b", p.E_INVALID, [b"Invalid unihash"]), (b"c", p.OK, [])]
    assert p.decode_worker_message(p.encode_results(results)) == (p.REPLY, results)


def test_broker_messages_round_trip():
    body = valid_body(p.REPORT)
    job = p.encode_job(b"7", p.REPORT, b"creds", body)
    assert p.decode_broker_message(job) == (p.REQUEST, (p.REPORT, b"creds", [(b"7", body)]))
    assert p.decode_broker_message(p.encode_job(b"8", p.PING, b"", [])) == (
        p.REQUEST,
        (p.PING, b"", [(b"8", [])]),
    )
    jobs = [(b"1", [b"M", b"a\nb"]), (b"2", [b"M", b"c"]), (b"3", [b"N", b""])]
    assert p.decode_broker_message(p.encode_jobs(p.GET, b"", jobs)) == (p.REQUEST, (p.GET, b"", jobs))
    assert p.decode_broker_message(p.HEARTBEAT_MESSAGE) == (p.HEARTBEAT, ())
    assert p.decode_broker_message(p.DISCONNECT_MESSAGE) == (p.DISCONNECT, ())


@pytest.mark.parametrize(
    "frames",
    [
        [],
        [p.WORKER_PROTOCOL],
        [p.CLIENT_PROTOCOL, p.HEARTBEAT],
        [b"HQW02", p.HEARTBEAT],
        [p.WORKER_PROTOCOL, b"NOPE"],
        [p.WORKER_PROTOCOL, p.REQUEST, b"1", p.PING, b""],  # brokers send REQUEST, workers don't
        [p.WORKER_PROTOCOL, p.REPLY],  # no job
        [p.WORKER_PROTOCOL, p.REPLY, b"1"],
        [p.WORKER_PROTOCOL, p.REPLY, b"1", b"0"],  # no frame count
        [p.WORKER_PROTOCOL, p.REPLY, b"1", b"ok", b"0"],  # status not a number
        [p.WORKER_PROTOCOL, p.REPLY, b"1", b"0", b"x"],  # count not a number
        [p.WORKER_PROTOCOL, p.REPLY, b"1", b"0", b"-1"],
        [p.WORKER_PROTOCOL, p.REPLY, b"1", b"0", b"2", b"only one"],  # count exceeds the message
        [p.WORKER_PROTOCOL, p.REPLY, b"1", b"0", b"0", b"2"],  # a truncated second job
        [p.WORKER_PROTOCOL, p.READY],
        [p.WORKER_PROTOCOL, p.READY, b"{not json"],
        [p.WORKER_PROTOCOL, p.READY, b"\xff"],
        [p.WORKER_PROTOCOL, p.READY, b"[1, 2]"],
        [p.WORKER_PROTOCOL, p.READY, b"{}", b"extra"],
        [p.WORKER_PROTOCOL, p.HEARTBEAT, b"extra"],
        [p.WORKER_PROTOCOL, p.DISCONNECT, b"extra"],
    ],
)
def test_malformed_worker_message(frames):
    with pytest.raises(p.ProtocolError) as info:
        p.decode_worker_message(frames)
    assert info.value.code == p.E_BAD_REQUEST


@pytest.mark.parametrize(
    "frames",
    [
        [],
        [p.WORKER_PROTOCOL],
        [p.CLIENT_PROTOCOL, p.HEARTBEAT],
        [p.WORKER_PROTOCOL, b"NOPE"],
        [p.WORKER_PROTOCOL, p.READY, b"{}"],
        [p.WORKER_PROTOCOL, p.REQUEST, p.PING, b""],  # no job
        [p.WORKER_PROTOCOL, p.REQUEST, p.PING, b"", b"1"],
        [p.WORKER_PROTOCOL, p.REQUEST, p.PING, b"", b"1", b"1"],  # count exceeds the message
        [p.WORKER_PROTOCOL, p.REQUEST, p.PING, b"", b"1", b"99999999999"],
    ],
)
def test_malformed_broker_message(frames):
    with pytest.raises(p.ProtocolError) as info:
        p.decode_broker_message(frames)
    assert info.value.code == p.E_BAD_REQUEST


# --- packed items ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "values",
    [
        [T1],
        [T1, T2, T1],
        [U1, U2],
        items(1000),
        ["not-hex", "zz", "g" * 40],
        ["ünïcödé", "日本語", "emoji 🙂", "é" * 128],
        [T1.upper(), U1.upper(), "AbCdEf"],
        [T1, "mixed", U1.upper(), "ab"],
        ["a" * p.MAX_HASH_BYTES],
        ["a", "bb", "ccc"],
    ],
)
def test_items_round_trip(values):
    frame = p.pack_items(values)
    assert p.count_items(frame) == len(values)
    assert p.unpack_items(frame) == values


@pytest.mark.parametrize("values", [["a\nb"], [T1, "x\n"], ["\n"], [T1, T2 + "\n" + T1]])
def test_pack_items_refuses_a_line_feed(values):
    with pytest.raises(ValueError):
        p.pack_items(values)


@pytest.mark.parametrize(
    "frame, code",
    [
        (b"", p.E_INVALID),  # one empty item
        (b"\n", p.E_INVALID),
        (b(T1) + b"\n", p.E_INVALID),
        (b"\n" + b(T1), p.E_INVALID),
        (b(T1) + b"\n\n" + b(T2), p.E_INVALID),
        # Hex-only frames whose total length fits "n items of equal width" but whose items
        # are not of equal width: an empty item or an over-long one must still be refused.
        (b"ab\nabcd\n", p.E_INVALID),
        (b"a" * 256 + b"\n" + b"b" + b"\n" + b"c" * 511, p.E_INVALID),
        (b"a" * (p.MAX_HASH_BYTES + 1), p.E_INVALID),
        (b"\xff\xfe", p.E_BAD_REQUEST),
        (b(T1) + b"\n\xc3", p.E_BAD_REQUEST),
        (b"a\x00b", p.E_INVALID),
        (b"a\tb", p.E_INVALID),
        (b"a\rb", p.E_INVALID),
        (b(T1) + b"\n\x7f", p.E_INVALID),
        (b("a\u2028b"), p.E_INVALID),
    ],
)
def test_unpack_items_refuses(frame, code):
    with pytest.raises(p.ProtocolError) as info:
        p.unpack_items(frame, "taskhash")
    assert info.value.code == code


def test_unihashes_round_trip_with_misses():
    cases = [[U1], [None], [U1, None, U2], [None, None, None], [None, U1], [U2, None]]
    for values in cases:
        frame = p.pack_unihashes(values)
        assert p.unpack_unihashes(frame, len(values)) == values
    assert p.pack_unihashes([None, None]) == b"\n"
    assert p.pack_unihashes([U1, None]) == b(U1) + b"\n"


@pytest.mark.parametrize(
    "frame, expected",
    [
        (b(U1), 2),
        (b(U1) + b"\n", 1),
        (b(U1[:-1]), 1),
        (b(U1.upper()), 1),
        (b(U1) + b"\n" + b"${@os.system('true')}", 2),
        (b"\xff" * 64, 1),
    ],
)
def test_unpack_unihashes_refuses(frame, expected):
    with pytest.raises(p.ProtocolError) as info:
        p.unpack_unihashes(frame, expected)
    assert info.value.code == p.E_BAD_REQUEST


def test_flags_round_trip():
    for flags in ([True], [False], [True, False, True], [False] * 1000):
        frame = p.pack_flags(flags)
        assert len(frame) == len(flags)
        assert p.unpack_flags(frame, len(flags)) == flags
    assert p.pack_flags([True, False]) == b"10"
    for value in (True, False):
        assert p.decode_flag(p.encode_flag(value), "flag") is value


@pytest.mark.parametrize("frame, expected", [(b"10", 3), (b"102", 3), (b"", 1), (b"1 ", 2), (b"tf", 2)])
def test_unpack_flags_refuses(frame, expected):
    with pytest.raises(p.ProtocolError):
        p.unpack_flags(frame, expected)


def test_json_object():
    value = {"a": 1, "b": [1, "ü"]}
    assert p.decode_json_object(p.encode_json(value), "extra") == value
    assert p.decode_json_object(b"", "extra") == {}
    big = p.encode_json({"x": "y" * p.MAX_EXTRA_BYTES})
    with pytest.raises(p.ProtocolError) as info:
        p.decode_json_object(big, "extra")
    assert info.value.code == p.E_TOO_LARGE
    for frame in (b"{", b"[1]", b'"s"', b"null", b"1", b"\xff{}", b"[" * 100_000, b'{"a":' * 100_000):
        with pytest.raises(p.ProtocolError) as info:
            p.decode_json_object(frame, "extra")
        assert info.value.code == p.E_BAD_REQUEST


# --- malformed envelopes --------------------------------------------------------------------

#: (id, frames, expected code, request id the error must echo)
ENVELOPE_CASES = [
    ("empty message", [], p.E_BAD_REQUEST, None),
    ("one empty frame", [b""], p.E_BAD_REQUEST, None),
    ("protocol only", [p.CLIENT_PROTOCOL], p.E_BAD_REQUEST, None),
    ("two frames", [p.CLIENT_PROTOCOL, RID], p.E_BAD_REQUEST, RID),
    ("three frames", [p.CLIENT_PROTOCOL, RID, p.PING], p.E_BAD_REQUEST, RID),
    ("wrong protocol", [b"HTTP/1.1", RID, p.PING, b""], p.E_BAD_REQUEST, None),
    ("worker protocol", [p.WORKER_PROTOCOL, RID, p.PING, b""], p.E_BAD_REQUEST, None),
    ("empty protocol", [b"", RID, p.PING, b""], p.E_BAD_REQUEST, None),
    ("old version", [b"HQC00", RID, p.PING, b""], p.E_VERSION, RID),
    ("new version", [b"HQC02", RID, p.PING, b""], p.E_VERSION, RID),
    ("non-numeric version", [b"HQCxx", RID, p.PING, b""], p.E_VERSION, RID),
    ("new version alone", [b"HQC02"], p.E_VERSION, None),
    ("new version, bad id", [b"HQC02", b"", p.PING, b""], p.E_VERSION, None),
    ("empty request id", [p.CLIENT_PROTOCOL, b"", p.PING, b""], p.E_BAD_REQUEST, None),
    ("long request id", [p.CLIENT_PROTOCOL, b"x" * 33, p.PING, b""], p.E_BAD_REQUEST, None),
    ("unknown command", [p.CLIENT_PROTOCOL, RID, b"nope", b""], p.E_UNKNOWN_COMMAND, RID),
    ("empty command", [p.CLIENT_PROTOCOL, RID, b"", b""], p.E_UNKNOWN_COMMAND, RID),
    ("upper-case command", [p.CLIENT_PROTOCOL, RID, b"PING", b""], p.E_UNKNOWN_COMMAND, RID),
    ("non-ASCII command", [p.CLIENT_PROTOCOL, RID, b("pïng"), b""], p.E_UNKNOWN_COMMAND, RID),
    ("binary command", [p.CLIENT_PROTOCOL, RID, b"\xff\x00\xfe" * 50, b""], p.E_UNKNOWN_COMMAND, RID),
    ("credentials too large", [p.CLIENT_PROTOCOL, RID, p.PING, b"c" * 1025], p.E_TOO_LARGE, RID),
    ("10k tiny frames", [p.CLIENT_PROTOCOL, RID, p.PING, b""] + [b""] * 10_000, p.E_TOO_LARGE, RID),
]


@pytest.mark.parametrize("frames, code, request_id", table(ENVELOPE_CASES))
def test_malformed_envelope(frames, code, request_id):
    exc = refused(frames, code, request_id)
    assert len(exc.message.encode()) <= p.MAX_ERROR_BYTES


@pytest.mark.parametrize("frames, code, request_id", table(ENVELOPE_CASES))
def test_broker_answers_malformed_envelope_itself(frames, code, request_id):
    """The broker turns each decode error into exactly one reply to that client, with its id."""
    sched = Scheduler(options.namespace(options.BROKER))
    sched.on_client([b"client-1", *frames], 0.0)
    assert not sched.to_workers
    assert len(sched.to_clients) == 1
    client_id, *reply_frames = sched.to_clients[0]
    reply = p.decode_reply(reply_frames)
    assert (client_id, reply.status, reply.request_id) == (b"client-1", code, request_id or b"")
    assert len(reply.body) == 1 and len(reply.body[0]) <= p.MAX_ERROR_BYTES


@pytest.mark.parametrize("version", [b"HQC00", b"HQC02"])
def test_version_error_lists_the_supported_version(version):
    exc = refused([version, RID, p.PING, b""], p.E_VERSION, RID)
    assert "HQC01" in exc.message and "supported" in exc.message


def _wrong_counts():
    for command, (low, high) in sorted(p.BODY_FRAMES.items()):
        counts = [high + 1, high + 3] + ([low - 1] if low else [])
        for n in counts:
            yield command, n


@pytest.mark.parametrize("command, n", list(_wrong_counts()))
def test_wrong_body_frame_count(command, n):
    exc = refused(p.encode_request(RID, command, [b"x"] * n), p.E_BAD_REQUEST, RID)
    assert command.decode() in exc.message


@pytest.mark.parametrize(
    "command, body",
    [
        (p.GET, []),
        (p.GET, [b(M)]),
        (p.GET, [b(M), b(T1), b(M)]),
        (p.EXISTS, []),
    ],
)
def test_batch_group_count_wrong(command, body):
    refused(p.encode_request(RID, command, body), p.E_BAD_REQUEST, RID)


@pytest.mark.parametrize("command", [p.GET, p.EXISTS])
def test_chunk_size_limit(command):
    for n in (p.MAX_CHUNK_ITEMS - 1, p.MAX_CHUNK_ITEMS):
        request = p.decode_request(p.encode_request(RID, command, batch(command, [items(n, 64)])))
        assert p.check_body_shape(command, request.body) == n
    exc = refused(
        p.encode_request(RID, command, batch(command, [items(1), items(p.MAX_CHUNK_ITEMS + 1, 64)])),
        p.E_TOO_LARGE,
        RID,
    )
    assert str(p.MAX_CHUNK_ITEMS) in exc.message


@pytest.mark.parametrize("command", [p.GET, p.EXISTS])
def test_batch_size_limit(command):
    full, rest = divmod(p.MAX_BATCH_ITEMS, p.MAX_CHUNK_ITEMS)
    chunk = items(p.MAX_CHUNK_ITEMS, 8)
    at_limit = [chunk] * full + [items(rest, 8)]
    body = batch(command, at_limit)
    assert p.check_body_shape(command, body) == p.MAX_BATCH_ITEMS
    p.decode_request(p.encode_request(RID, command, body))
    over = batch(command, at_limit + [items(1, 8)])
    exc = refused(p.encode_request(RID, command, over), p.E_TOO_LARGE, RID)
    assert str(p.MAX_BATCH_ITEMS) in exc.message
    refused(p.encode_request(RID, command, batch(command, [chunk] * (full + 1))), p.E_TOO_LARGE, RID)


def test_frame_count_limit():
    limit = p.MAX_FRAMES - 4  # body frames that fit next to the 4 envelope frames
    body = [b"a"] * limit
    assert p.check_body_shape(p.EXISTS, body) == limit
    assert len(p.encode_request(RID, p.EXISTS, body)) == p.MAX_FRAMES
    refused(p.encode_request(RID, p.EXISTS, body + [b"a"]), p.E_TOO_LARGE, RID)
    refused(p.encode_request(RID, p.GET, [b(M), b"a"] * (limit // 2 + 1)), p.E_TOO_LARGE, RID)
    refused(p.encode_request(RID, p.PING, [b""] * 100_000), p.E_TOO_LARGE, RID)


def test_chunk_counts_give_the_items_of_each_job():
    assert p.chunk_counts(p.PING, []) == [1]
    assert p.chunk_counts(p.GET, batch(p.GET, [[T1, T2], [T1]])) == [2, 1]
    assert p.chunk_counts(p.EXISTS, [b"a\nb\nc", b""]) == [3, 1]
    assert p.decode_request(p.encode_request(RID, p.GET, batch(p.GET, [[T1], [T1, T2, T1]]))).counts == [1, 3]


def test_check_body_shape_counts_items():
    assert p.check_body_shape(p.PING, []) == 1
    assert p.check_body_shape(p.REPORT, valid_body(p.REPORT)) == 1
    assert p.check_body_shape(p.GET, batch(p.GET, [[T1, T2], [T1]])) == 3
    assert p.check_body_shape(p.EXISTS, [b""]) == 1  # an empty frame is one (empty) item
    with pytest.raises(p.ProtocolError) as info:
        p.check_body_shape(b"nope", [], RID)
    assert (info.value.code, info.value.request_id) == (p.E_UNKNOWN_COMMAND, RID)


# --- body values (checked by the workers) -------------------------------------------------------

LONG = "a" * (p.MAX_HASH_BYTES + 1)
LONG_METHOD = "m" * (p.MAX_METHOD_BYTES + 1)

#: (id, command, body, expected code, text the message must contain)
VALUE_CASES = [
    ("get: method not UTF-8", p.GET, [b"\xffmethod", b(T1)], p.E_BAD_REQUEST, "UTF-8"),
    ("get: method surrogate", p.GET, [b"\xed\xa0\x80", b(T1)], p.E_BAD_REQUEST, "UTF-8"),
    ("get: taskhash not UTF-8", p.GET, [b(M), b(T1) + b"\n\xc3\x28"], p.E_BAD_REQUEST, "UTF-8"),
    ("get: empty method", p.GET, [b"", b(T1)], p.E_INVALID, "empty method"),
    ("get: empty taskhash", p.GET, [b(M), b""], p.E_INVALID, "empty taskhash"),
    ("get: empty item", p.GET, [b(M), b(T1) + b"\n\n" + b(T2)], p.E_INVALID, "empty taskhash"),
    ("get: uneven hex items", p.GET, [b(M), b"ab\nabcd\n"], p.E_INVALID, "empty taskhash"),
    ("get: long taskhash", p.GET, [b(M), b(LONG)], p.E_INVALID, "longer than"),
    ("get: long method", p.GET, [b(LONG_METHOD), b(T1)], p.E_INVALID, "longer than"),
    ("get: NUL in method", p.GET, [b"Test\x00Method", b(T1)], p.E_INVALID, "control"),
    ("get: tab in taskhash", p.GET, [b(M), b"ab\tcd"], p.E_INVALID, "control"),
    ("get: DEL in taskhash", p.GET, [b(M), b"ab\x7f"], p.E_INVALID, "control"),
    ("get: second chunk bad", p.GET, [b(M), b(T1), b(M), b"\x01"], p.E_INVALID, "control"),
    ("exists: not UTF-8", p.EXISTS, [b"\xff" * 64], p.E_BAD_REQUEST, "UTF-8"),
    ("exists: empty", p.EXISTS, [b""], p.E_INVALID, "empty unihash"),
    ("exists: long", p.EXISTS, [b(LONG)], p.E_INVALID, "longer than"),
    ("get-full: method not UTF-8", p.GET_FULL, [b"\x80", b(T1)], p.E_BAD_REQUEST, "UTF-8"),
    ("get-full: taskhash not UTF-8", p.GET_FULL, [b(M), b"\xc0\xaf"], p.E_BAD_REQUEST, "UTF-8"),
    ("get-full: empty taskhash", p.GET_FULL, [b(M), b""], p.E_INVALID, "empty taskhash"),
    ("get-full: long taskhash", p.GET_FULL, [b(M), b(LONG)], p.E_INVALID, "longer than"),
    ("get-full: LF in taskhash", p.GET_FULL, [b(M), b(T1) + b"\n"], p.E_INVALID, "control"),
    ("get-outhash: empty outhash", p.GET_OUTHASH, [b(M), b"", b(T1), b"1"], p.E_INVALID, "empty outhash"),
    ("get-outhash: long taskhash", p.GET_OUTHASH, [b(M), b(O1), b(LONG), b"1"], p.E_INVALID, "longer than"),
    ("get-outhash: flag 2", p.GET_OUTHASH, [b(M), b(O1), b(T1), b"2"], p.E_BAD_REQUEST, "with_unihash"),
    ("get-outhash: flag empty", p.GET_OUTHASH, [b(M), b(O1), b(T1), b""], p.E_BAD_REQUEST, "with_unihash"),
    ("get-outhash: flag true", p.GET_OUTHASH, [b(M), b(O1), b(T1), b"true"], p.E_BAD_REQUEST, "with_unihash"),
    ("get-outhash: flag 01", p.GET_OUTHASH, [b(M), b(O1), b(T1), b"01"], p.E_BAD_REQUEST, "with_unihash"),
    ("report: method not UTF-8", p.REPORT, [b"\xfe", b(T1), b(O1), b(U1)], p.E_BAD_REQUEST, "UTF-8"),
    ("report: outhash not UTF-8", p.REPORT, [b(M), b(T1), b"\xfe", b(U1)], p.E_BAD_REQUEST, "UTF-8"),
    ("report: empty taskhash", p.REPORT, [b(M), b"", b(O1), b(U1)], p.E_INVALID, "empty taskhash"),
    ("report: long outhash", p.REPORT, [b(M), b(T1), b(LONG), b(U1)], p.E_INVALID, "longer than"),
    ("report: long method", p.REPORT, [b(LONG_METHOD), b(T1), b(O1), b(U1)], p.E_INVALID, "longer than"),
    (
        "report: unihash not ASCII",
        p.REPORT,
        [b(M), b(T1), b(O1), b"\xff" * 64],
        p.E_INVALID,
        "Invalid unihash",
    ),
    ("report: extra not JSON", p.REPORT, [b(M), b(T1), b(O1), b(U1), b"{nope"], p.E_BAD_REQUEST, "JSON"),
    ("report: extra not UTF-8", p.REPORT, [b(M), b(T1), b(O1), b(U1), b"\xff{}"], p.E_BAD_REQUEST, "JSON"),
    ("report: extra a list", p.REPORT, [b(M), b(T1), b(O1), b(U1), b'["PN"]'], p.E_BAD_REQUEST, "object"),
    ("report: extra a string", p.REPORT, [b(M), b(T1), b(O1), b(U1), b'"PN"'], p.E_BAD_REQUEST, "object"),
    ("report: extra null", p.REPORT, [b(M), b(T1), b(O1), b(U1), b"null"], p.E_BAD_REQUEST, "object"),
    # Valid JSON, but a lone surrogate cannot be stored as text: refused, not INTERNAL.
    (
        "report: extra surrogate",
        p.REPORT,
        [b(M), b(T1), b(O1), b(U1), b'{"PN": "\\ud800"}'],
        p.E_INVALID,
        "PN",
    ),
    (
        "report: extra too large",
        p.REPORT,
        [b(M), b(T1), b(O1), b(U1), b" " * (p.MAX_EXTRA_BYTES + 1)],
        p.E_TOO_LARGE,
        "extra",
    ),
    ("report-equiv: extra a list", p.REPORT_EQUIV, [b(M), b(T1), b(U1), b"[]"], p.E_BAD_REQUEST, "object"),
    ("report-equiv: taskhash NUL", p.REPORT_EQUIV, [b(M), b"\x00", b(U1)], p.E_INVALID, "control"),
    ("ping: extra frame", p.PING, [b""], p.E_BAD_REQUEST, "ping"),
    ("stats is the broker's", p.STATS, [], p.E_UNKNOWN_COMMAND, "unknown command"),
    ("unknown command", b"\xffnope", [], p.E_UNKNOWN_COMMAND, "unknown command"),
]


@pytest.mark.parametrize("command, body, code, text", table(VALUE_CASES))
def test_bad_body_value(handlers, command, body, code, text):
    status, reply = handlers.handle(command, b"", body)
    assert status == code, reply
    assert len(reply) == 1 and len(reply[0]) <= p.MAX_ERROR_BYTES
    assert text in reply[0].decode("utf-8", "replace")


@pytest.mark.parametrize("unihash", INVALID_UNIHASHES)
def test_invalid_unihash(handlers, unihash):
    with pytest.raises(p.ProtocolError) as info:
        p.decode_unihash(b(unihash))
    assert (info.value.code, info.value.message) == (p.E_INVALID, "Invalid unihash")
    taskhash = "feed" + unihash.encode().hex()[:36]
    for command, body in (
        (p.REPORT, [b(M), b(taskhash), b(O1), b(unihash)]),
        (p.REPORT_EQUIV, [b(M), b(taskhash), b(unihash)]),
    ):
        assert handlers.handle(command, b"", body) == (p.E_INVALID, [b"Invalid unihash"])
    # Nothing was stored for it.
    assert handlers.handle(p.GET, b"", [b(M), b(taskhash)]) == (p.OK, [b""])
    assert not p.is_unihash(unihash)


@pytest.mark.parametrize(
    "value, code",
    [
        ("", p.E_INVALID),
        ("a" * 257, p.E_INVALID),
        ("é" * 128 + "a", p.E_INVALID),  # 257 bytes in 129 characters
        ("a\x00", p.E_INVALID),
        ("\x1b[31m", p.E_INVALID),
        ("a\u2028", p.E_INVALID),
    ],
)
def test_decode_text_refuses(value, code):
    with pytest.raises(p.ProtocolError) as info:
        p.decode_text(b(value), "taskhash", p.MAX_HASH_BYTES)
    assert info.value.code == code


def test_decode_text_limits():
    assert p.decode_text(b("é" * 128), "taskhash", p.MAX_HASH_BYTES) == "é" * 128
    assert p.decode_text(b"a" * 256, "taskhash", p.MAX_HASH_BYTES) == "a" * 256
    assert p.decode_text(b"with space", "method", p.MAX_METHOD_BYTES) == "with space"
    for frame in (b"\xff", b"\xed\xa0\x80", b"a\xc3"):
        with pytest.raises(p.ProtocolError) as info:
            p.decode_text(frame, "method", p.MAX_METHOD_BYTES)
        assert info.value.code == p.E_BAD_REQUEST


def test_handlers_serve_valid_bodies(handlers):
    """The fuzz fixture really stores and answers (so an all-errors handler would fail here)."""
    method = b"protocol-test"
    assert handlers.handle(p.PING, b"", []) == (p.OK, [])
    assert handlers.handle(p.REPORT, b"", [method, b(T1), b(O1), b(U1), b'{"PN": "zlib"}']) == (p.OK, [b(U1)])
    assert handlers.handle(p.REPORT, b"", [method, b(T2), b(O1), b(U2)]) == (p.OK, [b(U1)])
    status, reply = handlers.handle(p.GET, b"", [method, p.pack_items([T1, "miss", T2]), method, b(T1)])
    assert status == p.OK
    assert [p.unpack_unihashes(reply[0], 3), p.unpack_unihashes(reply[1], 1)] == [[U1, None, U1], [U1]]
    status, reply = handlers.handle(p.EXISTS, b"", [p.pack_items([U1, U2, "x"])])
    assert (status, p.unpack_flags(reply[0], 3)) == (p.OK, [True, False, False])
    status, reply = handlers.handle(p.GET_FULL, b"", [method, b(T1)])
    row = json.loads(reply[0])
    assert (status, row["unihash"], row["PN"]) == (p.OK, U1, "zlib")
    status, reply = handlers.handle(p.GET_OUTHASH, b"", [method, b(O1), b(T2), b"0"])
    assert status == p.OK and "unihash" not in json.loads(reply[0])


def test_large_random_frames(handlers):
    """Frames of up to 2 MiB of random bytes in every position (hypothesis stays small)."""
    rng = random.Random(2050)
    for size in (64 * 1024, 2 * 1024 * 1024):
        blob = rng.randbytes(size)
        for command in sorted(p.WORKER_COMMANDS):
            body = valid_body(command)
            for i in range(len(body)):
                mutated = body[:i] + [blob] + body[i + 1 :]
                check_message(handlers, p.encode_request(RID, command, mutated))
        check_message(handlers, [blob, RID, p.PING, b""])
        check_message(handlers, [p.CLIENT_PROTOCOL, blob, p.PING, b""])
        check_message(handlers, [p.CLIENT_PROTOCOL, RID, blob, b""])
        check_message(handlers, [p.CLIENT_PROTOCOL, RID, p.PING, blob])


# --- fuzz (E1) --------------------------------------------------------------------------------

EXAMPLES = int(os.environ.get("HQ_FUZZ_EXAMPLES", "1000"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


def check_message(handlers, frames: list) -> None:
    """decode_request raises only ProtocolError; handle() never raises and answers sanely."""
    try:
        request = p.decode_request(frames)
    except p.ProtocolError as exc:
        assert exc.code in REFUSALS
        error = p.encode_error(exc.request_id, exc.code, exc.message)
        assert len(error) == 4 and len(error[3]) <= p.MAX_ERROR_BYTES
        if exc.request_id is not None:
            assert exc.request_id == bytes(frames[1]) and 1 <= len(exc.request_id) <= p.MAX_REQUEST_ID_BYTES
        decoded = None
    else:
        assert request.request_id == bytes(frames[1])
        decoded = request
    if len(frames) < 3:
        return
    command, credentials, body = bytes(frames[2]), bytes(frames[3]) if len(frames) > 3 else b"", frames[4:]
    try:
        p.check_body_shape(command, body)
        shape_ok = True
    except p.ProtocolError as exc:
        assert exc.code in REFUSALS
        shape_ok = False
    status, reply = handlers.handle(command, credentials, body)
    assert type(status) is int and isinstance(reply, list)
    assert all(isinstance(frame, bytes) for frame in reply)
    if status != p.OK:
        # The caller's fault only: random input never makes a worker fail internally.
        assert status in REFUSALS, (status, reply)
        assert len(reply) == 1 and len(reply[0]) <= p.MAX_ERROR_BYTES
        return
    assert (shape_ok and command in p.WORKER_COMMANDS) or command == p.ADMIN_BOOTSTRAP
    if decoded is not None:
        assert decoded.command == command
    if command == p.GET:
        assert len(reply) == len(body) // 2
        for chunk, frame in zip(body[1::2], reply):
            p.unpack_unihashes(frame, p.count_items(chunk))  # never a malformed unihash
    elif command == p.EXISTS:
        assert len(reply) == len(body)
        for chunk, frame in zip(body, reply):
            p.unpack_flags(frame, p.count_items(chunk))
    elif command in (p.REPORT, p.REPORT_EQUIV):
        assert len(reply) == 1 and p.is_unihash(reply[0].decode("ascii"))
    elif command in (p.GET_FULL, p.GET_OUTHASH):
        assert len(reply) == 1
        assert json.loads(reply[0]) is None or isinstance(json.loads(reply[0]), dict)


hexish = st.text(alphabet="0123456789abcdefA\n", max_size=200).map(str.encode)
values = st.sampled_from(
    [b(M), b(T1), b(T2), b(O1), b(U1), b"0", b"1", b"", b"{}", b'{"PN": "x"}', p.pack_items([T1, T2])]
)
frame = st.one_of(
    st.binary(max_size=300),
    hexish,
    values,
    st.text(max_size=80).map(lambda s: s.encode("utf-8", "surrogatepass")),  # may be invalid UTF-8
)
commands = st.sampled_from(sorted(p.CLIENT_COMMANDS) + [b"nope", b"", b"\xff", b"PING"])
random_frames = st.lists(st.binary(max_size=300), max_size=64)
envelope_like = st.tuples(
    st.just(p.CLIENT_PROTOCOL) | st.sampled_from([b"HQC02", p.WORKER_PROTOCOL, b""]) | st.binary(max_size=8),
    st.just(RID) | st.binary(min_size=1, max_size=32) | st.sampled_from([b"", b"x" * 33]),
    st.sampled_from(sorted(p.WORKER_COMMANDS)) | commands | st.binary(max_size=12),
    st.sampled_from([b"", b"token"]) | st.binary(max_size=16),
    st.lists(frame, max_size=60),
).map(lambda t: [t[0], t[1], t[2], t[3], *t[4]])


@FUZZ
@given(frames=st.one_of(random_frames, envelope_like))
def test_fuzz_random_messages(handlers, frames):
    check_message(handlers, frames)


@st.composite
def mutated_requests(draw):
    command = draw(st.sampled_from(sorted(p.CLIENT_COMMANDS)))
    if command == p.GET:
        body = []
        for _ in range(draw(st.integers(1, 4))):
            chunk = draw(st.lists(st.sampled_from([T1, T2, O1, U1, "x"]), min_size=1, max_size=5))
            body += [b(M), p.pack_items(chunk)]
    elif command == p.EXISTS:
        body = [p.pack_items(draw(st.lists(st.sampled_from([U1, U2]), min_size=1, max_size=5)))]
    else:
        body = valid_body(command)
    frames = p.encode_request(RID, command, body)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(
            st.sampled_from(["drop", "insert", "replace", "flip", "truncate", "extend", "append", "many"])
        )
        if kind == "many":
            frames += [b""] * draw(st.integers(1, 3000))
            continue
        if kind == "append":
            frames.append(draw(frame))
            continue
        if not frames:
            continue
        i = draw(st.integers(0, len(frames) - 1))
        if kind == "drop":
            del frames[i]
        elif kind == "insert":
            frames.insert(i, draw(frame))
        elif kind == "replace":
            frames[i] = draw(frame)
        elif kind == "flip" and frames[i]:
            data = bytearray(frames[i])
            j = draw(st.integers(0, len(data) - 1))
            data[j] ^= 1 << draw(st.integers(0, 7))
            frames[i] = bytes(data)
        elif kind == "truncate":
            frames[i] = frames[i][: draw(st.integers(0, len(frames[i])))]
        elif kind == "extend":
            frames[i] = frames[i] + draw(st.sampled_from([b"\n", b"\x00", b"\xff", b"a", b"\n" + b(T1)]))
    return frames


@FUZZ
@given(frames=mutated_requests())
def test_fuzz_mutated_requests(handlers, frames):
    check_message(handlers, frames)


@settings(max_examples=300, deadline=None)
@given(
    values=st.lists(
        st.text(
            st.characters(blacklist_categories=("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp")),
            min_size=1,
            max_size=64,
        ).filter(str.isprintable),
        min_size=1,
        max_size=20,
    )
)
def test_fuzz_items_round_trip(values):
    assert p.unpack_items(p.pack_items(values)) == values


@st.composite
def hex_items_of_even_total(draw):
    """Hex items whose total length is that of n items of the first one's width: the shape
    a fast path that checks only the frame length would take for n equal-width items."""
    width, n = draw(st.integers(1, 16)), draw(st.integers(2, 8))
    lengths = [width] * n
    for _ in range(draw(st.integers(0, 4))):
        i, j = draw(st.integers(1, n - 1)), draw(st.integers(1, n - 1))
        moved = draw(st.integers(0, lengths[i]))
        lengths[i] -= moved
        lengths[j] += moved
    return "\n".join(draw(st.text("0123456789abcdef", min_size=k, max_size=k)) for k in lengths).encode()


@settings(max_examples=500, deadline=None)
@given(
    data=st.one_of(
        st.binary(max_size=600),
        st.text(alphabet="0123456789abcdef\n", max_size=600).map(str.encode),
        hex_items_of_even_total(),
    )
)
def test_fuzz_unpack_items_returns_only_valid_hashes(data):
    """Every item unpack_items accepts is a non-empty printable string of at most the limit."""
    try:
        out = p.unpack_items(data, "taskhash", 16)
    except p.ProtocolError as exc:
        assert exc.code in (p.E_BAD_REQUEST, p.E_INVALID)
        return
    assert len(out) == p.count_items(data)
    for item in out:
        assert item and item.isprintable() and len(item.encode()) <= 16
