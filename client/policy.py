"""The client's deadlines, resends and error mapping (PROTOCOL.md §8), without sockets or a clock.

:class:`RetryPolicy` tracks the requests of the client's current call. Every method that needs the time takes
``now`` (``time.monotonic()`` seconds in the client, any number in a test), so each rule can
be tested exactly with a fake clock. The socket loop in :mod:`hq.client.client` sends what
the policy hands it, polls until :meth:`RetryPolicy.wake_at`, and feeds replies and
connection events back in:

* every send, resends included, takes a new request id (lower-case hex from a counter kept
  for the client's life); a reply to any other id is counted in ``stale_replies`` and ignored;
* a request unanswered ``timeout_s`` after its first send has passed its deadline;
* an attempt lasts :func:`attempt_time_s`; after that without a reply the socket is rebuilt
  and every outstanding request resent (Lazy Pirate). ``LONG_COMMANDS`` get the whole
  deadline as one attempt;
* 429, 500 and 503 are resent after a backoff of 50 ms doubling up to 1 s; when the next
  resend would not come before the deadline the call fails with ServerError;
* an admin write that may have run (500, 503, or a reconnect) is never sent again;
* 401, 403 and 422 raise InvokeError, every other error status ServerError.

Imports only the standard library and :mod:`hq.protocol`: no ZeroMQ.
"""

from __future__ import annotations

import itertools

from hq import protocol as p

#: First wait before resending a request answered with a retryable status; doubles each time.
BACKOFF_START_S = 0.05
#: Longest wait between two resends of a retryable request.
BACKOFF_MAX_S = 1.0
#: An attempt lasts a third of the deadline but at least this long, or the whole deadline if
#: that is shorter (PROTOCOL.md §8: 10 s with the default 30 s timeout).
ATTEMPT_MIN_S = 1.0
#: Statuses that refuse the value itself, as BitBake's client raises ``InvokeError``.
REFUSAL_STATUSES = frozenset({p.E_INVALID, p.E_FORBIDDEN, p.E_UNAUTHORIZED})


class InvokeError(Exception):
    """The server refused the request (the reference client's ``InvokeError``)."""

    def __init__(self, message: str, code: int = 0):
        super().__init__(message)
        self.code = code


class ServerError(ConnectionError):
    """The server answered with an error status that is neither a refusal of the value
    (:class:`InvokeError`) nor worth retrying: BitBake sees a ``ConnectionError`` and falls
    back to the taskhash; tools such as hq-admin can tell it from an unreachable server by
    ``code`` (the PROTOCOL.md status; 0 when the outcome of an admin write is unknown)."""

    def __init__(self, message: str, code: int = 0):
        super().__init__(message)
        self.code = code


def attempt_time_s(timeout_s: float) -> float:
    """How long one attempt waits for a reply before the socket is rebuilt: a third of the
    deadline, but at least ATTEMPT_MIN_S (or the whole deadline if that is shorter)."""
    return max(timeout_s / 3.0, min(timeout_s, ATTEMPT_MIN_S))


class Outstanding:
    """A request of the current call that has no answer yet, across all its attempts. The
    policy keeps ``decode`` and ``index`` (the request's place in the call's results) for
    the socket loop; it never looks at them."""

    __slots__ = (
        "index",
        "command",
        "body",
        "decode",
        "deadline",
        "attempt_s",
        "attempt_deadline",
        "resend_at",
        "backoff_s",
    )

    def __init__(
        self, index: int, command: bytes, body: list, decode, now: float, timeout_s: float, attempt_s: float
    ):
        if command in p.LONG_COMMANDS:
            # A sweep of millions of rows may take long; sent again it would run again (a
            # second gc-sweep is refused: the mark is gone). Wait the whole deadline instead.
            attempt_s = timeout_s
        self.index = index
        self.command = command
        self.body = body
        self.decode = decode
        self.deadline = now + timeout_s  # from the first send: resends do not extend it
        self.attempt_s = attempt_s
        self.attempt_deadline = now + attempt_s
        self.resend_at = None  # set while a backoff runs: then the attempt deadline waits
        self.backoff_s = BACKOFF_START_S


class RetryPolicy:
    """Which requests to send, when, and what a reply means; one per client object.

    Call :meth:`start` at the beginning of each call: it forgets the requests of a call that
    ended with an exception. The request-id counter and ``stale_replies`` last for the
    client's life (a forked child keeps counting too: ids need only be unique per socket).
    """

    def __init__(self):
        self._ids = itertools.count(1)
        #: Requests of this call still waiting for their answer: request id -> Outstanding, in
        #: the order last sent. Read-only outside this class: the shell takes its length for
        #: the pipelining window (a __len__ method would cost a Python call, twice a lookup).
        self.outstanding: dict = {}
        self._added = 0
        self.stale_replies = 0  # replies discarded because no call was waiting for them
        self.login_needed = False  # a 440 came: log in again, then resend everything
        self.timeout_s = None
        self.attempt_s = None

    def start(self, timeout_s: float) -> None:
        """Begin a call whose requests each have ``timeout_s`` from their first send."""
        if self.outstanding:
            self.outstanding = {}
        self._added = 0
        if timeout_s != self.timeout_s:  # the client's timeout rarely changes: skip the sums
            self.timeout_s = timeout_s
            self.attempt_s = attempt_time_s(timeout_s)

    def add(self, command: bytes, body: list, decode, now: float) -> bytes:
        """Track a new request, sent at ``now``; return the request id to send it under.
        Its answer goes to index ``k`` of the call's results for the k-th request added."""
        request = Outstanding(self._added, command, body, decode, now, self.timeout_s, self.attempt_s)
        self._added += 1
        request_id = b"%x" % next(self._ids)
        self.outstanding[request_id] = request
        return request_id

    # --- what arrives -----------------------------------------------------------------------
    def on_reply(self, request_id: bytes, status: int, body: list, now: float) -> Outstanding | None:
        """A reply arrived at ``now``. Returns the request it answers (status OK; the caller
        decodes ``body`` with ``request.decode``), or None: an unknown id (counted as stale)
        or a retryable status, resent at :meth:`wake_at` by :meth:`due`. Raises InvokeError
        for a refusal, ServerError for other errors, for an admin write that may have run,
        and when the next resend would not come before the deadline."""
        request = self.outstanding.get(request_id)
        if request is None:
            self.stale_replies += 1
            return None
        if status == p.OK:
            del self.outstanding[request_id]
            return request
        if status == p.E_SESSION:  # not run: the shell logs in again and resends it
            self.login_needed = True
            return None
        if status in p.RETRYABLE_STATUSES:
            if status != p.E_BUSY:  # BUSY: refused before it ran; the rest may have run
                _no_second_run(request, f"hq answered {p.STATUS_NAMES.get(status)}: {p.error_text(body)}")
            request.resend_at = now + request.backoff_s
            request.backoff_s = min(request.backoff_s * 2, BACKOFF_MAX_S)
            if request.resend_at >= request.deadline:
                raise ServerError(
                    f"hq could not serve the request: {p.error_text(body)} "
                    f"({p.STATUS_NAMES.get(status, status)})",
                    status,
                )
            return None
        if status in REFUSAL_STATUSES:
            raise InvokeError(p.error_text(body), status)
        # Malformed request, unknown command, wrong version, storage refused: for a build
        # that is a transport failure (a ConnectionError).
        raise ServerError(
            f"hq rejected the request: {p.error_text(body)} ({p.STATUS_NAMES.get(status, status)})", status
        )

    def on_garbage(self) -> None:
        """A reply that does not decode: not something this client asked for; ignored."""
        self.stale_replies += 1

    def on_reconnect(self, now: float) -> list:
        """The connection dropped and came back (a broker restart): the requests the old
        broker held are gone. Returns ``(request_id, request)`` to send at once, all of them
        under new ids; raises ServerError if one is an admin write, which may have run."""
        for request in self.outstanding.values():
            _no_second_run(request, "the connection to the broker was lost")
        return self.resend_all(now)

    # --- what the clock decides ---------------------------------------------------------------
    def wake_at(self) -> float:
        """The earliest time something is due: a deadline, a backoff resend, or the end of
        an attempt. Only meaningful while requests are outstanding."""
        wake = float("inf")
        for request in self.outstanding.values():
            due = request.attempt_deadline if request.resend_at is None else request.resend_at
            if request.deadline < due:
                due = request.deadline
            if due < wake:
                wake = due
        return wake

    def earliest_deadline(self) -> float:
        """The first deadline among the outstanding requests (a log-in must end by then)."""
        return min((r.deadline for r in self.outstanding.values()), default=float("inf"))

    def deadline_passed(self, now: float) -> bool:
        """True once a request has gone ``timeout_s`` without its answer: the call fails."""
        for request in self.outstanding.values():
            if now >= request.deadline:
                return True
        return False

    def due(self, now: float) -> list:
        """``(request_id, request)`` whose backoff has ended: resend them now, same socket."""
        ready = [
            request_id
            for request_id, request in self.outstanding.items()
            if request.resend_at is not None and now >= request.resend_at
        ]
        return [self._resend(request_id, now) for request_id in ready] if ready else ready

    def attempt_expired(self, now: float) -> bool:
        """True when a request not waiting out a backoff has had no reply for a whole attempt:
        rebuild the socket (late replies to it go with it), then send :meth:`resend_all`."""
        for request in self.outstanding.values():
            if now >= request.attempt_deadline and request.resend_at is None:
                return True
        return False

    def resend_all(self, now: float) -> list:
        """``(request_id, request)`` for every outstanding request, under new ids, each with a
        new attempt from ``now`` and no backoff pending."""
        return [self._resend(request_id, now) for request_id in list(self.outstanding)]

    def _resend(self, request_id: bytes, now: float) -> tuple:
        request = self.outstanding.pop(request_id)
        new_id = b"%x" % next(self._ids)
        request.resend_at = None
        request.attempt_deadline = now + request.attempt_s
        self.outstanding[new_id] = request
        return new_id, request


def _no_second_run(request: Outstanding, why: str) -> None:
    """An admin write whose first run may have happened is not sent again: a second
    gc-sweep would be refused, a second remove would count 0. Say so instead."""
    if request.command in p.ADMIN_WRITE_COMMANDS:
        raise ServerError(
            f"{why}; {request.command.decode()} may or may not have run: check (e.g. gc-status, "
            "or the command with --dry-run) before running it again"
        )
