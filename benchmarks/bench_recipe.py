"""Compare training recipes of the synthetic CPU preset at a fixed number of iterations.

A time budget makes accuracy depend on how busy the machine is; a fixed schedule (``--epochs``
epochs of 150 iterations, a full cosine) does not. Each run reports val mAP@0.5, the process's
CPU seconds and CPU milliseconds per iteration on one thread, so recipes compare by mAP per
CPU-second on a shared machine too::

    python benchmarks/bench_recipe.py --variant old-roi --epochs 6 --seeds 0 1
    python benchmarks/bench_recipe.py --variant preset --epochs 8 --seeds 0 1
    python benchmarks/bench_recipe.py --variant preset,batch2 --epochs 8 --seeds 0 1

Variants (joined with commas, applied to the current preset in order): ``preset`` (as is),
``old-roi`` (64 RoIs per image pooled to 7 x 7, 1000 boxes into the training NMS: the preset
before issue 8's change), ``batch2`` (2 images per step), ``bf16`` / ``fp32`` (autocast or
not), ``128px`` (the images at their 128 px, horizontal flips only: the data before the preset
upsampled them), ``vflip`` / ``jitter`` (add vertical flips / a colour jitter of 0.2 to it),
``160px`` / ``192px`` (upsample to that shorter side, anchors as they are), ``scaled-anchors``
(anchors scaled with the upsampling, as the preset's)::

    python benchmarks/bench_recipe.py --variant 128px --epochs 16 --seeds 0
    python benchmarks/bench_recipe.py --variant 128px,vflip,jitter --epochs 16 --seeds 0
    python benchmarks/bench_recipe.py --variant 128px,vflip,jitter,160px --epochs 16 --seeds 0
    python benchmarks/bench_recipe.py --variant 128px,vflip,jitter,192px --epochs 16 --seeds 0
    python benchmarks/bench_recipe.py --variant 128px,vflip,jitter,192px,scaled-anchors --epochs 16 --seeds 0
    python benchmarks/bench_recipe.py --variant preset --epochs 16 --seeds 0 1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time

import torch

from rpnlab.config import DataConfig
from rpnlab.data import build_dataset
from rpnlab.detector.model import synthetic_model_config
from rpnlab.engine.presets import synthetic_data_config, synthetic_detector_config
from rpnlab.engine.train import Trainer, evaluate, synthetic_train_config

VARIANTS = ("preset", "old-roi", "batch2", "bf16", "fp32", "128px", "vflip", "jitter", "160px", "192px",
            "scaled-anchors")


def configs(variant: str, epochs: int, seed: int, out_dir: str):
    """``(model_cfg, data_cfg, train_cfg)`` of a comma-separated ``variant``."""
    model_cfg, data_cfg = synthetic_detector_config(), synthetic_data_config()
    train = {"epochs": epochs, "seed": seed, "device": "cpu", "out_dir": out_dir, "checkpoint_every": epochs}
    for part in variant.split(","):
        if part == "old-roi":
            model_cfg.roi.batch_size_per_image, model_cfg.roi.output_size = 64, 7
            model_cfg.rpn.pre_nms_top_n_train = 1000
        elif part == "batch2":
            train["batch_size"] = 2
        elif part in ("bf16", "fp32"):  # bfloat16 autocast, or none
            train["amp"] = "bf16" if part == "bf16" else "off"
        elif part == "128px":  # the course's model and data, as they were
            model_cfg, data_cfg = synthetic_model_config(), DataConfig()
        elif part == "vflip":
            data_cfg.vflip_prob = 0.5
        elif part == "jitter":
            data_cfg.color_jitter = 0.2
        elif part in ("160px", "192px"):  # upsampled, the course's anchors
            data_cfg.min_size = int(part[:3])
            data_cfg.max_size = 2 * data_cfg.min_size
        elif part == "scaled-anchors":  # anchors scaled with the upsampling
            model_cfg.anchors = synthetic_detector_config(data_cfg).anchors
        elif part != "preset":
            raise ValueError(f"--variant {variant!r}: unknown part {part!r}, expected some of {', '.join(VARIANTS)}")
    return model_cfg.validate(), data_cfg.validate(), synthetic_train_config(**train)


def run(variant: str, epochs: int, seed: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="rpnlab-recipe-") as tmp:
        model_cfg, data_cfg, train_cfg = configs(variant, epochs, seed, tmp)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        result = Trainer(model_cfg, data_cfg, train_cfg, progress=False).run()
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    # The val split at the training resolution, without the training augmentations.
    val = build_dataset(dataclasses.replace(data_cfg, hflip_prob=0.0, vflip_prob=0.0, color_jitter=0.0), "val")
    metrics = evaluate(result.model, val, batch_size=16)
    return {"variant": variant, "epochs": epochs, "seed": seed, "iterations": result.iterations,
            "train_cpu_s": cpu, "train_wall_s": wall, "cpu_ms_per_iteration": 1000 * cpu / result.iterations,
            "map_50": metrics["map_50"], "map": metrics["map"], "recall_70": metrics["recall_70"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="preset", help=f"comma-separated parts of {VARIANTS}")
    parser.add_argument("--epochs", type=int, default=8, help="epochs of 150 iterations (batch 4), full cosine")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training seeds")
    parser.add_argument("--json", default=None, help="append one JSON line per run to this file")
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error(f"--epochs {args.epochs}: expected at least 1")
    try:  # a bad variant fails before any work
        configs(args.variant, args.epochs, 0, tempfile.gettempdir())
    except ValueError as error:
        parser.error(str(error))
    os.environ["RPNLAB_THREADS"] = "1"  # CPU time per iteration on one thread: comparable under load
    torch.set_num_threads(1)
    for seed in args.seeds:
        row = run(args.variant, args.epochs, seed)
        print(f"{row['variant']:>16} seed {seed}: {row['iterations']} it, mAP@0.5 {row['map_50']:.3f}, "
              f"{row['train_cpu_s']:.0f} CPU s ({row['cpu_ms_per_iteration']:.0f} ms/it)", flush=True)
        if args.json:
            with open(args.json, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
