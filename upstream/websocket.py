"""``ws://`` and ``wss://`` upstreams: OEHASHEQUIV over WebSocket, one text message per line
both ways, never chunked (as BitBake's client and hq-gateway speak it). Needs the
``websockets`` package (the ``[gateway]`` extra), imported only for such an address."""

from __future__ import annotations

import asyncio
import time

import websockets.asyncio.client
import websockets.exceptions

from hq import addresses

from .oehashequiv import UpstreamError, UpstreamTimeout

#: websockets' default message size, as the reference's server has it.
MAX_MESSAGE = 2**20


async def open_websocket(address: str):
    shown = addresses.redacted(address)  # a ws://user:password@ URL: the password in no error
    try:
        ws = await websockets.asyncio.client.connect(address, max_size=MAX_MESSAGE, ping_interval=None)
    except (OSError, websockets.exceptions.WebSocketException) as exc:
        raise UpstreamError(f"cannot reach {shown}: {str(exc).replace(address, shown)}") from None
    return _Messages(ws, shown)


class _Messages:
    """What :class:`~hq.upstream.oehashequiv.Upstream` needs of a connection, over messages."""

    chunked = False

    def __init__(self, ws, address: str):
        self.ws, self.address = ws, address
        self.pending: list = []  # lines written, sent before the next read

    def write(self, data: bytes) -> None:
        text = data.decode("utf-8")
        self.pending += (text[:-1] if text.endswith("\n") else text).split("\n")

    async def _flush(self) -> None:
        lines, self.pending = self.pending, []
        for line in lines:
            await self.ws.send(line)

    async def line(self, deadline: float, strip: bool = True) -> str:
        try:
            await asyncio.wait_for(self._flush(), max(0.0, deadline - time.monotonic()))
            message = await asyncio.wait_for(self.ws.recv(), max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise UpstreamTimeout(f"no answer from {self.address} in time") from None
        except websockets.exceptions.WebSocketException as exc:
            raise UpstreamError(f"{self.address} closed the connection: {exc}") from None
        if not isinstance(message, str):
            raise UpstreamError(f"{self.address} sent a binary message")
        return message.rstrip() if strip else message

    async def exchange(self, lines: list, deadline: float) -> list:
        """Send every line while reading the answers (websockets stops reading when its
        queue of received messages is full: sending all first could wait forever)."""
        await self._flush()

        async def send() -> None:
            for line in lines:
                await self.ws.send(line)

        sender = asyncio.get_running_loop().create_task(send())
        try:
            answers = [await self.line(deadline) for _ in lines]
            await asyncio.wait_for(sender, max(0.0, deadline - time.monotonic()))
            return answers
        except websockets.exceptions.WebSocketException as exc:
            raise UpstreamError(f"{self.address} closed the connection: {exc}") from None
        except asyncio.TimeoutError:
            raise UpstreamTimeout(f"no answer from {self.address} in time") from None
        finally:
            sender.cancel()

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self.ws.close(), 1.0)
        except (asyncio.TimeoutError, OSError, websockets.exceptions.WebSocketException):
            pass
