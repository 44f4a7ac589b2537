"""Sessions and permission checks in the broker (hq.broker.access), driven through the
Scheduler with a fake clock and a real worker's Handlers on a real SQLite file."""

import json

import pytest

from hq import options
from hq import permissions as perms
from hq import protocol as p
from hq.broker.scheduler import Scheduler
from hq.workers.handlers import Handlers
from hq.workers.schema import open_database
from hq.workers.store import Store

M = b"TestMethod"
T = b"35788efcb8dfb0a02659d81cf2bfd695fb30faf9"
O1 = b"2765d4a5884be49b28601445c2760c5f21e7e5c0ee2b7e3fce98fd7e5970796f"
U1 = b"a69ec97f5af2e21e1a1f9cc8896965515d5559425666f734e245a3d40cee33d9"


class Frame:
    """What the broker reads the peer address from (a received zmq.Frame)."""

    def __init__(self, address):
        self.address = address

    def get(self, name):
        assert name == "Peer-Address"
        return self.address


@pytest.fixture
def world(tmp_path):
    def make(**kw):
        kw.setdefault("cache_entries", 0)
        s = Scheduler(options.namespace(options.BROKER, **kw))
        handlers = Handlers(Store(open_database(str(tmp_path / "hq.db"))))
        handlers.users.bootstrap("admin", perms.hash_token("pw"))
        s.on_worker([b"w1", *p.encode_ready({"name": "w1", "pid": 1})], 0.0)
        return s, handlers

    return make


def run_workers(s, handlers, now=0.0):
    """Answer every REQUEST the broker sent, as a worker would."""
    while s.to_workers:
        frames = s.to_workers.pop(0)
        if frames[2] != p.REQUEST:
            continue
        command, actor, jobs = p.decode_broker_message(frames[1:])[1]
        s.on_worker([frames[0], *p.encode_results(handlers.handle_jobs(command, actor, jobs))], now)


def call(s, handlers, client, command, body=(), key=b"", now=0.0, peer="10.0.0.1"):
    s.on_client([client, *p.encode_request(b"r", command, list(body), key)], now, peer=Frame(peer))
    run_workers(s, handlers, now)
    out = [p.decode_reply(f[1:]) for f in s.to_clients if f[0] == client]
    s.to_clients.clear()
    return out


def login(s, handlers, client, user=b"admin", token=b"pw", now=0.0):
    (reply,) = call(s, handlers, client, p.AUTH, [user, token], now=now)
    assert reply.status == p.OK, reply
    assert json.loads(reply.body[0]) == {"result": True, "username": "admin", "permissions": ["@all"]}
    return bytes(reply.body[1])


def test_a_session_key_works_only_on_its_own_connection(world):
    s, h = world(anon_perms="@none")
    key = login(s, h, b"c1")
    (ok,) = call(s, h, b"c1", p.GET_ALL_USERS, key=key)
    assert ok.status == p.OK
    (stolen,) = call(s, h, b"c2", p.GET_ALL_USERS, key=key)
    assert stolen.status == p.E_SESSION
    (anonymous,) = call(s, h, b"c2", p.GET, [M, T])
    assert anonymous.status == p.E_FORBIDDEN
    assert p.error_text(anonymous.body) == "Anonymous user is not allowed to access permissions(s) @read"


def test_a_failed_log_in_is_answered_after_a_second_by_a_timer(world):
    s, h = world()
    assert call(s, h, b"c1", p.AUTH, [b"admin", b"wrong"], now=5.0) == []  # held back
    s.tick(5.5)
    assert s.to_clients == []
    assert s.next_wakeup(5.5) <= 0.5
    (other,) = call(s, h, b"c2", p.PING, now=5.6)  # everyone else is served meanwhile
    assert other.status == p.OK
    s.tick(6.0)
    (reply,) = [p.decode_reply(f[1:]) for f in s.to_clients]
    assert reply.status == p.E_UNAUTHORIZED and p.error_text(reply.body) == "Unable to authenticate as admin"
    assert s.counters["auth.failed"] == 1


def test_one_host_has_at_most_eight_log_ins_at_a_time(world):
    s, h = world()
    for n in range(8):
        assert call(s, h, b"c%d" % n, p.AUTH, [b"admin", b"wrong"], now=1.0) == []
    jobs = s._next_job
    (busy,) = call(s, h, b"c9", p.AUTH, [b"admin", b"wrong"], now=1.0)
    assert busy.status == p.E_BUSY and s._next_job == jobs  # no worker asked
    (elsewhere,) = call(s, h, b"c10", p.AUTH, [b"admin", b"pw"], now=1.0, peer="10.0.0.2")
    assert elsewhere.status == p.OK
    s.tick(2.0)
    s.to_clients.clear()
    assert call(s, h, b"c9", p.AUTH, [b"admin", b"pw"], now=2.0)[0].status == p.OK


def test_read_only_reports_are_lookups_and_writes_are_unknown(world):
    s, h = world(read_only=True)
    (report,) = call(s, h, b"c1", p.REPORT, [M, T, O1, U1])
    assert report.status == p.OK and report.body == [U1]
    (lookup,) = call(s, h, b"c1", p.GET, [M, T])
    assert lookup.body == [b""]  # nothing was stored
    (equiv,) = call(s, h, b"c1", p.REPORT_EQUIV, [M, T, U1])
    assert equiv.status == p.E_UNKNOWN_COMMAND
    assert p.error_text(equiv.body) == "report-equiv is not available on a read-only server"
    key = login(s, h, b"c2")
    (new,) = call(s, h, b"c2", p.NEW_USER, [b"x", b"[]"], key=key)
    assert new.status == p.E_UNKNOWN_COMMAND


def test_sessions_are_bounded_oldest_first(world):
    s, h = world()
    s.access.max_sessions = 2
    keys = [login(s, h, b"c%d" % n) for n in range(3)]
    assert call(s, h, b"c0", p.PING, key=keys[0])[0].status == p.E_SESSION
    assert call(s, h, b"c2", p.PING, key=keys[2])[0].status == p.OK


def test_a_report_records_the_logged_in_user_as_owner(world):
    s, h = world()
    key = login(s, h, b"c1")
    extra = b'{"owner": "someone-else"}'
    assert call(s, h, b"c1", p.REPORT, [M, T, O1, U1, extra], key=key)[0].status == p.OK
    (row,) = call(s, h, b"c1", p.GET_FULL, [M, T], key=key)
    assert json.loads(row.body[0])["owner"] == "admin"


def test_wrong_guesses_at_one_user_do_not_starve_another_users_log_in():
    """Log-ins in flight are counted per (peer address, user), and per address in all: a
    flood of wrong tokens for admin from a host (or through a gateway, whose users all come
    from its host) leaves a builder's log-in from there its turn."""
    from hq.broker.access import MAX_LOGINS_PER_PEER, MAX_LOGINS_PER_USER, Access

    access = Access(frozenset())
    for n in range(MAX_LOGINS_PER_USER):
        assert access.login_refusal(b"flood-%d" % n, "10.0.0.1", "admin") is None
    assert "as admin" in access.login_refusal(b"flood-x", "10.0.0.1", "admin")
    assert access.login_refusal(b"other-host", "10.0.0.2", "admin") is None
    assert access.login_refusal(b"builder", "10.0.0.1", "builder") is None
    access.login_ended(b"flood-0")  # its refusal was sent: a slot for admin again
    assert access.login_refusal(b"flood-y", "10.0.0.1", "admin") is None
    names = [f"user{n}" for n in range(MAX_LOGINS_PER_PEER)]
    refused = [name for name in names if access.login_refusal(name.encode(), "10.0.0.1", name)]
    assert len(refused) == MAX_LOGINS_PER_USER + 1 and "from this address" in access.login_refusal(
        b"late", "10.0.0.1", "late"
    )
