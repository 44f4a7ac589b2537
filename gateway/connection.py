"""One OEHASHEQUIV connection: handshake, normal mode, stream modes (reference §2-§5).

Stream lines that arrive together become one hq request: the ``get-stream`` lines of one
read, with those every other connection on the same link handed over in the same turn of the
event loop, are one batched ``get`` (hq.gateway.batching); ``exists-stream`` lines likewise
an ``exists``. So an unmodified BitBake client, which pipelines a runqueue wave's lookups on
one connection, gets hq's batching, and so do many clients asking one hash at a time.
Answers go back in order, one line each, as the reference's.
"""

from __future__ import annotations

import asyncio
import json
import logging

from hq import protocol as p
from hq.oehashequiv import (
    MAX_CHUNKED,
    MAX_LINE,
    Drop,
    LineBuffer,
    check_protocol_line,
    decode,
    encode,
    header,
    is_chunk_start,
)

from . import batching, commands
from .batching import Batcher
from .link import BrokerDown, Link

log = logging.getLogger(__name__)

READ_BYTES = 256 * 1024
#: Bytes of answers buffered for a client before the gateway waits for it to read them
#: (asyncio's own high-water mark is 64 KiB).
WRITE_HIGH_WATER = 64 * 1024
#: How long a closing connection's last answer may take to leave.
CLOSE_DRAIN_S = 5.0
STREAM_MODES = ("get-stream", "exists-stream", "gc-mark-stream")


class Connection:
    def __init__(self, gateway, reader, writer, chunked: bool = True, max_line: int = MAX_LINE):
        """``reader``/``writer``: asyncio's streams, or a WebSocket's (hq.gateway.websocket:
        one message per line, no chunking, longer lines)."""
        self.gateway = gateway
        self.reader = reader
        self.writer = writer
        self.chunked = chunked
        self.stuck = False  # answers left unread past --write-timeout: abort, do not close
        self.idled = False  # silent past --idle-timeout: aborted
        self.plain = isinstance(writer, asyncio.StreamWriter)
        self.loop = asyncio.get_running_loop()
        self.lines = LineBuffer(max_line)
        self.queue: list = []  # lines read and not yet handled
        self.link: Link = gateway.anonymous
        self.own_link = False
        self.reading_since = None  # loop time the read in progress began (None: not reading)
        self.idle_timer = None

    async def _line(self):
        """The next line, or None at EOF."""
        while not self.queue:
            # --idle-timeout: one timer per connection, which aborts it when it finds a read
            # waiting that long (the read then ends with EOF or a reset). It is armed at most
            # once per timeout, not once per read: a timer made and cancelled around every
            # read was a tenth of the gateway's CPU under single lookups.
            self.reading_since = self.loop.time()
            if self.idle_timer is None:
                self.idle_timer = self.loop.call_at(
                    self.reading_since + self.gateway.idle_timeout_s, self._idle_check
                )
            try:
                data = await self.reader.read(READ_BYTES)
            finally:
                self.reading_since = None
            if self.idled:
                raise Drop("silent for longer than --idle-timeout")
            if not data:
                if self.lines.pending():
                    raise Drop("a line cut off by EOF")
                return None
            self.queue.extend(self.lines.feed(data))
        return self.queue.pop(0)

    def _more_lines(self) -> list:
        """Every complete line already read: the rest of what arrived with the last line
        taken (a pipelined batch is read up to READ_BYTES at a time)."""
        lines, self.queue = self.queue, []
        return lines

    def _write(self, data: bytes) -> None:
        self.writer.write(data)

    def _send(self, value) -> None:
        self._write(encode(value, self.chunked))

    def _idle_check(self) -> None:
        self.idle_timer = None
        since = self.reading_since
        if since is None:  # not reading now: the next read arms the timer again
            return
        due = since + self.gateway.idle_timeout_s
        if self.loop.time() >= due:
            self.idled = True
            self.writer.transport.abort()
        else:
            self.idle_timer = self.loop.call_at(due, self._idle_check)

    async def _drain(self) -> None:
        # A client that leaves its answers unread is closed after --write-timeout; meanwhile
        # its connection alone waits (in stream mode it is not read either: TCP pushes back).
        # Below the transport's high-water mark there is nothing to wait for: skip wait_for
        # (a task per call). A WebSocket writer sends in drain(): always.
        if self.plain and not self.writer.transport.is_closing():
            if self.writer.transport.get_write_buffer_size() < WRITE_HIGH_WATER:
                return
        try:
            await asyncio.wait_for(self.writer.drain(), self.gateway.write_timeout_s)
        except asyncio.TimeoutError:
            self.stuck = True
            raise

    async def run(self) -> None:
        try:
            await self._handshake()
            while True:
                line = await self._line()
                if line is None:
                    return
                message = await self._message(line)
                if message is None:  # the reference's goodbye: close without a reply
                    return
                await self._request(message)
                await self._drain()
        except (Drop, commands.Invoke, BrokerDown, asyncio.TimeoutError, ConnectionError) as exc:
            if isinstance(exc, commands.Invoke):
                self._send({"invoke-error": {"message": str(exc)}})
            log.debug("closing a connection: %s", exc)
        except Exception:  # a bug must cost one connection, never the gateway
            log.exception("closing a connection after an unexpected error")
        finally:
            await self._close()

    async def _close(self) -> None:
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        if self.own_link:
            self.link.close()
        if not self.stuck:
            try:  # a last answer (an invoke-error) on its way out
                await asyncio.wait_for(self.writer.drain(), CLOSE_DRAIN_S)
            except (ConnectionError, asyncio.TimeoutError, RuntimeError):
                self.stuck = True
        if self.stuck:
            # Answers the client will not read: a close would wait for them to leave first.
            self.writer.transport.abort()
        else:
            self.writer.close()

    async def _handshake(self) -> None:
        line = await self._line()
        if line is None or not line.strip():
            raise Drop("no protocol line")
        check_protocol_line(line)
        needs_headers = False
        while True:
            line = await self._line()
            if line is None:
                raise Drop("EOF in the headers")
            if not line.strip():
                break
            tag, value = header(line)
            if tag == "needs-headers":
                needs_headers = value == "true"
        if needs_headers:
            self._write(b"\n")
            await self._drain()  # (a WebSocket writer sends only here: the client waits for it)

    async def _message(self, line: str):
        value = decode(line.rstrip())
        if not value or not is_chunk_start(value):
            return value
        parts, size = [], 0
        while True:
            part = await self._line()
            if part is None:
                raise Drop("EOF in a chunk stream")
            if not part.rstrip():  # the end, as for BitBake's reader (a blank line)
                break
            size += len(part)
            if size > MAX_CHUNKED:
                raise Drop(f"a chunked message over {MAX_CHUNKED} characters")
            parts.append(part)
        return decode("".join(parts))

    async def _request(self, message) -> None:
        name = commands.command_of(message)
        args = message[name]
        if name == "auth":
            self._send(await self._auth(args))
        elif name == "become-user":
            self._send(await self._become(args))
        elif name in STREAM_MODES:
            # Permissions are checked before "ok" (reference §5.1), with a command of the
            # same permission: stats needs @read, gc-status @db-admin.
            await commands.ask(self.link, p.GC_STATUS if name == "gc-mark-stream" else p.STATS)
            self._send("ok")
            await self._drain()
            await self._stream(name)
        else:
            self._send(await commands.HANDLERS[name](self.link, args))

    async def _auth(self, args) -> dict:
        username, token = commands._field(args, "username"), commands._field(args, "token")
        link = self.gateway.new_link()
        status, body = await link.call(p.AUTH, [commands._enc(username), commands._enc(token)])
        if status != p.OK or len(body) < 2:
            link.close()
            if status in (p.E_UNAUTHORIZED, p.E_INVALID, p.E_TOO_LARGE):
                raise commands.Invoke(f"Unable to authenticate as {username}")
            raise Drop(f"hq answered {p.STATUS_NAMES.get(status, status)} to a log-in")
        link.session = bytes(body[1])
        link.login = (username, token)
        if self.own_link:
            self.link.close()
        self.link, self.own_link = link, True
        return commands._json(body)

    async def _become(self, args) -> dict:
        username = commands._field(args, "username")
        result = commands._json(await commands.ask(self.link, p.BECOME_USER, [commands._enc(username)]))
        self.link.become = username
        return result

    async def _stream(self, mode: str) -> None:
        """Stream mode until END (or an empty line). The lines of each read are one hq
        request; up to MAX_INFLIGHT of them are in flight while more lines are read, and the
        answers go back in order as each completes. While one batch is with the broker, the
        next accumulates, so batches grow with the load."""
        lookup = {
            "get-stream": self._get_batch,
            "exists-stream": self._exists_batch,
            "gc-mark-stream": self._gc_mark_batch,
        }[mode]
        inflight: asyncio.Queue = asyncio.Queue(MAX_INFLIGHT)
        loop = asyncio.get_running_loop()

        async def read() -> bool:
            while True:
                line = await self._line()
                if line is None:
                    await inflight.put(None)
                    return False
                batch = [line, *self._more_lines()]
                end = next((i for i, text in enumerate(batch) if text.rstrip() in ("END", "")), None)
                if end is not None:
                    self.queue[:0] = batch[end + 1 :]
                    batch = batch[:end]
                if batch:
                    await inflight.put(lookup(batch))  # a future of the batch's answers
                if end is not None:
                    await inflight.put(None)
                    return True

        async def write() -> None:
            while True:
                task = await inflight.get()
                if task is None:
                    return
                try:
                    answers = await task
                except Partial as partial:  # the lines before a bad one, then its error
                    if partial.answers:
                        self._write(("\n".join(partial.answers) + "\n").encode("ascii"))
                    raise partial.error from None
                self._write(("\n".join(answers) + "\n").encode("ascii"))
                # after every batch: a client that does not read holds up its own batches
                # (and, with the queue full, its own reads), never the gateway's memory
                await self._drain()

        reader, writer = loop.create_task(read()), loop.create_task(write())
        try:
            await asyncio.wait({reader, writer}, return_when=asyncio.FIRST_EXCEPTION)
            if writer.done() and writer.exception() is not None:
                raise writer.exception()
            ended = await reader
            await writer
        finally:
            for task in (reader, writer):
                task.cancel()
            while not inflight.empty():
                task = inflight.get_nowait()
                if task is not None:
                    task.cancel()
        if ended:
            self._write(b"ok\n")
            await self._drain()

    def _batcher(self) -> Batcher:
        if self.link.batcher is None:
            self.link.batcher = Batcher(self.link)
        return self.link.batcher

    def _get_batch(self, lines: list) -> asyncio.Future:
        """The answers to get-stream lines: a future, from the lookups of every connection on
        this link gathered together (hq.gateway.batching)."""
        pairs, asked = [], []
        for n, line in enumerate(lines):
            fields = line.split()
            if len(fields) != 2:  # the lines before it are answered, then the close
                bad = Drop("a get-stream line without exactly two fields")
                if not n:
                    return _failed(bad)
                return _cut(self._get_batch(lines[:n]), bad)
            if commands.storable(fields[0]) and commands.storable(fields[1]):  # else no mapping can exist
                pairs.append(fields)
                asked.append(n)
        return _spread(self._batcher().get(pairs), asked, len(lines), "")

    def _exists_batch(self, lines: list) -> asyncio.Future:
        unihashes = [line.rstrip() for line in lines]  # (BitBake's reader strips the end only)
        asked = [n for n, u in enumerate(unihashes) if commands.storable(u)]  # else never stored
        return _spread(self._batcher().exists([unihashes[n] for n in asked]), asked, len(lines), "false")

    def _gc_mark_batch(self, lines: list) -> asyncio.Task:
        return asyncio.get_running_loop().create_task(self._gc_mark(lines))

    async def _gc_mark(self, lines: list) -> list:
        """Each line ``{"mark": M, "where": {...}}`` answered ``{"count": N}``: one hq
        gc-mark-stream request for the lines of a read, one chunk (and count) per line. A bad
        line ends the stream as the reference ends it: the lines before it are marked and
        answered, then its invoke-error (not JSON, a key missing) or a close (a wrong type)."""
        body, error = [], None
        for line in lines:
            text = line.rstrip()
            try:
                request = json.loads(text)
            except ValueError:
                error = commands.Invoke(f"Could not decode JSONL input '{text}'")
                break
            keys = ("mark", "where") if isinstance(request, dict) else ()
            missing = next((k for k in keys if k not in request), None)
            if missing:
                error = commands.Invoke(f"Input line is missing key ''{missing}'' ")
                break
            if not (isinstance(request, dict) and isinstance(request["mark"], str)):
                error = Drop("a gc-mark-stream line that is not {mark: text, where: {...}}")
                break
            if not isinstance(request["where"], dict):
                error = Drop("a gc-mark-stream where that is not an object")
                break
            if any(isinstance(v, (list, dict)) for v in request["where"].values()):
                error = Drop("a gc-mark-stream where with a list or object value")  # (the reference's
                break  # database cannot bind one and closes; other values go on to hq as before)
            where = p.encode_json(request["where"]).decode("utf-8")
            body += [commands._enc(request["mark"]), p.pack_items([where])]
        counts: list = []
        step = 2 * batching.MAX_GROUPS
        for start in range(0, len(body), step):
            reply = await commands.ask(self.link, p.GC_MARK_STREAM, body[start : start + step])
            counts += [int(bytes(frame)) for frame in reply]
        answers = [json.dumps({"count": n}) for n in counts]
        if error is not None:
            raise Partial(answers, error)
        return answers


class Partial(Exception):
    """A stream batch cut short by a bad line: the answers before it, and its error."""

    def __init__(self, answers: list, error: Exception):
        super().__init__(str(error))
        self.answers, self.error = answers, error


#: Batches of one stream connection with the broker at once.
MAX_INFLIGHT = 4


def _then(source: asyncio.Future, convert) -> asyncio.Future:
    """A future of ``convert(result)`` once ``source`` is done (what ``convert`` raises is its
    error); ``source``'s cancellation and error pass through."""
    out = asyncio.get_running_loop().create_future()

    def fill(done: asyncio.Future) -> None:
        if out.done():
            return
        if done.cancelled():
            out.cancel()
        elif done.exception() is not None:
            out.set_exception(done.exception())
        else:
            try:
                out.set_result(convert(done.result()))
            except Exception as exc:
                out.set_exception(exc)

    source.add_done_callback(fill)
    return out


def _cut(answers: asyncio.Future, error: Exception) -> asyncio.Future:
    """The answers of the lines before a bad one, then its error (:class:`Partial`)."""

    def partial(result):
        raise Partial(result, error)

    return _then(answers, partial)


def _failed(error: Exception) -> asyncio.Future:
    future = asyncio.get_running_loop().create_future()
    future.set_exception(error)
    return future


def _spread(asked: asyncio.Future, positions: list, n: int, default: str) -> asyncio.Future:
    """The answers of ``n`` lines, where only those at ``positions`` were asked (the others
    get ``default``): ``asked`` itself when that is all of them."""
    if len(positions) == n:
        return asked

    def placed(result):
        answers = [default] * n
        for position, answer in zip(positions, result):
            answers[position] = answer
        return answers

    return _then(asked, placed)
