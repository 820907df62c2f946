"""Decode time and peak memory of phone-sized photos: full decode, reduced decode, resized cache.

    python benchmarks/bench_decode.py                 # 12 JPEGs + 4 PNGs of 4000x3000, resize 320/512
    python benchmarks/bench_decode.py --images 8 --pngs 4 --train-iters 6 --batch-sizes 2,4 --json decode.json

The benchmark writes its own VOC folders of large JPEGs and PNGs (smooth colour fields with
sensor noise and drawn boxes, a train list) into a temporary directory, then measures each case
in a fresh process:

* ``decode``: read every image through the VOC dataset with the resize of ``--min-size`` /
  ``--max-size``, twice (epoch 1, epoch 2: what the cache changes), in ms per sample;
* ``train``: a few iterations of ``--preset photos`` (the small backbone) at each ``--batch-sizes``
  on the JPEGs.

Loaders: ``full`` (every pixel decoded, as before issue 9), ``draft`` (JPEG's reduced DCT decode,
``Image.draft``; PNG has none) and ``cache`` (reduced decode, then the resized image is kept in a
``ResizedImageCache``: rpnlab's default).

Memory comes from ``/proc/self/status`` (``rpnlab.engine.memory``): the peak total resident
size (``VmHWM``, restarted after the imports) and the sampled peak of its anonymous part
(``RssAnon``: what the process allocated), with ``RssFile`` (the mapped shared libraries of
torch's build) beside them. Not ``ru_maxrss``: after fork + exec it carries the parent's peak
(the parent that drew 4000x3000 float images) into the child.

Wall times depend on the machine's load: compare rows of one run, not runs on different days.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def make_folder(root: Path, n: int, width: int, height: int, fmt: str = "jpg") -> Path:
    """``n`` images (``fmt``: ``jpg`` or ``png``) of ``width x height`` with two annotated boxes each, as a VOC train list."""
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
        image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
        if fmt == "png":
            image.save(root / "JPEGImages" / f"{i:04d}.png", compress_level=1)
        else:
            image.save(root / "JPEGImages" / f"{i:04d}.jpg", quality=90)
        (root / "Annotations" / f"{i:04d}.xml").write_text(
            f"<annotation><size><width>{width}</width><height>{height}</height></size>{''.join(objects)}</annotation>")
        names.append(f"{i:04d}")
    (root / "ImageSets" / "Main" / "train.txt").write_text("\n".join(names) + "\n")
    return root


LOADERS = {
    "full": "full decode (no size hint, no cache)",
    "draft": "reduced decode (JPEG draft), no cache",
    "cache": "reduced decode + resized cache (the default)",
}


def _child(mode: str, loader: str, root: str, min_size: int, max_size: int, iters: int, batch: int) -> dict:
    """One measurement, run in a fresh process (``--child``); ``RPNLAB_IMAGE_CACHE`` is set by the parent."""
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from rpnlab.config import DataConfig
    from rpnlab.data import build_dataset, imageio
    from rpnlab.detector.model import FasterRCNN  # noqa: F401 - every import before the baseline
    from rpnlab.engine.memory import PeakMemory, memory_status
    from rpnlab.engine.train import Trainer

    if loader == "full":  # the loader before reduced decoding: every pixel of the file
        imageio.decode_size_hint = lambda transforms: None
    # What importing torch and torchvision costs (their shared libraries: RssFile; their Python
    # modules and relocated data: RssAnon); the work below is measured from here.
    baseline = memory_status()
    cfg = DataConfig(dataset="voc", root=root, min_size=min_size, max_size=max_size, hflip_prob=0.0)
    dataset = build_dataset(cfg, "train")
    result: dict = {"mode": mode, "loader": loader, "baseline": baseline}
    with PeakMemory() as mem:
        if mode == "decode":
            seconds = []
            for _ in range(2):  # epoch 1 fills the cache, epoch 2 reads it
                start = time.perf_counter()
                for i in range(len(dataset)):
                    image, _ = dataset[i]  # decode + resize to min_size/max_size, boxes with it
                seconds.append((time.perf_counter() - start) / len(dataset))
            hint = (min_size, max_size) if loader != "full" else (None, None)
            decoded = imageio.load_image(dataset.image_path(0), *hint).shape
            result.update(images=len(dataset), seconds_per_image=seconds, decoded_size=f"{decoded[2]}x{decoded[1]}",
                          sample_size=f"{image.shape[2]}x{image.shape[1]}")
        else:
            import dataclasses

            from rpnlab.engine.presets import photos_configs

            model_cfg, _, train_cfg = photos_configs()  # the small backbone as --preset photos builds it
            model_cfg = dataclasses.replace(model_cfg, num_classes=dataset.num_classes)
            train_cfg = dataclasses.replace(train_cfg, batch_size=batch, device="cpu", max_iters=iters,
                                            out_dir=tempfile.mkdtemp(), checkpoint_every=1000)
            start = time.perf_counter()
            Trainer(model_cfg, cfg, train_cfg, progress=False, train_dataset=dataset).run()
            result.update(iterations=iters, batch=batch, seconds_per_iter=(time.perf_counter() - start) / iters)
    result["peak"] = mem.peak
    return result


def _run_child(mode: str, loader: str, root: Path, args, cache: Path, batch: int = 0) -> dict:
    env = dict(os.environ, RPNLAB_IMAGE_CACHE=str(cache) if loader == "cache" else "off")
    out = subprocess.run([sys.executable, __file__, "--child", mode, loader, str(root), str(args.min_size),
                          str(args.max_size), str(args.train_iters), str(batch)],
                         capture_output=True, text=True, check=True, env=env)
    row = json.loads(out.stdout.strip().splitlines()[-1])
    print(json.dumps(row))
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=12, help="JPEGs to write and read")
    parser.add_argument("--pngs", type=int, default=4, help="PNGs to write and read (0: skip)")
    parser.add_argument("--width", type=int, default=4000)
    parser.add_argument("--height", type=int, default=3000)
    parser.add_argument("--min-size", type=int, default=320)
    parser.add_argument("--max-size", type=int, default=512)
    parser.add_argument("--train-iters", type=int, default=6, help="training iterations in the memory run (0: skip)")
    parser.add_argument("--batch-sizes", default="2,4", help="batch sizes of the memory runs, comma-separated")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--child", nargs=7, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        mode, loader, root, lo, hi, iters, batch = args.child
        print(json.dumps(_child(mode, loader, root, int(lo), int(hi), int(iters), int(batch))))
        return 0
    batches = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    decode_rows, train_rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        folders = {"JPEG": (args.images, ("full", "draft", "cache"))}
        if args.pngs:
            folders["PNG"] = (args.pngs, ("full", "cache"))
        for kind, (n, loaders) in folders.items():
            start = time.perf_counter()
            root = make_folder(Path(tmp) / kind, n, args.width, args.height, kind.lower())
            print(f"wrote {n} {kind}s of {args.width}x{args.height} in {time.perf_counter() - start:.1f} s")
            for loader in loaders:
                decode_rows.append({"kind": kind, **_run_child("decode", loader, root, args, Path(tmp) / f"cache-{kind}")})
        if args.train_iters:
            for batch in batches:
                for loader in ("full", "cache"):
                    train_rows.append(_run_child("train", loader, Path(tmp) / "JPEG", args, Path(tmp) / "cache-train",
                                                 batch))
    base = decode_rows[0]["baseline"]
    print(f"\nimports (torch, torchvision, rpnlab): total RSS {base['rss_mb']:.0f} MB = RssAnon {base['anon_mb']:.0f} "
          f"+ RssFile {base['file_mb']:.0f} (+ RssShmem {base['shmem_mb']:.0f})")
    print(f"\n| {args.width}x{args.height} files, resize {args.min_size}/{args.max_size} | loader | ms/image epoch 1 "
          "| epoch 2 | decoded | peak RSS MB | peak RssAnon MB |")
    print("|---|---|---:|---:|---|---:|---:|")
    for r in decode_rows:
        s1, s2 = r["seconds_per_image"]
        print(f"| {r['images']} {r['kind']}s | {LOADERS[r['loader']]} | {1000 * s1:.0f} | {1000 * s2:.0f} | "
              f"{r['decoded_size']} | {r['peak']['rss_mb']:.0f} | {r['peak']['anon_mb']:.0f} |")
    if train_rows:
        print(f"\n| --preset photos (small backbone), {args.train_iters} training iterations, resize {args.min_size}/{args.max_size} "
              "| loader | s/iter | peak RSS MB (total) | peak RssAnon MB | peak RssFile MB | RssAnon above imports |")
        print("|---|---|---:|---:|---:|---:|---:|")
        for r in train_rows:
            p, b = r["peak"], r["baseline"]
            print(f"| batch {r['batch']} | {LOADERS[r['loader']]} | {r['seconds_per_iter']:.2f} | {p['rss_mb']:.0f} | "
                  f"{p['anon_mb']:.0f} | {p['file_mb']:.0f} | {p['anon_mb'] - b['anon_mb']:.0f} |")
    jpeg = {r["loader"]: r for r in decode_rows if r["kind"] == "JPEG"}
    print(f"\nJPEG speed-up of decode + sample, epoch 1: draft {jpeg['full']['seconds_per_image'][0] / jpeg['draft']['seconds_per_image'][0]:.1f}x; "
          f"epoch 2 with the cache: {jpeg['full']['seconds_per_image'][1] / jpeg['cache']['seconds_per_image'][1]:.0f}x")
    png = {r["loader"]: r for r in decode_rows if r["kind"] == "PNG"}
    if png:
        print(f"PNG speed-up, epoch 2 with the cache: {png['full']['seconds_per_image'][1] / png['cache']['seconds_per_image'][1]:.0f}x "
              f"(epoch 1: {png['full']['seconds_per_image'][0] / png['cache']['seconds_per_image'][0]:.2f}x)")
    if args.json:
        Path(args.json).write_text(json.dumps({"decode": decode_rows, "train": train_rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
