"""Torch's CPU thread count follows the free cores unless the user chose one."""

import pytest
import torch

from rpnlab.engine.devices import busy_cores, configure_cpu_threads, cpu_threads_for_load


def test_threads_follow_the_free_cores():
    assert cpu_threads_for_load(2, 0.1) == 2
    assert cpu_threads_for_load(2, 1.2) == 1
    assert cpu_threads_for_load(2, 20.0) == 1  # never 0
    assert cpu_threads_for_load(16, 3.0) == 13
    assert 1 <= cpu_threads_for_load() <= (torch.get_num_threads() + 1024)


def test_an_explicit_choice_wins(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("RPNLAB_THREADS", "1")
        assert configure_cpu_threads() == 1 and torch.get_num_threads() == 1
        monkeypatch.delenv("RPNLAB_THREADS")
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert configure_cpu_threads() is None
        monkeypatch.setenv("RPNLAB_THREADS", "zero")
        with pytest.raises(ValueError, match="RPNLAB_THREADS"):
            configure_cpu_threads()
    finally:
        torch.set_num_threads(before)


def test_busy_cores_reads_proc_stat(tmp_path):
    # Two snapshots of /proc/stat's first line: 100 jiffies passed, 25 of them idle -> 75% busy.
    import os
    import threading

    stat = tmp_path / "stat"
    stat.write_text("cpu  100 0 100 700 100 0 0 0 0 0\n")
    threading.Timer(0.05, lambda: stat.write_text("cpu  140 0 135 720 105 0 0 0 0 0\n")).start()
    assert busy_cores(window_s=0.3, stat_path=str(stat)) == pytest.approx((os.cpu_count() or 1) * 0.75)
    assert busy_cores(stat_path=str(tmp_path / "missing")) is None
    real = busy_cores(window_s=0.05)
    assert real is None or 0.0 <= real <= (os.cpu_count() or 1)
