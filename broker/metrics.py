"""Prometheus metrics: the text exposition format 0.0.4, served over HTTP by the broker loop.

``hq-broker --metrics tcp://127.0.0.1:9686`` (``hq-server --metrics ...`` passes it on)
answers ``GET /metrics`` (and ``GET /``) with the values below. Everything is rendered from
the scheduler's raw cumulative numbers, never from the since-reset values of ``stats``, so
counters never go down when someone runs reset-stats; a worker's own counters start again
from zero when its process restarts, which Prometheus' ``rate()`` treats as a counter reset.
Rendering happens only when a scrape arrives (well under a millisecond for a few workers).

Broker (the scheduler's counters and gauges):

* ``hq_broker_uptime_seconds`` gauge
* ``hq_requests_total{command}`` counter: well-formed requests received, by command
  (every client command is listed, from 0)
* ``hq_requests_malformed_total``, ``hq_requests_timed_out_total`` counters
* ``hq_items_total{command}`` counter: items (hashes) of the requests answered OK
* ``hq_errors_total{code}`` counter: error replies sent to clients, by status (PROTOCOL.md §5)
* ``hq_request_duration_seconds{command}`` histogram: arrival to reply (buckets every octave
  from 61 us to 32 s; a lookup answered from the broker's cache counts as 0)
* ``hq_queued_jobs``, ``hq_inflight_jobs``, ``hq_pending_requests``, ``hq_clients_queued``,
  ``hq_workers`` gauges: queue depth, jobs running on workers, requests not yet answered,
  clients with queued jobs, registered workers
* ``hq_broker_cache_entries`` gauge: answers held in the broker's cache (``broker/cache.py``)
* ``hq_logins_total{outcome}``, ``hq_requests_refused_total{reason}`` counters and the
  ``hq_sessions`` gauge: log-ins, refusals by permission (403) or session (440)
* ``hq_broker_events_total{event}`` counter: the scheduler's other counters by name
  (``jobs.redispatched``, ``jobs.merged``, ``jobs.abandoned``, ``replies.dropped``,
  ``replies.stale``, ``workers.registered``, ``workers.dropped``, ``cache.hits``: lookup
  items the broker answered from its cache, ...)
* ``hq_worker_restarts_total{worker}`` counter: registrations under a name after the first
* ``hq_worker_inflight_jobs{worker}`` gauge

Workers (from each registered worker's last HEARTBEAT statistics, see ``workers/stats.py``;
every series has a ``worker`` label with the worker's name, e.g. ``hq-worker-00``):

* ``hq_worker_uptime_seconds`` gauge
* ``hq_worker_jobs_total{command}``, ``hq_worker_errors_total{code}`` counters
* ``hq_worker_lookups_total``, ``hq_worker_lookup_hits_total``,
  ``hq_worker_lookup_misses_total`` counters: ``get`` items
* ``hq_worker_exists_total``, ``hq_worker_exists_hits_total`` counters: ``exists`` items
* ``hq_worker_reports_total{result}`` counter: ``new``, ``equivalent`` or ``existing``
* ``hq_worker_events_total{event}`` counter: any other counter the worker sends
* ``hq_db_file_bytes``, ``hq_db_wal_bytes``, ``hq_db_page_size_bytes``, ``hq_db_pages``,
  ``hq_db_free_pages`` gauges; ``hq_db_rows{table}`` gauge and ``hq_db_rows_age_seconds``
  (row counts are refreshed at most every ``--stats-rows-interval``)
* ``hq_sqlite_settings_info{journal_mode,synchronous,busy_timeout,cache_size,mmap_size}``
  gauge, value 1: the settings the worker's SQLite connection really has

The endpoint itself: ``hq_metrics_http_responses_total{code}`` counter.

HTTP is served by :class:`HttpEndpoint` from the broker's own poll loop through a
``ZMQ_STREAM`` socket (raw TCP): no thread, no blocking. Each connection's bytes are
buffered up to :data:`MAX_REQUEST_BYTES` until the end of the request headers; a complete
request is answered at once (``Connection: close``) and the connection closed. At most
:data:`MAX_CONNECTIONS` connections are tracked (the oldest is closed to make room) and a
connection silent for :data:`REQUEST_TIMEOUT_S` is answered 408 and closed, so a slow or
hostile client can neither grow the broker's memory nor hold other scrapes up.
"""

from __future__ import annotations

import logging
import math
import re
from collections import OrderedDict

from hq import protocol as p

from .histogram import EXPORT_BOUNDS

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Bytes buffered per connection until the end of its request headers; more is a 400.
MAX_REQUEST_BYTES = 8192
#: Connections tracked at once (accepted, not yet answered); the oldest is closed beyond.
MAX_CONNECTIONS = 64
#: A connection whose request is not complete after this long is answered 408 and closed.
REQUEST_TIMEOUT_S = 10.0
#: Connection ids remembered after the broker closed them, to ignore their late frames.
_CLOSED_MEMORY = 1024

_LE = [repr(float(b)) for b in EXPORT_BOUNDS] + ["+Inf"]
_ESCAPES = str.maketrans({"\\": "\\\\", '"': '\\"', "\n": "\\n"})
_LABEL_NAME = re.compile(r"[^a-zA-Z0-9_]")


# --- rendering ------------------------------------------------------------------------------


def escape(value) -> str:
    """A label value as the text format wants it: backslash, double quote and LF escaped."""
    return str(value).translate(_ESCAPES)


def _number(value):
    """The sample text for a number; None for anything else (a worker may send junk)."""
    kind = type(value)  # exact types: JSON gives int and float; bool is not a sample
    if kind is int:
        return str(value)
    if kind is not float:
        return None
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


class _Text:
    """Lines of one exposition; each family's samples follow its HELP and TYPE lines."""

    __slots__ = ("lines",)

    def __init__(self):
        self.lines: list = []

    def family(self, name: str, kind: str, help_text: str, samples) -> None:
        """``samples``: iterable of (labels text such as ``{worker="w"}`` or "", value)."""
        out = self.lines
        out.append(f"# HELP {name} {help_text}")
        out.append(f"# TYPE {name} {kind}")
        sample_name = name if kind != "counter" or name.endswith("_total") else name + "_total"
        for labels, value in samples:
            text = _number(value)
            if text is not None:
                out.append(f"{sample_name}{labels} {text}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _split_counters(counters: dict, prefixes: tuple) -> tuple:
    """{prefix: {suffix: value}} for the counters named ``prefix.suffix``, and the rest."""
    grouped = {prefix: {} for prefix in prefixes}
    rest = {}
    for name, value in counters.items():
        head, dot, tail = str(name).partition(".")
        if dot and head in grouped:
            grouped[head][tail] = value
        else:
            rest[name] = value
    return grouped, rest


def _worker_labels(workers) -> list:
    """[(label text, Worker)], names made unique (two processes may claim one name)."""
    seen: set = set()
    out = []
    for w in workers:
        name = w.name
        if name in seen:
            name = f"{name}@{w.worker_id.hex()}"
        seen.add(name)
        out.append((f'{{worker="{escape(name)}"}}', w))
    return out


def _with(labels: str, key: str, value) -> str:
    """Labels text plus one more label: ``{worker="w"}`` + table=x -> ``{worker="w",table="x"}``."""
    pair = f'{key}="{escape(value)}"'
    return f"{labels[:-1]},{pair}}}" if labels else f"{{{pair}}}"


def render(sched, now: float, http_counts: dict | None = None) -> str:
    """The exposition of a :class:`~hq.broker.scheduler.Scheduler`'s cumulative values."""
    t = _Text()
    grouped, other = _split_counters(sched.counters, ("requests", "items", "errors", "auth"))
    requests = grouped["requests"]
    malformed = requests.pop("malformed", 0)
    timed_out = requests.pop("timed_out", 0)
    for command in p.CLIENT_COMMANDS:
        requests.setdefault(command.decode(), 0)
    items = grouped["items"]
    for command in p.WORKER_COMMANDS:
        items.setdefault(command.decode(), 0)

    t.family(
        "hq_broker_uptime_seconds", "gauge", "Seconds since the broker started.", [("", now - sched.started)]
    )
    t.family(
        "hq_requests_total",
        "counter",
        "Well-formed client requests received, by command.",
        ((_with("", "command", c), n) for c, n in sorted(requests.items())),
    )
    t.family(
        "hq_requests_malformed_total", "counter", "Client requests refused as malformed.", [("", malformed)]
    )
    t.family(
        "hq_requests_timed_out_total",
        "counter",
        "Requests answered 503 after request-timeout.",
        [("", timed_out)],
    )
    t.family(
        "hq_items_total",
        "counter",
        "Items (hashes, reports) of the requests answered OK, by command.",
        ((_with("", "command", c), n) for c, n in sorted(items.items())),
    )
    t.family(
        "hq_errors_total",
        "counter",
        "Error replies sent to clients, by status code.",
        ((_with("", "code", c), n) for c, n in sorted(grouped["errors"].items())),
    )
    _histograms(t, sched.latency)
    t.family(
        "hq_queued_jobs", "gauge", "Jobs (chunks) waiting in the broker's queues.", [("", len(sched.queue))]
    )
    t.family(
        "hq_inflight_jobs", "gauge", "Jobs given to workers and not yet answered.", [("", len(sched.jobs))]
    )
    t.family(
        "hq_pending_requests",
        "gauge",
        "Client requests not yet answered.",
        [("", len(sched.pending) + len(sched.slow_pending))],
    )
    t.family("hq_clients_queued", "gauge", "Clients with jobs in the queue.", [("", len(sched.queue.queues))])
    t.family("hq_workers", "gauge", "Workers registered with the broker.", [("", len(sched.workers))])
    t.family(
        "hq_broker_cache_entries",
        "gauge",
        "Answers held in the broker's cache of small lookups.",
        [("", len(sched.cache.entries))],
    )
    auth = grouped["auth"]
    t.family(
        "hq_logins_total",
        "counter",
        "Log-ins (auth), by outcome: ok, failed (wrong user or token).",
        [
            (_with("", "outcome", "ok"), auth.get("logins", 0)),
            (_with("", "outcome", "failed"), auth.get("failed", 0)),
        ],
    )
    t.family(
        "hq_requests_refused_total",
        "counter",
        "Requests refused by permissions (403) or for a session unknown here (440), by reason.",
        [
            (_with("", "reason", "forbidden"), auth.get("refused", 0)),
            (_with("", "reason", "no_session"), auth.get("no_session", 0)),
        ],
    )
    t.family(
        "hq_sessions", "gauge", "Log-in sessions open on the broker.", [("", len(sched.access.sessions))]
    )
    t.family(
        "hq_broker_events_total",
        "counter",
        "Other broker counters, by name (re-dispatches, merges, drops...).",
        ((_with("", "event", name), n) for name, n in sorted(other.items())),
    )

    workers = _worker_labels(sched.workers.values())
    current = {w.name for w in sched.workers.values()}
    restarts = sorted(
        (name, n)
        for name, n in ((name, _restarts(v)) for name, v in sched.registrations.items())
        if n or name in current
    )
    t.family(
        "hq_worker_restarts_total",
        "counter",
        "Times a worker registered again under the same name.",
        ((_with("", "worker", name), n) for name, n in restarts),
    )
    t.family(
        "hq_worker_inflight_jobs",
        "gauge",
        "Jobs each worker holds.",
        ((labels, len(w.jobs)) for labels, w in workers),
    )
    _worker_metrics(t, workers)
    if http_counts is not None:
        t.family(
            "hq_metrics_http_responses_total",
            "counter",
            "Answers of this metrics endpoint, by HTTP status.",
            ((_with("", "code", code), n) for code, n in sorted(http_counts.items())),
        )
    return t.text()


def _restarts(registration) -> int:
    """Restarts from a ``Scheduler.registrations`` value: (pid, restarts), or registrations."""
    if isinstance(registration, (tuple, list)):
        return registration[1]
    return registration - 1


def _histograms(t: _Text, latency: dict) -> None:
    name = "hq_request_duration_seconds"
    out = t.lines
    out.append(f"# HELP {name} Seconds from a request's arrival to its reply, by command.")
    out.append(f"# TYPE {name} histogram")
    for command, hist in sorted(latency.items()):
        label = escape(command.decode(errors="replace"))
        for le, (_, n) in zip(_LE, hist.cumulative()):
            out.append(f'{name}_bucket{{command="{label}",le="{le}"}} {n}')
        out.append(f'{name}_sum{{command="{label}"}} {_number(float(hist.sum))}')
        out.append(f'{name}_count{{command="{label}"}} {hist.count}')


_REPORT_RESULTS = ("new", "equivalent", "existing")
_DB_GAUGES = (
    ("hq_db_file_bytes", "file_bytes", "Size of the SQLite database file, as each worker sees it."),
    ("hq_db_wal_bytes", "wal_bytes", "Size of the SQLite write-ahead log file."),
    ("hq_db_page_size_bytes", "page_size", "SQLite page size."),
    ("hq_db_pages", "page_count", "Pages in the SQLite database."),
    ("hq_db_free_pages", "freelist_count", "Free (unused) pages in the SQLite database."),
)


def _worker_metrics(t: _Text, workers: list) -> None:
    per_worker = []  # (labels, grouped counters, other counters, stats dict)
    for labels, w in workers:
        stats = w.stats if isinstance(w.stats, dict) else {}
        counters = stats.get("counters")
        counters = counters if isinstance(counters, dict) else {}
        grouped, rest = _split_counters(counters, ("jobs", "errors", "reports"))
        per_worker.append((labels, grouped, rest, stats, w))

    t.family(
        "hq_worker_uptime_seconds",
        "gauge",
        "Seconds since the worker process started.",
        ((labels, stats.get("uptime_s")) for labels, _, _, stats, _ in per_worker),
    )
    t.family(
        "hq_worker_jobs_total",
        "counter",
        "Jobs run by each worker, by command.",
        (
            (_with(labels, "command", c), n)
            for labels, g, _, _, _ in per_worker
            for c, n in sorted(g["jobs"].items())
        ),
    )
    t.family(
        "hq_worker_errors_total",
        "counter",
        "Jobs a worker answered with an error, by status code.",
        (
            (_with(labels, "code", c), n)
            for labels, g, _, _, _ in per_worker
            for c, n in sorted(g["errors"].items())
        ),
    )
    simple = (
        ("hq_worker_lookups_total", "lookups", "Taskhashes looked up (get items)."),
        ("hq_worker_lookup_hits_total", "lookups.hit", "Taskhashes looked up and found."),
        ("hq_worker_lookup_misses_total", "lookups.miss", "Taskhashes looked up and not found."),
        ("hq_worker_exists_total", "exists", "Unihashes checked (exists items)."),
        ("hq_worker_exists_hits_total", "exists.hit", "Unihashes checked and found."),
    )
    for name, key, help_text in simple:
        t.family(
            name,
            "counter",
            help_text,
            ((labels, rest.pop(key, None)) for labels, _, rest, _, _ in per_worker),
        )
    reports = []
    for labels, g, _, stats, _ in per_worker:
        if "counters" in stats:
            counts = dict.fromkeys(_REPORT_RESULTS, 0)
            counts.update(g["reports"])
            reports.extend((_with(labels, "result", r), n) for r, n in sorted(counts.items()))
    t.family("hq_worker_reports_total", "counter", "Reports stored by each worker, by result.", reports)
    t.family(
        "hq_worker_events_total",
        "counter",
        "Other worker counters, by name.",
        (
            (_with(labels, "event", name), n)
            for labels, _, rest, _, _ in per_worker
            for name, n in sorted(rest.items())
        ),
    )

    dbs = []
    for labels, _, _, stats, _ in per_worker:
        db = stats.get("db")
        dbs.append((labels, db if isinstance(db, dict) else {}))
    for name, key, help_text in _DB_GAUGES:
        t.family(name, "gauge", help_text, ((labels, db.get(key)) for labels, db in dbs))
    rows = []
    for labels, db in dbs:
        counts = db.get("rows")
        if isinstance(counts, dict):
            rows.extend((_with(labels, "table", table), n) for table, n in sorted(counts.items()))
    t.family("hq_db_rows", "gauge", "Rows per table (counted every stats-rows-interval).", rows)
    t.family(
        "hq_db_rows_age_seconds",
        "gauge",
        "Age of the row counts in hq_db_rows.",
        ((labels, db.get("rows_age_s")) for labels, db in dbs),
    )

    info = []
    for labels, _, _, stats, w in per_worker:
        settings = stats.get("settings") or (w.info.get("settings") if isinstance(w.info, dict) else None)
        if isinstance(settings, dict) and settings:
            text = labels
            for key, value in sorted(settings.items()):
                key = _LABEL_NAME.sub("_", str(key))
                if key and not key[0].isdigit() and not key.startswith("__") and key != "worker":
                    text = _with(text, key, value)
            info.append((text, 1))
    t.family(
        "hq_sqlite_settings_info",
        "gauge",
        "The SQLite settings each worker's connection really has "
        "(journal_mode, synchronous, busy_timeout...).",
        info,
    )


# --- HTTP over a ZMQ_STREAM socket --------------------------------------------------------


def _response(
    status: str, body: bytes, content_type: str = "text/plain; charset=utf-8", head=False, extra=""
) -> bytes:
    header = (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
        f"{extra}Connection: close\r\n\r\n"
    ).encode("ascii")
    return header if head else header + body


class HttpEndpoint:
    """The HTTP side of the metrics endpoint, without sockets (as the scheduler is).

    Feed it what a ``ZMQ_STREAM`` socket delivers, ``on_message(conn_id, data, now)`` (a
    zero-length ``data`` is a connect or disconnect notification), and call ``tick(now)``
    from the loop; it puts ``[conn_id, data]`` messages to send in ``outbox`` (a zero-length
    ``data`` closes the connection). ``render`` returns the metrics text.
    """

    def __init__(
        self,
        render,
        max_request_bytes: int = MAX_REQUEST_BYTES,
        max_connections: int = MAX_CONNECTIONS,
        request_timeout_s: float = REQUEST_TIMEOUT_S,
    ):
        self.render = render
        self.max_request_bytes = max_request_bytes
        self.max_connections = max_connections
        self.request_timeout_s = request_timeout_s
        self.conns: OrderedDict = OrderedDict()  # conn_id -> [buffered bytes, connected at], oldest first
        self.closed: OrderedDict = OrderedDict()  # conn_id -> None, recently closed by us
        self.outbox: list = []
        self.responses: dict = {}  # HTTP status code -> answers sent
        self.evicted = 0  # connections closed unanswered to make room

    def on_message(self, conn_id: bytes, data: bytes, now: float) -> None:
        conn = self.conns.get(conn_id)
        if not data:
            if conn is not None:  # the peer went away
                del self.conns[conn_id]
            elif conn_id in self.closed:  # a late notification for a connection we closed
                del self.closed[conn_id]
            else:  # a new connection
                self.conns[conn_id] = [b"", now]
                while len(self.conns) > self.max_connections:
                    oldest = next(iter(self.conns))
                    self.evicted += 1
                    self._close(oldest)
            return
        if conn is None:
            return  # data of a connection already answered or closed: ignore
        buf = conn[0] + data
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            end = buf.find(b"\n\n")
        if end < 0:
            if len(buf) > self.max_request_bytes:
                self._answer(conn_id, 400, _response("400 Bad Request", b"request headers too large\n"))
            else:
                conn[0] = buf
            return
        if end > self.max_request_bytes:
            self._answer(conn_id, 400, _response("400 Bad Request", b"request headers too large\n"))
            return
        self._answer(conn_id, *self._handle(buf[:end]))

    def _handle(self, head: bytes) -> tuple:
        """(status code, response bytes) for one request's header block."""
        line = head.split(b"\n", 1)[0].rstrip(b"\r")
        parts = line.split(b" ")
        if (
            len(parts) != 3
            or not parts[0].isalpha()
            or not parts[0].isupper()
            or not parts[2].startswith(b"HTTP/1.")
            or not parts[1].startswith(b"/")
        ):
            return 400, _response("400 Bad Request", b"bad request\n")
        method, target = parts[0], parts[1]
        head_only = method == b"HEAD"
        if method != b"GET" and not head_only:
            return 405, _response(
                "405 Method Not Allowed", b"method not allowed\n", extra="Allow: GET, HEAD\r\n"
            )
        path = target.split(b"?", 1)[0]
        if path not in (b"/metrics", b"/"):
            return 404, _response("404 Not Found", b"not found; try /metrics\n", head=head_only)
        try:
            body = self.render().encode("utf-8")
        except Exception:  # never let a rendering bug take the broker down
            log.exception("rendering metrics failed")
            return 500, _response("500 Internal Server Error", b"rendering metrics failed\n", head=head_only)
        return 200, _response("200 OK", body, CONTENT_TYPE, head=head_only)

    def _answer(self, conn_id: bytes, code: int, response: bytes) -> None:
        self.responses[code] = self.responses.get(code, 0) + 1
        self.outbox.append([conn_id, response])
        self._close(conn_id)

    def _close(self, conn_id: bytes) -> None:
        self.conns.pop(conn_id, None)
        self.outbox.append([conn_id, b""])
        self.closed[conn_id] = None
        while len(self.closed) > _CLOSED_MEMORY:
            self.closed.popitem(last=False)

    def tick(self, now: float) -> None:
        """Answer 408 and close connections that have not completed a request in time."""
        conns = self.conns
        while conns:
            conn_id, (_, since) = next(iter(conns.items()))
            if now - since < self.request_timeout_s:
                break
            self._answer(conn_id, 408, _response("408 Request Timeout", b"request not complete in time\n"))

    def next_wakeup(self, now: float) -> float:
        """Seconds until tick() has something to do (inf when no connection is open)."""
        if not self.conns:
            return math.inf
        since = next(iter(self.conns.values()))[1]
        return max(0.0, since + self.request_timeout_s - now)
