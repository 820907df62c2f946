"""The solutions of the exercises: one function per exercise, named as it, with the learner's signature.

The code between ``### BEGIN SOLUTION`` and ``### END SOLUTION`` is what the instructor edition
puts in place of the stub's ``raise NotImplementedError`` (``rpnlab.lab.exercises.instructor``):
the notebooks hold only the stubs, this file holds only the answers, and nothing is copied by
hand. Written as a learner would, with torch only (no rpnlab), one idea per line. They ship with
the package, so a learner who looks can read them: the checks are for learning, not for grading.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "anchor_grid", "base_anchors", "bilinear", "clip_boxes", "decode", "encode", "fast_rcnn_loss", "fpn_level",
    "iou", "label_anchors", "nms", "proposal_labels", "roi_pool_bin", "rpn_loss", "sample", "smooth_l1",
    "top_k_per_level",
]


def iou(boxes1, boxes2):
    ### BEGIN SOLUTION
    area1 = (boxes1[:, 2] - boxes1[:, 0]) * (boxes1[:, 3] - boxes1[:, 1])  # (N,)
    area2 = (boxes2[:, 2] - boxes2[:, 0]) * (boxes2[:, 3] - boxes2[:, 1])  # (M,)
    top_left = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])  # (N, M, 2)
    bottom_right = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])  # (N, M, 2)
    wh = (bottom_right - top_left).clamp(min=0)  # apart: no overlap, not a negative one
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area1[:, None] + area2[None, :] - inter)
    ### END SOLUTION


def base_anchors(sizes, ratios):
    ### BEGIN SOLUTION
    sizes = torch.as_tensor(sizes, dtype=torch.float32)
    ratios = torch.as_tensor(ratios, dtype=torch.float32)
    h_factor = torch.sqrt(ratios)  # ratio = h / w with h * w = size**2
    w_factor = 1 / h_factor
    ws = (w_factor[:, None] * sizes[None, :]).reshape(-1)  # ratios outer, sizes inner
    hs = (h_factor[:, None] * sizes[None, :]).reshape(-1)
    return (torch.stack([-ws, -hs, ws, hs], dim=1) / 2).round()
    ### END SOLUTION


def anchor_grid(base, feature_size, stride, offset):
    ### BEGIN SOLUTION
    h, w = feature_size
    xs = (torch.arange(w, dtype=base.dtype) + offset) * stride
    ys = (torch.arange(h, dtype=base.dtype) + offset) * stride
    cy, cx = torch.meshgrid(ys, xs, indexing="ij")  # (H, W): rows outer, columns inner
    centres = torch.stack([cx, cy, cx, cy], dim=-1).reshape(-1, 1, 4)  # (H*W, 1, 4)
    return (centres + base[None]).reshape(-1, 4)  # (H*W, k, 4) -> (H*W*k, 4)
    ### END SOLUTION


def encode(anchors, boxes):
    ### BEGIN SOLUTION
    wa, ha = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    xa, ya = anchors[:, 0] + wa / 2, anchors[:, 1] + ha / 2
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    x, y = boxes[:, 0] + w / 2, boxes[:, 1] + h / 2
    return torch.stack([(x - xa) / wa, (y - ya) / ha, torch.log(w / wa), torch.log(h / ha)], dim=1)
    ### END SOLUTION


def decode(deltas, anchors):
    ### BEGIN SOLUTION
    wa, ha = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    xa, ya = anchors[:, 0] + wa / 2, anchors[:, 1] + ha / 2
    x, y = xa + deltas[:, 0] * wa, ya + deltas[:, 1] * ha
    w, h = wa * torch.exp(deltas[:, 2]), ha * torch.exp(deltas[:, 3])
    return torch.stack([x - w / 2, y - h / 2, x + w / 2, y + h / 2], dim=1)
    ### END SOLUTION


def label_anchors(iou, high, low):
    ### BEGIN SOLUTION
    best = iou.max(dim=0).values  # (A,): each anchor's best IoU over the gt boxes
    labels = torch.full_like(best, -1.0)  # ignored unless a rule below says otherwise
    labels[best < low] = 0.0
    labels[best >= high] = 1.0
    best_for_gt = iou.max(dim=1, keepdim=True).values  # (M, 1): each gt box's best anchor IoU
    labels[(iou == best_for_gt).any(dim=0)] = 1.0  # rule (i): ties included
    return labels
    ### END SOLUTION


def sample(labels, batch_size, positive_fraction):
    ### BEGIN SOLUTION
    positive = torch.where(labels == 1)[0]
    negative = torch.where(labels == 0)[0]
    num_pos = min(positive.numel(), int(batch_size * positive_fraction))
    num_neg = min(negative.numel(), batch_size - num_pos)
    pos_mask = torch.zeros_like(labels, dtype=torch.bool)
    neg_mask = torch.zeros_like(labels, dtype=torch.bool)
    pos_mask[positive[torch.randperm(positive.numel())[:num_pos]]] = True
    neg_mask[negative[torch.randperm(negative.numel())[:num_neg]]] = True
    return pos_mask, neg_mask
    ### END SOLUTION


def smooth_l1(input, target, beta):
    ### BEGIN SOLUTION
    d = (input - target).abs()
    return torch.where(d < beta, 0.5 * d**2 / beta, d - 0.5 * beta).sum()
    ### END SOLUTION


def rpn_loss(objectness, deltas, labels, targets):
    ### BEGIN SOLUTION
    sampled = labels >= 0
    positive = labels == 1
    loss_objectness = F.binary_cross_entropy_with_logits(objectness[sampled], labels[sampled])
    d = (deltas[positive] - targets[positive]).abs()  # select first: targets elsewhere may be inf
    beta = 1 / 9
    box_sum = torch.where(d < beta, 0.5 * d**2 / beta, d - 0.5 * beta).sum()
    return loss_objectness, box_sum / sampled.sum()
    ### END SOLUTION


def clip_boxes(boxes, image_size):
    ### BEGIN SOLUTION
    height, width = image_size
    x = boxes[:, 0::2].clamp(0, width)  # x1, x2
    y = boxes[:, 1::2].clamp(0, height)  # y1, y2
    return torch.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], dim=1)
    ### END SOLUTION


def nms(boxes, scores, iou_threshold):
    ### BEGIN SOLUTION
    order = torch.sort(scores, descending=True, stable=True).indices
    keep = []
    suppressed = torch.zeros(len(boxes), dtype=torch.bool)
    for i in order.tolist():
        if suppressed[i]:
            continue
        keep.append(i)
        x1y1 = torch.max(boxes[i, :2], boxes[:, :2])
        x2y2 = torch.min(boxes[i, 2:], boxes[:, 2:])
        inter = (x2y2 - x1y1).clamp(min=0).prod(dim=1)
        areas = (boxes[:, 2:] - boxes[:, :2]).prod(dim=1)
        suppressed |= inter / (areas[i] + areas - inter) > iou_threshold
    return torch.tensor(keep, dtype=torch.int64)
    ### END SOLUTION


def roi_pool_bin(feature, roi, output_size, i, j):
    ### BEGIN SOLUTION
    height, width = feature.shape
    x1, y1, x2, y2 = (math.floor(v + 0.5) for v in roi.tolist())  # C's round(): halves away from 0
    roi_w, roi_h = max(x2 - x1 + 1, 1), max(y2 - y1 + 1, 1)  # corners are inclusive cells
    bin_w, bin_h = roi_w / output_size, roi_h / output_size
    y_lo = min(max(y1 + math.floor(i * bin_h), 0), height)  # widen the bin outwards to whole cells,
    y_hi = min(max(y1 + math.ceil((i + 1) * bin_h), 0), height)  # then clip it to the feature map
    x_lo = min(max(x1 + math.floor(j * bin_w), 0), width)
    x_hi = min(max(x1 + math.ceil((j + 1) * bin_w), 0), width)
    if y_hi <= y_lo or x_hi <= x_lo:
        return torch.tensor(0.0)
    return feature[y_lo:y_hi, x_lo:x_hi].max()
    ### END SOLUTION


def bilinear(feature, y, x):
    ### BEGIN SOLUTION
    height, width = feature.shape
    y0, x0 = int(y), int(x)  # the cell above-left (coordinates are >= 0)
    y1, x1 = min(y0 + 1, height - 1), min(x0 + 1, width - 1)  # no neighbour past the map
    fy, fx = y - y0, x - x0
    top = (1 - fx) * feature[y0, x0] + fx * feature[y0, x1]
    bottom = (1 - fx) * feature[y1, x0] + fx * feature[y1, x1]
    return (1 - fy) * top + fy * bottom
    ### END SOLUTION


def proposal_labels(proposals, gt_boxes, gt_labels, fg_thresh, bg_high, bg_low):
    ### BEGIN SOLUTION
    lt = torch.max(gt_boxes[:, None, :2], proposals[None, :, :2])
    rb = torch.min(gt_boxes[:, None, 2:], proposals[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=2)
    area_gt = (gt_boxes[:, 2:] - gt_boxes[:, :2]).prod(dim=1)
    area_p = (proposals[:, 2:] - proposals[:, :2]).prod(dim=1)
    iou = inter / (area_gt[:, None] + area_p[None, :] - inter)  # (M, P)
    best, best_gt = iou.max(dim=0)
    labels = torch.full((len(proposals),), -1, dtype=torch.int64)
    labels[(best >= bg_low) & (best < bg_high)] = 0
    foreground = best >= fg_thresh
    labels[foreground] = gt_labels[best_gt[foreground]].long()
    return labels
    ### END SOLUTION


def fast_rcnn_loss(class_logits, box_regression, labels, targets):
    ### BEGIN SOLUTION
    loss_classifier = F.cross_entropy(class_logits, labels)
    r = len(labels)
    per_class = box_regression.reshape(r, -1, 4)  # (R, C+1, 4)
    foreground = torch.where(labels > 0)[0]
    own = per_class[foreground, labels[foreground]]  # each RoI's deltas for its own class
    d = (own - targets[foreground]).abs()
    beta = 1 / 9
    loss_box = torch.where(d < beta, 0.5 * d**2 / beta, d - 0.5 * beta).sum() / r
    return loss_classifier, loss_box
    ### END SOLUTION


def fpn_level(boxes, k_min, k_max):
    ### BEGIN SOLUTION
    scale = torch.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))  # side of the same-area square
    k = torch.floor(4 + torch.log2(scale / 224) + 1e-6)  # 224 px on level 4; eps as torchvision's LevelMapper
    return k.clamp(k_min, k_max).to(torch.int64) - k_min  # an index into the pooler's levels
    ### END SOLUTION


def top_k_per_level(objectness, num_anchors_per_level, k):
    ### BEGIN SOLUTION
    picked, offset = [], 0
    for scores in objectness.split(list(num_anchors_per_level), dim=1):  # (B, A_l) per level
        n = scores.shape[1]
        picked.append(scores.topk(min(k, n), dim=1).indices + offset)  # positions in the full list
        offset += n
    return torch.cat(picked, dim=1)
    ### END SOLUTION
