"""benchmarks/bench_detector.py: its training clock leaves the paused evaluations out, wall and CPU time;
benchmarks/bench_recipe.py: its variants are what they say."""

import importlib.util
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench(name: str = "bench_detector"):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
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


def test_recipe_variants(tmp_path):
    bench = _bench("bench_recipe")
    model_cfg, data_cfg, train_cfg = bench.configs("preset", 8, 1, str(tmp_path))
    assert (model_cfg.roi.batch_size_per_image, model_cfg.roi.output_size, model_cfg.rpn.pre_nms_top_n_train) == (32, 5, 500)
    assert (train_cfg.epochs, train_cfg.seed, train_cfg.batch_size, train_cfg.amp) == (8, 1, 4, "auto")
    assert (data_cfg.vflip_prob, data_cfg.color_jitter, model_cfg.roi.implementation) == (0.5, 0.2, "auto")
    model_cfg, data_cfg, train_cfg = bench.configs("old-roi,batch2,fp32", 6, 0, str(tmp_path))
    assert (model_cfg.roi.batch_size_per_image, model_cfg.roi.output_size, model_cfg.rpn.pre_nms_top_n_train) == (64, 7, 1000)
    assert (train_cfg.batch_size, train_cfg.amp) == (2, "off")
    # The data as they were, then each augmentation and the upsampling on top, as measured for issue 8.
    model_cfg, data_cfg, _ = bench.configs("128px", 8, 0, str(tmp_path))
    assert (data_cfg.vflip_prob, data_cfg.color_jitter, data_cfg.min_size) == (0.0, 0.0, 128)
    model_cfg, data_cfg, _ = bench.configs("128px,vflip,jitter,192px", 8, 0, str(tmp_path))
    assert (data_cfg.vflip_prob, data_cfg.color_jitter, data_cfg.min_size) == (0.5, 0.2, 192)
    assert model_cfg.anchors.sizes == ((16.0, 32.0, 64.0),)
    model_cfg, _, _ = bench.configs("128px,vflip,jitter,192px,scaled-anchors", 8, 0, str(tmp_path))
    assert model_cfg.anchors.sizes == ((24.0, 48.0, 96.0),)
    with pytest.raises(SystemExit):
        bench.main(["--variant", "preset,bigger"])
