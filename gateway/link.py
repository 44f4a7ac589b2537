"""The gateway's way to the broker: asyncio over one ZeroMQ DEALER per identity.

Anonymous OEHASHEQUIV connections share one :class:`Link`; a connection that logs in gets a
link of its own, because the broker binds a session to a ZeroMQ connection (PROTOCOL.md
§3.6). Every call has a deadline. A retryable answer (429, 500, 503) is sent again after a
backoff; an attempt without an answer is sent again on a fresh socket (a broker restart
loses what it held); a log-in is replayed on every new socket. When the deadline passes,
:class:`BrokerDown` is raised and the connection is closed without a reply: BitBake's client
then retries and, failing, falls back to the taskhash.

``--broker`` may name several brokers of one database, separated by commas: each link
starts on one picked at random (so a gateway's links spread over them) and moves to the
next when its broker drops the connection, cannot be reached within CONNECT_GRACE_S, or
lets an attempt go unanswered; what it was waiting for is sent again there.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time

import zmq
from zmq.utils.monitor import parse_monitor_message

from hq import addresses, curve
from hq import protocol as p
from hq.sockets import dealer, recv_frames, send_frames

BACKOFF_START_S = 0.05
BACKOFF_MAX_S = 1.0
#: How long a call waits for the connection to the broker to be up before it gives up: a
#: restarting broker is back within it; a dead one makes the gateway close at once, so
#: BitBake's client (4 tries) falls back to the taskhash within seconds.
CONNECT_GRACE_S = 1.0


class BrokerDown(ConnectionError):
    """No answer from the broker within the deadline."""


class Link:
    def __init__(self, ctx: zmq.Context, address: str, timeout_s: float, keys=None):
        self.ctx = ctx
        self.addresses = addresses.split(address)
        self._current = int.from_bytes(os.urandom(2), "big") % len(self.addresses)
        self.timeout_s = timeout_s
        self.attempt_s = max(timeout_s / 3.0, min(timeout_s, 1.0))
        self.keys = keys  # (server public key, client secret file or None) for CURVE
        self.login = None  # (username, token) to replay on every new socket
        self.become = None  # the user become-user made this link act as
        self.session = b""
        self.sock = None
        self.monitor = None
        self._up = None  # asyncio.Event: the connection to the broker has shaken hands
        self.down = False  # a call waited CONNECT_GRACE_S in vain: fail at once until it is up
        self._waiting: dict = {}  # request id -> Future of (status, body)
        self.batcher = None  # hq.gateway.batching.Batcher of this link's lookups, on first use
        self._ids = itertools.count(1)
        self._generation = 0

    @property
    def address(self) -> str:
        """The broker this link uses now."""
        return self.addresses[self._current]

    def _fail_over(self) -> bool:
        """Leave this broker for the next one (False with only one); the calls waiting on it
        are sent again there."""
        if len(self.addresses) == 1:
            return False
        self.reset()
        self._generation += 1  # the calls waiting on it retry here, not fail over again
        self._current = (self._current + 1) % len(self.addresses)
        self.down = False
        for future in list(self._waiting.values()):
            _expire(future)
        return True

    # --- socket ---------------------------------------------------------------------------
    # Plain ZeroMQ sockets read through the event loop (add_reader on ZMQ_FD): cheaper per
    # message than zmq.asyncio. ZMQ_FD is edge-triggered: after every send, and on every
    # wake-up, ZMQ_EVENTS is read until no message waits.
    def _open(self) -> None:
        sock = dealer(self.ctx, p.MAX_FRAME_BYTES, reconnect_max_ms=500)
        if self.keys is not None:
            curve.connect_as(sock, *self.keys)
        monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
        sock.connect(self.address)
        self.sock, self.monitor = sock, monitor
        self.session = b""
        self._generation += 1
        self._up = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_reader(sock.getsockopt(zmq.FD), self._drain_replies)
        loop.add_reader(monitor.getsockopt(zmq.FD), self._drain_events)
        loop.call_soon(self._drain_events)

    def reset(self) -> None:
        """Drop the socket (and every answer still owed on it)."""
        if self.sock is not None:
            loop = asyncio.get_running_loop()
            for sock in (self.sock, self.monitor):
                loop.remove_reader(sock.getsockopt(zmq.FD))
            try:
                self.sock.disable_monitor()
            except zmq.ZMQError:
                pass
            self.monitor.close(linger=0)
            self.sock.close(linger=0)
            self.sock = self.monitor = None
        self.session = b""

    close = reset

    def _drain_events(self) -> None:
        monitor = self.monitor
        try:
            while monitor is not None and monitor.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                event = parse_monitor_message(monitor.recv_multipart(zmq.NOBLOCK))["event"]
                if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    self._up.set()
                    self.down = False
                elif event == zmq.EVENT_DISCONNECTED:
                    self._up.clear()
                    if len(self.addresses) > 1:  # it went away: the next broker, now
                        asyncio.get_running_loop().call_soon(self._fail_over)
                        return
        except zmq.ZMQError:  # closed meanwhile (reset)
            return

    def _drain_replies(self) -> None:
        sock = self.sock
        while sock is not None:
            try:
                if not sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                    return
                reply = p.decode_reply(recv_frames(sock))
            except zmq.ZMQError:  # Again, or closed meanwhile (reset)
                return
            except p.ProtocolError:
                continue
            future = self._waiting.pop(reply.request_id, None)
            if future is not None and not future.done():
                future.set_result((reply.status, reply.body))

    # --- calls ----------------------------------------------------------------------------
    async def call(self, command: bytes, body=(), deadline: float | None = None) -> tuple:
        """``(status, body)`` of the broker's answer; raises BrokerDown at the deadline.
        Retryable statuses are retried; any other status is the caller's to map."""
        deadline = deadline or time.monotonic() + self.timeout_s
        backoff = BACKOFF_START_S
        others = len(self.addresses) - 1  # brokers this call may still move to when one is down
        while True:
            if self.sock is None:
                self._open()
            if not self._up.is_set():
                if not self.down:
                    try:
                        await asyncio.wait_for(
                            self._up.wait(), min(CONNECT_GRACE_S, deadline - time.monotonic())
                        )
                    except (asyncio.TimeoutError, ValueError):
                        self.down = True
                if self.down:  # known down: close at once (libzmq keeps reconnecting meanwhile)
                    if others and time.monotonic() < deadline and self._fail_over():
                        others -= 1
                        continue
                    raise BrokerDown(f"hq's broker at {self.address} is not reachable")
            if self.login is not None and not self.session and command != p.AUTH:
                await self._log_in(deadline)
            generation = self._generation
            status, reply = await self._attempt(command, list(body), deadline)
            if status is None:  # no answer in this attempt: a fresh socket (the next broker), again
                if self._generation == generation and not self._fail_over():
                    self.reset()
                continue
            if status == p.E_SESSION:
                self.reset()  # a new connection logs in again
                continue
            if status in p.RETRYABLE_STATUSES and time.monotonic() + backoff < deadline:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX_S)
                continue
            return status, reply

    async def _attempt(self, command: bytes, body: list, deadline: float) -> tuple:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise BrokerDown(f"no answer from hq at {self.address}")
        request_id = b"%x" % next(self._ids)
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._waiting[request_id] = future
        try:
            send_frames(self.sock, p.encode_request(request_id, command, body, self.session))
        except zmq.ZMQError:
            pass  # the pipe is full or the socket gone: the attempt times out and resends
        loop.call_soon(self._drain_replies)  # ZMQ_FD is edge-triggered: look after a send
        # A log-in is not sent twice: a wrong token's answer comes after the broker's 1 s.
        whole = command in p.LONG_COMMANDS or command == p.AUTH
        wait = remaining if whole else min(remaining, self.attempt_s)
        timer = loop.call_later(wait, _expire, future)  # cheaper than asyncio.wait_for
        try:
            return await future
        except TimeoutError:
            if time.monotonic() >= deadline:
                raise BrokerDown(f"no answer from hq at {self.address}") from None
            return None, []
        finally:
            timer.cancel()
            self._waiting.pop(request_id, None)

    async def _log_in(self, deadline: float) -> None:
        """Log in (and become) on the current socket; a refusal now is BrokerDown: the
        credentials worked when the OEHASHEQUIV client gave them."""
        username, token = self.login
        status, body = await self.call(p.AUTH, [username.encode(), token.encode()], deadline)
        if status != p.OK or len(body) < 2:
            raise BrokerDown(f"hq refused the log-in again: {p.error_text(body)}")
        self.session = bytes(body[1])
        if self.become is not None:
            status, body = await self._attempt(p.BECOME_USER, [self.become.encode()], deadline)
            if status != p.OK:
                raise BrokerDown(f"hq refused become-user again: {p.error_text(body)}")


def _expire(future) -> None:
    if not future.done():
        future.set_exception(TimeoutError())
