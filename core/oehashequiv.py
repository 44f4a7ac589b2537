"""OEHASHEQUIV 1.1 on the wire, without sockets: the handshake, lines, JSON messages and
their chunking (bitbake-hashserv-protocol.md §2-§3, §5).

A :class:`LineBuffer` takes bytes as they arrive and hands back complete lines, so a
connection can take every line a client sent together at once (the gateway's batching).
"""

from __future__ import annotations

import json

from hq import protocol as p

PROTOCOL_NAME = "OEHASHEQUIV"
#: Versions accepted: above 1.0, up to 1.1 (as integer tuples).
MIN_VERSION_EXCLUSIVE = (1, 0)
MAX_VERSION = (1, 1)
#: BitBake's DEFAULT_MAX_CHUNK: a JSON text of MAX_CHUNK - 1 characters or more is chunked.
MAX_CHUNK = 32 * 1024
#: BitBake reads with asyncio's default 64 KiB line limit: a longer line is an error there.
MAX_LINE = 64 * 1024
#: The most a chunked message may hold, all its lines together: room for the largest report
#: hq takes (an extra of protocol.MAX_EXTRA_BYTES) however it is escaped (ASCII JSON: at most
#: six characters a byte, \u0001); a client that sends more is closed on, so one connection
#: cannot fill the gateway's memory.
MAX_CHUNKED = 6 * p.MAX_EXTRA_BYTES + 1024 * 1024
CHUNK_STREAM = "chunk-stream"


class Drop(Exception):
    """The reference closes the connection without a reply here (malformed input)."""


class LineBuffer:
    """Bytes in, complete lines out, without their LF. BitBake's reader also strips trailing
    whitespace; the caller does, except inside a chunk stream, where that would cut what the
    client meant (§3.2)."""

    def __init__(self, max_line: int = MAX_LINE):
        self.max_line = max_line
        self._data = bytearray()

    def feed(self, data: bytes) -> list:
        self._data += data
        end = self._data.rfind(b"\n")
        if end < 0:
            if len(self._data) > self.max_line:
                raise Drop(f"a line longer than {self.max_line} bytes")
            return []
        complete = bytes(self._data[:end])
        del self._data[: end + 1]
        lines = complete.split(b"\n")
        if len(self._data) > self.max_line or any(len(line) > self.max_line for line in lines):
            raise Drop(f"a line longer than {self.max_line} bytes")
        return [_text(line) for line in lines]

    def pending(self) -> bool:
        return bool(self._data)


def _text(line: bytes) -> str:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError:
        raise Drop("a line that is not UTF-8") from None


def check_protocol_line(line: str) -> None:
    """``OEHASHEQUIV 1.1``; anything else is dropped (no reply)."""
    words = line.split()
    if len(words) != 2 or words[0] != PROTOCOL_NAME:
        raise Drop(f"not an {PROTOCOL_NAME} client")
    try:
        version = tuple(int(part) for part in words[1].split("."))
    except ValueError:
        raise Drop("a version that is not dotted integers") from None
    if not MIN_VERSION_EXCLUSIVE < version <= MAX_VERSION:
        raise Drop(f"version {words[1]} not supported")


def header(line: str) -> tuple:
    """A ``Tag: value`` line -> (lower-cased tag, stripped value); no ``:`` is dropped. The
    tag keeps any whitespace around it, as BitBake's server keeps it (`` needs-headers`` is
    another tag)."""
    tag, sep, value = line.partition(":")
    if not sep:
        raise Drop("a header line without ':'")
    return tag.lower(), value.strip()


def encode(value, chunked: bool = True) -> bytes:
    """One normal-mode message as BitBake writes it: json.dumps defaults (ASCII), one line,
    or a chunk stream when the text is MAX_CHUNK - 1 characters or more (not over a
    WebSocket, ``chunked=False``, where a message is never chunked)."""
    text = json.dumps(value)
    if len(text) < MAX_CHUNK - 1 or not chunked:
        return (text + "\n").encode("ascii")
    step = MAX_CHUNK - 1
    parts = [json.dumps({CHUNK_STREAM: None})]
    parts += [text[i : i + step] for i in range(0, len(text), step)]
    return ("\n".join(parts) + "\n\n").encode("ascii")


def decode(line: str):
    """A normal-mode line -> its JSON value; not JSON is dropped."""
    try:
        return json.loads(line)
    except (ValueError, RecursionError):
        raise Drop("a message that is not JSON") from None


def is_chunk_start(value) -> bool:
    """As BitBake tests it, ``"chunk-stream" in value``: a key, an item of a list, or part
    of a string."""
    return isinstance(value, (dict, list, str)) and CHUNK_STREAM in value


def split_address(address: str) -> tuple:
    """``unix://PATH`` -> ("unix", PATH); ``HOST:PORT`` or ``[V6]:PORT`` -> ("tcp", (host,
    port)); ``ws://``/``wss://`` -> ("ws", address). Anything else is a ValueError."""
    if address.startswith("unix://"):
        path = address[len("unix://") :]
        if not path:
            raise ValueError(f"{address!r}: no socket path")
        return "unix", path
    ws = address.startswith(("ws://", "wss://"))
    rest = address.split("://", 1)[1] if ws else address
    host, sep, port = rest.partition("/")[0].rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or "://" in rest or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{address!r} is not unix://PATH, HOST:PORT, ws:// or wss://")
    return ("ws", address) if ws else ("tcp", (host, int(port)))
