"""Measurements of the second stage (notebooks 06 and 07): RoI Pool's quantisation, the pooling
kernels against torchvision's, and the detection post-processing one step at a time.

- ``roi_pool_region``: the image region RoI Pool actually reads for a box, after its rounding.
- ``compare_roi_kernels``: plain-PyTorch ``rpnlab.roi`` against ``torchvision.ops`` on the same
  inputs, forward and gradient, with timings.
- ``detection_funnel``: ``rpnlab.roi_heads.postprocess_detections`` for one image, keeping the
  number of candidates each step leaves (same detections, a test checks it).
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from rpnlab.boxes import BoxCoder, check_boxes, clip_boxes, remove_small_boxes

__all__ = ["DETECTION_STEPS", "compare_roi_kernels", "detection_funnel", "roi_pool_region", "time_call"]

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


def time_call(fn: Callable[[], Any], repeat: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeat`` calls, after ``warmup`` calls.

    On a GPU, pass a ``fn`` that synchronises (``torch.cuda.synchronize()``), or the time is only
    that of queueing the kernels.
    """
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat!r}")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


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
    """``rpnlab.roi``'s plain-PyTorch RoI Pool and RoI Align against ``torchvision.ops``.

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

    from rpnlab import roi

    pairs = {
        "roi_pool": (roi.roi_pool, torchvision.ops.roi_pool,
                     {"output_size": output_size, "spatial_scale": spatial_scale}),
        "roi_align": (roi.roi_align, torchvision.ops.roi_align,
                      {"output_size": output_size, "spatial_scale": spatial_scale,
                       "sampling_ratio": sampling_ratio, "aligned": aligned}),
    }
    results = {}
    for name, (ours, theirs, kwargs) in pairs.items():
        out_ours, grad_ours, upstream = _forward_backward(ours, features, rois, None, **kwargs)
        out_theirs, grad_theirs, _ = _forward_backward(theirs, features, rois, upstream, **kwargs)
        run_ours = functools.partial(_forward_backward, ours, features, rois, upstream, **kwargs)
        run_theirs = functools.partial(_forward_backward, theirs, features, rois, upstream, **kwargs)
        results[name] = {
            "forward_max_diff": float((out_ours - out_theirs).abs().max()) if out_ours.numel() else 0.0,
            "grad_max_diff": float((grad_ours - grad_theirs).abs().max()),
            "python_seconds": time_call(run_ours, repeat=repeat),
            "torchvision_seconds": time_call(run_theirs, repeat=repeat),
        }
    return results


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
    """Post-processing of one image, step by step (as ``rpnlab.roi_heads.postprocess_detections``).

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
