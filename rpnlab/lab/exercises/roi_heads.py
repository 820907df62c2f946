"""Exercises of notebook 07: label the proposals the head learns from, and the head's two losses."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torchvision.models.detection._utils import Matcher as TorchvisionMatcher
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss

from rpnlab.detector.losses import fast_rcnn_loss
from rpnlab.detector.roi_heads import ProposalTargetSampler
from rpnlab.lab.exercises.core import Case, Exercise, against, compare_tensors, random_boxes, seeded

__all__ = ["FAST_RCNN_LOSS", "PROPOSAL_LABELS"]


def _rpnlab_labels(proposals, gt_boxes, gt_labels, fg, bg_high, bg_low):
    sampler = ProposalTargetSampler(fg, bg_high, bg_low)
    return sampler.label_proposals(proposals, gt_boxes, gt_labels)[0]


def _torchvision_labels(proposals, gt_boxes, gt_labels, fg, bg_high, bg_low):
    if bg_low != 0:
        return None  # torchvision has no lower background threshold
    heads = SimpleNamespace(proposal_matcher=TorchvisionMatcher(fg, bg_high, allow_low_quality_matches=False))
    return RoIHeads.assign_targets_to_proposals(heads, [proposals], [gt_boxes], [gt_labels])[1][0]


def _label_cases() -> list[Case]:
    g = seeded(701)
    t = torch.tensor
    gt = t([[10.0, 10.0, 50.0, 50.0], [60.0, 10.0, 90.0, 40.0]])
    classes = t([2, 1])
    shifted = t([[12.0, 12.0, 52.0, 52.0], [61.0, 10.0, 91.0, 40.0], [100.0, 80.0, 120.0, 100.0]])
    return [
        Case("proposals on two objects of classes 2 and 1, one on nothing", (shifted, gt, classes, 0.5, 0.5, 0.0),
             "a foreground proposal gets the CLASS of its best gt box (2 or 1 here), not 1; IoU below 0.5 "
             "is background 0."),
        Case("IoU exactly 0.5", (t([[10.0, 10.0, 50.0, 30.0]]), gt, classes, 0.5, 0.5, 0.0),
             "IoU 0.5 is foreground: foreground is IoU >= fg_thresh."),
        Case("the lower background threshold 0.1 (Fast R-CNN)", (shifted, gt, classes, 0.5, 0.5, 0.1),
             "background needs an IoU in [bg_low, bg_high): a proposal touching no object (IoU < 0.1) is "
             "ignored (-1), so background RoIs are ones near objects."),
        Case("a gap between the thresholds", (t([[10.0, 10.0, 50.0, 35.0], [10.0, 10.0, 30.0, 30.0]]), gt, classes,
                                              0.7, 0.3, 0.0),
             "with fg 0.7 and bg_high 0.3, an IoU of 0.625 is neither: ignored (-1); 0.25 is background."),
        Case("12 random proposals, 3 objects", (random_boxes(12, g, 100.0), random_boxes(3, g, 100.0), t([1, 3, 2]),
                                                 0.5, 0.5, 0.1),
             "each proposal is judged by its best IoU over all gt boxes; labels are int64 (P,)."),
    ]


PROPOSAL_LABELS = Exercise(
    name="proposal_labels",
    task=("proposals (P, 4), gt_boxes (M, 4), gt_labels (M,), fg_thresh, bg_high, bg_low -> labels (P,) int64: "
          "the class, 0 background, -1 ignored"),
    cases=_label_cases,
    verify=against(("rpnlab ProposalTargetSampler.label_proposals", _rpnlab_labels),
                   ("torchvision RoIHeads.assign_targets_to_proposals", _torchvision_labels)),
    agrees_with="rpnlab's ProposalTargetSampler and, at bg_low 0, torchvision's RoIHeads",
)


def _rpnlab_loss(class_logits, box_regression, labels, targets):
    return torch.stack(fast_rcnn_loss(class_logits, box_regression, labels, targets))


def _torchvision_loss(class_logits, box_regression, labels, targets):
    return torch.stack(fastrcnn_loss(class_logits, box_regression, [labels], [targets]))


def _compare_pair(got, expected):
    if not (isinstance(got, (tuple, list)) and len(got) == 2):
        return f"return a pair (loss_classifier, loss_box), got {type(got).__name__}"
    if not all(isinstance(v, torch.Tensor) and v.numel() == 1 for v in got):
        return "each loss must be a scalar tensor"
    return compare_tensors(torch.stack([v.reshape(()) for v in got]), expected, what="(loss_classifier, loss_box)")


def _loss_cases() -> list[Case]:
    g = seeded(702)

    def rois(labels, classes=3):
        r = len(labels)
        return (torch.randn(r, classes + 1, generator=g), torch.randn(r, 4 * (classes + 1), generator=g) * 0.3,
                torch.tensor(labels), torch.randn(r, 4, generator=g) * 0.3)

    return [
        Case("background RoIs only: the classifier loss", rois([0, 0, 0]),
             "classification is the cross-entropy over the C + 1 classes (F.cross_entropy), averaged over all "
             "RoIs; background RoIs (label 0) regress nothing, so the box loss is 0."),
        Case("one foreground RoI of class 1", rois([1]),
             "a foreground RoI regresses the 4 deltas of its OWN class, columns 4 * c to 4 * c + 4 of "
             "box_regression (column 0-3 is background), with smooth L1, beta = 1/9."),
        Case("foreground RoIs of classes 2 and 3", rois([2, 3]),
             "each RoI takes its own class's 4 columns: index box_regression.reshape(R, C + 1, 4) by [row, label]."),
        Case("one foreground among 6 RoIs: the box loss's divisor", rois([1, 0, 0, 0, 0, 0]),
             "the box loss is summed over foreground RoIs and divided by ALL RoIs (R), not by the number of "
             "foreground ones."),
        Case("16 RoIs", rois([0, 1, 2, 3] * 4), "the same rules on a larger batch."),
    ]


FAST_RCNN_LOSS = Exercise(
    name="fast_rcnn_loss",
    task=("class_logits (R, C+1), box_regression (R, 4(C+1)), labels (R,), targets (R, 4) -> "
          "(loss_classifier, loss_box), beta = 1/9"),
    cases=_loss_cases,
    verify=against(("rpnlab.detector.losses.fast_rcnn_loss", _rpnlab_loss),
                   ("torchvision fastrcnn_loss", _torchvision_loss), compare=_compare_pair),
    agrees_with="rpnlab's fast_rcnn_loss and torchvision's fastrcnn_loss",
)
