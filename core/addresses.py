"""The addresses hq listens on and connects to, and the one check every program makes of them.

hq speaks ZeroMQ, so an address is a ZeroMQ endpoint: ``tcp://HOST:PORT``, ``ipc://PATH`` or
``inproc://NAME``. A user coming from BitBake writes ``HOST:PORT`` or ``unix://PATH`` (its
hashserv's forms), and libzmq answers those with a bare "Invalid argument"; :func:`check`
turns every such mistake into one line that says what to write instead.

A leaf module: it imports nothing of hq, so the client BitBake embeds can use it.
"""

from __future__ import annotations

import re

#: Where hq-server and hq-broker listen for clients by default, and where hq-admin looks.
DEFAULT_ADDRESS = "tcp://127.0.0.1:8686"

#: Where hq-broker listens for workers, and where hq-worker connects, by default (relative to
#: the working directory; hq-server uses a private directory instead).
DEFAULT_BACKEND = "ipc://hq-backend.ipc"

SCHEMES = ("tcp://", "ipc://", "inproc://")

_HOST_PORT = re.compile(r"(?P<host>\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]]+):(?P<port>[^\s:/]+)\Z")


def host_port(rest: str):
    """``(host, port)`` of the part after ``tcp://`` (brackets kept off an IPv6 host), or
    None when it is not HOST:PORT."""
    m = _HOST_PORT.match(rest)
    return (m.group("host").strip("[]"), m.group("port")) if m else None


def check(address: str, bind: bool = False) -> str:
    """``address`` if hq can use it; else ``ValueError`` with a one-line reason (which does not
    repeat the address) and, where the intent is clear, the address to write instead.
    ``bind``: a port of ``*`` (any free port) is allowed."""
    text = str(address)
    if text != text.strip() or not text:
        raise ValueError("empty or padded with spaces: use tcp://HOST:PORT or ipc://PATH")
    scheme, sep, rest = text.partition("://")
    if not sep:
        raise ValueError(f"no scheme: {_suggest(text)}")
    if scheme + "://" not in SCHEMES:
        raise ValueError(f"hq speaks ZeroMQ: tcp://, ipc:// or inproc://; {_suggest(rest, scheme)}")
    if scheme == "tcp":
        m = _HOST_PORT.match(rest)
        if not m:
            raise ValueError("not tcp://HOST:PORT")
        port = m.group("port")
        if port == "*":
            if not bind:
                raise ValueError("a client needs the real port, not *")
        elif not (port.isdigit() and 1 <= int(port) <= 65535):
            raise ValueError(f"the port must be 1-65535{' or *' if bind else ''}")
    elif not rest:
        raise ValueError(f"no {'path' if scheme == 'ipc' else 'name'} after {scheme}://")
    return text


def _suggest(rest: str, scheme: str = "") -> str:
    if scheme in ("unix", "ws", "wss"):
        if scheme == "unix":
            return f"unix:// is BitBake hashserv's scheme, did you mean ipc://{rest}?"
        return f"{scheme}:// is BitBake hashserv's scheme, use tcp://HOST:PORT"
    if _HOST_PORT.match(rest):
        return f"did you mean tcp://{rest}?"
    if rest.startswith(("/", "./", "../")):
        return f"did you mean ipc://{rest}?"
    return "use tcp://HOST:PORT or ipc://PATH"


def split(text: str) -> list:
    """The brokers a client may use, from one string: addresses separated by commas (one
    string fits BitBake's BB_HASHSERVE and every option). ValueError as :func:`check`'s,
    naming the address at fault when there are several."""
    parts = [part.strip() for part in str(text).split(",")]
    if len(parts) == 1:
        return [check(text)]
    for part in parts:
        try:
            check(part)
        except ValueError as exc:
            raise ValueError(f"{part!r}: {exc}" if part else "an empty address between commas") from None
    if len(set(parts)) != len(parts):
        raise ValueError("an address given twice")
    return parts


def connect_addresses(text: str) -> str:
    """An option type: one address to connect to, or several separated by commas."""
    split(text)
    return text


def bind_address(text: str) -> str:
    """An option type: an address to bind (port ``*`` allowed)."""
    return check(text, bind=True)


def connect_address(text: str) -> str:
    """An option type: an address to connect to."""
    return check(text, bind=False)


def metrics_address(text: str) -> str:
    """An option type: empty (off) or the tcp://HOST:PORT the HTTP metrics endpoint binds."""
    if text == "":
        return text
    check(text, bind=True)
    if not text.startswith("tcp://"):
        raise ValueError("the metrics endpoint is HTTP: it needs tcp://HOST:PORT")
    return text


def optional_bind_address(text: str) -> str:
    """An option type: empty (the program picks one) or an address to bind."""
    return text if text == "" else check(text, bind=True)


def redacted(address: str) -> str:
    """``address`` fit for a log line or statistics: a ``scheme://user:secret@host`` URL's
    user part replaced by ``***`` (a ws:// upstream may carry credentials)."""
    scheme, sep, rest = address.partition("://")
    authority, slash, path = rest.partition("/")
    if sep and "@" in authority:  # the last @ ends the user part (a password may hold one)
        return f"{scheme}://***@{authority.rpartition('@')[2]}{slash}{path}"
    return address
