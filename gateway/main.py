"""hq-gateway: OEHASHEQUIV 1.1 (BitBake's own client, ``bitbake-hashclient``, a BitBake
``auto`` server's upstream) in front of an hq broker.

One thread, one asyncio loop: listeners on ``unix://PATH`` and ``HOST:PORT`` (TCP with
SO_REUSEPORT, so several gateways may share a port), each connection a
:class:`~hq.gateway.connection.Connection`, the broker reached over ZeroMQ
(:mod:`hq.gateway.link`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import socket
import sys

import zmq

from hq import config, curve, extras, logs, options, proctitle, unixsockets
from hq.notify import notify

from .connection import Connection
from .link import Link

log = logging.getLogger(__name__)

#: Connections the kernel holds before the gateway accepts them (capped by
#: net.core.somaxconn). asyncio's default, 100, drops the SYNs of a farm's task processes
#: arriving together, and each dropped one waits a second to try again.
BACKLOG = 4096
#: Bytes asyncio reads from a client at once (below glibc's 128 KiB mmap threshold).
RECV_BYTES = 64 * 1024


class Gateway:
    def __init__(self, opts):
        self.opts = opts
        self.ctx = zmq.Context()
        self.keys = None
        if opts.curve_server_key:
            self.keys = (curve.load_public(opts.curve_server_key), opts.curve_client_key or None)
        self.idle_timeout_s = opts.idle_timeout_s
        self.write_timeout_s = opts.write_timeout_s
        self.anonymous = self.new_link()
        self.servers: list = []
        self.endpoints: list = []
        self.connections: set = set()
        self.unix_paths: list = []

    def new_link(self) -> Link:
        return Link(self.ctx, self.opts.broker, self.opts.timeout_s, self.keys)

    async def start(self) -> None:
        for address in self.opts.listen:
            try:
                await self._listen(address)
            except OSError as exc:
                reason = os.strerror(exc.errno) if exc.errno else str(exc)
                raise ListenError(f"cannot listen on {address}: {reason}") from None

    async def _listen(self, address: str) -> None:
        if address.startswith("ws://"):
            from . import websocket  # the [gateway] extra: only for ws:// addresses

            host, _, port = address[len("ws://") :].rpartition(":")
            serve = functools.partial(self._serve, chunked=False, max_line=websocket.MAX_MESSAGE)
            server = await websocket.serve(serve, host.strip("[]"), int(port), BACKLOG)
            bound = next(iter(server.sockets)).getsockname()
            self.endpoints.append(f"ws://{host}:{bound[1]}")
        elif address.startswith("unix://"):
            path = address[len("unix://") :]
            if unixsockets.is_socket(path) and not unixsockets.is_listening(path):  # a stale one
                os.unlink(path)
            server = await asyncio.start_unix_server(self._serve, sock=_unix_listener(path), backlog=BACKLOG)
            self.unix_paths.append(path)  # to remove on the way out: this gateway's own
            # Builders of any user connect, as to a TCP port; the directory restricts.
            os.chmod(path, 0o666)
            self.endpoints.append(address)
        else:
            host, _, port = address.rpartition(":")
            shared = bool(int(port)) and await _someone_listens(host.strip("[]"), int(port))
            server = await asyncio.start_server(
                self._serve, host=host.strip("[]"), port=int(port), reuse_port=True, backlog=BACKLOG
            )
            if shared:  # (said once the port is ours too: a listener not sharing it refused us)
                log.warning(
                    "another process already listens on %s: this gateway shares the port with it "
                    "(SO_REUSEPORT), and new connections are spread between them, so both must "
                    "serve the same hq",
                    address,
                )
            bound = server.sockets[0].getsockname()
            self.endpoints.append(f"{host}:{bound[1]}")
        self.servers.append(server)

    async def _serve(self, reader, writer, **framing) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        transport = getattr(writer, "transport", None)
        if transport is not None and hasattr(transport, "max_size"):
            # asyncio reads into a new 256 KiB bytes each time: past malloc's mmap threshold,
            # so every read of a one-line request was an mmap, mremap and munmap.
            transport.max_size = RECV_BYTES
        connection = Connection(self, reader, writer, **framing)
        task = asyncio.current_task()
        self.connections.add(task)
        try:
            await connection.run()
        except asyncio.CancelledError:
            pass  # the gateway stops: the connection is closed; nothing to report
        finally:
            self.connections.discard(task)

    async def stop(self) -> None:
        for server in self.servers:
            server.close()
        tasks = list(self.connections)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        for server in self.servers:
            await server.wait_closed()
        for path in self.unix_paths:
            if os.path.exists(path):
                os.unlink(path)
        self.anonymous.close()
        self.ctx.destroy(linger=0)


class ListenError(Exception):
    """An address the gateway cannot listen on, and why (one line)."""


async def _someone_listens(host: str, port: int) -> bool:
    """Does a listener already answer on this TCP address (another gateway, sharing it)?"""
    target = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(target, port), 1.0)
    except (OSError, asyncio.TimeoutError):
        return False
    writer.close()
    return True


def _unix_listener(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        unixsockets.in_directory_of(path, sock.bind)
    except OSError:
        sock.close()
        raise
    return sock


async def serve(opts) -> int:
    gateway = Gateway(opts)
    # Before anything is announced (READY=1, the endpoint file): a SIGTERM that follows at
    # once must find the handler, not the default action.
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    try:
        await gateway.start()
    except ModuleNotFoundError as exc:
        log.error(
            "ws:// needs the [gateway] extra (%s is not installed): pip install '%s[gateway]'",
            exc.name,
            extras.DISTRIBUTION,
        )
        await gateway.stop()
        return 2
    except ListenError as exc:
        log.error("%s", exc)
        await gateway.stop()
        return 2
    if opts.endpoint_file:
        with open(opts.endpoint_file + ".tmp", "w", encoding="utf-8") as fh:
            fh.write("".join(e + "\n" for e in gateway.endpoints))
        os.replace(opts.endpoint_file + ".tmp", opts.endpoint_file)
    serving = f"serving OEHASHEQUIV on {', '.join(gateway.endpoints)} for hq at {opts.broker}"
    log.info("gateway %s", serving)
    notify("READY=1", f"STATUS={serving}")  # systemd (Type=notify): every listener is bound
    await stopping.wait()
    notify("STOPPING=1")
    await gateway.stop()
    if opts.endpoint_file and os.path.exists(opts.endpoint_file):
        os.unlink(opts.endpoint_file)
    log.info("gateway stopped")
    return 0


def main(argv=None) -> int:
    opts = config.parse(
        "hq-gateway", "OEHASHEQUIV (BitBake's protocol) in front of an hq broker.", options.GATEWAY, argv
    )
    logs.setup("hq-gateway", opts.log_level)
    proctitle.set_title("hq-gateway", " ".join(opts.listen))
    try:
        if opts.curve_server_key:
            curve.load_public(opts.curve_server_key)
            if opts.curve_client_key:
                curve.load_secret(opts.curve_client_key)
    except curve.BadKey as exc:
        log.error("%s", exc)
        return 2
    return asyncio.run(serve(opts))


if __name__ == "__main__":
    sys.exit(main())
