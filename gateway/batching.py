"""Lookups gathered across connections: what arrives together goes to the broker together.

Every ``get-stream`` and ``exists-stream`` line that the connections sharing one
:class:`~hq.gateway.link.Link` (all anonymous ones share one) hand over while the event loop
turns is sent as one batched hq request when the loop comes round: 40 BitBake clients
asking one taskhash each become one ``get`` of 40 items, one message to the broker and one
answer, where they were 40 of each. While :data:`MAX_INFLIGHT` requests are with the broker,
what arrives waits for one of them to come back, so batches grow with the load, as on one
connection's stream. An answer reaches each line's connection in order;
a failure (the broker down, a refusal) reaches every connection of that batch.
"""

from __future__ import annotations

import asyncio
import time

from hq import protocol as p
from hq.oehashequiv import Drop

from . import commands

#: Chunk groups per hq request (each chunk up to MAX_CHUNK_ITEMS; within MAX_FRAMES).
MAX_GROUPS = 64
#: Requests of one kind (get, exists) that a link has with the broker at once. Lookups that
#: arrive meanwhile wait, and go as one request when the answer comes back (Nagle's rule): an
#: idle gateway sends a lone lookup at once, and under load batches grow with the load.
#: Without a cap each loop turn sent its own request: 40 BitBake clients asking one hash at a
#: time made 1.2 lookups a request. With two in flight they made 2.2-2.4, and BitBake's burst
#: 71-81 a request; with one, 5.2-5.3 and 104-127, and the server's CPU per lookup fell by
#: 31 % for single lookups and 18-29 % in the burst (hq-bench compare --gateway, 2 pairs).
MAX_INFLIGHT = 1


class Batcher:
    def __init__(self, link):
        self.link = link
        self.loop = asyncio.get_running_loop()
        self.waiting: dict = {p.GET: [], p.EXISTS: []}  # command -> [(items, future)]
        self.since: dict = {}  # command -> when its oldest waiting lookup arrived
        self.tasks: set = set()  # requests with the broker (kept referenced until done)
        self.inflight = {p.GET: 0, p.EXISTS: 0}  # requests with the broker, per command
        self.scheduled = {p.GET: False, p.EXISTS: False}  # a request starts on the next turn

    def get(self, pairs: list) -> asyncio.Future:
        """A future of the unihash (or "") of each ``[method, taskhash]``, in order."""
        return self._add(p.GET, pairs)

    def exists(self, unihashes: list) -> asyncio.Future:
        """A future of "true" or "false" for each unihash, in order."""
        return self._add(p.EXISTS, unihashes)

    def _add(self, command: bytes, items: list) -> asyncio.Future:
        future = self.loop.create_future()
        waiting = self.waiting[command]
        if not waiting:
            self.since[command] = time.monotonic()
        waiting.append((items, future))
        self._schedule(command)
        return future

    def _schedule(self, command: bytes) -> None:
        """Start a request on the loop's next turn (after everything handed over in this
        one), unless one is starting already or MAX_INFLIGHT are with the broker."""
        if self.scheduled[command] or self.inflight[command] >= MAX_INFLIGHT or not self.waiting[command]:
            return
        self.scheduled[command] = True
        task = self.loop.create_task(self._ask(command))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _ask(self, command: bytes) -> None:
        self.scheduled[command] = False
        self.inflight[command] += 1
        try:
            await self._send(command)
        finally:
            self.inflight[command] -= 1
        self._schedule(command)  # what waited meanwhile (not after a cancel: the gateway stops)

    async def _send(self, command: bytes) -> None:
        waiting, self.waiting[command] = self.waiting[command], []
        items = [item for part, _ in waiting for item in part]
        # The deadline runs from the oldest lookup's arrival, not from this request's start:
        # time spent waiting for a slot counts.
        deadline = self.since[command] + self.link.timeout_s
        try:
            ask = self._lookup if command == p.GET else self._exists
            answers = await ask(items, deadline)
            if len(answers) != len(items):  # a reply short of chunks: never a shifted answer
                raise Drop(f"hq answered {len(answers)} of {len(items)} lookups")
        except Exception as exc:  # the same failure for every connection of the batch
            for _, future in waiting:
                if not future.done():
                    future.set_exception(type(exc)(*exc.args))
            return
        start = 0
        for part, future in waiting:
            if not future.done():  # a connection that went meanwhile
                future.set_result(answers[start : start + len(part)])
            start += len(part)

    async def _lookup(self, pairs: list, deadline: float) -> list:
        body, counts = [], []
        for method, taskhashes in _runs(pairs):
            body += [method.encode("utf-8"), p.pack_items(taskhashes)]
            counts.append(len(taskhashes))
        answers: list = []
        for start in range(0, len(body), 2 * MAX_GROUPS):
            part = body[start : start + 2 * MAX_GROUPS]
            reply = await commands.ask(self.link, p.GET, part, deadline)
            for frame, n in zip(reply, counts[start // 2 : start // 2 + len(part) // 2]):
                answers += [u or "" for u in p.unpack_unihashes(frame, n)]
        return answers

    async def _exists(self, unihashes: list, deadline: float) -> list:
        chunks = [unihashes[i : i + p.MAX_CHUNK_ITEMS] for i in range(0, len(unihashes), p.MAX_CHUNK_ITEMS)]
        flags: list = []
        for start in range(0, len(chunks), MAX_GROUPS):
            part = chunks[start : start + MAX_GROUPS]
            reply = await commands.ask(self.link, p.EXISTS, [p.pack_items(c) for c in part], deadline)
            for frame, chunk in zip(reply, part):
                flags += p.unpack_flags(frame, len(chunk))
        return ["true" if f else "false" for f in flags]


def _runs(pairs: list):
    """(method, [taskhash, ...]) runs of one method, at most MAX_CHUNK_ITEMS each, in order."""
    method, items = None, []
    for m, t in pairs:
        if items and (m != method or len(items) >= p.MAX_CHUNK_ITEMS):
            yield method, items
            items = []
        method = m
        items.append(t)
    if items:
        yield method, items
