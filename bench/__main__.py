"""``hq-bench``, and ``python -m hq.bench``: its main, or one line naming the extra it needs."""

import sys

from hq.extras import run


def _load():
    from hq.bench.cli import main

    return main


def entry() -> int:
    return run("hq-bench", _load, extra="bench")


if __name__ == "__main__":
    sys.exit(entry())
