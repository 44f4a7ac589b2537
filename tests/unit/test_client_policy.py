"""The client's retry policy (hq.client.policy, PROTOCOL.md §8) on a fake clock: no sockets.

Times are plain numbers passed as ``now``; every assertion is an exact time or count.
"""

import ast
import pathlib
import sys

import pytest

from hq import protocol as p
from hq.client import policy as policy_module
from hq.client.policy import (
    BACKOFF_MAX_S,
    BACKOFF_START_S,
    InvokeError,
    RetryPolicy,
    ServerError,
    attempt_time_s,
)

BODY = [b"TestMethod", b"a" * 64]
ADMIN_WRITES = sorted(p.ADMIN_WRITE_COMMANDS)
LONG_READS = sorted(p.LONG_COMMANDS - p.ADMIN_WRITE_COMMANDS)  # gc-status, db-usage
MAY_HAVE_RUN = [p.E_INTERNAL, p.E_UNAVAILABLE]


def decode(body):
    return body


def started(timeout_s=30.0):
    policy = RetryPolicy()
    policy.start(timeout_s)
    return policy


def resent_ids(resends):
    return [request_id for request_id, _ in resends]


def test_the_module_imports_no_zeromq_and_has_no_clock():
    tree = ast.parse(pathlib.Path(policy_module.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            for alias in node.names:  # "from hq import protocol" names the module hq.protocol
                imported.add(f"hq.{alias.name}" if node.module == "hq" else node.module)
    project = {name for name in imported if name.split(".")[0] not in sys.stdlib_module_names}
    assert project == {"hq.protocol"}
    assert not imported & {"time", "zmq", "datetime", "asyncio"}


@pytest.mark.parametrize(
    "timeout_s, attempt_s", [(30.0, 10.0), (6.0, 2.0), (3.0, 1.0), (1.5, 1.0), (0.6, 0.6)]
)
def test_an_attempt_is_a_third_of_the_deadline_but_at_least_a_second_or_the_whole(timeout_s, attempt_s):
    assert attempt_time_s(timeout_s) == attempt_s
    policy = started(timeout_s)
    policy.add(p.PING, [], decode, 100.0)
    assert policy.wake_at() == 100.0 + attempt_s


def test_request_ids_are_lower_case_hex_from_one_counter_and_every_send_takes_a_new_one():
    policy = started()
    assert [policy.add(p.GET, BODY, decode, 0.0) for _ in range(12)] == [b"%x" % i for i in range(1, 13)]
    assert [policy.add(p.GET, BODY, decode, 0.0) for _ in range(3)] == [b"d", b"e", b"f"]
    assert resent_ids(policy.resend_all(10.0)) == [
        b"10",
        b"11",
        b"12",
        b"13",
        b"14",
        b"15",
        b"16",
        b"17",
        b"18",
        b"19",
        b"1a",
        b"1b",
        b"1c",
        b"1d",
        b"1e",
    ]
    assert len(policy.outstanding) == 15
    policy.start(30.0)  # the next call goes on counting
    assert policy.add(p.PING, [], decode, 20.0) == b"1f"


def test_answers_are_matched_by_id_and_carry_the_index_of_their_request():
    policy = started()
    ids = [policy.add(p.GET, BODY, decode, 0.0) for _ in range(3)]
    answered = policy.on_reply(ids[2], p.OK, [b"x"], 0.5)
    assert (answered.index, answered.command, answered.body, answered.decode) == (2, p.GET, BODY, decode)
    assert policy.on_reply(ids[0], p.OK, [b"x"], 0.5).index == 0
    assert len(policy.outstanding) == 1
    assert policy.on_reply(ids[1], p.OK, [b"x"], 0.5).index == 1
    assert len(policy.outstanding) == 0 and policy.stale_replies == 0


def test_replies_to_unknown_or_abandoned_ids_are_counted_as_stale_and_ignored():
    policy = started()
    first = policy.add(p.GET, BODY, decode, 0.0)
    ((resent, request),) = policy.resend_all(10.0)
    assert policy.on_reply(first, p.OK, [b"late"], 10.5) is None  # the abandoned attempt's answer
    assert policy.on_reply(b"old-id", p.E_INVALID, [b"no"], 10.5) is None  # not even an error
    policy.on_garbage()  # a reply that does not decode
    assert policy.stale_replies == 3 and len(policy.outstanding) == 1
    assert policy.on_reply(resent, p.OK, [b"x"], 11.0) is request
    assert policy.on_reply(resent, p.OK, [b"x"], 11.0) is None  # answered twice
    assert policy.stale_replies == 4


def test_start_forgets_an_abandoned_call_but_keeps_its_counters():
    policy = started()
    abandoned = [policy.add(p.GET, BODY, decode, 0.0) for _ in range(2)]
    policy.on_reply(b"nobody", p.OK, [], 1.0)
    policy.start(3.0)  # the call raised; a new one begins, with another timeout
    assert len(policy.outstanding) == 0 and policy.stale_replies == 1
    request_id = policy.add(p.PING, [], decode, 5.0)
    assert request_id == b"3"
    assert policy.wake_at() == 6.0  # attempt of max(3.0 / 3, 1.0) s
    assert policy.on_reply(abandoned[0], p.OK, [], 5.5) is None and policy.stale_replies == 2
    assert policy.on_reply(request_id, p.OK, [], 5.5).index == 0


# --- deadline and Lazy Pirate -----------------------------------------------------------------
def test_the_deadline_is_exact_and_counts_from_the_first_send():
    policy = started(30.0)
    policy.add(p.GET, BODY, decode, 100.0)
    for attempt_end in (110.0, 120.0):  # two Lazy Pirate resends do not extend it
        assert policy.wake_at() == attempt_end
        assert not policy.attempt_expired(attempt_end - 0.001)
        assert policy.attempt_expired(attempt_end)
        policy.resend_all(attempt_end)
    assert policy.wake_at() == 130.0
    assert not policy.deadline_passed(129.999)
    assert policy.deadline_passed(130.0)


def test_lazy_pirate_resends_every_outstanding_request_at_exactly_the_attempt_deadline():
    policy = started(30.0)
    first = policy.add(p.GET, BODY, decode, 100.0)
    second = policy.add(p.GET, BODY, decode, 104.0)
    assert policy.on_reply(second, p.E_BUSY, [b"queue full"], 104.5) is None  # in its backoff
    assert policy.wake_at() == 104.5 + BACKOFF_START_S
    ((again, _),) = policy.due(104.5 + BACKOFF_START_S)
    assert policy.wake_at() == 110.0
    assert not policy.attempt_expired(109.999)
    assert policy.attempt_expired(110.0)
    # The shell rebuilds the socket, then sends them all: each under a new id, in order.
    resends = policy.resend_all(110.0)
    assert resent_ids(resends) == [b"4", b"5"]
    assert [request.index for _, request in resends] == [0, 1]
    assert policy.wake_at() == 120.0  # a fresh attempt for both
    assert policy.on_reply(first, p.OK, [], 110.1) is None and policy.on_reply(again, p.OK, [], 110.1) is None
    assert policy.stale_replies == 2
    assert not policy.deadline_passed(129.999) and policy.deadline_passed(130.0)  # the first one's


@pytest.mark.parametrize("command", sorted(p.LONG_COMMANDS))
def test_long_commands_get_the_whole_deadline_as_one_attempt(command):
    policy = started(30.0)
    policy.add(command, [], decode, 100.0)
    assert policy.wake_at() == 130.0
    assert not policy.attempt_expired(129.999) and not policy.deadline_passed(129.999)
    assert policy.deadline_passed(130.0)  # the shell raises before it would ask for a resend


def test_a_lookup_beside_a_long_command_still_gets_its_attempt():
    policy = started(30.0)
    policy.add(p.GC_STATUS, [], decode, 100.0)
    policy.add(p.PING, [], decode, 100.0)
    assert policy.wake_at() == 110.0


@pytest.mark.parametrize("command", LONG_READS)
@pytest.mark.parametrize("status", MAY_HAVE_RUN)
def test_a_long_read_is_resent_after_a_failure_and_still_gets_the_whole_deadline(command, status):
    policy = started(30.0)
    request_id = policy.add(command, [], decode, 100.0)
    assert policy.on_reply(request_id, status, [b"worker lost"], 101.0) is None
    assert resent_ids(policy.due(101.0 + BACKOFF_START_S)) == [b"2"]
    assert policy.wake_at() == 130.0  # the new attempt would end after the deadline
    assert resent_ids(policy.on_reconnect(102.0)) == [b"3"]
    assert policy.wake_at() == 130.0


# --- backoff ----------------------------------------------------------------------------------
@pytest.mark.parametrize("status", sorted(p.RETRYABLE_STATUSES))
def test_retryable_statuses_are_resent_after_a_backoff_of_50_ms_doubling_to_1_s(status):
    policy = started(30.0)
    request_id = policy.add(p.GET, BODY, decode, 0.0)
    now = 1.0
    for backoff_s in (0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0):
        assert policy.on_reply(request_id, status, [b"try later"], now) is None
        assert policy.wake_at() == now + backoff_s
        assert policy.due(now + backoff_s - 0.001) == []
        ((new_id, request),) = policy.due(now + backoff_s)
        assert new_id == b"%x" % (int(request_id, 16) + 1) and request.index == 0
        request_id = new_id
        now += backoff_s
        assert policy.wake_at() == now + 10.0  # a new attempt from the resend
    assert BACKOFF_MAX_S == 1.0
    assert policy.on_reply(request_id, p.OK, [b"x"], now).index == 0


def test_the_attempt_deadline_waits_while_a_backoff_runs():
    policy = started(30.0)
    request_id = policy.add(p.GET, BODY, decode, 0.0)
    policy.on_reply(request_id, p.E_UNAVAILABLE, [b"no worker"], 9.99)
    assert not policy.attempt_expired(10.0) and not policy.attempt_expired(10.039)
    assert policy.wake_at() == 9.99 + 0.05
    policy.due(9.99 + 0.05)
    assert policy.wake_at() == 9.99 + 0.05 + 10.0


def test_a_retry_whose_resend_would_not_come_before_the_deadline_fails_the_call():
    policy = started(0.5)
    request_id = policy.add(p.PING, [], decode, 0.0)
    sends = 1
    with pytest.raises(ServerError) as info:
        now = 0.0
        while True:  # answered BUSY at once, every time
            policy.on_reply(request_id, p.E_BUSY, [b"queue full"], now)
            now = policy.wake_at()
            ((request_id, _),) = policy.due(now)
            sends += 1
    # Sent at 0, 0.05, 0.15 and 0.35; the next would be at 0.75, after the deadline of 0.5.
    assert (sends, now) == (4, 0.05 + 0.1 + 0.2)
    assert str(info.value) == "hq could not serve the request: queue full (BUSY)"
    assert info.value.code == p.E_BUSY and isinstance(info.value, ConnectionError)


def test_a_resend_due_exactly_at_the_deadline_is_not_made():
    policy = started(1.0)
    request_id = policy.add(p.PING, [], decode, 0.0)
    policy.on_reply(request_id, p.E_INTERNAL, [b"internal error"], 0.9499)
    ((request_id, _),) = policy.due(0.9499 + 0.05)
    policy = started(1.0)
    request_id = policy.add(p.PING, [], decode, 0.0)
    assert 0.95 + BACKOFF_START_S == 1.0
    with pytest.raises(ServerError, match=r"^hq could not serve the request: internal error \(INTERNAL\)$"):
        policy.on_reply(request_id, p.E_INTERNAL, [b"internal error"], 0.95)


# --- admin writes -----------------------------------------------------------------------------
@pytest.mark.parametrize("command", ADMIN_WRITES)
@pytest.mark.parametrize("status", MAY_HAVE_RUN)
def test_an_admin_write_that_may_have_run_is_never_resent(command, status):
    policy = started()
    request_id = policy.add(command, [], decode, 0.0)
    with pytest.raises(ServerError) as info:
        policy.on_reply(request_id, status, [b"no worker answered in time"], 1.0)
    assert str(info.value) == (
        f"hq answered {p.STATUS_NAMES[status]}: no worker answered in time; {command.decode()} may or may "
        "not have run: check (e.g. gc-status, or the command with --dry-run) before running it again"
    )
    assert info.value.code == 0


@pytest.mark.parametrize("command", ADMIN_WRITES)
def test_an_admin_write_refused_busy_is_resent_after_its_backoff(command):
    policy = started()
    request_id = policy.add(command, [], decode, 0.0)
    assert policy.on_reply(request_id, p.E_BUSY, [b"database busy, retry"], 2.0) is None
    assert resent_ids(policy.due(2.0 + BACKOFF_START_S)) == [b"2"]
    assert policy.wake_at() == 30.0  # and it still gets the whole deadline


@pytest.mark.parametrize("command", ADMIN_WRITES)
def test_an_admin_write_is_not_resent_after_a_reconnect(command):
    policy = started()
    policy.add(command, [], decode, 0.0)
    with pytest.raises(ServerError) as info:
        policy.on_reconnect(3.0)
    assert str(info.value) == (
        f"the connection to the broker was lost; {command.decode()} may or may not have run: check "
        "(e.g. gc-status, or the command with --dry-run) before running it again"
    )
    assert info.value.code == 0


# --- reconnect ----------------------------------------------------------------------------------
def test_a_reconnect_resends_every_request_at_once_under_new_ids():
    policy = started(30.0)
    first = policy.add(p.GET, BODY, decode, 0.0)
    second = policy.add(p.EXISTS, [b"x"], decode, 1.0)
    policy.on_reply(second, p.E_BUSY, [b"queue full"], 2.0)  # its backoff is cut short
    resends = policy.on_reconnect(2.01)
    assert resent_ids(resends) == [b"3", b"4"]
    assert [request.command for _, request in resends] == [p.GET, p.EXISTS]
    assert policy.due(2.05) == []
    assert policy.wake_at() == 2.01 + 10.0
    assert policy.on_reply(first, p.OK, [], 2.1) is None and policy.on_reply(second, p.OK, [], 2.1) is None
    assert policy.stale_replies == 2
    assert policy.deadline_passed(30.0)  # still the first send's deadline


# --- error mapping ------------------------------------------------------------------------------
@pytest.mark.parametrize("status", [p.E_INVALID, p.E_FORBIDDEN, p.E_UNAUTHORIZED])
def test_refusals_raise_invoke_error_with_the_server_text(status):
    policy = started()
    request_id = policy.add(p.REPORT, BODY, decode, 0.0)
    with pytest.raises(InvokeError) as info:
        policy.on_reply(request_id, status, [b"Invalid unihash"], 0.1)
    assert (str(info.value), info.value.code) == ("Invalid unihash", status)
    assert not isinstance(info.value, ConnectionError)


@pytest.mark.parametrize(
    "status, name",
    [
        (p.E_BAD_REQUEST, "BAD_REQUEST"),
        (p.E_UNKNOWN_COMMAND, "UNKNOWN_COMMAND"),
        (p.E_TOO_LARGE, "TOO_LARGE"),
        (p.E_VERSION, "VERSION"),
        (p.E_STORAGE, "STORAGE"),
        (599, "599"),
    ],
)
def test_other_error_statuses_raise_server_error_at_once(status, name):
    policy = started()
    request_id = policy.add(p.REPORT, BODY, decode, 0.0)
    with pytest.raises(ServerError) as info:
        policy.on_reply(request_id, status, [b"database is read-only"], 0.1)
    assert str(info.value) == f"hq rejected the request: database is read-only ({name})"
    assert info.value.code == status and isinstance(info.value, ConnectionError)


# --- wake-up ------------------------------------------------------------------------------------
def test_wake_at_is_the_earliest_attempt_end_backoff_or_deadline():
    policy = started(3.0)  # attempts of 1 s
    first = policy.add(p.GET, BODY, decode, 0.0)
    policy.add(p.GET, BODY, decode, 0.5)
    assert policy.wake_at() == 1.0
    policy.on_reply(first, p.E_BUSY, [b"busy"], 0.2)
    assert policy.wake_at() == 0.2 + 0.05
    ((first, _),) = policy.due(0.25)
    assert policy.wake_at() == 1.25 == 0.25 + 1.0 and not policy.attempt_expired(1.249)
    policy.resend_all(2.9)  # their attempts now end after the deadline of the first
    assert policy.wake_at() == 3.0
    assert policy.due(2.95) == [] and not policy.deadline_passed(2.999)


@pytest.mark.parametrize("timeout", [0, -1, float("inf"), float("nan"), 1e12])
def test_a_deadline_no_wait_can_hold_is_refused_when_the_client_is_made(timeout):
    from hq.client import create_client

    with pytest.raises(ValueError, match="timeout must be"):
        create_client("tcp://127.0.0.1:1", timeout=timeout)


def test_a_client_key_without_the_brokers_key_is_refused(tmp_path, monkeypatch):
    """It would otherwise talk in plain text while the user asked for CURVE."""
    from hq.client import create_client

    monkeypatch.delenv("HQ_SERVER_KEY", raising=False)
    with pytest.raises(ValueError, match="needs the broker's public key"):
        create_client("tcp://127.0.0.1:1", client_key=str(tmp_path / "c.key_secret"))
