"""torchvision twins of rpnlab's pieces, built with the same weights and settings.

The notebooks check each stage against torchvision side by side; building torchvision's module
with the same weights takes more lines than the check itself, so it lives here.

- ``torchvision_rpn(rpn)``: a ``torchvision.models.detection.rpn.RegionProposalNetwork`` with our
  RPN's head weights, anchors and settings; ``torchvision_rpn_forward`` runs it on our inputs,
  optionally with our sampled anchors (so the two losses see the same random draw).
- ``torchvision_postprocess``: torchvision's ``RoIHeads.postprocess_detections`` as a function
  returning our per-image detection dicts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["torchvision_postprocess", "torchvision_rpn", "torchvision_rpn_forward"]


class _OurAnchors(nn.Module):
    """Our anchor generator behind torchvision's ``anchor_generator(images, features)`` interface,
    for conventions torchvision's generator lacks (centre offset 0.5, ratios as w/h)."""

    def __init__(self, generator):
        super().__init__()
        self.generator = generator

    def num_anchors_per_location(self) -> list[int]:
        return self.generator.num_anchors_per_location()

    def forward(self, images, features: list[Tensor]) -> list[Tensor]:
        sizes = [tuple(f.shape[-2:]) for f in features]
        anchors = self.generator(sizes, device=features[0].device, dtype=features[0].dtype)
        return [anchors for _ in images.image_sizes]


def torchvision_rpn(rpn, **config_overrides):
    """A torchvision ``RegionProposalNetwork`` equivalent to ``rpn`` (an ``rpnlab.detector.rpn.RegionProposalNetwork``).

    Same matcher thresholds, sampler sizes, proposal settings and train/eval mode;
    ``config_overrides`` replace ``RPNConfig`` fields first (e.g. ``nms_thresh=0.5``).

    - Anchors: torchvision's ``AnchorGenerator`` with our sizes and ratios when it can express our
      convention (offset 0, ratios as h/w); otherwise our generator behind its interface (the
      anchors themselves are then not part of the comparison; notebook 01 compares them).
    - Head: a torchvision ``RPNHead`` with our weights copied when our 3x3 conv keeps the channel
      count, as torchvision's does; otherwise our head module itself (same output format).
      Either way torchvision's own code flattens, decodes, matches, samples, computes the losses
      and filters the proposals.

    Only what torchvision has: sigmoid objectness, one feature level.
    """
    import dataclasses

    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead

    cfg = dataclasses.replace(rpn.config, **config_overrides).validate()
    gen = rpn.anchor_generator
    if rpn.mode != "sigmoid":
        raise ValueError("torchvision's RPN has sigmoid objectness only; this RPN uses 'softmax'")
    if len(gen.sizes) != 1:
        raise ValueError(f"torchvision_rpn takes one anchor level, this RPN has {len(gen.sizes)}")
    if gen.offset == 0.0 and gen.ratio_convention == "h/w":
        anchor_generator = AnchorGenerator((tuple(gen.sizes[0]),), (tuple(gen.aspect_ratios[0]),))
    else:
        anchor_generator = _OurAnchors(gen)
    conv = rpn.head.conv
    if conv.in_channels == conv.out_channels:
        head = RPNHead(conv.in_channels, rpn.head.num_anchors)
        head.conv[0][0].load_state_dict(conv.state_dict())
        head.cls_logits.load_state_dict(rpn.head.cls_logits.state_dict())
        head.bbox_pred.load_state_dict(rpn.head.bbox_pred.state_dict())
    else:
        head = rpn.head
    tv = RegionProposalNetwork(
        anchor_generator,
        head,
        cfg.fg_iou_thresh,
        cfg.bg_iou_thresh,
        cfg.batch_size_per_image,
        cfg.positive_fraction,
        {"training": cfg.pre_nms_top_n_train, "testing": cfg.pre_nms_top_n_test},
        {"training": cfg.post_nms_top_n_train, "testing": cfg.post_nms_top_n_test},
        cfg.nms_thresh,
        cfg.score_thresh,
    )
    tv.min_size = cfg.min_size
    tv.train(rpn.training)
    return tv.to(conv.weight.device)


def torchvision_rpn_forward(
    tv_rpn,
    features: Sequence[Tensor],
    image_sizes: Sequence[tuple[int, int]],
    stride: int,
    targets: Sequence[dict] | None = None,
    pos_mask: Tensor | None = None,
    neg_mask: Tensor | None = None,
) -> tuple[list[Tensor], dict[str, Tensor]]:
    """Run ``tv_rpn`` on our inputs -> ``(proposals per image, losses)``.

    Args:
        features: one level, ``[(B, C, H, W)]``.
        image_sizes: per image ``(h, w)``.
        stride: image pixels per feature cell (torchvision infers it from the padded image size).
        targets: per image ``dict(boxes=(M_i, 4))``; losses are computed when given (training mode).
        pos_mask, neg_mask: ``(B, A)`` bool, the anchors our sampler picked (``intermediates`` of
            ``RegionProposalNetwork``); torchvision then uses them instead of drawing its own.
    """
    from torchvision.models.detection.image_list import ImageList

    if len(features) != 1:
        raise ValueError(f"torchvision_rpn_forward takes one feature level, got {len(features)}")
    b, _, h, w = features[0].shape
    images = ImageList(features[0].new_zeros(b, 3, h * stride, w * stride), [tuple(s) for s in image_sizes])
    if pos_mask is not None and neg_mask is not None:
        masks = (list(pos_mask.to(torch.uint8)), list(neg_mask.to(torch.uint8)))
        tv_rpn.fg_bg_sampler = lambda _labels: masks
    tv_targets = None if targets is None else [{"boxes": t["boxes"] if isinstance(t, dict) else t} for t in targets]
    return tv_rpn(images, {"0": features[0]}, tv_targets)


def torchvision_postprocess(
    class_logits: Tensor,
    box_regression: Tensor,
    proposals: Sequence[Tensor],
    image_sizes: Sequence[tuple[int, int]],
    box_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0),
    score_thresh: float = 0.05,
    nms_thresh: float = 0.5,
    detections_per_img: int = 100,
) -> list[dict[str, Tensor]]:
    """torchvision's ``RoIHeads.postprocess_detections`` -> per image ``dict(boxes, scores, labels)``."""
    from torchvision.models.detection.roi_heads import RoIHeads

    heads = RoIHeads(None, None, None, 0.5, 0.5, 512, 0.25, box_weights, score_thresh, nms_thresh,
                     detections_per_img)
    boxes, scores, labels = heads.postprocess_detections(class_logits, box_regression, list(proposals),
                                                         [tuple(s) for s in image_sizes])
    return [{"boxes": b, "scores": s, "labels": lab} for b, s, lab in zip(boxes, scores, labels)]
