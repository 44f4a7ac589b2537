"""A worker's statistics: cumulative counters and facts about its database.

The worker sends :meth:`WorkerStats.snapshot` to the broker in a HEARTBEAT every heartbeat
interval. Counters only grow (the broker keeps reset-stats baselines), and counting is a
few dictionary updates per REQUEST, derived from the reply frames already built:

* ``get``: a reply chunk of n items holds n-1 LFs plus 64 bytes per hit, so
  ``hits = (len(frame) - (n - 1)) // 64`` with no parsing;
* ``exists``: one ASCII flag per item, so hits are the ``1`` bytes.

Row counts need a table scan (about 35 ms per million rows); :class:`RowCountPolicy` says
when one is worth it.
"""

from __future__ import annotations

import json
import math
import time

from hq import protocol as p

from .schema import settings_in_force

#: A build's traffic. Row counts wait until a worker has had none of it for a while; the
#: statistics and admin reads (ping, db-usage, gc-status, ...) do not count as traffic, or
#: ``hq-admin stats`` run in a loop would keep the counts from ever being taken.
BUILD_COMMANDS = frozenset({p.GET, p.GET_FULL, p.GET_OUTHASH, p.REPORT, p.REPORT_EQUIV, p.EXISTS})


class RowCountPolicy:
    """When a worker counts the rows of its tables again (no clock of its own: pass ``now``).

    A count is taken when all of these hold:

    * the worker has had no build traffic for ``IDLE_S``: a farm never waits for a scan;
    * the database changed since the last count (``version``: SQLite's ``data_version``, which
      moves when another connection commits, and this connection's ``total_changes``), so an
      idle service scans nothing;
    * ``interval_s`` has passed since the last count, and at least ``1 / MAX_DUTY`` times as
      long as that count took: on a database of 10 million rows (0.35 s a count) they are 35 s
      apart at least.

    The first count needs only the idleness. An exact count made for ``db-usage`` (what
    ``hq-admin stats`` shows) replaces the periodic one at once, so ``hq-admin top`` and the
    metrics never contradict what ``stats`` just printed.
    """

    IDLE_S = 0.5
    MAX_DUTY = 0.01

    def __init__(self, interval_s: float):
        self.interval_s = interval_s
        self.last_traffic = -math.inf
        self.counted_at = None
        self.version = None
        self.scan_s = 0.0

    def traffic(self, now: float) -> None:
        self.last_traffic = now

    def due(self, now: float, version) -> bool:
        if now - self.last_traffic < self.IDLE_S:
            return False
        if self.counted_at is None:
            return True
        if version == self.version:
            return False
        return now - self.counted_at >= max(self.interval_s, self.scan_s / self.MAX_DUTY)

    def counted(self, now: float, version, scan_s: float) -> None:
        """A count was taken at ``now`` of the database at ``version`` (None: unknown, so the
        next one is due by the spacing alone)."""
        self.counted_at = now
        self.version = version
        self.scan_s = scan_s

    def age_s(self, now: float):
        return None if self.counted_at is None else now - self.counted_at


class WorkerStats:
    def __init__(self, store, rows_interval_s: float = 2.0, clock=time.monotonic):
        self.store = store
        self.clock = clock
        self.started = clock()
        self.jobs: dict = {}  # command -> jobs run
        self.errors: dict = {}  # status -> jobs answered with it
        self.items = {p.GET: 0, p.EXISTS: 0}
        self.hits = {p.GET: 0, p.EXISTS: 0}
        self.row_counts = RowCountPolicy(rows_interval_s)
        self._rows: dict = {}

    def record(self, command: bytes, results: list) -> None:
        """Count one REQUEST's results ``[(job_id, status, body)]``."""
        if command in BUILD_COMMANDS:
            self.row_counts.traffic(self.clock())
        self.jobs[command] = self.jobs.get(command, 0) + len(results)
        for _, status, body in results:
            if status != p.OK:
                self.errors[status] = self.errors.get(status, 0) + 1
            elif command == p.GET:
                for frame in body:
                    n = frame.count(b"\n") + 1
                    self.items[p.GET] += n
                    self.hits[p.GET] += (len(frame) - (n - 1)) // 64
            elif command == p.EXISTS:
                for frame in body:
                    self.items[p.EXISTS] += len(frame)
                    self.hits[p.EXISTS] += frame.count(b"1")
            elif command == p.DB_USAGE:
                usage = json.loads(bytes(body[0]))["usage"]
                self._rows = {table: v["rows"] for table, v in usage.items()}
                self.row_counts.counted(self.clock(), None, self.row_counts.scan_s)

    def counters(self) -> dict:
        out = {f"jobs.{c.decode()}": n for c, n in self.jobs.items()}
        out.update({f"errors.{code}": n for code, n in self.errors.items()})
        out["lookups"] = self.items[p.GET]
        out["lookups.hit"] = self.hits[p.GET]
        out["lookups.miss"] = self.items[p.GET] - self.hits[p.GET]
        out["exists"] = self.items[p.EXISTS]
        out["exists.hit"] = self.hits[p.EXISTS]
        out.update(self.store.counters)
        return out

    def db_facts(self) -> dict:
        facts, version = self.store.facts()
        facts["id"] = self.store.identity()
        now = self.clock()
        if self.row_counts.due(now, version):
            started = now
            self._rows = self.store.count_rows()
            now = self.clock()
            self.row_counts.counted(now, version, now - started)
        facts["rows"] = self._rows
        facts["rows_age_s"] = self.row_counts.age_s(now)
        return facts

    def snapshot(self) -> dict:
        return {
            "counters": self.counters(),
            "uptime_s": self.clock() - self.started,
            "settings": settings_in_force(self.store.db),
            "db": self.db_facts(),
        }
