"""The optional parts of the distribution, and what a program says when its part is missing.

A plain ``pip install hq-hashequiv`` is the client alone (pyzmq and the standard library), so
it can go into BitBake's Python environment. The daemons and tools come with extras:
``[server]`` (hq-worker, hq-server: peewee), ``[admin]`` (hq-admin: tabulate), ``[bench]``
(hq-bench: both, and psutil), ``[gateway]`` (hq-gateway's ``ws://`` listeners: websockets),
``[all]``. Their console scripts are installed either way;
started without their extra, each says which one in one line and exits 2.
"""

from __future__ import annotations

import importlib.util
import sys

DISTRIBUTION = "hq-hashequiv"
#: Third-party module -> the extra that installs it.
EXTRAS = {"peewee": "server", "tabulate": "admin", "psutil": "bench", "websockets": "gateway"}


def require(module: str) -> None:
    """ModuleNotFoundError now if ``module`` is not installed: for a program's ``load`` when
    its main imports the module later (:func:`run` names the extra)."""
    if importlib.util.find_spec(module) is None:
        raise ModuleNotFoundError(f"No module named {module!r}", name=module)


def run(program: str, load, extra: str | None = None) -> int:
    """``load()`` imports the program's main module and returns its ``main``; run it. A
    module of an extra that is not installed is one line naming ``extra`` (the program's
    own, e.g. hq-bench's ``bench``; default: the module's) and exit status 2."""
    try:
        main = load()
    except ModuleNotFoundError as exc:
        module_extra = EXTRAS.get((exc.name or "").split(".")[0])
        if module_extra is None:
            raise
        extra = extra or module_extra
        sys.stderr.write(
            f"{program}: needs the [{extra}] extra ({exc.name} is not installed): "
            f"pip install '{DISTRIBUTION}[{extra}]'\n"
        )
        return 2
    return main()
