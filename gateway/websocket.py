"""``ws://HOST:PORT`` listeners: OEHASHEQUIV over WebSocket, as bitbake-hashserv serves it.

Over a WebSocket each protocol line is one text message, without its LF, both ways, and no
message is chunked (BitBake's ``WebsocketConnection`` sends a whole JSON text as one message
and reads one back). :class:`Reader` and :class:`Writer` give a
:class:`~hq.gateway.connection.Connection` that as the byte stream it reads and writes, so
every mode, limit and error is the same as on a socket. Needs the ``websockets`` package (the
``[gateway]`` extra), imported only when a ``ws://`` address is given.
"""

from __future__ import annotations

import websockets.asyncio.server
import websockets.exceptions

#: The reference's limit: websockets' default message size (1 MiB); a larger one closes.
MAX_MESSAGE = 2**20


class Reader:
    """``read()`` of a stream: the next message and an LF, or b"" once the peer has closed."""

    def __init__(self, ws):
        self.ws = ws

    async def read(self, n: int = -1) -> bytes:
        try:
            message = await self.ws.recv()
        except websockets.exceptions.ConnectionClosed:
            return b""
        if isinstance(message, str):
            message = message.encode("utf-8", "surrogateescape")
        return message + b"\n"


class Writer:
    """``write()`` takes lines (LF-terminated bytes) and ``drain()`` sends each as a message."""

    def __init__(self, ws):
        self.ws = ws
        self.transport = ws.transport  # abort() on a client that does not read
        self.lines: list = []

    def write(self, data: bytes) -> None:
        self.lines += data[:-1].split(b"\n") if data.endswith(b"\n") else data.split(b"\n")

    async def drain(self) -> None:
        lines, self.lines = self.lines, []
        try:
            for line in lines:
                await self.ws.send(line.decode("utf-8", "surrogateescape"))
        except websockets.exceptions.ConnectionClosed:
            raise ConnectionResetError("the WebSocket peer closed") from None

    def close(self) -> None:
        pass  # the handler's return closes the WebSocket

    def get_extra_info(self, name, default=None):
        return self.ws.transport.get_extra_info(name, default)


async def serve(handler, host: str, port: int, backlog: int):
    """A ``ws://`` listener (SO_REUSEPORT) calling ``handler(reader, writer)`` per connection;
    returns the server (``close()``, ``wait_closed()``, ``sockets``)."""

    async def connected(ws) -> None:
        await handler(Reader(ws), Writer(ws))

    return await websockets.asyncio.server.serve(
        connected, host, port, reuse_port=True, backlog=backlog, ping_interval=None, max_size=MAX_MESSAGE
    )
