"""A time budget fits the learning-rate schedule and the progress bar to itself (a fake clock, so no wall time)."""

import itertools

import pytest

from rpnlab.engine import train as train_module
from rpnlab.engine.train import lr_factor, train
from tests.test_train import tiny_configs


def test_lr_factor_follows_the_time_used():
    assert lr_factor(10, 1000, time_fraction=0.5) == pytest.approx(0.5)  # time is further along than steps
    assert lr_factor(900, 1000, time_fraction=0.5) == pytest.approx(lr_factor(900, 1000))  # steps are
    assert lr_factor(10, 1000, time_fraction=1.0) == pytest.approx(0.0)
    assert lr_factor(10, 1000, schedule="step", milestones=[600], time_fraction=0.7) == pytest.approx(0.1)


def test_a_budget_decays_the_rate_to_its_end(tmp_path, monkeypatch, capsys):
    clock = itertools.count(0.0, 0.25)  # each reading of the clock is a quarter second later
    monkeypatch.setattr(train_module.time, "perf_counter", lambda: next(clock))
    model_cfg, data_cfg, train_cfg = tiny_configs(tmp_path, epochs=100, time_budget_s=6.0, warmup_iters=0)
    result = train(model_cfg, data_cfg, train_cfg, progress=True)
    assert result.stop_reason == "time_budget"
    assert 5 <= result.iterations <= 20  # far fewer than the 200 planned
    lrs = [h["lr"] for h in result.history]
    # Without fitting, the cosine over 200 iterations would still be above 97% of its peak here.
    assert lrs[0] == pytest.approx(0.01) and lrs[-1] < 0.2 * 0.01
    assert all(a >= b for a, b in itertools.pairwise(lrs))
    assert "budget" in capsys.readouterr().err  # the bar shows the seconds used of the budget
