"""A few hundred "photos" without pretrained weights: the presets from scratch, and fine-tuning from an rpnlab checkpoint.

    python benchmarks/bench_photos.py                                   # 200 images, 6 epochs each
    python benchmarks/bench_photos.py --epochs 4 --min-size 240 --max-size 320 --json photos.json

No real photos and no COCO weights exist offline, so the benchmark makes a stand-in it can
measure honestly: a Pascal-VOC folder of ``--images`` scenes drawn by the synthetic generator
at photo-like size (``--size`` px, cropped to 4:3, JPEG), with *other classes* than the course's:
ellipses are ``plate`` and triangles ``sign``, while rectangles are left unlabelled (clutter a
detector must learn to ignore). 80% train, 20% test, other random streams than the synthetic
training set. On it, with the same number of epochs for every run (``--epochs``):

* ``plain``: what ``rpnlab train --dataset voc --root F`` gives (the synthetic CPU preset:
  128/256 px resize, anchors 16-64 px);
* ``photos``: ``--preset photos`` (320/512 px, anchors 32-256, flips + colour jitter, batch 4);
* ``scratch-same``: the synthetic preset's model, trained with the fine-tuning recipe of
  data/README.md (lr 0.01, batch 4, 100 warm-up iterations, cosine, flips) at the photos
  resize, from random weights: the control for the next row;
* ``finetune``: the same, starting from a checkpoint trained on the synthetic shapes
  (``--pretrain-iters`` iterations of the synthetic preset): every weight whose shape fits
  (backbone, RPN, box head) is loaded, the class-specific box predictor starts fresh. The CLI's
  ``--init`` takes torchvision detectors only, so this row does it in Python (``load_init``).

``--min-size`` / ``--max-size`` replace the photos resize in the last three rows (to fit a CPU
budget); the table says which were used. Each row prints test mAP@0.5, COCO mAP, proposal
recall at IoU 0.5, iterations and seconds. One seed: a difference smaller than a few points
of mAP is not one. Seconds depend on the machine's load.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PHOTO_CLASSES = {2: "plate", 3: "sign"}  # synthetic label -> photo class; 1 (rectangle) is clutter


def make_photo_folder(root: Path, n: int, size: int, seed: int = 1) -> Path:
    """``n`` scenes of ``size x 3/4 size`` px as a VOC folder: JPEGImages, Annotations, train/test lists."""
    from PIL import Image

    from rpnlab.data.synthetic import render_image

    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    height = size * 3 // 4
    names = []
    for i in range(n):
        scene = render_image(seed, "test", i, size)  # not the course's training stream
        pixels = np.ascontiguousarray(scene.image.transpose(1, 2, 0)[:height])
        objects = []
        for box, label in zip(scene.boxes.tolist(), scene.labels.tolist()):
            if label not in PHOTO_CLASSES:
                continue
            x1, y1, x2, y2 = box
            cy2 = min(y2, height)
            if cy2 - y1 < 0.5 * (y2 - y1) or x2 - x1 < 2:  # mostly cropped away: not annotated
                continue
            objects.append(f"<object><name>{PHOTO_CLASSES[label]}</name><difficult>0</difficult><bndbox>"
                           f"<xmin>{int(x1) + 1}</xmin><ymin>{int(y1) + 1}</ymin><xmax>{math.ceil(x2)}</xmax>"
                           f"<ymax>{math.ceil(cy2)}</ymax></bndbox></object>")
        name = f"photo{i:04d}"
        Image.fromarray(pixels).save(root / "JPEGImages" / f"{name}.jpg", quality=92)
        (root / "Annotations" / f"{name}.xml").write_text(
            f"<annotation><filename>{name}.jpg</filename><size><width>{size}</width><height>{height}</height>"
            f"<depth>3</depth></size>{''.join(objects)}</annotation>")
        names.append(name)
    cut = int(0.8 * n)
    (root / "ImageSets" / "Main" / "train.txt").write_text("\n".join(names[:cut]) + "\n")
    (root / "ImageSets" / "Main" / "test.txt").write_text("\n".join(names[cut:]) + "\n")
    return root


def load_init(model, checkpoint: str | Path) -> tuple[list[str], list[str]]:
    """Copy every weight of an rpnlab ``checkpoint`` whose name and shape match into ``model``.

    Returns ``(loaded, skipped)`` key lists; the skipped ones (the box predictor of another class
    count, an RPN head with other anchors) keep their fresh initialisation.
    """
    from rpnlab.engine.checkpoint import load_checkpoint

    state = load_checkpoint(checkpoint, map_location="cpu")["model"]
    own = model.state_dict()
    fits = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(fits, strict=False)
    return sorted(fits), sorted(set(own) - set(fits))


def _train_and_score(name: str, model_cfg, data_cfg, train_cfg, out: Path, init: Path | None = None) -> dict:
    from rpnlab.data import build_dataset
    from rpnlab.engine.train import Trainer, evaluate

    train_cfg = dataclasses.replace(train_cfg, out_dir=str(out / name), device="cpu", checkpoint_every=10**6)
    start = time.perf_counter()
    trainer = Trainer(model_cfg, data_cfg, train_cfg, progress=False)
    row: dict = {"run": name, "min_size": data_cfg.min_size, "max_size": data_cfg.max_size,
                 "batch_size": train_cfg.batch_size, "lr": train_cfg.lr}
    if init is not None:
        loaded, skipped = load_init(trainer.model, init)
        row.update(init_loaded=len(loaded), init_skipped=skipped)
    result = trainer.run()
    test = build_dataset(data_cfg, "test", train=False, classes=result.model.class_names)
    metrics = evaluate(result.model, test)
    row.update(iterations=result.iterations, train_seconds=result.seconds, seconds=time.perf_counter() - start,
               map_50=metrics["map_50"], map=metrics["map"], recall_50=metrics["recall_50"],
               ap_per_class=metrics["ap_per_class"])
    print(json.dumps(row), flush=True)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=200, help="scenes in the folder (80%% train, 20%% test)")
    parser.add_argument("--size", type=int, default=448, help="width of a scene in px (height 3/4 of it)")
    parser.add_argument("--epochs", type=int, default=6, help="the budget of every run, in epochs")
    parser.add_argument("--min-size", type=int, default=None, help="resize of the last three rows (default: the photos preset's)")
    parser.add_argument("--max-size", type=int, default=None)
    parser.add_argument("--pretrain-iters", type=int, default=600, help="synthetic-preset iterations of the checkpoint to fine-tune")
    parser.add_argument("--runs", default="plain,photos,scratch-same,finetune")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = set(runs) - {"plain", "photos", "scratch-same", "finetune"}
    if unknown:
        parser.error(f"--runs: unknown {', '.join(sorted(unknown))}")

    import torch

    from rpnlab.config import DataConfig
    from rpnlab.detector.model import synthetic_model_config
    from rpnlab.engine.presets import photos_configs
    from rpnlab.engine.train import synthetic_train_config

    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        start = time.perf_counter()
        root = make_photo_folder(out / "photos", args.images, args.size)
        print(f"wrote {args.images} scenes of {args.size}x{args.size * 3 // 4} in {time.perf_counter() - start:.1f} s")
        voc = {"dataset": "voc", "root": str(root)}
        _, photo_data, photo_train = photos_configs()
        photo_data = dataclasses.replace(photo_data, **voc)
        if args.min_size is not None:
            photo_data.min_size = args.min_size
        if args.max_size is not None:
            photo_data.max_size = args.max_size
        photo_data.validate()
        common = {"epochs": args.epochs, "seed": args.seed, "max_iters": None}
        recipe = dataclasses.replace(photo_train, lr=0.01, batch_size=4, warmup_iters=100, lr_schedule="cosine",
                                     **common)
        for name in runs:
            if name == "plain":
                rows.append(_train_and_score(name, synthetic_model_config(num_classes=2), DataConfig(**voc),
                                             synthetic_train_config(**common), out))
            elif name == "photos":
                model, _, train = photos_configs()
                rows.append(_train_and_score(name, dataclasses.replace(model, num_classes=2), photo_data,
                                             dataclasses.replace(train, **common), out))
            elif name == "scratch-same":
                rows.append(_train_and_score(name, synthetic_model_config(num_classes=2), photo_data, recipe, out))
            else:
                from rpnlab.engine.train import Trainer

                iters = args.pretrain_iters
                pre_cfg = synthetic_train_config(epochs=math.ceil(iters * 4 / 600), max_iters=iters, seed=args.seed,
                                                 out_dir=str(out / "pretrain"), device="cpu")
                t0 = time.perf_counter()
                pre = Trainer(synthetic_model_config(), DataConfig(), pre_cfg, progress=False).run()
                print(f"pretrained on the synthetic shapes: {pre.iterations} iterations in "
                      f"{time.perf_counter() - t0:.0f} s", flush=True)
                row = _train_and_score(name, synthetic_model_config(num_classes=2), photo_data, recipe, out,
                                       init=pre.checkpoint)
                row["pretrain_iterations"] = pre.iterations
                rows.append(row)

    print(f"\n| {args.images} scenes {args.size}x{args.size * 3 // 4} (plate, sign; rectangles unlabelled), "
          f"{args.epochs} epochs each, seed {args.seed} | resize | batch, lr | iterations | test mAP@0.5 | "
          "COCO mAP | recall@0.5 | seconds |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        label = r["run"] + (f" (from {r['pretrain_iterations']} synthetic iterations; {r['init_loaded']} tensors "
                            f"loaded, fresh: {', '.join(r['init_skipped'])})" if r["run"] == "finetune" else "")
        print(f"| {label} | {r['min_size']}/{r['max_size']} | {r['batch_size']}, {r['lr']} | {r['iterations']} | "
              f"{r['map_50']:.3f} | {r['map']:.3f} | {r['recall_50']:.3f} | {r['seconds']:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
