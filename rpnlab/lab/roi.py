"""Measurements of the second stage (notebooks 06 and 07): RoI Pool's quantisation, the pooling
kernels against torchvision's, and the detection post-processing one step at a time.

- ``roi_pool_region``: the image region RoI Pool actually reads for a box, after its rounding.
- ``compare_roi_kernels``: plain-PyTorch ``rpnlab.detector.roi`` against ``torchvision.ops`` on the same
  inputs, forward and gradient, with timings.
- ``detection_funnel``: ``rpnlab.detector.roi_heads.postprocess_detections`` for one image, keeping the
  number of candidates each step leaves (same detections, a test checks it).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from torch import Tensor

from rpnlab.detector.boxes import BoxCoder, check_boxes, clip_boxes, remove_small_boxes
from rpnlab.lab.figures import (
    COLORS,
    add_box,
    as_numpy,
    new_figure,
    plot_value_histograms,
    show_image,
)
from rpnlab.lab.timing import time_call

__all__ = [
    "DETECTION_STEPS", "compare_roi_kernels", "detection_funnel", "plot_pooled_rois",
    "plot_regression_targets", "plot_roi_quantisation", "roi_pool_region",
]


# Names of the counts ``detection_funnel`` returns, in order.
DETECTION_STEPS = ("candidates", "score threshold", "min size", "per-class NMS", "top detections")


def roi_pool_region(boxes: Tensor, spatial_scale: float) -> Tensor:
    """The part of the image that RoI Pool (torchvision's, Fast R-CNN's) pools for each box.

    ``boxes: (K, 4)`` image pixels -> ``(K, 4)`` image pixels. The kernel scales the corners to
    feature cells and rounds them (halves away from zero); the box then spans cells ``x1..x2``
    *inclusive* (Caffe's convention), at least one cell. Feature cell ``i`` is taken to stand for
    the ``1 / spatial_scale`` pixels centred on pixel ``i / spatial_scale``: the convention of
    torchvision's RoI Align (``aligned=False``), of anchors with offset 0 and of a backbone of
    stride-2 convolutions. So the cells ``x1..x2`` cover ``[(x1 - 1/2) / s, (x2 + 1/2) / s]``.
    Clipping to the feature map is not applied.
    """
    check_boxes(boxes, "boxes", values=False)
    if not spatial_scale > 0:
        raise ValueError(f"spatial_scale must be > 0, got {spatial_scale!r}")
    scaled = boxes * spatial_scale
    cells = torch.sign(scaled) * torch.floor(scaled.abs() + 0.5)  # C's round(), as the kernel
    x1, y1, x2, y2 = cells.unbind(-1)
    x2, y2 = torch.maximum(x2, x1), torch.maximum(y2, y1)  # at least one cell
    return torch.stack((x1 - 0.5, y1 - 0.5, x2 + 0.5, y2 + 0.5), dim=-1) / spatial_scale


def _forward_backward(op: Callable[..., Tensor], features: Tensor, rois: Tensor, upstream: Tensor | None,
                      **kwargs) -> tuple[Tensor, Tensor, Tensor]:
    x = features.detach().requires_grad_(True)
    out = op(x, rois, **kwargs)
    if upstream is None:
        upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(0)).to(out)
    (grad,) = torch.autograd.grad((out * upstream).sum(), x)
    return out.detach(), grad, upstream


def compare_roi_kernels(
    features: Tensor,
    rois: Tensor,
    output_size: int = 7,
    spatial_scale: float = 1 / 16,
    sampling_ratio: int = 2,
    aligned: bool = False,
    repeat: int = 3,
) -> dict[str, dict[str, float]]:
    """``rpnlab.detector.roi``'s plain-PyTorch RoI Pool and RoI Align against ``torchvision.ops``.

    Args:
        features: ``(N, C, H, W)``; rois: ``(K, 5)`` rows ``[batch_index, x1, y1, x2, y2]`` pixels.
        repeat: timed calls of each forward + backward (the median is kept).
    Returns:
        ``{"roi_pool": ..., "roi_align": ...}``, each ``dict(forward_max_diff, grad_max_diff,
        python_seconds, torchvision_seconds)``: the largest absolute difference of the outputs and
        of the gradients with respect to ``features`` (the same random upstream gradient for
        both), and the median time of one forward + backward.
    """
    import torchvision

    from rpnlab.detector import roi

    pairs = {
        "roi_pool": (roi.roi_pool, torchvision.ops.roi_pool,
                     {"output_size": output_size, "spatial_scale": spatial_scale}),
        "roi_align": (roi.roi_align, torchvision.ops.roi_align,
                      {"output_size": output_size, "spatial_scale": spatial_scale,
                       "sampling_ratio": sampling_ratio, "aligned": aligned}),
    }
    results = {}
    for name, (ours, theirs, kwargs) in pairs.items():
        diffs, ours_s, theirs_s = _compare_pair(ours, theirs, features, rois, kwargs, repeat)
        results[name] = {**diffs, "python_seconds": ours_s, "torchvision_seconds": theirs_s}
    return results


def _compare_pair(ours: Callable[..., Tensor], theirs: Callable[..., Tensor], features: Tensor, rois: Tensor,
                  kwargs: dict, repeat: int) -> tuple[dict[str, float], float, float]:
    """Largest output and gradient differences (the same random upstream gradient for both) and
    the median seconds of one forward + backward of each."""
    out_ours, grad_ours, upstream = _forward_backward(ours, features, rois, None, **kwargs)
    out_theirs, grad_theirs, _ = _forward_backward(theirs, features, rois, upstream, **kwargs)
    diffs = {"forward_max_diff": float((out_ours - out_theirs).abs().max()) if out_ours.numel() else 0.0,
             "grad_max_diff": float((grad_ours - grad_theirs).abs().max())}
    seconds = [time_call(functools.partial(_forward_backward, op, features, rois, upstream, **kwargs), repeat=repeat)
               for op in (ours, theirs)]
    return diffs, seconds[0], seconds[1]


def sparse_align_check(
    features: Tensor,
    rois: Tensor,
    output_size: int = 7,
    spatial_scale: float = 1 / 16,
    sampling_ratio: int = 2,
    aligned: bool = False,
    repeat: int = 3,
) -> dict[str, Any]:
    """RoI Align as one sparse matrix per image (``rpnlab.detector.roi_sparse``, the detector's CPU
    path for large maps) against ``torchvision.ops.roi_align``, on the CPU.

    Args:
        features: ``(N, C, H, W)`` (moved to the CPU, float32); rois: ``(K, 5)`` rows
            ``[batch_index, x1, y1, x2, y2]`` pixels.
    Returns:
        ``rows``, ``columns``, ``entries_per_row`` and ``density`` of image 0's matrix (the share
        of its entries that are stored), ``forward_max_diff``, ``grad_max_diff`` (the same random
        upstream gradient for both), ``sparse_seconds`` and ``torchvision_seconds`` (median
        forward + backward).
    """
    import torchvision

    from rpnlab.detector.roi_sparse import align_matrices, roi_align_sparse

    features, rois = features.detach().float().cpu(), rois.detach().float().cpu()
    rois = rois[torch.argsort(rois[:, 0], stable=True)]
    size = (output_size, output_size)
    matrix = align_matrices(rois, features.shape[0], tuple(features.shape[-2:]), size, spatial_scale,
                            sampling_ratio, aligned)[0]
    rows, columns = matrix.shape if matrix is not None else (0, features.shape[-2] * features.shape[-1])
    kwargs = {"output_size": size, "spatial_scale": spatial_scale, "sampling_ratio": sampling_ratio,
              "aligned": aligned}
    diffs, sparse_s, torchvision_s = _compare_pair(roi_align_sparse, torchvision.ops.roi_align, features, rois,
                                                   kwargs, repeat)
    return {"rows": rows, "columns": columns, "entries_per_row": 4 * sampling_ratio**2,
            "density": 4 * sampling_ratio**2 / columns, **diffs,
            "sparse_seconds": sparse_s, "torchvision_seconds": torchvision_s}


def detection_funnel(
    class_logits: Tensor,
    box_regression: Tensor,
    proposals: Tensor,
    image_size: tuple[int, int],
    box_coder: BoxCoder | None = None,
    score_thresh: float = 0.05,
    nms_thresh: float = 0.5,
    detections_per_img: int = 100,
    min_size: float = 1e-2,
) -> dict[str, Any]:
    """Post-processing of one image, step by step (as ``rpnlab.detector.roi_heads.postprocess_detections``).

    Args:
        class_logits: ``(R, C+1)``; box_regression: ``(R, 4(C+1))``; proposals: ``(R, 4)``.
        image_size: ``(h, w)`` to clip to.
        box_coder: default ``BoxCoder((10, 10, 5, 5))``.
        score_thresh, nms_thresh, detections_per_img, min_size: as ``postprocess_detections``.
    Returns:
        ``counts`` (``{step: int}`` for ``DETECTION_STEPS``: ``R * C`` (RoI, class) candidates, then
        what each step leaves), ``per_class`` (``{label: detections}`` in the result), and the
        detections ``boxes (D, 4)``, ``scores (D,)``, ``labels (D,)``, best first.
    """
    import torchvision

    check_boxes(proposals, "proposals", values=False)
    r, num_classes = class_logits.shape
    if proposals.shape != (r, 4) or box_regression.shape != (r, 4 * num_classes):
        raise ValueError(
            f"for class_logits {tuple(class_logits.shape)}, proposals must be ({r}, 4) and box_regression "
            f"({r}, {4 * num_classes}); got {tuple(proposals.shape)} and {tuple(box_regression.shape)}"
        )
    box_coder = box_coder or BoxCoder((10.0, 10.0, 5.0, 5.0))
    boxes = box_coder.decode(box_regression, proposals.to(box_regression.dtype)).reshape(r, num_classes, 4)
    boxes = clip_boxes(boxes, image_size)
    scores = F.softmax(class_logits, dim=-1)
    labels = torch.arange(num_classes, device=boxes.device).expand(r, num_classes)
    # Every (RoI, foreground class) pair is a candidate; the background column is dropped.
    boxes, scores, labels = boxes[:, 1:].reshape(-1, 4), scores[:, 1:].reshape(-1), labels[:, 1:].reshape(-1)
    counts = [boxes.shape[0]]
    keep = torch.where(scores > score_thresh)[0]
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    counts.append(boxes.shape[0])
    keep = remove_small_boxes(boxes, min_size)
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    counts.append(boxes.shape[0])
    keep = torchvision.ops.batched_nms(boxes, scores, labels, nms_thresh)
    counts.append(keep.shape[0])
    keep = keep[:detections_per_img]
    counts.append(keep.shape[0])
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    per_class = {c: int((labels == c).sum()) for c in range(1, num_classes)}
    return {"counts": dict(zip(DETECTION_STEPS, counts)), "per_class": per_class,
            "boxes": boxes, "scores": scores, "labels": labels}


def plot_roi_quantisation(box: Sequence[float], spatial_scale: float = 1 / 16, output_size: int = 2,
                          sampling_ratio: int = 2, feature_size: tuple[int, int] | None = None,
                          title: str | None = None) -> Figure:
    """One RoI on the feature grid: RoI Pool's rounded box and integer bins (left) against RoI
    Align's exact bins and bilinear sample points (right).

    Cells are drawn centred on their integer coordinates (cell ``i`` spans ``[i - 1/2, i + 1/2]``),
    the convention of ``roi_pool_region`` and of RoI Align's bilinear sampling, so the rounded
    box drawn is exactly the region ``roi_pool_region`` gives, and the exact RoI lies within
    half a cell of it."""
    x1, y1, x2, y2 = (float(v) * spatial_scale for v in box)
    if feature_size is None:
        feature_size = (math.ceil(y2) + 1, math.ceil(x2) + 1)
    fh, fw = feature_size
    fig, axes = new_figure(1, 2, (4.5, 4.5))
    for ax in axes[0]:
        for x in range(fw + 1):
            ax.axvline(x - 0.5, color="lightgray", lw=0.6)  # cell borders: cell i is centred on i
        for y in range(fh + 1):
            ax.axhline(y - 0.5, color="lightgray", lw=0.6)
        ax.set_xlim(-0.7, fw - 0.3)
        ax.set_ylim(fh - 0.3, -0.7)
        ax.set_aspect("equal")
        ax.set_xlabel("feature x (cells)")
        ax.set_ylabel("feature y (cells)")
        add_box(ax, (x1, y1, x2, y2), "black", linewidth=1.5, linestyle=":", label="RoI (exact)")
    # RoI Pool (torchvision): round the corners, at least one cell, integer bin edges; cells
    # rx1..rx2 inclusive, each spanning half a cell either side of its index.
    ax = axes[0, 0]
    rx1, ry1, rx2, ry2 = (math.floor(v + 0.5) for v in (x1, y1, x2, y2))
    rw, rh = max(rx2 - rx1 + 1, 1), max(ry2 - ry1 + 1, 1)
    region = roi_pool_region(torch.tensor([[float(v) for v in box]]), spatial_scale)[0] * spatial_scale
    add_box(ax, tuple(region.tolist()), COLORS["negative"], linewidth=2, label="rounded RoI")
    for b in range(output_size):
        for c in range(output_size):
            bx1 = rx1 + math.floor(c * rw / output_size)
            bx2 = rx1 + math.ceil((c + 1) * rw / output_size)
            by1 = ry1 + math.floor(b * rh / output_size)
            by2 = ry1 + math.ceil((b + 1) * rh / output_size)
            ax.add_patch(Rectangle((bx1 - 0.5, by1 - 0.5), bx2 - bx1, by2 - by1, facecolor=COLORS["negative"], alpha=0.12,
                                   edgecolor=COLORS["negative"], linewidth=0.8))
    ax.set_title(f"RoI Pool: rounded to cells, {output_size}x{output_size} bins")
    ax.legend(fontsize=7, loc="lower right")
    # RoI Align: exact bins, sampling_ratio^2 bilinear points per bin.
    ax = axes[0, 1]
    bw, bh = (x2 - x1) / output_size, (y2 - y1) / output_size
    pts = []
    for b in range(output_size):
        for c in range(output_size):
            ax.add_patch(Rectangle((x1 + c * bw, y1 + b * bh), bw, bh, fill=False, edgecolor=COLORS["positive"], linewidth=1.2))
            for sy in range(sampling_ratio):
                for sx in range(sampling_ratio):
                    pts.append((x1 + c * bw + (sx + 0.5) * bw / sampling_ratio, y1 + b * bh + (sy + 0.5) * bh / sampling_ratio))
    pts_np = np.array(pts)
    ax.scatter(pts_np[:, 0], pts_np[:, 1], s=12, color=COLORS["positive"], label="bilinear sample points")
    ax.set_title(f"RoI Align: exact bins, {sampling_ratio}x{sampling_ratio} samples per bin")
    ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(title or f"RoI {tuple(round(float(v), 1) for v in box)} at scale {spatial_scale:g}")
    return fig


def plot_pooled_rois(image: Any, box: Sequence[float], pooled: Mapping[str, Any], title: str | None = None) -> Figure:
    """One box on an image, then each pooling method's output for it, drawn as a small image.

    ``pooled``: name -> ``(C, out_h, out_w)`` (or ``(1, C, out_h, out_w)``); 3 channels are shown
    as RGB (pool the image itself to see what each method keeps), others as their channel mean.
    """
    fig, axes = new_figure(1, 1 + len(pooled), (3.0, 3.0))
    ax = axes[0, 0]
    h, w = show_image(ax, image)
    add_box(ax, box, COLORS["prediction"], linewidth=2, outline=True)
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)
    ax.set_title("the RoI")
    ax.set_xlabel("x (pixels)")
    ax.set_ylabel("y (pixels)")
    for ax, (name, value) in zip(axes[0, 1:], pooled.items()):
        v = as_numpy(value).astype(np.float64)
        if v.ndim == 4:
            v = v[0]
        if v.ndim != 3:
            raise ValueError(f"pooled[{name!r}] must be (C, out_h, out_w), got shape {v.shape}")
        if v.shape[0] == 3:
            ax.imshow(np.clip(v.transpose(1, 2, 0), 0, 1), interpolation="nearest")
        else:
            ax.imshow(v.mean(axis=0), cmap="viridis", interpolation="nearest")
        ax.set_title(f"{name}: {v.shape[1]}x{v.shape[2]}", fontsize=9)
        ax.set_xlabel("output column")
        ax.set_ylabel("output row")
    fig.suptitle(title or "one RoI, three ways to pool it")
    return fig


def plot_regression_targets(targets: Mapping[str, Any], bins: int = 40, title: str | None = None) -> Figure:
    """Histograms of ``(tx, ty, tw, th)`` (name -> ``(N, 4)`` encoded targets), one panel each, with
    each set's standard deviation in the legend: the box weights (10, 10, 5, 5) scale them up."""
    arrays = {k: as_numpy(v).astype(np.float64).reshape(-1, 4) for k, v in targets.items()}
    fig, axes = new_figure(1, 4, (3.0, 2.9))
    for j, (ax, coord) in enumerate(zip(axes[0], ("tx", "ty", "tw", "th"))):
        column = {f"{name}, std {a[:, j].std():.2f}" if a.shape[0] else name: a[:, j] for name, a in arrays.items()}
        plot_value_histograms(column, coord, bins=bins, ax=ax, title=coord, y_label="RoIs")
        ax.legend(fontsize=6)
    fig.suptitle(title or "regression targets of the foreground RoIs")
    return fig
