"""RoI pooling: a fixed-size feature grid for every region proposal, whatever its size.

The Fast R-CNN head is a stack of fully connected layers, so it needs the same number of features
from every proposal. Three ways of cutting them out of a feature map are written here in plain
PyTorch, for reading:

- ``roi_pool`` (Fast R-CNN, Girshick 2015): snap the box to the feature grid, split it into
  ``out x out`` bins whose edges are rounded outwards, take each bin's maximum. The rounding moves
  the box by up to half a feature cell (8 image pixels at stride 16).
- ``roi_align`` (Mask R-CNN, He et al. 2017): no rounding at all; each bin averages a few points
  read with bilinear interpolation.
- ``crop_and_resize_pool`` (tf-faster-rcnn): bilinearly resample the box to a ``2out x 2out``
  crop, then max-pool 2x2.

``roi_pool`` and ``roi_align`` give what ``torchvision.ops.roi_pool`` / ``roi_align`` give
(forward and gradient, up to float rounding). ``RoIPooler`` is the module the detector uses: it
calls torchvision's compiled kernels by default (fast) or the versions here
(``implementation="python"``), and spreads boxes over FPN levels.

Boxes are given either as a list with one ``(L_i, 4)`` tensor per image or as one ``(K, 5)``
tensor of ``[batch_index, x1, y1, x2, y2]`` rows, both in image pixels; ``spatial_scale`` maps them
onto the feature map (1/16 for a stride-16 backbone). As in torchvision, no gradient flows into
the box coordinates: Faster R-CNN's approximate joint training treats proposals as constants.

How they are vectorised (no Python loop over boxes or bins): ``roi_pool`` groups the bins by size,
reads each group's cells at once and keeps each channel's first maximum; ``roi_align`` writes the
bilinear reads and bin means as two small dense matrices per box, ``Wy @ map @ Wx^T``.
Memory: ``roi_pool`` reads ``K x out_h x out_w x (cells per bin) x C`` values (without gradient),
``roi_align`` makes a ``(boxes of the image x out_h, C x W)`` product per image; on CPU they run
within a few times torchvision's kernels (``benchmarks/bench_ops.py``). ``RoIPooler`` uses the
torchvision kernels by default; with ``implementation="auto"`` (the detector's default,
``RoIConfig``) RoI Align on a CPU takes the matrix form on small maps and
``rpnlab.detector.roi_sparse`` (the same weights as one sparse matrix per image) on large ones.

Longer than 500 lines because the three pooling methods are written out in plain PyTorch (the
lesson) next to the RoIPooler that uses torchvision's kernels.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from rpnlab.detector.boxes import box_area, check_boxes
from rpnlab.detector.checks import check_finite, values_checked
from rpnlab.detector.roi_points import align_axis, align_points
from rpnlab.detector.roi_sparse import (
    roi_align_sparse,
    sparse_align_available,
    sparse_align_min_rois,
)

__all__ = [
    "RoIPooler",
    "boxes_to_rois",
    "crop_and_resize_pool",
    "fpn_level_of_boxes",
    "matrix_align_max_cells",
    "roi_align",
    "roi_pool",
]

_MODES = ("align", "pool", "crop")
_IMPLEMENTATIONS = ("torchvision", "python", "auto")
def matrix_align_max_cells(out_w: int, sampling_ratio: int) -> int:
    """``implementation="auto"``: the largest map (H * W cells) whose RoI Align takes the matrix
    form of ``roi_align`` on the CPU; torchvision's kernel above it (0 for adaptive sampling).

    The matrix form's cost grows with the whole map (a dense product per box), the kernel's with
    the bins and their sample points; but the kernel's CPU forward and backward run point by point
    on one thread, the products on BLAS. Measured crossovers (``benchmarks/bench_roi_crossover.py``,
    forward + backward, one thread, fourth session): 7 x 7 bins with 2 x 2 points between 32 x 32
    (matrix 1.69x faster) and 48 x 48 (1.08x); 5 x 5 bins with one point between 32 x 32 (1.07x)
    and 48 x 48 (0.62x), and 1.37x at 24 x 24. ``17 * out_w * (sampling_ratio**2 + 10)`` passes
    below both with a margin: 1666 cells (~40 x 40) and 935 (~30 x 30).
    """
    if sampling_ratio <= 0:
        return 0  # adaptive sampling: the points per bin grow with the box, the kernel scales better
    return 17 * out_w * (sampling_ratio**2 + 10)


# ----------------------------------------------------------------------------- argument handling


def _output_size(output_size) -> tuple[int, int]:
    if isinstance(output_size, int) and not isinstance(output_size, bool):
        output_size = (output_size, output_size)
    ok = (
        isinstance(output_size, (tuple, list))
        and len(output_size) == 2
        and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in output_size)
    )
    if not ok:
        raise ValueError(f"output_size must be a positive int or a pair (height, width) of them, got {output_size!r}")
    return int(output_size[0]), int(output_size[1])


def _check_input(input: Tensor) -> None:
    if not isinstance(input, Tensor):
        raise TypeError(f"input must be a torch.Tensor of shape (N, C, H, W), got {type(input).__name__}")
    if input.dim() != 4 or not input.is_floating_point():
        raise ValueError(f"input must be a floating-point (N, C, H, W) tensor, got {input.dtype} {tuple(input.shape)}")
    if input.shape[-2] == 0 or input.shape[-1] == 0:
        raise ValueError(f"input must have a non-empty feature map, got {tuple(input.shape)}")


def _check_rois(rois: Tensor, batch: int) -> None:
    """NaN/inf coordinates or a batch index outside ``0..batch-1`` are a ``ValueError`` naming
    ``boxes`` (an index out of range used to surface as "INDICES element is out of DATA bounds").
    Values checked: CPU, or with ``rpnlab.detector.checks`` value checks on (no GPU sync otherwise)."""
    if rois.numel() and values_checked(rois):
        check_finite(rois[:, 1:], "boxes")
        idx = rois[:, 0]
        if bool(((idx < 0) | (idx >= batch) | (idx != idx.round())).any()):
            bad = idx[(idx < 0) | (idx >= batch) | (idx != idx.round())][0].item()
            raise ValueError(f"boxes has batch index {bad:g}, expected an integer in 0..{batch - 1}")


def boxes_to_rois(boxes: Tensor | Sequence[Tensor], dtype: torch.dtype | None = None) -> Tensor:
    """Per-image boxes ``[(L_i, 4)]`` -> ``(sum L_i, 5)`` rows ``[i, x1, y1, x2, y2]``.

    A ``(K, 5)`` tensor is passed through (cast to ``dtype`` if given).
    """
    if isinstance(boxes, Tensor):
        if boxes.dim() != 2 or boxes.shape[1] != 5 or not boxes.is_floating_point():
            raise ValueError(
                "boxes given as one tensor must be float (K, 5) rows [batch_index, x1, y1, x2, y2], "
                f"got {boxes.dtype} {tuple(boxes.shape)}; pass per-image (L_i, 4) boxes as a list"
            )
        return boxes if dtype is None else boxes.to(dtype)
    if not isinstance(boxes, (list, tuple)) or len(boxes) == 0:
        raise TypeError(f"boxes must be a (K, 5) tensor or a non-empty list of (L_i, 4) tensors, got {boxes!r}")
    for i, b in enumerate(boxes):
        check_boxes(b, f"boxes[{i}]", values=False)
        if b.dim() != 2:
            raise ValueError(f"boxes[{i}] must be (L_i, 4), got {tuple(b.shape)}")
    dtype = dtype or boxes[0].dtype
    rows = [
        torch.cat((torch.full_like(b[:, :1], i, dtype=dtype), b.to(dtype)), dim=1) for i, b in enumerate(boxes)
    ]
    return torch.cat(rows, dim=0)


def _pixel_rows(input: Tensor, batch_idx: Tensor, y: Tensor, x: Tensor) -> Tensor:
    """Read ``input: (N, C, H, W)`` at integer positions -> ``(K, *shape, C)``, channels last.

    Each read is one contiguous row of ``C`` channels (a channels-last copy of the input, then
    ``index_select`` of whole rows): several times faster than gathering single values channel by
    channel (``K x C x points`` reads), forward and backward.
    """
    _, channels, height, width = input.shape
    b = batch_idx.view(-1, *([1] * (y.dim() - 1)))
    flat = (b * height + y) * width + x  # (K, *shape)
    rows = input.permute(0, 2, 3, 1).reshape(-1, channels)  # (N*H*W, C)
    return rows.index_select(0, flat.reshape(-1)).view(*flat.shape, channels)


# ----------------------------------------------------------------------------- RoI Pool


def _round_half_away(x: Tensor) -> Tensor:
    """C's ``round()``: halves go away from zero (``torch.round`` sends them to the even neighbour)."""
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def _pool_bins(start: Tensor, length: Tensor, bins: int, size: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Integer bin edges of quantised RoIs along one axis.

    ``start, length: (K,)`` cells -> ``lo, hi: (K, bins)``, bin ``p`` covers cells ``lo <= i < hi``,
    clipped to the feature map ``[0, size]``. Edges are rounded outwards (floor / ceil), so
    neighbouring bins may share a cell.
    """
    bin_size = length.to(dtype) / bins  # (K,)
    p = torch.arange(bins, device=start.device, dtype=dtype)
    lo = torch.floor(p * bin_size[:, None]).long() + start[:, None]
    hi = torch.ceil((p + 1) * bin_size[:, None]).long() + start[:, None]
    return lo.clamp(0, size), hi.clamp(0, size)


def _first_max(cells: Tensor) -> Tensor:
    """``cells: (n, P, C)`` -> ``(n, C)``: the index along ``P`` of the first maximum.

    The reference kernel credits the first of tied maxima (row by row) with the gradient, so
    reading the value there sends the gradient to that cell only (``amax``'s backward would share
    it among ties). ``amax`` is a fast reduction; ``max(dim)``, which also returns the index, is an
    order of magnitude slower on CPU, so the first index is found with two ``amax`` passes: rank
    the cells P, P-1, ..., 1 and take the largest rank among those equal to the maximum.
    """
    cells_per_bin = cells.shape[1]
    with torch.no_grad():
        is_max = cells == cells.amax(dim=1, keepdim=True)  # (n, P, C)
        # The smallest integer type that holds the ranks (bins of more than 255 cells need int16).
        dtype = torch.uint8 if cells_per_bin <= 255 else torch.int16 if cells_per_bin <= 32767 else torch.int32
        rank = torch.arange(cells_per_bin, 0, -1, device=cells.device, dtype=dtype)[:, None]
        # bool and uint8 have the same bytes: rank the maxima in place, no promoted copy
        ranked = is_max.view(torch.uint8) if dtype == torch.uint8 else is_max.to(dtype)
        return ranked.mul_(rank).amax(dim=1).neg_().add_(cells_per_bin).long()  # P - largest rank


def roi_pool(
    input: Tensor,
    boxes: Tensor | Sequence[Tensor],
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
) -> Tensor:
    """Fast R-CNN's RoI max pooling, as ``torchvision.ops.roi_pool``.

    Args:
        input: ``(N, C, H, W)`` feature maps.
        boxes: ``(K, 5)`` rows ``[batch_index, x1, y1, x2, y2]`` or a list of ``(L_i, 4)``.
        output_size: ``out`` or ``(out_h, out_w)``.
        spatial_scale: feature cells per image pixel (1/16 at stride 16).
    Returns:
        ``(K, C, out_h, out_w)``; a bin that falls outside the feature map is 0.

    Steps: scale the box and round its corners to whole cells; the box then spans cells
    ``x1..x2`` inclusive; cut that span into ``out`` bins of ``span / out`` cells, widened to whole
    cells (floor of the start, ceil of the end); each output is its bin's maximum. Only the cell
    holding a bin's maximum receives gradient (the first one, row by row, if several tie).
    """
    _check_input(input)
    out_h, out_w = _output_size(output_size)
    rois = boxes_to_rois(boxes, input.dtype).detach()
    _check_rois(rois, input.shape[0])
    _, _, height, width = input.shape

    batch_idx = rois[:, 0].long()
    x1, y1, x2, y2 = _round_half_away(rois[:, 1:] * spatial_scale).long().unbind(1)
    # Malformed (inverted) boxes are forced to one cell, like the reference kernel.
    roi_w = (x2 - x1 + 1).clamp(min=1)
    roi_h = (y2 - y1 + 1).clamp(min=1)
    h_lo, h_hi = _pool_bins(y1, roi_h, out_h, height, input.dtype)  # (K, out_h)
    w_lo, w_hi = _pool_bins(x1, roi_w, out_w, width, input.dtype)  # (K, out_w)

    # Every bin is a window of (h_hi - h_lo) x (w_hi - w_lo) cells whose top-left cell is
    # (h_lo, w_lo). Bins come in only a few sizes (edges round outwards, so a box has one or two
    # bin sizes per axis): for each size, read the cells of all the bins of that size at once and
    # take their maximum. No loop over boxes or bins, and no cell is read that is not in its bin.
    bin_h = (h_hi - h_lo)[:, :, None].expand(-1, -1, out_w).reshape(-1)  # (K*out_h*out_w,)
    bin_w = (w_hi - w_lo)[:, None, :].expand(-1, out_h, -1).reshape(-1)
    empty = (bin_h <= 0) | (bin_w <= 0)  # a bin entirely off the map is 0, as in the reference kernel
    bin_h, bin_w = bin_h.clamp(min=1), bin_w.clamp(min=1)
    top = h_lo[:, :, None].expand(-1, -1, out_w).reshape(-1).clamp(max=height - 1)
    left = w_lo[:, None, :].expand(-1, out_h, -1).reshape(-1).clamp(max=width - 1)
    image = batch_idx[:, None].expand(-1, out_h * out_w).reshape(-1)

    # Sort the bins by size, so that each size is one slice of them.
    size_code = bin_h * (width + 1) + bin_w
    order = torch.argsort(size_code)
    counts = torch.unique_consecutive(size_code[order], return_counts=True)[1].tolist()
    channels = input.shape[1]
    # Channels last: each cell read below is one contiguous row of C values (see _pixel_rows).
    table = input.permute(0, 2, 3, 1).reshape(-1, channels)  # (N*H*W, C)
    channel = torch.arange(channels, device=input.device)
    where = torch.empty((len(order), channels), dtype=torch.long, device=input.device)
    for which in order.split(counts):
        size_h, size_w = int(bin_h[which[0]]), int(bin_w[which[0]])
        rows = top[which, None, None] + torch.arange(size_h, device=input.device)[:, None]  # (n, size_h, 1)
        cols = left[which, None, None] + torch.arange(size_w, device=input.device)  # (n, 1, size_w)
        flat = ((image[which, None, None] * height + rows) * width + cols).view(len(which), -1)  # (n, size_h*size_w)
        with torch.no_grad():  # find the maximum cells ...
            cells = table.index_select(0, flat.view(-1)).view(len(which), size_h * size_w, channels)
            best = flat.gather(1, _first_max(cells))  # (n, C): the table row of each channel's maximum
        where[which] = best.mul_(channels).add_(channel)  # ... their positions in the flattened table
    # Read the maximum cells (in bin order): the gradient flows back through this read to them only.
    pooled = table.reshape(-1).gather(0, where.view(-1)).view(-1, channels)  # (K*out_h*out_w, C)
    pooled = pooled.masked_fill(empty[:, None], 0.0).view(len(rois), out_h, out_w, channels)
    return pooled.permute(0, 3, 1, 2)  # (K, C, out_h, out_w)


# ----------------------------------------------------------------------------- bilinear sampling


def _crop_axis(coord: Tensor, size: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``tf.image.crop_and_resize``'s interpolation along one axis (same outputs as ``align_axis``).

    A point outside ``[0, size - 1]`` reads 0 (TensorFlow's ``extrapolation_value``); no clamping.
    """
    inside = ((coord >= 0) & (coord <= size - 1)).to(coord.dtype)
    low = coord.floor().clamp(0, size - 1).long()
    high = coord.ceil().clamp(0, size - 1).long()
    frac = coord - coord.floor()
    return low, high, (1 - frac) * inside, frac * inside


def _bilinear(input: Tensor, batch_idx: Tensor, y_axis, x_axis) -> Tensor:
    """Bilinear reads on a separable grid of points.

    ``y_axis``: ``(low, high, w_low, w_high)``, each ``(K, P_h, G_h)`` (``P_h`` bins of ``G_h``
    points); ``x_axis`` likewise ``(K, P_w, G_w)``. Returns ``(K, C, P_h, P_w, G_h, G_w)``.
    """

    def rows(t: Tensor) -> Tensor:
        return t[:, :, None, :, None]  # (K, P_h, 1, G_h, 1)

    def cols(t: Tensor) -> Tensor:
        return t[:, None, :, None, :]  # (K, 1, P_w, 1, G_w)

    y_low, y_high, wy_low, wy_high = y_axis
    x_low, x_high, wx_low, wx_high = x_axis
    out = 0
    for y, wy in ((y_low, wy_low), (y_high, wy_high)):
        for x, wx in ((x_low, wx_low), (x_high, wx_high)):
            weight = rows(wy) * cols(wx)  # (K, P_h, P_w, G_h, G_w)
            # channels last: each read is a whole row of C values (see _pixel_rows)
            out = out + weight[..., None] * _pixel_rows(input, batch_idx, rows(y), cols(x))
    return out.movedim(-1, 1)  # (K, C, P_h, P_w, G_h, G_w)


# ----------------------------------------------------------------------------- RoI Align


def _interpolation_matrix(start: Tensor, bin_size: Tensor, grid: Tensor, bins: int, size: int) -> Tensor:
    """RoI Align along one axis as a matrix: ``(K, bins, size)``, row ``p`` of RoI ``k`` holds the
    weight of every cell in bin ``p``'s value: the mean of its ``grid[k]`` bilinear reads.

    ``start, bin_size: (K,)`` in cells, ``grid: (K,)`` points per bin. Point ``i`` of bin ``p`` sits
    at ``start + p * bin_size + (i + 0.5) * bin_size / grid`` (centres of ``grid`` equal sub-bins);
    RoIs with fewer points than the largest grid give their extra points weight 0.
    """
    coord, share = align_points(start, bin_size, grid, bins)  # (K, bins, points), (K, 1, points)
    low, high, w_low, w_high = align_axis(coord, size)
    matrix = start.new_zeros((len(grid), bins, size))
    matrix.scatter_add_(2, low, w_low * share)
    return matrix.scatter_add_(2, high, w_high * share)


def roi_align(
    input: Tensor,
    boxes: Tensor | Sequence[Tensor],
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> Tensor:
    """Mask R-CNN's RoI Align, as ``torchvision.ops.roi_align``.

    Args:
        input: ``(N, C, H, W)`` feature maps.
        boxes: ``(K, 5)`` rows ``[batch_index, x1, y1, x2, y2]`` or a list of ``(L_i, 4)``.
        output_size: ``out`` or ``(out_h, out_w)``.
        spatial_scale: feature cells per image pixel.
        sampling_ratio: points per bin along each axis; ``<= 0`` picks ``ceil(roi_size / out)``
            for each RoI (adaptive: big boxes get more points).
        aligned: shift the box by half a cell, so that a box coordinate ``x`` meets the feature
            cell whose centre is at ``x``. ``False`` is the original (torchvision default),
            which also stretches boxes smaller than one cell to one cell.
    Returns:
        ``(K, C, out_h, out_w)``: each bin is the mean of its bilinearly read sample points.
    """
    _check_input(input)
    out_h, out_w = _output_size(output_size)
    if isinstance(sampling_ratio, bool) or not isinstance(sampling_ratio, int):
        raise TypeError(f"sampling_ratio must be an int (<= 0 for adaptive), got {sampling_ratio!r}")
    rois = boxes_to_rois(boxes, input.dtype).detach()
    _check_rois(rois, input.shape[0])
    offset = 0.5 if aligned else 0.0
    starts = rois[:, 1:3] * spatial_scale - offset  # (K, 2): x1, y1 in cells
    sizes = (rois[:, 3:5] * spatial_scale - offset) - starts  # (K, 2): width, height
    if not aligned:
        sizes = sizes.clamp(min=1.0)
    bin_sizes = sizes / torch.tensor([out_w, out_h], dtype=sizes.dtype, device=sizes.device)

    if sampling_ratio > 0:
        grid = torch.full_like(rois[:, 1:3], sampling_ratio, dtype=torch.long)  # (K, 2): G_w, G_h
    else:
        grid = torch.ceil(sizes / torch.tensor([out_w, out_h], dtype=sizes.dtype, device=sizes.device)).long()
    # A box of no size (possible with aligned=True) has an empty grid: its bins are 0. Sampling it
    # with one point and weighting by 0 keeps one code path and zero gradient.
    nonempty = (grid > 0).all(dim=1).to(input.dtype)
    grid = grid.clamp(min=1)

    # Bilinear interpolation and the mean over a bin's points are linear and separable in y and
    # x, so every bin is a weighted sum of the map: out[k] = Wy[k] @ input[n_k] @ Wx[k]^T, with
    # Wy: (out_h, H) and Wx: (out_w, W) small dense matrices (``_interpolation_matrix``). Two
    # matrix products per image, no loop over boxes, and autograd gives the exact gradient.
    height, width = input.shape[-2:]
    w_y = _interpolation_matrix(starts[:, 1], bin_sizes[:, 1], grid[:, 1], out_h, height)  # (K, out_h, H)
    w_x = _interpolation_matrix(starts[:, 0], bin_sizes[:, 0], grid[:, 0], out_w, width)  # (K, out_w, W)
    w_y = w_y * nonempty[:, None, None]
    image = rois[:, 0].long()
    channels = input.shape[1]
    parts, order = [input[:0, :, :1, :1].expand(0, -1, out_h, out_w)], []  # (an empty part keeps K = 0 in the graph)
    for n in range(input.shape[0]):  # the images of the batch, not the boxes
        idx = torch.where(image == n)[0]
        if len(idx):
            k = len(idx)
            # rows: (k*out_h, H) @ (H, C*W) -> every bin row of every box, all channels and columns
            rows = w_y[idx].reshape(k * out_h, height) @ input[n].transpose(0, 1).reshape(height, channels * width)
            # columns, box by box: (k, out_h*C, W) @ (k, W, out_w) -> (k, out_h, C, out_w)
            pooled = torch.bmm(rows.view(k, out_h * channels, width), w_x[idx].transpose(1, 2))
            parts.append(pooled.view(k, out_h, channels, out_w).transpose(1, 2))  # (k, C, out_h, out_w)
            order.append(idx)
    out = torch.cat(parts)
    if order and not torch.equal(torch.cat(order), torch.arange(len(rois), device=image.device)):
        out = torch.zeros_like(out).index_copy(0, torch.cat(order), out)  # back in RoI order
    return out


# ----------------------------------------------------------------------------- crop and resize


def crop_and_resize_pool(
    input: Tensor,
    boxes: Tensor | Sequence[Tensor],
    output_size: int | tuple[int, int] = 7,
    spatial_scale: float = 1.0,
) -> Tensor:
    """tf-faster-rcnn's "crop pooling": ``tf.image.crop_and_resize`` to ``2*out``, then 2x2 max pool.

    Args:
        input: ``(N, C, H, W)``; boxes: ``(K, 5)`` or a list of ``(L_i, 4)``; output_size: ``out``
            or ``(out_h, out_w)``; spatial_scale: feature cells per image pixel.
    Returns:
        ``(K, C, out_h, out_w)``.

    The box, scaled to cells, is resampled on a ``2out_h x 2out_w`` grid of points spread evenly
    from its first edge to its last, both included: point ``i`` along y is at
    ``y1 + i * (y2 - y1) / (2out_h - 1)``, read bilinearly with cell ``i`` holding the value at
    coordinate ``i``; points outside ``[0, H - 1]`` read 0. Each output is the max of a 2x2 block.

    How it differs from the other two: nothing is rounded (unlike ``roi_pool``); the points sit on
    the box edges rather than at bin centres, there is one point per half bin, no clamping near the
    border and no half-cell ``aligned`` option (unlike ``roi_align``); and bins take a max, not a
    mean. The resampling step also stretches the box to a fixed aspect, as ``roi_align`` does.
    """
    _check_input(input)
    out_h, out_w = _output_size(output_size)
    rois = boxes_to_rois(boxes, input.dtype).detach()
    _check_rois(rois, input.shape[0])
    height, width = input.shape[-2:]
    x1, y1, x2, y2 = (rois[:, 1:] * spatial_scale).unbind(1)

    def points(lo: Tensor, hi: Tensor, n: int) -> Tensor:  # (K,) -> (K, n, 1): n bins of one point
        i = torch.arange(n, device=lo.device, dtype=lo.dtype)
        return (lo[:, None] + i * (hi - lo)[:, None] / (n - 1))[:, :, None]

    crops = _bilinear(
        input,
        rois[:, 0].long(),
        _crop_axis(points(y1, y2, 2 * out_h), height),
        _crop_axis(points(x1, x2, 2 * out_w), width),
    )[..., 0, 0]  # (K, C, 2out_h, 2out_w)
    return F.max_pool2d(crops, kernel_size=2, stride=2)


# ----------------------------------------------------------------------------- the module


def fpn_level_of_boxes(
    boxes: Tensor,
    k_min: int,
    k_max: int,
    canonical_scale: float = 224.0,
    canonical_level: int = 4,
    eps: float = 1e-6,
) -> Tensor:
    """FPN's level assignment (Lin et al. 2017, eq. 1) -> ``(K,)`` index into the levels.

    ``boxes: (K, 4)`` in image pixels. A box of ``sqrt(wh) = canonical_scale`` goes to level
    ``canonical_level`` (P4 for 224 px, ImageNet's size); each halving or doubling of its side
    moves it one level down or up: ``k = floor(k0 + log2(sqrt(wh) / 224))``, clamped to
    ``[k_min, k_max]``, returned as ``k - k_min``. As torchvision's ``LevelMapper``.
    """
    s = torch.sqrt(box_area(boxes))
    k = torch.floor(canonical_level + torch.log2(s / canonical_scale) + torch.tensor(eps, dtype=s.dtype))
    return k.clamp(min=k_min, max=k_max).long() - k_min


class RoIPooler(nn.Module):
    """Pool every proposal of a batch to a fixed ``out x out`` grid, from one map or an FPN.

    Args:
        output_size: ``out`` (or ``(out_h, out_w)``).
        spatial_scale: feature cells per image pixel, e.g. ``1/16``; for an FPN one per level,
            finest first, each half the previous: ``(1/4, 1/8, 1/16, 1/32)``.
        sampling_ratio: RoI Align points per bin and axis (``<= 0``: adaptive).
        mode: ``"align"`` (RoI Align), ``"pool"`` (RoI Pool, the paper's) or ``"crop"``
            (tf-faster-rcnn's crop-and-resize; always the python version, torchvision has none).
        aligned: RoI Align's half-cell correction.
        implementation: ``"torchvision"`` (compiled kernels), ``"python"`` (this module's
            functions; same numbers, readable) or ``"auto"`` (RoI Align on the CPU from maps small
            enough for its matrix form to be faster, see ``matrix_align_max_cells``, in
            float32 even under autocast; everything else with torchvision's kernels).
        canonical_scale, canonical_level: the FPN level rule, see ``fpn_level_of_boxes``.
    """

    def __init__(
        self,
        output_size: int | tuple[int, int] = 7,
        spatial_scale: float | Sequence[float] = 1.0 / 16,
        sampling_ratio: int = 2,
        mode: str = "align",
        aligned: bool = False,
        implementation: str = "torchvision",
        canonical_scale: float = 224.0,
        canonical_level: int = 4,
    ):
        super().__init__()
        self.output_size = _output_size(output_size)
        scales = (spatial_scale,) if isinstance(spatial_scale, (int, float)) else tuple(spatial_scale)
        if not scales or any(isinstance(s, bool) or not isinstance(s, (int, float)) or not s > 0 for s in scales):
            raise ValueError(f"spatial_scale must be a positive number or a sequence of them, got {spatial_scale!r}")
        self.spatial_scales = tuple(float(s) for s in scales)
        # FPN levels are k = -log2(scale): P2 at 1/4, P3 at 1/8, ... consecutive integers.
        ks = [-math.log2(s) for s in self.spatial_scales]
        if len(ks) > 1 and any(abs(b - a - 1) > 1e-6 or abs(a - round(a)) > 1e-6 for a, b in itertools.pairwise(ks)):
            raise ValueError(
                f"spatial_scale for several levels must be powers of 2 halving level by level, finest first "
                f"(e.g. (1/4, 1/8, 1/16, 1/32)), got {spatial_scale!r}"
            )
        self.k_min, self.k_max = round(ks[0]), round(ks[-1])
        if isinstance(sampling_ratio, bool) or not isinstance(sampling_ratio, int):
            raise TypeError(f"sampling_ratio must be an int (<= 0 for adaptive), got {sampling_ratio!r}")
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        if implementation not in _IMPLEMENTATIONS:
            raise ValueError(f"implementation must be one of {_IMPLEMENTATIONS}, got {implementation!r}")
        self.sampling_ratio = sampling_ratio
        self.mode = mode
        self.aligned = bool(aligned)
        self.implementation = implementation
        self.canonical_scale = float(canonical_scale)
        self.canonical_level = int(canonical_level)

    @classmethod
    def from_config(cls, config, spatial_scale: float | Sequence[float]) -> RoIPooler:
        """From an ``rpnlab.config.RoIConfig`` (``pooler``, ``output_size``, ``sampling_ratio``,
        ``aligned``, ``implementation``) and the backbone's ``spatial_scale``."""
        config.validate()
        return cls(
            output_size=config.output_size,
            spatial_scale=spatial_scale,
            sampling_ratio=config.sampling_ratio,
            mode=config.pooler,
            aligned=config.aligned,
            implementation=config.implementation,
        )

    def _pool_level(self, feature: Tensor, rois: Tensor, scale: float) -> Tensor:
        python = self.implementation == "python"
        if self.mode == "align":
            form = self._align_form(feature, len(rois))
            if form != "kernel":
                fn = roi_align if form == "matrix" else roi_align_sparse
                # float32 as torchvision's kernel under autocast: pooled values feed the box head
                with torch.autocast(feature.device.type, enabled=False):
                    return fn(feature.float(), rois.float(), self.output_size, scale, self.sampling_ratio,
                              self.aligned)
            fn = roi_align if python else torchvision.ops.roi_align
            return fn(feature, rois, self.output_size, scale, self.sampling_ratio, self.aligned)
        if self.mode == "pool":
            fn = roi_pool if python else torchvision.ops.roi_pool
            return fn(feature, rois, self.output_size, scale)
        return crop_and_resize_pool(feature, rois, self.output_size, scale)

    def _align_form(self, feature: Tensor, num_rois: int) -> str:
        """How this level's RoI Align runs: ``"kernel"`` (torchvision's, or the teaching code for
        ``implementation="python"``), or with ``implementation="auto"`` on the CPU ``"matrix"``
        (``roi_align``'s dense products, maps up to ``matrix_align_max_cells``) and ``"sparse"``
        (``roi_sparse.roi_align_sparse``: larger maps with at least ``sparse_align_min_rois``
        RoIs, fixed sampling ratio, MKL)."""
        if self.implementation != "auto" or feature.device.type != "cpu" or self.sampling_ratio <= 0:
            return "kernel"  # adaptive sampling: the points per bin grow with the box, the kernel scales better
        batch, _, height, width = feature.shape
        if height * width <= matrix_align_max_cells(self.output_size[1], self.sampling_ratio):
            return "matrix"
        bins = self.output_size[0] * self.output_size[1]
        if sparse_align_available(feature.device) and num_rois >= sparse_align_min_rois(
                batch, height, width, bins, self.sampling_ratio):
            return "sparse"
        return "kernel"

    def forward(self, features: Tensor | Sequence[Tensor], proposals: Sequence[Tensor]) -> Tensor:
        """Pool ``proposals`` (per image ``(P_i, 4)``, image pixels) from ``features``.

        Args:
            features: ``(B, C, H, W)``, or a list of FPN levels ``(B, C, H_l, W_l)`` matching
                ``spatial_scale``.
        Returns:
            ``(sum P_i, C, out_h, out_w)``, proposals of image 0 first.
        """
        levels = [features] if isinstance(features, Tensor) else list(features)
        if len(levels) != len(self.spatial_scales):
            raise ValueError(
                f"got {len(levels)} feature level(s) but spatial_scale has {len(self.spatial_scales)} "
                f"entr{'y' if len(self.spatial_scales) == 1 else 'ies'}: {self.spatial_scales}"
            )
        for i, f in enumerate(levels):
            _check_input(f)
            if f.shape[:2] != levels[0].shape[:2]:
                raise ValueError(f"feature levels must share batch size and channels, level {i} is {tuple(f.shape)}")
        if isinstance(proposals, Tensor) or len(proposals) != levels[0].shape[0]:
            raise ValueError(
                f"proposals must be a list with one (P_i, 4) tensor per image ({levels[0].shape[0]} images), "
                f"got {type(proposals).__name__} of length {len(proposals)}"
            )
        rois = boxes_to_rois(list(proposals), levels[0].dtype).detach()
        if len(levels) == 1:
            return self._pool_level(levels[0], rois, self.spatial_scales[0])

        level_of_box = fpn_level_of_boxes(
            rois[:, 1:], self.k_min, self.k_max, self.canonical_scale, self.canonical_level
        )
        num_channels = levels[0].shape[1]
        out = levels[0].new_zeros((len(rois), num_channels, *self.output_size))
        for level, (feature, scale) in enumerate(zip(levels, self.spatial_scales)):
            idx = torch.where(level_of_box == level)[0]
            out[idx] = self._pool_level(feature, rois[idx], scale).to(out.dtype)
        return out

    def extra_repr(self) -> str:
        return (
            f"output_size={self.output_size}, spatial_scale={self.spatial_scales}, mode={self.mode!r}, "
            f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned}, implementation={self.implementation!r}"
        )
