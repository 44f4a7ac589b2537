"""An OEHASHEQUIV upstream: bitbake-hashserv, the public Yocto server, another hq behind its
gateway (bitbake-hashserv-protocol.md §2-§5, §7.10).

One :class:`Upstream` is one connection, opened on first use and again after any failure.
Lookups use the stream modes: the lines of a whole batch are written while the answers are
read (§5.2), so a batch costs one round trip, not one per hash, which is why a cold local
server in front of a distant upstream wants hq. Every call has a deadline. Anything but the
answer expected (a close, garbage, a line too long, no answer in time) is an
:class:`UpstreamError`, and the connection is dropped, since its stream can no longer be
trusted to line up with the questions: a wrong answer is never made of it.
"""

from __future__ import annotations

import asyncio
import json
import time

from hq import addresses
from hq import oehashequiv as wire
from hq import protocol as p

#: Stream lines written before the writer waits for the socket to drain.
WRITE_LINES = 1024
HANDSHAKE = b"OEHASHEQUIV 1.1\nneeds-headers: false\n\n"


class UpstreamError(ConnectionError):
    """The upstream did not answer as the protocol says, or not in time."""


class UpstreamTimeout(UpstreamError):
    """The upstream did not answer in time (counted apart from its errors)."""


class Upstream:
    def __init__(self, address: str, timeout_s: float, username: str | None = None, token: str | None = None):
        self.kind, self.target = wire.split_address(address)
        self.address = addresses.redacted(address)  # what errors say: never a password in a URL
        self.timeout_s = timeout_s
        self.login = (username, token) if username else None
        self._lock = asyncio.Lock()  # one call at a time on the connection
        self._conn: _Lines | None = None
        self._mode: str | None = None  # the stream mode the connection is in, if any

    # --- calls ----------------------------------------------------------------------------
    async def get_unihash_groups(self, groups: list) -> list:
        """For ``[(method, [taskhash, ...]), ...]``, each taskhash's unihash or None, in
        order: one get-stream. The lines are made and checked a group at a time (joins and
        splits, not a Python step per lookup: a cold burst asks 360,000)."""
        lines: list = []
        for method, taskhashes in groups:
            if method.split() != [method] or "\n".join(taskhashes).split() != list(taskhashes):
                raise ValueError("a method or taskhash that is empty or holds whitespace")
            if taskhashes:
                lines += (f"{method} " + f"\n{method} ".join(taskhashes)).split("\n")
        answers = await self._stream("get-stream", lines)
        try:  # every answer a unihash or empty (a miss), checked in C as hq's GET replies are
            return p.unpack_unihashes("\n".join(answers).encode("utf-8", "replace"), len(answers))
        except p.ProtocolError:
            raise UpstreamError(f"{self.address} answered a malformed unihash") from None

    async def exists(self, unihashes: list) -> list:
        """True or False for each unihash, in order: one exists-stream."""
        answers = await self._stream("exists-stream", list(unihashes))
        if any(answer not in ("true", "false") for answer in answers):
            raise UpstreamError(f"{self.address} answered exists-stream with something else than true/false")
        return [answer == "true" for answer in answers]

    async def get(self, method: str, taskhash: str, with_row: bool = False):
        """``get``: the mapping (or, ``with_row``, the full row) as a dict, or None."""
        return await self._normal({"get": {"taskhash": taskhash, "method": method, "all": with_row}})

    async def get_outhash(self, method: str, outhash: str, taskhash: str, with_unihash: bool = True):
        """``get-outhash``: the oldest report of ``(method, outhash)`` as a dict, or None."""
        args = {"outhash": outhash, "taskhash": taskhash, "method": method, "with_unihash": with_unihash}
        return await self._normal({"get-outhash": args})

    async def ping(self) -> bool:
        return (await self._normal({"ping": {}})) == {"alive": True}

    async def close(self) -> None:
        conn, self._conn, self._mode = self._conn, None, None
        if conn is not None:
            await conn.close()

    # --- machinery ------------------------------------------------------------------------
    async def _normal(self, message: dict):
        async with self._lock:
            deadline = time.monotonic() + self.timeout_s
            try:
                conn = await self._ready(None, deadline)
                conn.write(wire.encode(message, conn.chunked))
                reply = await self._message(conn, deadline)
            except BaseException:
                await self.close()
                raise
            if isinstance(reply, dict) and "invoke-error" in reply:
                await self.close()  # the server closes after an invoke-error
                raise UpstreamError(f"{self.address} refused: {_error_text(reply)}")
            if reply is not None and not isinstance(reply, dict):
                await self.close()
                raise UpstreamError(f"{self.address} answered {type(reply).__name__}, not an object")
            return reply

    async def _stream(self, mode: str, lines: list) -> list:
        if not lines:
            return []
        if any("\n" in line or not line.strip() for line in lines):
            raise ValueError("a stream line must be one non-empty line")
        async with self._lock:
            deadline = time.monotonic() + self.timeout_s
            try:
                conn = await self._ready(mode, deadline)
                return await conn.exchange(lines, deadline)
            except BaseException:
                await self.close()
                raise

    async def _ready(self, mode: str | None, deadline: float):
        """The connection, open, logged in and in ``mode`` (a stream mode or None: normal)."""
        if self._conn is None:
            self._conn = await _within(_open(self.kind, self.target), deadline, self.address)
            self._conn.write(HANDSHAKE)
            self._mode = None
            if self.login is not None:
                username, token = self.login
                auth = {"auth": {"username": username, "token": token}}
                self._conn.write(wire.encode(auth, self._conn.chunked))
                reply = await self._message(self._conn, deadline)
                if not (isinstance(reply, dict) and reply.get("result") is True):
                    text = _error_text(reply)
                    raise UpstreamError(f"{self.address} refused the log-in as {username}: {text}")
        conn = self._conn
        if self._mode != mode:
            if self._mode is not None:
                conn.write(b"END\n")
                if await conn.line(deadline) != "ok":
                    raise UpstreamError(f"{self.address} did not leave {self._mode}")
                self._mode = None
            if mode is not None:
                conn.write(wire.encode({mode: None}, conn.chunked))
                reply = await self._message(conn, deadline)
                if reply != "ok":
                    raise UpstreamError(f"{self.address} refused {mode}: {_error_text(reply)}")
                self._mode = mode
        return conn

    async def _message(self, conn, deadline: float):
        """One normal-mode reply, chunked or not."""
        value = _decode(await conn.line(deadline), self.address)
        if not wire.is_chunk_start(value):
            return value
        parts = []
        while True:
            part = await conn.line(deadline, strip=False)
            if not part:
                return _decode("".join(parts), self.address)
            parts.append(part)


def _decode(text: str, address: str):
    try:
        return wire.decode(text)
    except wire.Drop:
        raise UpstreamError(f"{address} sent a line that is not JSON") from None


def _error_text(reply) -> str:
    if isinstance(reply, dict) and isinstance(reply.get("invoke-error"), dict):
        return str(reply["invoke-error"].get("message", "?"))
    return json.dumps(reply)[:200]


async def _within(awaitable, deadline: float, address: str):
    try:
        return await asyncio.wait_for(awaitable, max(0.0, deadline - time.monotonic()))
    except asyncio.TimeoutError:
        raise UpstreamTimeout(f"no answer from {address} in time") from None
    except OSError as exc:
        raise UpstreamError(f"cannot reach {address}: {exc.strerror or exc}") from None


async def _open(kind: str, target):
    if kind == "unix":
        reader, writer = await asyncio.open_unix_connection(target, limit=wire.MAX_LINE + 2)
        return _Lines(reader, writer, target)
    if kind == "tcp":
        reader, writer = await asyncio.open_connection(*target, limit=wire.MAX_LINE + 2)
        return _Lines(reader, writer, "%s:%d" % target)
    from .websocket import open_websocket  # the [gateway] extra's websockets, on first use

    return await open_websocket(target)


class _Lines:
    """Lines over a byte stream: what :class:`Upstream` needs of a connection."""

    chunked = True

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, address: str):
        self.reader, self.writer, self.address = reader, writer, address

    def write(self, data: bytes) -> None:
        self.writer.write(data)

    async def line(self, deadline: float, strip: bool = True) -> str:
        try:
            data = await asyncio.wait_for(self.reader.readline(), max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise UpstreamTimeout(f"no answer from {self.address} in time") from None
        except ValueError:  # longer than the limit
            raise UpstreamError(f"{self.address} sent a line over {wire.MAX_LINE} bytes") from None
        except OSError as exc:
            raise UpstreamError(f"the connection to {self.address} failed: {exc.strerror or exc}") from None
        if not data.endswith(b"\n"):
            raise UpstreamError(f"{self.address} closed the connection")
        try:
            text = data[:-1].decode("utf-8")
        except UnicodeDecodeError:
            raise UpstreamError(f"{self.address} sent a line that is not UTF-8") from None
        return text.rstrip() if strip else text

    async def exchange(self, lines: list, deadline: float) -> list:
        """Write every line while reading the answers (a server may answer as it reads)."""

        async def send() -> None:
            for start in range(0, len(lines), WRITE_LINES):
                self.writer.write(("\n".join(lines[start : start + WRITE_LINES]) + "\n").encode("utf-8"))
                await self.writer.drain()

        sender = asyncio.get_running_loop().create_task(send())
        try:
            answers = [await self.line(deadline) for _ in lines]
            await _within(sender, deadline, self.address)
            return answers
        finally:
            sender.cancel()

    async def close(self) -> None:
        self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), 1.0)
        except (asyncio.TimeoutError, OSError):
            pass
