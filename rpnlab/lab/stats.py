"""Results that hold up: the mean over seeds with a 95% interval, and when two settings differ.

An experiment is repeated over ``n`` seeds; ``mean_interval`` gives the mean and Student's t
interval ``mean +- t(n-1) * std / sqrt(n)``. Two settings are called different only when their
intervals do not overlap (``intervals_differ``): a conservative rule a reader can check by eye
in a table or on a plot.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = ["aggregate_rows", "intervals_differ", "mean_interval", "t_critical"]

# Two-sided Student's t critical values, df = 1..30 (Abramowitz & Stegun, table 26.10).
_T_TABLE = {
    0.90: [6.314, 2.920, 2.353, 2.132, 2.015, 1.943, 1.895, 1.860, 1.833, 1.812, 1.796, 1.782, 1.771, 1.761,
           1.753, 1.746, 1.740, 1.734, 1.729, 1.725, 1.721, 1.717, 1.714, 1.711, 1.708, 1.706, 1.703, 1.701,
           1.699, 1.697],
    0.95: [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
           2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
           2.045, 2.042],
    0.99: [63.657, 9.925, 5.841, 4.604, 4.032, 3.707, 3.499, 3.355, 3.250, 3.169, 3.106, 3.055, 3.012, 2.977,
           2.947, 2.921, 2.898, 2.878, 2.861, 2.845, 2.831, 2.819, 2.807, 2.797, 2.787, 2.779, 2.771, 2.763,
           2.756, 2.750],
}
_Z = {0.90: 1.6449, 0.95: 1.9600, 0.99: 2.5758}


def t_critical(df: int, confidence: float = 0.95) -> float:
    """Two-sided critical value of Student's t with ``df`` degrees of freedom (0.90, 0.95, 0.99)."""
    if confidence not in _T_TABLE:
        raise ValueError(f"confidence={confidence!r} is not supported: use one of {sorted(_T_TABLE)}")
    if not isinstance(df, int) or df < 1:
        raise ValueError(f"df={df!r} must be a positive integer (n - 1 for n >= 2 samples)")
    if df <= 30:
        return _T_TABLE[confidence][df - 1]
    z = _Z[confidence]  # Cornish-Fisher expansion in 1/df, within 1e-3 of the exact value above 30
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def mean_interval(values: Iterable[float], confidence: float = 0.95) -> dict[str, float]:
    """``dict(mean, std, low, high, half_width, n)`` of ``values`` (std with n - 1).

    With one value the interval is that value with ``half_width`` NaN (no spread known); an empty
    or non-finite input is an error naming it.
    """
    xs = [float(v) for v in values]
    if not xs:
        raise ValueError("values is empty: expected at least one measurement")
    if not all(math.isfinite(v) for v in xs):
        raise ValueError(f"values must be finite, got {xs}")
    n = len(xs)
    mean = sum(xs) / n
    if n == 1:
        return {"mean": mean, "std": math.nan, "low": mean, "high": mean, "half_width": math.nan, "n": 1}
    std = math.sqrt(sum((v - mean) ** 2 for v in xs) / (n - 1))
    half = t_critical(n - 1, confidence) * std / math.sqrt(n)
    return {"mean": mean, "std": std, "low": mean - half, "high": mean + half, "half_width": half, "n": n}


def intervals_differ(a: Mapping[str, float], b: Mapping[str, float]) -> bool:
    """True when the intervals of ``a`` and ``b`` (``mean_interval`` results) do not overlap."""
    if a["n"] < 2 or b["n"] < 2:
        return False
    return a["high"] < b["low"] or b["high"] < a["low"]


def aggregate_rows(rows: Sequence[Mapping[str, Any]], by: Sequence[str], metrics: Sequence[str],
                   confidence: float = 0.95) -> list[dict[str, Any]]:
    """One row per setting (the values of ``by``): each metric's mean, std, low, high and n.

    ``rows`` are tidy (one per setting and seed). Output keys: the ``by`` keys, then
    ``<metric>_mean``, ``<metric>_std``, ``<metric>_low``, ``<metric>_high``, ``n``. Settings keep
    their first-seen order. Rows where a metric is missing or None are left out of that metric.
    """
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for row in rows:
        key = tuple(_hashable(row.get(k)) for k in by)
        groups.setdefault(key, []).append(row)
    out = []
    for key, members in groups.items():
        agg: dict[str, Any] = dict(zip(by, (members[0].get(k) for k in by)))
        agg["n"] = len(members)
        for m in metrics:
            vals = [r[m] for r in members if r.get(m) is not None]
            if not vals:
                continue
            s = mean_interval(vals, confidence)
            for field in ("mean", "std", "low", "high"):
                agg[f"{m}_{field}"] = s[field]
        out.append(agg)
    return out


def _hashable(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    return value
