"""Multipart send and receive with plain int flags: the hot path of every hq process.

pyzmq's ``send_multipart``/``recv_multipart`` turn flags and socket options into enums on
every frame; on this path that was 16 % of the broker's Python time. These loops do the
same work with ints (measured: 20.5 us -> 8.3 us for a 6-frame send plus receive).
Imports only pyzmq, so the embedded client can use it.
"""

from __future__ import annotations

import zmq

NOBLOCK = int(zmq.NOBLOCK)
SNDMORE_NOBLOCK = int(zmq.SNDMORE) | NOBLOCK
RCVMORE = int(zmq.RCVMORE)
EVENTS = int(zmq.EVENTS)
POLLIN = int(zmq.POLLIN)


def dealer(ctx: zmq.Context, max_frame_bytes: int, reconnect_max_ms: int) -> zmq.Socket:
    """A DEALER as hq's clients use one: no linger, frames bounded, quick reconnects (0.1 s
    doubling up to ``reconnect_max_ms``). Not connected yet (CURVE keys go on first)."""
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.setsockopt(zmq.MAXMSGSIZE, max_frame_bytes)
    sock.setsockopt(zmq.RECONNECT_IVL, 100)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, reconnect_max_ms)
    return sock


def send_frames(sock: zmq.Socket, frames: list) -> None:
    """Send a multipart message without blocking. Raises zmq.Again (peer at its high-water
    mark) or zmq.ZMQError (e.g. EHOSTUNREACH) before anything is sent: libzmq takes or
    refuses a message whole at its first frame."""
    send = sock.send
    for frame in frames[:-1]:
        send(frame, SNDMORE_NOBLOCK)
    send(frames[-1], NOBLOCK)


def recv_frames(sock: zmq.Socket) -> list:
    """Receive one multipart message without blocking. Raises zmq.Again if none waits."""
    recv, more = sock.recv, sock.getsockopt
    frames = [recv(NOBLOCK)]
    while more(RCVMORE):
        frames.append(recv(NOBLOCK))
    return frames


def readable(sock: zmq.Socket) -> bool:
    """Does a message wait? (Cheaper than ending a receive loop on zmq.Again.)"""
    return bool(sock.getsockopt(EVENTS) & POLLIN)


def recv_frames_tagged(sock: zmq.Socket) -> tuple:
    """As :func:`recv_frames`, and the first frame as a ``zmq.Frame`` too: its metadata
    (``Peer-Address``, the ZAP ``User-Id``) is there when a rare path needs it. About
    0.5 us more per message than :func:`recv_frames`."""
    recv, more = sock.recv, sock.getsockopt
    first = recv(NOBLOCK, copy=False)
    frames = [first.bytes]
    while more(RCVMORE):
        frames.append(recv(NOBLOCK))
    return frames, first
