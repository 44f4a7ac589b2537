"""``hq-worker``, and ``python -m hq.workers``: its main, or one line naming the extra it needs."""

import sys

from hq.extras import require, run


def _load():
    require("peewee")  # imported by main once it knows the database
    from hq.workers.main import main

    return main


def entry() -> int:
    return run("hq-worker", _load)


if __name__ == "__main__":
    sys.exit(entry())
