"""The broker's side of ``--upstream``, without sockets: questions for the upstream agent
(:mod:`hq.upstream.agent`, a thread of this process) and their deadlines.

The scheduler asks three things (bitbake-hashserv-protocol.md §7.10, §7.2 step 4):

* after a lookup (``get``) is answered by the workers, its misses: what the upstream knows
  is answered, and stored locally off the reply path (``backfill`` jobs);
* after an ``exists``, its misses (nothing stored);
* after a ``get`` with all or a ``get-outhash`` answered null, the row: the upstream's is
  the answer, and is stored locally with its mapping;
* before a ``report`` goes to a worker, ``get-outhash`` of its (method, outhash, taskhash):
  if the upstream knows that output, its unihash takes the place of the submitted one, which
  the report stores only when no local report of the same output has a mapping. Asked
  before every report, not only the new ones (the reference asks only then): one round
  trip that the agent shares between identical questions and skips for recent misses.

Each question has a deadline, ``--upstream-timeout`` (never later than the request's own):
past it the request goes on with local data only, and a late answer is dropped.
"""

from __future__ import annotations

import itertools
import json
import math

GET, EXISTS, OUTHASH, ROW = b"get", b"exists", b"outhash", b"row"
#: The questions of a build's lookups: while these wait, backfills are held (see
#: :data:`BACKFILL_HOLD_S`); a report's ``get-outhash`` does not hold them.
LOOKUPS = frozenset({GET, EXISTS})


class UpstreamStage:
    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self.outbox: list = []  # [question id, kind, JSON] for the agent
        self.waiting: dict = {}  # question id -> (deadline, asked at, callback), oldest first
        self.lookups_waiting = 0  # of them, LOOKUPS questions
        self.lookup_at = -math.inf  # when a LOOKUPS question was last asked or answered
        self._ids = itertools.count(1)

    def ask(self, kind: bytes, payload, now: float, callback, deadline: float = math.inf) -> None:
        """``callback(result, error, now)`` once: the agent's answer (error None), or None and
        the reason (an upstream error, garbage, the deadline)."""
        self._ask(kind, [json.dumps(payload).encode()], False, now, callback, deadline)

    def ask_frames(self, kind: bytes, frames: list, now: float, callback, deadline: float = math.inf) -> None:
        """As :meth:`ask`, for a question of packed frames (``get``: method and LF-joined
        taskhashes, pair after pair); the result is the answer's frames (``get``: one
        LF-joined chunk of unihashes, empty for a miss, per pair). No JSON, no per-hash
        object on either side of the socket: a cold burst passes 360,000 hashes this way."""
        self._ask(kind, frames, True, now, callback, deadline)

    def _ask(self, kind, frames, raw, now, callback, deadline) -> None:
        qid = b"%x" % next(self._ids)
        lookup = kind in LOOKUPS
        if lookup:
            self.lookups_waiting += 1
            self.lookup_at = now
        self.waiting[qid] = (min(now + self.timeout_s, deadline), now, callback, raw, lookup)
        self.outbox.append([qid, kind, *frames])

    def _settled(self, lookup: bool, now: float) -> None:
        if lookup:
            self.lookups_waiting -= 1
            self.lookup_at = now

    def on_answer(self, frames: list, now: float):
        """The agent's answer; returns (how long it took, error) or None if none waited."""
        entry = self.waiting.pop(bytes(frames[0]), None) if frames else None
        if entry is None:
            return None  # late (timed out) or malformed
        _, asked, callback, raw, lookup = entry
        self._settled(lookup, now)
        result, error = None, "a malformed answer from the upstream agent"
        if frames[1:2] == [b"ok"] and raw:
            result, error = [bytes(frame) for frame in frames[2:]], None
        elif len(frames) == 3 and frames[1] == b"ok":
            try:
                result, error = json.loads(bytes(frames[2])), None
            except ValueError:
                pass
        elif len(frames) == 3:
            error = bytes(frames[2]).decode("utf-8", "replace")
        callback(result, error, now)
        return now - asked, error

    def expire(self, now: float) -> int:
        """Give up on the questions past their deadline; how many. In the order asked, which
        is the order of the deadlines but for one cut short by its request's (that request
        times out by itself meanwhile)."""
        waiting, n = self.waiting, 0
        while waiting:
            qid, (deadline, _, callback, _, lookup) = next(iter(waiting.items()))
            if deadline > now:
                break
            del waiting[qid]
            self._settled(lookup, now)
            callback(None, "timeout", now)
            n += 1
        return n

    def next_deadline(self) -> float:
        return next(iter(self.waiting.values()))[0] if self.waiting else math.inf


#: Mappings in one backfill write at most. A write of random keys rewrites every B-tree page
#: it touches, so bigger transactions share pages: measured in one worker process on this
#: machine, 180,000 mappings took 116 µs a row in transactions of 500, 67 µs in 2,000 and
#: 33 µs in 8,000. 4,000 keeps one write under ~0.2 s (reports wait behind it).
BACKFILL_ROWS = 4000
#: While lookups wait on the upstream, and until none has for BACKFILL_QUIET_S, backfills
#: wait too, at most BACKFILL_HOLD_S: writing them takes the CPUs the burst that made them
#: needs (measured, ``hq-bench cold-start``: the cold burst 2.5 s without backfills against
#: 3.1 s with them written during it). The quiet time spans the gaps between a burst's
#: questions (through the gateway, a cold burst of 10 s has many); the hold ends sooner
#: when the buffer is three quarters full.
BACKFILL_QUIET_S = 0.5
BACKFILL_HOLD_S = 30.0
#: Mappings held for backfills at most (~200 bytes each): with the writer stuck, what the
#: upstream answers beyond this is not stored (it is asked again next time), never kept
#: without bound.
MAX_BUFFERED_ROWS = 200_000


class BackfillBuffer:
    """Mappings the upstream answered, waiting to be written. While one backfill is queued
    for a worker, or the backfills are held (:data:`BACKFILL_HOLD_S`), what the upstream
    answers meanwhile gathers here, per method, and goes in the next, up to
    :data:`BACKFILL_ROWS` at a time."""

    def __init__(self):
        self.methods: dict = {}  # method -> ([taskhash, ...], [unihash, ...]), bytes each
        self.rows = 0
        self.since = 0.0  # when the buffer last went from empty to holding mappings

    def add(self, method: bytes, taskhashes: list, unihashes: list, now: float) -> int:
        """Hold these mappings; how many did not fit (:data:`MAX_BUFFERED_ROWS`)."""
        keep = min(len(taskhashes), MAX_BUFFERED_ROWS - self.rows)
        if keep:
            if not self.rows:
                self.since = now
            held_t, held_u = self.methods.setdefault(method, ([], []))
            held_t += taskhashes[:keep]
            held_u += unihashes[:keep]
            self.rows += keep
        return len(taskhashes) - keep

    def held_until(self, upstream: UpstreamStage) -> float:
        """Until when backfills are held (see :data:`BACKFILL_HOLD_S`); -inf if not."""
        if not self.rows or self.rows >= MAX_BUFFERED_ROWS * 3 // 4:
            return -math.inf
        quiet = math.inf if upstream.lookups_waiting else upstream.lookup_at + BACKFILL_QUIET_S
        return min(quiet, self.since + BACKFILL_HOLD_S)

    def take(self, limit: int = BACKFILL_ROWS):
        """``(body, rows)`` of the next backfill (method, LF-joined taskhashes, LF-joined
        unihashes; one method), or None if nothing waits."""
        if not self.methods:
            return None
        method, (held_t, held_u) = next(iter(self.methods.items()))
        part_t, part_u = held_t[:limit], held_u[:limit]
        del held_t[:limit], held_u[:limit]
        if not held_t:
            del self.methods[method]
        self.rows -= len(part_t)
        return [method, b"\n".join(part_t), b"\n".join(part_u)], len(part_t)
