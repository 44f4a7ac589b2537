"""The hq wire protocol: every frame, command, status code and limit, as named constants,
with pure encode/decode functions over ``list[bytes]``.

This is a leaf module: it imports nothing of hq, only the standard library, so the
client that BitBake embeds can use it. PROTOCOL.md is the specification; this module is
its executable form. Every decode failure raises :class:`ProtocolError` carrying a status
code from :data:`STATUS_NAMES` and, where it could be read, the request id to echo.

Client <-> broker (HQC, a DEALER talking to the broker's frontend ROUTER)::

    request: [HQC01, request_id, command, credentials, body...]
    reply:   [HQC01, request_id, status,  body...]

Worker <-> broker (HQW, a DEALER talking to the broker's backend ROUTER)::

    worker -> broker: [HQW01, READY, info_json]
                      [HQW01, HEARTBEAT[, stats_json]]
                      [HQW01, REPLY, (job_id, status, n, n body frames)...]
                      [HQW01, DISCONNECT]
    broker -> worker: [HQW01, REQUEST, command, credentials, (job_id, n, n body frames)...]
                      [HQW01, HEARTBEAT]
                      [HQW01, DISCONNECT]
"""

from __future__ import annotations

import json
import re
from typing import NamedTuple

# --- protocol identifiers (frame 0) ------------------------------------------------------
CLIENT_PROTOCOL = b"HQC01"
WORKER_PROTOCOL = b"HQW01"
SPEC_VERSION = "1.2"  # version of PROTOCOL.md; bumps with any wire change

# --- client commands (frame 2 of a request) ----------------------------------------------
PING = b"ping"
GET = b"get"  # batched: (method, taskhashes) frame pairs
GET_FULL = b"get-full"  # method, taskhash -> JSON row
GET_OUTHASH = b"get-outhash"  # method, outhash, taskhash, with_unihash -> JSON row
REPORT = b"report"  # method, taskhash, outhash, unihash[, extra_json] -> unihash
REPORT_EQUIV = b"report-equiv"  # method, taskhash, unihash[, extra_json] -> unihash
EXISTS = b"exists"  # batched: unihash list frames
STATS = b"stats"  # answered by the broker
RESET_STATS = b"reset-stats"  # answered by the broker
# Database administration (ref. §7.5-7.8), answered by a worker; the writes go one at a time.
REMOVE = b"remove"  # where_json[, dry_run] -> {"count"}
CLEAN_UNUSED = b"clean-unused"  # max_age_seconds[, dry_run] -> {"count"}
GC_MARK = b"gc-mark"  # mark, where_json -> {"count"}
GC_MARK_STREAM = b"gc-mark-stream"  # batched: (mark, where-JSON chunk) pairs -> count per chunk
GC_STATUS = b"gc-status"  # -> {"keep", "remove", "mark"}
GC_SWEEP = b"gc-sweep"  # mark[, dry_run] -> {"count"}
DB_USAGE = b"db-usage"  # -> {"usage": {table: {"rows"}}}
QUERY_COLUMNS = b"query-columns"  # -> {"columns": [...]}
IMPORT = b"import"  # source, table, last_id, row-JSON chunk -> {"imported", "skipped", "invalid"}
IMPORT_STATUS = b"import-status"  # source -> {table: last_id}
# Users and sessions (1.2; ref. §6). auth and become-user are joined by the broker, which
# keeps the session; the others are run by a worker on the users table.
AUTH = b"auth"  # username, token -> JSON {"result","username","permissions"}, session key
BECOME_USER = b"become-user"  # username -> user JSON (the session acts as that user)
NEW_USER = b"new-user"  # username, permissions JSON -> {"username","permissions","token"}
DELETE_USER = b"delete-user"  # username ("" = self) -> {"username"}
GET_USER = b"get-user"  # username ("" = self) -> user JSON or null
GET_ALL_USERS = b"get-all-users"  # -> {"users": [...]}
SET_USER_PERMS = b"set-user-perms"  # username, permissions JSON -> user JSON
REFRESH_TOKEN = b"refresh-token"  # username ("" = self) -> {"username","token"}
#: Worker-only: the broker's admin bootstrap (--admin-user): username, token hash.
ADMIN_BOOTSTRAP = b"admin-bootstrap"
#: Worker-only: mappings an upstream answered (--upstream), stored if none exists (first wins):
#: method, taskhashes chunk, unihashes chunk (or one JSON list of full rows) -> the number stored.
BACKFILL = b"backfill"
#: What only the broker sends: no client may, and no client-shape check applies.
BROKER_ONLY_COMMANDS = frozenset({ADMIN_BOOTSTRAP, BACKFILL})
USER_COMMANDS = frozenset(
    {AUTH, BECOME_USER, NEW_USER, DELETE_USER, GET_USER, GET_ALL_USERS, SET_USER_PERMS, REFRESH_TOKEN}
)
#: User commands that write the users table.
USER_WRITE_COMMANDS = frozenset({NEW_USER, DELETE_USER, SET_USER_PERMS, REFRESH_TOKEN, ADMIN_BOOTSTRAP})

#: Commands that change the database other than by reporting.
ADMIN_WRITE_COMMANDS = frozenset({REMOVE, CLEAN_UNUSED, GC_MARK, GC_MARK_STREAM, GC_SWEEP, IMPORT})
#: Commands that may scan or rewrite whole tables: the broker allows them its admin request
#: timeout and keeps the worker running one registered that long; a client waits for them
#: instead of resending after a third of its deadline.
LONG_COMMANDS = ADMIN_WRITE_COMMANDS | frozenset({DB_USAGE, GC_STATUS})
#: Commands a worker executes.
WORKER_COMMANDS = (
    frozenset(
        {
            PING,
            GET,
            GET_FULL,
            GET_OUTHASH,
            REPORT,
            REPORT_EQUIV,
            EXISTS,
            GC_STATUS,
            DB_USAGE,
            QUERY_COLUMNS,
            IMPORT_STATUS,
        }
    )
    | ADMIN_WRITE_COMMANDS
    | USER_COMMANDS
)
#: Commands the broker answers itself.
BROKER_COMMANDS = frozenset({STATS, RESET_STATS})
CLIENT_COMMANDS = WORKER_COMMANDS | BROKER_COMMANDS

#: Batched commands: the body is a run of groups of this many frames. Each group is one
#: chunk, the unit of scheduling: the broker spreads the chunks of one request over the
#: workers and joins their replies (one frame per chunk) in order.
BATCH_GROUP_FRAMES = {GET: 2, EXISTS: 1, GC_MARK_STREAM: 2}

#: Exact body frame counts (min, max) for the single-item commands.
BODY_FRAMES = {
    PING: (0, 0),
    GET_FULL: (2, 2),
    GET_OUTHASH: (4, 4),
    REPORT: (4, 5),
    REPORT_EQUIV: (3, 4),
    STATS: (0, 0),
    RESET_STATS: (0, 0),
    REMOVE: (1, 2),
    CLEAN_UNUSED: (1, 2),
    GC_MARK: (2, 2),
    GC_STATUS: (0, 0),
    GC_SWEEP: (1, 2),
    DB_USAGE: (0, 0),
    QUERY_COLUMNS: (0, 0),
    IMPORT: (4, 4),
    IMPORT_STATUS: (1, 1),
    AUTH: (2, 2),
    BECOME_USER: (1, 1),
    NEW_USER: (2, 2),
    DELETE_USER: (1, 1),
    GET_USER: (1, 1),
    GET_ALL_USERS: (0, 0),
    SET_USER_PERMS: (2, 2),
    REFRESH_TOKEN: (1, 1),
}

# --- worker message types (frame 1 of a worker message) -----------------------------------
READY = b"READY"
HEARTBEAT = b"HEARTBEAT"
REQUEST = b"REQUEST"
REPLY = b"REPLY"
DISCONNECT = b"DISCONNECT"

# --- status codes (frame 2 of a reply, ASCII decimal) -------------------------------------
OK = 0
E_BAD_REQUEST = 400  # malformed message: frames missing, extra, or undecodable
E_UNAUTHORIZED = 401  # credentials not accepted
E_FORBIDDEN = 403  # the caller lacks the permission
E_UNKNOWN_COMMAND = 404
E_TOO_LARGE = 413  # a limit below was exceeded
E_INVALID = 422  # a field has an invalid value (e.g. "Invalid unihash")
E_BUSY = 429  # broker queue full: retry later
E_INTERNAL = 500  # unexpected failure while handling the request
E_UNAVAILABLE = 503  # no worker took the request in time
E_VERSION = 505  # protocol version not supported
E_STORAGE = 507  # the database cannot take writes now (disk full, read-only, file gone)
E_SESSION = 440  # the credentials frame names no session of this connection: log in again

STATUS_NAMES = {
    OK: "OK",
    E_BAD_REQUEST: "BAD_REQUEST",
    E_UNAUTHORIZED: "UNAUTHORIZED",
    E_FORBIDDEN: "FORBIDDEN",
    E_UNKNOWN_COMMAND: "UNKNOWN_COMMAND",
    E_TOO_LARGE: "TOO_LARGE",
    E_INVALID: "INVALID",
    E_BUSY: "BUSY",
    E_INTERNAL: "INTERNAL",
    E_UNAVAILABLE: "UNAVAILABLE",
    E_VERSION: "VERSION",
    E_STORAGE: "STORAGE",
    E_SESSION: "LOGIN_AGAIN",
}
#: Codes that mean "the service could not do it now, try again": a client retries them
#: within its deadline, then raises ConnectionError. STORAGE is not among them: a full disk
#: or a read-only file does not clear in seconds, so the client raises ConnectionError at
#: once with the server's text. Every other error code refuses the request.
RETRYABLE_STATUSES = frozenset({E_BUSY, E_INTERNAL, E_UNAVAILABLE})

# --- limits ---------------------------------------------------------------------------
MAX_FRAME_BYTES = 8 * 1024 * 1024  # ZMQ_MAXMSGSIZE on every socket: bigger frames disconnect
MAX_FRAMES = 2050  # frames in one request (4 envelope frames + 1023 GET chunks)
MAX_REQUEST_ID_BYTES = 32
MAX_COMMAND_BYTES = 32
MAX_CREDENTIALS_BYTES = 1024
MAX_METHOD_BYTES = 256
MAX_HASH_BYTES = 256  # taskhash / outhash, UTF-8 bytes
MAX_CHUNK_ITEMS = 1000  # items in one chunk frame
MAX_BATCH_ITEMS = 65536  # items in one request
#: The longest time any hq setting or deadline may be, in seconds (about 11.6 days): a wait
#: of it in milliseconds still fits the 32 bits poll(2) takes.
MAX_SECONDS = 1_000_000
MAX_EXTRA_BYTES = 4 * 1024 * 1024  # report extra JSON (outhash_siginfo can be large)
MAX_ERROR_BYTES = 1024  # error message text in a reply
MAX_IMPORT_SOURCE_BYTES = 256  # the source name of an import
MAX_USERNAME_BYTES = 256  # user names (UTF-8 text, checked as a hash is)
MAX_TOKEN_BYTES = 512  # a token in auth

#: What a client packs into one chunk: measured in PROTOCOL.md ("Packing").
DEFAULT_CHUNK_ITEMS = 1000

#: Optional report fields (besides method, taskhash, outhash, unihash) kept with the report.
REPORT_EXTRA_FIELDS = ("owner", "PN", "PV", "PR", "task", "outhash_siginfo")

# --- import of a bitbake-hashserv database (PROTOCOL.md §3.7) ----------------------------------
#: Source tables, in the order hq-admin sends them: users and config first (small), then the
#: mappings, then the outhash rows. Mappings go before outhash rows because an outhash row
#: only takes part in equivalence (report, §9) once its (method, taskhash) has a mapping:
#: each outhash row is useful the moment it lands, and ``clean-unused`` never sees an
#: imported outhash row without its mapping.
IMPORT_TABLES = ("users", "config", "unihashes_v3", "outhashes_v2")
#: Columns each source row must carry (others, such as ``id``, are ignored).
IMPORT_COLUMNS = {
    "users": ("username", "token", "permissions"),
    "config": ("name", "value"),
    "unihashes_v3": ("method", "taskhash", "unihash", "gc_mark"),
    "outhashes_v2": ("method", "taskhash", "outhash", "created", *REPORT_EXTRA_FIELDS),
}

ITEM_SEPARATOR = b"\n"
UNIHASH_RE = re.compile(r"[0-9a-f]{64}\Z")
_HEX_BYTES = b"0123456789abcdef"


class ProtocolError(Exception):
    """A message could not be decoded or violates a rule of the spec.

    ``code`` is the status to answer with; ``request_id`` is set when the envelope was
    readable, so the error reply can be matched by the caller.
    """

    def __init__(self, code: int, message: str, request_id: bytes | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id


class Request(NamedTuple):
    request_id: bytes
    command: bytes
    credentials: bytes
    body: list
    counts: list  # items of each job the request makes (see chunk_counts)


class Reply(NamedTuple):
    request_id: bytes
    status: int
    body: list


# --- client <-> broker envelope ---------------------------------------------------------


def encode_request(request_id: bytes, command: bytes, body=(), credentials: bytes = b"") -> list:
    return [CLIENT_PROTOCOL, request_id, command, credentials, *body]


def decode_request(frames: list) -> Request:
    """Check a client request's envelope and its body's shape (not its values)."""
    if not frames:
        raise ProtocolError(E_BAD_REQUEST, "empty message")
    proto = bytes(frames[0])
    if proto != CLIENT_PROTOCOL:
        if proto.startswith(CLIENT_PROTOCOL[:3]):
            raise ProtocolError(
                E_VERSION,
                f"protocol {_show(proto)} not supported; supported: {CLIENT_PROTOCOL.decode()}",
                _request_id_or_none(frames),
            )
        raise ProtocolError(E_BAD_REQUEST, f"frame 0 must be {CLIENT_PROTOCOL.decode()}")
    if len(frames) < 4:
        raise ProtocolError(
            E_BAD_REQUEST,
            "a request needs 4 frames: protocol, request id, command, credentials",
            _request_id_or_none(frames),
        )
    request_id = bytes(frames[1])
    if not 1 <= len(request_id) <= MAX_REQUEST_ID_BYTES:
        raise ProtocolError(E_BAD_REQUEST, f"request id must be 1-{MAX_REQUEST_ID_BYTES} bytes")
    command = bytes(frames[2])
    credentials = bytes(frames[3])
    body = frames[4:]
    counts = chunk_counts(command, body, request_id)
    if len(credentials) > MAX_CREDENTIALS_BYTES:
        raise ProtocolError(E_TOO_LARGE, "credentials frame too large", request_id)
    return Request(request_id, command, credentials, body, counts)


def check_body_shape(command: bytes, body: list, request_id: bytes | None = None) -> int:
    """Check the frame layout of a request body; return the number of items it carries."""
    return sum(chunk_counts(command, body, request_id))


def chunk_counts(command: bytes, body: list, request_id: bytes | None = None) -> list:
    """Check the frame layout of a request body; return the items of each job it makes
    (one per chunk of a batched command, ``[1]`` otherwise). Raises ProtocolError."""
    if command not in CLIENT_COMMANDS:
        raise ProtocolError(E_UNKNOWN_COMMAND, f"unknown command {_show(command)}", request_id)
    if len(body) + 4 > MAX_FRAMES:
        raise ProtocolError(E_TOO_LARGE, f"more than {MAX_FRAMES} frames", request_id)
    group = BATCH_GROUP_FRAMES.get(command)
    if group is None:
        low, high = BODY_FRAMES[command]
        if not low <= len(body) <= high:
            want = str(low) if low == high else f"{low}-{high}"
            raise ProtocolError(
                E_BAD_REQUEST,
                f"{command.decode()} takes {want} body frames, got {len(body)}",
                request_id,
            )
        return [1]
    if not body or len(body) % group:
        raise ProtocolError(
            E_BAD_REQUEST,
            f"{command.decode()} body must be one or more groups of {group} frames",
            request_id,
        )
    counts = [count_items(body[i]) for i in range(group - 1, len(body), group)]
    if max(counts) > MAX_CHUNK_ITEMS:
        n = max(counts)
        raise ProtocolError(E_TOO_LARGE, f"chunk of {n} items exceeds {MAX_CHUNK_ITEMS}", request_id)
    total = sum(counts)
    if total > MAX_BATCH_ITEMS:
        raise ProtocolError(E_TOO_LARGE, f"batch of {total} items exceeds {MAX_BATCH_ITEMS}", request_id)
    return counts


def encode_reply(request_id: bytes, status: int = OK, body=()) -> list:
    return [CLIENT_PROTOCOL, request_id, b"%d" % status, *body]


def encode_error(request_id: bytes | None, code: int, message: str) -> list:
    text = message.encode("utf-8", "replace")[:MAX_ERROR_BYTES]
    return [CLIENT_PROTOCOL, request_id or b"", b"%d" % code, text]


def decode_reply(frames: list) -> Reply:
    if len(frames) < 3 or bytes(frames[0]) != CLIENT_PROTOCOL:
        raise ProtocolError(E_BAD_REQUEST, "malformed reply envelope")
    try:
        status = int(bytes(frames[2]))
    except ValueError:
        raise ProtocolError(E_BAD_REQUEST, "reply status is not a number") from None
    return Reply(bytes(frames[1]), status, frames[3:])


def error_text(body: list) -> str:
    return bytes(body[0]).decode("utf-8", "replace") if body else ""


# --- worker <-> broker -----------------------------------------------------------------


def encode_ready(info: dict) -> list:
    return [WORKER_PROTOCOL, READY, json.dumps(info).encode()]


def encode_jobs(command: bytes, credentials: bytes, jobs) -> list:
    """A REQUEST carrying one or more jobs ``[(job_id, body)]`` of one command."""
    frames = [WORKER_PROTOCOL, REQUEST, command, credentials]
    for job_id, body in jobs:
        frames += (job_id, b"%d" % len(body), *body)
    return frames


def encode_job(job_id: bytes, command: bytes, credentials: bytes, body) -> list:
    return encode_jobs(command, credentials, [(job_id, body)])


def encode_results(results) -> list:
    """A REPLY carrying one result ``(job_id, status, body)`` per job of a REQUEST."""
    frames = [WORKER_PROTOCOL, REPLY]
    for job_id, status, body in results:
        frames += (job_id, b"%d" % status, b"%d" % len(body), *body)
    return frames


def encode_job_reply(job_id: bytes, status: int, body=()) -> list:
    return encode_results([(job_id, status, list(body))])


HEARTBEAT_MESSAGE = [WORKER_PROTOCOL, HEARTBEAT]


def encode_heartbeat(stats: dict) -> list:
    """A worker's HEARTBEAT carrying its statistics (cumulative counters, database facts)."""
    return [WORKER_PROTOCOL, HEARTBEAT, json.dumps(stats, separators=(",", ":")).encode()]


DISCONNECT_MESSAGE = [WORKER_PROTOCOL, DISCONNECT]


def _count(frame, what: str) -> int:
    data = bytes(frame)
    if not data.isdigit() or len(data) > 9:
        raise ProtocolError(E_BAD_REQUEST, f"{what} is not a count")
    return int(data)


def _split_jobs(frames: list, start: int, with_status: bool) -> list:
    """Parse ``(job_id, [status,] n, n frames)`` runs from ``frames[start:]``."""
    out = []
    i, end = start, len(frames)
    head = 3 if with_status else 2
    while i < end:
        if i + head > end:
            raise ProtocolError(E_BAD_REQUEST, "truncated job")
        job_id = bytes(frames[i])
        n = _count(frames[i + head - 1], "job frame count")
        body_start = i + head
        if body_start + n > end:
            raise ProtocolError(E_BAD_REQUEST, "job frame count exceeds the message")
        body = frames[body_start : body_start + n]
        if with_status:
            try:
                status = int(bytes(frames[i + 1]))
            except ValueError:
                raise ProtocolError(E_BAD_REQUEST, "job status is not a number") from None
            out.append((job_id, status, body))
        else:
            out.append((job_id, body))
        i = body_start + n
    if not out:
        raise ProtocolError(E_BAD_REQUEST, "message carries no job")
    return out


def decode_worker_message(frames: list) -> tuple:
    """Decode a message from a worker: (kind, fields). Raises ProtocolError.

    REPLY fields are ``[(job_id, status, body)]``; READY fields are the info dict;
    HEARTBEAT fields are the worker's statistics dict, or ``()`` when it sent none.
    """
    if len(frames) < 2 or bytes(frames[0]) != WORKER_PROTOCOL:
        raise ProtocolError(E_BAD_REQUEST, "not an HQW01 worker message")
    kind = bytes(frames[1])
    if kind == REPLY:
        return kind, _split_jobs(frames, 2, with_status=True)
    if kind in (HEARTBEAT, DISCONNECT) and len(frames) == 2:
        return kind, ()
    if kind in (READY, HEARTBEAT) and len(frames) == 3:
        what = kind.decode()
        try:
            info = json.loads(bytes(frames[2]))
        except (ValueError, RecursionError):
            raise ProtocolError(E_BAD_REQUEST, f"{what} info is not JSON") from None
        if not isinstance(info, dict):
            raise ProtocolError(E_BAD_REQUEST, f"{what} info is not an object")
        return kind, info
    raise ProtocolError(E_BAD_REQUEST, f"bad worker message {_show(kind)}")


def decode_broker_message(frames: list) -> tuple:
    """Decode a message from the broker to a worker: (kind, fields). Raises ProtocolError.

    REQUEST fields are ``(command, credentials, [(job_id, body)])``.
    """
    if len(frames) < 2 or bytes(frames[0]) != WORKER_PROTOCOL:
        raise ProtocolError(E_BAD_REQUEST, "not an HQW01 broker message")
    kind = bytes(frames[1])
    if kind == REQUEST:
        if len(frames) < 6:
            raise ProtocolError(E_BAD_REQUEST, "REQUEST needs command, credentials and a job")
        return kind, (bytes(frames[2]), bytes(frames[3]), _split_jobs(frames, 4, with_status=False))
    if kind in (HEARTBEAT, DISCONNECT):
        return kind, ()
    raise ProtocolError(E_BAD_REQUEST, f"bad broker message {_show(kind)}")


# --- body values ----------------------------------------------------------------------


def count_items(frame) -> int:
    """Items in a packed item frame (LF-separated; an empty frame is one empty item)."""
    return bytes(frame).count(ITEM_SEPARATOR) + 1


def pack_items(items) -> bytes:
    """Pack hash strings into one chunk frame. Raises ValueError for unpackable items."""
    text = "\n".join(items)
    if text.count("\n") != len(items) - 1:
        raise ValueError("a hash must not contain a line feed")
    return text.encode("utf-8")


def unpack_items(frame, what: str = "hash", max_bytes: int = MAX_HASH_BYTES) -> list:
    """Unpack and check a chunk frame into a list of str. Raises ProtocolError."""
    data = bytes(frame)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(E_BAD_REQUEST, f"{what} list is not valid UTF-8") from None
    items = text.split("\n")
    # Fast path: every item is plain hex of one length (what BitBake always sends).
    if data.translate(None, _HEX_BYTES + ITEM_SEPARATOR) == b"":
        width = len(items[0])
        if (
            0 < width <= max_bytes
            and len(data) == len(items) * (width + 1) - 1
            # the length alone also fits uneven items ("ab\nabcd\n"): check every separator
            and data[width :: width + 1] == ITEM_SEPARATOR * (len(items) - 1)
        ):
            return items
    for item in items:
        check_text(item, what, max_bytes)
    return items


def check_text(value: str, what: str, max_bytes: int) -> str:
    """A method or hash string: 1..max_bytes UTF-8 bytes, no control characters."""
    if not value:
        raise ProtocolError(E_INVALID, f"empty {what}")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:  # a lone surrogate (from JSON, or surrogateescape'd bytes)
        raise ProtocolError(E_INVALID, f"{what} is not valid Unicode") from None
    if size > max_bytes:
        raise ProtocolError(E_INVALID, f"{what} longer than {max_bytes} bytes")
    if not value.isprintable():
        raise ProtocolError(E_INVALID, f"{what} contains control characters")
    return value


def decode_text(frame, what: str, max_bytes: int) -> str:
    try:
        value = bytes(frame).decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(E_BAD_REQUEST, f"{what} is not valid UTF-8") from None
    return check_text(value, what, max_bytes)


def is_unihash(value) -> bool:
    return isinstance(value, str) and UNIHASH_RE.match(value) is not None


def decode_unihash(frame) -> str:
    value = bytes(frame).decode("ascii", "replace")
    if not is_unihash(value):
        raise ProtocolError(E_INVALID, "Invalid unihash")
    return value


def pack_unihashes(unihashes) -> bytes:
    """Reply frame for a GET chunk: LF-joined unihashes, an empty item for a miss."""
    return "\n".join([u or "" for u in unihashes]).encode("ascii")


def unpack_unihashes(frame, expected: int) -> list:
    """Decode a GET reply chunk; every item is a valid unihash or None. Raises ProtocolError."""
    data = bytes(frame)
    items = data.decode("ascii", "replace").split("\n")
    if _check_unihash_chunk(data, items, expected):
        return items  # every item a hit
    return [u or None for u in items]


def split_unihashes(frame, expected: int) -> list:
    """A GET reply chunk's items as bytes, each a valid unihash or ``b""`` (a miss), for
    code that passes them on without decoding. Raises ProtocolError."""
    data = bytes(frame)
    items = data.split(ITEM_SEPARATOR)
    _check_unihash_chunk(data, items, expected)
    return items


def _check_unihash_chunk(data: bytes, items: list, expected: int) -> bool:
    """Raise ProtocolError unless ``items`` (``data`` split) are ``expected`` unihashes or
    empty items; True if every item is a unihash."""
    if len(items) != expected:
        raise ProtocolError(E_BAD_REQUEST, f"reply has {len(items)} items, expected {expected}")
    # Only lower-case hex and separators, and every item 64 characters or empty: this check
    # runs in C and takes a quarter of the time of a regex per item (PROTOCOL.md, Packing).
    if not data.translate(None, _HEX_BYTES + ITEM_SEPARATOR):
        if len(data) == 65 * expected - 1 and data[64::65] == ITEM_SEPARATOR * (expected - 1):
            return True
        if set(map(len, items)) <= {0, 64}:  # in C, not a Python step per item
            return False
    raise ProtocolError(E_BAD_REQUEST, "reply carries a malformed unihash")


def pack_flags(flags) -> bytes:
    """Reply frame for an EXISTS chunk: one ASCII '1' or '0' per item."""
    return bytes(0x31 if f else 0x30 for f in flags)


def unpack_flags(frame, expected: int) -> list:
    data = bytes(frame)
    if len(data) != expected or data.translate(None, b"01"):
        raise ProtocolError(E_BAD_REQUEST, "malformed exists reply")
    return [b == 0x31 for b in data]


def encode_json(value) -> bytes:
    # ensure_ascii=False: non-ASCII text stays as compact UTF-8 instead of \\uXXXX escapes,
    # which could make a row with a big outhash_siginfo outgrow MAX_FRAME_BYTES.
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def decode_json_object(frame, what: str, max_bytes: int = MAX_EXTRA_BYTES) -> dict:
    data = bytes(frame)
    if len(data) > max_bytes:
        raise ProtocolError(E_TOO_LARGE, f"{what} larger than {max_bytes} bytes")
    if not data:
        return {}
    try:
        value = json.loads(data)
    except (ValueError, RecursionError):
        raise ProtocolError(E_BAD_REQUEST, f"{what} is not valid JSON") from None
    if not isinstance(value, dict):
        raise ProtocolError(E_BAD_REQUEST, f"{what} must be a JSON object")
    return value


def encode_flag(value: bool) -> bytes:
    return b"1" if value else b"0"


def decode_flag(frame, what: str) -> bool:
    data = bytes(frame)
    if data not in (b"0", b"1"):
        raise ProtocolError(E_BAD_REQUEST, f"{what} must be 0 or 1")
    return data == b"1"


def _request_id_or_none(frames: list):
    if len(frames) > 1 and 1 <= len(frames[1]) <= MAX_REQUEST_ID_BYTES:
        return bytes(frames[1])
    return None


def _show(value: bytes) -> str:
    return repr(bytes(value[:40]))[1:]


# --- who a worker acts for (REQUEST frame 3, 1.2) -----------------------------------------


def encode_actor(username: str | None, write: bool = True) -> bytes:
    """The broker's word to a worker on whom a job runs for: ``w:`` (may write reports) or
    ``r:`` (a report is answered as a lookup), then the user name (empty: anonymous).
    Empty means ``w:`` (anonymous): lookups carry it, so every client's lookups merge."""
    if username is None and write:
        return b""
    return (b"w:" if write else b"r:") + (username or "").encode("utf-8")


def decode_actor(frame) -> tuple:
    """``(username or None, write)`` from an actor frame; raises ProtocolError."""
    data = bytes(frame)
    if not data:
        return None, True
    if data[:2] not in (b"w:", b"r:"):
        raise ProtocolError(E_BAD_REQUEST, "malformed actor frame")
    try:
        name = data[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(E_BAD_REQUEST, "actor is not valid UTF-8") from None
    return name or None, data[:2] == b"w:"
