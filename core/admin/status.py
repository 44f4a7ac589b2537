"""hq-admin subcommands that look at the running service: ping (more to come)."""

from __future__ import annotations

import time

from . import output


def add_commands(sub, common) -> None:
    cmd = sub.add_parser("ping", parents=[common], help="round-trip times through the broker to a worker")
    cmd.add_argument("--count", "-c", type=int, default=5, help="pings to send (default %(default)s)")
    cmd.set_defaults(func=ping)


def ping(args, client) -> int:
    times = []
    for _ in range(max(1, args.count)):
        start = time.perf_counter()
        client.ping()
        times.append(time.perf_counter() - start)
    times.sort()
    data = {
        "address": args.address,
        "count": len(times),
        "min_s": times[0],
        "median_s": times[len(times) // 2],
        "max_s": times[-1],
    }
    rows = [(args.address, len(times), output.ms(times[0]), output.ms(data["median_s"]), output.ms(times[-1]))]
    output.emit(args, data, (None, ["address", "pings", "min ms", "median ms", "max ms"], rows))
    return output.OK
