"""``hq-server``, and ``python -m hq.server``: its main, or one line naming the extra it needs."""

import sys

from hq.extras import require, run


def _load():
    require("peewee")  # imported by main once it knows the database
    from hq.server.main import main

    return main


def entry() -> int:
    return run("hq-server", _load)


if __name__ == "__main__":
    sys.exit(entry())
