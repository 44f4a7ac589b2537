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
import json
import logging
import operator
import threading
import time
from itertools import chain, compress, islice, repeat

import zmq

from hq import addresses
from hq import protocol as p

from .oehashequiv import Upstream, UpstreamError, UpstreamTimeout

log = logging.getLogger(__name__)

#: Lookups per upstream call (a get-stream or exists-stream batch).
MAX_BATCH = 20000
#: Connections for get-outhash (a report's) and get-with-all questions, one call each at a time.
OUTHASH_CONNECTIONS = 4
#: Batched calls in flight at once per kind, each on a connection of its own. One: what
#: arrives meanwhile waits, and goes in one bigger batch. (Two in flight, measured on a cold
#: burst 20 ms from its upstream: no faster, and ~10 % more CPU for the smaller batches.)
CALLS = {"get": 1, "exists": 1}
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
        self.shown = addresses.redacted(address)  # in log lines and errors
        self.credentials = tuple(login) or (None, None)  # (username, token) for the upstream
        self.thread = threading.Thread(target=self._run, name="hq-upstream", daemon=True)
        self.failed_until = 0.0  # after a failure: fail at once until then
        self.failures = 0  # in a row: the back-off doubles with each
        # Per kind: the batch the next call asks and those with the upstream now (for outhash
        # and row questions, each key's future), remembered misses (namespace -> key -> until
        # when, first remembered first). The namespace of a lookup is its method; exists and
        # the normal-mode questions have one, None.
        self.want: dict = {"get": None, "exists": None}  # the _Batch the next call asks
        self.asking: dict = {"get": [], "exists": []}  # the _Batches with the upstream, oldest first
        self.inflight: dict = {"outhash": {}, "row": {}}
        self.negative: dict = {"get": {}, "exists": {}, "outhash": {}, "row": {}}

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
        self.clients = [
            connect(self.address, self.timeout_s, *self.credentials)
            for _ in range(sum(CALLS.values()) + OUTHASH_CONNECTIONS)
        ]
        spare = iter(self.clients)
        self.idle = {kind: list(islice(spare, n)) for kind, n in CALLS.items()}  # for batched calls
        self.free_clients: asyncio.Queue = asyncio.Queue()  # for get-outhash and get with all
        for client in spare:
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
            for client in self.clients:
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
            raise Backoff(f"{self.shown} failed {self.failures} time(s) in a row; not asked for now")

    def _failed(self, exc: Exception) -> None:
        backoff = min(RETRY_S * 2**self.failures, RETRY_MAX_S)
        self.failures += 1
        self.failed_until = time.monotonic() + backoff
        log.warning("upstream %s: %s (not asked for %g s)", self.shown, exc, backoff)

    def _succeeded(self) -> None:
        self.failures = 0

    async def _get(self, frames: list) -> list:
        """``[method, LF-joined taskhashes, ...]`` -> one LF-joined chunk of unihashes
        (empty for a miss) per pair."""
        if not frames or len(frames) % 2:
            raise ValueError("a get question is pairs of method and taskhashes")
        groups = [
            (method.decode("utf-8", "replace"), chunk.decode("utf-8", "replace").split("\n"))
            for method, chunk in zip(frames[0::2], frames[1::2])
        ]
        return ["\n".join(answers).encode("ascii") for answers in await self._batched("get", groups, "")]

    async def _exists(self, unihashes) -> list:
        (answers,) = await self._batched("exists", [(None, [str(u) for u in unihashes])], False)
        return answers

    async def _batched(self, kind: str, groups: list, missing) -> list:
        """The answers (``missing`` for a miss) to ``[(namespace, keys)]`` (the namespace of
        a lookup is its method), one list per group; each key asked once however many ask
        it at once. A cold burst hands over 360,000 keys in a few seconds, so nothing here
        goes key by key in Python: the keys are strings (no tuple for the collector to
        chase), the known misses and the keys already asked are found with set operations,
        and a batch takes its keys, and gives its answers, a dict at a time."""
        self._check_up()
        negatives, asking = self.negative[kind], self.asking[kind]
        batches: list = []  # the batches this question waits for: some with the upstream, the next
        for ns, keys in groups:
            fresh = keys
            negative = negatives.get(ns)
            if negative:
                known = negative.keys() & fresh
                if known:
                    now = time.monotonic()
                    known = {key for key in known if negative[key] > now}  # the rest expired
                    if known:
                        fresh = [key for key in fresh if key not in known]
            for batch in asking:
                index = batch.index.get(ns) if fresh else None
                shared = index.keys() & fresh if index else None
                if shared:
                    if batch not in batches:
                        batches.append(batch)
                    fresh = [key for key in fresh if key not in shared]
            if fresh:
                want = self.want[kind]
                if want is None:
                    want = self.want[kind] = _Batch(self.loop)
                want.index.setdefault(ns, {}).update(dict.fromkeys(fresh))
                if want not in batches:
                    batches.append(want)
        self._start_calls(kind)
        for batch in batches:
            await asyncio.shield(batch.done)  # its failure is this question's
        out = []
        for ns, keys in groups:
            found = [batch.answers.get(ns, _NONE) for batch in batches]
            if len(found) > 1:  # some keys were with the upstream already, the rest after
                out.append([_answer(found, key, missing) for key in keys])
            else:
                out.append(list(map((found[0] if found else _NONE).get, keys, repeat(missing))))
        return out

    def _start_calls(self, kind: str) -> None:
        """Send what waits to the upstream if a connection of the kind is idle."""
        idle = self.idle[kind]
        while self.want[kind] is not None and idle:
            batch, self.want[kind] = self.want[kind], None
            self.asking[kind].append(batch)
            task = self.loop.create_task(self._call(kind, batch, idle.pop()))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _call(self, kind: str, batch, client) -> None:
        """Ask the upstream one batch; then the next, if one waits."""
        groups = [(ns, list(index)) for ns, index in batch.index.items()]
        try:
            answers = await self._ask_batch(kind, groups, client)
        except Exception as exc:  # a bug too fails the batch, never leaves it waiting
            if not isinstance(exc, (UpstreamError, ValueError)):
                log.exception("asking the upstream failed")
            if not isinstance(exc, Backoff):
                self._failed(exc)
            batch.done.set_exception(_failure(exc))
        else:
            self._succeeded()
            for (ns, keys), got in zip(groups, answers):
                batch.answers[ns] = dict(compress(zip(keys, got), got))  # the hits
                self._remember(kind, ns, compress(keys, map(operator.not_, got)))
            batch.done.set_result(None)
        finally:
            self.asking[kind].remove(batch)
            self.idle[kind].append(client)
            if not self.stopped.is_set():
                self._start_calls(kind)

    async def _ask_batch(self, kind: str, groups: list, client) -> list:
        """The upstream's answers to ``[(namespace, keys)]``, a list per group, at most
        MAX_BATCH keys per call; None for a miss."""
        self._check_up()
        flat: list = []
        for part in _parts(groups, MAX_BATCH):
            asked = sum(len(keys) for _, keys in part)
            if kind == "get":  # each client checks every unihash (garbage: UpstreamError)
                got = await client.get_unihash_groups(part)
            else:
                unihashes = list(chain.from_iterable(keys for _, keys in part))
                got = [True if a else None for a in await client.exists(unihashes)]
            if len(got) != asked:
                raise UpstreamError(f"{self.shown} answered {len(got)} of {asked}")
            flat += got
        out, start = [], 0
        for _, keys in groups:  # a group split over two calls is whole again
            out.append(flat[start : start + len(keys)])
            start += len(keys)
        return out

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
        until = self.negative[kind].get(None, _NONE).get(key)
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
                raise UpstreamError(f"{self.shown} answered a row without a valid unihash")
            self._succeeded()
            if row is None:
                self._remember(kind, None, [key])
            future.set_result(row)
        except Exception as exc:  # a bug too fails the question, never leaves it waiting
            if not isinstance(exc, (UpstreamError, ValueError)):
                log.exception("asking the upstream failed")
            self._failed(exc)
            future.set_exception(_failure(exc))
        finally:
            self.free_clients.put_nowait(client)
            self.inflight[kind].pop(key, None)

    def _remember(self, kind: str, ns, keys) -> None:
        """Remember these misses for ``--upstream-negative-ttl`` seconds; at most
        MAX_NEGATIVES of them a kind: beyond, the first remembered go, down to seven eighths."""
        if self.negative_ttl_s <= 0:
            return
        negatives = self.negative[kind]
        negative = negatives.setdefault(ns, {})
        fresh = dict.fromkeys(keys, time.monotonic() + self.negative_ttl_s)
        for key in negative.keys() & fresh.keys():  # moved to the end: newest last
            del negative[key]
        negative.update(fresh)
        total = sum(map(len, negatives.values()))
        if total > MAX_NEGATIVES:  # each namespace keeps its newest, in proportion
            target = MAX_NEGATIVES - MAX_NEGATIVES // 8
            for name, negative in list(negatives.items()):
                keep = len(negative) * target // total
                if keep:
                    negatives[name] = dict(islice(negative.items(), len(negative) - keep, None))
                else:
                    del negatives[name]


class _Batch:
    """Keys for one upstream call (per namespace a dict: each key once, in the order asked),
    the hits once it is back (per namespace, key -> answer), and a future that is done then
    (or failed, for every key)."""

    __slots__ = ("index", "answers", "done")

    def __init__(self, loop):
        self.index: dict = {}
        self.answers: dict = {}
        self.done = loop.create_future()
        self.done.add_done_callback(_retrieved)


_NONE: dict = {}  # no answers


def _answer(found: list, key, missing):
    for answers in found:
        if key in answers:
            return answers[key]
    return missing


def _parts(groups: list, limit: int):
    """``[(namespace, keys)]`` cut into lists of at most ``limit`` keys in all, in order."""
    part, size = [], 0
    for ns, keys in groups:
        start = 0
        while start < len(keys):
            take = min(limit - size, len(keys) - start)
            part.append((ns, keys[start : start + take]))
            size += take
            start += take
            if size == limit:
                yield part
                part, size = [], 0
    if part:
        yield part


def _failure(exc: Exception) -> UpstreamError:
    """What each asker of a failed call gets: a fresh error of the same kind."""
    return UpstreamTimeout(str(exc)) if isinstance(exc, UpstreamTimeout) else UpstreamError(str(exc))


def _retrieved(future) -> None:
    """Mark an exception as seen: a future nobody awaited any more must not log it."""
    if not future.cancelled():
        future.exception()
