"""Measurements for the pitfalls users keep reporting, one function per pitfall.

Each returns plain numbers (and the tensors behind them) that a notebook prints, so the prose
never states a number by hand, and a test can check the mechanism rather than a typed result:

- ``plus_one_convention`` (02): py-faster-rcnn's ``width = x2 - x1 + 1`` against torchvision's
  ``x2 - x1``, on the IoU and the encoded targets of small boxes;
- ``target_normalisation`` (02): box-coder weights ``(10, 10, 5, 5)`` are targets divided by
  the stds ``(0.1, 0.1, 0.2, 0.2)``, and the loss scale without them;
- ``topk_per_image_vs_batch`` (05): proposals kept per image, or over a whole batch;
- ``score_threshold_starvation`` (07): only proposals with ``p > 0.5`` passed to the head;
- ``background_candidates`` (07): the lower IoU threshold of background RoIs (0.1 or 0);
- ``roi_align_shift`` (06): RoI Align's half-cell shift (``aligned=False``) read off a ramp.

The legacy (+1) formulas are written out here on purpose: they are the thing being measured,
and no maintained library still has them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torchvision
from torch import Tensor

from rpnlab.detector.boxes import BoxCoder, box_iou

__all__ = [
    "background_candidates",
    "encode_plus_one",
    "iou_plus_one",
    "plus_one_convention",
    "roi_align_shift",
    "score_threshold_starvation",
    "target_normalisation",
    "topk_per_image_vs_batch",
]


# --------------------------------------------------------------------------- +1 pixel convention


def iou_plus_one(a: Tensor, b: Tensor) -> Tensor:
    """IoU with py-faster-rcnn's inclusive pixels (``bbox_overlaps``): ``(N, 4), (M, 4) -> (N, M)``.

    A box ``x1..x2`` covers the pixels ``x1`` to ``x2`` *inclusive*, so its width is ``x2 - x1 + 1``
    and two boxes that share an edge overlap by one pixel.
    """
    wa, ha = a[:, 2] - a[:, 0] + 1, a[:, 3] - a[:, 1] + 1
    wb, hb = b[:, 2] - b[:, 0] + 1, b[:, 3] - b[:, 1] + 1
    iw = (torch.minimum(a[:, None, 2], b[None, :, 2]) - torch.maximum(a[:, None, 0], b[None, :, 0]) + 1).clamp(min=0)
    ih = (torch.minimum(a[:, None, 3], b[None, :, 3]) - torch.maximum(a[:, None, 1], b[None, :, 1]) + 1).clamp(min=0)
    inter = iw * ih
    return inter / ((wa * ha)[:, None] + (wb * hb)[None, :] - inter)


def encode_plus_one(anchors: Tensor, boxes: Tensor) -> Tensor:
    """py-faster-rcnn's ``bbox_transform``: ``(N, 4), (N, 4) -> (N, 4)`` offsets with widths
    ``x2 - x1 + 1`` and centres ``x1 + 0.5 * width``."""
    aw, ah = anchors[:, 2] - anchors[:, 0] + 1, anchors[:, 3] - anchors[:, 1] + 1
    ax, ay = anchors[:, 0] + 0.5 * aw, anchors[:, 1] + 0.5 * ah
    bw, bh = boxes[:, 2] - boxes[:, 0] + 1, boxes[:, 3] - boxes[:, 1] + 1
    bx, by = boxes[:, 0] + 0.5 * bw, boxes[:, 1] + 0.5 * bh
    return torch.stack([(bx - ax) / aw, (by - ay) / ah, torch.log(bw / aw), torch.log(bh / ah)], dim=1)


def plus_one_convention(sizes: Sequence[float] = (4, 8, 16, 32, 64, 128), shift: float = 1.0,
                        anchor_ratio: float = 2.0) -> dict[str, Any]:
    """What the +1 convention changes, for square boxes of each size.

    Args:
        sizes: box sides in pixels (the coordinates' difference ``x2 - x1``).
        shift: the second box of each IoU pair is the first moved right by this many pixels.
        anchor_ratio: the anchor of the encoding is ``anchor_ratio`` times the box's side,
            centred on it (a small object on a larger anchor, the usual case).
    Returns:
        ``rows``: one dict per size: ``iou`` (torchvision's ``box_iou``) and ``iou_plus_one`` of a
        box and its shifted copy; ``tw`` (torchvision's ``BoxCoder``) and ``tw_plus_one`` of the box
        on its anchor; ``mixed_iou``: the IoU with the box of what a +1 encoder's targets decode to
        under torchvision's convention (one convention in the data or the targets, the other in
        the decoder).
    """
    rows = []
    coder = BoxCoder()
    for side in sizes:
        box = torch.tensor([[32.0, 32.0, 32.0 + side, 32.0 + side]], dtype=torch.float64)
        moved = box + torch.tensor([shift, 0.0, shift, 0.0], dtype=torch.float64)
        half = anchor_ratio * side / 2
        centre = 32.0 + side / 2
        anchor = torch.tensor([[centre - half, centre - half, centre + half, centre + half]], dtype=torch.float64)
        legacy = encode_plus_one(anchor, box)
        mixed = coder.decode(legacy, anchor)
        rows.append({
            "size": float(side),
            "iou": box_iou(box, moved).item(),
            "iou_plus_one": iou_plus_one(box, moved).item(),
            "tw": coder.encode(anchor, box)[0, 2].item(),
            "tw_plus_one": legacy[0, 2].item(),
            "mixed_iou": box_iou(mixed, box).item(),
        })
    return {"rows": rows, "shift": shift, "anchor_ratio": anchor_ratio}


# --------------------------------------------------------------------------- weights = stds


def target_normalisation(proposals: Tensor, boxes: Tensor,
                         weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0),
                         beta: float = 1 / 9) -> dict[str, Any]:
    """Box-coder weights against py-faster-rcnn's target normalisation, and the loss without them.

    py-faster-rcnn encodes with weights 1, then divides the targets by
    ``BBOX_NORMALIZE_STDS = (0.1, 0.1, 0.2, 0.2)`` (means 0); torchvision and detectron2 fold
    that into the coder as ``weights = 1 / std = (10, 10, 5, 5)``.

    Args:
        proposals, boxes: ``(N, 4)`` pairs (a proposal and its matched gt box).
        weights: the coder's weights; the stds compared are ``1 / weights``.
        beta: smooth L1's switch point (torchvision's Fast R-CNN loss: 1/9).
    Returns:
        ``max_difference``: largest ``|torchvision BoxCoder(weights) - BoxCoder(1) / std|``;
        ``std_raw``, ``std_weighted``: the spread of tx, ty, tw, th (lists of 4);
        ``loss_raw``, ``loss_weighted``: mean smooth L1 per pair of a zero prediction (an untrained
        head's), the loss scale each choice starts from; ``loss_ratio``: weighted / raw.
    """
    from torchvision.models.detection._utils import BoxCoder as TorchvisionBoxCoder

    p, b = proposals.double(), boxes.double()
    stds = torch.tensor([1 / w for w in weights], dtype=torch.float64, device=p.device)
    raw = BoxCoder().encode(p, b)
    normalised = raw / stds
    theirs = TorchvisionBoxCoder(weights=tuple(float(w) for w in weights)).encode_single(b, p)

    def loss(t: Tensor) -> float:
        return torch.nn.functional.smooth_l1_loss(torch.zeros_like(t), t, beta=beta, reduction="sum").item() / len(t)

    loss_raw, loss_weighted = loss(raw), loss(theirs)
    return {
        "max_difference": (theirs - normalised).abs().max().item(),
        "std_raw": raw.std(dim=0).tolist(),
        "std_weighted": theirs.std(dim=0).tolist(),
        "loss_raw": loss_raw,
        "loss_weighted": loss_weighted,
        "loss_ratio": loss_weighted / loss_raw,
    }


# --------------------------------------------------------------------------- top-k per image or per batch


def _recall(boxes: Tensor, gt: Tensor, iou: float) -> tuple[int, int]:
    if len(gt) == 0:
        return 0, 0
    if len(boxes) == 0:
        return 0, len(gt)
    return int((box_iou(gt, boxes).max(dim=1).values >= iou).sum()), len(gt)


def topk_per_image_vs_batch(boxes: Sequence[Tensor], scores: Sequence[Tensor], gt_boxes: Sequence[Tensor], k: int,
                            iou: float = 0.5) -> dict[str, Any]:
    """Keep ``k`` proposals per image, or the best ``k * B`` of the whole batch of ``B`` images.

    Args:
        boxes, scores: per image ``(P_i, 4)`` and ``(P_i,)``: candidate proposals and their
            objectness probabilities (e.g. after NMS).
        gt_boxes: per image ``(M_i, 4)``.
        k: proposals per image (the batch keeps ``k * B`` in all).
        iou: a gt box is found when a kept proposal overlaps it with at least this IoU.
    Returns:
        ``per_image`` and ``per_batch``: each ``{"kept": [n_i], "found": [f_i], "num_gt": [m_i],
        "recall": overall share of gt boxes found}``.
    """
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    if not len(boxes) == len(scores) == len(gt_boxes):
        raise ValueError(f"boxes, scores and gt_boxes must have one entry per image: {len(boxes)}, "
                         f"{len(scores)}, {len(gt_boxes)}")
    image_of = torch.cat([torch.full((len(s),), i, dtype=torch.long) for i, s in enumerate(scores)])
    order = torch.cat([s.detach().cpu() for s in scores]).argsort(descending=True, stable=True)
    batch_keep = image_of[order[: k * len(scores)]]
    out = {}
    for name in ("per_image", "per_batch"):
        kept, found, num_gt = [], [], []
        for i, (b, s, g) in enumerate(zip(boxes, scores, gt_boxes)):
            n = min(k, len(s)) if name == "per_image" else int((batch_keep == i).sum())
            best = s.detach().cpu().argsort(descending=True, stable=True)[:n]
            f, m = _recall(b.detach().cpu()[best], g.detach().cpu(), iou)
            kept.append(n)
            found.append(f)
            num_gt.append(m)
        out[name] = {"kept": kept, "found": found, "num_gt": num_gt, "recall": sum(found) / max(1, sum(num_gt))}
    return out


# --------------------------------------------------------------------------- p > 0.5 proposals only


def score_threshold_starvation(proposals: Sequence[Tensor], scores: Sequence[Tensor], gt_boxes: Sequence[Tensor],
                               threshold: float = 0.5, fg_iou: float = 0.5) -> dict[str, Any]:
    """What the head is left with when only proposals scoring ``> threshold`` reach it.

    Args:
        proposals, scores: per image ``(P_i, 4)``, ``(P_i,)`` objectness probabilities.
        gt_boxes: per image ``(M_i, 4)``.
        threshold: the objectness probability a proposal must exceed.
        fg_iou: IoU at which a proposal is a foreground RoI (Fast R-CNN's 0.5).
    Returns:
        ``all`` and ``thresholded``: each ``{"proposals": [n_i], "positives": [p_i] (proposals with
        IoU >= fg_iou with some gt box), "gt_without_proposal": share of all gt boxes that no
        proposal reaches at fg_iou, "mean_proposals", "mean_positives"}``.
    """
    out = {}
    for name in ("all", "thresholded"):
        counts, positives, missed, total = [], [], 0, 0
        for p, s, g in zip(proposals, scores, gt_boxes):
            p, s, g = p.detach().cpu(), s.detach().cpu(), g.detach().cpu()
            if name == "thresholded":
                p = p[s > threshold]
            counts.append(len(p))
            if len(g) and len(p):
                iou = box_iou(p, g)
                positives.append(int((iou.max(dim=1).values >= fg_iou).sum()))
                missed += int((iou.max(dim=0).values < fg_iou).sum())
            else:
                positives.append(0)
                missed += len(g)
            total += len(g)
        out[name] = {"proposals": counts, "positives": positives, "gt_without_proposal": missed / max(1, total),
                     "mean_proposals": sum(counts) / max(1, len(counts)),
                     "mean_positives": sum(positives) / max(1, len(positives))}
    out["threshold"] = threshold
    return out


# --------------------------------------------------------------------------- background lower threshold


def background_candidates(proposals: Sequence[Tensor], gt_boxes: Sequence[Tensor], lows: Sequence[float] = (0.0, 0.1),
                          high: float = 0.5) -> dict[float, dict[str, float]]:
    """The background candidates of the proposal targets for each lower IoU threshold.

    A proposal is a background candidate when its best IoU with the image's gt boxes lies in
    ``[low, high)`` (every proposal of an image without gt boxes is one).

    Returns:
        ``{low: {"candidates": total over the images, "per_image": mean, "mean_best_iou": of the
        candidates, "touching": share of candidates with best IoU > 0}}``.
    """
    out = {}
    for low in lows:
        best = []
        for p, g in zip(proposals, gt_boxes):
            p, g = p.detach().cpu(), g.detach().cpu()
            if len(p) == 0:
                continue
            b = box_iou(p, g).max(dim=1).values if len(g) else torch.zeros(len(p))
            keep = (b < high) & ((b >= low) | (len(g) == 0))
            best.append(b[keep])
        values = torch.cat(best) if best else torch.zeros(0)
        out[float(low)] = {"candidates": len(values), "per_image": len(values) / max(1, len(proposals)),
                           "mean_best_iou": values.mean().item() if len(values) else float("nan"),
                           "touching": (values > 0).float().mean().item() if len(values) else float("nan")}
    return out


# --------------------------------------------------------------------------- RoI Align's half cell


def roi_align_shift(box: Sequence[float], spatial_scale: float = 1 / 16, size: int = 32,
                    sampling_ratio: int = 4) -> dict[str, Any]:
    """Where RoI Align reads a box, measured on a ramp, with ``aligned`` False and True.

    The feature map holds its own column index (``f[y, x] = x``, ``(1, 1, size, size)``), so one
    1 x 1 RoI Align bin returns the mean column it sampled, which bilinear interpolation keeps
    exact on a ramp. With pixels as areas (pixel ``i`` covers ``[i, i + 1)``, centre ``i + 0.5``,
    and cell ``c`` of the map centred at ``(c + 0.5) / spatial_scale``), the box's centre ``cx``
    is column ``cx * spatial_scale - 0.5``; the shift is how far, in image pixels, the read
    centre lies from it.

    Returns:
        ``{aligned: {"rpnlab": shift_px, "torchvision": shift_px}}`` for ``aligned`` False and True,
        and ``"expected_unaligned_px"``: ``0.5 / spatial_scale``, half a cell.
    """
    from rpnlab.detector.roi import roi_align

    ramp = torch.arange(size, dtype=torch.float64).expand(size, size)[None, None].contiguous()
    roi = torch.tensor([[0.0, *box]], dtype=torch.float64)
    true_column = (box[0] + box[2]) / 2 * spatial_scale - 0.5
    out: dict[Any, Any] = {}
    for aligned in (False, True):
        ours = roi_align(ramp, roi, 1, spatial_scale, sampling_ratio, aligned).item()
        theirs = torchvision.ops.roi_align(ramp, roi, 1, spatial_scale, sampling_ratio, aligned).item()
        out[aligned] = {"rpnlab": (ours - true_column) / spatial_scale,
                        "torchvision": (theirs - true_column) / spatial_scale}
    out["expected_unaligned_px"] = 0.5 / spatial_scale
    return out
