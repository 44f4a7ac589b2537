"""The gateway's way to the broker: asyncio over one ZeroMQ DEALER per identity.

Anonymous OEHASHEQUIV connections share one :class:`Link`; a connection that logs in gets a
link of its own, because the broker binds a session to a ZeroMQ connection (PROTOCOL.md
§3.6). Every call has a deadline. A retryable answer (429, 500, 503) is sent again after a
backoff; an attempt without an answer is sent again on a fresh socket (a broker restart
loses what it held); a log-in is replayed on every new socket. When the deadline passes,
:class:`BrokerDown` is raised and the connection is closed without a reply: BitBake's client
then retries and, failing, falls back to the taskhash.
"""

from __future__ import annotations

import asyncio
import itertools
import time

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from hq import curve
from hq import protocol as p

BACKOFF_START_S = 0.05
BACKOFF_MAX_S = 1.0
#: How long a call waits for the connection to the broker to be up before it gives up: a
#: restarting broker is back within it; a dead one makes the gateway close at once, so
#: BitBake's client (4 tries) falls back to the taskhash within seconds.
CONNECT_GRACE_S = 1.0


class BrokerDown(ConnectionError):
    """No answer from the broker within the deadline."""


class Link:
    def __init__(self, ctx: zmq.asyncio.Context, address: str, timeout_s: float, keys=None):
        self.ctx = ctx
        self.address = address
        self.timeout_s = timeout_s
        self.attempt_s = max(timeout_s / 3.0, min(timeout_s, 1.0))
        self.keys = keys  # (server public key, client secret file or None) for CURVE
        self.login = None  # (username, token) to replay on every new socket
        self.become = None  # the user become-user made this link act as
        self.session = b""
        self.sock = None
        self._reader = None
        self._watcher = None
        self._up = None  # asyncio.Event: the connection to the broker has shaken hands
        self.down = False  # a call waited CONNECT_GRACE_S in vain: fail at once until it is up
        self._waiting: dict = {}  # request id -> Future of (status, body)
        self._ids = itertools.count(1)
        self._generation = 0

    # --- socket ---------------------------------------------------------------------------
    def _open(self) -> None:
        sock = self.ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.setsockopt(zmq.MAXMSGSIZE, p.MAX_FRAME_BYTES)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 500)
        if self.keys is not None:
            curve.connect_as(sock, *self.keys)
        monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
        sock.connect(self.address)
        self.sock = sock
        self.session = b""
        self._generation += 1
        loop = asyncio.get_running_loop()
        self._up = asyncio.Event()
        self._reader = loop.create_task(self._read(sock))
        self._watcher = loop.create_task(self._watch(sock, monitor, self._up))

    def reset(self) -> None:
        """Drop the socket (and every answer still owed on it)."""
        for task in (self._reader, self._watcher):
            if task is not None:
                task.cancel()
        self._reader = self._watcher = None
        if self.sock is not None:
            self.sock.close(linger=0)
            self.sock = None
        self.session = b""

    close = reset

    async def _watch(self, sock, monitor, up: asyncio.Event) -> None:
        try:
            while True:
                event = parse_monitor_message(await monitor.recv_multipart())["event"]
                if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    up.set()
                    self.down = False
                elif event == zmq.EVENT_DISCONNECTED:
                    up.clear()
        except (zmq.ZMQError, asyncio.CancelledError):
            pass
        finally:
            try:
                sock.disable_monitor()
            except zmq.ZMQError:
                pass
            monitor.close(linger=0)

    async def _read(self, sock) -> None:
        while True:
            try:
                frames = await sock.recv_multipart()
            except (zmq.ZMQError, asyncio.CancelledError):
                return
            try:
                reply = p.decode_reply(frames)
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
        while True:
            if self.sock is None:
                self._open()
            if not self._up.is_set():
                if self.down:  # known down: close at once (libzmq keeps reconnecting meanwhile)
                    raise BrokerDown(f"hq's broker at {self.address} is not reachable")
                try:
                    await asyncio.wait_for(self._up.wait(), min(CONNECT_GRACE_S, deadline - time.monotonic()))
                except (asyncio.TimeoutError, ValueError):
                    self.down = True
                    raise BrokerDown(f"hq's broker at {self.address} is not reachable") from None
            if self.login is not None and not self.session and command != p.AUTH:
                await self._log_in(deadline)
            generation = self._generation
            status, reply = await self._attempt(command, list(body), deadline)
            if status is None:  # no answer in this attempt: a fresh socket, then again
                if self._generation == generation:
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
        future = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = future
        try:
            await self.sock.send_multipart(
                p.encode_request(request_id, command, body, self.session), flags=zmq.NOBLOCK
            )
        except zmq.ZMQError:
            pass  # the pipe is full or the socket gone: the attempt times out and resends
        # A log-in is not sent twice: a wrong token's answer comes after the broker's 1 s.
        whole = command in p.LONG_COMMANDS or command == p.AUTH
        wait = remaining if whole else min(remaining, self.attempt_s)
        try:
            return await asyncio.wait_for(future, wait)
        except asyncio.TimeoutError:
            if time.monotonic() >= deadline:
                raise BrokerDown(f"no answer from hq at {self.address}") from None
            return None, []
        finally:
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
