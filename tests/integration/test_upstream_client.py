"""hq's OEHASHEQUIV upstream client (hq.upstream.oehashequiv) against real servers:
bitbake-hashserv over TCP, hq behind hq-gateway over unix:// and ws://, and servers that
answer garbage, too much, too little or nothing."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time

import pytest
import zmq

from helpers import Gateway, LineServer, Stack, wait_for
from hq.oehashequiv import split_address
from hq.upstream import agent as agent_module
from hq.upstream.agent import Agent
from hq.upstream.oehashequiv import Upstream, UpstreamError

M = "TestMethod"
T1, T2, T3 = "1" * 40, "2" * 40, "3" * 40
O1, O3 = "a" * 64, "c" * 64
U1, U2, U3 = "d" * 64, "e" * 64, "f" * 64


def run(coroutine):
    return asyncio.run(coroutine)


def report_known(client) -> None:
    """Three reports through a BitBake client: T2 equivalent to T1."""
    client.report_unihash(T1, M, O1, U1)
    client.report_unihash(T2, M, O1, U2)  # same outhash: U1
    client.report_unihash(T3, M, O3, U3)


async def session(address: str) -> dict:
    """Every call, switching between stream and normal mode, on one Upstream."""
    upstream = Upstream(address, timeout_s=20)
    unknown = [f"{n:040x}" for n in range(3000)]
    try:
        wave = [(M, [T1, T2, T3, *unknown]), ("OtherMethod", [T1])]
        out = {"wave": await upstream.get_unihash_groups(wave)}
        out["exists"] = await upstream.exists([U1, U2, U3] * 500)
        out["get"] = await upstream.get(M, T2)
        out["get_missing"] = await upstream.get(M, unknown[0])
        out["row"] = await upstream.get(M, T1, with_row=True)
        out["outhash"] = await upstream.get_outhash(M, O1, T2)
        out["again"] = await upstream.get_unihash_groups([(M, [T3])])  # back into get-stream
        out["ping"] = await upstream.ping()
        return out
    finally:
        await upstream.close()


def check_session(out: dict, bitbake_client) -> None:
    assert out["wave"] == [U1, U1, U3] + [None] * 3000 + [None]
    assert out["exists"] == [True, False, True] * 500
    assert out["get"] == {"taskhash": T2, "method": M, "unihash": U1}
    assert out["get_missing"] is None
    assert out["row"] == bitbake_client.get_taskhash(M, T1, True)
    assert out["outhash"] == bitbake_client.get_outhash(M, O1, T2)
    assert out["row"]["outhash"] == O1 and out["outhash"]["unihash"] == U1
    assert out["again"] == [U3]
    assert out["ping"] is True


def test_bitbake_hashserv_over_tcp(hashserv, bitbake, tmp_path):
    from hq.bench.reference import ReferenceServer

    reference = ReferenceServer(tmp_path, bitbake).start()
    try:
        with hashserv.create_client(reference.address) as client:
            report_known(client)
            check_session(run(session(reference.address)), client)
    finally:
        reference.stop()


@pytest.mark.parametrize("transport", ["unix", "ws"])
def test_hq_behind_its_gateway(hashserv, tmp_path, transport):
    (tmp_path / "hq").mkdir()
    stack = Stack(tmp_path / "hq")
    stack.start()
    gateway = None
    try:
        gateway = Gateway(tmp_path, stack.address)
        address = gateway.unix if transport == "unix" else gateway.ws
        with hashserv.create_client(gateway.tcp) as client:
            report_known(client)
            check_session(run(session(address)), client)
    finally:
        if gateway is not None:
            assert gateway.stop() == 0, gateway.log()
        assert stack.stop() == 0, stack.log()


#: A close, or a reset when the close meets lines still being written.
CLOSED = "closed the connection|connection to .* failed"
BAD_ANSWERS = {
    "not JSON": (lambda line: b"hello there\n", "not JSON"),
    "a line too long": (lambda line: b"x" * 100_000 + b"\n", "over"),
    "a close": (lambda line: b"", CLOSED),
    "not UTF-8": (lambda line: b"\xff\xfe\n", "UTF-8"),
    "a refusal": (
        lambda line: b'{"invoke-error": {"message": "Unknown command"}}\n',
        "refused.*Unknown command",
    ),
    # the stream entered, then fewer answers than lines: an error, never a shifted answer
    "answers short": (lambda line: b'"ok"\n\nabc\n', CLOSED),
    # the stream entered, then answers that are not unihashes: an error, never an answer
    # (the connection stays open: the client reads every answer, no reset cuts it short)
    "a malformed unihash": (lambda line: b'"ok"\n' if b"-stream" in line else b"E" * 64 + b"\n", "malformed"),
    "silence": (lambda line: None, "in time"),
}


@pytest.mark.parametrize("case", sorted(BAD_ANSWERS))
def test_a_bad_upstream_is_an_upstream_error(case):
    answer, message = BAD_ANSWERS[case]
    server = LineServer(answer, once=case != "a malformed unihash")

    async def ask():
        upstream = Upstream(server.address, timeout_s=1.0)
        try:
            if case in ("answers short", "a malformed unihash"):
                return await upstream.get_unihash_groups([(M, [T1, T2, T3])])
            return await upstream.get(M, T1)
        finally:
            await upstream.close()

    started = time.monotonic()
    try:
        with pytest.raises(UpstreamError, match=message):
            run(ask())
    finally:
        server.close()
    assert time.monotonic() - started < 5


def test_each_call_reconnects_after_a_failure():
    """A failed call drops the connection; the next call opens a new one."""
    answers = iter([b"garbage\n", b'{"taskhash": "1", "method": "m", "unihash": "u"}\n'])
    server = LineServer(lambda line: next(answers), once=True)

    async def twice():
        upstream = Upstream(server.address, timeout_s=2.0)
        try:
            with pytest.raises(UpstreamError):
                await upstream.get(M, T1)
            return await upstream.get(M, T1)
        finally:
            await upstream.close()

    try:
        assert run(twice()) == {"taskhash": "1", "method": "m", "unihash": "u"}
        assert server.connections == 2
    finally:
        server.close()


def test_nothing_listening_is_an_upstream_error_at_once():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: refused
        started = time.monotonic()
        with pytest.raises(UpstreamError, match="cannot reach"):
            run(Upstream(f"127.0.0.1:{port}", timeout_s=5).get(M, T1))
    assert time.monotonic() - started < 2


@pytest.mark.parametrize("address", ["tcp://127.0.0.1:1", "127.0.0.1", "host:99999", "unix://", "h:port"])
def test_addresses_it_cannot_use_are_refused(address):
    with pytest.raises(ValueError):
        split_address(address)


@pytest.mark.parametrize("taskhashes", [[""], [T1, ""], [f"{T1} {T2}"], [" "]])
def test_a_taskhash_that_is_empty_or_holds_whitespace_is_refused_before_sending(taskhashes):
    with pytest.raises(ValueError, match="whitespace"):
        run(Upstream("127.0.0.1:1", timeout_s=5).get_unihash_groups([(M, [T1]), (M, taskhashes)]))


def test_a_miss_remembered_again_is_the_newest():
    """The bound on remembered misses drops the oldest first: a key remembered again moves
    to the end, with its new expiry."""
    ctx = zmq.Context()
    try:
        agent = Agent(ctx, "inproc://unused", "127.0.0.1:1", timeout_s=1, negative_ttl_s=60)
        agent._remember("get", None, [T1, T2])
        agent._remember("get", None, [T1])
        assert list(agent.negative["get"][None]) == [T2, T1]
    finally:
        ctx.term()


@contextlib.contextmanager
def agent_for(address: str, timeout_s: float, negative_ttl_s: float = 0):
    """hq's upstream agent for ``address`` and the broker's end of its socket (inproc)."""
    ctx = zmq.Context()
    broker = ctx.socket(zmq.PAIR)
    broker.linger = 0
    broker.bind("inproc://agent-test")
    agent = Agent(ctx, "inproc://agent-test", address, timeout_s=timeout_s, negative_ttl_s=negative_ttl_s)
    agent.start()
    try:
        yield broker
    finally:
        broker.send_multipart([b"", b"stop"])
        agent.thread.join(5)
        broker.close()
        ctx.term()
    assert not agent.thread.is_alive()


def ask(broker, *frames) -> list:
    broker.send_multipart([b"q", b"get", *frames])
    assert broker.poll(10_000), "the agent did not answer"
    return broker.recv_multipart()


@pytest.mark.parametrize("case", ["silence", "garbage"])
def test_the_agent_says_timeout_for_silence_and_the_reason_for_garbage(case):
    """The broker counts an agent's "timeout" answer as its own deadline passing
    (upstream.timeouts), whichever of the two comes first; any other failure is an error."""
    server = LineServer({"silence": lambda line: None, "garbage": lambda line: b"garbage\n"}[case])
    try:
        with agent_for(server.address, timeout_s=0.3) as broker:
            qid, kind, text = ask(broker, M.encode(), T1.encode())
            assert (qid, kind) == (b"q", b"error")
            if case == "silence":
                assert text == b"timeout"
            else:
                assert text != b"timeout" and text, text
    finally:
        server.close()


class Recording:
    """An upstream that knows ``known`` ("method taskhash" -> unihash) and records each
    get-stream line it is asked."""

    def __init__(self, known: dict):
        self.known, self.asked = known, []
        self.server = LineServer(self.reply)

    def reply(self, line: bytes) -> bytes:
        if line.startswith(b"{"):  # entering get-stream
            return b'"ok"\n'
        text = line.decode().strip()
        self.asked.append(text)
        return (self.known.get(text, "") + "\n").encode()

    def take(self) -> list:
        asked, self.asked = self.asked, []
        return asked


def test_the_agent_asks_a_key_once_and_a_recent_miss_not_again():
    """A key asked twice in one question (a method each its own) goes upstream once; a
    miss is not asked again until --upstream-negative-ttl has passed, a hit (stored by the
    broker's backfill, not here) is."""
    upstream = Recording({f"{M} {T1}": U1})
    ttl = 3.0  # the asks before the wait take far less on a loaded machine
    try:
        with agent_for(upstream.server.address, timeout_s=10, negative_ttl_s=ttl) as broker:
            twice = "\n".join([T1, T2, T1]).encode()
            before = time.monotonic()  # the agent remembers the miss after this
            assert ask(broker, M.encode(), twice, b"Other", T1.encode()) == [
                b"q",
                b"ok",
                f"{U1}\n\n{U1}".encode(),
                b"",
            ]
            assert upstream.take() == [f"{M} {T1}", f"{M} {T2}", f"Other {T1}"]
            assert ask(broker, M.encode(), f"{T2}\n{T1}".encode())[2] == f"\n{U1}".encode()
            assert upstream.take() == [f"{M} {T1}"]

            def asked_again():
                ask(broker, M.encode(), T2.encode())
                return upstream.take()

            assert wait_for(asked_again, timeout=10, interval=0.05) == [f"{M} {T2}"]
            assert time.monotonic() - before >= ttl
    finally:
        upstream.server.close()


def test_the_agent_remembers_at_most_its_bound_of_misses_the_newest(monkeypatch):
    monkeypatch.setattr(agent_module, "MAX_NEGATIVES", 16)  # beyond: down to 14, the newest
    upstream = Recording({})
    taskhashes = [f"{n:040x}" for n in range(20)]
    try:
        with agent_for(upstream.server.address, timeout_s=10, negative_ttl_s=60) as broker:
            chunk = "\n".join(taskhashes).encode()
            assert ask(broker, M.encode(), chunk)[2:] == [b"\n" * 19]
            assert len(upstream.take()) == 20
            ask(broker, M.encode(), chunk)
            assert upstream.take() == [f"{M} {t}" for t in taskhashes[:6]]
    finally:
        upstream.server.close()
