"""Detection data: the embedded synthetic shapes, Pascal VOC and COCO readers, transforms, batching.

Every dataset yields ``(image, target)``: ``image`` is ``(3, H, W)`` float32 RGB in ``[0, 1]``;
``target`` is a dict with ``boxes (M, 4)`` float32 xyxy pixels, ``labels (M,)`` int64 in ``1..C``
(0 is background and never a label), ``difficult (M,)`` bool, ``image_id`` int and
``orig_size`` ``(H, W)``. Datasets have ``.classes`` (the C foreground names) and ``.num_classes``.
"""

from rpnlab.data.annotations import ON_INVALID, AnnotationWarning
from rpnlab.data.batching import ImageBatch, collate, pad_images
from rpnlab.data.build import build_dataset, build_loader, coco_paths
from rpnlab.data.coco import COCODataset
from rpnlab.data.imageio import load_image
from rpnlab.data.synthetic import SHAPE_CLASSES, SyntheticShapes, render_image
from rpnlab.data.transforms import (
    CPU_PRESETS,
    PAPER_PRESET,
    Compose,
    RandomHorizontalFlip,
    RandomVerticalFlip,
    ResizeShortestSide,
    build_transforms,
)
from rpnlab.data.voc import VOC_CLASSES, VOCDataset

__all__ = [
    "CPU_PRESETS",
    "ON_INVALID",
    "PAPER_PRESET",
    "SHAPE_CLASSES",
    "VOC_CLASSES",
    "AnnotationWarning",
    "COCODataset",
    "Compose",
    "ImageBatch",
    "RandomHorizontalFlip",
    "RandomVerticalFlip",
    "ResizeShortestSide",
    "SyntheticShapes",
    "VOCDataset",
    "build_dataset",
    "build_loader",
    "build_transforms",
    "coco_paths",
    "collate",
    "load_image",
    "pad_images",
    "render_image",
]
