"""Exercises of notebook 01: IoU of every pair, the k base anchors, anchors at every location."""

from __future__ import annotations

import torch
import torchvision
from torchvision.models.detection.anchor_utils import AnchorGenerator as TorchvisionAnchorGenerator

from rpnlab.detector.anchors import AnchorGenerator
from rpnlab.detector.boxes import box_iou
from rpnlab.lab.exercises.core import Case, Exercise, against, random_boxes, seeded

__all__ = ["ANCHOR_GRID", "BASE_ANCHORS", "IOU"]


def _iou_cases() -> list[Case]:
    g = seeded(101)
    t = torch.tensor
    return [
        Case("one box against itself", (t([[10.0, 10.0, 30.0, 20.0]]), t([[10.0, 10.0, 30.0, 20.0]])),
             "a box overlaps itself completely: intersection = union, IoU 1."),
        Case("two boxes side by side, overlapping by half a width",
             (t([[0.0, 0.0, 20.0, 10.0]]), t([[10.0, 0.0, 30.0, 10.0]])),
             "the union is area1 + area2 - intersection (the overlap must not be counted twice): 100 / 300."),
        Case("two boxes that do not overlap", (t([[0.0, 0.0, 10.0, 10.0]]), t([[20.0, 30.0, 40.0, 50.0]])),
             "the intersection's width or height comes out negative when boxes are apart; clamp both at 0 "
             "(a negative times a negative would even give a positive area)."),
        Case("a small box inside a large one", (t([[0.0, 0.0, 40.0, 40.0]]), t([[10.0, 10.0, 20.0, 30.0]])),
             "the intersection's corners are the larger top-left (max of x1, y1) and the smaller bottom-right "
             "(min of x2, y2)."),
        Case("3 boxes against 2 (every pair)", (random_boxes(3, g), random_boxes(2, g)),
             "the result is (N, M): row i, column j is IoU(boxes1[i], boxes2[j]); broadcast boxes1[:, None] "
             "against boxes2[None, :]."),
        Case("7 boxes against 5", (random_boxes(7, g), random_boxes(5, g)),
             "every pair is needed, with the same formula as the small cases."),
        Case("no boxes in boxes1 (an image without objects)", (torch.zeros(0, 4), random_boxes(4, g)),
             "N may be 0: the answer is an empty (0, M) tensor; broadcasting gives it for free, a Python "
             "loop over rows with torch.stack does not."),
    ]


IOU = Exercise(
    name="iou",
    task="IoU of every pair, boxes1 (N, 4) and boxes2 (M, 4) -> (N, M)",
    cases=_iou_cases,
    verify=against(("rpnlab.detector.boxes.box_iou", box_iou), ("torchvision.ops.box_iou", torchvision.ops.box_iou)),
    agrees_with="rpnlab.detector.boxes.box_iou and torchvision.ops.box_iou",
)


def _rpnlab_base(sizes, ratios):
    return AnchorGenerator(sizes=tuple(sizes), aspect_ratios=tuple(ratios)).base_anchors(0)


def _torchvision_base(sizes, ratios):
    return TorchvisionAnchorGenerator().generate_anchors(list(sizes), list(ratios))


def _base_cases() -> list[Case]:
    return [
        Case("one size, ratio 1", ([32.0], [1.0]),
             "a square anchor of size s is [-s/2, -s/2, s/2, s/2]: centred on (0, 0)."),
        Case("one size, ratio 2 (height / width)", ([32.0], [2.0]),
             "the ratio is height / width and the area stays size**2: h = size * sqrt(ratio), "
             "w = size / sqrt(ratio). Ratio 2 is a tall box."),
        Case("one size, ratios 0.5, 1, 2", ([64.0], [0.5, 1.0, 2.0]),
             "round the corners to whole pixels with torch.round, as torchvision does (90.51 -> 91)."),
        Case("sizes 16, 32 and ratios 0.5, 1, 2 (k = 6)", ([16.0, 32.0], [0.5, 1.0, 2.0]),
             "the order is ratios outer, sizes inner: (0.5, 16), (0.5, 32), (1, 16), ... as torchvision "
             "and the RPN head's channels expect."),
        Case("the paper's 9 anchors", ([128.0, 256.0, 512.0], [0.5, 1.0, 2.0]),
             "the same rule at the paper's sizes: 9 rows, ratios outer, sizes inner."),
    ]


BASE_ANCHORS = Exercise(
    name="base_anchors",
    task="the k = len(ratios) * len(sizes) anchors centred on (0, 0), (k, 4), ratios outer, sizes inner, rounded",
    cases=_base_cases,
    verify=against(("rpnlab AnchorGenerator.base_anchors", _rpnlab_base),
                   ("torchvision AnchorGenerator.generate_anchors", _torchvision_base)),
    agrees_with="rpnlab's AnchorGenerator and torchvision's AnchorGenerator",
)


def _rpnlab_grid(base, feature_size, stride, offset):
    # The base anchors of the case come from these sizes and ratios (see _grid_cases).
    generator = AnchorGenerator(sizes=(32.0, 64.0), aspect_ratios=(0.5, 1.0, 2.0), strides=(stride,), offset=offset)
    if not torch.equal(generator.base_anchors(0), base):
        raise AssertionError("case base anchors out of step with the reference generator")
    return generator([feature_size])


def _torchvision_grid(base, feature_size, stride, offset):
    if offset != 0:
        return None  # torchvision puts the centres on the cells' top-left corners only
    generator = TorchvisionAnchorGenerator(((32, 64),), ((0.5, 1.0, 2.0),))
    generator.cell_anchors = [base]
    s = torch.tensor(stride)
    return generator.grid_anchors([list(feature_size)], [[s, s]])[0].to(base.dtype)


def _grid_cases() -> list[Case]:
    base = AnchorGenerator(sizes=(32.0, 64.0), aspect_ratios=(0.5, 1.0, 2.0)).base_anchors(0)
    return [
        Case("a 1 x 1 feature map", (base, (1, 1), 16, 0.0),
             "the only location is cell (0, 0) whose centre is at (0 + offset) * stride = 0: the base "
             "anchors themselves."),
        Case("one row of 3 cells", (base, (1, 3), 16, 0.0),
             "centres move by stride pixels per column: x = (j + offset) * stride; the k anchors of one "
             "location come together (location outer, anchor inner)."),
        Case("a 2 x 3 map (rows and columns)", (base, (2, 3), 16, 0.0),
             "locations go row by row (row i outer, column j inner), like reading the feature map; "
             "x comes from the column, y from the row (torch.meshgrid(ys, xs, indexing='ij'))."),
        Case("a 3 x 2 map, stride 8, centres at cell centres (offset 0.5)", (base, (3, 2), 8, 0.5),
             "with offset 0.5 the centres are ((j + 0.5) * stride, (i + 0.5) * stride): the middle of each cell."),
        Case("a 4 x 5 map, stride 32", (base, (4, 5), 32, 0.0),
             "shift every base anchor by its location's centre: (cx, cy, cx, cy) + base."),
    ]


ANCHOR_GRID = Exercise(
    name="anchor_grid",
    task="base (k, 4), feature_size (H, W), stride, offset -> (H * W * k, 4) anchors, locations row by row",
    cases=_grid_cases,
    verify=against(("rpnlab AnchorGenerator", _rpnlab_grid), ("torchvision AnchorGenerator.grid_anchors", _torchvision_grid)),
    agrees_with="rpnlab's AnchorGenerator and, at offset 0, torchvision's grid_anchors",
)
