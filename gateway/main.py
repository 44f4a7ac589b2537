"""hq-gateway: OEHASHEQUIV 1.1 (BitBake's own client, ``bitbake-hashclient``, a BitBake
``auto`` server's upstream) in front of an hq broker.

One thread, one asyncio loop: listeners on ``unix://PATH`` and ``HOST:PORT`` (TCP with
SO_REUSEPORT, so several gateways may share a port), each connection a
:class:`~hq.gateway.connection.Connection`, the broker reached over ZeroMQ
(:mod:`hq.gateway.link`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys

import zmq

from hq import config, curve, logs, options, proctitle

from .connection import Connection
from .link import Link

log = logging.getLogger(__name__)


class Gateway:
    def __init__(self, opts):
        self.opts = opts
        self.ctx = zmq.Context()
        self.keys = None
        if opts.curve_server_key:
            self.keys = (curve.load_public(opts.curve_server_key), opts.curve_client_key or None)
        self.idle_timeout_s = opts.idle_timeout_s
        self.anonymous = self.new_link()
        self.servers: list = []
        self.endpoints: list = []
        self.connections: set = set()

    def new_link(self) -> Link:
        return Link(self.ctx, self.opts.broker, self.opts.timeout_s, self.keys)

    async def start(self) -> None:
        for address in self.opts.listen:
            if address.startswith("unix://"):
                path = address[len("unix://") :]
                if os.path.exists(path) and _is_stale_socket(path):
                    os.unlink(path)
                server = await asyncio.start_unix_server(self._serve, path=path)
                self.endpoints.append(address)
            else:
                host, _, port = address.rpartition(":")
                server = await asyncio.start_server(
                    self._serve, host=host.strip("[]"), port=int(port), reuse_port=True
                )
                bound = server.sockets[0].getsockname()
                self.endpoints.append(f"{host}:{bound[1]}")
            self.servers.append(server)

    async def _serve(self, reader, writer) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        connection = Connection(self, reader, writer)
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
        for address in self.opts.listen:
            if address.startswith("unix://") and os.path.exists(address[len("unix://") :]):
                os.unlink(address[len("unix://") :])
        self.anonymous.close()
        self.ctx.destroy(linger=0)


def _is_stale_socket(path: str) -> bool:
    """A socket file nobody listens on (a gateway that was killed): safe to replace."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    finally:
        probe.close()
    return False


async def serve(opts) -> int:
    gateway = Gateway(opts)
    try:
        await gateway.start()
    except OSError as exc:
        log.error("cannot listen on %s: %s", ", ".join(opts.listen), exc.strerror or exc)
        gateway.anonymous.close()
        gateway.ctx.destroy(linger=0)
        return 2
    if opts.endpoint_file:
        with open(opts.endpoint_file + ".tmp", "w", encoding="utf-8") as fh:
            fh.write("".join(e + "\n" for e in gateway.endpoints))
        os.replace(opts.endpoint_file + ".tmp", opts.endpoint_file)
    log.info("gateway serving OEHASHEQUIV on %s for hq at %s", ", ".join(gateway.endpoints), opts.broker)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
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
