"""The broker's agent for its upstream: a thread of the broker process that answers its
questions over an ``inproc://`` PAIR socket, asking the upstream as little and as seldom as
it can.

The broker (:mod:`hq.broker.upstream`) sends ``[id, kind, JSON]``: ``exists``
(``[unihash, ...]``), ``outhash`` (``[method, outhash, taskhash]``, for a report or a
get-outhash) or ``row`` (``[method, taskhash]``, for a get with all), and the agent answers
``[id, b"ok", JSON]`` (a bool per unihash, a row or null); or ``get``, the local misses of a
lookup, packed as hq's GET chunks are, ``[id, b"get", method, LF-joined taskhashes, ...]``,
answered ``[id, b"ok", LF-joined unihashes, ...]`` (one chunk per pair, an empty item for a
miss). Any question may be answered ``[id, b"error", text]``. The
broker holds the deadline (``--upstream-timeout``): an answer that comes later is dropped
there, so nothing here can stall a client.

What makes a cold local server in front of a distant upstream cheap:

* **One call at a time per kind, batched:** while a ``get-stream`` batch is with the
  upstream, every lookup that arrives waits, and goes in the next batch (one round trip for
  thousands of hashes, where the reference makes one per hash).
* **Identical questions in flight are one:** builders of one configuration ask the same
  taskhashes at once; each is asked once, and every asker gets the answer.
* **Recent misses are not asked again** for ``--upstream-negative-ttl`` seconds (bounded).
* **A failing upstream costs little:** after a failure, questions fail at once for
  :data:`RETRY_S` (the broker answers from local data), then the agent tries again, on a
  new connection; after each further failure in a row it waits twice as long, up to
  :data:`RETRY_MAX_S`, so an upstream that swallows connections (each attempt waits out the
  timeout) holds up few requests.
* **Garbage is an error, never an answer:** a unihash that is not 64 hex digits, a reply of
  the wrong length or shape, fails the call.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import threading
import time

import zmq

from hq import protocol as p

from .oehashequiv import Upstream, UpstreamError, UpstreamTimeout

log = logging.getLogger(__name__)

#: Lookups per upstream call (a get-stream or exists-stream batch).
MAX_BATCH = 20000
#: Connections for get-outhash (a report's) and get-with-all questions, one call each at a time.
OUTHASH_CONNECTIONS = 4
#: How long questions fail at once after the upstream failed.
RETRY_S = 1.0
RETRY_MAX_S = 30.0
#: Misses remembered at most (the oldest go first).
MAX_NEGATIVES = 200_000
STOP = b"stop"


class Backoff(UpstreamError):
    """The upstream failed a moment ago: not asked now."""


def connect(address: str, timeout_s: float, username: str | None, token: str | None):
    """A client for ``address``: another hq (tcp://, ipc://) or an OEHASHEQUIV server."""
    if address.startswith(("tcp://", "ipc://")):
        from .hq import HqUpstream

        return HqUpstream(address, timeout_s, username, token)
    return Upstream(address, timeout_s, username, token)


class Agent:
    def __init__(self, ctx, endpoint: str, address: str, timeout_s: float, negative_ttl_s: float, login=()):
        self.ctx, self.endpoint = ctx, endpoint
        self.address, self.timeout_s, self.negative_ttl_s = address, timeout_s, negative_ttl_s
        self.credentials = tuple(login) or (None, None)  # (username, token) for the upstream
        self.thread = threading.Thread(target=self._run, name="hq-upstream", daemon=True)
        self.failed_until = 0.0  # after a failure: fail at once until then
        self.failures = 0  # in a row: the back-off doubles with each
        # Per kind: the batch the next call asks, where each key asked or waiting is (its
        # batch and position; for outhash and row questions, its future), remembered misses
        # (key -> until when), whether a call is under way.
        self.want: dict = {"get": None, "exists": None}  # the _Batch the next call asks
        self.inflight: dict = {"get": {}, "exists": {}, "outhash": {}, "row": {}}
        self.negative: dict = {"get": {}, "exists": {}, "outhash": {}, "row": {}}
        self.calling = {"get": False, "exists": False}

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except Exception:  # never silently: the broker then answers from local data only
            log.exception("the upstream agent stopped")

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.stopped = asyncio.Event()
        self.tasks: set = set()
        username, token = self.credentials
        n = 2 + OUTHASH_CONNECTIONS
        clients = [connect(self.address, self.timeout_s, username, token) for _ in range(n)]
        self.lookups, self.checks, *self.outhashes = clients
        self.free_clients: asyncio.Queue = asyncio.Queue()  # for get-outhash and get with all
        for client in self.outhashes:
            self.free_clients.put_nowait(client)
        self.sock = self.ctx.socket(zmq.PAIR)
        self.sock.linger = 0
        self.sock.connect(self.endpoint)
        fd = self.sock.getsockopt(zmq.FD)
        self.loop.add_reader(fd, self._drain)
        self.loop.call_soon(self._drain)
        try:
            await self.stopped.wait()
        finally:
            self.loop.remove_reader(fd)
            for task in list(self.tasks):
                task.cancel()
            for client in [self.lookups, self.checks, *self.outhashes]:
                await client.close()
            self.sock.close(linger=0)

    # --- the broker's socket --------------------------------------------------------------
    def _drain(self) -> None:
        sock = self.sock
        while sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            frames = sock.recv_multipart(zmq.NOBLOCK)
            if len(frames) >= 2 and frames[1] == STOP:
                self.stopped.set()
                return
            if len(frames) < 3:
                continue
            task = self.loop.create_task(self._answer(frames[0], frames[1], frames[2:]))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    def _send(self, frames: list) -> None:
        try:
            self.sock.send_multipart(frames, zmq.NOBLOCK)
        except zmq.ZMQError:  # the broker is going: nothing to answer
            return
        self.loop.call_soon(self._drain)  # ZMQ_FD is edge-triggered: look after a send

    async def _answer(self, qid: bytes, kind: bytes, payload: list) -> None:
        asker = {
            b"exists": self._exists,
            b"outhash": self._outhash,
            b"row": self._row,
        }.get(kind)
        try:
            if kind == b"get":  # packed frames both ways (hq.broker.upstream.ask_frames)
                answer = await self._get(payload)
            elif asker is None or len(payload) != 1:
                raise ValueError(f"unknown question {kind[:20]!r}")
            else:
                answer = [json.dumps(await asker(json.loads(payload[0]))).encode()]
        except (UpstreamError, ValueError, TypeError) as exc:
            # "timeout" is what the broker says when its own deadline passes: one count.
            text = "timeout" if isinstance(exc, UpstreamTimeout) else str(exc)
            self._send([qid, b"error", text.encode("utf-8", "replace")[:500]])
            return
        self._send([qid, b"ok", *answer])

    # --- questions ------------------------------------------------------------------------
    def _check_up(self) -> None:
        if time.monotonic() < self.failed_until:
            raise Backoff(f"{self.address} failed {self.failures} time(s) in a row; not asked for now")

    def _failed(self, exc: Exception) -> None:
        backoff = min(RETRY_S * 2**self.failures, RETRY_MAX_S)
        self.failures += 1
        self.failed_until = time.monotonic() + backoff
        log.warning("upstream %s: %s (not asked for %g s)", self.address, exc, backoff)

    def _succeeded(self) -> None:
        self.failures = 0

    async def _get(self, frames: list) -> list:
        """``[method, LF-joined taskhashes, ...]`` -> one LF-joined chunk of unihashes
        (empty for a miss) per pair."""
        if not frames or len(frames) % 2:
            raise ValueError("a get question is pairs of method and taskhashes")
        keys, sizes = [], []
        for method, chunk in zip(frames[0::2], frames[1::2]):
            method = method.decode("utf-8", "replace")
            taskhashes = chunk.decode("utf-8", "replace").split("\n")
            keys += zip(itertools.repeat(method), taskhashes)
            sizes.append(len(taskhashes))
        answers = await self._batched("get", keys)
        out, start = [], 0
        for size in sizes:
            out.append("\n".join([a or "" for a in answers[start : start + size]]).encode("ascii"))
            start += size
        return out

    async def _exists(self, unihashes) -> list:
        answers = await self._batched("exists", [str(u) for u in unihashes])
        return [bool(a) for a in answers]

    async def _batched(self, kind: str, keys: list) -> list:
        """Each key's answer (None: a miss), each asked once however many ask it at once.
        A key waiting or asked is found in ``inflight`` as (its batch, its position): one
        future per upstream call, not per key (a cold burst is 360,000 keys)."""
        self._check_up()
        now = time.monotonic()
        negative, inflight = self.negative[kind], self.inflight[kind]
        slots, batches = [], set()
        for key in keys:
            until = negative.get(key)
            if until is not None and until > now:
                slots.append(None)
                continue
            slot = inflight.get(key)
            if slot is None:
                batch = self.want[kind]
                if batch is None:
                    batch = self.want[kind] = _Batch(self.loop)
                slot = inflight[key] = (batch, len(batch.keys))
                batch.keys.append(key)
            slots.append(slot)
            batches.add(slot[0])
        if self.want[kind] is not None and not self.calling[kind]:
            task = self.loop.create_task(self._call(kind))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        for batch in batches:
            await asyncio.shield(batch.done)  # its failure is this question's
        return [None if slot is None else slot[0].answers[slot[1]] for slot in slots]

    async def _call(self, kind: str) -> None:
        """Ask the upstream for what waits, batch after batch, one call at a time."""
        self.calling[kind] = True
        inflight = self.inflight[kind]
        try:
            while self.want[kind] is not None:
                batch, self.want[kind] = self.want[kind], None
                try:
                    batch.answers = await self._ask_batch(kind, batch.keys)
                except Exception as exc:  # a bug too fails the batch, never leaves it waiting
                    if not isinstance(exc, (UpstreamError, ValueError)):
                        log.exception("asking the upstream failed")
                    if not isinstance(exc, Backoff):
                        self._failed(exc)
                    batch.done.set_exception(_failure(exc))
                else:
                    self._succeeded()
                    self._remember(kind, [k for k, a in zip(batch.keys, batch.answers) if a is None])
                    batch.done.set_result(None)
                finally:
                    for key in batch.keys:
                        del inflight[key]
        finally:
            self.calling[kind] = False

    async def _ask_batch(self, kind: str, keys: list) -> list:
        """The upstream's answer to each key, MAX_BATCH keys per call; None for a miss."""
        self._check_up()
        answers: list = []
        for start in range(0, len(keys), MAX_BATCH):
            part = keys[start : start + MAX_BATCH]
            if kind == "get":  # each client checks every unihash (garbage: UpstreamError)
                got = await self.lookups.get_unihashes(part)
            else:
                got = [True if a else None for a in await self.checks.exists(part)]
            if len(got) != len(part):
                raise UpstreamError(f"{self.address} answered {len(got)} of {len(part)}")
            answers += got
        return answers

    async def _outhash(self, question):
        """get-outhash (with the unihash): the oldest report of the output, or None."""
        method, outhash, taskhash = (str(v) for v in question)
        return await self._single(
            "outhash", (method, outhash, taskhash), lambda c: c.get_outhash(method, outhash, taskhash)
        )

    async def _row(self, question):
        """get with all: the full row of the taskhash, or None."""
        method, taskhash = (str(v) for v in question)
        return await self._single("row", (method, taskhash), lambda c: c.get(method, taskhash, with_row=True))

    async def _single(self, kind: str, key: tuple, fetch):
        """One normal-mode question on one of the pool's connections, asked once however
        many ask it at once; a row without a valid unihash is garbage."""
        self._check_up()
        until = self.negative[kind].get(key)
        if until is not None and until > time.monotonic():
            return None
        inflight = self.inflight[kind]
        future = inflight.get(key)
        if future is None:
            future = inflight[key] = self.loop.create_future()
            future.add_done_callback(_retrieved)
            task = self.loop.create_task(self._fetch(kind, key, fetch, future))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        return await asyncio.shield(future)

    async def _fetch(self, kind: str, key: tuple, fetch, future) -> None:
        client = await self.free_clients.get()
        try:
            row = await fetch(client)
            if row is not None and not (isinstance(row, dict) and p.is_unihash(row.get("unihash"))):
                raise UpstreamError(f"{self.address} answered a row without a valid unihash")
            self._succeeded()
            if row is None:
                self._remember(kind, [key])
            future.set_result(row)
        except Exception as exc:  # a bug too fails the question, never leaves it waiting
            if not isinstance(exc, (UpstreamError, ValueError)):
                log.exception("asking the upstream failed")
            self._failed(exc)
            future.set_exception(_failure(exc))
        finally:
            self.free_clients.put_nowait(client)
            self.inflight[kind].pop(key, None)

    def _remember(self, kind: str, keys: list) -> None:
        if not keys or self.negative_ttl_s <= 0:
            return
        negative = self.negative[kind]
        until = time.monotonic() + self.negative_ttl_s
        for key in keys:
            negative.pop(key, None)  # re-inserted last: the dict stays oldest first
            negative[key] = until
        excess = len(negative) - MAX_NEGATIVES
        if excess > 0:
            for key in list(_first(negative, excess)):
                del negative[key]


class _Batch:
    """Keys for one upstream call, their answers once it is back, and a future that is done
    then (or failed, for every key)."""

    __slots__ = ("keys", "answers", "done")

    def __init__(self, loop):
        self.keys: list = []
        self.answers: list = []
        self.done = loop.create_future()
        self.done.add_done_callback(_retrieved)


def _failure(exc: Exception) -> UpstreamError:
    """What each asker of a failed call gets: a fresh error of the same kind."""
    return UpstreamTimeout(str(exc)) if isinstance(exc, UpstreamTimeout) else UpstreamError(str(exc))


def _retrieved(future) -> None:
    """Mark an exception as seen: a future nobody awaited any more must not log it."""
    if not future.cancelled():
        future.exception()


def _first(entries: dict, n: int):
    iterator = iter(entries)
    for _ in range(n):
        yield next(iterator)
