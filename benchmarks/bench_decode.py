"""Decode time and peak memory of phone-sized JPEGs: full decode vs reduced (``Image.draft``).

    python benchmarks/bench_decode.py                       # 12 photos of 4000x3000, resize 320/512
    python benchmarks/bench_decode.py --images 4 --train-iters 4 --json decode.json

The benchmark writes its own folder of large JPEGs (smooth colour fields with drawn boxes, as a
VOC folder with a train list) into a temporary directory, then measures in fresh processes, so
that each peak resident memory (``ru_maxrss``) belongs to one mode alone:

* ``decode``: read every image through the VOC dataset with the resize of ``--min-size`` /
  ``--max-size`` (seconds per image; decoded pixels per image);
* ``train``: a few iterations of the small backbone on that folder (peak memory of the process).

each once with ``Image.draft`` (rpnlab's loader) and once with the full decode (the loader as it
was before, by switching off its size hint). Wall times depend on the machine's load: compare the
two modes of one run, not runs on different days.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def make_folder(root: Path, n: int, width: int, height: int) -> Path:
    """``n`` JPEGs of ``width x height`` with two annotated boxes each, as a VOC train list."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    names = []
    for i in range(n):
        a, b, c = rng.uniform(0, 1, 3)
        pixels = np.stack([128 + 100 * np.sin(xx / (300 + 200 * a) + c), 128 + 100 * np.cos(yy / (250 + 200 * b)),
                           np.full_like(xx, 255 * c)], axis=-1)
        pixels += rng.normal(0, 8, size=pixels.shape).astype(np.float32)  # sensor noise: real JPEG sizes
        objects = []
        for name in ("mug", "stapler"):
            bw, bh = rng.integers(width // 10, width // 3), rng.integers(height // 10, height // 3)
            x, y = rng.integers(0, width - bw), rng.integers(0, height - bh)
            pixels[y:y + bh, x:x + bw] = rng.uniform(0, 255, 3)
            objects.append(f"<object><name>{name}</name><bndbox><xmin>{x + 1}</xmin><ymin>{y + 1}</ymin>"
                           f"<xmax>{x + bw}</xmax><ymax>{y + bh}</ymax></bndbox></object>")
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(root / "JPEGImages" / f"{i:04d}.jpg", quality=90)
        (root / "Annotations" / f"{i:04d}.xml").write_text(
            f"<annotation><size><width>{width}</width><height>{height}</height></size>{''.join(objects)}</annotation>")
        names.append(f"{i:04d}")
    (root / "ImageSets" / "Main" / "train.txt").write_text("\n".join(names) + "\n")
    return root


def _child(mode: str, draft: bool, root: str, min_size: int, max_size: int, iters: int) -> dict:
    """One measurement, run in a fresh process (``--child``)."""
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from rpnlab.config import DataConfig
    from rpnlab.data import build_dataset, imageio

    if not draft:  # the loader before reduced decoding: every pixel of the file
        imageio.decode_size_hint = lambda transforms: None
    from rpnlab.detector.model import FasterRCNN  # noqa: F401 - every import before the baseline
    from rpnlab.engine.train import Trainer

    # Importing torch and torchvision alone takes several hundred MB of resident memory (their
    # shared libraries); the figure that depends on the images is the growth above this baseline.
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cfg = DataConfig(dataset="voc", root=root, min_size=min_size, max_size=max_size, hflip_prob=0.0)
    dataset = build_dataset(cfg, "train")
    result: dict = {"mode": mode, "draft": draft}
    if mode == "decode":
        start = time.perf_counter()
        for i in range(len(dataset)):
            _ = dataset[i]  # decode + resize to min_size/max_size, boxes with it
        seconds = time.perf_counter() - start
        hint = (min_size, max_size) if draft else (None, None)
        decoded = imageio.load_image(dataset.image_path(0), *hint).shape
        result.update(images=len(dataset), seconds_per_image=seconds / len(dataset),
                      decoded_size=f"{decoded[2]}x{decoded[1]}")
    else:
        from rpnlab.config import TrainConfig
        from rpnlab.detector.model import synthetic_model_config
        from rpnlab.engine.train import Trainer

        model_cfg = synthetic_model_config(num_classes=dataset.num_classes)
        train_cfg = TrainConfig(epochs=1000, batch_size=2, lr=0.01, warmup_iters=0, device="cpu", max_iters=iters,
                                out_dir=tempfile.mkdtemp(), checkpoint_every=1000)
        start = time.perf_counter()
        trainer = Trainer(model_cfg, cfg, train_cfg, progress=False, train_dataset=dataset)
        trainer.run()
        result.update(iterations=iters, seconds=time.perf_counter() - start)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    result["baseline_rss_mb"] = baseline
    result["growth_mb"] = result["peak_rss_mb"] - baseline
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=12, help="JPEGs to write and read")
    parser.add_argument("--width", type=int, default=4000)
    parser.add_argument("--height", type=int, default=3000)
    parser.add_argument("--min-size", type=int, default=320)
    parser.add_argument("--max-size", type=int, default=512)
    parser.add_argument("--train-iters", type=int, default=6, help="training iterations in the memory run (0: skip)")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        mode, draft, root, lo, hi, iters = args.child
        print(json.dumps(_child(mode, draft == "1", root, int(lo), int(hi), int(iters))))
        return 0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        root = make_folder(Path(tmp) / "photos", args.images, args.width, args.height)
        print(f"wrote {args.images} JPEGs of {args.width}x{args.height} in {time.perf_counter() - start:.1f} s")
        modes = ["decode"] + (["train"] if args.train_iters else [])
        for mode in modes:
            for draft in (False, True):
                out = subprocess.run([sys.executable, __file__, "--child", mode, str(int(draft)), str(root),
                                      str(args.min_size), str(args.max_size), str(args.train_iters)],
                                     capture_output=True, text=True, check=True)
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(rows[-1])
    full, reduced = rows[0], rows[1]
    print(f"\n| {args.images} JPEGs {args.width}x{args.height}, resize {args.min_size}/{args.max_size} "
          "| full decode | Image.draft |")
    print("|---|---:|---:|")
    print(f"| decode + sample, ms/image | {1000 * full['seconds_per_image']:.0f} | "
          f"{1000 * reduced['seconds_per_image']:.0f} |")
    print(f"| decoded size | {full['decoded_size']} | {reduced['decoded_size']} |")
    print(f"| peak RSS of the process, decoding (MB) | {full['peak_rss_mb']:.0f} | {reduced['peak_rss_mb']:.0f} |")
    print(f"| ... above the imports' {full['baseline_rss_mb']:.0f} MB (MB) | {full['growth_mb']:.0f} | "
          f"{reduced['growth_mb']:.0f} |")
    if len(rows) == 4:
        print(f"| peak RSS, {args.train_iters} training iterations, small backbone (MB) | "
              f"{rows[2]['peak_rss_mb']:.0f} | {rows[3]['peak_rss_mb']:.0f} |")
        print(f"| ... above the imports (MB) | {rows[2]['growth_mb']:.0f} | {rows[3]['growth_mb']:.0f} |")
    print(f"speed-up of decode + sample: {full['seconds_per_image'] / reduced['seconds_per_image']:.1f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
