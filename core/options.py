"""Every option of hq's daemons, declared once: name, default, help, type and the attribute a
program reads it as.

One row serves every program that takes the option (the heartbeat interval is the broker's,
the workers' and hq-server's), so a default that both sides of the wire must share cannot
drift apart. :mod:`hq.config` turns a program's rows into its command line, ``HQ_*``
variables and configuration-file keys; :data:`PROGRAMS` says which rows each program takes.
Adding a broker option is one row in :data:`SCHEDULER` and the code that reads it.

Durations and sizes carry their unit in the attribute name (``heartbeat_interval_s``,
``busy_timeout_ms``); the flag a user types does not (``--heartbeat-interval``).
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass
from typing import Any, Callable

from hq import addresses, databases, oehashequiv
from hq import permissions as perms
from hq import protocol as p
from hq.logs import LEVELS


@dataclass(frozen=True)
class Option:
    name: str  # flag without dashes, e.g. "heartbeat-interval"
    default: Any
    help: str
    type: Callable = str
    multiple: bool = False  # comma-separated in env/file, repeatable on the command line
    choices: tuple = ()
    attr: str = ""  # the attribute programs read (default: the name with underscores)

    @property
    def dest(self) -> str:
        return self.attr or self.name.replace("-", "_")

    @property
    def env(self) -> str:
        return "HQ_" + self.name.upper().replace("-", "_")


# --- value types: each raises ValueError with the rule in its text ---------------------------


def at_least(kind: Callable, minimum, inclusive: bool = True, maximum=None) -> Callable:
    """A finite ``kind`` (int or float) not below ``minimum`` (above it when ``inclusive`` is
    false), nor above ``maximum`` if given."""

    def convert(text):
        value = kind(text)
        if not math.isfinite(value) or value < minimum or (not inclusive and value == minimum):
            raise ValueError(f"must be {'at least' if inclusive else 'more than'} {minimum}")
        if maximum is not None and value > maximum:
            raise ValueError(f"must be at most {maximum}")
        return value

    convert.__name__ = kind.__name__
    return convert


def BOOL(text) -> bool:  # noqa: N802 (an option type, named like the others)
    """yes/no, true/false, on/off, 1/0 (empty: false)."""
    if isinstance(text, bool):
        return text
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r}")


POSITIVE_INT = at_least(int, 1)
NON_NEGATIVE_INT = at_least(int, 0)
POSITIVE_FLOAT = at_least(float, 0, inclusive=False, maximum=p.MAX_SECONDS)
NON_NEGATIVE_FLOAT = at_least(float, 0.0, maximum=p.MAX_SECONDS)


def writable_file(text: str) -> str:
    """Empty (none) or a file path whose directory exists, so a file a daemon writes once
    running (an endpoint file) cannot fail after it has started."""
    if text == "":
        return text
    directory = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(directory):
        raise ValueError(f"directory {directory} does not exist")
    if os.path.isdir(text):
        raise ValueError("is a directory")
    if not os.access(directory, os.W_OK):
        raise ValueError(f"directory {directory} is not writable")
    return text


# --- the rows ----------------------------------------------------------------------------------

#: SQLite synchronous modes a worker may run with (hq-server passes its choice on).
SYNCHRONOUS_MODES = ("off", "normal", "full", "extra")

BIND = Option(
    "bind",
    [addresses.DEFAULT_ADDRESS],
    "client endpoint(s) to bind, tcp:// or ipc:// (tcp://127.0.0.1:* picks a free port)",
    addresses.bind_address,
    multiple=True,
)
BACKEND_BIND = Option(
    "backend", addresses.DEFAULT_BACKEND, "endpoint to bind for workers", addresses.bind_address
)
BACKEND_CONNECT = Option(
    "backend",
    addresses.DEFAULT_BACKEND,
    "broker endpoint for workers to connect to",
    addresses.connect_address,
)
BACKEND_PRIVATE = Option(
    "backend",
    "",
    "broker<->worker endpoint (default: ipc in a private directory)",
    addresses.optional_bind_address,
)
HEARTBEAT_INTERVAL = Option(
    "heartbeat-interval",
    0.5,
    "seconds between broker<->worker heartbeats",
    POSITIVE_FLOAT,
    attr="heartbeat_interval_s",
)
HEARTBEAT_LIVENESS = Option(
    "heartbeat-liveness",
    3,
    "missed heartbeats before the other side counts as gone (a worker is dropped, a worker reconnects)",
    POSITIVE_INT,
)
DB = Option(
    "db",
    "hq.db",
    "the database: an SQLite file, or postgresql://USER@HOST[:PORT]/DBNAME",
    databases.check,
)
SYNCHRONOUS = Option(
    "synchronous",
    "normal",
    "SQLite synchronous mode: normal survives process crashes, full also power loss",
    choices=SYNCHRONOUS_MODES,
)
METRICS = Option(
    "metrics",
    "",
    "serve Prometheus metrics over HTTP on this tcp://HOST:PORT, at /metrics (empty: off)",
    addresses.metrics_address,
)
ENDPOINT_FILE = Option(
    "endpoint-file", "", "once serving, write the client endpoints here, one per line", writable_file
)
LOG_LEVEL = Option("log-level", "INFO", "logging level", choices=LEVELS)

#: What the broker's scheduler runs with (hq.broker.scheduler.Scheduler reads these).
CACHE_ENTRIES = Option(
    "cache-entries",
    10000,
    "mappings the broker keeps to answer small lookups without a worker (0 = no cache)",
    NON_NEGATIVE_INT,
)


def anon_perms(text: str) -> str:
    """Anonymous permissions: ``@none``, ``@read``, ``@report``, ``@db-admin`` (comma- or
    space-separated), as bitbake-hashserv's ``--anon-perms``."""
    return ",".join(sorted(perms.parse_anon(text))) or perms.NONE


#: Who may do what (hq.broker.access).
ANON_PERMS = Option(
    "anon-perms",
    ",".join(perms.DEFAULT_ANON_PERMS),
    "permissions of clients that do not log in (@none, @read, @report, @db-admin)",
    anon_perms,
)
READ_ONLY = Option(
    "read-only",
    False,
    "refuse every write (a mirror): reports are answered as lookups and store nothing; workers "
    "take no lock on the SQLite file, which another hq may be writing",
    BOOL,
)
ADMIN_USER = Option("admin-user", "", "create this user with @all at start (or reset it to @all)")
ADMIN_PASSWORD = Option(
    "admin-password", "", "the admin user's password (token); give it as HQ_ADMIN_PASSWORD, not a flag"
)

#: CURVE (hq.curve): the broker's key pair, and who may connect.
CURVE_SECRET_KEY = Option(
    "curve-secret-key",
    "",
    "CURVE: this broker's .key_secret file (hq-admin keygen); encrypts the frontend and a "
    "tcp:// backend (empty: no encryption)",
)
CURVE_CLIENTS = Option(
    "curve-clients",
    (),
    "CURVE: directories of the .key files of the clients allowed (none: any client)",
    multiple=True,
)
CURVE_WORKERS = Option(
    "curve-workers",
    "",
    "CURVE: directory of the .key files of the workers allowed on a tcp:// backend (required there)",
)
CURVE_SERVER_KEY = Option(
    "curve-server-key", "", "CURVE: the broker's public key, a .key file or 40 Z85 characters"
)
CURVE_WORKER_KEY = Option(
    "curve-worker-key",
    "",
    "CURVE: this worker's .key_secret file, whose .key is in the broker's --curve-workers",
)
CURVE_BROKER = (CURVE_SECRET_KEY, CURVE_CLIENTS, CURVE_WORKERS)


def upstream_address(text: str) -> str:
    """Another hq (``tcp://``, ``ipc://``; several brokers of one, separated by commas) or an
    OEHASHEQUIV server (``unix://PATH``,
    ``HOST:PORT``, ``ws://``, ``wss://``), as bitbake-hashserv's ``--upstream``."""
    if not text or text.startswith(("tcp://", "ipc://")):
        return addresses.connect_addresses(text) if text else text
    oehashequiv.split_address(text)  # raises ValueError naming the forms
    return text


#: --upstream (hq.broker.upstream, hq.upstream.agent): a server asked on a local miss.
UPSTREAM = Option(
    "upstream",
    "",
    "ask this server on a local miss and store what it knows: another hq (tcp://, ipc://) or an "
    "OEHASHEQUIV server (unix://PATH, HOST:PORT, ws://, wss://); empty: none",
    upstream_address,
)
UPSTREAM_TIMEOUT = Option(
    "upstream-timeout",
    2.0,
    "seconds a lookup or report waits for the upstream before it is answered from local data",
    POSITIVE_FLOAT,
    attr="upstream_timeout_s",
)
UPSTREAM_NEGATIVE_TTL = Option(
    "upstream-negative-ttl",
    60.0,
    "seconds a miss of the upstream is remembered and not asked again (0: always ask)",
    NON_NEGATIVE_FLOAT,
    attr="upstream_negative_ttl_s",
)
UPSTREAM_USERNAME = Option("upstream-username", "", "log in to the upstream as this user")
UPSTREAM_PASSWORD = Option(
    "upstream-password", "", "the upstream user's token; give it as HQ_UPSTREAM_PASSWORD, not a flag"
)
UPSTREAM_OPTIONS = (UPSTREAM, UPSTREAM_TIMEOUT, UPSTREAM_NEGATIVE_TTL, UPSTREAM_USERNAME, UPSTREAM_PASSWORD)

SCHEDULER = (
    HEARTBEAT_INTERVAL,
    HEARTBEAT_LIVENESS,
    Option(
        "request-timeout",
        10.0,
        "seconds before an unanswered request gets UNAVAILABLE",
        POSITIVE_FLOAT,
        attr="request_timeout_s",
    ),
    Option(
        "admin-request-timeout",
        600.0,
        "request-timeout for commands that scan or rewrite whole tables "
        "(gc-sweep, remove, import, db-usage, ...)",
        POSITIVE_FLOAT,
        attr="admin_request_timeout_s",
    ),
    Option("max-client-jobs", 4096, "queued chunks allowed per client before BUSY", POSITIVE_INT),
    Option("max-queued-jobs", 65536, "queued chunks allowed in total before BUSY", POSITIVE_INT),
    Option("worker-credit", 1, "REQUEST messages a worker holds at a time", POSITIVE_INT),
    Option(
        "merge-items",
        1000,
        "items of small same-command jobs merged into one worker REQUEST (1 = no merging)",
        POSITIVE_INT,
    ),
    Option(
        "max-attempts",
        3,
        "workers a request may be lost with (crash, stall) before it is answered INTERNAL",
        POSITIVE_INT,
    ),
    CACHE_ENTRIES,
    ANON_PERMS,
    READ_ONLY,
    UPSTREAM,
    UPSTREAM_TIMEOUT,
)

BROKER = (
    BIND,
    BACKEND_BIND,
    *SCHEDULER,
    ADMIN_USER,
    ADMIN_PASSWORD,
    UPSTREAM_NEGATIVE_TTL,
    UPSTREAM_USERNAME,
    UPSTREAM_PASSWORD,
    *CURVE_BROKER,
    ENDPOINT_FILE,
    METRICS,
    LOG_LEVEL,
)

WORKER = (
    BACKEND_CONNECT,
    CURVE_SERVER_KEY,
    CURVE_WORKER_KEY,
    DB,
    SYNCHRONOUS,
    Option(
        "busy-timeout",
        200,
        "SQLite busy_timeout, milliseconds: one wait for another worker's lock",
        NON_NEGATIVE_INT,
        attr="busy_timeout_ms",
    ),
    Option(
        "lock-wait",
        5.0,
        "seconds a write waits in all for the lock (heartbeating) before STORAGE busy",
        NON_NEGATIVE_FLOAT,
        attr="lock_wait_s",
    ),
    Option("cache-size", 16384, "SQLite page cache per worker, KiB", NON_NEGATIVE_INT, attr="cache_size_kib"),
    # mmap is off by default: measured slower here for batched lookups (4.6 against 3.3 us
    # per lookup in a 900-hash chunk), and mapped pages count in every worker's RSS.
    Option("mmap-size", 0, "SQLite mmap_size, bytes (0 = off)", NON_NEGATIVE_INT),
    HEARTBEAT_INTERVAL,
    HEARTBEAT_LIVENESS,
    Option(
        "stats-rows-interval",
        2.0,
        "least seconds between row counts for stats, taken when the database changed "
        "and the worker is idle (each is a table scan)",
        NON_NEGATIVE_FLOAT,
        attr="stats_rows_interval_s",
    ),
    Option("name", "", "worker name shown in stats and logs (default hq-worker-PID)"),
    READ_ONLY,
    LOG_LEVEL,
)


def oehashequiv_address(text: str) -> str:
    """Where a gateway listens: ``unix://PATH``, ``HOST:PORT`` or ``ws://HOST:PORT``
    (BitBake's forms)."""
    if text.startswith("unix://"):
        if not text[len("unix://") :]:
            raise ValueError("unix:// needs a path")
        return text
    rest = text[len("ws://") :] if text.startswith("ws://") else text
    host, sep, port = rest.rpartition(":")
    if not sep or not host or "://" in rest or "/" in port:
        raise ValueError("use unix://PATH, HOST:PORT or ws://HOST:PORT, as in BitBake's BB_HASHSERVE")
    if not port.isdigit() or int(port) > 65535:
        raise ValueError(f"port {port!r} is not 0-65535")
    return text


SERVER = (
    BIND,
    DB,
    Option("workers", 2, "number of worker processes", POSITIVE_INT),
    BACKEND_PRIVATE,
    SYNCHRONOUS,
    HEARTBEAT_INTERVAL,
    CACHE_ENTRIES,
    ANON_PERMS,
    READ_ONLY,
    ADMIN_USER,
    ADMIN_PASSWORD,
    *UPSTREAM_OPTIONS,
    CURVE_SECRET_KEY,
    CURVE_CLIENTS,
    Option(
        "oehashequiv",
        (),
        "also run hq-gateway on these addresses (unix://PATH, HOST:PORT, ws://HOST:PORT): BitBake's own "
        "client and bitbake-hashclient can use hq there",
        oehashequiv_address,
        multiple=True,
    ),
    METRICS,
    ENDPOINT_FILE,
    LOG_LEVEL,
)

OEHASHEQUIV_LISTEN = Option(
    "listen",
    ("127.0.0.1:8687",),
    "OEHASHEQUIV address(es) to listen on: unix://PATH, HOST:PORT or ws://HOST:PORT (port 0: any)",
    oehashequiv_address,
    multiple=True,
)
GATEWAY = (
    OEHASHEQUIV_LISTEN,
    Option(
        "broker",
        addresses.DEFAULT_ADDRESS,
        "the hq broker to send requests to (several of one database: separated by commas)",
        addresses.connect_addresses,
    ),
    Option(
        "timeout",
        10.0,
        "seconds a request may wait for the broker before the connection is closed",
        POSITIVE_FLOAT,
        attr="timeout_s",
    ),
    Option(
        "idle-timeout",
        600.0,
        "seconds a connection may stay silent before it is closed",
        POSITIVE_FLOAT,
        attr="idle_timeout_s",
    ),
    Option(
        "write-timeout",
        30.0,
        "seconds a client may leave its answers unread before it is closed",
        POSITIVE_FLOAT,
        attr="write_timeout_s",
    ),
    CURVE_SERVER_KEY,
    Option("curve-client-key", "", "CURVE: this gateway's .key_secret file, if the broker lists clients"),
    ENDPOINT_FILE,
    LOG_LEVEL,
)

#: Program name -> its options. Each program may have a section of its own in a
#: configuration file; the shared ``[hq]`` section may hold any program's keys.
PROGRAMS = {"hq-broker": BROKER, "hq-worker": WORKER, "hq-server": SERVER, "hq-gateway": GATEWAY}


def namespace(options, **values) -> argparse.Namespace:
    """The defaults of ``options`` with ``values`` (by attribute) in their place: settings
    for code driven without a command line (tests, benchmarks)."""
    out = argparse.Namespace(**{opt.dest: opt.default for opt in options})
    unknown = set(values) - set(vars(out))
    if unknown:
        raise TypeError(f"no such option: {', '.join(sorted(unknown))}")
    for name, value in values.items():
        setattr(out, name, value)
    return out


def conflict(opts) -> str | None:
    """What is wrong with these settings together (hq-broker's and hq-server's), in one
    line, or None. A setting that would be silently ignored, or silently open a broker, is
    refused rather than run."""
    if getattr(opts, "upstream", "") and opts.read_only:  # as bitbake-hashserv refuses it
        return "--upstream and --read-only together: a read-only server cannot store what it learns"
    if opts.admin_user and not opts.admin_password:
        return "--admin-user needs a password: set HQ_ADMIN_PASSWORD (or --admin-password)"
    if opts.admin_password and not opts.admin_user:
        return "an admin password (HQ_ADMIN_PASSWORD or --admin-password) needs --admin-user: whose is it?"
    if not opts.curve_secret_key:
        given = [o for o in ("curve_clients", "curve_workers") if getattr(opts, o, None)]
        if given:
            flag = "--" + given[0].replace("_", "-")
            return (
                f"{flag} needs --curve-secret-key: without CURVE the broker lets every client in, unencrypted"
            )
    return None
