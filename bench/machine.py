"""A description of the machine a benchmark ran on, for the JSON result."""

from __future__ import annotations

import os
import platform
import sqlite3
import sys

import peewee
import psutil
import zmq

from hq.workers.filesystem import filesystem_type


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def filesystem_of(directory: str) -> str:
    """Type of the filesystem holding ``directory`` (ext4, tmpfs, ...): it decides fsync cost."""
    return filesystem_type(os.path.join(directory, "hq.db")) or "unknown"


def describe(db_dir: str) -> dict:
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_model": cpu_model(),
        "cpu_count_logical": psutil.cpu_count(logical=True),
        "cpu_count_physical": psutil.cpu_count(logical=False),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_total_bytes": psutil.virtual_memory().total,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "python_executable": sys.executable,
        "pyzmq": zmq.pyzmq_version(),
        "libzmq": zmq.zmq_version(),
        "sqlite": sqlite3.sqlite_version,
        "peewee": peewee.__version__,
        "db_filesystem": filesystem_of(db_dir),
        "load_average": list(os.getloadavg()),
    }
