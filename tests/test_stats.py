"""Seed statistics: intervals checked against hand computations."""

import math

import pytest

from rpnlab.lab.stats import aggregate_rows, intervals_differ, mean_interval, t_critical


def test_mean_interval_by_hand():
    # values 1, 2, 3: mean 2, std 1, t(2) = 4.303 -> half width 4.303 / sqrt(3) = 2.4843
    s = mean_interval([1.0, 2.0, 3.0])
    assert s["mean"] == 2.0 and s["std"] == pytest.approx(1.0) and s["n"] == 3
    assert s["half_width"] == pytest.approx(4.303 / math.sqrt(3), rel=1e-6)
    assert s["low"] == pytest.approx(2 - 2.48434, abs=1e-4) and s["high"] == pytest.approx(2 + 2.48434, abs=1e-4)


def test_t_critical_table_and_expansion():
    assert t_critical(4) == 2.776
    assert t_critical(40) == pytest.approx(2.021, abs=2e-3)
    assert t_critical(120) == pytest.approx(1.980, abs=2e-3)
    with pytest.raises(ValueError, match="confidence"):
        t_critical(3, 0.8)
    with pytest.raises(ValueError, match="df"):
        t_critical(0)


def test_single_value_and_bad_input():
    s = mean_interval([0.5])
    assert s["mean"] == 0.5 and math.isnan(s["half_width"])
    with pytest.raises(ValueError, match="empty"):
        mean_interval([])
    with pytest.raises(ValueError, match="finite"):
        mean_interval([1.0, float("nan")])


def test_intervals_differ():
    a = mean_interval([0.80, 0.81, 0.82])
    b = mean_interval([0.60, 0.61, 0.62])
    c = mean_interval([0.70, 0.80, 0.90])
    assert intervals_differ(a, b) and not intervals_differ(a, c)
    assert not intervals_differ(mean_interval([1.0]), b)


def test_aggregate_rows():
    rows = [{"lambda": 1, "seed": s, "recall": r} for s, r in enumerate([0.5, 0.6, 0.7])]
    rows += [{"lambda": 10, "seed": s, "recall": r} for s, r in enumerate([0.2, 0.2])]
    out = aggregate_rows(rows, by=["lambda"], metrics=["recall"])
    assert [r["lambda"] for r in out] == [1, 10]
    assert out[0]["n"] == 3 and out[0]["recall_mean"] == pytest.approx(0.6)
    assert out[0]["recall_std"] == pytest.approx(0.1)
    assert out[1]["recall_low"] == pytest.approx(0.2) and out[1]["recall_high"] == pytest.approx(0.2)
