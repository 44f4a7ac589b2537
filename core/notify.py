"""Tell a service manager how a daemon is doing: sd_notify(3) without libsystemd.

The protocol (systemd's ``Type=notify``): the manager names a unix datagram socket in
``$NOTIFY_SOCKET``, a filesystem path, or an abstract socket when the name starts with "@"
(which stands for the leading NUL byte of the abstract name). The daemon sends datagrams of
newline-separated ``NAME=value`` lines:

* ``READY=1``: started up and serving; ``systemctl start`` returns, and units ordered
  after this one start only now.
* ``STOPPING=1``: beginning to shut down (also when the daemon stops on its own, on SIGINT).
* ``STATUS=text``: one line shown by ``systemctl status``.

systemd takes the sender's pid from the socket's credentials; with ``NotifyAccess=main`` it
accepts datagrams from the main process only, so a daemon that runs children (hq-server)
keeps ``NOTIFY_SOCKET`` out of their environment (:func:`environ_for_children`).

Without the variable (a terminal, supervisord) :func:`notify` does nothing. It never raises:
a daemon must not stop because its manager cannot hear it. A failure is logged at DEBUG;
a lost READY=1 shows anyway, as the manager's start timeout.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)

#: The environment variable that names the manager's socket.
VARIABLE = "NOTIFY_SOCKET"


def notify(*states: str) -> bool:
    """Send ``states`` (e.g. ``"READY=1"``, ``"STATUS=serving"``) in one datagram; True if sent."""
    address = os.environ.get(VARIABLE, "")
    if not address or not states:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto("\n".join(states).encode("utf-8", "replace"), address)
    except (OSError, ValueError) as exc:  # no such socket, nobody bound to it, name too long, ...
        log.debug("cannot notify the service manager at %r: %s", os.environ.get(VARIABLE), exc)
        return False
    return True


def environ_for_children() -> dict:
    """This process's environment without the manager's socket, for the programs it starts:
    the main process speaks for them (with ``NotifyAccess=main`` systemd would refuse and log
    every datagram of theirs, and with ``all`` a child's READY=1 would end the start too early)."""
    return {name: value for name, value in os.environ.items() if name != VARIABLE}
