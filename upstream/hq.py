"""Another hq as the upstream (``tcp://``, ``ipc://``): hq's own client, batched, in a thread
of its own per call so the agent's loop never blocks. The same calls as
:class:`~hq.upstream.oehashequiv.Upstream`."""

from __future__ import annotations

import asyncio

from hq.client import create_client

from .oehashequiv import UpstreamError


class HqUpstream:
    def __init__(self, address: str, timeout_s: float, username: str | None = None, token: str | None = None):
        self.address, self.timeout_s = address, timeout_s
        self.login = (username, token) if username else None
        self._client = None
        self._lock = asyncio.Lock()  # hq's client is one socket: one call at a time

    def _connected(self):
        if self._client is None:
            client = create_client(self.address, timeout=self.timeout_s)
            if self.login is not None:
                client.auth(*self.login)
            self._client = client
        return self._client

    async def _call(self, name: str, *args):
        async with self._lock:
            try:
                return await asyncio.to_thread(lambda: getattr(self._connected(), name)(*args))
            except (ConnectionError, OSError, ValueError) as exc:
                await self.close()
                raise UpstreamError(f"{self.address}: {exc}") from None
            except Exception as exc:  # hq's refusals (HqError and kin): an upstream error
                await self.close()
                raise UpstreamError(f"{self.address} refused: {exc}") from None

    async def get_unihash_groups(self, groups: list) -> list:
        return await self._call("get_unihash_groups", groups)

    async def exists(self, unihashes: list) -> list:
        return await self._call("unihash_exists_batch", list(unihashes))

    async def get(self, method: str, taskhash: str, with_row: bool = False):
        return await self._call("get_taskhash", method, taskhash, with_row)

    async def get_outhash(self, method: str, outhash: str, taskhash: str, with_unihash: bool = True):
        return await self._call("get_outhash", method, outhash, taskhash, with_unihash)

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()
