"""Exercises of notebook 06: one RoI Pool bin (quantised, max), one bilinear read (RoI Align's sample)."""

from __future__ import annotations

import torch
import torchvision

from rpnlab.detector.roi import roi_align, roi_pool
from rpnlab.lab.exercises.core import Case, Exercise, against, seeded

__all__ = ["BILINEAR", "ROI_POOL_BIN"]


def _pool_with(pool):
    def bin_value(feature, roi, output_size, i, j):
        rois = torch.cat((torch.zeros(1), roi)).reshape(1, 5)
        return pool(feature[None, None], rois, output_size, 1.0)[0, 0, i, j]
    return bin_value


def _pool_cases() -> list[Case]:
    g = seeded(601)
    f = torch.randn(10, 12, generator=g)
    peak = f.clone()
    peak[0, 4] = 10.0  # in bin (0, 0) of the x.5 case only when 2.5 rounds to 3
    t = torch.tensor
    return [
        Case("a box on whole cells, 2 x 2 output, bin (0, 0)", (f, t([2.0, 2.0, 5.0, 5.0]), 2, 0, 0),
             "corners are inclusive cells: x1 = 2 to x2 = 5 is 4 cells wide (x2 - x1 + 1), so bin (0, 0) "
             "is rows 2-3, columns 2-3; the bin's value is the maximum there."),
        Case("the same box, bin (1, 0)", (f, t([2.0, 2.0, 5.0, 5.0]), 2, 1, 0),
             "bin (i, j) is row i, column j: rows come from y, columns from x."),
        Case("corners between cells", (f, t([1.4, 2.6, 6.2, 7.7]), 2, 1, 1),
             "RoI Pool first rounds the corners to whole cells (1.4 -> 1, 2.6 -> 3): the quantisation "
             "this notebook measures."),
        Case("a width that does not divide into bins", (f, t([0.0, 0.0, 6.0, 4.0]), 3, 1, 1),
             "bin p covers cells floor(p * size / out) to ceil((p + 1) * size / out) (end excluded), "
             "from the box's first cell: bins are widened outwards and may share a cell."),
        Case("a corner at exactly x.5", (peak, t([2.5, 0.0, 5.0, 3.0]), 2, 0, 0),
             "the rounding is C's round(), halves away from zero (2.5 -> 3), i.e. floor(v + 0.5) for "
             "v >= 0; torch.round would give 2 (halves to even)."),
        Case("a box reaching past the feature map", (f, t([8.0, 6.0, 14.0, 13.0]), 2, 1, 1),
             "clip each bin to the map (rows < H, columns < W); a bin left empty is 0."),
    ]


ROI_POOL_BIN = Exercise(
    name="roi_pool_bin",
    task="feature (H, W), roi (4,) x1, y1, x2, y2 in cells, output_size, bin row i, column j -> that bin's value",
    cases=_pool_cases,
    verify=against(("rpnlab.detector.roi.roi_pool", _pool_with(roi_pool)),
                   ("torchvision.ops.roi_pool", _pool_with(torchvision.ops.roi_pool))),
    agrees_with="rpnlab's roi_pool and torchvision.ops.roi_pool",
)


def _align_with(align):
    # RoI Align with aligned=True samples one point in the middle of a 1 x 1 output's single bin,
    # at (x1 + x2) / 2 - 0.5: a zero-size box at (x + 0.5, y + 0.5) reads exactly (x, y).
    def read(feature, y, x):
        rois = torch.tensor([[0.0, x + 0.5, y + 0.5, x + 0.5, y + 0.5]], dtype=feature.dtype)
        return align(feature[None, None], rois, 1, 1.0, 1, True)[0, 0, 0, 0]
    return read


def _bilinear_cases() -> list[Case]:
    g = seeded(602)
    f = torch.randn(6, 7, generator=g)
    ramp = torch.arange(20.0).reshape(4, 5)
    return [
        Case("exactly on a cell", (f, 2.0, 3.0), "at whole coordinates the value is the cell's own: feature[y, x]."),
        Case("halfway between two cells of a row", (ramp, 1.0, 2.5),
             "between columns 2 and 3 the value is their average: weights (1 - fx) and fx with fx = x - floor(x)."),
        Case("a point inside four cells", (f, 1.25, 4.6),
             "blend the four surrounding cells: (1-fy)(1-fx) f[y0, x0] + (1-fy) fx f[y0, x1] + fy (1-fx) "
             "f[y1, x0] + fy fx f[y1, x1]."),
        Case("on the last row", (f, 5.0, 2.3),
             "on the last row (or column) there is no neighbour below: read only the last row, do not "
             "index past the map."),
        Case("the bottom-right corner", (f, 5.0, 6.0), "the last cell itself: both neighbours are clamped to the map."),
    ]


BILINEAR = Exercise(
    name="bilinear",
    task="feature (H, W), y, x (floats inside the map, in cells) -> the bilinearly interpolated value",
    cases=_bilinear_cases,
    verify=against(("rpnlab.detector.roi.roi_align", _align_with(roi_align)),
                   ("torchvision.ops.roi_align", _align_with(torchvision.ops.roi_align))),
    agrees_with="rpnlab's roi_align and torchvision.ops.roi_align (aligned=True) at one sample point",
)
