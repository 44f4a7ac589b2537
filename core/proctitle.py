"""Make each hq process recognisable in ps and top.

Linux shows a process's *name* (``ps -e``, ``top``, ``pgrep``, /proc/PID/comm) separately
from its command line. hq sets the name to the program and its number, e.g. ``hq-worker-03``
(at most 15 bytes, the kernel's limit), with ``prctl(PR_SET_NAME)``; where the optional
``setproctitle`` package is installed, the command line shown by ``ps -f`` is replaced too.
The command line already names the program (``hq-worker --name hq-worker-03 ...``), so
this is a convenience and never an error.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_PR_SET_NAME = 15


def set_title(name: str, detail: str = "") -> bool:
    """Set this process's name (and title, with setproctitle). True if the name was set."""
    try:
        import setproctitle  # optional

        setproctitle.setproctitle(f"{name} {detail}".strip())
    except ImportError:
        pass
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(_PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False
