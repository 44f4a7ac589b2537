"""Presentation: numbers to text and tables (tabulate is imported here only)."""

from __future__ import annotations

from tabulate import tabulate

from hq.numbers import fmt


def target_text(target) -> str:
    if not target:
        return ""
    op, value = target
    return f"{'≤' if op == '<=' else '≥'} {fmt(value)}"


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
                fmt(mmm["min"]),
                fmt(mmm["median"]),
                fmt(mmm["max"]),
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
