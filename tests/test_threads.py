"""Torch's CPU thread count follows the free cores unless the user chose one."""

import pytest
import torch

from rpnlab.engine.devices import configure_cpu_threads, cpu_threads_for_load


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
