"""The Region Proposal Network: a small conv head slid over the features, its targets and losses.

At every feature-map location the head predicts, for each of the ``k`` anchors there, an
objectness score and four box offsets (Ren et al. 2015, sec. 3.1). Training labels the anchors
by IoU with the ground truth (``rpnlab.detector.matching``), samples a balanced minibatch of them and
applies ``rpnlab.detector.losses.rpn_loss``; inference turns the predictions into proposals with
``rpnlab.detector.proposals.ProposalLayer``.

Anchor order everywhere is ``rpnlab.detector.anchors.AnchorGenerator``'s (torchvision's): levels one after
another, within a level row-major locations ``(h, w)``, within a location the ``k`` anchors.
``flatten_head_outputs`` puts the head's channels in that order.

Objectness channel layouts of ``RPNHead``:

* ``"sigmoid"``: ``k`` channels, one logit per anchor (torchvision, detectron2).
* ``"softmax"``: ``2k`` channels, ``[0:k]`` background and ``[k:2k]`` foreground logits of anchors
  ``0..k-1`` (py-faster-rcnn's layout, see ``rpnlab.detector.losses``).

Box channels are ``4k``, anchor-major: channel ``4 * a + c`` is coordinate ``c`` of anchor ``a``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from rpnlab.config import AnchorConfig, RPNConfig
from rpnlab.detector.anchors import AnchorGenerator
from rpnlab.detector.boxes import BoxCoder, check_boxes
from rpnlab.detector.losses import rpn_loss, softmax_objectness_pairs
from rpnlab.detector.matching import BalancedSampler, Matcher
from rpnlab.detector.proposals import ProposalLayer
from rpnlab.detector.targets import label_anchors_batched

__all__ = ["RPNHead", "RPNOutput", "RegionProposalNetwork", "flatten_head_outputs"]

_MODES = ("sigmoid", "softmax")


class RPNHead(nn.Module):
    """3x3 conv + ReLU, then two sibling 1x1 convs: objectness and box offsets.

    The same head (same weights) runs on every feature level, so every level must have the same
    ``k`` anchors per location.

    Args:
        in_channels: channels of the feature maps.
        num_anchors: ``k``, anchors per location.
        conv_channels: width of the 3x3 conv (512 for the paper's VGG-16; torchvision uses
            ``in_channels``).
        objectness: ``"sigmoid"`` (``k`` logits) or ``"softmax"`` (``2k`` logits, background first).

    Weights start from a normal with std 0.01 and biases from 0, as the paper and torchvision.
    """

    def __init__(
        self,
        in_channels: int,
        num_anchors: int,
        conv_channels: int = 512,
        objectness: str = "sigmoid",
    ):
        super().__init__()
        for name, value in (
            ("in_channels", in_channels),
            ("num_anchors", num_anchors),
            ("conv_channels", conv_channels),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if objectness not in _MODES:
            raise ValueError(f"objectness must be 'sigmoid' or 'softmax', got {objectness!r}")
        self.num_anchors = num_anchors
        self.objectness = objectness
        scores_per_anchor = 1 if objectness == "sigmoid" else 2
        self.conv = nn.Conv2d(in_channels, conv_channels, kernel_size=3, padding=1)
        self.cls_logits = nn.Conv2d(conv_channels, scores_per_anchor * num_anchors, kernel_size=1)
        self.bbox_pred = nn.Conv2d(conv_channels, 4 * num_anchors, kernel_size=1)
        for layer in (self.conv, self.cls_logits, self.bbox_pred):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)

    def forward(self, features: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """``features: list[(B, C, H_l, W_l)]`` -> ``(objectness list[(B, k or 2k, H_l, W_l)],
        deltas list[(B, 4k, H_l, W_l)])``."""
        objectness, deltas = [], []
        for x in features:
            t = torch.relu(self.conv(x))
            objectness.append(self.cls_logits(t))
            deltas.append(self.bbox_pred(t))
        return objectness, deltas

    def extra_repr(self) -> str:
        return f"num_anchors={self.num_anchors}, objectness={self.objectness!r}"


def flatten_head_outputs(
    objectness: Sequence[Tensor], deltas: Sequence[Tensor], mode: str = "sigmoid"
) -> tuple[Tensor, Tensor]:
    """Put the head's per-level maps in anchor order and concatenate the levels.

    Args:
        objectness: per level ``(B, k, H, W)`` (sigmoid) or ``(B, 2k, H, W)`` (softmax).
        deltas: per level ``(B, 4k, H, W)``.
        mode: ``"sigmoid"`` or ``"softmax"``.
    Returns:
        ``objectness: (B, A)`` logits, or ``(B, A, 2)`` (background, foreground) logits for
        ``"softmax"``; ``deltas: (B, A, 4)``; ``A = sum_l H_l * W_l * k``.
    """
    if mode not in _MODES:
        raise ValueError(f"mode must be 'sigmoid' or 'softmax', got {mode!r}")
    if len(objectness) != len(deltas):
        raise ValueError(
            f"objectness and deltas must have one map per level, got {len(objectness)} and {len(deltas)}"
        )
    flat_obj, flat_deltas = [], []
    for level, (o, d) in enumerate(zip(objectness, deltas)):
        b, c4, h, w = d.shape
        k = c4 // 4
        expected = k if mode == "sigmoid" else 2 * k
        if c4 % 4 or o.shape != (b, expected, h, w):
            raise ValueError(
                f"level {level}: deltas {tuple(d.shape)} need {mode} objectness of shape {(b, expected, h, w)}, "
                f"got {tuple(o.shape)}"
            )
        if mode == "sigmoid":
            flat_obj.append(o.permute(0, 2, 3, 1).reshape(b, h * w * k))  # (B, H, W, k)
        else:
            flat_obj.append(softmax_objectness_pairs(o))
        # channel 4a + c -> (B, k, 4, H, W) -> (B, H, W, k, 4)
        flat_deltas.append(d.reshape(b, k, 4, h, w).permute(0, 3, 4, 1, 2).reshape(b, h * w * k, 4))
    return torch.cat(flat_obj, dim=1), torch.cat(flat_deltas, dim=1)


class RPNOutput(NamedTuple):
    """What ``RegionProposalNetwork.forward`` returns (a tuple: it unpacks in this order).

    proposals: per image ``(P_i, 4)``, detached. scores: per image ``(P_i,)`` objectness probabilities.
    losses: ``{"loss_objectness", "loss_rpn_box_reg"}`` when targets were given, else empty.
    intermediates: filled with ``return_intermediates=True`` (see ``RegionProposalNetwork.forward``).
    """

    proposals: list[Tensor]
    scores: list[Tensor]
    losses: dict[str, Tensor]
    intermediates: dict


def _gt_boxes(targets, num_images: int) -> list[Tensor]:
    """``targets``: per image a dict with ``"boxes"`` or a ``(M_i, 4)`` tensor -> list of boxes."""
    if not isinstance(targets, (list, tuple)) or len(targets) != num_images:
        raise ValueError(
            f"targets must be a list with one entry per image ({num_images}), "
            f"got {type(targets).__name__} of length {len(targets) if hasattr(targets, '__len__') else '?'}"
        )
    boxes = []
    for i, t in enumerate(targets):
        b = t["boxes"] if isinstance(t, dict) else t
        check_boxes(b, f"targets[{i}]['boxes']")
        if b.dim() != 2:
            raise ValueError(f"targets[{i}]['boxes'] must have shape (M, 4), got {tuple(b.shape)}")
        boxes.append(b)
    return boxes


class RegionProposalNetwork(nn.Module):
    """Anchors + head + (in training) anchor labels, sampling and loss + proposals.

    Args:
        anchor_generator: an ``rpnlab.detector.anchors.AnchorGenerator``.
        head: an ``RPNHead`` (or any module with its ``forward`` contract); its ``k`` must match the
            generator's and its ``objectness`` attribute, if any, the config's.
        config: thresholds, sampling, loss and proposal settings.
        generator: optional ``torch.Generator`` for the anchor sampler, for reproducible runs.
    """

    def __init__(
        self,
        anchor_generator: AnchorGenerator,
        head: nn.Module,
        config: RPNConfig,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        if not isinstance(config, RPNConfig):
            raise TypeError(f"config must be an RPNConfig, got {type(config).__name__}")
        config.validate()
        head_mode = getattr(head, "objectness", config.objectness)
        if head_mode != config.objectness:
            raise ValueError(
                f"head objectness {head_mode!r} differs from config.objectness {config.objectness!r}"
            )
        ks = set(anchor_generator.num_anchors_per_location())
        if len(ks) != 1:
            raise ValueError(
                f"a head shared across levels needs the same k on every level, got {sorted(ks)}"
            )
        head_k = getattr(head, "num_anchors", None)
        if head_k is not None and head_k not in ks:
            raise ValueError(
                f"head predicts {head_k} anchors per location but the anchor generator has {ks.pop()}"
            )
        self.anchor_generator = anchor_generator
        self.head = head
        self.config = config
        self.mode = config.objectness
        self.matcher = Matcher(
            config.fg_iou_thresh, config.bg_iou_thresh, config.allow_low_quality_matches
        )
        self.sampler = BalancedSampler(
            config.batch_size_per_image, config.positive_fraction, generator=generator
        )
        self.box_coder = BoxCoder(config.box_weights)
        self.proposal_layer = ProposalLayer.from_config(config)

    @classmethod
    def from_config(
        cls,
        anchor_config: AnchorConfig,
        rpn_config: RPNConfig,
        in_channels: int,
        generator: torch.Generator | None = None,
    ) -> RegionProposalNetwork:
        """Anchor generator and head built from the configs for features with ``in_channels`` channels."""
        anchor_generator = AnchorGenerator.from_config(anchor_config)
        ks = anchor_generator.num_anchors_per_location()
        if len(set(ks)) != 1:
            raise ValueError(
                f"a head shared across levels needs the same k on every level, got {ks}"
            )
        head = RPNHead(in_channels, ks[0], rpn_config.conv_channels, rpn_config.objectness)
        return cls(anchor_generator, head, rpn_config, generator=generator)

    def _check_inputs(self, features, image_sizes) -> None:
        if not isinstance(features, (list, tuple)) or len(features) == 0:
            raise TypeError(
                f"features must be a non-empty list of (B, C, H, W) tensors, got {type(features).__name__}"
            )
        for i, f in enumerate(features):
            if not isinstance(f, Tensor) or f.dim() != 4:
                raise ValueError(
                    f"features[{i}] must be a (B, C, H, W) tensor, got {getattr(f, 'shape', type(f).__name__)}"
                )
            if f.shape[0] != features[0].shape[0]:
                raise ValueError(
                    f"every feature level must have the same batch size, got {[g.shape[0] for g in features]}"
                )
        b = features[0].shape[0]
        if not isinstance(image_sizes, (list, tuple)) or len(image_sizes) != b:
            raise ValueError(
                f"image_sizes must be a list with one (h, w) per image ({b}), got "
                f"{len(image_sizes) if hasattr(image_sizes, '__len__') else type(image_sizes).__name__}"
            )
        for i, s in enumerate(image_sizes):
            if len(s) != 2:
                raise ValueError(f"image_sizes[{i}] must be a pair (h, w), got {s!r}")

    def forward(
        self,
        features: list[Tensor],
        image_sizes: Sequence[tuple[int, int]],
        targets: list | None = None,
        return_intermediates: bool = False,
    ) -> RPNOutput:
        """Proposals for a padded batch, and the loss when ``targets`` are given.

        Args:
            features: per level ``(B, C, H_l, W_l)``.
            image_sizes: per image its ``(h, w)`` before padding (proposals are clipped to it).
            targets: per image a dict with ``"boxes": (M_i, 4)`` (or just that tensor); ``M_i`` may be 0.
            return_intermediates: fill ``RPNOutput.intermediates`` with ``anchors (A, 4)``,
                ``num_anchors_per_level``, ``objectness (B, A)`` logits (``fg - bg`` for softmax, whose
                ``(B, A, 2)`` pairs are ``objectness_pairs``), ``deltas (B, A, 4)``, the proposal
                steps of ``ProposalLayer`` (``decoded_boxes``, ``topk_idxs``, ``pre_nms_*``,
                ``post_nms_*``) and, with targets, ``labels (B, A)`` (1/0/-1 before sampling),
                ``matched_gt_boxes (B, A, 4)``, ``regression_targets (B, A, 4)`` (0 off the positives),
                ``pos_mask``, ``neg_mask`` (B, A) bool (the sampled anchors).
        """
        self._check_inputs(features, image_sizes)
        gt_boxes = None if targets is None else _gt_boxes(targets, len(image_sizes))
        feature_sizes = [tuple(f.shape[-2:]) for f in features]
        # Box arithmetic in at least float32: under mixed precision the features may be fp16/bf16,
        # whose spacing at 1000 px is 0.5-8 px.
        box_dtype = torch.promote_types(features[0].dtype, torch.float32)
        anchors = self.anchor_generator(feature_sizes, device=features[0].device, dtype=box_dtype)
        num_anchors_per_level = self.anchor_generator.num_anchors_per_level(feature_sizes)

        objectness_maps, delta_maps = self.head(list(features))
        objectness, deltas = flatten_head_outputs(objectness_maps, delta_maps, self.mode)
        objectness, deltas = objectness.to(box_dtype), deltas.to(box_dtype)
        if deltas.shape[1] != anchors.shape[0]:
            raise ValueError(
                f"the head predicts {deltas.shape[1]} anchors but the generator made {anchors.shape[0]}"
            )
        # sigmoid(fg - bg) is the softmax's foreground probability, so proposals need one logit
        logits = objectness if self.mode == "sigmoid" else objectness[..., 1] - objectness[..., 0]

        proposal_out = self.proposal_layer(
            anchors,
            logits,
            deltas,
            image_sizes,
            num_anchors_per_level,
            return_intermediates=return_intermediates,
        )
        proposals, scores = proposal_out[0], proposal_out[1]

        intermediates: dict = {}
        if return_intermediates:
            intermediates.update(
                anchors=anchors,
                num_anchors_per_level=num_anchors_per_level,
                objectness=logits,
                deltas=deltas,
                **proposal_out[2],
            )
            if self.mode == "softmax":
                intermediates["objectness_pairs"] = objectness

        losses: dict[str, Tensor] = {}
        if gt_boxes is not None:
            losses, training_steps = self._loss(
                anchors, objectness, deltas, gt_boxes, image_sizes, feature_sizes
            )
            if return_intermediates:
                intermediates.update(training_steps)
        return RPNOutput(proposals, scores, losses, intermediates)

    def _loss(self, anchors, objectness, deltas, gt_boxes, image_sizes, feature_sizes):
        """Label, sample, encode, and the loss; returns ``(losses, intermediates)``."""
        cfg = self.config
        # The whole batch at once (rpnlab.detector.targets); matching.label_anchors_batch and
        # BalancedSampler(draw="keys") are the per-image versions that give the same result.
        # One level's anchors form a grid: the IoU then comes from separable x/y overlaps.
        grid = tuple(feature_sizes[0]) if len(feature_sizes) == 1 else None
        labels, matched_gt_boxes = label_anchors_batched(
            anchors, gt_boxes, self.matcher, image_sizes, cfg.ignore_cross_boundary, grid=grid
        )  # (B, A), (B, A, 4)
        pos_mask, neg_mask = self.sampler.sample_batch(labels)
        sampled_labels = torch.where(pos_mask, 1.0, torch.where(neg_mask, 0.0, -1.0)).to(
            deltas.dtype
        )

        positive = (labels == 1).unsqueeze(-1)
        # Only positives are regressed; elsewhere the matched box may be a placeholder (all zeros
        # in an image without objects, whose encoding is -inf), so the target is set to 0 there.
        targets = self.box_coder.encode(anchors, matched_gt_boxes)  # anchors broadcast over B
        regression_targets = torch.where(positive, targets, torch.zeros_like(targets))

        losses = rpn_loss(
            objectness,
            deltas,
            sampled_labels,
            regression_targets,
            normalization=cfg.loss_normalization,
            reg_weight=cfg.reg_loss_weight,
            num_anchor_locations=sum(h * w for h, w in feature_sizes),
            beta=cfg.smooth_l1_beta,
            mode=self.mode,
        )
        steps = {
            "labels": labels,
            "matched_gt_boxes": matched_gt_boxes,
            "regression_targets": regression_targets,
            "pos_mask": pos_mask,
            "neg_mask": neg_mask,
        }
        return losses, steps
