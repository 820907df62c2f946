"""From a ``DataConfig`` to a dataset, and from a dataset to a seeded DataLoader."""

from __future__ import annotations

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
from rpnlab.data.voc import VOCDataset

__all__ = ["build_dataset", "build_loader", "coco_paths"]

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


def build_dataset(cfg: DataConfig, split: str, train: bool | None = None) -> Dataset:
    """The dataset ``cfg`` describes, for ``split``, with ``build_transforms(cfg, train)``.

    ``split`` is ``"train"``, ``"val"`` or ``"test"`` (VOC also ``"trainval"``: it is the
    ``ImageSets/Main`` list name). ``train`` (default: ``split`` is a training split) switches
    on augmentation.
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
    if cfg.dataset == "voc":
        return VOCDataset(cfg.root, image_set=split, transforms=transforms)
    image_dir, ann_file = coco_paths(cfg.root, split)
    return COCODataset(image_dir, ann_file, transforms=transforms)


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
