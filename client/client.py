"""Synchronous hq client: DEALER socket, request ids, deadlines, pipelined batches."""

from __future__ import annotations

import json
import os
import socket
import time

import zmq
from zmq.utils.monitor import recv_monitor_message

from hq import addresses, curve
from hq import permissions as perms
from hq import protocol as p
from hq.sockets import dealer, readable, recv_frames, send_frames

from .policy import InvokeError, RetryPolicy, ServerError  # noqa: F401 (the errors: this module's API too)

DEFAULT_TIMEOUT_S = 30.0
#: Requests of one batch call kept in flight at once.
DEFAULT_WINDOW = 4
#: Items per request of a batch call (several chunks: the broker spreads them over workers).
DEFAULT_REQUEST_ITEMS = 8 * p.DEFAULT_CHUNK_ITEMS
#: Chunks one request may carry (each GET chunk is two frames).
_MAX_CHUNKS = (p.MAX_FRAMES - 4) // 2


class Client:
    """A connection to an hq broker. Not thread-safe; fork-safe (rebuilt in a child).

    ``address`` may name several brokers of one database, separated by commas
    (``tcp://a:8686,tcp://b:8686``). The client then connects to one of them, picked at
    random in each process (so a farm's clients spread over the brokers), and fails over to
    the next when its broker cannot be reached, drops the connection or stops answering:
    the requests it held are sent again there, within the same deadline. Lookups and
    reports are idempotent, so a request answered twice gives the same answer.
    """

    def __init__(
        self,
        address: str,
        username: str | None = None,
        password: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        chunk_items: int = p.DEFAULT_CHUNK_ITEMS,
        request_items: int = DEFAULT_REQUEST_ITEMS,
        window: int = DEFAULT_WINDOW,
        server_key: str | None = None,
        client_key: str | None = None,
    ):
        try:
            self.addresses = addresses.split(address)
        except ValueError as exc:
            raise ValueError(f"bad hq address {address!r}: {exc}") from None
        if not 1 <= chunk_items <= p.MAX_CHUNK_ITEMS:
            raise ValueError(f"chunk_items must be 1-{p.MAX_CHUNK_ITEMS}")
        self.address = address
        # As BitBake: the arguments, else BB_HASHSERVE_USERNAME/_PASSWORD, else ~/.netrc.
        self.username, self.password = perms.find_credentials(self.addresses[0], username, password)
        self.timeout = float(timeout)
        if not 0 < self.timeout <= p.MAX_SECONDS:  # (also nan and inf)
            raise ValueError(f"timeout must be more than 0 and at most {p.MAX_SECONDS} seconds")
        self.chunk_items = chunk_items
        self.request_items = max(chunk_items, min(request_items, p.MAX_BATCH_ITEMS))
        self.window = window
        # CURVE: the broker's public key (40 Z85 characters or a .key file) and this client's
        # .key_secret file; by default from HQ_SERVER_KEY and HQ_CLIENT_KEY.
        server_key = server_key if server_key is not None else os.environ.get(curve.SERVER_KEY_ENV, "")
        client_key = client_key if client_key is not None else os.environ.get(curve.CLIENT_KEY_ENV, "")
        self._curve = None
        if client_key and not server_key:  # CURVE needs the broker's key; never plain text unsaid
            raise ValueError(
                "a client key needs the broker's public key (--server-key, server_key= or HQ_SERVER_KEY)"
            )
        if server_key:
            self._curve = (curve.load_public(server_key), client_key or None)
            if client_key:
                curve.load_secret(client_key)  # a bad file is a ValueError now, not at first use
        self._pid = None
        self._ctx = None
        self._socket = None
        self._poller = None
        self._monitor = None
        self._current = 0  # index in self.addresses of the broker this process uses
        self._links = [Link() for _ in self.addresses]
        self._unreachable: dict = {}  # index -> why, brokers found unreachable in this call
        self._policy = RetryPolicy()  # deadlines, resends, error mapping; its id counter
        self._session = b""  # the broker's session key once logged in (the credentials frame)
        self._become = None  # the user become-user made this connection act as
        self.user = None  # what the last log-in answered: {"result", "username", "permissions"}
        self._logins = 0

    @property
    def stale_replies(self) -> int:
        """Replies discarded because no call was waiting for them (or that did not decode)."""
        return self._policy.stale_replies

    @stale_replies.setter
    def stale_replies(self, count: int) -> None:
        self._policy.stale_replies = count

    # --- connection -------------------------------------------------------------------
    def _sock(self) -> zmq.Socket:
        if self._pid != os.getpid():
            # New process (fork): never touch the parent's context or socket in the child.
            self._pid = os.getpid()
            self._ctx = zmq.Context()
            self._socket = None
            # The child may live elsewhere: BitBake runs a task in a network namespace of
            # its own, where the server the parent reached cannot be reached at all.
            self._links = [Link() for _ in self.addresses]
            # Each process its own broker: a build's forked workers spread over them too.
            self._current = int.from_bytes(os.urandom(2), "big") % len(self.addresses)
        if self._socket is None:
            sock = dealer(self._ctx, p.MAX_FRAME_BYTES, reconnect_max_ms=1000)
            if self._curve is not None:
                curve.connect_as(sock, *self._curve)
            try:
                sock.connect(self.broker)
            except zmq.ZMQError as exc:
                sock.close()
                raise ConnectionError(f"cannot connect to {self.broker}: {exc}") from None
            self._socket = sock
            # Kept: Socket.poll() builds a new Poller every call. With int flags and
            # ZMQ_EVENTS (hq.sockets) this cut a get_unihash from 173 to ~110-135 us of CPU.
            self._poller = zmq.Poller()
            self._poller.register(sock, zmq.POLLIN)
            # Connection events tell a broker restart at once (requests it held are gone,
            # so they are resent as soon as the new broker has shaken hands, not after a
            # third of the deadline) and a server that was never there (Link).
            self._monitor = sock.get_monitor_socket(Link.EVENTS)
            self._poller.register(self._monitor, zmq.POLLIN)
            self._link.new_socket()
        return self._socket

    @property
    def broker(self) -> str:
        """The address of the broker this client uses now."""
        return self.addresses[self._current]

    @property
    def _link(self):
        return self._links[self._current]

    def _fail_over(self, why: str | None = None) -> bool:
        """With several brokers, leave this one for the next (its socket, and what was queued
        on it, go); ``why``: it was found unreachable, and is not tried again in this call
        unless all were. False with one broker, or when every one was found unreachable."""
        if len(self.addresses) == 1:
            return False
        if why is not None:
            self._unreachable[self._current] = why
            if len(self._unreachable) == len(self.addresses):
                return False
        self._reset_socket()
        for _ in self.addresses:
            self._current = (self._current + 1) % len(self.addresses)
            if self._current not in self._unreachable:
                break
        return True

    def _reset_socket(self) -> None:
        """Drop the socket and everything queued on it (Lazy Pirate): stale replies go too.
        A session belongs to a connection: a new socket logs in again."""
        self._session = b""
        if self._socket is not None and self._pid == os.getpid():
            self._socket.disable_monitor()
            self._monitor.close(linger=0)
            self._socket.close(linger=0)
        self._socket = None
        self._poller = None
        self._monitor = None

    def close(self) -> None:
        if self._pid == os.getpid():
            self._reset_socket()
            if self._ctx is not None:
                # destroy, not term: a Ctrl-C that lands between creating a socket and
                # keeping it would leave a socket open, and term() would then wait forever.
                self._ctx.destroy(linger=0)
        self._ctx = None
        self._socket = None
        self._pid = None

    disconnect = close

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # --- the exchange engine: a thin shell around RetryPolicy ------------------------------
    def _send(self, request_id: bytes, command: bytes, body: list) -> None:
        try:
            send_frames(self._sock(), p.encode_request(request_id, command, body, self._session))
        except zmq.Again:
            pass  # pipe full: the attempt deadline will resend
        except zmq.ZMQError as exc:
            raise ConnectionError(f"send to {self.broker} failed: {exc}") from None

    def _resend(self, resends: list) -> None:
        if resends and self.username is not None and not self._session:
            # A new socket (reconnect, Lazy Pirate rebuild, 440): a session is per connection.
            self._login(self._policy.earliest_deadline())
        for request_id, request in resends:
            self._send(request_id, request.command, request.body)

    def _exchange(self, requests) -> list:
        """Send ``(command, body, decode)`` requests pipelined; return decoded replies in order.

        The socket work only: what to send and when, and what a reply means, is decided by
        :class:`~hq.client.policy.RetryPolicy` (PROTOCOL.md §8). A request unanswered when its
        deadline passes raises ConnectionError.
        """
        policy = self._policy
        policy.start(self.timeout)
        self._unreachable = {}
        if self.username is not None and not self._session:
            self._login(time.monotonic() + self.timeout)
        results: list = []
        source = iter(requests)
        exhausted = False
        while True:
            now = time.monotonic()
            while not exhausted and len(policy.outstanding) < self.window:
                try:
                    command, body, decode = next(source)
                except StopIteration:
                    exhausted = True
                    break
                results.append(None)
                self._send(policy.add(command, body, decode, now), command, body)
            if not policy.outstanding:
                return results
            sock = self._sock()
            try:
                ready = self._poller.poll(max(0, int((policy.wake_at() - now) * 1000) + 1))
            except zmq.ZMQError as exc:
                raise ConnectionError(f"poll failed: {exc}") from None
            if ready:
                self._receive(sock, policy, results)
                event = self._connection_events()
                if event == Link.BACK:
                    resends = policy.on_reconnect(time.monotonic())
                    if self.username is not None:  # a new connection: its session is gone
                        self._reset_socket()
                    self._resend(resends)
                elif event == FAILED_OVER:  # never reached the last broker: send it all here
                    self._resend(policy.resend_all(time.monotonic()))
                elif event == FAILED_OVER_LOST:  # the last one held them: as after a reconnect
                    self._resend(policy.on_reconnect(time.monotonic()))
                if policy.login_needed:  # 440: the broker restarted or dropped the session
                    policy.login_needed = False
                    if self.username is None:
                        self._reset_socket()
                        raise ConnectionError("hq asked this anonymous client to log in")
                    self._reset_socket()
                    self._resend(policy.resend_all(time.monotonic()))
                if not policy.outstanding:
                    # All answered (the common case of one lookup): no timer to check. Skipping
                    # the checks saves ~1 us of the ~10 us of Python in a get_unihash (measured
                    # with the sockets stubbed out).
                    continue
            now = time.monotonic()
            if policy.deadline_passed(now):
                self._reset_socket()
                raise ConnectionError(f"no answer from hq at {self.broker} within {self.timeout:g} s")
            self._resend(policy.due(now))
            if policy.attempt_expired(now):
                # Lazy Pirate: late replies to the old attempts go with the socket; with
                # several brokers, the next one is asked (this one may hang).
                if not self._fail_over():
                    self._reset_socket()
                self._resend(policy.resend_all(now))

    def _login(self, deadline: float) -> None:
        """Log in on the current socket (and become the user become_user chose): one request
        at a time, retried while the broker is busy or restarting, until ``deadline``.
        Raises InvokeError for a wrong token, ConnectionError when the broker cannot be had."""
        self._logins += 1
        reply = self._login_call(p.AUTH, [_enc(self.username), _enc(self.password)], deadline)
        try:
            user = _json_body(reply)
            if len(reply) < 2 or user is None:
                raise ValueError("no user and session key")
        except (ValueError, IndexError) as exc:
            raise ConnectionError(f"malformed log-in answer from hq: {exc}") from None
        self._session = bytes(reply[1])
        self.user = user
        if self._become is not None:
            self._login_call(p.BECOME_USER, [_enc(self._become)], deadline)

    def _login_call(self, command: bytes, body: list, deadline: float) -> list:
        backoff = 0.05
        while True:
            request_id = b"login-%d" % self._logins
            self._send(request_id, command, body)
            reply = None
            while reply is None:
                now = time.monotonic()
                if now >= deadline:
                    self._reset_socket()
                    raise ConnectionError(f"no answer from hq at {self.broker} to the log-in in time")
                if not self._poller.poll(max(1, int((deadline - now) * 1000))):
                    continue
                if self._connection_events() in (FAILED_OVER, FAILED_OVER_LOST):
                    break  # ask the next broker
                sock = self._sock()
                while readable(sock):
                    try:
                        got = p.decode_reply(recv_frames(sock))
                    except (p.ProtocolError, zmq.ZMQError):
                        continue
                    if got.request_id == request_id:
                        reply = got
                        break
            if reply is None:
                self._logins += 1
                continue
            if reply.status == p.OK:
                return reply.body
            if reply.status in p.RETRYABLE_STATUSES and time.monotonic() + backoff < deadline:
                time.sleep(backoff)  # the broker is busy or restarting: its answer will come
                backoff = min(backoff * 2, 1.0)
                self._logins += 1
                continue
            if reply.status in (p.E_UNAUTHORIZED, p.E_FORBIDDEN, p.E_INVALID):
                raise InvokeError(p.error_text(reply.body), reply.status)
            raise ServerError(f"hq refused the log-in: {p.error_text(reply.body)}", reply.status)

    def _connection_events(self):
        """Read the socket's connection events: ``Link.BACK`` when the connection is back
        after it dropped. Raises ConnectionError once a server that was never reached has
        refused (or could not be reached) ``Link.ATTEMPTS`` times: waiting out the deadline
        would not help, and BitBake falls back to the taskhash at once."""
        result = None
        link = self._link
        while readable(self._monitor):
            result = link.on_event(recv_monitor_message(self._monitor)["event"]) or result
        if link.unreachable() or (len(self.addresses) > 1 and link.dead_here()):
            why = link.why(self.broker, self._curve is not None)
            if self._fail_over(why):
                return FAILED_OVER
            self._reset_socket()
            if len(self.addresses) > 1:
                raise ConnectionError(
                    "cannot reach any hq broker: "
                    + "; ".join(f"{self.addresses[i]}: {w}" for i, w in sorted(self._unreachable.items()))
                )
            raise ConnectionError(f"cannot reach hq at {self.broker}: {why}")
        if len(self.addresses) > 1 and link.lost and self._fail_over():
            return FAILED_OVER_LOST  # it went away with what it held: the next broker gets it
        return result

    def _receive(self, sock, policy: RetryPolicy, results: list) -> None:
        while readable(sock):
            try:
                frames = recv_frames(sock)
            except zmq.Again:
                return
            except zmq.ZMQError as exc:
                raise ConnectionError(f"receive failed: {exc}") from None
            try:
                reply = p.decode_reply(frames)
            except p.ProtocolError:
                policy.on_garbage()  # not something we asked for: ignore it
                continue
            answered = policy.on_reply(reply.request_id, reply.status, reply.body, time.monotonic())
            if answered is not None:
                try:
                    results[answered.index] = answered.decode(reply.body)
                except (p.ProtocolError, ValueError, IndexError, TypeError) as exc:
                    self._reset_socket()
                    raise ConnectionError(f"malformed reply from hq: {exc}") from None

    def _call(self, command: bytes, body=(), decode=lambda body: body):
        return self._exchange([(command, list(body), decode)])[0]

    # --- batching -----------------------------------------------------------------------
    def _chunked(self, keyed_items):
        """Group (key, item) pairs into requests: lists of (key, [items]) chunks.

        A chunk holds up to ``chunk_items`` consecutive items with one key (the method of a
        GET); a request holds up to ``request_items`` items and at most the chunks that fit
        in MAX_FRAMES. Works on generators of any length without materialising them.
        """
        return self._requests(self._chunks(keyed_items))

    def _chunks(self, keyed_items):
        chunk: list = []
        key = None
        for k, item in keyed_items:
            if chunk and (k != key or len(chunk) >= self.chunk_items):
                yield key, chunk
                chunk = []
            key = k
            chunk.append(item)
        if chunk:
            yield key, chunk

    def _grouped(self, groups):
        """The requests of ``[(key, [items])]``: what :meth:`_chunked` makes of the same
        items as pairs, each group cut into chunks by slicing instead of item by item."""
        n = self.chunk_items
        chunks = ((key, items[i : i + n]) for key, items in groups for i in range(0, len(items), n))
        return self._requests(chunks)

    def _requests(self, chunks):
        request: list = []
        items = 0
        for chunk in chunks:
            request.append(chunk)
            items += len(chunk[1])
            if items + self.chunk_items > self.request_items or len(request) >= _MAX_CHUNKS:
                yield request
                request, items = [], 0
        if request:
            yield request

    def _get_requests(self, requests):
        for chunks in requests:
            body: list = []
            for method, taskhashes in chunks:
                body += (method.encode("utf-8"), p.pack_items(taskhashes))
            yield p.GET, body, _list_decoder(p.unpack_unihashes, [len(c) for _, c in chunks])

    def _exists_requests(self, unihashes):
        for chunks in self._grouped([(None, list(unihashes))]):
            body = [p.pack_items(items) for _, items in chunks]
            yield p.EXISTS, body, _list_decoder(p.unpack_flags, [len(c) for _, c in chunks])

    # --- BitBake hashserv client API ------------------------------------------------------
    def ping(self) -> dict:
        self._call(p.PING)
        return {"alive": True}

    def get_unihash(self, method: str, taskhash: str):
        return self.get_unihash_batch([(method, taskhash)])[0]

    def get_unihash_batch(self, args) -> list:
        """Unihash or None for each (method, taskhash) of an iterable, in order."""
        return self._joined(self._get_requests(self._chunked(args)))

    def get_unihash_groups(self, groups) -> list:
        """For ``[(method, [taskhash, ...]), ...]``, each taskhash's unihash or None, in
        order: what :meth:`get_unihash_batch` answers for the same lookups as pairs, without
        a tuple per lookup, for callers that hold their taskhashes by method (hq's upstream
        agent)."""
        return self._joined(self._get_requests(self._grouped(groups)))

    def unihash_exists(self, unihash: str) -> bool:
        return self.unihash_exists_batch([unihash])[0]

    def unihash_exists_batch(self, unihashes) -> list:
        return self._joined(self._exists_requests(unihashes))

    def _joined(self, requests: list) -> list:
        """The answers to these requests' chunks, one list, in order."""
        out: list = []
        for part in self._exchange(requests):
            out.extend(part)
        return out

    def get_taskhash(self, method: str, taskhash: str, all_properties: bool = False):
        if not all_properties:
            unihash = self.get_unihash(method, taskhash)
            if unihash is None:
                return None
            return {"taskhash": taskhash, "method": method, "unihash": unihash}
        return self._call(p.GET_FULL, [_enc(method), _enc(taskhash)], _json_body)

    def get_outhash(self, method: str, outhash: str, taskhash: str, with_unihash: bool = True):
        body = [_enc(method), _enc(outhash), _enc(taskhash), p.encode_flag(with_unihash)]
        return self._call(p.GET_OUTHASH, body, _json_body)

    def report_unihash(self, taskhash: str, method: str, outhash: str, unihash: str, extra=None) -> dict:
        body = [_enc(method), _enc(taskhash), _enc(outhash), _enc(unihash)]
        fields = {k: v for k, v in (extra or {}).items() if k in p.REPORT_EXTRA_FIELDS and v is not None}
        if fields:
            body.append(p.encode_json(fields))
        unihash_now = self._call(p.REPORT, body, _unihash_body)
        return {"taskhash": taskhash, "method": method, "unihash": unihash_now}

    def report_unihash_equiv(self, taskhash: str, method: str, unihash: str, extra=None) -> dict:
        body = [_enc(method), _enc(taskhash), _enc(unihash)]
        unihash_now = self._call(p.REPORT_EQUIV, body, _unihash_body)
        return {"taskhash": taskhash, "method": method, "unihash": unihash_now}

    def get_stats(self) -> dict:
        return self._call(p.STATS, (), _json_body)

    def reset_stats(self) -> dict:
        return self._call(p.RESET_STATS, (), _json_body)

    # --- database administration (PROTOCOL.md §3.7) -------------------------------------
    def remove(self, where: dict, dry_run: bool = False) -> dict:
        """Delete the reports and mappings matching ``where`` -> ``{"count"}``."""
        return self._call(p.REMOVE, [_where(where), p.encode_flag(dry_run)], _json_body)

    def clean_unused(self, max_age: int, dry_run: bool = False) -> dict:
        """Delete reports without a mapping older than ``max_age`` seconds -> ``{"count"}``."""
        if int(max_age) < 0:
            raise ValueError("max_age must not be negative")
        return self._call(p.CLEAN_UNUSED, [b"%d" % int(max_age), p.encode_flag(dry_run)], _json_body)

    def gc_mark(self, mark: str, where: dict) -> dict:
        return self._call(p.GC_MARK, [_enc(mark), _where(where)], _json_body)

    def gc_mark_stream(self, mark: str, rows) -> dict:
        """gc-mark for each row of an iterable, sent in chunks -> ``{"count"}`` (the sum).
        A row is a where dict or, as for BitBake's client, a string "column value ..."."""
        return {"count": sum(self._exchange(self._gc_mark_requests(mark, rows)))}

    def _gc_mark_requests(self, mark: str, rows):
        mark_frame = _enc(mark)
        for chunks in self._chunked((None, _where_line(row)) for row in rows):
            body: list = []
            for _, lines in chunks:
                body += (mark_frame, p.pack_items(lines))
            yield p.GC_MARK_STREAM, body, _counts_decoder(len(chunks))

    def gc_status(self) -> dict:
        return self._call(p.GC_STATUS, (), _json_body)

    def gc_sweep(self, mark: str, dry_run: bool = False) -> dict:
        return self._call(p.GC_SWEEP, [_enc(mark), p.encode_flag(dry_run)], _json_body)

    def get_db_usage(self) -> dict:
        """``{table: {"rows": N}}``, unwrapped from the reply as BitBake's client does."""
        return self._call(p.DB_USAGE, (), _json_body)["usage"]

    def get_db_query_columns(self) -> list:
        """The column names a where dict may use, unwrapped as BitBake's client does."""
        return self._call(p.QUERY_COLUMNS, (), _json_body)["columns"]

    # --- hq-specific: import of a bitbake-hashserv database (PROTOCOL.md §3.7) -----------
    def import_rows(self, source: str, table: str, last_id: int, rows) -> dict:
        """Send 1-1000 rows (dicts with the source table's columns, or lines already made by
        :func:`encode_import_row`) of ``table`` read from ``source``, whose highest source id
        is ``last_id``; returns ``{"imported", "skipped", "invalid"}``. The rows and the
        checkpoint commit together."""
        lines = [r if isinstance(r, str) else encode_import_row(r) for r in rows]
        body = [_enc(source), _enc(table), b"%d" % last_id, p.pack_items(lines)]
        return self._call(p.IMPORT, body, _json_body)

    def import_status(self, source: str) -> dict:
        """``{table: last source id imported}`` for ``source`` (0: nothing yet)."""
        return self._call(p.IMPORT_STATUS, [_enc(source)], _json_body)

    # --- users (the reference client's API) ------------------------------------------------
    def auth(self, username: str, token: str) -> dict:
        """Log in as ``username`` from now on (and after every reconnect)."""
        self.username, self.password, self._become = str(username), str(token), None
        self._session = b""
        self._sock()
        self._login(time.monotonic() + self.timeout)
        return self.user

    def become_user(self, username: str) -> dict:
        """Act as ``username`` (needs ``@user-admin``); kept across reconnects."""
        result = self._call(p.BECOME_USER, [_enc(username)], _json_body)
        self._become = str(username)
        return result

    def new_user(self, username: str, permissions) -> dict:
        return self._call(p.NEW_USER, [_enc(username), p.encode_json(list(permissions))], _json_body)

    def delete_user(self, username: str | None = None) -> dict:
        return self._call(p.DELETE_USER, [_enc(username)], _json_body)

    def get_user(self, username: str | None = None):
        return self._call(p.GET_USER, [_enc(username)], _json_body)

    def get_all_users(self) -> list:
        return self._call(p.GET_ALL_USERS, (), _json_body)["users"]

    def set_user_perms(self, username: str, permissions) -> dict:
        return self._call(p.SET_USER_PERMS, [_enc(username), p.encode_json(list(permissions))], _json_body)

    def refresh_token(self, username: str | None = None) -> dict:
        result = self._call(p.REFRESH_TOKEN, [_enc(username)], _json_body)
        if username is None or username == self.username:
            self.password = result["token"]  # our own: the next log-in uses the new one
        return result


#: What _connection_events returns when it left the broker for the next one: one the
#: current socket never got through to (nothing sent reached it), or one that dropped the
#: connection (what it held may have run: an admin write is not sent again, see
#: RetryPolicy.on_reconnect).
FAILED_OVER = "failed over"
FAILED_OVER_LOST = "failed over, lost"


class Link:
    """What the socket monitor has told of the connection to the broker. Events only, no
    clock: libzmq retries a failed connect after 0.1, 0.2, 0.4 s ... so ``ATTEMPTS`` failures
    take about 0.7 s."""

    #: Failed connects, with no handshake ever, after which the server counts as unreachable.
    ATTEMPTS = 4
    BACK = "back"
    _FAILED_HANDSHAKES = (
        zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
        | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
        | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    )
    EVENTS = (
        zmq.EVENT_DISCONNECTED
        | zmq.EVENT_HANDSHAKE_SUCCEEDED
        | zmq.EVENT_CONNECT_RETRIED
        | _FAILED_HANDSHAKES
    )

    def __init__(self):
        self.established = False  # a handshake succeeded once, in this process
        self.lost = False  # the connection dropped since the last handshake
        self.failures = 0  # connects that failed while never established
        self.not_zmtp = False  # something answered, but not a ZeroMQ peer
        self.refused = False  # the server's ZAP handler refused this client's CURVE key
        self.protocol_failed = False  # a handshake failed in a way libzmq does not retry
        self.failures_here = 0  # connects of the current socket that failed, none succeeding

    def new_socket(self) -> None:
        self.lost = False
        self.failures_here = 0

    def dead_here(self) -> bool:
        """The current socket never got through, ``ATTEMPTS`` times: with other brokers to
        go to, this one counts as gone even if it answered once (a host that went down)."""
        return self.failures_here >= self.ATTEMPTS

    def on_event(self, event: int):
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self.established = True
            self.failures = self.failures_here = 0
            if self.lost:
                self.lost = False
                return self.BACK
        elif event == zmq.EVENT_DISCONNECTED:
            self.lost = True
        elif event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            self.refused = True  # the broker's ZAP handler said no: retrying cannot help
        elif event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
            # Not ZMTP, or NULL against a CURVE server: libzmq does not even retry.
            self.not_zmtp = self.protocol_failed = True
        elif event & self._FAILED_HANDSHAKES:  # e.g. CURVE with the wrong server key
            self.not_zmtp = True
            if not self.established:
                self.failures += 1
        elif event == zmq.EVENT_CONNECT_RETRIED:
            self.failures_here += 1
            if not self.established:
                self.failures += 1
        return None

    def unreachable(self) -> bool:
        """True when waiting cannot help: the broker refused our CURVE key, the peer failed
        a handshake, or a server that was never reached keeps failing. A connection that
        worked and then dropped (a broker restart) is waited for within the deadline."""
        if self.refused:
            return True
        return not self.established and (self.protocol_failed or self.failures >= self.ATTEMPTS)

    def why(self, address: str, curve_used: bool = False) -> str:
        if self.refused:
            return "the broker refused this client's CURVE key (it is not in the broker's --curve-clients)"
        if self.not_zmtp and curve_used:
            return "the CURVE handshake failed (is the server key this broker's public key?)"
        if self.not_zmtp:
            return (
                "something listens there, but the handshake failed: it does not speak ZeroMQ, or it is "
                "a broker that wants CURVE (give its public key: HQ_SERVER_KEY)"
            )
        return _connect_error(address)


def _connect_error(address: str) -> str:
    """The operating system's reason a plain connection to ``address`` fails (libzmq's
    events do not carry it): "Connection refused", "Network is unreachable", ..."""
    scheme, _, rest = address.partition("://")
    try:
        if scheme == "tcp":
            host, _, port = rest.rpartition(":")
            with socket.create_connection((host.strip("[]"), int(port)), timeout=0.5):
                pass
        elif scheme == "ipc":
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(0.5)
                sock.connect("\0" + rest[1:] if rest.startswith("@") else rest)  # @: abstract
        else:
            return f"no {address} in this process"
    except socket.gaierror as exc:
        return f"cannot resolve the host: {exc.strerror}"
    except OSError as exc:
        return exc.strerror or str(exc)
    return f"{Link.ATTEMPTS} connection attempts failed"


def encode_import_row(row: dict) -> str:
    """One row of an ``import`` chunk: JSON on one line (json escapes every LF). ASCII-only,
    so text read with ``surrogateescape`` from a file that is not UTF-8 still travels, and
    the server refuses that row alone."""
    return json.dumps(row, separators=(",", ":"))


def _enc(value) -> bytes:
    if value is None:
        return b""
    return str(value).encode("utf-8")


def _json_body(body: list):
    """Every JSON answer of hq is an object, or null (no such row): anything else is a
    malformed reply (ValueError), a ConnectionError for the caller."""
    value = json.loads(bytes(body[0]))
    if value is not None and not isinstance(value, dict):
        raise ValueError(f"a JSON object was expected, not {type(value).__name__}")
    return value


def _unihash_body(body: list) -> str:
    value = bytes(body[0]).decode("ascii")
    if not p.is_unihash(value):
        raise ValueError("malformed unihash in reply")
    return value


def _where(where) -> bytes:
    if not isinstance(where, dict):
        raise TypeError("where must be a dict of column names to values")
    return p.encode_json(where)


def _where_line(row) -> str:
    """One item of a gc-mark-stream chunk: a where dict, or "column value ..." text."""
    if isinstance(row, str):
        words = row.split()
        if len(words) % 2:
            raise ValueError(f"row {row!r} is not column/value pairs")
        row = dict(zip(words[::2], words[1::2]))
    return _where(row).decode("utf-8")


def _counts_decoder(n: int):
    """Decoder of a gc-mark-stream reply: one ASCII decimal count per chunk; their sum."""

    def decode(body: list) -> int:
        if len(body) != n:
            raise ValueError(f"reply has {len(body)} counts, expected {n}")
        frames = [bytes(frame) for frame in body]
        if not all(f.isdigit() for f in frames):
            raise ValueError("malformed count in reply")
        return sum(int(f) for f in frames)

    return decode


def _list_decoder(unpack, counts: list):
    """Decoder of a batched reply: one frame per chunk, ``counts[i]`` items in chunk i."""

    def decode(body: list) -> list:
        if len(body) != len(counts):
            raise ValueError(f"reply has {len(body)} chunks, expected {len(counts)}")
        out: list = []
        for frame, n in zip(body, counts):
            out.extend(unpack(frame, n))
        return out

    return decode


def create_client(
    address: str, username=None, password=None, timeout: float = DEFAULT_TIMEOUT_S, **kwargs
) -> Client:
    """The client for an hq broker at ``tcp://HOST:PORT`` or ``ipc://PATH``, or for any of
    several separated by commas."""
    return Client(address, username=username, password=password, timeout=timeout, **kwargs)
