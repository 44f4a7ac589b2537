"""The client's reading of its connection events (hq.client.client.Link), without sockets,
and its list of brokers."""

import pytest
import zmq

from hq import addresses
from hq.client.client import Client, Link

RETRIED, UP, DOWN = zmq.EVENT_CONNECT_RETRIED, zmq.EVENT_HANDSHAKE_SUCCEEDED, zmq.EVENT_DISCONNECTED


def feed(link, *events):
    return [link.on_event(e) for e in events]


def test_a_server_never_reached_is_unreachable_after_the_attempts():
    link = Link()
    feed(link, *[RETRIED] * (Link.ATTEMPTS - 1))
    assert not link.unreachable()
    feed(link, RETRIED)
    assert link.unreachable()


def test_a_connection_that_worked_is_waited_for():
    link = Link()
    feed(link, UP, DOWN, *[RETRIED] * 20)
    assert not link.unreachable()  # a broker restart: the deadline decides
    assert feed(link, UP) == [Link.BACK]


def test_a_peer_that_fails_the_handshake_is_not_zeromq():
    link = Link()
    feed(link, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, DOWN, *[RETRIED] * Link.ATTEMPTS)
    assert link.unreachable() and "does not speak ZeroMQ" in link.why("tcp://127.0.0.1:1")


def test_the_first_handshake_is_not_a_reconnect():
    link = Link()
    assert feed(link, RETRIED, UP) == [None, None]
    link.new_socket()  # a Lazy Pirate rebuild: its first handshake is not a reconnect either
    assert feed(link, UP) == [None]


def test_a_refused_curve_key_is_unreachable_at_once():
    link = Link()
    feed(link, zmq.EVENT_HANDSHAKE_FAILED_AUTH)
    assert link.unreachable() and "refused this client's CURVE key" in link.why("tcp://127.0.0.1:1")


def test_a_protocol_failure_is_not_retried_by_libzmq_so_not_waited_for():
    link = Link()
    feed(link, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, DOWN)  # no CONNECT_RETRIED follows
    assert link.unreachable()
    assert "wants CURVE" in link.why("tcp://127.0.0.1:1")
    assert "server key" in link.why("tcp://127.0.0.1:1", curve_used=True)


def test_a_wrong_server_key_fails_after_the_attempts():
    link = Link()
    feed(link, *[zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, DOWN] * (Link.ATTEMPTS - 1))
    assert not link.unreachable()
    feed(link, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
    assert link.unreachable()


def test_a_broker_that_answered_once_but_not_this_socket_is_dead_here():
    """With other brokers to go to, a broker reached before that now refuses every connect
    of the current socket counts as gone (the client fails over)."""
    link = Link()
    link.on_event(zmq.EVENT_HANDSHAKE_SUCCEEDED)
    link.new_socket()
    for _ in range(Link.ATTEMPTS - 1):
        link.on_event(zmq.EVENT_CONNECT_RETRIED)
    assert not link.dead_here() and not link.unreachable()
    link.on_event(zmq.EVENT_CONNECT_RETRIED)
    assert link.dead_here() and not link.unreachable()  # alone, it is waited for
    link.new_socket()
    assert not link.dead_here()


@pytest.mark.parametrize(
    "text, says",
    [
        ("tcp://a:1,tcp://b:2", None),
        ("tcp://a:1, ipc:///run/hq.ipc", None),
        ("tcp://a:1,", "empty address"),
        ("tcp://a:1,b:2", "did you mean tcp://b:2"),
        ("tcp://a:1,tcp://a:1", "given twice"),
    ],
)
def test_several_broker_addresses(text, says):
    if says is None:
        assert len(addresses.split(text)) == 2
        Client(text).close()
    else:
        with pytest.raises(ValueError, match=says):
            addresses.split(text)
        with pytest.raises(ValueError, match="bad hq address"):
            Client(text)
