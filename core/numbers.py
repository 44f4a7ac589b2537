"""Numbers as people read them in hq-admin's and hq-bench's tables."""

from __future__ import annotations

import math


def fmt(value) -> str:
    """One cell: integers with thousands separators; floats to the precision their size
    deserves (1,234 / 12.3 / 1.23 / 0.0123); None and NaN as "-"; booleans as yes/no."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        if abs(value) >= 1:
            return f"{value:.2f}"
        return f"{value:.3g}"
    return str(value)
