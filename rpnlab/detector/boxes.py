"""Box geometry: areas, IoU (full and memory-bounded), clipping, small-box removal, formats, BoxCoder.

Convention (as ``torchvision.ops``): a box is ``(x1, y1, x2, y2)`` in image pixels, stored in a
float tensor whose last dimension is 4. Widths are ``x2 - x1`` (no ``+ 1``, unlike py-faster-rcnn).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor

from rpnlab.detector import checks as _checks

__all__ = [
    "DEFAULT_BBOX_CLAMP",
    "BoxCoder",
    "box_area",
    "box_iou",
    "box_iou_chunks",
    "box_iou_reduce",
    "check_boxes",
    "clip_boxes",
    "cxcywh_to_xyxy",
    "remove_small_boxes",
    "xyxy_to_cxcywh",
]

#: The largest log-scale change a decoded box may make: exp(clamp) = 1000/16, as torchvision/detectron2.
DEFAULT_BBOX_CLAMP = math.log(1000.0 / 16)


def check_boxes(boxes: Tensor, name: str = "boxes", *, values: bool = True) -> Tensor:
    """Raise a ``ValueError`` naming ``name`` unless ``boxes`` is a float ``(..., 4)`` tensor.

    With ``values=True`` also require finite coordinates and ``x2 >= x1``, ``y2 >= y1``. Value
    checks read the tensor, which on a GPU waits for it: call them at a user-facing boundary, not
    in an inner loop. Returns ``boxes`` unchanged so the call can be inlined.
    """
    if not isinstance(boxes, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (..., 4), got {type(boxes).__name__}")
    if boxes.dim() == 0 or boxes.shape[-1] != 4:
        raise ValueError(f"{name} must have shape (..., 4) as x1, y1, x2, y2; got {tuple(boxes.shape)}")
    if not boxes.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {boxes.dtype}")
    if values and boxes.numel():
        if not bool(torch.isfinite(boxes).all()):
            bad = (~torch.isfinite(boxes)).any(-1).nonzero()[0].tolist()
            raise ValueError(f"{name} contains non-finite coordinates (first at index {bad})")
        inverted = (boxes[..., 2] < boxes[..., 0]) | (boxes[..., 3] < boxes[..., 1])
        if bool(inverted.any()):
            idx = inverted.nonzero()[0].tolist()
            raise ValueError(
                f"{name} has a box with x2 < x1 or y2 < y1 at index {idx}: "
                f"{boxes[tuple(idx)].tolist()} (expected x1, y1, x2, y2)"
            )
    return boxes


def box_area(boxes: Tensor) -> Tensor:
    """Areas of ``boxes: (..., 4)`` -> ``(...)``. Inverted boxes count as area 0."""
    check_boxes(boxes, values=False)
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def _inter_union(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    area_a, area_b = box_area(a), box_area(b)
    lt = torch.max(a[:, None, :2], b[None, :, :2])
    rb = torch.min(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter, area_a[:, None] + area_b[None, :] - inter


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Intersection over union of every pair: ``boxes1: (N, 4)``, ``boxes2: (M, 4)`` -> ``(N, M)``.

    Where the union is zero (two zero-area boxes) the IoU is 0, not NaN (torchvision gives NaN there).
    A pair with a NaN coordinate gets NaN, never a plausible 0. This sits in the matching hot
    path, so values are checked only with value checks on (``rpnlab.detector.checks``): then a
    NaN/inf box is a ``ValueError`` naming ``boxes1`` or ``boxes2``.
    """
    check_boxes(boxes1, "boxes1", values=False)
    check_boxes(boxes2, "boxes2", values=False)
    if boxes1.dim() != 2 or boxes2.dim() != 2:
        raise ValueError(
            f"box_iou expects boxes1 (N, 4) and boxes2 (M, 4); got {tuple(boxes1.shape)} and {tuple(boxes2.shape)}"
        )
    if _checks._enabled:
        _checks.check_finite(boxes1, "boxes1")
        _checks.check_finite(boxes2, "boxes2")
    inter, union = _inter_union(boxes1, boxes2)
    # union >= 0, so "== 0" picks the same pairs as "not > 0" did, except NaN: a NaN box's IoU
    # stays NaN instead of a plausible 0, at no extra cost.
    return torch.where(union == 0, torch.zeros_like(inter), inter / union.clamp(min=torch.finfo(inter.dtype).tiny))


def box_iou_chunks(boxes1: Tensor, boxes2: Tensor, chunk_size: int = 65536) -> Iterator[tuple[int, Tensor]]:
    """Yield ``(start, iou)`` with ``iou = box_iou(boxes1[start:start + chunk_size], boxes2)``.

    Peak memory is ``chunk_size x M`` floats instead of ``N x M``.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    for start in range(0, boxes1.shape[0], chunk_size):
        yield start, box_iou(boxes1[start : start + chunk_size], boxes2)


def box_iou_reduce(
    boxes1: Tensor, boxes2: Tensor, chunk_size: int = 65536
) -> tuple[Tensor, Tensor, Tensor]:
    """The reductions a matcher needs, without the full ``(N, M)`` IoU matrix in memory.

    Args:
        boxes1: ``(N, 4)``, e.g. anchors (N may be millions).
        boxes2: ``(M, 4)``, e.g. ground-truth boxes.
    Returns:
        ``row_max: (N,)`` best IoU of each boxes1 row, ``row_argmax: (N,)`` its column (0 when
        M == 0), and ``col_max: (M,)`` best IoU of each boxes2 box over all rows.
    """
    n, m = boxes1.shape[0], boxes2.shape[0]
    row_max = boxes1.new_zeros(n)
    row_argmax = torch.zeros(n, dtype=torch.int64, device=boxes1.device)
    col_max = boxes2.new_zeros(m)
    if m == 0 or n == 0:
        return row_max, row_argmax, col_max
    for start, iou in box_iou_chunks(boxes1, boxes2, chunk_size):
        values, idx = iou.max(dim=1)
        row_max[start : start + iou.shape[0]] = values
        row_argmax[start : start + iou.shape[0]] = idx
        col_max = torch.maximum(col_max, iou.max(dim=0).values)
    return row_max, row_argmax, col_max


def clip_boxes(boxes: Tensor, image_size: tuple[int, int]) -> Tensor:
    """Clip ``boxes: (..., 4)`` to an image of ``image_size = (height, width)``."""
    check_boxes(boxes, values=False)
    h, w = image_size
    x = boxes[..., 0::2].clamp(min=0, max=w)
    y = boxes[..., 1::2].clamp(min=0, max=h)
    return torch.stack((x[..., 0], y[..., 0], x[..., 1], y[..., 1]), dim=-1)


def remove_small_boxes(boxes: Tensor, min_size: float) -> Tensor:
    """Indices ``(K,)`` of the boxes in ``boxes: (N, 4)`` whose width and height are both >= ``min_size``."""
    check_boxes(boxes, values=False)
    if min_size < 0:
        raise ValueError(f"min_size must be >= 0, got {min_size}")
    ws, hs = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    return torch.where((ws >= min_size) & (hs >= min_size))[0]


def xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """``(..., 4)`` corners -> ``(..., 4)`` centre x, centre y, width, height."""
    check_boxes(boxes, values=False)
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack(((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1), dim=-1)


def cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """``(..., 4)`` centre x, centre y, width, height -> ``(..., 4)`` corners."""
    check_boxes(boxes, values=False)
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), dim=-1)


class BoxCoder:
    """Encode boxes as the paper's offsets ``(tx, ty, tw, th)`` relative to reference boxes, and back.

    ``tx = wx * (x - xa) / wa``, ``ty = wy * (y - ya) / ha``, ``tw = ww * log(w / wa)``,
    ``th = wh * log(h / ha)`` with centres ``x, y`` and sizes ``w, h`` (Ren et al. 2015, eq. 2).
    Note x is divided by the anchor *width* and y by its *height*.

    Args:
        weights: ``(wx, wy, ww, wh)``; ``(1, 1, 1, 1)`` for the RPN, ``(10, 10, 5, 5)`` for the
            Fast R-CNN head (torchvision, detectron2), which scales targets to about unit variance.
        clamp: upper bound on ``tw / ww`` and ``th / wh`` when decoding, so ``exp`` cannot overflow.
    """

    def __init__(self, weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0), clamp: float = DEFAULT_BBOX_CLAMP):
        if len(weights) != 4 or any(not math.isfinite(w) or w <= 0 for w in weights):
            raise ValueError(f"weights must be 4 positive finite numbers, got {tuple(weights)}")
        if not clamp > 0:
            raise ValueError(f"clamp must be positive, got {clamp}")
        self.weights = tuple(float(w) for w in weights)
        self.clamp = float(clamp)

    def encode(self, anchors: Tensor, gt_boxes: Tensor) -> Tensor:
        """Offsets of ``gt_boxes: (..., 4)`` relative to ``anchors: (..., 4)`` -> ``(..., 4)``.

        Same argument order as detectron2's ``get_deltas(src, target)``; torchvision's
        ``BoxCoder.encode_single(reference_boxes, proposals)`` takes them the other way round.
        Anchors must have positive width and height. ``anchors`` may broadcast against
        ``gt_boxes`` (e.g. ``(A, 4)`` shared by a batch ``(B, A, 4)``): their centres and sizes
        are then computed once.
        """
        check_boxes(anchors, "anchors", values=False)
        check_boxes(gt_boxes, "gt_boxes", values=False)
        try:
            shape = torch.broadcast_shapes(anchors.shape, gt_boxes.shape)
        except RuntimeError:
            shape = None
        if shape != gt_boxes.shape:
            raise ValueError(
                f"anchors must have the shape of gt_boxes or broadcast to it, got {tuple(anchors.shape)} "
                f"and {tuple(gt_boxes.shape)}"
            )
        # Computed on planar copies (4, ...) so that every step is a contiguous pass, then moved
        # back: stacking four strided (...) results cost as much as the arithmetic itself. Same
        # operations in the same order as the formulas above (a weight of 1 is skipped: x * 1 == x).
        dtype = torch.promote_types(anchors.dtype, gt_boxes.dtype)
        a = anchors.to(dtype).movedim(-1, 0).contiguous()  # (4, ...) broadcasting against g
        g = gt_boxes.to(dtype).movedim(-1, 0).contiguous()
        out = torch.empty(g.shape, dtype=dtype, device=g.device)
        for i, (lo, hi) in enumerate(((0, 2), (1, 3))):  # x, then y
            a_size = a[hi] - a[lo]
            torch.sub((g[lo] + g[hi]) / 2, (a[lo] + a[hi]) / 2, out=out[i])
            if self.weights[i] != 1.0:
                out[i].mul_(self.weights[i])
            out[i].div_(a_size)
            torch.div(g[hi] - g[lo], a_size, out=out[i + 2]).log_()
            if self.weights[i + 2] != 1.0:
                out[i + 2].mul_(self.weights[i + 2])
        return out.movedim(0, -1).contiguous()

    def decode(self, deltas: Tensor, anchors: Tensor) -> Tensor:
        """Apply ``deltas: (..., 4)`` (or ``(N, 4k)`` for k classes) to ``anchors: (N, 4)`` -> boxes.

        The output has the shape of ``deltas``. Size offsets are clamped at ``clamp`` first.
        """
        check_boxes(anchors, "anchors", values=False)
        if deltas.shape[-1] % 4 != 0:
            raise ValueError(f"deltas must have a last dimension that is a multiple of 4, got {tuple(deltas.shape)}")
        if deltas.shape[-1] != 4 and deltas.shape[:-1] != anchors.shape[:-1]:
            raise ValueError(
                f"class-specific deltas {tuple(deltas.shape)} need anchors of shape {(*deltas.shape[:-1], 4)}, "
                f"got {tuple(anchors.shape)}"
            )
        k = deltas.shape[-1] // 4
        d = deltas.reshape(*deltas.shape[:-1], k, 4)
        a = xyxy_to_cxcywh(anchors.to(deltas.dtype)).unsqueeze(-2)
        wx, wy, ww, wh = self.weights
        dx, dy = d[..., 0] / wx, d[..., 1] / wy
        dw = (d[..., 2] / ww).clamp(max=self.clamp)
        dh = (d[..., 3] / wh).clamp(max=self.clamp)
        cx = dx * a[..., 2] + a[..., 0]
        cy = dy * a[..., 3] + a[..., 1]
        w = torch.exp(dw) * a[..., 2]
        h = torch.exp(dh) * a[..., 3]
        boxes = torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=-1)
        return boxes.reshape(deltas.shape)

    def __repr__(self) -> str:
        return f"BoxCoder(weights={self.weights}, clamp={self.clamp:.4f})"
