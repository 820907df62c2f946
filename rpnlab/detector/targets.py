"""Anchor targets for a whole batch at once: the fast path of ``rpnlab.detector.matching``.

``matching.label_anchors`` labels one image at a time and computes the IoU matrix in chunks,
twice (once for the maxima, once for the low-quality ties), so that a million anchors never hold
a ``(M, A)`` matrix in memory. That is the readable version, and the one that scales. Training
batches are small by comparison (``B x M x A`` is 2M values for 8 images, 12 boxes and 21.5k
anchors), so here the ground truth of every image is padded to ``(B, M_max, 4)`` with a mask and:

1. the IoU of every image's boxes with every anchor is computed once, into one ``(B, M_max, A)``
   buffer, a tile of anchors at a time so that the temporaries stay in the CPU's cache;
2. the best gt of each anchor (per tile) and the best anchor quality of each gt (accumulated over
   tiles) are reductions of it;
3. the low-quality rule is one comparison of the stored values with those maxima (padded rows
   can never claim);
4. the matched boxes are one gather.

When the anchors are one level's grid (``grid=(H, W)``, as the RPN passes them), step 1 uses
that an anchor's x extent depends only on its column and shape and its y extent only on its row
and shape: the overlap widths are a ``(B, M, W, k)`` tensor, the heights ``(B, M, H, k)``, and
the intersections one broadcast product of the two (``_GridAnchors``), same values, fewer passes.

It is done in one pass when ``B x M_max x A`` fits ``max_iou_values`` and otherwise in groups of
images that fit (an image that does not fit alone goes to the chunked per-image path, which
computes the IoU twice but never holds it). No step reads a value back to the host, so on a GPU
the whole batch is queued without waiting.

The results are bit for bit ``label_anchors_batch``'s (``tests/test_targets.py``): the IoU values
are computed with the same floating-point operations in the same order, and ties resolve the same.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from rpnlab.detector.boxes import check_boxes
from rpnlab.detector.matching import Matcher, _image_size, label_anchors

__all__ = ["DEFAULT_MAX_IOU_VALUES", "DEFAULT_TILE_VALUES", "batched_box_iou", "label_anchors_batched", "pad_boxes"]

# One pass while the (B, M_max, A) IoU tensor holds at most this many values (64 MB in float32).
DEFAULT_MAX_IOU_VALUES = 1 << 24
# IoU values computed at a time: 256 KB of float32 per temporary, which stays in a core's L2 cache.
DEFAULT_TILE_VALUES = 1 << 16
# Above this many IoU values (16 MB in float32: beyond the caches) a CPU does not store the
# (B, M, A) matrix for the low-quality ties but computes the few tiles that hold them again:
# B=32 G=50 370 -> 300 ms, B=1 G=500 95 -> 79 ms; below it the stored sweep is the faster
# (B=1 G=3 3.0 against 5.5 ms). Measured with benchmarks/bench_ops.py --only targets.
RECOMPUTE_ABOVE_VALUES = 1 << 22


def pad_boxes(boxes_list: Sequence[Tensor], dtype=None, device=None) -> tuple[Tensor, Tensor]:
    """Per image ``(M_i, 4)`` -> ``boxes: (B, M_max, 4)`` (zeros in the padding), ``valid: (B, M_max)``."""
    b = len(boxes_list)
    m_max = max((g.shape[0] for g in boxes_list), default=0)
    dtype = dtype or (boxes_list[0].dtype if b else torch.float32)
    device = device or (boxes_list[0].device if b else None)
    padded = torch.zeros((b, m_max, 4), dtype=dtype, device=device)
    for i, g in enumerate(boxes_list):
        if g.shape[0]:
            padded[i, : g.shape[0]] = g
    counts = torch.tensor([g.shape[0] for g in boxes_list], device=device)
    valid = torch.arange(m_max, device=device)[None, :] < counts[:, None]
    return padded, valid


def batched_box_iou(gt_boxes: Tensor, anchors: Tensor) -> Tensor:
    """IoU of ``gt_boxes: (B, M, 4)`` with ``anchors: (A, 4)`` or ``(B, A, 4)`` -> ``(B, M, A)``.

    The same operations as ``rpnlab.detector.boxes.box_iou`` (so the same values, bit for bit),
    written per coordinate so that no ``(B, M, A, 2)`` temporaries are made.
    """
    if anchors.dim() == 2:
        anchors = anchors[None]
    out = gt_boxes.new_empty((gt_boxes.shape[0], gt_boxes.shape[1], anchors.shape[1]))
    _iou_into(out, _corners(gt_boxes), anchors, _area(anchors)[:, None, :])
    return out


def _corners(gt_boxes: Tensor) -> tuple[Tensor, ...]:
    """``(B, M, 4)`` -> x1, y1, x2, y2 and area, each ``(B, M, 1)``."""
    x1, y1, x2, y2 = (gt_boxes[..., i][..., None] for i in range(4))
    return x1, y1, x2, y2, (x2 - x1).clamp(min=0) * (y2 - y1).clamp(min=0)


def _area(boxes: Tensor) -> Tensor:
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def _iou_into(out: Tensor, gt, anchors: Tensor, area_a: Tensor) -> None:
    """Write the IoU of ``gt`` (``_corners``) with ``anchors: (1 or B, T, 4)`` into ``out: (B, M, T)``.

    In place wherever possible: at tile sizes that stay in the CPU's cache, the number of passes
    over the values, not the arithmetic, is what costs.
    """
    gx1, gy1, gx2, gy2, area_g = gt
    ax1, ay1, ax2, ay2 = (anchors[..., i][:, None, :] for i in range(4))  # (1 or B, 1, T)
    w = torch.minimum(ax2, gx2)
    w -= torch.maximum(ax1, gx1)
    w.clamp_(min=0)
    h = torch.minimum(ay2, gy2)
    h -= torch.maximum(ay1, gy1)
    h.clamp_(min=0)
    inter = w.mul_(h)
    union = torch.add(area_a, area_g, out=h)  # box_iou adds area_a + area_g: same order, same bits
    union -= inter
    # union >= inter always, and union == 0 only where inter == 0: the division gives box_iou's 0.
    torch.div(inter, union.clamp_(min=torch.finfo(inter.dtype).tiny), out=out)


class _GridAnchors:
    """Anchors laid out as a grid, ``(H, W, k)`` row by row (``AnchorGenerator``'s order for one
    level): an anchor's x1, x2 depend only on its column and shape, y1, y2 only on its row and
    shape. The width of its overlap with a box is then one of ``W x k`` values and the height
    one of ``H x k``, so the ``(B, M, A)`` intersections are one product of a ``(B, M, H, 1, k)``
    and a ``(B, M, 1, W, k)`` tensor: the IoU in about a third of the passes over memory.
    """

    def __init__(self, anchors: Tensor, grid: tuple[int, int]):
        h, w = grid
        a = anchors.shape[0]
        if h <= 0 or w <= 0 or a % (h * w):
            raise ValueError(f"grid {grid} does not divide the {a} anchors into rows x columns x shapes")
        k = a // (h * w)
        cells = anchors.view(h, w, k, 4)
        x, y = cells[..., 0::2], cells[..., 1::2]
        if not (torch.equal(x, x[:1].expand_as(x)) and torch.equal(y, y[:, :1].expand_as(y))):
            raise ValueError(
                f"anchors are not a {h} x {w} grid of {k} shapes in row-major order (AnchorGenerator's, one level)"
            )
        self.h, self.w, self.k = h, w, k
        self.x = x[0]  # (W, k, 2): x1, x2
        self.y = y[:, 0]  # (H, k, 2): y1, y2
        self.area = _area(anchors)  # (A,)

    def overlaps(self, gt) -> tuple[Tensor, Tensor]:
        """Intersection heights ``(B, M, H, 1, k)`` and widths ``(B, M, 1, W, k)`` with ``_corners``."""
        gx1, gy1, gx2, gy2, _ = (t[..., None, None] for t in gt)  # (B, M, 1, 1, 1)
        w = torch.minimum(self.x[..., 1], gx2) - torch.maximum(self.x[..., 0], gx1)  # (B, M, 1, W, k)
        h = torch.minimum(self.y[..., 1], gy2) - torch.maximum(self.y[..., 0], gy1)  # (B, M, 1, H, k)
        return h.clamp_(min=0).transpose(2, 3), w.clamp_(min=0)

    def iou_rows_into(self, out: Tensor, gt, heights: Tensor, widths: Tensor, rows: slice) -> None:
        """``_iou_into`` for anchor rows ``rows`` (anchors ``rows.start*W*k`` ... ): ``out: (B, M, T)``."""
        b, m = out.shape[:2]
        inter = torch.mul(heights[:, :, rows], widths, out=out.view(b, m, -1, self.w, self.k))  # box_iou's w * h
        tile = slice(rows.start * self.w * self.k, rows.stop * self.w * self.k)
        union = torch.add(self.area[tile], gt[4])  # area_a + area_g, as box_iou
        union -= out
        torch.div(out, union.clamp_(min=torch.finfo(out.dtype).tiny), out=out)
        del inter


def _match_tiled(
    matcher: Matcher, gt: Tensor, valid: Tensor, anchors: Tensor, tile_values: int,
    grid: _GridAnchors | None = None, inside: Tensor | None = None,
) -> Tensor:
    """``gt: (B, M, 4)``, ``valid: (B, M)``, ``anchors: (1 or B, A, 4)`` -> ``matched_idxs: (B, A)``.

    The IoU is computed tile by tile of anchors (``B x M x tile`` about ``tile_values`` values, so
    the temporaries stay in cache); the per-anchor maxima are taken per tile and each gt's
    maximum per tile is kept. The low-quality ties are then found, for a CPU matrix of more than
    ``RECOMPUTE_ABOVE_VALUES``, by computing the IoU again for the (gt, tile) pairs where a gt
    reaches its best (a few tiles per gt; the tile buffer is reused), otherwise by a second sweep
    over a stored ``(B, M, A)`` buffer (no host syncs on a GPU). With ``grid`` (the
    anchors' grid layout) the tiles are whole rows of the grid and the IoU is computed from
    separable overlaps; ``inside: (B, A)`` then sets the IoU of anchors outside the image to 0.
    """
    b, m = gt.shape[:2]
    a = anchors.shape[1]
    if m == 0:
        return torch.full((b, a), Matcher.BELOW_LOW_THRESHOLD, dtype=torch.int64, device=gt.device)
    # Padded gt rows are zero boxes: IoU 0 with everything, and after the real rows, so they win
    # no anchor's max on ties (max returns the first); below they are kept from claiming anchors.
    corners = _corners(gt)
    area_a = _area(anchors)[:, None, :]  # (1 or B, 1, A)
    tile = max(64, tile_values // (b * m))
    if grid is not None:
        row = grid.w * grid.k
        rows_per_tile = max(1, tile // row)
        tile = rows_per_tile * row
        heights, widths = grid.overlaps(corners)
    # A large IoU matrix on the CPU is not stored: the ties are found again from the few tiles
    # that hold them (below), and one tile's buffer, reused and kept in cache, is all that is
    # written. Otherwise the whole (B, M, A) is stored and swept a second time.
    recompute = gt.device.type == "cpu" and b * m * a > RECOMPUTE_ABOVE_VALUES
    iou = gt.new_empty(b * m * tile if recompute else (b, m, a))
    best_quality = gt.new_empty((b, a))
    best_gt = torch.empty((b, a), dtype=torch.int64, device=gt.device)
    tile_max = gt.new_empty((b, m, -(-a // tile)))  # each gt's best IoU in each tile
    for s in range(0, a, tile):
        e = min(a, s + tile)
        out = iou[: b * m * (e - s)].view(b, m, e - s) if recompute else iou[:, :, s:e]
        if grid is None:
            _iou_into(out, corners, anchors[:, s:e], area_a[..., s:e])
        else:
            grid.iou_rows_into(out, corners, heights, widths, slice(s // row, e // row))
            if inside is not None:
                out.masked_fill_(~inside[:, None, s:e], 0.0)  # as an anchor shrunk to a point
        torch.max(out, dim=1, out=(best_quality[:, s:e], best_gt[:, s:e]))
        torch.amax(out, dim=2, out=tile_max[:, :, s // tile])
    best_for_gt = tile_max.amax(dim=2)  # (B, M)
    matches = matcher._threshold(best_quality, best_gt)
    if not matcher.allow_low_quality_matches:
        return matches
    eligible = valid & (best_for_gt >= matcher.low_quality_min_iou)
    if recompute:
        # A gt's best IoU is reached only in the tiles whose own maximum for it equals it: compute
        # the IoU of those (gt, tile) pairs again (the same operations, so the same bits) and find
        # the ties there. Reading the pairs back is free on the CPU; a GPU sweeps the stored IoU.
        hit = (tile_max == best_for_gt[:, :, None]) & eligible[:, :, None]  # (B, M, tiles)
        bi, gi, ti = torch.nonzero(hit, as_tuple=True)
        cols = (ti[:, None] * tile + torch.arange(tile, device=gt.device)).clamp_(max=a - 1)  # (N, tile)
        tile_anchors = anchors[bi[:, None] if anchors.shape[0] > 1 else 0, cols]  # (N, tile, 4)
        values = gt.new_empty((len(bi), 1, tile))
        pair = tuple(c[bi, gi][:, :, None] for c in corners)  # (N, 1, 1) each
        _iou_into(values, pair, tile_anchors, _area(tile_anchors)[:, None, :])
        values = values[:, 0]
        if inside is not None:
            values.masked_fill_(~inside[bi[:, None], cols], 0.0)
        ties = values == best_for_gt[bi, gi][:, None]  # (N, tile); clamped columns repeat a real one
        which, pos = torch.nonzero(ties, as_tuple=True)
        claimed = torch.zeros((b, a), dtype=torch.bool, device=gt.device)
        claimed[bi[which], cols[which, pos]] = True
        return torch.where(claimed, best_gt, matches)
    # NaN equals nothing, so padded and ineligible rows claim no anchor.
    best_for_gt = best_for_gt.masked_fill(~eligible, float("nan"))[:, :, None]
    claimed = torch.empty((b, a), dtype=torch.bool, device=gt.device)
    for s in range(0, a, tile):
        torch.any(iou[:, :, s : s + tile] == best_for_gt, dim=1, out=claimed[:, s : s + tile])
    return torch.where(claimed, best_gt, matches)


def _label_group(anchors, gt_boxes_list, matcher, image_sizes, ignore_cross_boundary, tile_values, grid=None):
    gt, valid = pad_boxes(gt_boxes_list, dtype=anchors.dtype, device=anchors.device)
    match_anchors = anchors
    inside = None
    if ignore_cross_boundary:
        hw = torch.tensor([_image_size(s) for s in image_sizes], dtype=anchors.dtype, device=anchors.device)
        inside = (
            (anchors[None, :, 0] >= 0)
            & (anchors[None, :, 1] >= 0)
            & (anchors[None, :, 2] <= hw[:, 1:2])
            & (anchors[None, :, 3] <= hw[:, 0:1])
        )  # (B, A)
        if grid is None:
            point = anchors[:, :2].repeat(1, 2)  # outside anchors shrink to a point: IoU 0 with all
            match_anchors = torch.where(inside[..., None], anchors[None], point[None])  # (B, A, 4)
    if match_anchors.dim() == 2:
        match_anchors = match_anchors[None]
    matched = _match_tiled(matcher, gt, valid, match_anchors, tile_values, grid, inside)  # (B, A)
    labels = (matched >= 0).to(anchors.dtype)
    ignored = matched == Matcher.BETWEEN_THRESHOLDS
    if inside is not None:
        ignored = ignored | ~inside
    labels = labels.masked_fill(ignored, -1.0)
    if gt.shape[1] == 0:
        return labels, anchors.new_zeros((len(gt_boxes_list), anchors.shape[0], 4))
    # Background rows gather gt 0 (the zero padding in an image without boxes), as per image.
    b, m = gt.shape[:2]
    rows = matched.clamp(min=0) + torch.arange(0, b * m, m, device=gt.device)[:, None]  # (B, A)
    return labels, gt.view(b * m, 4).index_select(0, rows.view(-1)).view(b, -1, 4)


def label_anchors_batched(
    anchors: Tensor,
    gt_boxes_list: Sequence[Tensor],
    matcher: Matcher,
    image_sizes=None,
    ignore_cross_boundary: bool = False,
    max_iou_values: int = DEFAULT_MAX_IOU_VALUES,
    tile_values: int = DEFAULT_TILE_VALUES,
    grid: tuple[int, int] | None = None,
) -> tuple[Tensor, Tensor]:
    """``matching.label_anchors_batch`` for the whole batch at once (same arguments, same results).

    Args:
        anchors: ``(A, 4)``, shared by the images; gt_boxes_list: per image ``(M_i, 4)``.
        matcher: a ``Matcher``.
        image_sizes: per image ``(h, w)`` before padding, needed for ``ignore_cross_boundary``.
        max_iou_values: the largest ``(B', M_max, A)`` IoU tensor made at once; images are
            grouped to fit it, and an image that alone exceeds it is labelled by the chunked
            per-image path.
        tile_values: about how many IoU values are computed at a time (a tile of anchors for
            all the group's boxes): small enough for the temporaries to stay in cache.
        grid: ``(H, W)`` when the anchors are one level's grid, ``H x W`` locations of ``k``
            shapes in ``AnchorGenerator``'s order (checked): the IoU is then computed from
            separable x and y overlaps, about twice as fast, with the same values.
    Returns:
        ``labels: (B, A)`` 1/0/-1 and ``matched_gt_boxes: (B, A, 4)``, in the anchors' dtype.
    """
    check_boxes(anchors, "anchors", values=False)
    if isinstance(gt_boxes_list, Tensor) or not isinstance(gt_boxes_list, Sequence):
        raise TypeError("gt_boxes_list must be a list of per-image (M_i, 4) tensors")
    for i, g in enumerate(gt_boxes_list):
        check_boxes(g, f"gt_boxes_list[{i}]", values=False)
        if g.dim() != 2:
            raise ValueError(f"gt_boxes_list[{i}] must have shape (M, 4), got {tuple(g.shape)}")
    if not isinstance(matcher, Matcher):
        raise TypeError(f"matcher must be an rpnlab.detector.matching.Matcher, got {type(matcher).__name__}")
    if image_sizes is not None and len(image_sizes) != len(gt_boxes_list):
        raise ValueError(
            f"image_sizes has {len(image_sizes)} entries but gt_boxes_list has {len(gt_boxes_list)}"
        )
    if ignore_cross_boundary and image_sizes is None:
        raise ValueError("ignore_cross_boundary=True needs image_sizes, one (h, w) per image")
    for name, value in (("max_iou_values", max_iou_values), ("tile_values", tile_values)):
        if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    b, a = len(gt_boxes_list), anchors.shape[0]
    if b == 0:
        return anchors.new_zeros((0, a)), anchors.new_zeros((0, a, 4))
    if grid is not None and not (
        isinstance(grid, (tuple, list)) and len(grid) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in grid)
    ):
        raise ValueError(f"grid must be (H, W), two positive ints, got {grid!r}")
    layout = None if grid is None else _GridAnchors(anchors, tuple(grid))

    # Greedy groups of consecutive images whose padded IoU tensor fits the budget.
    labels, matched, group = [], [], []

    def flush():
        if group:
            sizes = None if image_sizes is None else [image_sizes[i] for i in group]
            lab, box = _label_group(anchors, [gt_boxes_list[i] for i in group], matcher, sizes,
                                    ignore_cross_boundary, tile_values, layout)
            labels.append(lab)
            matched.append(box)
            group.clear()

    m_group = 0
    for i, g in enumerate(gt_boxes_list):
        m = g.shape[0]
        if m * a > max_iou_values:  # too large alone: the chunked per-image path
            flush()
            m_group = 0
            size = None if image_sizes is None else image_sizes[i]
            lab, box = label_anchors(anchors, g, matcher, size, ignore_cross_boundary)
            labels.append(lab[None])
            matched.append(box.to(anchors.dtype)[None])
            continue
        if group and (len(group) + 1) * max(m_group, m) * a > max_iou_values:
            flush()
            m_group = 0
        group.append(i)
        m_group = max(m_group, m)
    flush()
    if len(labels) == 1:
        return labels[0], matched[0]
    return torch.cat(labels), torch.cat(matched)
