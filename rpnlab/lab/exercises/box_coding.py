"""Exercises of notebook 02: encode a box as offsets from its anchor, decode offsets into a box."""

from __future__ import annotations

import math

import torch
from torchvision.models.detection._utils import BoxCoder as TorchvisionBoxCoder

from rpnlab.detector.boxes import BoxCoder
from rpnlab.lab.exercises.core import Case, Exercise, against, random_boxes, seeded

__all__ = ["DECODE", "ENCODE"]

_TV = TorchvisionBoxCoder((1.0, 1.0, 1.0, 1.0))


def _encode_cases() -> list[Case]:
    g = seeded(201)
    t = torch.tensor
    anchor = t([[0.0, 0.0, 40.0, 20.0]])  # wide: width 40, height 20, centre (20, 10)
    return [
        Case("a box equal to its anchor", (anchor, anchor.clone()),
             "the same box has no offset at all: (0, 0, 0, 0); tw = log(w / wa) = log 1 = 0."),
        Case("a box moved 10 px right of a wide anchor", (anchor, t([[10.0, 0.0, 50.0, 20.0]])),
             "tx divides the centre shift by the anchor's WIDTH: 10 / 40 = 0.25 (the slip in this notebook "
             "divides it by the height)."),
        Case("a box moved 10 px down from a wide anchor", (anchor, t([[0.0, 10.0, 40.0, 30.0]])),
             "ty divides the centre shift by the anchor's HEIGHT: 10 / 20 = 0.5."),
        Case("a box twice as wide, same centre", (anchor, t([[-20.0, 0.0, 60.0, 20.0]])),
             "sizes are coded as logarithms: tw = log(w / wa) = log 2, not w / wa or w - wa."),
        Case("8 random anchor/box pairs", (random_boxes(8, g), random_boxes(8, g)),
             "work on centres and sizes (cx, cy, w, h), not on the corners; one row per pair."),
    ]


ENCODE = Exercise(
    name="encode",
    task="anchors (N, 4), boxes (N, 4) -> offsets (N, 4) = (tx, ty, tw, th) of each box from its anchor",
    cases=_encode_cases,
    verify=against(("rpnlab BoxCoder().encode", lambda a, b: BoxCoder().encode(a, b)),
                   ("torchvision BoxCoder.encode_single", lambda a, b: _TV.encode_single(b, a))),
    agrees_with="rpnlab's BoxCoder and torchvision's BoxCoder (weights 1, 1, 1, 1)",
)


def _decode_cases() -> list[Case]:
    g = seeded(202)
    t = torch.tensor
    anchor = t([[0.0, 0.0, 40.0, 20.0]])
    return [
        Case("zero offsets", (torch.zeros(1, 4), anchor),
             "offsets (0, 0, 0, 0) give the anchor back."),
        Case("tx = 0.5 on a wide anchor", (t([[0.5, 0.0, 0.0, 0.0]]), anchor),
             "the centre moves by tx * anchor WIDTH = 20 px to the right; the size stays."),
        Case("tw = log 2", (t([[0.0, 0.0, math.log(2.0), 0.0]]), anchor),
             "w = wa * exp(tw): twice as wide, around the same centre (x1 moves left, x2 right)."),
        Case("every offset at once", (t([[0.1, -0.2, 0.3, -0.4]]), anchor),
             "first the new centre and size (cx, cy, w, h), then the corners cx -+ w / 2, cy -+ h / 2."),
        Case("6 random offsets on random anchors", (torch.randn(6, 4, generator=g) * 0.5, random_boxes(6, g)),
             "one row per anchor; the same formulas as the small cases."),
    ]


DECODE = Exercise(
    name="decode",
    task="offsets (N, 4), anchors (N, 4) -> boxes (N, 4) x1, y1, x2, y2, the inverse of encode",
    cases=_decode_cases,
    verify=against(("rpnlab BoxCoder().decode", lambda d, a: BoxCoder().decode(d, a)),
                   ("torchvision BoxCoder.decode_single", lambda d, a: _TV.decode_single(d, a))),
    agrees_with="rpnlab's BoxCoder and torchvision's BoxCoder (weights 1, 1, 1, 1)",
)
