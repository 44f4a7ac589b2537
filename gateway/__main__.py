"""``hq-gateway``, and ``python -m hq.gateway``."""

import sys

from hq.extras import run


def _load():
    from hq.gateway.main import main

    return main


def entry() -> int:
    return run("hq-gateway", _load)


if __name__ == "__main__":
    sys.exit(entry())
