"""``hq-admin``, and ``python -m hq.admin``: its main, or one line naming the extra it needs."""

import sys

from hq.extras import run


def _load():
    from hq.admin.cli import main

    return main


def entry() -> int:
    return run("hq-admin", _load)


if __name__ == "__main__":
    sys.exit(entry())
