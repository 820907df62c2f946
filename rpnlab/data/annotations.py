"""Shared handling of real-world annotations: the target dict and boxes that do not fit the image.

Annotation files contain boxes that reach past the image border or have no width or height.
``BoxPolicy`` applies one rule to all of a dataset's boxes (``on_invalid``):

* ``"clip"``: clip every box to the image and drop those left with zero width or height;
* ``"drop"``: drop every box that reaches outside the image or has zero size;
* ``"raise"``: raise a ``ValueError`` naming the file and the box.

It counts what it changed, and the dataset emits one ``AnnotationWarning`` with the totals.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from rpnlab.detector.boxes import clip_boxes

__all__ = ["ON_INVALID", "AnnotationWarning", "BoxPolicy", "make_target"]

ON_INVALID = ("clip", "drop", "raise")


class AnnotationWarning(UserWarning):
    """Boxes of a dataset were clipped or dropped while loading it."""


def make_target(
    boxes: Tensor, labels: Tensor, difficult: Tensor, image_id: int, orig_size: tuple[int, int]
) -> dict[str, Any]:
    """The target dict every rpnlab dataset returns, with its dtypes fixed.

    boxes ``(M, 4)`` float32 xyxy pixels, labels ``(M,)`` int64 in ``1..C``, difficult ``(M,)``
    bool, image_id ``int``, orig_size ``(H, W)`` of the image as stored on disk.
    """
    return {
        "boxes": boxes.to(torch.float32).reshape(-1, 4),
        "labels": labels.to(torch.int64).reshape(-1),
        "difficult": difficult.to(torch.bool).reshape(-1),
        "image_id": int(image_id),
        "orig_size": (int(orig_size[0]), int(orig_size[1])),
    }


class BoxPolicy:
    """Apply ``on_invalid`` to one image's boxes at a time, keeping count for one summary warning."""

    def __init__(self, on_invalid: str = "clip"):
        if on_invalid not in ON_INVALID:
            raise ValueError(
                f"on_invalid={on_invalid!r} is invalid: expected one of {', '.join(map(repr, ON_INVALID))}"
            )
        self.on_invalid = on_invalid
        self.clipped = 0  # boxes moved inside the image ("clip")
        self.dropped_outside = 0  # boxes reaching outside the image that were dropped ("drop")
        self.dropped_empty = 0  # zero-size boxes dropped (originally or after clipping)

    def __call__(
        self, boxes: Tensor, image_size: tuple[int, int], source: str
    ) -> tuple[Tensor, Tensor]:
        """``boxes: (M, 4)`` in an image of ``image_size = (h, w)`` -> ``(keep (M,) bool, boxes (M, 4))``.

        ``source`` names the annotation file in error messages. The returned boxes are the
        clipped ones under ``"clip"`` and the inputs otherwise; use them as ``boxes[keep]``.
        """
        h, w = image_size
        outside = (boxes[:, 0] < 0) | (boxes[:, 1] < 0) | (boxes[:, 2] > w) | (boxes[:, 3] > h)
        empty = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
        if self.on_invalid == "raise":
            bad = (outside | empty).nonzero().flatten().tolist()
            if bad:
                i = bad[0]
                why = (
                    "has zero (or negative) width or height"
                    if empty[i]
                    else f"reaches outside the {w}x{h} image"
                )
                raise ValueError(
                    f"{source}: box {i} {boxes[i].tolist()} (x1, y1, x2, y2) {why}; "
                    "pass on_invalid='clip' or 'drop' to load it anyway"
                )
            return torch.ones(len(boxes), dtype=torch.bool), boxes
        if self.on_invalid == "drop":
            keep = ~(outside | empty)
            self.dropped_outside += int((outside & ~empty).sum())
            self.dropped_empty += int(empty.sum())
            return keep, boxes
        clipped = clip_boxes(boxes, (h, w))
        empty = (clipped[:, 2] <= clipped[:, 0]) | (clipped[:, 3] <= clipped[:, 1])
        self.clipped += int((outside & ~empty).sum())
        self.dropped_empty += int(empty.sum())
        return ~empty, clipped

    def message(self, where: str) -> str | None:
        """The summary line, or ``None`` when nothing was changed."""
        if self.on_invalid == "clip" and (self.clipped or self.dropped_empty):
            return f"clipped {self.clipped} boxes, dropped {self.dropped_empty} zero-size boxes in {where}"
        if self.on_invalid == "drop" and (self.dropped_outside or self.dropped_empty):
            return (
                f"dropped {self.dropped_outside} boxes outside the image and "
                f"{self.dropped_empty} zero-size boxes in {where}"
            )
        return None

    def warn(self, where: str, stacklevel: int = 3) -> None:
        """Emit the summary as one ``AnnotationWarning`` (nothing when nothing changed)."""
        message = self.message(where)
        if message is not None:
            warnings.warn(message, AnnotationWarning, stacklevel=stacklevel)
