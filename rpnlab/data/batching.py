"""Batching dataset samples: ``[(image, target)]`` -> one zero-padded ``ImageBatch`` and the targets.

The padding itself (``ImageBatch``, ``pad_images``) is part of the detector
(``rpnlab.detector.images``): the model pads a plain list of images the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from rpnlab.detector.images import ImageBatch, pad_images

__all__ = ["ImageBatch", "collate", "pad_images"]


def collate(
    samples: Sequence[tuple[Tensor, dict[str, Any]]], size_divisible: int = 16
) -> tuple[ImageBatch, list[dict[str, Any]]]:
    """DataLoader ``collate_fn``: ``[(image, target)]`` -> ``(ImageBatch, [target])``.

    Use ``functools.partial(collate, size_divisible=32)`` for another stride.
    """
    if len(samples) == 0:
        raise ValueError("samples is empty: expected at least one (image, target) pair")
    images = [image for image, _ in samples]
    targets = [target for _, target in samples]
    return pad_images(images, size_divisible), targets
