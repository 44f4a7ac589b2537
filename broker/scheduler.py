"""The broker's logic, without sockets: requests in, chunks out to workers, replies back.

Everything here is driven by three calls that take the time as an argument
(:meth:`Scheduler.on_client`, :meth:`Scheduler.on_worker`, :meth:`Scheduler.tick`), and
produces messages in two outboxes that the socket loop sends. Unit tests drive it with a
fake clock and no ZeroMQ at all.

Scheduling rules (PROTOCOL.md, "Broker behaviour"):

* A request is split into *jobs*: one per chunk of a batched command, one otherwise.
* Each client has a FIFO of jobs; the clients share the workers by start-time fair
  queuing weighted by items (:mod:`hq.broker.fairqueue`). So a client's 10,000-hash batch
  delays another client's single lookup by at most the chunks already running on the
  workers, and no client's next wave jumps ahead of others that have waited longer.
* A worker holds at most ``worker_credit`` jobs. It is expired when nothing has been heard
  from it for ``heartbeat_liveness`` heartbeat intervals; its jobs go back to the front of
  their clients' queues (lookups and reports are idempotent, so running one twice is safe).
* Queues are bounded per client and in total: over the bound a request is refused with
  BUSY at once. A request not answered within ``request_timeout_s`` is answered
  UNAVAILABLE. Replies for requests that are done, or from workers that do not hold the
  job, are dropped.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import operator
from collections import deque
from itertools import compress

from hq import addresses, options
from hq import protocol as p
from hq.permissions import READ_ONLY_REFUSED

from .access import Access
from .cache import MAX_ITEMS as CACHE_MAX_ITEMS
from .cache import MappingCache
from .fairqueue import FairQueue
from .histogram import Histogram
from .upstream import EXISTS as ASK_EXISTS
from .upstream import GET as ASK_GET
from .upstream import OUTHASH as ASK_OUTHASH
from .upstream import ROW as ASK_ROW
from .upstream import BackfillBuffer, UpstreamStage

log = logging.getLogger(__name__)

#: Commands whose jobs a worker can run together (one query per method, one transaction).
MERGE_COMMANDS = frozenset({p.GET, p.EXISTS, p.REPORT, p.REPORT_EQUIV})
#: The writes that may insert mappings: reports and report-equivs name the (method, taskhash)
#: in their first two frames; a backfill (--upstream) names a chunk of them.
INSERT_COMMANDS = frozenset({p.REPORT, p.REPORT_EQUIV, p.BACKFILL})
#: Commands that write: at most one REQUEST of them is in flight at a time (see dispatch).
WRITE_COMMANDS = INSERT_COMMANDS | p.ADMIN_WRITE_COMMANDS | p.USER_WRITE_COMMANDS
#: Kept off a --read-only worker while one that writes is registered: what it refuses, every
#: report (it refuses those that write), and the admin user set up at start (it would store
#: it, perhaps in another file).
KEPT_OFF_READ_ONLY = READ_ONLY_REFUSED | {p.REPORT, p.ADMIN_BOOTSTRAP}
#: How a worker's database identity (``Store.identity``) starts when it is a database server.
SHARED_DB_PREFIX = "postgresql:"
#: Lookups whose local misses are asked of the upstream (--upstream) before the answer.
READ_THROUGH = frozenset({p.GET, p.EXISTS, p.GET_FULL, p.GET_OUTHASH})
#: The latency histogram of the upstream agent's answers (--upstream), beside the commands'.
UPSTREAM_LATENCY = b"upstream"
#: User commands whose answer changes live sessions (see hq.broker.access).
SESSION_COMMANDS = frozenset({p.SET_USER_PERMS, p.DELETE_USER})


def _mergeable(first: Job, other: Job) -> bool:
    return (
        first.command in MERGE_COMMANDS
        and other.command == first.command
        and other.credentials == first.credentials
    )


def _peer_address(frame) -> str:
    """The peer address libzmq gives a received frame (``?`` when it has none)."""
    try:
        return frame.get("Peer-Address") if frame is not None else "?"
    except (AttributeError, ValueError, OSError):
        return "?"


def _has_live_followers(job) -> bool:
    return bool(job.followers) and any(not pending.done for pending, _ in job.followers)


def _valid_stats(stats: dict):
    """A worker's HEARTBEAT statistics if they have the expected shape, else None: counters
    a dict of name -> int, settings and db dicts, uptime a number."""
    counters = stats.get("counters", {})
    if not isinstance(counters, dict) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in counters.values()
    ):
        return None
    if not isinstance(stats.get("settings", {}), dict) or not isinstance(stats.get("db", {}), dict):
        return None
    uptime = stats.get("uptime_s")
    if uptime is not None and (not isinstance(uptime, (int, float)) or isinstance(uptime, bool)):
        return None
    return stats


class PendingRequest:
    __slots__ = (
        "client_id",
        "request_id",
        "command",
        "results",
        "remaining",
        "queued",
        "started",
        "deadline",
        "done",
        "items",
        "slow",
        "hook",
        "bodies",
    )

    def __init__(self, client_id, request_id, command, n_jobs, items, now, timeout_s):
        self.client_id = client_id
        self.request_id = request_id
        self.command = command
        self.results = [None] * n_jobs
        self.remaining = n_jobs
        self.queued = 0  # jobs of this request waiting in its client's queue
        self.items = items
        self.started = now
        self.deadline = now + timeout_s
        self.done = False
        self.slow = False  # in Scheduler.slow_pending (admin writes: a longer timeout)
        # For the requests whose answer the broker acts on (log-in, user changes, its own
        # admin bootstrap): hook(pending, frames, now) -> the frames to send, or None.
        self.hook = None
        self.bodies = None  # with --upstream, a lookup's chunks: its misses go upstream


class Job:
    __slots__ = (
        "job_id",
        "request",
        "index",
        "command",
        "credentials",
        "body",
        "items",
        "worker_id",
        "start",
        "attempts",
        "epoch",
        "followers",
        "queued",
    )

    def __init__(self, job_id, request, index, command, credentials, body, items):
        self.job_id = job_id
        self.request = request
        self.index = index
        self.command = command
        self.credentials = credentials
        self.body = body
        self.items = items
        self.worker_id = None
        self.start = 0  # fair-queuing start tag
        self.attempts = 0  # workers lost while holding this job
        # A small lookup whose answer the cache may learn: (epoch, inserts) of the cache at
        # dispatch (-1: not learnable; None: learnable, not dispatched yet).
        self.epoch = -1
        # Identical lookups of other requests that arrived while this one was queued: they
        # get its answer, [(PendingRequest, index)] (see Scheduler._collapse).
        self.followers = None
        self.queued = False  # in a client's queue (not given to a worker)


class Worker:
    __slots__ = (
        "worker_id",
        "info",
        "expiry",
        "last_sent",
        "jobs",
        "busy",
        "credit",
        "served",
        "stats",
        "registered",
        "long_until",
        "db_id",
        "read_only",
    )

    def __init__(self, worker_id, info, credit, now, expiry):
        self.worker_id = worker_id
        self.info = info
        self.credit = credit
        self.expiry = expiry
        self.last_sent = now
        self.jobs = {}  # job_id -> Job, of every REQUEST in flight
        self.busy = 0  # REQUEST messages in flight (what credit limits)
        self.served = 0
        self.stats: dict = {}  # the worker's last HEARTBEAT statistics
        self.registered = now
        self.long_until = 0.0  # holding a LONG_COMMANDS job: not expired before this
        self.db_id = info.get("db_id")  # which database it answers from (Store.identity)
        self.read_only = info.get("read_only") is True  # hq-worker --read-only: it writes nothing

    @property
    def name(self) -> str:
        return str(self.info.get("name") or self.worker_id.hex())


class RunningStats:
    """Count, total, max, mean and stdev of durations (Welford), as hashserv's get-stats."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.num = 0
        self.total = 0.0
        self.max = 0.0
        self._mean = 0.0
        self._m2 = 0.0

    def add(self, value: float):
        self.num += 1
        self.total += value
        self.max = max(self.max, value)
        delta = value - self._mean
        self._mean += delta / self.num
        self._m2 += delta * (value - self._mean)

    def as_dict(self) -> dict:
        stdev = math.sqrt(self._m2 / (self.num - 1)) if self.num > 1 else 0.0
        return {
            "num": self.num,
            "total_time": self.total,
            "max_time": self.max,
            "average": self._mean,
            "stdev": stdev,
        }


class Scheduler:
    """``settings``: the options of :data:`hq.options.SCHEDULER` as attributes (the broker's
    parsed options, or ``hq.options.namespace(hq.options.BROKER, ...)``)."""

    def __init__(self, settings, now: float = 0.0):
        self.settings = settings
        self.started = now

        self.to_clients: list = []  # outbox: [client_id, *frames]
        self.to_workers: list = []  # outbox: [worker_id, *frames]

        self.workers: dict = {}  # worker_id -> Worker
        self.free_slots: deque = deque()  # worker ids, one entry per free credit
        self.queue = FairQueue()
        # worker id -> write REQUESTs it holds. SQLite has one writer, so one write REQUEST is
        # in flight at a time; a database server (PostgreSQL) takes one per worker.
        self.writers: dict = {}
        self.writing = 0  # sum of self.writers' values
        self.max_writers = 1
        # A read-only broker is a mirror: others write its database, unseen, so no cache.
        self._cache_entries = 0 if settings.read_only else settings.cache_entries
        self.cache = MappingCache(self._cache_entries)
        self.shared_db = False  # the workers answer from a database server other brokers may use
        # Workers without --read-only (see _databases_changed: a read-only one takes no lock on
        # the file, so another broker may be writing it, unseen; no cache while one is there).
        self.writable_workers = 0
        # --upstream: lookups' misses go on to the upstream agent, reports ask it first. A
        # miss is then never cached: the upstream may learn that mapping any time.
        self.upstream = None
        if getattr(settings, "upstream", ""):
            self.upstream = UpstreamStage(settings.upstream_timeout_s)
            self.cache.keep_misses = False
        self._internal_ids = itertools.count(1)
        self.backfills = 0  # backfill requests not answered yet (backfill-wait waits for 0)
        self.backfill_buffer = BackfillBuffer()  # mappings for the next backfill
        self._queued_backfill = None  # the backfill waiting in the queue, if any
        self.access = Access.from_settings(settings)
        self.admin_bootstrap = None  # (username, token hash) until a worker has stored it
        self._bootstrapping = False
        self.admin_writes = 0  # admin write jobs in flight: the cache learns nothing meanwhile
        self.insert_writes = 0  # report and report-equiv jobs in flight: it learns no miss
        # (method, chunk) -> the queued GET job identical lookups of other requests join.
        self.collapsible: dict = {}
        self.same_db = True  # every registered worker reports the same database identity
        self._db_id = None  # that identity, when they agree
        # (client_id, request_id) -> PendingRequest, oldest first, so the first one is the
        # next to time out. Admin writes (a sweep of millions of rows) get admin_timeout_s and
        # their own table, which keeps both in deadline order.
        self.pending: dict = {}
        self.slow_pending: dict = {}
        self.jobs: dict = {}  # job_id -> Job, dispatched and not yet answered
        self._next_job = 0
        # Statistics. Counters and histograms only grow (the Prometheus endpoint exports them
        # as they are); reset-stats keeps copies and `stats` reports the differences.
        self.counters: dict = {}
        self.latency: dict = {}  # command -> Histogram, arrival to reply
        self.registrations: dict = {}  # worker name -> (pid, restarts)
        self.request_stats = RunningStats()
        self._base_counters: dict = {}
        self._base_latency: dict = {}
        self._base_workers: dict = {}  # worker name -> its counters at the last reset
        self.last_reset = now

    # --- helpers ------------------------------------------------------------------------
    def count(self, name: str, n: int = 1):
        self.counters[name] = self.counters.get(name, 0) + n

    def _reply(self, client_id, frames):
        if client_id is not None:  # None: the broker's own request (backfill, bootstrap)
            self.to_clients.append([client_id, *frames])

    def _error(self, client_id, request_id, code, message):
        self.count(f"errors.{code}")
        self._reply(client_id, p.encode_error(request_id, code, message))

    def _expiry(self, now):
        return now + self.settings.heartbeat_interval_s * self.settings.heartbeat_liveness

    def _worker_expiry(self, worker, now):
        expiry = now + self.settings.heartbeat_interval_s * self.settings.heartbeat_liveness
        return expiry if expiry > worker.long_until else worker.long_until

    # --- clients ------------------------------------------------------------------------
    def on_client(self, frames: list, now: float, dispatch: bool = True, peer=None):
        """A message from the frontend: [client_id, protocol, request_id, command, ...].

        ``dispatch=False`` only queues the jobs: the socket loop drains everything waiting
        and then dispatches once (in :meth:`tick`), so what arrived together is merged.
        ``peer``: a received frame of the message, for the peer address a failed log-in logs."""
        client_id = frames[0]
        try:
            request = p.decode_request(frames[1:])
        except p.ProtocolError as exc:
            self.count("requests.malformed")
            if log.isEnabledFor(logging.DEBUG):
                log.debug("bad request from %s: %s", client_id.hex(), exc.message)
            self._error(client_id, exc.request_id, exc.code, exc.message)
            return
        command = request.command
        self.count("requests." + command.decode())
        # Who asks, and may they? One dict lookup and one set lookup (hq.broker.access).
        access = self.access
        credentials = request.credentials
        if credentials:  # a session key: one of this connection? (see hq.broker.access)
            who = access.sessions.get(credentials)
            if who is not None and who.client_id != client_id:
                who = None
        else:
            who = access.anonymous
        if who is None:
            self.count("auth.no_session")
            text = "no session for these credentials here: log in again"
            self._error(client_id, request.request_id, p.E_SESSION, text)
            return
        body = request.body
        if command in who.allowed:
            actor = who.report_actor if command == p.REPORT else b""
            refusal = access.import_refusal(who, body) if command == p.IMPORT else None
        elif command == p.AUTH:
            self._login(client_id, request, now, peer)
            if dispatch:
                self.dispatch(now)
            return
        else:
            actor, refusal = b"", access.refusal(who, command, body)
        if refusal is not None:
            self.count("auth.refused")
            log.debug("%s refused %s", who.who, command.decode())
            self._error(client_id, request.request_id, *refusal)
            return
        if command in p.USER_COMMANDS:
            body = access.self_service_body(who, command, body)
        if command in p.BROKER_COMMANDS:
            if self._id_in_use(client_id, request.request_id):
                return
            self._broker_command(client_id, request, now)
            return
        if command == p.REPORT and self.upstream is not None:
            self._report_via_upstream(client_id, request, body, actor, now)
            return
        self._submit(client_id, request, body, actor, now, dispatch)

    def _login(self, client_id, request, now, peer):
        """``auth``: a worker checks the token (the broker never stores one); the answer opens
        a session or, after FAILED_LOGIN_DELAY_S, refuses. One log-in per connection at a time."""
        access = self.access
        try:
            username = p.decode_text(request.body[0], "username", p.MAX_USERNAME_BYTES)
        except p.ProtocolError as exc:
            self._error(client_id, request.request_id, exc.code, exc.message)
            return
        if self.admin_bootstrap is not None and username == self.admin_bootstrap[0]:
            # Not stored yet (no worker, or just starting): the client retries shortly.
            self._error(client_id, request.request_id, p.E_UNAVAILABLE, "the admin user is being set up")
            return
        address = _peer_address(peer)
        busy = access.login_refusal(client_id, address, username)
        if busy is not None:
            self.count("auth.throttled")
            self._error(client_id, request.request_id, p.E_BUSY, busy)
            return

        def hook(pending, frames, now):
            status = int(frames[2])
            if status == p.E_UNAUTHORIZED:
                self.count("auth.failed")
            out = access.login_done(client_id, status, frames, username, address, now)
            if out is not None and status == p.OK:
                self.count("auth.logins")
            return out

        pending = self._submit(client_id, request, request.body, b"", now, False)
        if pending is None:
            access.login_ended(client_id)
        else:
            pending.hook = hook

    def _user_hook(self, credentials):
        """The answer to become-user, set-user-perms or delete-user changes live sessions."""
        access = self.access

        def hook(pending, frames, now):
            if int(frames[2]) == p.OK:
                if pending.command == p.BECOME_USER:
                    return access.become(pending.client_id, credentials, frames)
                access.user_changed(pending.command, frames)
            return frames

        return hook

    def bootstrap_admin(self, username: str, token_hash: str) -> None:
        """``--admin-user``: a worker stores that user with ``@all`` and the password's hash
        as soon as one registers (again after a failure)."""
        self.admin_bootstrap = (username, token_hash)

    def _run_bootstrap(self, now: float) -> None:
        if self.admin_bootstrap is None or self._bootstrapping:
            return
        if not self.settings.read_only and not self.writable_workers:
            return  # only --read-only workers: it waits for one that writes (see KEPT_OFF_READ_ONLY)
        username, token_hash = self.admin_bootstrap
        request = p.Request(b"admin-bootstrap", p.ADMIN_BOOTSTRAP, b"", [], [1])
        body = [username.encode("utf-8"), token_hash.encode("ascii")]

        def hook(pending, frames, now):
            self._bootstrapping = False
            status = int(frames[2])
            if status == p.OK:
                self.admin_bootstrap = None
                created = json.loads(bytes(frames[3])).get("created")
                log.info("admin user '%s' %s", username, "created" if created else "updated")
            else:
                log.warning(
                    "admin user '%s' not stored yet (%s); retrying when a worker registers",
                    username,
                    p.error_text(frames[3:]),
                )
            return None

        pending = self._submit(None, request, body, b"", now, False)
        if pending is not None:
            self._bootstrapping = True
            pending.hook = hook

    def _submit(self, client_id, request, body, actor, now, dispatch):
        """Queue a permitted request's jobs; return its PendingRequest (None if refused)."""
        command = request.command
        if self._id_in_use(client_id, request.request_id):
            return None
        group = p.BATCH_GROUP_FRAMES.get(command)
        counts = request.counts  # counted once, while decoding
        small_get = command == p.GET and len(body) == 2 and counts[0] <= CACHE_MAX_ITEMS
        if small_get and self.cache.entries:
            frame = self.cache.answer(body[0], body[1])
            if frame is not None:
                self._answered_from_cache(client_id, request.request_id, counts[0], frame)
                return None
        bodies = [body] if group is None else [body[i : i + group] for i in range(0, len(body), group)]
        items = sum(counts)
        if (
            self.queue.client_length(client_id) + len(bodies) > self.settings.max_client_jobs
            or len(self.queue) + len(bodies) > self.settings.max_queued_jobs
        ):
            self._error(client_id, request.request_id, p.E_BUSY, "broker queue full, retry later")
            return None
        # A backfill waits behind the lookups that made it, with writes one at a time: a cold
        # burst queues hundreds. Nobody waits for it, so it has the admin writes' timeout:
        # with the clients', the last of them expired, and what they held was asked again.
        slow = command in p.LONG_COMMANDS or command == p.BACKFILL
        pending = PendingRequest(
            client_id,
            request.request_id,
            command,
            len(bodies),
            items,
            now,
            self.settings.admin_request_timeout_s if slow else self.settings.request_timeout_s,
        )
        pending.slow = slow
        if self.upstream is not None and command in READ_THROUGH and client_id is not None:
            pending.bodies = bodies
        (self.slow_pending if slow else self.pending)[(client_id, request.request_id)] = pending
        jobs = []
        for index, chunk in enumerate(bodies):
            self._next_job += 1
            jobs.append(Job(b"%x" % self._next_job, pending, index, command, actor, chunk, counts[index]))
        if small_get and self.cache.max_entries:
            jobs[0].epoch = None
        if command == p.GET:
            jobs = self._collapse(jobs)
        if jobs:
            for job in jobs:
                job.queued = True
            self.queue.push(client_id, jobs)
        pending.queued = len(jobs)
        if command in SESSION_COMMANDS or command == p.BECOME_USER:
            pending.hook = self._user_hook(request.credentials)
        if dispatch:
            self.dispatch(now)
        return pending

    def _id_in_use(self, client_id, request_id) -> bool:
        """A request of this client with this id is still pending: answered 400 (§3.1)."""
        key = (client_id, request_id)
        if key in self.pending or key in self.slow_pending:
            self._error(client_id, request_id, p.E_BAD_REQUEST, "request id already in use")
            return True
        return False

    def _collapse(self, jobs: list) -> list:
        """GET jobs identical to one still queued (same method, chunk and credentials) join
        it as followers instead of being queued; return the jobs to queue. A queued job has
        not been read yet, so its answer is as fresh as the followers' own would be: builders
        of one configuration asking the same wave at once cost one query."""
        index = self.collapsible
        queued = []
        for job in jobs:
            key = (job.body[0], job.body[1])
            leader = index.get(key)
            if leader is not None and leader.queued and leader.credentials == job.credentials:
                if leader.followers is None:
                    leader.followers = []
                leader.followers.append((job.request, job.index))
                self.count("jobs.collapsed")
                continue
            index[key] = job
            queued.append(job)
        return queued

    def _unindex(self, job: Job) -> None:
        job.queued = False
        if job.command == p.GET:
            key = (job.body[0], job.body[1])
            if self.collapsible.get(key) is job:
                del self.collapsible[key]

    def _answered_from_cache(self, client_id, request_id, items, frame):
        self.count("items.get", items)
        self.count("cache.hits", items)
        self._record_latency(p.GET, 0.0)
        self._reply(client_id, p.encode_reply(request_id, p.OK, [frame]))

    def _admin_write_ended(self, n: int = 1):
        """An admin write was answered or lost: whatever it deleted is gone from the cache."""
        self.admin_writes = max(0, self.admin_writes - n)
        self.cache.invalidate()

    def _insert_ended(self, n: int = 1):
        """A report or report-equiv was answered or lost: misses read before are void."""
        self.insert_writes = max(0, self.insert_writes - n)
        self.cache.inserting(())

    def _broker_command(self, client_id, request, now):
        body = [p.encode_json(self.stats(now))]
        if request.command == p.RESET_STATS:  # answers the values before the reset, as hashserv
            self.reset_stats(now)
        self._reply(client_id, p.encode_reply(request.request_id, p.OK, body))

    def _finish(self, pending: PendingRequest, now: float, frames: list):
        pending.done = True
        del (self.slow_pending if pending.slow else self.pending)[(pending.client_id, pending.request_id)]
        if pending.queued:  # failed or timed out with chunks still queued: drop them now
            self._purge(pending)
        self._record_latency(pending.command, now - pending.started)
        if pending.hook is not None:
            frames = pending.hook(pending, frames, now)
            if frames is None:  # held (a failed log-in) or the broker's own request
                return
        self._reply(pending.client_id, frames)

    def _record_latency(self, command: bytes, elapsed: float):
        self.request_stats.add(elapsed)
        hist = self.latency.get(command)
        if hist is None:
            hist = self.latency[command] = Histogram()
        hist.add(elapsed)

    def _purge(self, pending: PendingRequest):
        for job in self.queue.purge(pending, keep=_has_live_followers):
            self._unindex(job)
        pending.queued = 0

    # --- workers ------------------------------------------------------------------------
    def on_worker(self, frames: list, now: float, dispatch: bool = True):
        """A message from the backend: [worker_id, HQW01, kind, ...] (``dispatch``: as
        :meth:`on_client`)."""
        worker_id = frames[0]
        try:
            kind, fields = p.decode_worker_message(frames[1:])
        except p.ProtocolError as exc:
            self.count("workers.malformed")
            log.warning("bad message from worker %s: %s", worker_id.hex(), exc.message)
            return
        worker = self.workers.get(worker_id)
        if kind == p.READY:
            if worker is not None:
                self._drop_worker(worker, "registered again", now)
            self._add_worker(worker_id, fields, now)
        elif worker is None:
            # Unknown (expired, or this broker restarted): make it register again. It may
            # have just finished an admin write this broker does not know of: the cache
            # must not keep what that write deleted.
            self.cache.invalidate()
            if kind == p.REPLY:
                self.count("replies.stale")
            if kind != p.DISCONNECT:
                self.to_workers.append([worker_id, *p.DISCONNECT_MESSAGE])
            return
        elif kind == p.REPLY:
            held = wrote = False
            for job_id, status, body in fields:
                job = worker.jobs.get(job_id)
                wrote |= job is not None and job.command in WRITE_COMMANDS
                held |= self._job_done(worker, job_id, status, body, now)
            if wrote:  # one write REQUEST answered
                self._write_ended(worker_id)
            if worker.long_until and not any(j.command in p.LONG_COMMANDS for j in worker.jobs.values()):
                worker.long_until = 0.0
            worker.expiry = self._worker_expiry(worker, now)
            if held:  # one REQUEST answered: one credit back
                worker.busy = max(0, worker.busy - 1)
                worker.served += 1
                self.free_slots.append(worker.worker_id)
        elif kind == p.HEARTBEAT:
            worker.expiry = self._worker_expiry(worker, now)
            if fields:
                stats = _valid_stats(fields)
                if stats is None:
                    self.count("workers.bad_stats")
                else:
                    worker.stats = stats
                    db_id = stats.get("db", {}).get("id")
                    if db_id is not None and db_id != worker.db_id:
                        worker.db_id = db_id
                        self._databases_changed()
        elif kind == p.DISCONNECT:
            self._drop_worker(worker, "disconnected", now)
        if dispatch:
            self.dispatch(now)

    def _add_worker(self, worker_id, info, now):
        credit = self.settings.worker_credit
        worker = Worker(worker_id, info, credit, now, self._expiry(now))
        self.workers[worker_id] = worker
        self._databases_changed()
        self.free_slots.extend([worker_id] * credit)
        self.count("workers.registered")
        self._run_bootstrap(now)
        pid = info.get("pid")
        if worker.read_only and not self.settings.read_only and worker.name not in self.registrations:
            log.warning(
                "worker %s runs --read-only under a broker that writes: it is given no writes "
                "while a worker that writes is registered (with none, they are refused), and "
                "the broker cache is off while it is registered",
                worker.name,
            )
        last = self.registrations.get(worker.name)
        if last is None:
            self.registrations[worker.name] = (pid, 0)
            log.info("worker %s registered (pid %s)", worker.name, pid)
        elif last[0] == pid:  # the same process again (e.g. after a stall): not a restart
            log.info("worker %s registered again (pid %s)", worker.name, pid)
        else:  # a new process under the name: it counts from zero
            self.registrations[worker.name] = (pid, last[1] + 1)
            self._base_workers.pop(worker.name, None)
            self.count("workers.restarted")
            log.info("worker %s registered (pid %s, restart %d)", worker.name, pid, last[1] + 1)

    def _databases_changed(self):
        """A worker joined, or one's database identity changed (a file replaced under hq):
        what the cache holds may come from another file, and it learns only while every
        worker answers from the same one.

        A database server (a PostgreSQL identity) may be shared by other brokers, whose
        writes and deletions this broker never sees: no cache then, and writes in parallel,
        one REQUEST per worker (the database serialises what must be, per hash)."""
        ids = {w.db_id for w in self.workers.values()}
        self.same_db = len(ids) <= 1
        if len(ids) > 1 or (ids and ids != {self._db_id}):  # not the one the cache learned from
            self.cache.invalidate()
            if self.same_db:
                (self._db_id,) = ids
        shared = any(str(i).startswith(SHARED_DB_PREFIX) for i in ids)
        if shared != self.shared_db:
            self.shared_db = shared
            log.info(
                "workers answer from %s: %s",
                "a database server" if shared else "a database file",
                "writes in parallel, no broker cache" if shared else "one writer",
            )
        self.writable_workers = sum(not w.read_only for w in self.workers.values())
        cache_off = shared or self.writable_workers < len(self.workers)
        if cache_off != (self.cache.max_entries == 0) and self._cache_entries:
            self.cache.invalidate()
            self.cache.max_entries = 0 if cache_off else self._cache_entries
        self.max_writers = max(1, self.writable_workers) if shared else 1

    def _write_ended(self, worker_id) -> None:
        held = self.writers.get(worker_id, 0)
        if not held:
            return
        self.writing -= 1
        if held > 1:
            self.writers[worker_id] = held - 1
        else:
            del self.writers[worker_id]

    def _drop_worker(self, worker: Worker, why: str, now: float):
        del self.workers[worker.worker_id]
        self._databases_changed()
        self.writing -= self.writers.pop(worker.worker_id, 0)
        jobs = list(worker.jobs.values())
        worker.jobs.clear()
        lost_admin_writes = sum(1 for job in jobs if job.command in p.ADMIN_WRITE_COMMANDS)
        if lost_admin_writes:
            self._admin_write_ended(lost_admin_writes)
        lost_inserts = sum(1 for job in jobs if job.command in INSERT_COMMANDS)
        if lost_inserts:
            self._insert_ended(lost_inserts)
        for job in reversed(jobs):  # back to the front of their queues, in order
            del self.jobs[job.job_id]
            job.worker_id = None
            job.attempts += 1
            if job.request.done and not _has_live_followers(job):
                continue
            if job.attempts >= self.settings.max_attempts:
                # A poison request (one that crashes or stalls every worker it reaches)
                # must not take the whole pool down in turn: give up on it.
                self.count("jobs.abandoned")
                log.warning("%s job lost %d workers; answering INTERNAL", job.command.decode(), job.attempts)
                message = f"the request was lost with {job.attempts} workers; not retried further"
                for pending, _ in [(job.request, job.index), *(job.followers or ())]:
                    if not pending.done:
                        self.count(f"errors.{p.E_INTERNAL}")
                        self._finish(pending, now, p.encode_error(pending.request_id, p.E_INTERNAL, message))
            else:
                self._requeue_front(job)
        self.count("workers.dropped")
        if jobs:
            self.count("jobs.redispatched", len(jobs))
        log.info("worker %s %s; %d job(s) re-dispatched", worker.name, why, len(jobs))

    def _requeue_front(self, job: Job):
        self.queue.push_front(job)
        job.request.queued += 1
        job.queued = True
        if job.command == p.GET:
            self.collapsible.setdefault((job.body[0], job.body[1]), job)

    def _job_done(self, worker: Worker, job_id: bytes, status: int, body: list, now: float) -> bool:
        """Record one job's result; False if the worker did not hold that job."""
        job = worker.jobs.pop(job_id, None)
        if job is None:
            self.count("replies.stale")  # redispatched elsewhere, or from before a restart
            return False
        del self.jobs[job_id]
        if job.command in p.ADMIN_WRITE_COMMANDS:
            self._admin_write_ended()
        elif job.command in INSERT_COMMANDS:
            self._insert_ended()
        if isinstance(job.epoch, tuple) and status == p.OK and body:  # learnable, dispatched
            epoch, inserts = job.epoch
            self.cache.learn(epoch, inserts, job.body[0], job.body[1], body[0])
        self._chunk_done(job.request, job.index, status, body, now)
        for pending, index in job.followers or ():
            self._chunk_done(pending, index, status, body, now)
        return True

    def _chunk_done(self, pending: PendingRequest, index: int, status: int, body: list, now: float):
        """One chunk of ``pending`` answered (by its own job, or one it followed)."""
        if pending.done:
            return
        if status != p.OK:
            self.count(f"errors.{status}")
            self._finish(pending, now, p.encode_reply(pending.request_id, status, body))
            return
        pending.results[index] = body
        pending.remaining -= 1
        if pending.remaining == 0:
            if pending.bodies is not None and self._ask_upstream(pending, now):
                return  # answered when the upstream has (or has not, in time)
            self._complete(pending, now)

    def _complete(self, pending: PendingRequest, now: float):
        """Every chunk answered: the reply, the chunks' frames in order."""
        if len(pending.results) == 1:
            reply_body = pending.results[0]
        else:
            reply_body = [frame for part in pending.results for frame in part]
        self.count("items." + pending.command.decode(), pending.items)
        self._finish(pending, now, p.encode_reply(pending.request_id, p.OK, reply_body))

    # --- the upstream (hq.broker.upstream) ----------------------------------------------
    def _ask_upstream(self, pending: PendingRequest, now: float) -> bool:
        """Send a finished lookup's local misses upstream; False if it has none."""
        if pending.command in (p.GET_FULL, p.GET_OUTHASH):
            return self._ask_upstream_row(pending, now)
        if pending.command == p.GET:
            return self._ask_upstream_lookups(pending, now)
        misses = []  # (chunk index, item index, unihash)
        for index, chunk in enumerate(pending.bodies):
            frame = bytes(pending.results[index][0])
            unihashes = bytes(chunk[0]).decode("utf-8", "replace").split("\n")
            misses += [(index, i, u) for i, u in enumerate(unihashes) if frame[i : i + 1] == b"0"]
        if not misses:
            return False
        self.count("upstream.asked", len(misses))

        def answered(result, error, now):
            if pending.done:  # timed out meanwhile
                return
            if error is None and (not isinstance(result, list) or len(result) != len(misses)):
                error = "an answer of the wrong shape"
            if error is not None:
                self._upstream_failed(error)
                self._complete(pending, now)  # local data only
                return
            self._fill_exists(pending, misses, result)
            self._complete(pending, now)

        questions = [question for _, _, question in misses]
        self.upstream.ask(ASK_EXISTS, questions, now, answered, pending.deadline)
        return True

    def _upstream_failed(self, error: str) -> None:
        self.count("upstream.timeouts" if error == "timeout" else "upstream.errors")

    def _ask_upstream_lookups(self, pending: PendingRequest, now: float) -> bool:
        """A lookup's local misses, as packed frames: per chunk with misses, its method and
        the missed taskhashes, LF-joined. The answer is one LF-joined chunk of unihashes
        (empty for a miss) per question chunk."""
        # (chunk index, positions of its misses, method, missed taskhashes, the chunk's local
        # answers split, or None when every one was a miss)
        asked = []
        frames = []
        for index, chunk in enumerate(pending.bodies):
            answers = bytes(pending.results[index][0]).split(b"\n")
            if all(answers):
                continue
            taskhashes = bytes(chunk[1]).split(b"\n")
            if any(answers):  # some hits: the misses picked out (in C: a cold burst is 360k)
                missing = list(map(operator.not_, answers))
                positions = list(compress(range(len(answers)), missing))
                missed = list(compress(taskhashes, missing))
                packed = b"\n".join(missed)
            else:  # all misses: the chunk as it came
                positions, missed, packed, answers = range(len(answers)), taskhashes, bytes(chunk[1]), None
            method = bytes(chunk[0])
            asked.append((index, positions, method, missed, answers))
            frames += (method, packed)
        if not asked:
            return False
        self.count("upstream.asked", sum(len(question[1]) for question in asked))

        def answered(result, error, now):
            if pending.done:  # timed out meanwhile
                return
            if error is None:
                error = self._fill_lookups(pending, asked, result, now)
            if error is not None:
                self._upstream_failed(error)
            self._complete(pending, now)  # with what the upstream knew, or local data only

        self.upstream.ask_frames(ASK_GET, frames, now, answered, pending.deadline)
        return True

    def _ask_upstream_row(self, pending: PendingRequest, now: float) -> bool:
        """get with all, get-outhash: a local null is asked of the upstream; a row it has is
        the answer, and is stored here with its mapping (§7.10)."""
        if bytes(pending.results[0][0]) != b"null":
            return False
        body = [bytes(frame).decode("utf-8", "replace") for frame in pending.bodies[0]]
        if pending.command == p.GET_FULL:
            kind, question, with_unihash = ASK_ROW, body[:2], True
        else:
            kind, question, with_unihash = ASK_OUTHASH, body[:3], body[3] != "0"
        self.count("upstream.asked")

        def answered(row, error, now):
            if pending.done:
                return
            if error is not None:
                self._upstream_failed(error)
            elif isinstance(row, dict) and p.is_unihash(row.get("unihash")):
                self.count("upstream.hits")
                self._backfill([{**row, "method": question[0]}], now)
                if not with_unihash:
                    row = {k: v for k, v in row.items() if k not in ("unihash", "gc_mark")}
                pending.results[0] = [p.encode_json(row)]
            else:
                self.count("upstream.misses")
            self._complete(pending, now)

        self.upstream.ask(kind, question, now, answered, pending.deadline)
        return True

    def _fill_lookups(self, pending, asked, result, now):
        """Put the upstream's unihashes into the lookup's answers and store them (off the
        reply path); an error text if the answer is malformed (nothing is used then)."""
        if len(result) != len(asked):
            return "an answer of the wrong shape"
        fills = []
        for (_, positions, _, _, _), frame in zip(asked, result):
            # The agent checks every unihash; garbage here (a bug there) is never an answer.
            try:
                fills.append(p.split_unihashes(frame, len(positions)))
            except p.ProtocolError:
                return "an answer of the wrong shape"
        hits = 0
        for (index, positions, method, missed, answers), got, frame in zip(asked, fills, result):
            found_u = list(filter(None, got))
            if not found_u:
                continue
            if answers is None:
                pending.results[index] = [bytes(frame)]  # every item was a local miss
            else:
                for i, unihash in zip(positions, got):
                    if unihash:
                        answers[i] = unihash
                pending.results[index] = [b"\n".join(answers)]
            hits += len(found_u)
            self._backfill_mappings(method, list(compress(missed, got)), found_u, now)
        self.count("upstream.hits", hits)
        self.count("upstream.misses", sum(len(a[1]) for a in asked) - hits)
        return None

    def _fill_exists(self, pending, misses, result):
        found = {}
        for (index, i, _), exists in zip(misses, result):
            if exists is True:
                found.setdefault(index, []).append(i)
        hits = sum(len(v) for v in found.values())
        self.count("upstream.hits", hits)
        self.count("upstream.misses", len(misses) - hits)
        for index, positions in found.items():
            flags = bytearray(bytes(pending.results[index][0]))
            for i in positions:
                flags[i] = 0x31
            pending.results[index] = [bytes(flags)]

    def _backfill(self, rows: list, now: float):
        """Store full rows the upstream answered (get-outhash, get with all), off the reply
        path: an internal write job, first mapping wins (hq.workers.importer: backfill)."""
        for start in range(0, len(rows), p.MAX_CHUNK_ITEMS):
            part = rows[start : start + p.MAX_CHUNK_ITEMS]
            self._backfill_job([p.encode_json(part)], len(part), now)

    def _backfill_mappings(self, method: bytes, taskhashes: list, unihashes: list, now: float):
        """Store mappings the upstream answered, packed (method, LF-joined taskhashes,
        LF-joined unihashes), thousands to a write (:class:`~hq.broker.upstream.BackfillBuffer`)."""
        dropped = self.backfill_buffer.add(method, taskhashes, unihashes, now)
        if dropped:  # the writer is far behind: asked of the upstream again next time
            self.count("upstream.backfill_dropped", dropped)
        self._next_backfill(now)

    def _next_backfill(self, now: float) -> None:
        """Queue what the buffer holds, unless a backfill still waits in the queue, or the
        backfills are held while lookups use the upstream (BackfillBuffer.held_until): then
        the buffer fills up meanwhile (called again from tick, which next_wakeup wakes)."""
        waiting = self._queued_backfill
        if waiting is not None and waiting.queued and not waiting.done:
            return
        buffer = self.backfill_buffer
        if now < buffer.held_until(self.upstream):
            return
        taken = buffer.take()
        if taken is not None:
            self._queued_backfill = self._backfill_job(*taken, now)

    @property
    def backfill_pending(self) -> int:
        """Backfills not answered yet, the one the buffer will make included."""
        return self.backfills + (1 if self.backfill_buffer.rows else 0)

    def _backfill_job(self, body: list, items: int, now: float):
        request = p.Request(b"backfill-%x" % next(self._internal_ids), p.BACKFILL, b"", [], [items])
        pending = self._submit(None, request, body, b"", now, False)
        if pending is None:  # the queue is full: these are asked of the upstream again later
            self.count("upstream.backfill_failed")
        else:
            pending.hook = self._backfill_hook
            self.backfills += 1
        return pending

    def _backfill_hook(self, pending, frames, now):
        self.backfills -= 1
        stored = bytes(frames[3]) if int(frames[2]) == p.OK and len(frames) > 3 else b""
        if stored.isdigit():
            self.count("upstream.backfilled", int(stored))
        else:  # an error, or a worker's malformed answer: never the broker's crash
            self.count("upstream.backfill_failed")
        return None  # nobody to answer

    def _report_via_upstream(self, client_id, request, body, actor, now):
        """§7.2 step 4: the upstream's unihash for the report's output, if it knows one, is
        the one stored when no local report of that output has a mapping."""
        try:
            method = p.decode_text(body[0], "method", p.MAX_HASH_BYTES)
            taskhash = p.decode_text(body[1], "taskhash", p.MAX_HASH_BYTES)
            outhash = p.decode_text(body[2], "outhash", p.MAX_HASH_BYTES)
            submitted = bytes(body[3])
        except (p.ProtocolError, IndexError):  # the worker answers the error as usual
            self._submit(client_id, request, body, actor, now, False)
            return

        def answered(result, error, now):
            new_body = body
            if error is not None:
                self._upstream_failed(error)
            elif isinstance(result, dict) and p.is_unihash(result.get("unihash")):
                self.count("upstream.report_hits")
                unihash = result["unihash"].encode("ascii")
                if unihash != submitted:
                    new_body = [body[0], body[1], body[2], unihash, *body[4:]]
            else:
                self.count("upstream.report_misses")
            self._submit(client_id, request, new_body, actor, now, False)

        self.count("upstream.report_asked")
        self.upstream.ask(ASK_OUTHASH, [method, outhash, taskhash], now, answered)

    def on_upstream(self, frames: list, now: float):
        """An answer of the upstream agent."""
        outcome = self.upstream.on_answer(frames, now)
        if outcome is not None:  # how long the agent took: "upstream" among the latencies
            hist = self.latency.get(UPSTREAM_LATENCY)
            if hist is None:
                hist = self.latency[UPSTREAM_LATENCY] = Histogram()
            hist.add(outcome[0])

    # --- dispatch and time ----------------------------------------------------------------
    def dispatch(self, now: float):
        """Give queued jobs to free workers, fairly (see :mod:`hq.broker.fairqueue`).

        Small jobs of the same command are merged into one REQUEST: the next jobs in fair
        order, up to ``merge_items`` items (a client's own next jobs among them: the reports
        of a gateway's many connections share one transaction). A burst of
        single lookups from 40 clients then costs a worker one message and one SQL query,
        and 40 reports one transaction, not 40 (measured with hq-bench, 2 workers, against
        --merge-items 1: single lookups 2.9k -> 6.8k/s with a quarter of the worker CPU,
        reports 1.5k -> 3.7k/s).

        Writes go to one worker at a time (on SQLite; see :meth:`_databases_changed`): SQLite
        lets one connection write anyway, and a
        second writer would sleep in SQLite's busy handler (1, 2, 5, 10 ms...) while holding
        its worker. Meanwhile the other workers serve lookups, and the reports that queue
        up behind the write in flight make the next group commit bigger (measured, hq-bench
        report with 2 workers: 2.7k -> 3.4k reports/s, p99 11 -> 9.4 ms).
        """
        free, queue = self.free_slots, self.queue
        passed = []  # slots of read-only workers with only writes queued
        while free and len(queue):
            worker = self.workers.get(free[0])
            if worker is None or worker.busy >= worker.credit:
                free.popleft()  # slot of a dropped worker
                continue
            free.popleft()
            spare = worker.read_only and self.writable_workers
            eligible = self._eligible_read_only if spare else self._eligible
            batch = queue.take(_mergeable, self.settings.merge_items, eligible)
            if not batch:
                if spare:  # a worker that writes may take what is queued
                    passed.append(worker.worker_id)
                    continue
                free.appendleft(worker.worker_id)  # only writes are queued, and one is in flight
                break
            job = batch[0]
            if job.command in WRITE_COMMANDS:
                self.writers[worker.worker_id] = self.writers.get(worker.worker_id, 0) + 1
                self.writing += 1
            if job.command in p.LONG_COMMANDS:
                # A sweep of millions of rows ends in a COMMIT that can take seconds without a
                # heartbeat: do not take the worker for dead (and run the sweep twice) meanwhile.
                worker.long_until = now + self.settings.admin_request_timeout_s
                worker.expiry = max(worker.expiry, worker.long_until)
            if job.command in p.ADMIN_WRITE_COMMANDS:
                self.admin_writes += len(batch)
                self.cache.invalidate()
            elif job.command in INSERT_COMMANDS:
                self.insert_writes += len(batch)
                named = job.command != p.BACKFILL  # a backfill's keys are a chunk, not named
                self.cache.inserting([(j.body[0], j.body[1]) for j in batch] if named else [])
            worker.busy += 1
            worker.last_sent = now
            cache = self.cache
            learnable = (
                None
                if self.admin_writes or not self.same_db
                else (cache.epoch, -1 if self.insert_writes else cache.inserts)
            )
            for item in batch:
                if item.epoch != -1:  # a learnable lookup: what it may learn, as of now
                    item.epoch = learnable
                self._unindex(item)
                item.request.queued -= 1
                item.worker_id = worker.worker_id
                worker.jobs[item.job_id] = item
                self.jobs[item.job_id] = item
            if len(batch) > 1:
                self.count("jobs.merged", len(batch))
            self.to_workers.append(
                [
                    worker.worker_id,
                    *p.encode_jobs(job.command, job.credentials, [(j.job_id, j.body) for j in batch]),
                ]
            )
        free.extend(passed)  # (at the back: the next dispatch tries the others' slots first)

    def _eligible(self, job: Job) -> bool:
        return job.command not in WRITE_COMMANDS or self.writing < self.max_writers

    def _eligible_read_only(self, job: Job) -> bool:
        return job.command not in KEPT_OFF_READ_ONLY and self._eligible(job)

    def tick(self, now: float):
        """Heartbeats, worker expiry and request timeouts. Call at least every interval."""
        if self.access.delayed:
            self.to_clients.extend(self.access.due(now))
        for worker in list(self.workers.values()):
            if now >= worker.expiry:
                self._drop_worker(worker, "expired (no heartbeat)", now)
            elif now - worker.last_sent >= self.settings.heartbeat_interval_s:
                worker.last_sent = now
                self.to_workers.append([worker.worker_id, *p.HEARTBEAT_MESSAGE])
        for table in (self.pending, self.slow_pending):
            while table:
                pending = next(iter(table.values()))
                if pending.deadline > now:
                    break
                self.count("requests.timed_out")
                self.count(f"errors.{p.E_UNAVAILABLE}")
                self._finish(
                    pending,
                    now,
                    p.encode_error(pending.request_id, p.E_UNAVAILABLE, "no worker answered in time"),
                )
        if self.upstream is not None and self.upstream.waiting:
            self.upstream.expire(now)
        if self.backfill_buffer.rows:
            self._next_backfill(now)
        self.dispatch(now)

    def next_wakeup(self, now: float) -> float:
        """Seconds until tick() has something to do."""
        wake = now + self.settings.heartbeat_interval_s
        for worker in self.workers.values():
            wake = min(wake, worker.expiry, worker.last_sent + self.settings.heartbeat_interval_s)
        for table in (self.pending, self.slow_pending):
            if table:
                wake = min(wake, next(iter(table.values())).deadline)
        if self.access.delayed:
            wake = min(wake, self.access.next_due())
        if self.upstream is not None and self.upstream.waiting:
            wake = min(wake, self.upstream.next_deadline())
        if self.backfill_buffer.rows:
            held_until = self.backfill_buffer.held_until(self.upstream)
            if held_until > now:  # then the hold ends (a queued backfill's answer wakes by itself)
                wake = min(wake, held_until)
        return max(0.0, wake - now)

    def drop_client_replies(self, n: int = 1):
        self.count("replies.dropped", n)

    # --- stats --------------------------------------------------------------------------
    def reset_stats(self, now: float) -> None:
        self._base_counters = dict(self.counters)
        self._base_latency = {command: h.copy() for command, h in self.latency.items()}
        for h in self.latency.values():
            h.max = 0.0
        self._base_workers = {w.name: dict(w.stats.get("counters", {})) for w in self.workers.values()}
        self.request_stats.reset()
        self.last_reset = now

    def stats(self, now: float) -> dict:
        """Raw numbers since the last reset-stats (presentation is hq-admin's job)."""
        base = self._base_counters
        return {
            "requests": self.request_stats.as_dict(),
            "since_reset_s": now - self.last_reset,
            "broker": {
                "settings": {opt.dest: getattr(self.settings, opt.dest) for opt in options.SCHEDULER}
                | {"upstream": addresses.redacted(getattr(self.settings, "upstream", ""))},
                "upstream": None if self.upstream is None else {"backfill_pending": self.backfill_pending},
                "uptime_s": now - self.started,
                "queued_jobs": len(self.queue),
                "inflight_jobs": len(self.jobs),
                "pending_requests": len(self.pending) + len(self.slow_pending),
                "clients_queued": len(self.queue.queues),
                "access": self.access.stats(self.counters),
                "cache": {
                    "entries": len(self.cache.entries),
                    "max_entries": self.cache.max_entries,
                    "learned": self.cache.learned,
                    "invalidations": self.cache.invalidations,
                },
                "counters": {k: v - base.get(k, 0) for k, v in self.counters.items() if v != base.get(k, 0)},
                "latency": {
                    command.decode(): h.minus(self._base_latency.get(command)).summary()
                    for command, h in sorted(self.latency.items())
                },
            },
            "workers": [self._worker_stats(w, now) for w in self.workers.values()],
        }

    def _worker_stats(self, w: Worker, now: float) -> dict:
        counters = w.stats.get("counters", {})
        base = self._base_workers.get(w.name, {})
        return {
            "name": w.name,
            "pid": w.info.get("pid"),
            "read_only": w.read_only,
            "inflight": len(w.jobs),
            "busy": w.busy,
            "served": w.served,
            "registered_s": now - w.registered,
            "restarts": self.registrations.get(w.name, (None, 0))[1],
            "uptime_s": w.stats.get("uptime_s"),
            # What the worker measured on its connection (falls back to what it sent at READY).
            "settings": w.stats.get("settings") or w.info.get("settings"),
            "db": w.stats.get("db", {}),
            # A counter below its baseline belongs to a new process: it counts from zero.
            "counters": {
                k: v - b if v >= b else v for k, v in counters.items() if v != (b := base.get(k, 0))
            },
        }

    def shutdown(self, now: float):
        """Answer every pending request UNAVAILABLE and tell workers to re-register."""
        for pending in [*self.pending.values(), *self.slow_pending.values()]:
            self._finish(pending, now, p.encode_error(pending.request_id, p.E_UNAVAILABLE, "broker stopping"))
        for worker_id in list(self.workers):
            self.to_workers.append([worker_id, *p.DISCONNECT_MESSAGE])
