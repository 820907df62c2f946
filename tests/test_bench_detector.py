"""benchmarks/bench_detector.py: its training clock leaves the paused evaluations out, wall and CPU time."""

import importlib.util
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_detector", ROOT / "benchmarks" / "bench_detector.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _burn(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_train_clock_counts_cpu_and_wall_time_outside_its_pauses():
    clock = _bench().TrainClock()
    assert clock.cpu_s() == 0.0  # not started
    clock.elapsed()
    _burn(0.05)
    with clock.paused():
        _burn(0.3)  # an evaluation: not training time
    _burn(0.05)
    assert 0.09 <= clock.cpu_s() < 0.25
    assert clock.paused_cpu_s >= 0.3 and clock.paused_s >= 0.3
    assert clock.elapsed() >= clock.cpu_s() - 0.02  # one thread: CPU time no more than wall time
