"""COCO-style detection data: a folder of images and one JSON annotation file.

The JSON is read with pycocotools through ``torchvision.datasets.CocoDetection``; this module
turns it into rpnlab targets:

* COCO category ids (1..90 with gaps) become contiguous labels ``1..C`` in ``category_ids``
  order (``dataset.category_ids[label - 1]`` maps back for COCO-format results);
* boxes ``[x, y, w, h]`` become ``x1, y1, x2, y2 = x, y, x + w, y + h``;
* crowd regions (``iscrowd=1``, one box around many objects) are skipped, or kept and marked
  ``difficult`` with ``crowd="difficult"`` so VOC-style evaluation ignores matches to them.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.datasets import CocoDetection

from rpnlab.data.annotations import BoxPolicy, make_target
from rpnlab.data.imagecache import ResizedImageCache, resolve_image_cache
from rpnlab.data.imageio import load_annotated_image, read_image_size

__all__ = ["COCODataset"]

_CROWD = ("skip", "difficult")


def _load_coco(image_dir: Path, ann_file: Path) -> CocoDetection:
    """torchvision's COCO dataset (for its pycocotools index), malformed files as ``ValueError``."""
    try:
        # pycocotools prints progress lines; keep notebook and test output clean.
        with contextlib.redirect_stdout(io.StringIO()):
            return CocoDetection(str(image_dir), str(ann_file))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{ann_file}: malformed JSON ({exc})") from exc
    except (KeyError, TypeError, AssertionError, AttributeError) as exc:
        raise ValueError(f"{ann_file}: not a COCO annotation file (problem: {exc!r})") from exc


def _bbox(ann: dict, ann_file: Path) -> tuple[float, float, float, float]:
    bbox = ann.get("bbox")
    ok = (
        isinstance(bbox, (list, tuple))
        and len(bbox) == 4
        and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            for v in bbox
        )
    )
    if not ok:
        raise ValueError(
            f"{ann_file}: annotation id={ann.get('id')!r} has bbox={bbox!r}, expected four numbers [x, y, w, h]"
        )
    x, y, w, h = (float(v) for v in bbox)
    return x, y, x + w, y + h


@dataclass
class _Record:
    coco_id: int
    file_name: str
    size: tuple[int, int]  # (h, w)
    boxes: Tensor  # (M, 4) float32 xyxy
    labels: Tensor  # (M,) int64 in 1..C
    difficult: Tensor  # (M,) bool


class COCODataset(Dataset):
    """A COCO-format detection set as ``(image, target)`` samples.

    Args:
        image_dir: folder the ``file_name`` entries are relative to (e.g. ``coco/val2017``).
        ann_file: the instances JSON (e.g. ``coco/annotations/instances_val2017.json``).
        transforms: callable ``(image, target) -> (image, target)``.
        on_invalid: ``"clip"``, ``"drop"`` or ``"raise"`` for boxes outside the image or of zero
            size (see ``rpnlab.data.annotations``).
        category_ids: COCO category ids to keep, in label order (default: all, sorted by id);
            annotations of other categories are skipped.
        crowd: ``"skip"`` crowd annotations or mark them ``"difficult"``.
        classes: category *names* to keep, in label order (instead of ``category_ids``); a name
            the file does not have is a ``ValueError`` listing the names it has.
        unknown_classes: ``"skip"`` annotations of other categories, or ``"raise"`` a
            ``ValueError`` naming them (a model's classes must cover the data it is scored on).
        image_cache: ``"default"`` (``default_image_cache()``: on, in ``data/cache/resized``
            unless ``RPNLAB_IMAGE_CACHE`` says otherwise), a ``ResizedImageCache`` or a folder
            for one, or ``None``: where large images are kept resized after their first decode
            (``rpnlab.data.imagecache``).

    ``target["image_id"]`` is the COCO image id, as COCO evaluation wants it. Images without
    annotations are kept (``boxes`` of shape ``(0, 4)``).
    """

    def __init__(
        self,
        image_dir: str | os.PathLike,
        ann_file: str | os.PathLike,
        transforms: Callable | None = None,
        on_invalid: str = "clip",
        category_ids: Sequence[int] | None = None,
        crowd: str = "skip",
        classes: Sequence[str] | None = None,
        unknown_classes: str = "skip",
        image_cache: ResizedImageCache | None | str = "default",
    ):
        self.image_dir, self.ann_file = Path(image_dir).expanduser(), Path(ann_file).expanduser()
        if not self.ann_file.is_file():
            raise FileNotFoundError(f"COCO annotation file not found: {self.ann_file}")
        if not self.image_dir.is_dir():
            raise FileNotFoundError(f"COCO image folder not found: {self.image_dir}")
        if crowd not in _CROWD:
            raise ValueError(
                f"crowd={crowd!r} is invalid: expected one of {', '.join(map(repr, _CROWD))}"
            )
        policy = BoxPolicy(on_invalid)
        self.transforms = transforms
        self.image_cache = resolve_image_cache(image_cache)
        self.on_invalid = on_invalid
        self.crowd = crowd
        self.coco = _load_coco(
            self.image_dir, self.ann_file
        ).coco  # pycocotools COCO, for evaluation

        known = sorted(self.coco.cats)
        if unknown_classes not in ("skip", "raise"):
            raise ValueError(f"unknown_classes={unknown_classes!r} is invalid: expected 'skip' or 'raise'")
        if classes is not None:
            if category_ids is not None:
                raise ValueError("pass classes= (names) or category_ids=, not both")
            by_name = {str(self.coco.cats[c].get("name", c)): c for c in known}
            missing = [n for n in classes if n not in by_name]
            if missing:
                raise ValueError(f"{self.ann_file}: no category named {', '.join(map(repr, missing))}; "
                                 f"its categories: {', '.join(by_name)}")
            category_ids = [by_name[n] for n in classes]
        if category_ids is None:
            category_ids = known
        unknown = [c for c in category_ids if c not in self.coco.cats]
        if unknown or not category_ids or len(set(category_ids)) != len(category_ids):
            raise ValueError(
                f"category_ids={list(category_ids)!r} is invalid: expected distinct ids among {known}"
            )
        self.category_ids = tuple(int(c) for c in category_ids)
        self.classes = tuple(str(self.coco.cats[c].get("name", c)) for c in self.category_ids)
        self._label_of = {c: i + 1 for i, c in enumerate(self.category_ids)}
        self._records = [self._read_record(i, policy) for i in sorted(self.coco.imgs)]
        if unknown_classes == "raise":
            used = {a.get("category_id") for a in self.coco.anns.values()} - set(self.category_ids)
            if used:
                names = sorted(str(self.coco.cats[c].get("name", c)) for c in used if c in self.coco.cats)
                raise ValueError(f"{self.ann_file}: annotations of categories that are not in "
                                 f"classes={list(self.classes)}: {', '.join(names)}")
        policy.warn(str(self.ann_file))

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_ids(self) -> list[int]:
        """COCO image ids, in sample order."""
        return [r.coco_id for r in self._records]

    def _read_record(self, image_id: int, policy: BoxPolicy) -> _Record:
        info = self.coco.imgs[image_id]
        file_name = info.get("file_name")
        if not isinstance(file_name, str):
            raise ValueError(f"{self.ann_file}: image id={image_id} has no file_name")  # noqa: TRY004
        if "height" in info and "width" in info:
            size = (int(info["height"]), int(info["width"]))
        else:
            size = read_image_size(self.image_dir / file_name)
        boxes, labels, difficult = [], [], []
        for ann in self.coco.imgToAnns.get(image_id, []):
            category = ann.get("category_id")
            if category not in self.coco.cats:
                raise ValueError(
                    f"{self.ann_file}: annotation id={ann.get('id')!r} has category_id={category!r}, "
                    "which is not among the categories"
                )
            if category not in self._label_of:
                continue
            box = _bbox(ann, self.ann_file)
            crowd = bool(ann.get("iscrowd", 0))
            if crowd and self.crowd == "skip":
                continue
            boxes.append(box)
            labels.append(self._label_of[category])
            difficult.append(crowd)
        box_tensor = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
        source = f"{self.ann_file} (image id={image_id}, {file_name})"
        keep, box_tensor = policy(box_tensor, size, source)
        return _Record(
            image_id,
            file_name,
            size,
            box_tensor[keep],
            torch.tensor(labels, dtype=torch.int64)[keep],
            torch.tensor(difficult, dtype=torch.bool)[keep],
        )

    def image_path(self, index: int) -> Path:
        """The image file of sample ``index``."""
        return self.image_dir / self._records[index].file_name

    def __len__(self) -> int:
        return len(self._records)

    def get_target(self, index: int) -> dict[str, Any]:
        """The annotation of sample ``index`` (no image read, no transforms)."""
        r = self._records[index]
        return make_target(
            r.boxes.clone(), r.labels.clone(), r.difficult.clone(), r.coco_id, r.size
        )

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Any]]:
        return load_annotated_image(self.image_path(index), self.get_target(index), str(self.ann_file), self.transforms,
                                    self.image_cache)

    def __repr__(self) -> str:
        return (
            f"COCODataset(image_dir={str(self.image_dir)!r}, ann_file={str(self.ann_file)!r}, "
            f"images={len(self)}, classes={self.num_classes})"
        )
