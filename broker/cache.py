"""The broker's cache of mappings: small lookups it answers without a worker.

A single lookup that goes to a worker crosses two more processes and their libzmq I/O
threads, about six thread wake-ups (README, "Where the time goes"). A lookup the broker can
answer from memory costs none of them. This cache holds, for ``(method, taskhash)``, the
unihash the workers found, or that they found none, and it is exact, for these reasons:

* A mapping never changes once it exists: the first mapping wins (reports and imports
  insert or ignore). So a cached unihash can go stale only by a deletion, and a cached miss
  only by an insert.
* Every deletion is an admin write (``remove``, ``gc-sweep``; and, to be safe, every other
  admin write too, ``import`` included), and every admin write passes through the broker.
  The cache is emptied when one is dispatched and again when it is answered (or lost with
  its worker), and nothing is learned while one is in flight.
* Every other insert is a ``report`` or ``report-equiv``, which names its key. When one is
  dispatched, a cached miss of its key is dropped; and no miss is learned from a lookup that
  was dispatched while such a write was in flight, or answered after one was dispatched
  (``inserts``, a counter taken at dispatch).
* An answer is learned only if nothing was emptied between the lookup's dispatch and its
  reply (``epoch``, a counter taken at dispatch).
* A message from a worker this broker does not know (one expired while frozen, or one of a
  previous broker) empties the cache: it may just have committed a write this broker has
  no record of.
* Workers name the database they answer from (``Store.identity``: the open file's device,
  inode and opening count) in READY and in their heartbeats. A change (a file replaced
  under hq, which workers notice and reopen) empties the cache, and nothing is learned
  while the workers disagree (``Scheduler._databases_changed``).

Only lookups of at most :data:`MAX_ITEMS` items in one chunk use it: the farm burst's
900-hash chunks would pay per-item Python in the broker for nothing, while their workers
answer them at ~2 µs a lookup anyway.

Memory is bounded by ``--cache-entries`` (oldest entries go first, an eighth at a time; ~230 bytes an entry in
CPython, so the default 10,000 is ~2.3 MB). Bigger is not free: measured end to end, a cache
grown to 80,000 entries cost lookups of keys never asked again ~15 % more broker CPU than no
cache (memory traffic, on a machine whose caches the clients share).

Several brokers on one database would each miss the others' writes and deletions. So the
cache is used only over a database file, which one broker serves: when the workers' identity
names a database server (PostgreSQL, which several brokers may share), the scheduler turns
the cache off (``Scheduler._databases_changed``), and every lookup is asked of a worker.
"""

from __future__ import annotations

from itertools import islice

#: Lookups of more items than this (or of several chunks) are not looked up in the cache.
MAX_ITEMS = 16
LF = b"\n"
MISS = b""  # a cached answer "no mapping"


class MappingCache:
    __slots__ = (
        "max_entries",
        "entries",
        "epoch",
        "inserts",
        "hits",
        "learned",
        "invalidations",
        "keep_misses",
    )

    def __init__(self, max_entries: int):
        self.max_entries = max_entries
        # method + LF + taskhash -> unihash or MISS, all bytes, oldest first. One bytes key, not
        # a tuple: a third less memory an entry, and no object the garbage collector tracks.
        self.entries: dict = {}
        self.epoch = 0  # bumped by invalidate()
        self.inserts = 0  # bumped when a report or report-equiv is dispatched or ends
        self.hits = 0  # items answered from the cache
        self.keep_misses = True  # False with --upstream: it may learn a mapping any time
        self.learned = 0
        self.invalidations = 0

    def answer(self, method: bytes, chunk: bytes):
        """The reply frame for a GET chunk if every item is cached, else None."""
        entries = self.entries
        prefix = method + LF
        if LF not in chunk:
            unihash = entries.get(prefix + chunk)
            if unihash is None:
                return None
            self.hits += 1
            return unihash
        found = []
        for taskhash in chunk.split(LF):
            unihash = entries.get(prefix + taskhash)
            if unihash is None:
                return None
            found.append(unihash)
        self.hits += len(found)
        return LF.join(found)

    def learn(self, epoch: int, inserts: int, method: bytes, chunk: bytes, frame: bytes) -> None:
        """Keep what a GET chunk's reply says, if nothing was emptied since ``epoch``; keep
        its misses only if no insert was dispatched or ended since ``inserts`` (both taken
        when the lookup was dispatched; ``inserts`` -1 when an insert was in flight then)."""
        if epoch != self.epoch or not self.max_entries:
            return
        misses = self.keep_misses and inserts == self.inserts
        entries = self.entries
        prefix = method + LF
        taskhashes = chunk.split(LF)
        unihashes = frame.split(LF)
        if len(taskhashes) != len(unihashes):
            return
        for taskhash, unihash in zip(taskhashes, unihashes):
            key = prefix + taskhash
            if (unihash or misses) and entries.get(key) != unihash:
                entries[key] = unihash
                self.learned += 1
        if len(entries) > self.max_entries:
            self._evict()

    def _evict(self) -> None:
        """Keep the newest seven eighths of ``max_entries``. Copying them into a new dict
        once per eighth is cheap; deleting the oldest entry one at a time is not: a dict
        keeps deleted slots until it is resized, and every search for its first entry
        walks over them (that walk was 4-5 % of the broker's time under single lookups)."""
        entries = self.entries
        keep = self.max_entries - self.max_entries // 8
        self.entries = dict(islice(entries.items(), len(entries) - keep, None))

    def inserting(self, keys) -> None:
        """Reports or report-equivs of these (method, taskhash) keys are dispatched (or one
        ended): their cached misses go, and misses read before now are not learned."""
        self.inserts += 1
        entries = self.entries
        for method, taskhash in keys:
            key = method + LF + taskhash
            if entries.get(key) == MISS:
                del entries[key]

    def invalidate(self) -> None:
        """Forget everything and make answers of lookups already dispatched unlearnable."""
        self.entries.clear()
        self.epoch += 1
        self.invalidations += 1
