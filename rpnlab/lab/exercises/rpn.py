"""Exercises of notebook 04: smooth L1, and the RPN's two losses over the sampled anchors."""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler
from torchvision.models.detection.rpn import RegionProposalNetwork

from rpnlab.detector.losses import rpn_loss, smooth_l1
from rpnlab.lab.exercises.core import Case, Exercise, against, compare_tensors, seeded

__all__ = ["RPN_LOSS", "SMOOTH_L1"]


def _smooth_cases() -> list[Case]:
    g = seeded(401)
    t = torch.tensor
    return [
        Case("small differences, beta 1", (t([0.1, -0.2, 0.0]), t([0.0, 0.0, 0.0]), 1.0),
             "below beta the loss is quadratic, 0.5 * d**2 / beta: gentle near the target."),
        Case("large differences, beta 1", (t([3.0, -2.0]), t([0.0, 0.0]), 1.0),
             "at and above beta it is linear, |d| - 0.5 * beta (so outliers do not dominate); "
             "the two pieces meet at |d| = beta."),
        Case("the RPN's beta = 1/9 (sigma = 3)", (t([0.05, 0.2, -0.5]), t([0.0, 0.1, 0.0]), 1.0 / 9),
             "use the beta you are given, in both pieces; d = input - target."),
        Case("a (5, 4) batch of offsets", (torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g), 1.0 / 9),
             "return the SUM over every element (a scalar), as the RPN loss divides it afterwards."),
    ]


SMOOTH_L1 = Exercise(
    name="smooth_l1",
    task="input, target (same shape), beta -> the summed smooth L1 loss, a scalar",
    cases=_smooth_cases,
    verify=against(("rpnlab.detector.losses.smooth_l1", lambda x, y, b: smooth_l1(x, y, b, reduction="sum")),
                   ("torch.nn.functional.smooth_l1_loss", lambda x, y, b: F.smooth_l1_loss(x, y, beta=b, reduction="sum"))),
    agrees_with="rpnlab's smooth_l1 and torch.nn.functional.smooth_l1_loss",
)


def _rpnlab_rpn(objectness, deltas, labels, targets):
    out = rpn_loss(objectness, deltas, labels, targets, normalization="sampled")
    return torch.stack((out["loss_objectness"], out["loss_rpn_box_reg"]))


def _torchvision_rpn(objectness, deltas, labels, targets):
    if not (labels >= 0).any():
        return None  # torchvision's mean over no sampled anchor is NaN
    # A sampler with room for every labelled anchor takes them all: the same set as `labels`.
    rpn = SimpleNamespace(fg_bg_sampler=BalancedPositiveNegativeSampler(10**9, 0.5))
    with torch.random.fork_rng(devices=[]):
        loss_obj, loss_box = RegionProposalNetwork.compute_loss(
            rpn, objectness.reshape(-1, 1), deltas.reshape(-1, 4), list(labels), list(targets))
    return torch.stack((loss_obj, loss_box))


def _compare_pair(got, expected):
    if not (isinstance(got, (tuple, list)) and len(got) == 2):
        return f"return a pair (loss_objectness, loss_box), got {type(got).__name__}"
    if not all(isinstance(v, torch.Tensor) and v.numel() == 1 for v in got):
        return "each loss must be a scalar tensor"
    return compare_tensors(torch.stack([v.reshape(()) for v in got]), expected,
                           what="(loss_objectness, loss_box)")


def _rpn_cases() -> list[Case]:
    g = seeded(402)

    def batch(b, a, labels):
        return (torch.randn(b, a, generator=g), torch.randn(b, a, 4, generator=g) * 0.3,
                torch.tensor(labels, dtype=torch.float32).reshape(b, a), torch.randn(b, a, 4, generator=g) * 0.3)

    infinite = batch(1, 4, [1, 0, 0, -1])
    infinite[3][0, 1:] = float("inf")  # zero-size gt at non-positive anchors: never read
    return [
        Case("negatives only: the objectness loss", batch(1, 5, [0, 0, 0, 0, 0]),
             "objectness is the binary cross-entropy with logits (F.binary_cross_entropy_with_logits) averaged "
             "over the sampled anchors; with no positive the box loss is exactly 0, not NaN (0 / 0)."),
        Case("one positive among 8 sampled: the box loss's divisor", batch(1, 8, [1, 0, 0, 0, 0, 0, 0, 0]),
             "the box loss is smooth L1 (beta = 1/9) summed over the positives only and divided by the number "
             "of SAMPLED anchors (positives and negatives), not by the number of positives."),
        Case("some anchors not sampled (-1)", batch(1, 8, [1, -1, 0, -1, 0, 1, -1, 0]),
             "anchors labelled -1 take no part in either loss: leave them out of the sums and the counts."),
        Case("a batch of two images", batch(2, 5, [1, 0, -1, 0, 0, 0, 0, 1, 1, -1]),
             "both losses are over the sampled anchors of the whole batch at once, not averaged per image."),
        Case("inf targets where nothing is regressed", infinite,
             "targets are only read at positives; selecting them (indexing, or torch.where) is safe, but "
             "multiplying by a 0/1 mask gives 0 * inf = NaN."),
        Case("every anchor sampled", batch(1, 6, [1, 1, 0, 0, 0, 0]),
             "the same rules on another draw."),
    ]


RPN_LOSS = Exercise(
    name="rpn_loss",
    task=("objectness (B, A) logits, deltas (B, A, 4), labels (B, A) 1/0/-1, targets (B, A, 4) -> "
          "(loss_objectness, loss_box), beta = 1/9"),
    cases=_rpn_cases,
    verify=against(("rpnlab.detector.losses.rpn_loss", _rpnlab_rpn),
                   ("torchvision RegionProposalNetwork.compute_loss", _torchvision_rpn), compare=_compare_pair),
    agrees_with="rpnlab's rpn_loss (normalization='sampled') and torchvision's RegionProposalNetwork.compute_loss",
)
