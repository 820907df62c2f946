"""Exercises of notebook 03: label anchors from the IoU matrix, sample a balanced minibatch."""

from __future__ import annotations

import torch
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler
from torchvision.models.detection._utils import Matcher as TorchvisionMatcher

from rpnlab.detector.matching import BalancedSampler, Matcher
from rpnlab.lab.exercises.core import Case, Exercise, against, seeded

__all__ = ["LABEL_ANCHORS", "SAMPLE"]


def _labels_from_matches(matches: torch.Tensor) -> torch.Tensor:
    labels = (matches >= 0).to(torch.float32)
    return labels.masked_fill(matches == Matcher.BETWEEN_THRESHOLDS, -1.0)


def _rpnlab_labels(iou, high, low):
    return _labels_from_matches(Matcher(high, low, allow_low_quality_matches=True)(iou))


def _torchvision_labels(iou, high, low):
    return _labels_from_matches(TorchvisionMatcher(high, low, allow_low_quality_matches=True)(iou))


def _label_cases() -> list[Case]:
    g = seeded(301)
    t = torch.tensor
    return [
        Case("one gt box, anchors clearly above, between and below", (t([[0.9, 0.5, 0.1, 0.0]]), 0.7, 0.3),
             "IoU >= high is positive (1), IoU < low negative (0), in between ignored (-1)."),
        Case("two gt boxes: each anchor takes its best one", (t([[0.8, 0.1, 0.2], [0.1, 0.75, 0.25]]), 0.7, 0.3),
             "an anchor is judged by its best IoU over all gt boxes: iou.max(dim=0)."),
        Case("IoU exactly at the thresholds", (t([[0.7, 0.3, 0.29, 0.2]]), 0.7, 0.3),
             "0.7 is positive (>= high) and 0.3 is ignored, not negative (negative is strictly below low)."),
        Case("a gt box that no anchor overlaps by 0.7", (t([[0.4, 0.2, 0.1], [0.0, 0.1, 0.9]]), 0.7, 0.3),
             "the paper's rule (i): every gt box's best anchor is positive even under 0.7, so each object "
             "has an anchor that learns it (here anchor 0, best for gt 0 with 0.4)."),
        Case("two anchors tie for a gt box's best IoU", (t([[0.5, 0.5, 0.2, 0.1]]), 0.7, 0.3),
             "all anchors equal to the gt box's best IoU are positive, not only the first one argmax returns."),
        Case("random 3 x 12 IoU matrix", ((torch.rand(3, 12, generator=g) * 0.9 + 0.05), 0.7, 0.3),
             "the same three rules plus the best-anchor rule, on a bigger matrix; labels are (A,) floats."),
        Case("other thresholds: high 0.6, low 0.4", (t([[0.65, 0.55, 0.45, 0.35, 0.6]]), 0.6, 0.4),
             "use the high and low you are given, not 0.7 and 0.3 written into the code."),
    ]


LABEL_ANCHORS = Exercise(
    name="label_anchors",
    task="iou (M, A) gt x anchors, high, low -> labels (A,): 1 positive, 0 negative, -1 ignored, with the best-anchor rule",
    cases=_label_cases,
    verify=against(("rpnlab Matcher", _rpnlab_labels), ("torchvision Matcher", _torchvision_labels)),
    agrees_with="rpnlab's Matcher and torchvision's Matcher (allow_low_quality_matches=True)",
)


def _sample_cases() -> list[Case]:
    g = seeded(302)

    def labels(num_pos, num_neg, num_ignored):
        lab = torch.tensor([1.0] * num_pos + [0.0] * num_neg + [-1.0] * num_ignored)
        return lab[torch.randperm(lab.numel(), generator=g)]

    return [
        Case("4 positives, 60 negatives, batch 16", (labels(4, 60, 10), 16, 0.5),
             "take every positive (4) and fill the rest of the batch with negatives: 4 + 12 = 16."),
        Case("40 positives, 60 negatives, batch 16", (labels(40, 60, 10), 16, 0.5),
             "positives are capped at int(batch_size * positive_fraction) = 8; negatives fill the rest (8)."),
        Case("no positives (an image without objects)", (labels(0, 30, 5), 16, 0.5),
             "with no positive at all the batch is all negatives: 16 of them."),
        Case("fewer anchors than the batch", (labels(3, 5, 4), 16, 0.5),
             "when there are not enough, take all positives and all negatives; never ignored anchors (-1)."),
        Case("positive fraction 0.25", (labels(30, 60, 0), 32, 0.25),
             "use the positive_fraction you are given: at most int(32 * 0.25) = 8 positives, 24 negatives."),
        Case("many candidates: which ones", (labels(50, 500, 0), 64, 0.5),
             "pick positives and negatives at random (torch.randperm), not the first ones: the first "
             "anchors are the top-left of the image, so the RPN would learn from one corner only. "
             "Two calls should not draw the same set."),
    ]


def _counts(labels: torch.Tensor, batch: int, fraction: float) -> tuple[int, int]:
    """The expected (positives, negatives), from rpnlab's and torchvision's samplers (they must agree)."""
    with torch.random.fork_rng(devices=[]):  # the samplers draw from the global RNG: leave it as it was
        ours = [m[0].sum().item() for m in BalancedSampler(batch, fraction)([labels])]
        theirs = [m[0].sum().item() for m in BalancedPositiveNegativeSampler(batch, fraction)([labels])]
    if ours != theirs:
        raise AssertionError(f"rpnlab and torchvision samplers disagree: {ours} vs {theirs}")
    return int(ours[0]), int(ours[1])


def _verify_sample(args: tuple, got) -> str | None:
    labels, batch, fraction = args
    if not (isinstance(got, (tuple, list)) and len(got) == 2):
        return f"return a pair (pos_mask, neg_mask), got {type(got).__name__}"
    for what, mask in zip(("pos_mask", "neg_mask"), got):
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != labels.shape:
            return (f"{what} must be a bool tensor of shape {tuple(labels.shape)}, got "
                    f"{getattr(mask, 'dtype', type(mask).__name__)} {tuple(getattr(mask, 'shape', ()))}")
    pos, neg = got
    if (pos & (labels != 1)).any():
        return "pos_mask marks anchors that are not positive (label 1)"
    if (neg & (labels != 0)).any():
        return "neg_mask marks anchors that are not negative (label 0)"
    want = _counts(labels, batch, fraction)
    have = (int(pos.sum()), int(neg.sum()))
    if have != want:
        return f"sampled (positives, negatives) = {have} where {want} was expected   [reference: rpnlab BalancedSampler and torchvision BalancedPositiveNegativeSampler]"
    # More candidates than places: the choice must be random. The first ones in index order, for
    # both kinds, is what a slice gives (a random draw lands there with negligible probability).
    more_than_places = want[0] < int((labels == 1).sum()) or want[1] < int((labels == 0).sum())
    if more_than_places and _first_ones(pos, labels == 1) and _first_ones(neg, labels == 0):
        return ("the sample is the first candidates in index order, not a random draw (the first anchors are "
                "the image's top-left corner: use torch.randperm)")
    return None


def _first_ones(mask: torch.Tensor, candidates: torch.Tensor) -> bool:
    count = int(mask.sum())
    return torch.equal(torch.where(mask)[0], torch.where(candidates)[0][:count])


SAMPLE = Exercise(
    name="sample",
    task="labels (A,) 1/0/-1, batch_size, positive_fraction -> (pos_mask, neg_mask), bool (A,) each",
    cases=_sample_cases,
    verify=_verify_sample,
    agrees_with="the counts of rpnlab's BalancedSampler and torchvision's BalancedPositiveNegativeSampler",
)
