"""Losses of the two detector stages: objectness, smooth L1, the RPN loss and the Fast R-CNN loss.

Two objectness forms are in use and both are here:

* ``"sigmoid"`` (torchvision, detectron2): ``k`` logits per location, binary cross-entropy.
* ``"softmax"`` (the paper, py-faster-rcnn, tf-faster-rcnn): ``2k`` logits per location, a
  two-class softmax with cross-entropy. A softmax over ``(bg, fg)`` equals the sigmoid of
  ``fg - bg``, so the two forms describe the same family of probabilities; they differ in how
  many numbers the head predicts.

Channel layout of the ``2k`` softmax scores (py-faster-rcnn's, used by ``rpnlab.detector.rpn.RPNHead``):
channels ``[0:k]`` are the background logits of anchors ``0..k-1`` and channels ``[k:2k]`` their
foreground logits. It is the layout that makes py-faster-rcnn's reshape to ``(B, 2, k*H, W)``
(``softmax_objectness_reshape``) put background and foreground in the two channels.

Losses take masks rather than indexing with them, so no step waits for the device to count
samples: a sampled label is 1 (positive) or 0 (negative), and -1 means "not in the loss".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "fast_rcnn_loss",
    "objectness_loss",
    "rpn_loss",
    "smooth_l1",
    "softmax_objectness_pairs",
    "softmax_objectness_reshape",
]

_REDUCTIONS = ("sum", "mean", "none")
_MODES = ("sigmoid", "softmax")


def smooth_l1(input: Tensor, target: Tensor, beta: float, reduction: str = "sum") -> Tensor:
    """Smooth L1 (Huber divided by ``beta``) between ``input`` and ``target`` of the same shape.

    ``0.5 * d**2 / beta`` where ``|d| < beta``, else ``|d| - 0.5 * beta``, with ``d = input - target``.
    ``beta = 0`` is plain L1. The paper writes it with ``sigma``: ``beta = 1 / sigma**2`` (``sigma=3``
    for the RPN gives ``beta = 1/9``). Equal to ``torch.nn.functional.smooth_l1_loss``.

    Args:
        reduction: ``"sum"``, ``"mean"`` (NaN on empty input, as PyTorch) or ``"none"``.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if not beta >= 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if input.shape != target.shape:
        raise ValueError(
            f"input and target must have the same shape, got {tuple(input.shape)} and {tuple(target.shape)}"
        )
    diff = input - target
    abs_diff = diff.abs()
    if beta == 0:
        loss = abs_diff  # the quadratic piece would divide by zero
    else:
        loss = torch.where(abs_diff < beta, 0.5 * diff * diff / beta, abs_diff - 0.5 * beta)
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.mean()
    return loss


def _check_mode(mode: str) -> None:
    if mode not in _MODES:
        raise ValueError(f"mode must be 'sigmoid' or 'softmax', got {mode!r}")


def _objectness_per_anchor(logits: Tensor, labels: Tensor, mode: str) -> Tensor:
    """Unreduced loss: ``logits (...)`` or ``(..., 2)``, ``labels (...)`` in {0, 1} -> ``(...)``."""
    if mode == "sigmoid":
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="none")
    # cross_entropy wants the classes in dim 1, so go through (N, 2)
    terms = F.cross_entropy(logits.reshape(-1, 2), labels.reshape(-1).long(), reduction="none")
    return terms.reshape(labels.shape)


def _check_objectness_shape(logits: Tensor, labels: Tensor, mode: str) -> None:
    expected = labels.shape if mode == "sigmoid" else (*labels.shape, 2)
    if logits.shape != expected:
        raise ValueError(
            f"{mode} objectness logits must have shape {tuple(expected)} for labels of shape "
            f"{tuple(labels.shape)}, got {tuple(logits.shape)}"
        )


def objectness_loss(logits: Tensor, labels: Tensor, mode: str = "sigmoid") -> Tensor:
    """Mean objectness loss over ``N`` anchors.

    Args:
        logits: ``(N,)`` for ``mode="sigmoid"`` (binary cross-entropy), ``(N, 2)`` with columns
            ``(background, foreground)`` for ``mode="softmax"`` (two-class cross-entropy).
        labels: ``(N,)``, 0 = background, 1 = object (float or integer).
    Returns:
        A scalar: the mean over the ``N`` anchors (NaN when ``N == 0``, as PyTorch's mean).
    """
    _check_mode(mode)
    _check_objectness_shape(logits, labels, mode)
    return _objectness_per_anchor(logits, labels, mode).mean()


def softmax_objectness_reshape(x: Tensor) -> Tensor:
    """py-faster-rcnn's ``rpn_cls_score_reshape``: ``(B, 2k, H, W)`` -> ``(B, 2, k*H, W)``.

    With the layout background ``[0:k]``, foreground ``[k:2k]``, channel 0 of the result holds
    every background logit and channel 1 every foreground logit, so a softmax over ``dim=1`` is the
    two-class softmax of each anchor. Reshaping the probabilities back to ``(B, 2k, H, W)`` and
    taking channels ``[k:2k]`` gives the foreground probabilities, as py-faster-rcnn does.
    """
    if x.dim() != 4 or x.shape[1] % 2 != 0:
        raise ValueError(
            f"softmax objectness scores must have shape (B, 2k, H, W), got {tuple(x.shape)}"
        )
    b, two_k, h, w = x.shape
    return x.reshape(b, 2, (two_k // 2) * h, w)


def softmax_objectness_pairs(x: Tensor) -> Tensor:
    """``(B, 2k, H, W)`` softmax scores -> ``(B, H*W*k, 2)`` (background, foreground) pairs.

    Anchors come out in the order of ``rpnlab.detector.anchors.AnchorGenerator`` and of the sigmoid path
    (torchvision's): row-major locations ``(h, w)``, then the ``k`` anchors of a location.
    """
    if x.dim() != 4 or x.shape[1] % 2 != 0:
        raise ValueError(
            f"softmax objectness scores must have shape (B, 2k, H, W), got {tuple(x.shape)}"
        )
    b, two_k, h, w = x.shape
    k = two_k // 2
    # channel = class * k + anchor  ->  (B, class, anchor, H, W)  ->  (B, H, W, anchor, class)
    return x.reshape(b, 2, k, h, w).permute(0, 3, 4, 2, 1).reshape(b, h * w * k, 2)


def rpn_loss(
    objectness: Tensor,
    pred_deltas: Tensor,
    labels: Tensor,
    regression_targets: Tensor,
    normalization: str = "sampled",
    reg_weight: float = 10.0,
    num_anchor_locations: int | None = None,
    beta: float = 1.0 / 9,
    mode: str = "sigmoid",
) -> dict[str, Tensor]:
    """The RPN's two losses over a batch of sampled anchors.

    Args:
        objectness: logits ``(B, A)`` (``mode="sigmoid"``) or ``(B, A, 2)`` background/foreground
            (``mode="softmax"``). Any leading shape works as long as the others match it.
        pred_deltas: ``(B, A, 4)`` predicted offsets.
        labels: ``(B, A)`` after sampling: 1 = sampled positive, 0 = sampled negative, -1 = not
            sampled (left out of both losses).
        regression_targets: ``(B, A, 4)`` encoded gt offsets; only read where ``labels == 1``, so
            it may hold anything (even ``inf``) elsewhere.
        normalization:
            ``"sampled"`` (torchvision, detectron2): objectness is the mean over the sampled
            anchors of the whole batch; box loss is the sum over sampled positives divided by
            the number of sampled anchors. ``reg_weight`` is not applied.
            ``"paper"`` (Ren et al. eq. 1): ``1/N_cls * sum L_cls + lambda/N_reg * sum p* L_reg``
            with ``N_cls`` the number of sampled anchors, ``N_reg = B * num_anchor_locations``
            (about 2400 per image for a 1000x600 image at stride 16), ``lambda = reg_weight``.
        num_anchor_locations: feature-map locations per image (sum of ``H_l * W_l``); needed for
            ``"paper"``.
        beta: smooth L1 beta; 1/9 is torchvision's and the paper's (``sigma = 3``).
    Returns:
        ``{"loss_objectness": scalar, "loss_rpn_box_reg": scalar}``. With no sampled positive
        (an image without objects) the box loss is exactly 0; with no sampled anchor at all both
        are 0, not NaN.
    """
    _check_mode(mode)
    if normalization not in ("sampled", "paper"):
        raise ValueError(f"normalization must be 'sampled' or 'paper', got {normalization!r}")
    _check_objectness_shape(objectness, labels, mode)
    if pred_deltas.shape != (*labels.shape, 4) or regression_targets.shape != pred_deltas.shape:
        raise ValueError(
            f"pred_deltas and regression_targets must have shape {(*labels.shape, 4)} for labels of shape "
            f"{tuple(labels.shape)}, got {tuple(pred_deltas.shape)} and {tuple(regression_targets.shape)}"
        )

    sampled = labels >= 0
    positive = labels == 1
    num_sampled = sampled.sum().clamp(min=1)

    # Unsampled anchors get label 0 so the loss is finite there, then their terms are masked out.
    cls_terms = _objectness_per_anchor(objectness, labels.clamp(min=0), mode)
    cls_sum = torch.where(sampled, cls_terms, torch.zeros_like(cls_terms)).sum()

    # Zero both sides outside the positives (rather than multiply by a mask) so that an inf target
    # there cannot turn into NaN, in the loss or its gradient.
    pos4 = positive.unsqueeze(-1)
    pred = torch.where(pos4, pred_deltas, torch.zeros_like(pred_deltas))
    target = torch.where(
        pos4, regression_targets.to(pred_deltas.dtype), torch.zeros_like(pred_deltas)
    )
    box_sum = smooth_l1(pred, target, beta, reduction="sum")

    if normalization == "sampled":
        loss_cls = cls_sum / num_sampled
        loss_box = box_sum / num_sampled
    else:
        if num_anchor_locations is None or num_anchor_locations <= 0:
            raise ValueError(
                f"normalization='paper' needs num_anchor_locations > 0 (locations per image), got {num_anchor_locations}"
            )
        num_images = labels.shape[0] if labels.dim() > 1 else 1
        loss_cls = cls_sum / num_sampled
        loss_box = reg_weight * box_sum / (num_images * num_anchor_locations)
    return {"loss_objectness": loss_cls, "loss_rpn_box_reg": loss_box}


def fast_rcnn_loss(
    class_logits: Tensor,
    box_regression: Tensor,
    labels: Tensor | list[Tensor],
    regression_targets: Tensor | list[Tensor],
    beta: float = 1.0 / 9,
) -> tuple[Tensor, Tensor]:
    """The Fast R-CNN head's losses with torchvision's normalisation (``fastrcnn_loss``).

    Args:
        class_logits: ``(R, C+1)``, column 0 is background.
        box_regression: ``(R, 4(C+1))`` class-specific deltas, 4 per class.
        labels: ``(R,)`` int64 in ``0..C`` (or a list of per-image tensors, concatenated).
        regression_targets: ``(R, 4)`` encoded targets (or a list), read only where ``labels > 0``.
        beta: smooth L1 beta. The default 1/9 is torchvision's hard-coded value, for parity with it;
            detectron2 and ``RoIConfig.smooth_l1_beta`` use 1.0.
    Returns:
        ``(loss_classifier, loss_box_reg)``: cross-entropy mean over the ``R`` RoIs, and the smooth
        L1 of the deltas of each positive RoI's own class, summed and divided by ``R``.
    """
    if isinstance(labels, (list, tuple)):
        labels = torch.cat(list(labels), dim=0)
    if isinstance(regression_targets, (list, tuple)):
        regression_targets = torch.cat(list(regression_targets), dim=0)
    if class_logits.dim() != 2:
        raise ValueError(f"class_logits must have shape (R, C+1), got {tuple(class_logits.shape)}")
    r, num_classes = class_logits.shape
    if box_regression.shape != (r, 4 * num_classes):
        raise ValueError(
            f"box_regression must have shape (R, 4(C+1)) = {(r, 4 * num_classes)}, got {tuple(box_regression.shape)}"
        )
    if labels.shape != (r,) or regression_targets.shape != (r, 4):
        raise ValueError(
            f"labels must be ({r},) and regression_targets ({r}, 4), got {tuple(labels.shape)} "
            f"and {tuple(regression_targets.shape)}"
        )
    labels = labels.long()
    loss_classifier = F.cross_entropy(class_logits, labels)

    # Each RoI regresses only the box of its own class; background RoIs (label 0) regress nothing.
    per_class = box_regression.reshape(r, num_classes, 4)
    own = per_class[torch.arange(r, device=labels.device), labels]  # (R, 4)
    pos4 = (labels > 0).unsqueeze(-1)
    pred = torch.where(pos4, own, torch.zeros_like(own))
    target = torch.where(pos4, regression_targets.to(own.dtype), torch.zeros_like(own))
    loss_box_reg = smooth_l1(pred, target, beta, reduction="sum") / max(r, 1)
    return loss_classifier, loss_box_reg
