"""From a ``DataConfig`` to a dataset, and from a dataset to a seeded DataLoader.

Also what a data folder offers: its splits (``available_splits``, ``evaluation_split``) and its
classes (``resolve_classes``: ``--classes``, else the training annotations or COCO categories).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from rpnlab.config import DataConfig
from rpnlab.data.batching import collate
from rpnlab.data.coco import COCODataset
from rpnlab.data.synthetic import SyntheticShapes
from rpnlab.data.transforms import build_transforms
from rpnlab.data.voc import VOCDataset, voc_class_names, voc_splits

__all__ = [
    "available_splits",
    "build_dataset",
    "build_loader",
    "coco_paths",
    "evaluation_split",
    "parse_classes",
    "resolve_classes",
    "training_split",
]

_TRAIN_SPLITS = ("train", "trainval")


def coco_paths(root: str | Path, split: str) -> tuple[Path, Path]:
    """``(image_dir, ann_file)`` of ``split`` under a COCO root.

    Tries the official layout ``<split>2017/`` + ``annotations/instances_<split>2017.json``,
    then ``<split>/`` + ``annotations/<split>.json``. Raises ``FileNotFoundError`` naming both.
    """
    root = Path(root).expanduser()
    layouts = [
        (root / f"{split}2017", root / "annotations" / f"instances_{split}2017.json"),
        (root / split, root / "annotations" / f"{split}.json"),
    ]
    for image_dir, ann_file in layouts:
        if ann_file.is_file():
            return image_dir, ann_file
    expected = " or ".join(str(ann) for _, ann in layouts)
    raise FileNotFoundError(f"no COCO annotations for split {split!r}: expected {expected}")


def available_splits(cfg: DataConfig) -> list[str]:
    """The splits ``cfg``'s data has: VOC's lists in ``ImageSets/Main``, COCO's annotation files
    (either layout of ``coco_paths``), ``train``/``val``/``test`` for the synthetic shapes."""
    cfg.validate()
    if cfg.dataset == "synthetic":
        return ["train", "val", "test"]
    if cfg.dataset == "voc":
        return voc_splits(cfg.root)
    root = Path(cfg.root).expanduser()
    found = {p.name[len("instances_"):-len("2017.json")] for p in root.glob("annotations/instances_*2017.json")}
    found |= {p.stem for p in root.glob("annotations/*.json") if not p.stem.startswith("instances_")}
    return sorted(found)


def check_split(cfg: DataConfig, split: str) -> None:
    """Raise ``ValueError`` listing the splits the data has when ``split`` is not one of them."""
    splits = available_splits(cfg)
    if split not in splits:
        layout = (f" (expected {cfg.root}/annotations/instances_{split}2017.json or "
                  f"{cfg.root}/annotations/{split}.json)" if cfg.dataset == "coco" else "")
        raise ValueError(f"split {split!r} not found in the {cfg.dataset} data at {cfg.root}: "
                         f"splits found: {', '.join(splits) or 'none'}{layout}")


def evaluation_split(cfg: DataConfig) -> str:
    """``"val"`` if the data has it, else ``"test"``; a ``ValueError`` listing the splits otherwise."""
    splits = available_splits(cfg)
    for split in ("val", "test"):
        if split in splits:
            return split
    raise ValueError(f"the {cfg.dataset} data at {cfg.root} has no 'val' or 'test' split to evaluate on: "
                     f"splits found: {', '.join(splits) or 'none'}; pass --split")


def training_split(cfg: DataConfig) -> str:
    """``"train"`` if the data has it, else ``"trainval"``; a ``ValueError`` listing the splits otherwise."""
    splits = available_splits(cfg)
    for split in _TRAIN_SPLITS:
        if split in splits:
            return split
    raise ValueError(f"the {cfg.dataset} data at {cfg.root} has no 'train' or 'trainval' split: "
                     f"splits found: {', '.join(splits) or 'none'}")


def parse_classes(spec: str) -> tuple[str, ...]:
    """``"cat,dog"`` -> ``("cat", "dog")``; a path to an existing file -> its non-empty lines.

    Raises ``ValueError`` for an empty list or a repeated name.
    """
    path = Path(spec).expanduser()
    if path.is_file():
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        where = f"classes file {path}"
    elif path.suffix in (".txt", ".names", ".csv") or "/" in spec:
        raise FileNotFoundError(f"classes file not found: {path} (or give the names: --classes a,b,c)")
    else:
        names = [n.strip() for n in spec.split(",") if n.strip()]
        where = f"classes={spec!r}"
    if not names:
        raise ValueError(f"{where} names no class")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"{where} repeats {', '.join(map(repr, repeated))}")
    return tuple(names)


def resolve_classes(cfg: DataConfig) -> tuple[str, ...]:
    """The foreground class names a model trained on ``cfg``'s data gets, label ``i + 1`` = ``[i]``.

    ``cfg.classes`` when set; else for VOC the names used in the training split's annotations
    (sorted), for COCO the training file's categories (by id), for the synthetic data its shapes.
    """
    cfg.validate()
    if cfg.classes is not None:
        return parse_classes(cfg.classes)
    if cfg.dataset == "synthetic":
        from rpnlab.data.synthetic import SHAPE_CLASSES

        return tuple(SHAPE_CLASSES)
    split = training_split(cfg) if cfg.dataset == "voc" else "train"
    if cfg.dataset == "voc":
        return voc_class_names(cfg.root, split)
    import json

    _, ann_file = coco_paths(cfg.root, split)
    try:
        categories = json.loads(ann_file.read_text()).get("categories", [])
        return tuple(str(c["name"]) for c in sorted(categories, key=lambda c: c["id"]))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{ann_file}: cannot read the category names ({err!r})") from err


def build_dataset(
    cfg: DataConfig, split: str, train: bool | None = None, classes: Sequence[str] | None = None
) -> Dataset:
    """The dataset ``cfg`` describes, for ``split``, with ``build_transforms(cfg, train)``.

    ``split`` is ``"train"``, ``"val"`` or ``"test"`` (VOC: any list name in ``ImageSets/Main``);
    one the data lacks is a ``ValueError`` listing the splits found. ``train`` (default: ``split``
    is a training split) switches on augmentation. ``classes``: the class names of a trained
    model (from its checkpoint); objects of other classes in the data are then an error, unless
    ``cfg.classes`` picked a subset on purpose. Default: ``resolve_classes(cfg)``.
    """
    cfg.validate()
    train = split in _TRAIN_SPLITS if train is None else train
    transforms = build_transforms(cfg, train=train)
    if cfg.dataset == "synthetic":
        num_images = {"train": cfg.num_train, "val": cfg.num_val, "test": cfg.num_test}
        if split not in num_images:
            raise ValueError(
                f"split={split!r} is invalid for the synthetic dataset: expected 'train', 'val' or 'test'"
            )
        return SyntheticShapes(
            split,
            num_images=num_images[split],
            image_size=cfg.image_size,
            seed=cfg.seed,
            root=cfg.root,
            transforms=transforms,
        )
    check_split(cfg, split)
    unknown = "skip" if classes is None or cfg.classes is not None else "raise"
    if classes is not None:
        names = tuple(classes)
    elif cfg.dataset == "coco" and cfg.classes is None:
        names = None  # every category of this split's file
    else:
        names = resolve_classes(cfg)
    if cfg.dataset == "voc":
        return VOCDataset(cfg.root, image_set=split, classes=names, transforms=transforms, unknown_classes=unknown)
    image_dir, ann_file = coco_paths(cfg.root, split)
    return COCODataset(image_dir, ann_file, transforms=transforms, classes=names, unknown_classes=unknown)


def build_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    num_workers: int = 0,
    distributed: bool = False,
    size_divisible: int = 16,
    drop_last: bool = False,
    pin_memory: bool = False,
) -> DataLoader[Any]:
    """A DataLoader yielding ``(ImageBatch, [target])`` in a reproducible order.

    The shuffle order comes from a ``torch.Generator`` seeded with ``seed`` (and so do the
    per-worker seeds). With ``distributed=True`` (an initialised ``torch.distributed`` process
    group) a ``DistributedSampler`` gives each rank its share; call
    ``loader.sampler.set_epoch(epoch)`` every epoch so the shuffle changes between epochs.
    Random transforms in the main process (``num_workers=0``) draw from the global torch RNG:
    seed it with ``torch.manual_seed``.
    """
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size={batch_size!r} is invalid: expected a positive integer")
    if not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers={num_workers!r} is invalid: expected an integer >= 0")
    generator = torch.Generator().manual_seed(int(seed))
    sampler = None
    if distributed:
        sampler = DistributedSampler(dataset, shuffle=shuffle, seed=int(seed), drop_last=drop_last)
        shuffle = False  # the sampler shuffles
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=partial(collate, size_divisible=size_divisible),
        generator=generator,
        drop_last=drop_last,
        pin_memory=pin_memory,
    )
