"""Percentiles and min/median/max over repeats."""

from __future__ import annotations

import math
import statistics


def percentile(sorted_values: list, q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of an already sorted list; NaN if empty."""
    if not sorted_values:
        return float("nan")
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def latency_ms(latencies_s: list, prefix: str = "latency") -> dict:
    """p50/p99/max in milliseconds of a list of latencies in seconds."""
    values = sorted(latencies_s)
    return {
        f"{prefix}_p50_ms": percentile(values, 50) * 1e3,
        f"{prefix}_p99_ms": percentile(values, 99) * 1e3,
        f"{prefix}_max_ms": (values[-1] if values else float("nan")) * 1e3,
    }


def min_median_max(values: list) -> dict:
    """Over the finite values; all None when there is none."""
    finite = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not finite:
        return {"min": None, "median": None, "max": None}
    return {"min": min(finite), "median": statistics.median(finite), "max": max(finite)}


def summarize(repeats: list) -> dict:
    """metric -> {min, median, max} over the ``metrics`` of every repeat, in first-seen order."""
    names: dict = {}
    for repeat in repeats:
        for name in repeat.get("metrics", {}):
            names.setdefault(name, None)
    return {name: min_median_max([r.get("metrics", {}).get(name) for r in repeats]) for name in names}
