"""Exercises of notebook 05: clip proposals to the image, greedy non-maximum suppression."""

from __future__ import annotations

import torch
import torchvision

from rpnlab.detector.boxes import clip_boxes
from rpnlab.detector.proposals import nms
from rpnlab.lab.exercises.core import Case, Exercise, against, random_boxes, seeded

__all__ = ["CLIP_BOXES", "NMS"]


def _clip_cases() -> list[Case]:
    g = seeded(501)
    t = torch.tensor
    return [
        Case("a box inside the image", (t([[10.0, 20.0, 30.0, 40.0]]), (50, 60)),
             "a box inside the image stays as it is."),
        Case("a box sticking out left and top", (t([[-12.0, -5.0, 30.0, 40.0]]), (50, 60)),
             "coordinates below 0 become 0."),
        Case("a box sticking out right and bottom of a wide image", (t([[10.0, 20.0, 90.0, 70.0]]), (50, 80)),
             "image_size is (height, width): x is clipped to [0, width] = [0, 80], y to [0, height] = [0, 50]."),
        Case("10 decoded boxes, many outside", (random_boxes(10, g, size=120.0) - 30.0, (64, 48)),
             "clip every coordinate; one row per box, the shape stays (N, 4)."),
    ]


CLIP_BOXES = Exercise(
    name="clip_boxes",
    task="boxes (N, 4), image_size (height, width) -> boxes (N, 4) inside the image",
    cases=_clip_cases,
    verify=against(("rpnlab.detector.boxes.clip_boxes", clip_boxes),
                   ("torchvision.ops.clip_boxes_to_image", torchvision.ops.clip_boxes_to_image)),
    agrees_with="rpnlab's clip_boxes and torchvision.ops.clip_boxes_to_image",
)


def _nms_cases() -> list[Case]:
    g = seeded(502)
    t = torch.tensor
    cluster = torch.cat([random_boxes(6, g, size=30.0) + shift for shift in (0.0, 40.0, 80.0)])
    return [
        Case("three boxes that do not overlap", (t([[0.0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10]]),
                                                  t([0.5, 0.9, 0.7]), 0.5),
             "nothing overlaps, so every box is kept, listed by decreasing score: [1, 2, 0]."),
        Case("two near-duplicates", (t([[0.0, 0, 10, 10], [1, 1, 11, 11]]), t([0.6, 0.8]), 0.5),
             "the higher-scoring box is kept and removes the lower one (IoU 0.68 > 0.5)."),
        Case("a chain: A suppresses B, B overlaps C but A does not",
             (t([[0.0, 0, 10, 10], [4, 0, 14, 10], [8, 0, 18, 10]]), t([0.9, 0.8, 0.7]), 0.3),
             "only KEPT boxes suppress: B is removed by A, so C (which only overlaps B) survives. Go box by "
             "box from the top score, not with one IoU matrix test for all pairs."),
        Case("IoU exactly at the threshold", (t([[0.0, 0, 4, 1], [0, 0, 2, 1]]), t([0.9, 0.8]), 0.5),
             "a box is removed when its IoU is strictly above the threshold; 0.5 is not > 0.5, so both stay."),
        Case("18 boxes in three clusters", (cluster, torch.rand(18, generator=g), 0.5),
             "return indices into the input boxes (int64), in decreasing score order."),
        Case("no boxes", (torch.zeros(0, 4), torch.zeros(0), 0.7),
             "no boxes in, an empty int64 tensor out."),
    ]


NMS = Exercise(
    name="nms",
    task="boxes (N, 4), scores (N,), iou_threshold -> keep (K,) int64 indices, by decreasing score",
    cases=_nms_cases,
    verify=against(("rpnlab.detector.proposals.nms", nms), ("torchvision.ops.nms", torchvision.ops.nms)),
    agrees_with="rpnlab's nms and torchvision.ops.nms",
)
