"""The Fast R-CNN stage: which proposals to train on, the classification/regression head, detections.

Training (Girshick 2015, sec. 2.3; Ren et al. 2015, sec. 3.2): the ground-truth boxes join the
proposals, each proposal takes the label of the gt box it overlaps best if that IoU is >= 0.5,
background below, and 512 of them per image are sampled with at most 25% foreground. Foreground
RoIs also learn the offsets to their gt box, one set of 4 offsets per class.

Inference: softmax over the classes, each class's offsets applied to the proposal, then per class
a score threshold and NMS, keeping the best 100 detections of an image. Results match
``torchvision.models.detection.roi_heads.RoIHeads`` (same sampled RoIs, targets and detections).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from rpnlab.config import RoIConfig
from rpnlab.detector.boxes import BoxCoder, box_iou, check_boxes, clip_boxes, remove_small_boxes
from rpnlab.detector.losses import fast_rcnn_loss
from rpnlab.detector.matching import BalancedSampler, Matcher
from rpnlab.detector.roi import RoIPooler

__all__ = [
    "FastRCNNHead",
    "ProposalTargetSampler",
    "RoIHeads",
    "SampledRoIs",
    "postprocess_detections",
]


class SampledRoIs(NamedTuple):
    """The RoIs one training step learns from, per image ``i`` (``R_i`` of them).

    Attributes:
        proposals: ``(R_i, 4)`` boxes (proposals or gt boxes), detached.
        labels: ``(R_i,)`` int64, the class ``1..C`` of foreground RoIs, 0 for background.
        regression_targets: ``(R_i, 4)`` offsets of the matched gt box (``BoxCoder`` with the
            sampler's weights); zeros for background RoIs, which regress nothing.
        matched_idxs: ``(R_i,)`` int64, the matched gt box of foreground RoIs, -1 for background.
    """

    proposals: list[Tensor]
    labels: list[Tensor]
    regression_targets: list[Tensor]
    matched_idxs: list[Tensor]


def _check_targets(targets, num_images: int) -> None:
    if isinstance(targets, dict) or not isinstance(targets, Sequence) or len(targets) != num_images:
        raise ValueError(
            f"targets must be a list with one dict(boxes, labels) per image ({num_images} images), got {targets!r:.80}"
        )
    for i, t in enumerate(targets):
        if not isinstance(t, dict) or "boxes" not in t or "labels" not in t:
            raise ValueError(f"targets[{i}] must be a dict with 'boxes' (M, 4) and 'labels' (M,)")
        check_boxes(t["boxes"], f"targets[{i}]['boxes']", values=False)
        labels = t["labels"]
        if not isinstance(labels, Tensor) or labels.is_floating_point() or labels.shape != t["boxes"].shape[:1]:
            raise ValueError(
                f"targets[{i}]['labels'] must be an integer tensor of shape ({t['boxes'].shape[0]},), "
                f"got {getattr(labels, 'dtype', type(labels))} {tuple(getattr(labels, 'shape', ()))}"
            )


class ProposalTargetSampler:
    """Label proposals against the gt boxes and sample a balanced set of RoIs per image.

    A proposal is foreground (its gt's class) when its best IoU is ``>= fg_iou_thresh``,
    background (0) when the best IoU is in ``[bg_iou_thresh_low, bg_iou_thresh_high)``, ignored
    otherwise. ``bg_iou_thresh_low = 0`` is torchvision's rule (every low-IoU proposal is a
    candidate background); the Fast R-CNN paper uses 0.1, so that background RoIs are ones that
    touch an object (a crude hard-negative mining). In an image without gt boxes there is nothing to
    be hard against: every proposal is a background candidate whatever ``bg_iou_thresh_low`` is.

    Args:
        fg_iou_thresh, bg_iou_thresh_high, bg_iou_thresh_low: the IoU rules above.
        batch_size_per_image: RoIs sampled per image (Fast R-CNN's 64, i.e. 128 over 2 images;
            py-faster-rcnn's 128; torchvision's 512).
        positive_fraction: the largest share of foreground RoIs (0.25).
        box_weights: ``BoxCoder`` weights of the regression targets.
        generator: a ``torch.Generator`` for reproducible sampling.
    """

    def __init__(
        self,
        fg_iou_thresh: float = 0.5,
        bg_iou_thresh_high: float = 0.5,
        bg_iou_thresh_low: float = 0.0,
        batch_size_per_image: int = 512,
        positive_fraction: float = 0.25,
        box_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0),
        generator: torch.Generator | None = None,
    ):
        if not 0 <= bg_iou_thresh_low <= bg_iou_thresh_high:
            raise ValueError(
                f"bg_iou_thresh_low={bg_iou_thresh_low} must be in [0, bg_iou_thresh_high={bg_iou_thresh_high}]"
            )
        # No low-quality matches: a gt box that no proposal overlaps well is still learned from,
        # because it is itself one of the proposals.
        self.matcher = Matcher(fg_iou_thresh, bg_iou_thresh_high, allow_low_quality_matches=False)
        self.bg_iou_thresh_low = float(bg_iou_thresh_low)
        self.sampler = BalancedSampler(batch_size_per_image, positive_fraction, generator)
        self.box_coder = BoxCoder(box_weights)

    @classmethod
    def from_config(cls, config: RoIConfig, generator: torch.Generator | None = None) -> ProposalTargetSampler:
        config.validate()
        return cls(
            config.fg_iou_thresh,
            config.bg_iou_thresh_high,
            config.bg_iou_thresh_low,
            config.batch_size_per_image,
            config.positive_fraction,
            config.box_weights,
            generator,
        )

    def label_proposals(self, proposals: Tensor, gt_boxes: Tensor, gt_labels: Tensor) -> tuple[Tensor, Tensor]:
        """One image: ``proposals (P, 4)``, ``gt_boxes (M, 4)``, ``gt_labels (M,)`` ->
        ``labels (P,)`` int64 (class, 0 background, -1 ignored) and ``matched_idxs (P,)`` int64
        (gt index, ``Matcher.BELOW_LOW_THRESHOLD`` for background, ``BETWEEN_THRESHOLDS`` ignored).
        """
        if gt_boxes.shape[0] == 0:
            background = torch.full((proposals.shape[0],), Matcher.BELOW_LOW_THRESHOLD, device=proposals.device)
            return torch.zeros_like(background), background
        iou = box_iou(gt_boxes, proposals)  # (M, P)
        matched_idxs = self.matcher(iou)
        best_iou = iou.max(dim=0).values
        # The matcher calls everything under bg_iou_thresh_high background; keep only those
        # reaching bg_iou_thresh_low and ignore the rest.
        too_low = (matched_idxs == Matcher.BELOW_LOW_THRESHOLD) & (best_iou < self.bg_iou_thresh_low)
        matched_idxs = torch.where(too_low, Matcher.BETWEEN_THRESHOLDS, matched_idxs)
        labels = gt_labels.long()[matched_idxs.clamp(min=0)]
        labels = torch.where(matched_idxs == Matcher.BELOW_LOW_THRESHOLD, 0, labels)
        labels = torch.where(matched_idxs == Matcher.BETWEEN_THRESHOLDS, -1, labels)
        return labels, matched_idxs

    def __call__(self, proposals: Sequence[Tensor], targets: Sequence[dict]) -> SampledRoIs:
        """Sample the training RoIs.

        Args:
            proposals: per image ``(P_i, 4)``.
            targets: per image ``dict(boxes (M_i, 4), labels (M_i,) int64 in 1..C)``.
        Returns:
            ``SampledRoIs`` of lists per image; RoIs keep their order in ``[proposals; gt boxes]``.
        """
        if isinstance(proposals, Tensor) or not isinstance(proposals, Sequence):
            raise TypeError("proposals must be a list of per-image (P_i, 4) tensors")
        for i, p in enumerate(proposals):
            check_boxes(p, f"proposals[{i}]", values=False)
            if p.dim() != 2:
                raise ValueError(f"proposals[{i}] must be (P_i, 4), got {tuple(p.shape)}")
        _check_targets(targets, len(proposals))

        # The gt boxes are proposals too: every object then has at least one perfect RoI.
        all_boxes, all_labels, all_matched = [], [], []
        for p, t in zip(proposals, targets):
            gt_boxes = t["boxes"].to(p.dtype)
            boxes = torch.cat((p.detach(), gt_boxes))
            labels, matched = self.label_proposals(boxes, gt_boxes, t["labels"].to(p.device))
            all_boxes.append(boxes)
            all_labels.append(labels)
            all_matched.append(matched)

        pos_masks, neg_masks = self.sampler(all_labels)
        out = SampledRoIs([], [], [], [])
        for boxes, labels, matched, pos, neg, t in zip(all_boxes, all_labels, all_matched, pos_masks, neg_masks, targets):
            keep = torch.where(pos | neg)[0]
            boxes, labels, matched = boxes[keep], labels[keep], matched[keep]
            gt_boxes = t["boxes"].to(boxes.dtype)
            if gt_boxes.shape[0] == 0:
                targets_i = torch.zeros_like(boxes)
            else:
                encoded = self.box_coder.encode(boxes, gt_boxes[matched.clamp(min=0)])
                # Background rows would hold offsets to gt box 0 (what torchvision stores); they
                # are never read, and zeros cannot be inf for a zero-size proposal.
                targets_i = torch.where((labels > 0)[:, None], encoded, torch.zeros_like(encoded))
            out.proposals.append(boxes)
            out.labels.append(labels)
            out.regression_targets.append(targets_i)
            out.matched_idxs.append(matched)
        return out

    def __repr__(self) -> str:
        return (
            f"ProposalTargetSampler(fg_iou_thresh={self.matcher.high_threshold}, "
            f"bg_iou_thresh=[{self.bg_iou_thresh_low}, {self.matcher.low_threshold}), {self.sampler}, {self.box_coder})"
        )


class FastRCNNHead(nn.Module):
    """Pooled RoI features -> class scores and class-specific box offsets.

    ``flatten -> fc6 -> ReLU -> fc7 -> ReLU`` (torchvision's ``TwoMLPHead``; VGG-16's fc6/fc7 in
    the paper) then two sibling layers: ``cls_score`` (``C + 1`` logits, 0 is background) and
    ``bbox_pred`` (4 offsets for each of the ``C + 1`` classes).

    Initialisation: the paper's for the two sibling layers, zero-mean Gaussians with std 0.01
    (scores) and 0.001 (offsets) and zero biases, so that training starts from near-uniform class
    probabilities and near-zero box corrections; fc6/fc7 keep PyTorch's ``nn.Linear`` default (in
    the paper they come pretrained from ImageNet). torchvision leaves all four at the default.

    Args:
        in_channels: channels of the pooled features.
        pool_size: ``out`` or ``(out_h, out_w)`` of the pooler.
        representation_size: width of fc6 and fc7 (4096 in VGG-16, 1024 in torchvision).
        num_classes: foreground classes ``C``.
    """

    def __init__(
        self,
        in_channels: int,
        pool_size: int | tuple[int, int] = 7,
        representation_size: int = 1024,
        num_classes: int | None = None,
    ):
        super().__init__()
        for name, value in (("in_channels", in_channels), ("representation_size", representation_size),
                            ("num_classes", num_classes)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        pool_h, pool_w = (pool_size, pool_size) if isinstance(pool_size, int) else tuple(pool_size)
        self.in_shape = (in_channels, pool_h, pool_w)
        self.num_classes = num_classes
        self.fc6 = nn.Linear(in_channels * pool_h * pool_w, representation_size)
        self.fc7 = nn.Linear(representation_size, representation_size)
        self.cls_score = nn.Linear(representation_size, num_classes + 1)
        self.bbox_pred = nn.Linear(representation_size, 4 * (num_classes + 1))
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, pooled: Tensor) -> tuple[Tensor, Tensor]:
        """``pooled: (R, C_in, out_h, out_w)`` -> ``class_logits (R, C+1)``, ``box_regression (R, 4(C+1))``."""
        if pooled.dim() != 4 or tuple(pooled.shape[1:]) != self.in_shape:
            raise ValueError(f"pooled must have shape (R, {', '.join(map(str, self.in_shape))}), got {tuple(pooled.shape)}")
        x = F.relu(self.fc6(pooled.flatten(start_dim=1)))
        x = F.relu(self.fc7(x))
        return self.cls_score(x), self.bbox_pred(x)


def postprocess_detections(
    class_logits: Tensor,
    box_regression: Tensor,
    proposals: Sequence[Tensor],
    image_sizes: Sequence[tuple[int, int]],
    box_coder: BoxCoder | None = None,
    score_thresh: float = 0.05,
    nms_thresh: float = 0.5,
    detections_per_img: int = 100,
    min_size: float = 1e-2,
) -> list[dict[str, Tensor]]:
    """Head outputs -> final detections per image, as torchvision's ``RoIHeads.postprocess_detections``.

    Args:
        class_logits: ``(R, C+1)``; box_regression: ``(R, 4(C+1))``, for the RoIs of all images.
        proposals: per image ``(P_i, 4)``, ``sum P_i = R``.
        image_sizes: per image ``(h, w)``, to clip the boxes.
        box_coder: decodes the offsets; default ``BoxCoder((10, 10, 5, 5))``.
        score_thresh: keep class scores strictly above it.
        nms_thresh: IoU of NMS, run separately for each class.
        detections_per_img: the best this many survive.
        min_size: drop boxes narrower or lower than this (pixels).
    Returns:
        per image ``dict(boxes (D, 4), scores (D,), labels (D,) int64 in 1..C)``, best score first.
    """
    if len(proposals) != len(image_sizes):
        raise ValueError(f"proposals ({len(proposals)} images) and image_sizes ({len(image_sizes)}) must match")
    box_coder = box_coder or BoxCoder((10.0, 10.0, 5.0, 5.0))
    num_rois, num_classes = class_logits.shape
    if box_regression.shape != (num_rois, 4 * num_classes):
        raise ValueError(f"box_regression must be {(num_rois, 4 * num_classes)}, got {tuple(box_regression.shape)}")
    counts = [p.shape[0] for p in proposals]
    if sum(counts) != num_rois:
        raise ValueError(f"proposals hold {sum(counts)} boxes but class_logits has {num_rois} rows")
    if not counts:
        return []

    boxes_all = box_coder.decode(box_regression, torch.cat(list(proposals)).to(box_regression.dtype))
    boxes_all = boxes_all.reshape(num_rois, num_classes, 4)
    scores_all = F.softmax(class_logits, dim=-1)
    detections = []
    for boxes, scores, size in zip(boxes_all.split(counts), scores_all.split(counts), image_sizes):
        boxes = clip_boxes(boxes, size)
        labels = torch.arange(num_classes, device=boxes.device).expand(boxes.shape[0], num_classes)
        # Every (RoI, foreground class) pair is a candidate detection; background is dropped.
        boxes = boxes[:, 1:].reshape(-1, 4)
        scores = scores[:, 1:].reshape(-1)
        labels = labels[:, 1:].reshape(-1)

        keep = torch.where(scores > score_thresh)[0]
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        keep = remove_small_boxes(boxes, min_size)
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        # Per-class NMS (the compiled kernel): a box suppresses only boxes of its own class.
        keep = torchvision.ops.batched_nms(boxes, scores, labels, nms_thresh)[:detections_per_img]
        detections.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
    return detections


class RoIHeads(nn.Module):
    """Fast R-CNN on top of the proposals: sample (training), pool, classify and refine.

    Args:
        pooler: an ``rpnlab.detector.roi.RoIPooler``.
        head: a ``FastRCNNHead``.
        config: ``RoIConfig`` (sampling, loss beta, post-processing thresholds).
        num_classes: optional check, must equal ``head.num_classes``.
        generator: a ``torch.Generator`` for reproducible RoI sampling.
    """

    def __init__(
        self,
        pooler: nn.Module,
        head: FastRCNNHead,
        config: RoIConfig,
        num_classes: int | None = None,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        if not isinstance(config, RoIConfig):
            raise TypeError(f"config must be an RoIConfig, got {type(config).__name__}")
        config.validate()
        head_classes = getattr(head, "num_classes", None)
        if num_classes is not None and head_classes is not None and num_classes != head_classes:
            raise ValueError(f"num_classes={num_classes} differs from the head's num_classes={head_classes}")
        self.pooler = pooler
        self.head = head
        self.config = config
        self.num_classes = num_classes if num_classes is not None else head_classes
        self.target_sampler = ProposalTargetSampler.from_config(config, generator)
        self.box_coder = BoxCoder(config.box_weights)

    @classmethod
    def from_config(
        cls,
        config: RoIConfig,
        in_channels: int,
        num_classes: int,
        spatial_scale: float | Sequence[float],
        generator: torch.Generator | None = None,
    ) -> RoIHeads:
        """Pooler and head built from ``config`` for features of ``in_channels`` channels."""
        pooler = RoIPooler.from_config(config, spatial_scale)
        head = FastRCNNHead(in_channels, config.output_size, config.representation_size, num_classes)
        return cls(pooler, head, config, num_classes, generator)

    def forward(
        self,
        features: Tensor | Sequence[Tensor],
        proposals: Sequence[Tensor],
        image_sizes: Sequence[tuple[int, int]],
        targets: Sequence[dict] | None = None,
        return_intermediates: bool = False,
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor], dict]:
        """Run the stage.

        Args:
            features: ``(B, C, H, W)`` or a list of FPN levels (as the pooler expects).
            proposals: per image ``(P_i, 4)`` in image pixels.
            image_sizes: per image ``(h, w)``.
            targets: per image ``dict(boxes (M_i, 4), labels (M_i,))``, required in training.
            return_intermediates: fill the third output.
        Returns:
            ``(detections, losses, intermediates)``. Training: no detections (the RoIs are a random
            sample), ``losses = dict(loss_classifier, loss_box_reg)``. Eval: per image
            ``dict(boxes, scores, labels)`` and no losses. ``intermediates``: ``rois`` (per image,
            the pooled boxes), ``pooled`` ``(R, C, out, out)``, ``class_logits``, ``box_regression``,
            and in training ``labels``, ``regression_targets``, ``matched_idxs`` (per image);
            empty unless asked for.
        """
        if len(proposals) != len(image_sizes):
            raise ValueError(f"proposals ({len(proposals)} images) and image_sizes ({len(image_sizes)}) must match")
        sampled = None
        if self.training:
            if targets is None:
                raise ValueError("targets are required in training mode (call .eval() for detections)")
            sampled = self.target_sampler(proposals, targets)
            rois = sampled.proposals
        else:
            rois = [p.detach() for p in proposals]

        pooled = self.pooler(features, rois)
        class_logits, box_regression = self.head(pooled)

        detections: list[dict[str, Tensor]] = []
        losses: dict[str, Tensor] = {}
        if sampled is not None:
            loss_classifier, loss_box_reg = fast_rcnn_loss(
                class_logits, box_regression, sampled.labels, sampled.regression_targets,
                beta=self.config.smooth_l1_beta,
            )
            losses = {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg}
        else:
            detections = postprocess_detections(
                class_logits, box_regression, rois, image_sizes, self.box_coder,
                self.config.score_thresh, self.config.nms_thresh, self.config.detections_per_img,
            )

        intermediates: dict = {}
        if return_intermediates:
            intermediates = {
                "rois": rois,
                "pooled": pooled,
                "class_logits": class_logits,
                "box_regression": box_regression,
            }
            if sampled is not None:
                intermediates.update(
                    labels=sampled.labels,
                    regression_targets=sampled.regression_targets,
                    matched_idxs=sampled.matched_idxs,
                )
        return detections, losses, intermediates
