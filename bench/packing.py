"""Packing benchmark: how should a GET chunk carry its hashes on the wire?

Measures, through real ZeroMQ sockets in one process, the round trip of one batch of N
64-hex taskhashes out and N unihashes back, in three packings:

* ``a``: one frame per hash (text);
* ``b``: one LF-joined text frame, what hq uses (``protocol.pack_items`` /
  ``unpack_items`` / ``pack_unihashes`` / ``unpack_unihashes``);
* ``c``: one frame of raw 32-byte binaries (a miss is 32 zero bytes).

Each timed batch includes, on both sides, encoding, sending, receiving and decoding
to and from the Python values the client API uses (``list[str]`` out,
``list[str | None]`` back), with the checks each packing needs (hex and length
checks; hq's own functions for ``b``). The server side looks each taskhash up in a dict.
Every message carries hq's envelope (protocol, request id, command, credentials, method).

Path: client DEALER -> ROUTER (the server answers) -> back to the DEALER, over ipc://
(default) or tcp://127.0.0.1. ``--via-broker`` adds hq's broker hop: client DEALER ->
frontend ROUTER -> backend ROUTER -> worker DEALER and back, as in a real deployment.

Each repeat runs ``--batches`` round trips of every variant (the order rotates between
repeats, so drift on a noisy machine hits all variants alike) and records microseconds per
batch; the table shows min/median/max over the repeats and each variant's median relative
to ``b`` from the same run. The "codec" column is the best-of-3 cost of the four
encode/decode steps alone, without sockets. Byte counts are frame payloads, without ZMTP's
frame headers (2 bytes per frame up to 255 bytes, 9 above). A benchmark is a program, not
a test: nothing here asserts a speed.

    python -m hq.bench.packing [--items 1000] [--repeats 5] [--batches 200] [--json FILE]
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import shutil
import statistics
import sys
import tempfile
import time

import zmq

from hq import protocol as p
from hq.bench.machine import describe

VARIANTS = ("a", "b", "c")
DESCRIPTIONS = {
    "a": "one frame per hash",
    "b": "one LF-joined text frame (hq)",
    "c": "one frame of 32-byte binaries",
}
_HEX = b"0123456789abcdef"
_ZERO_HEX = "0" * 64
_METHOD = b"bench.method"
RECV_TIMEOUT_MS = 10000


# --- the three packings ------------------------------------------------------------------
# Each variant is four functions: client_encode(list[str]) -> frames,
# server_decode(frames) -> list[str], server_encode(list[str|None]) -> frames,
# client_decode(frames, n) -> list[str|None]. They raise ValueError/ProtocolError on bad data.


def _a_client_encode(taskhashes):
    return [t.encode("utf-8") for t in taskhashes]


def _a_server_decode(frames):
    out = []
    for frame in frames:
        if 0 < len(frame) <= p.MAX_HASH_BYTES and not frame.translate(None, _HEX):
            out.append(frame.decode("ascii"))
        else:
            out.append(p.decode_text(frame, "taskhash", p.MAX_HASH_BYTES))
    return out


def _a_server_encode(unihashes):
    return [u.encode("ascii") if u else b"" for u in unihashes]


def _a_client_decode(frames, n):
    if len(frames) != n:
        raise ValueError(f"reply has {len(frames)} frames, expected {n}")
    out = []
    for frame in frames:
        if not frame:
            out.append(None)
            continue
        value = frame.decode("ascii")
        if not p.is_unihash(value):
            raise ValueError("malformed unihash")
        out.append(value)
    return out


def _b_client_encode(taskhashes):
    return [p.pack_items(taskhashes)]


def _b_server_decode(frames):
    return p.unpack_items(frames[0], "taskhash")


def _b_server_encode(unihashes):
    return [p.pack_unihashes(unihashes)]


def _b_client_decode(frames, n):
    if len(frames) != 1:
        raise ValueError("expected one reply frame")
    return p.unpack_unihashes(frames[0], n)


def _c_client_encode(taskhashes):
    text = "".join(taskhashes)
    blob = bytes.fromhex(text)
    # fromhex skips whitespace and accepts upper case: only canonical 64-hex items fit.
    if len(blob) != 32 * len(taskhashes) or blob.hex() != text:
        raise ValueError("binary packing needs 64-char lower-case hex hashes")
    return [blob]


def _c_split(blob):
    if len(blob) % 32:
        raise ValueError("binary frame is not a multiple of 32 bytes")
    text = blob.hex()
    return [text[i : i + 64] for i in range(0, len(text), 64)]


def _c_server_decode(frames):
    return _c_split(frames[0])


def _c_server_encode(unihashes):
    return [bytes.fromhex("".join(u or _ZERO_HEX for u in unihashes))]


def _c_client_decode(frames, n):
    if len(frames) != 1 or len(frames[0]) != 32 * n:
        raise ValueError("malformed binary reply")
    return [None if u == _ZERO_HEX else u for u in _c_split(frames[0])]


CODECS = {
    "a": (_a_client_encode, _a_server_decode, _a_server_encode, _a_client_decode),
    "b": (_b_client_encode, _b_server_decode, _b_server_encode, _b_client_decode),
    "c": (_c_client_encode, _c_server_decode, _c_server_encode, _c_client_decode),
}


# --- sockets --------------------------------------------------------------------------------
class Path:
    """Client DEALER and server end (a ROUTER, or broker ROUTERs + worker DEALER)."""

    def __init__(self, transport: str, via_broker: bool):
        self.ctx = zmq.Context()
        self.rundir = tempfile.mkdtemp(prefix="hq-bench-")
        self.via_broker = via_broker
        self.sockets = []
        try:
            self.front = self._socket(zmq.ROUTER)
            self.front.bind(self._endpoint(transport, "front"))
            self.client = self._socket(zmq.DEALER)
            self.client.connect(self.front.last_endpoint.decode())
            if via_broker:
                self.back = self._socket(zmq.ROUTER)
                self.back.setsockopt(zmq.ROUTER_MANDATORY, 1)
                self.back.bind(self._endpoint(transport, "back"))
                self.worker = self._socket(zmq.DEALER)
                self.worker.setsockopt(zmq.ROUTING_ID, b"W")
                self.worker.connect(self.back.last_endpoint.decode())
                self.worker.send_multipart([p.WORKER_PROTOCOL, p.READY, b"{}"])
                self.back.recv_multipart()  # the backend now knows the worker's routing id
        except BaseException:
            self.close()
            raise

    def _socket(self, kind):
        sock = self.ctx.socket(kind)
        sock.linger = 0
        sock.setsockopt(zmq.RCVTIMEO, RECV_TIMEOUT_MS)  # a lost message fails, never hangs
        sock.setsockopt(zmq.MAXMSGSIZE, p.MAX_FRAME_BYTES)
        self.sockets.append(sock)
        return sock

    def _endpoint(self, transport, name):
        if transport == "ipc":
            return f"ipc://{self.rundir}/{name}.ipc"
        return "tcp://127.0.0.1:*"

    def close(self):
        for sock in self.sockets:
            sock.close(linger=0)
        self.ctx.term()
        shutil.rmtree(self.rundir, ignore_errors=True)

    def round_trip(self, codec, taskhashes, table):
        """One batch, end to end. Returns the client's decoded unihashes."""
        client_encode, server_decode, server_encode, client_decode = codec
        n = len(taskhashes)
        self.client.send_multipart([p.CLIENT_PROTOCOL, b"1", p.GET, b"", _METHOD, *client_encode(taskhashes)])
        if self.via_broker:
            frames = self.front.recv_multipart()  # [client_id, envelope..., body...]
            self.back.send_multipart([b"W", *frames])
            frames = self.worker.recv_multipart()
        else:
            frames = self.front.recv_multipart()
        client_id, request_id, body = frames[0], frames[2], frames[6:]
        unihashes = [table.get(t) for t in server_decode(body)]
        reply = [client_id, p.CLIENT_PROTOCOL, request_id, b"0", *server_encode(unihashes)]
        if self.via_broker:
            self.worker.send_multipart(reply)
            frames = self.back.recv_multipart()  # [b"W", client_id, ...]
            self.front.send_multipart(frames[1:])
        else:
            self.front.send_multipart(reply)
        frames = self.client.recv_multipart()
        if frames[0] != p.CLIENT_PROTOCOL or frames[2] != b"0":
            raise RuntimeError("bad reply envelope")
        return client_decode(frames[3:], n)


# --- the run --------------------------------------------------------------------------------
def make_data(items: int, hit_rate: float, seed: int):
    rng = random.Random(seed)
    taskhashes = ["%064x" % rng.getrandbits(256) for _ in range(items)]
    table = {}
    expected = []
    for t in taskhashes:
        if rng.random() < hit_rate:
            table[t] = "%064x" % rng.getrandbits(256)
        expected.append(table.get(t))
    return taskhashes, table, expected


def codec_only_us(codec, taskhashes, table, batches) -> float:
    """Best-of-3 microseconds for the four codec steps of one batch, without sockets."""
    client_encode, server_decode, server_encode, client_decode = codec
    n = len(taskhashes)
    best = None
    for _ in range(3):
        start = time.perf_counter_ns()
        for _ in range(batches):
            body = [bytes(f) for f in client_encode(taskhashes)]
            reply = server_encode([table.get(t) for t in server_decode(body)])
            client_decode(reply, n)
        elapsed = (time.perf_counter_ns() - start) / batches / 1000.0
        best = elapsed if best is None else min(best, elapsed)
    return best


def wire_size(codec, taskhashes, expected):
    request = codec[0](taskhashes)
    reply = codec[2](expected)
    return {
        "request_body_frames": len(request),
        "request_body_bytes": sum(len(f) for f in request),
        "reply_body_frames": len(reply),
        "reply_body_bytes": sum(len(f) for f in reply),
    }


def run(items=1000, repeats=5, batches=200, transport="ipc", via_broker=False, hit_rate=1.0, seed=1):
    taskhashes, table, expected = make_data(items, hit_rate, seed)
    path = Path(transport, via_broker)
    samples = {v: [] for v in VARIANTS}
    try:
        for v in VARIANTS:  # check each codec once and warm up
            for _ in range(max(1, batches // 10)):
                if path.round_trip(CODECS[v], taskhashes, table) != expected:
                    raise RuntimeError(f"variant {v} returned wrong unihashes")
        for r in range(repeats):
            order = VARIANTS[r % 3 :] + VARIANTS[: r % 3]
            for v in order:
                codec = CODECS[v]
                gc_was_enabled = gc.isenabled()
                gc.disable()
                try:
                    start = time.perf_counter_ns()
                    for _ in range(batches):
                        path.round_trip(codec, taskhashes, table)
                    elapsed = time.perf_counter_ns() - start
                finally:
                    if gc_was_enabled:
                        gc.enable()
                samples[v].append(elapsed / batches / 1000.0)
    finally:
        path.close()
    codec_us = {v: codec_only_us(CODECS[v], taskhashes, table, batches) for v in VARIANTS}
    scale = 1000.0 / items  # microseconds per 1000-hash batch
    results = {}
    base = statistics.median(samples["b"]) * scale
    for v in VARIANTS:
        us = [s * scale for s in samples[v]]
        med = statistics.median(us)
        results[v] = {
            "description": DESCRIPTIONS[v],
            **wire_size(CODECS[v], taskhashes, expected),
            "us_per_batch": {
                "min": min(samples[v]),
                "median": statistics.median(samples[v]),
                "max": max(samples[v]),
            },
            "us_per_1000_hashes": {"min": min(us), "median": med, "max": max(us)},
            "samples_us_per_1000_hashes": us,
            "median_ratio_to_b": med / base if base else None,
            "codec_only_us_per_1000_hashes": codec_us[v] * scale,
        }
    return results


def table_text(results: dict) -> str:
    from tabulate import tabulate  # only this program formats tables

    rows = []
    for v, r in results.items():
        us = r["us_per_1000_hashes"]
        rows.append(
            [
                f"({v}) {r['description']}",
                f"{r['request_body_frames']} / {r['reply_body_frames']}",
                f"{r['request_body_bytes']} / {r['reply_body_bytes']}",
                us["min"],
                us["median"],
                us["max"],
                r["median_ratio_to_b"],
                r["codec_only_us_per_1000_hashes"],
            ]
        )
    headers = ["packing", "frames req/rep", "bytes req/rep"]
    headers += ["min µs", "median µs", "max µs", "× (b)", "codec µs"]
    return tabulate(rows, headers=headers, floatfmt=("", "", "", ".0f", ".0f", ".0f", ".2f", ".0f"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hq.bench.packing",
        description="Round-trip cost of packing N taskhashes/unihashes three ways over ZeroMQ.",
    )
    parser.add_argument("--items", type=int, default=1000, help="hashes per batch (default 1000)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per variant (default 5)")
    parser.add_argument("--batches", type=int, default=200, help="round trips per repeat (default 200)")
    parser.add_argument("--transport", choices=("ipc", "tcp"), default="ipc", help="default ipc")
    parser.add_argument(
        "--via-broker", action="store_true", help="add hq's broker hop (ROUTER->ROUTER->DEALER)"
    )
    parser.add_argument("--hit-rate", type=float, default=1.0, help="share of taskhashes known (default 1.0)")
    parser.add_argument("--seed", type=int, default=1, help="random seed for the hashes (default 1)")
    parser.add_argument("--json", metavar="FILE", help="also write configuration, machine and results here")
    opts = parser.parse_args(argv)
    if opts.items < 1 or opts.repeats < 1 or opts.batches < 1 or not 0.0 <= opts.hit_rate <= 1.0:
        parser.error("--items, --repeats and --batches must be at least 1; --hit-rate in [0, 1]")
    config = {
        "items": opts.items,
        "repeats": opts.repeats,
        "batches": opts.batches,
        "transport": opts.transport,
        "via_broker": opts.via_broker,
        "hit_rate": opts.hit_rate,
        "seed": opts.seed,
        "gc_disabled_while_timing": True,
        "unit": "microseconds per round trip of 1000 hashes (scaled from --items)",
    }
    info = describe(tempfile.gettempdir())
    results = run(
        opts.items, opts.repeats, opts.batches, opts.transport, opts.via_broker, opts.hit_rate, opts.seed
    )
    print(
        f"{opts.items} hashes per batch, {opts.repeats} repeats x {opts.batches} round trips, "
        f"{opts.transport}{' via broker' if opts.via_broker else ''}; "
        f"{info['platform']}, {info['cpu_count_logical']} CPUs, Python {info['python']}, "
        f"pyzmq {info['pyzmq']}, libzmq {info['libzmq']}"
    )
    print(table_text(results))
    if opts.json:
        doc = {
            "benchmark": "hq.bench.packing",
            "argv": list(sys.argv[1:] if argv is None else argv),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "configuration": config,
            "machine": info,
            "results": results,
        }
        with open(opts.json, "w", encoding="utf-8") as fh:
            json.dump(doc, fh, indent=2)
            fh.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
