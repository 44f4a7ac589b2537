"""Presentation: numbers to text and tables (tabulate is imported here only)."""

from __future__ import annotations

from tabulate import tabulate

from hq.numbers import fmt


def judged_mark(target, value, judged: bool) -> str:
    """ " (met)" or " (missed)" after a target cell, when the run's targets are judged."""
    if not target or not judged or value is None:
        return ""
    return " (met)" if meets(target, value) else " (missed)"


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
        mark = judged_mark(target, mmm["median"], judge)
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
