"""Exercises of notebook 10: the FPN level of a RoI, and the proposal layer's top-k per level."""

from __future__ import annotations

import torch
from torch import Tensor

from rpnlab.detector.proposals import ProposalLayer
from rpnlab.detector.roi import fpn_level_of_boxes
from rpnlab.lab.exercises.core import Case, Exercise, against, compare_tensors, seeded

__all__ = ["FPN_LEVEL", "TOP_K_PER_LEVEL"]


def _square(side: float, x: float = 10.0, y: float = 10.0) -> list[float]:
    return [x, y, x + side, y + side]


def _torchvision_level(boxes: Tensor, k_min: int, k_max: int) -> Tensor:
    from torchvision.ops.poolers import LevelMapper

    return LevelMapper(k_min, k_max)([boxes])


def _level_cases() -> list[Case]:
    t = torch.tensor
    return [
        Case("a 224 x 224 box on levels P2-P5", (t([_square(224.0)]), 2, 5),
             "a box of sqrt(w * h) = 224 px (ImageNet's size) is canonical: level k0 = 4, returned as "
             "k - k_min = 2, an index into the pooler's levels."),
        Case("squares of 112, 180, 300, 400 and 448 px",
             (t([_square(s) for s in (112.0, 180.0, 300.0, 400.0, 448.0)]), 2, 5),
             "k = floor(4 + log2(sqrt(w * h) / 224)): each doubling of the side is one level up, and it is a "
             "floor, not a rounding (400 px stays on level 4, 180 px on level 3)."),
        Case("a thin box, 28 x 448 px", (t([[0.0, 0.0, 28.0, 448.0]]), 2, 5),
             "the scale is sqrt(w * h), the side of the square of the same area (here 112 px), not the "
             "longer or the shorter side."),
        Case("a 20 px and a 1000 px box", (t([_square(20.0), _square(1000.0)]), 2, 5),
             "clamp k to [k_min, k_max]: boxes smaller than the finest level's range still go to the "
             "finest level, larger ones to the coarsest."),
        Case("a 224 px box whose float32 area comes out a hair smaller",
             (t([[292.4120178222656, 139.15174865722656, 516.4119873046875, 363.1517333984375]]), 2, 5),
             "float32 gives sqrt(w * h) = 223.99997 for this 224 px box, so log2 is a hair below 0; add "
             "torchvision's eps = 1e-6 before the floor so that it stays on level 4."),
        Case("a pooler on P3-P5 only", (t([_square(56.0), _square(224.0), _square(600.0)]), 3, 5),
             "subtract k_min: the result indexes the pooler's own levels (0 is P3 here)."),
        Case("no boxes", (torch.zeros(0, 4), 2, 5),
             "an image without RoIs gives an empty (0,) int64 tensor."),
    ]


FPN_LEVEL = Exercise(
    name="fpn_level",
    task="boxes (K, 4) x1, y1, x2, y2 in pixels, k_min, k_max -> (K,) int64 index k - k_min of each box's level",
    cases=_level_cases,
    verify=against(("rpnlab.detector.roi.fpn_level_of_boxes", fpn_level_of_boxes),
                   ("torchvision.ops.poolers.LevelMapper", _torchvision_level)),
    agrees_with="rpnlab's fpn_level_of_boxes and torchvision's LevelMapper",
)


def _rpnlab_top_k(objectness: Tensor, num_anchors_per_level: list[int], k: int) -> Tensor:
    return ProposalLayer(pre_nms_top_n=k).eval()._top_k_per_level(objectness, num_anchors_per_level, k)


def _torchvision_top_k(objectness: Tensor, num_anchors_per_level: list[int], k: int) -> Tensor:
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead

    counts = {"training": k, "testing": k}
    rpn = RegionProposalNetwork(AnchorGenerator(), RPNHead(1, 1), 0.7, 0.3, 256, 0.5, counts, counts, 0.7)
    return rpn.eval()._get_top_n_idx(objectness, list(num_anchors_per_level))


def _same_anchors(got, expected: Tensor) -> str | None:
    """The anchors chosen per image, in any order within an image (NMS sorts them by score anyway)."""
    if not isinstance(got, Tensor):
        return f"the result must be a torch.Tensor, got {type(got).__name__}"
    if got.dim() != 2:
        return f"the result has shape {tuple(got.shape)} where {tuple(expected.shape)} (B, K) was expected"
    return compare_tensors(got.sort(dim=1).values, expected.sort(dim=1).values,
                           what="the chosen anchor indices (sorted per image)")


def _top_k_cases() -> list[Case]:
    g = seeded(1001)
    low_level = torch.cat((torch.randn(1, 30, generator=g) + 3, torch.randn(1, 10, generator=g) - 3), dim=1)
    # three levels whose 3 best anchors each are the 9 best overall: a global top-9 picks the same
    three = -torch.rand(1, 35, generator=g)
    for start, n in ((0, 20), (20, 10), (30, 5)):
        three[0, start + torch.randperm(n, generator=g)[:3]] = 1 + torch.rand(3, generator=g)
    return [
        Case("one level of 20 anchors, k = 5", (torch.randn(1, 20, generator=g), [20], 5),
             "return the indices of the k largest logits (torch.topk), not the logits themselves."),
        Case("three levels", (three, [20, 10, 5], 3),
             "indices are positions in the full anchor list: add the level's offset (the number of "
             "anchors of the levels before it) to the index within the level."),
        Case("two levels, the second scoring lower everywhere", (low_level, [30, 10], 4),
             "a top-k over all anchors at once takes none of the second level: take k from EACH level, "
             "which is what keeps the coarse levels (few anchors) from being starved by the fine ones."),
        Case("a level with fewer anchors than k", (torch.randn(1, 26, generator=g), [24, 2], 4),
             "a level with fewer than k anchors gives all of them: take min(k, A_l)."),
        Case("two images", (torch.randn(2, 30, generator=g), [16, 8, 6], 3),
             "each image has its own top-k: work along dim 1, image by image, not over the whole batch."),
    ]


TOP_K_PER_LEVEL = Exercise(
    name="top_k_per_level",
    task="objectness (B, A) logits, num_anchors_per_level [A_l], k -> (B, K) anchor indices, the k best of every level",
    cases=_top_k_cases,
    verify=against(("rpnlab.detector.proposals.ProposalLayer (per-level top-k)", _rpnlab_top_k),
                   ("torchvision RegionProposalNetwork._get_top_n_idx", _torchvision_top_k), compare=_same_anchors),
    agrees_with="rpnlab's ProposalLayer and torchvision's RegionProposalNetwork (per-level top-k)",
)
