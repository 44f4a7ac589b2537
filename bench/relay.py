"""A TCP relay that adds a delay: what ``hq-bench cold-start --delay-ms`` puts between a local
server and its upstream, to stand for a WAN. Every byte is held ``delay / 2`` in each
direction, in order, so a request-answer round trip takes ``delay`` longer.

``python -m hq.bench.relay LISTEN_PORT TARGET_HOST:TARGET_PORT DELAY_MS`` listens on
127.0.0.1 and prints ``ready`` once it does.
"""

from __future__ import annotations

import asyncio
import sys


async def _pump(reader, writer, delay_s: float) -> None:
    """Copy ``reader`` to ``writer``, each piece ``delay_s`` after it arrived."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    async def deliver() -> None:
        while True:
            due, data = await queue.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                writer.close()
                return
            writer.write(data)
            await writer.drain()

    sender = loop.create_task(deliver())
    try:
        while True:
            data = await reader.read(65536)
            queue.put_nowait((loop.time() + delay_s, data))
            if not data:
                break
        await sender
    except (ConnectionError, OSError):
        sender.cancel()
        writer.close()


async def serve(port: int, target: str, delay_ms: float) -> None:
    host, _, target_port = target.rpartition(":")
    half = delay_ms / 2000.0

    async def connected(reader, writer) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(host, int(target_port))
        except OSError:
            writer.close()
            return
        await asyncio.gather(_pump(reader, up_writer, half), _pump(up_reader, writer, half))

    server = await asyncio.start_server(connected, "127.0.0.1", port, backlog=1024)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3:
        print("usage: python -m hq.bench.relay LISTEN_PORT TARGET_HOST:PORT DELAY_MS", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve(int(args[0]), args[1], float(args[2])))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
