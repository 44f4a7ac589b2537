"""Who may run what: anonymous permissions, log-in sessions and the read-only mode.

The broker is the one place every request passes, so it decides here, per request, with a
set lookup: each principal (anonymous, or a session) carries the frozenset of commands it
may run, computed once at log-in. Identity is established per connection: ``auth`` asks a
worker to check the token against the users table, and on success the broker opens a
*session* bound to that connection's routing id and answers its key, which the client then
sends as its credentials frame. A key from another connection, or one this broker does not
know (it restarted, or the connection was replaced), is answered 440 and the client logs in
again.

A failed log-in is answered after ``FAILED_LOGIN_DELAY_S`` (the reference waits 1 s), by a
timer: the broker goes on serving everyone else, and a connection has at most one log-in in
flight, so a client hammering wrong tokens gets one try a second per connection and slows
nobody else. Tokens never reach a log line: only user names and peer addresses do.
"""

from __future__ import annotations

import heapq
import json
import logging
import secrets
from collections import OrderedDict

from hq import permissions as perms
from hq import protocol as p

log = logging.getLogger(__name__)

#: How long a failed log-in waits for its answer (the reference: 1 s).
FAILED_LOGIN_DELAY_S = 1.0
#: Sessions kept; beyond this the oldest is dropped (its client logs in again on 440).
MAX_SESSIONS = 65536
#: Log-ins in flight (or held back after a failure) as one user from one peer address; more
#: get 429 at once, without a worker. With FAILED_LOGIN_DELAY_S that caps wrong guesses at one
#: user's token from one host, however many connections it opens, at about 8 a second, and
#: leaves other users of that host (a build farm's NAT, every user of a gateway) their turn.
MAX_LOGINS_PER_USER = 8
#: And all log-ins from one peer address together, whatever the user names.
MAX_LOGINS_PER_PEER = 64

_SELF_SERVICE = frozenset(cmd for cmd, rule in perms.REQUIRED.items() if rule.self_service)


class Principal:
    """Anonymous, or one logged-in session: what it may run, decided once."""

    __slots__ = ("client_id", "username", "perms", "allowed", "report_actor")

    def __init__(self, client_id, username, user_perms, anon: frozenset, read_only: bool):
        self.client_id = client_id
        self.username = username
        self.perms = frozenset(user_perms)
        granted = self.perms if username is not None else frozenset()
        allowed = {p.PING}
        for command, rule in perms.REQUIRED.items():
            if read_only and not rule.read_only:
                continue
            if (rule.anon and perms.has(anon, rule.perms)) or (
                username is not None and perms.has(granted, rule.perms)
            ):
                allowed.add(command)
        self.allowed = frozenset(allowed)
        may_write = not read_only and (
            perms.has(anon, (perms.REPORT,)) or (username is not None and perms.has(granted, (perms.REPORT,)))
        )
        self.report_actor = p.encode_actor(username, may_write)

    @property
    def who(self) -> str:
        return "Anonymous user" if self.username is None else self.username


class Access:
    def __init__(self, anon_perms: frozenset, read_only: bool = False, max_sessions: int = MAX_SESSIONS):
        self.anon_perms = frozenset(anon_perms)
        self.read_only = read_only
        self.max_sessions = max_sessions
        self.anonymous = Principal(None, None, (), self.anon_perms, read_only)
        self.sessions: OrderedDict = OrderedDict()  # key -> Principal
        self.by_client: dict = {}  # client_id -> its session key
        # client id -> what its log-in in flight (or held back) counts in: (address, (address, user))
        self.logging_in: dict = {}
        self.peer_logins: dict = {}  # address, or (address, user) -> log-ins in flight or held back
        self.delayed: list = []  # heap of (due, seq, client_id, frames): failed log-ins
        self._seq = 0

    @classmethod
    def from_settings(cls, settings) -> Access:
        return cls(perms.parse_anon(settings.anon_perms), settings.read_only)

    # --- the per-request decision ------------------------------------------------------
    # Who asks is found in Scheduler.on_client itself (the hot path): ``sessions[key]`` if
    # its client_id is the connection's, else 440; no credentials: ``anonymous``.
    def refusal(self, who: Principal, command: bytes, body: list):
        """Why ``who`` may not run ``command`` (a command not in ``who.allowed``):
        ``(status, text)``, or None when it may after all (self-service, import)."""
        rule = perms.REQUIRED.get(command)
        if rule is None:
            return None
        if self.read_only and not rule.read_only:
            return p.E_UNKNOWN_COMMAND, f"{command.decode()} is not available on a read-only server"
        if command in _SELF_SERVICE and who.username is not None:
            name = bytes(body[0]) if body else b""
            if not name or name == who.username.encode("utf-8"):
                return None  # the caller fills in the user name (see self_service_body)
        if command == p.IMPORT:
            refused = self.import_refusal(who, body)
            if refused is not None:
                return refused
        return p.E_FORBIDDEN, self.refusal_text(who, rule.perms)

    def import_refusal(self, who: Principal, body: list):
        """``import`` of the users table creates users: it needs ``@user-admin`` too."""
        if len(body) > 1 and bytes(body[1]) == b"users":
            needed = perms.IMPORT_USERS_PERMS
            if not perms.has(self.anon_perms, needed) and not (
                who.username is not None and perms.has(who.perms, needed)
            ):
                return p.E_FORBIDDEN, self.refusal_text(who, needed)
        return None

    @staticmethod
    def refusal_text(who: Principal, required) -> str:
        return f"{who.who} is not allowed to access permissions(s) {', '.join(required)}"

    @staticmethod
    def self_service_body(who: Principal, command: bytes, body: list) -> list:
        """A user command naming no user acts on the caller."""
        if command in _SELF_SERVICE and who.username is not None and not bytes(body[0]):
            return [who.username.encode("utf-8"), *body[1:]]
        return body

    # --- log-in --------------------------------------------------------------------------
    def login_refusal(self, client_id, address: str, username: str):
        """Why this log-in may not start now (a 429 text), or None (it is counted in)."""
        if client_id in self.logging_in:
            return "a log-in is already in progress on this connection"
        counted = (address, (address, username))
        if self.peer_logins.get(counted[1], 0) >= MAX_LOGINS_PER_USER:
            return f"too many log-ins as {username} from this address at once; retry later"
        if self.peer_logins.get(address, 0) >= MAX_LOGINS_PER_PEER:
            return "too many log-ins from this address at once; retry later"
        self.logging_in[client_id] = counted
        for key in counted:
            self.peer_logins[key] = self.peer_logins.get(key, 0) + 1
        return None

    def login_ended(self, client_id) -> None:
        for key in self.logging_in.pop(client_id, ()):
            left = self.peer_logins.get(key, 1) - 1
            if left > 0:
                self.peer_logins[key] = left
            else:
                self.peer_logins.pop(key, None)

    def login_done(self, client_id, status: int, frames: list, username: str, peer: str, now: float):
        """A worker answered ``auth``: open the session (OK), or hold the refusal for
        FAILED_LOGIN_DELAY_S. Returns the frames to send now, or None (delayed)."""
        if status == p.OK:
            self.login_ended(client_id)
            try:
                answer = json.loads(bytes(frames[3]))
                user_perms = answer["permissions"]
            except (ValueError, KeyError, IndexError, TypeError):
                return frames
            key = self.open_session(client_id, answer["username"], user_perms)
            log.info("%s logged in from %s", answer["username"], peer)
            return [*frames, key]
        if status == p.E_UNAUTHORIZED:
            log.warning("failed log-in as %s from %s", username, peer)
            self._seq += 1
            heapq.heappush(self.delayed, (now + FAILED_LOGIN_DELAY_S, self._seq, client_id, frames))
            return None
        self.login_ended(client_id)
        return frames

    def open_session(self, client_id, username: str, user_perms) -> bytes:
        old = self.by_client.pop(client_id, None)
        if old is not None:
            self.sessions.pop(old, None)
        key = secrets.token_hex(16).encode("ascii")
        self.sessions[key] = Principal(client_id, username, user_perms, self.anon_perms, self.read_only)
        self.by_client[client_id] = key
        while len(self.sessions) > self.max_sessions:
            _, dropped = self.sessions.popitem(last=False)
            self.by_client.pop(dropped.client_id, None)
        return key

    def due(self, now: float) -> list:
        """Failed log-ins whose delay is over: ``[client_id, *frames]`` to send."""
        out = []
        while self.delayed and self.delayed[0][0] <= now:
            _, _, client_id, frames = heapq.heappop(self.delayed)
            self.login_ended(client_id)
            out.append([client_id, *frames])
        return out

    def next_due(self):
        return self.delayed[0][0] if self.delayed else None

    # --- what user administration changes in live sessions --------------------------------
    def become(self, client_id, credentials: bytes, frames: list) -> list:
        """``become-user`` succeeded: the session acts as that user from now on."""
        try:
            user = json.loads(bytes(frames[3]))
            session = self.sessions[credentials]
        except (ValueError, KeyError, IndexError):
            return frames
        self.sessions[credentials] = Principal(
            client_id, user["username"], _stored(user["permissions"]), self.anon_perms, self.read_only
        )
        log.info("%s became %s", session.username, user["username"])
        return frames

    def user_changed(self, command: bytes, frames: list) -> None:
        """New permissions take effect at once in that user's sessions; a deleted user's
        sessions end (their next request is 440, and the log-in fails)."""
        try:
            answer = json.loads(bytes(frames[3]))
            username = answer["username"]
        except (ValueError, KeyError, IndexError, TypeError):
            return
        for key, session in list(self.sessions.items()):
            if session.username != username:
                continue
            if command == p.DELETE_USER:
                del self.sessions[key]
                self.by_client.pop(session.client_id, None)
            else:
                self.sessions[key] = Principal(
                    session.client_id,
                    username,
                    _stored(answer["permissions"]),
                    self.anon_perms,
                    self.read_only,
                )

    def stats(self, counters: dict) -> dict:
        """``counters``: the scheduler's (cumulative), where log-ins are counted."""
        return {
            "anon_perms": sorted(self.anon_perms),
            "read_only": self.read_only,
            "sessions": len(self.sessions),
            "logins": counters.get("auth.logins", 0),
            "failed_logins": counters.get("auth.failed", 0),
        }


def _stored(shown_perms) -> list:
    """A user object's permissions back to the stored set (``@all`` collapses)."""
    return [perms.ALL] if perms.ALL in shown_perms else list(shown_perms)
