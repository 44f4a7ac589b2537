"""The broker's ZAP handler (ZeroMQ RFC 27): who may finish a CURVE handshake.

Bound at ``inproc://zeromq.zap.01`` in the broker's context and served by the broker's own
poll loop (no thread): libzmq asks it about every new connection to a socket with a ZAP
domain. A CURVE peer is let in if its public key is on the domain's allow-list (or the
domain has none: encryption without client authentication); a refused peer never sends a
message the scheduler sees. The User-Id of an accepted peer is its public key (Z85).
"""

from __future__ import annotations

import logging

import zmq

log = logging.getLogger(__name__)

ENDPOINT = "inproc://zeromq.zap.01"
CLIENTS = b"hq"  # the frontend's ZAP domain
WORKERS = b"hq-workers"  # a CURVE backend's


class ZapHandler:
    def __init__(self, ctx: zmq.Context, allowed: dict):
        """``allowed``: domain -> frozenset of Z85 public keys, or None for any key."""
        self.allowed = allowed
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.linger = 0
        self.sock.bind(ENDPOINT)
        self.accepted = 0
        self.refused = 0

    def serve(self, limit: int = 256) -> None:
        for _ in range(limit):
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            reply = self.answer(frames)
            if reply is not None:
                try:
                    self.sock.send_multipart(reply, zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass

    def answer(self, frames: list):
        # [peer, empty, version, request id, domain, address, identity, mechanism, creds...]
        if len(frames) < 8 or frames[1] != b"" or frames[2] != b"1.0":
            return None
        peer, _, version, request_id, domain, address, _identity, mechanism = frames[:8]
        status, text, user = b"200", b"OK", b""
        if mechanism == b"CURVE":
            key = zmq.utils.z85.encode(frames[8]) if len(frames) > 8 and len(frames[8]) == 32 else b""
            allowed = self.allowed.get(domain)
            if not key or (allowed is not None and key not in allowed):
                status, text = b"400", b"unknown CURVE key"
            user = key
        elif domain in self.allowed:  # a CURVE domain: nothing else gets in
            status, text = b"400", b"CURVE required"
        if status == b"200":
            self.accepted += 1
        else:
            self.refused += 1
            log.warning(
                "refused a %s connection from %s: %s%s",
                "worker" if domain == WORKERS else "client",
                address.decode("utf-8", "replace"),
                text.decode(),
                f" ({user.decode()})" if user else "",
            )
        return [peer, b"", version, request_id, status, text, user, b""]
