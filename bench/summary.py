"""``hq-bench summary DIR``: one table over every JSON result in a directory."""

from __future__ import annotations

import json
import os

from hq.numbers import fmt

from .table import grid

HEADERS = [
    "workload",
    "workers",
    "batch",
    "transport",
    "clients",
    "pace",
    "metric",
    "min",
    "median",
    "max",
    "ok",
    "file",
]


def load(directory: str) -> list:
    """(file name, parsed JSON) of each ``*.json`` file that is an hq-bench result."""
    out = []
    for name in sorted(os.listdir(directory)):
        if not name.endswith(".json"):
            continue
        try:
            with open(os.path.join(directory, name), encoding="utf-8") as fh:
                data = json.load(fh)
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and "workload" in data and "summary" in data and "title" in data:
            out.append((name, data))
    return out


def rows(results: list) -> list:
    out = []
    order = {"burst": 0, "single": 1, "report": 2, "mixed": 3, "fairness": 4}
    results = sorted(
        results,
        key=lambda nd: (
            order.get(nd[1]["workload"], 9),
            nd[1]["config"].get("batch", 0),
            nd[1]["config"].get("workers", 0),
            nd[1]["config"].get("transport", ""),
            nd[0],
        ),
    )
    for name, data in results:
        config = data.get("config", {})
        for metric in data.get("key_metrics", []):
            mmm = data["summary"].get(metric, {})
            out.append(
                [
                    data["workload"],
                    str(config.get("workers")),
                    str(config.get("batch")),
                    config.get("transport"),
                    str(config.get("clients")),
                    f"{config['rate']:g}/s each" if config.get("rate") else "",
                    metric,
                    fmt(mmm.get("min")),
                    fmt(mmm.get("median")),
                    fmt(mmm.get("max")),
                    "yes" if data.get("ok") else "NO",
                    name,
                ]
            )
    return out


def main(directory: str) -> int:
    if not os.path.isdir(directory):
        print(f"hq-bench summary: {directory} is not a directory")
        return 2
    results = load(directory)
    if not results:
        print(f"hq-bench summary: no hq-bench JSON results in {directory}")
        return 1
    machine = results[0][1].get("machine", {})
    print(
        f"{len(results)} results in {directory}; machine: {machine.get('cpu_model', '?')}, "
        f"{machine.get('cpu_count_logical', '?')} CPUs, {machine.get('python', '?')}"
    )
    align = (
        "left",
        "right",
        "right",
        "left",
        "right",
        "left",
        "left",
        "right",
        "right",
        "right",
        "left",
        "left",
    )
    print(grid(rows(results), HEADERS, align))
    return 0 if all(data.get("ok") for _, data in results) else 1
