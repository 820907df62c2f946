"""Where RoI Align reads a feature map, one axis at a time: each bin's sample points and the two
cells each point blends.

Both RoI Align forms that write the reads as matrices use these: the dense one in
``rpnlab.detector.roi.roi_align`` (the lesson) and the sparse one in
``rpnlab.detector.roi_sparse`` (the CPU fast path). RoI Align is separable: a point's bilinear
weight on cell ``(y, x)`` is its weight on row ``y`` times its weight on column ``x``, so one axis
at a time is all there is to compute.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["align_axis", "align_points"]


def align_points(start: Tensor, bin_size: Tensor, grid: Tensor, bins: int) -> tuple[Tensor, Tensor]:
    """The sample points of ``bins`` bins along one axis, and each point's share of its bin's mean.

    Args:
        start, bin_size: ``(K,)`` in cells: where each RoI's first bin starts and how long a bin is.
        grid: ``(K,)`` points per bin for each RoI (``>= 1``).
        bins: bins per RoI along this axis.
    Returns:
        ``coord: (K, bins, G)`` with ``G = grid.max()``: point ``i`` of bin ``p`` at
        ``start + p * bin_size + (i + 0.5) * bin_size / grid`` (the centres of ``grid`` equal
        sub-bins, in torchvision's order of operations, so float32 rounds the same way), and
        ``share: (K, 1, G)``, ``1 / grid`` for the RoI's points and 0 for the padding points of
        RoIs with fewer than ``G``.
    """
    points = int(grid.max()) if len(grid) else 1
    p = torch.arange(bins, device=start.device, dtype=start.dtype)[None, :, None]
    i = torch.arange(points, device=start.device, dtype=start.dtype)[None, None, :]
    s, b, g = start[:, None, None], bin_size[:, None, None], grid.to(start.dtype)[:, None, None]
    return s + p * b + (i + 0.5) * b / g, (i < g).to(start.dtype) / g


def align_axis(coord: Tensor, size: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """RoI Align's interpolation along one axis: coordinates ``(...)`` in cells -> the two cells to
    blend, ``low, high: (...)`` int64, and their weights ``w_low, w_high: (...)``.

    Cell ``i`` holds the value at coordinate ``i``. A point more than one cell outside the map
    reads 0; a point within one cell of the border reads the border cell.
    """
    inside = ((coord >= -1.0) & (coord <= size)).to(coord.dtype)
    coord = coord.clamp(min=0)
    low = coord.floor().long()
    # On or past the last cell there is no right neighbour: read the last cell alone.
    at_edge = low >= size - 1
    low = low.clamp(max=size - 1)
    high = torch.where(at_edge, low, low + 1)
    frac = torch.where(at_edge, torch.zeros_like(coord), coord - low)
    return low, high, (1 - frac) * inside, frac * inside
