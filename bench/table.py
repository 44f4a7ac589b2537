"""Presentation: numbers to text and tables (tabulate is imported here only)."""

from __future__ import annotations

import math

from tabulate import tabulate


def number(value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, int) or abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def target_text(target) -> str:
    if not target:
        return ""
    op, value = target
    return f"{'≤' if op == '<=' else '≥'} {number(value)}"


def meets(target, value) -> bool:
    op, limit = target
    return value <= limit if op == "<=" else value >= limit


def metrics_table(summary: dict, targets: dict, judge: bool = True) -> str:
    """metric | min | median | max | target: one row per metric; with ``judge``, each target
    says whether the median met it."""
    rows = []
    for name, mmm in summary.items():
        target = targets.get(name)
        mark = ""
        if judge and target and mmm["median"] is not None:
            mark = " (met)" if meets(target, mmm["median"]) else " (missed)"
        rows.append(
            [
                name,
                number(mmm["min"]),
                number(mmm["median"]),
                number(mmm["max"]),
                target_text(target) + mark if target else "",
            ]
        )
    return tabulate(
        rows,
        headers=["metric", "min", "median", "max", "target (median)"],
        colalign=("left", "right", "right", "right", "left"),
        disable_numparse=True,
    )


def grid(rows: list, headers: list, colalign=None) -> str:
    return tabulate(rows, headers=headers, colalign=colalign, disable_numparse=True)
