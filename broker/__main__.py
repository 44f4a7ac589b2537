"""``hq-broker``, and ``python -m hq.broker``: its main, or one line naming the extra it needs."""

import sys

from hq.extras import run


def _load():
    from hq.broker.main import main

    return main


def entry() -> int:
    return run("hq-broker", _load)


if __name__ == "__main__":
    sys.exit(entry())
