"""Logging set-up for hq's commands. Library modules only call ``logging.getLogger``."""

from __future__ import annotations

import logging
import sys

logging.getLogger("hq").addHandler(logging.NullHandler())

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def setup(program: str, level: str = "INFO") -> None:
    """Log to stderr with the program name and pid: supervisord interleaves workers."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter(f"%(asctime)s {program}[%(process)d] %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
