"""Anchor analysis: how well anchors cover the ground truth, k-means anchors, label counts.

Pure functions behind the notebook widgets, so they have to answer while a slider moves: the
best-IoU search is written for speed (about 15 ms for 10k anchors x 500 boxes on one CPU core).

The "coverage" of a gt box is its best IoU over all anchors. The RPN can only learn to regress
from anchors it is matched with, and the matcher's positives are anchors with IoU >= 0.7 (or a
gt box's best anchor), so a box whose best IoU is low is a box the RPN starts far from.

Longer than 500 lines because anchor coverage, k-means anchors and their figures are one notebook's
(01) measurements and drawings.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from torch import Tensor

from rpnlab.config import AnchorConfig
from rpnlab.detector.anchors import AnchorGenerator
from rpnlab.detector.boxes import check_boxes
from rpnlab.lab.figures import (
    CLASS_COLORS,
    COLORS,
    add_box,
    as_numpy,
    boxes_numpy,
    show_image,
    single_ax,
)

__all__ = [
    "anchor_coverage", "best_anchor_iou", "coverage_over_dataset", "dataset_gt_boxes",
    "default_feature_sizes", "kmeans_anchors", "mean_best_iou", "plot_anchor_coverage",
    "plot_anchor_grid", "plot_base_anchors", "plot_kmeans_anchors", "wh_iou",
    "wh_to_sizes_ratios",
]


# Elements of one (gt chunk x anchors) IoU block: small enough to stay in cache, large enough
# that the Python loop over chunks costs nothing (measured ~15% faster than one big block).
_BLOCK_ELEMENTS = 1 << 19


def best_anchor_iou(anchors: Tensor, gt_boxes: Tensor) -> Tensor:
    """Best IoU of each gt box over all anchors: ``anchors (A, 4), gt_boxes (M, 4) -> (M,)``.

    The same numbers as ``box_iou(gt_boxes, anchors).max(dim=1).values`` (0 where there are no
    anchors, 0 for a pair whose union is empty), computed over blocks of gt boxes with in-place
    arithmetic so the ``(M, A)`` matrix never exists whole. On the device of the inputs.
    """
    check_boxes(anchors, "anchors", values=False)
    check_boxes(gt_boxes, "gt_boxes", values=False)
    if anchors.dim() != 2 or gt_boxes.dim() != 2:
        raise ValueError(
            "anchors must be (A, 4) and gt_boxes (M, 4), "
            f"got {tuple(anchors.shape)} and {tuple(gt_boxes.shape)}"
        )
    anchors = anchors.to(gt_boxes.dtype)
    best = gt_boxes.new_zeros(gt_boxes.shape[0])
    if anchors.shape[0] == 0 or gt_boxes.shape[0] == 0:
        return best

    ax1, ay1, ax2, ay2 = anchors.unbind(dim=1)  # (A,) each
    anchor_area = (ax2 - ax1).clamp(min=0) * (ay2 - ay1).clamp(min=0)
    tiny = torch.finfo(gt_boxes.dtype).tiny
    chunk = max(1, _BLOCK_ELEMENTS // anchors.shape[0])
    for start in range(0, gt_boxes.shape[0], chunk):
        gx1, gy1, gx2, gy2 = (
            c[:, None] for c in gt_boxes[start : start + chunk].unbind(dim=1)
        )  # (m, 1)
        gt_area = (gx2 - gx1).clamp(min=0) * (gy2 - gy1).clamp(min=0)
        # Intersection width and height, (m, A); the trailing underscores reuse one buffer.
        inter_w = torch.minimum(gx2, ax2).sub_(torch.maximum(gx1, ax1)).clamp_(min=0)
        inter_h = torch.minimum(gy2, ay2).sub_(torch.maximum(gy1, ay1)).clamp_(min=0)
        inter = inter_w.mul_(inter_h)
        union = (gt_area + anchor_area).sub_(inter)
        # Where the union is 0 the intersection is 0 too: 0 / tiny = 0 instead of NaN.
        iou = inter.div_(union.clamp_(min=tiny))
        best[start : start + chunk] = iou.amax(dim=1)
    return best


def anchor_coverage(
    anchors: Tensor, gt_boxes: Tensor, thresholds: Sequence[float] = (0.5, 0.7)
) -> dict:
    """How well ``anchors: (A, 4)`` cover ``gt_boxes: (M, 4)``.

    Returns:
        ``dict(best_iou (M,), mean_best_iou: float, covered: {threshold: fraction})`` where
        ``covered[t]`` is the fraction of gt boxes with best IoU ``>= t``. With no gt boxes the
        mean and the fractions are NaN.
    """
    best = best_anchor_iou(anchors, gt_boxes)
    return {"best_iou": best, **_summarise(best, thresholds)}


def _summarise(best: Tensor, thresholds: Sequence[float]) -> dict:
    if best.numel() == 0:
        return {"mean_best_iou": math.nan, "covered": {float(t): math.nan for t in thresholds}}
    # One host copy of the few summary numbers: these feed a widget's text, not a training step.
    covered = torch.stack([(best >= t).to(torch.float64).mean() for t in thresholds]).tolist()
    return {
        "mean_best_iou": float(best.to(torch.float64).mean()),
        "covered": {float(t): c for t, c in zip(thresholds, covered)},
    }


def _image_size(image) -> tuple[int, int]:
    if isinstance(image, Tensor):
        return int(image.shape[-2]), int(image.shape[-1])
    if hasattr(image, "size") and not callable(image.size):  # a PIL image: size is (width, height)
        w, h = image.size
        return int(h), int(w)
    raise TypeError(
        f"expected an image tensor (..., H, W) or a PIL image, got {type(image).__name__}"
    )


def _per_image_targets(dataset, max_images: int | None):
    """Yield ``(image_size, boxes (M_i, 4), labels (M_i,))`` for the first images of ``dataset``."""
    n = len(dataset)
    if max_images is not None:
        if not isinstance(max_images, int) or max_images < 0:
            raise ValueError(
                f"max_images must be a non-negative integer or None, got {max_images!r}"
            )
        n = min(n, max_images)
    for i in range(n):
        image, target = dataset[i]
        if "boxes" not in target:
            raise ValueError(f"dataset[{i}] target has no 'boxes' (keys: {sorted(target)})")
        boxes = torch.as_tensor(target["boxes"], dtype=torch.float32).reshape(-1, 4)
        labels = torch.as_tensor(
            target.get("labels", torch.zeros(boxes.shape[0])), dtype=torch.int64
        ).reshape(-1)
        yield _image_size(image), boxes, labels


def _cat(tensors: list[Tensor], empty: Tensor) -> Tensor:
    return torch.cat(tensors) if tensors else empty


def dataset_gt_boxes(
    dataset, max_images: int | None = None
) -> tuple[Tensor, Tensor, list[tuple[int, int]]]:
    """All ground truth of a dataset of ``(image, target)`` samples (``target["boxes"]`` xyxy).

    Returns:
        ``boxes: (M, 4)`` float32 and ``labels: (M,)`` int64 over all images in order, and
        ``image_sizes``: one ``(h, w)`` per image read. Images are loaded to learn their size.
    """
    sizes, boxes, labels = [], [], []
    for size, b, lab in _per_image_targets(dataset, max_images):
        sizes.append(size)
        boxes.append(b)
        labels.append(lab)
    return _cat(boxes, torch.zeros(0, 4)), _cat(labels, torch.zeros(0, dtype=torch.int64)), sizes


def default_feature_sizes(
    image_size: tuple[int, int], strides: Sequence[int]
) -> list[tuple[int, int]]:
    """The feature map of each stride for an image of ``(h, w)``: ``(ceil(h / s), ceil(w / s))``.

    A backbone whose pooling rounds down gives one cell fewer at some sizes; pass its own rule
    as ``feature_size_fn`` to ``coverage_over_dataset`` then.
    """
    h, w = image_size
    return [(math.ceil(h / s), math.ceil(w / s)) for s in strides]


def coverage_over_dataset(
    anchor_generator: AnchorGenerator | AnchorConfig,
    dataset,
    stride: int | Sequence[int] | None = None,
    feature_size_fn: Callable[[tuple[int, int]], Sequence[tuple[int, int]]] | None = None,
    thresholds: Sequence[float] = (0.5, 0.7),
    max_images: int | None = None,
) -> dict:
    """Anchor coverage of every gt box of a dataset, each box against its own image's anchors.

    Args:
        anchor_generator: an ``AnchorGenerator`` or an ``AnchorConfig`` to build one.
        dataset: samples ``(image (3, H, W), target dict with "boxes" (M, 4))``.
        stride: feature stride(s) that decide the grid, one per level; default the generator's.
        feature_size_fn: ``(h, w) -> [(H_l, W_l), ...]`` per level, overriding the
            ``ceil(h / stride)`` rule (``default_feature_sizes``).
        thresholds: IoU levels for ``covered``.
        max_images: read only the first this many images.

    Returns:
        ``dict(best_iou (M,), labels (M,), gt_boxes (M, 4), image_index (M,), mean_best_iou,
        covered {t: fraction}, num_images, num_gt, num_anchors {(h, w): A})``, boxes in dataset
        order. Images of the same size share one anchor grid, computed once.
    """
    if isinstance(anchor_generator, AnchorConfig):
        anchor_generator = AnchorGenerator.from_config(anchor_generator)
    if not isinstance(anchor_generator, AnchorGenerator):
        raise TypeError(
            "anchor_generator must be an AnchorGenerator or an AnchorConfig, "
            f"got {type(anchor_generator).__name__}"
        )
    if stride is None:
        strides = anchor_generator.strides
    else:
        strides = (stride,) if isinstance(stride, int) else tuple(stride)
    if feature_size_fn is None:
        if len(strides) != anchor_generator.num_levels:
            raise ValueError(
                f"stride needs one value per anchor level ({anchor_generator.num_levels}), got {strides}"
            )

        def feature_size_fn(size):
            return default_feature_sizes(size, strides)

    # Group the gt boxes by image size: one anchor grid per size.
    by_size: dict[tuple[int, int], list[int]] = {}
    boxes, labels, image_index = [], [], []
    for i, (size, b, lab) in enumerate(_per_image_targets(dataset, max_images)):
        by_size.setdefault(size, []).append(len(boxes))
        boxes.append(b)
        labels.append(lab)
        image_index.append(torch.full((b.shape[0],), i, dtype=torch.int64))

    best = [torch.zeros(0)] * len(boxes)
    num_anchors = {}
    for size, members in by_size.items():
        anchors = anchor_generator(feature_size_fn(size))
        num_anchors[size] = anchors.shape[0]
        gt = torch.cat([boxes[j] for j in members])
        per_image = best_anchor_iou(anchors, gt).split([boxes[j].shape[0] for j in members])
        for j, image_best in zip(members, per_image):
            best[j] = image_best

    best_iou = _cat(best, torch.zeros(0))
    return {
        "best_iou": best_iou,
        "labels": _cat(labels, torch.zeros(0, dtype=torch.int64)),
        "gt_boxes": _cat(boxes, torch.zeros(0, 4)),
        "image_index": _cat(image_index, torch.zeros(0, dtype=torch.int64)),
        **_summarise(best_iou, thresholds),
        "num_images": len(boxes),
        "num_gt": best_iou.shape[0],
        "num_anchors": num_anchors,
    }


def _check_wh(wh: Tensor, name: str) -> Tensor:
    if not isinstance(wh, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (N, 2), got {type(wh).__name__}")
    if wh.dim() != 2 or wh.shape[1] != 2:
        raise ValueError(f"{name} must have shape (N, 2) as width, height; got {tuple(wh.shape)}")
    if not wh.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {wh.dtype}")
    if wh.numel() and not bool(((wh > 0) & torch.isfinite(wh)).all()):
        raise ValueError(f"{name} must hold positive finite widths and heights")
    return wh


def wh_iou(wh1: Tensor, wh2: Tensor) -> Tensor:
    """IoU of boxes given by size only, placed at one common centre: ``(N, 2), (K, 2) -> (N, K)``.

    Centred boxes overlap in ``min(w1, w2) x min(h1, h2)``: the IoU compares shapes, not places.
    """
    inter = torch.minimum(wh1[:, None, 0], wh2[None, :, 0]) * torch.minimum(
        wh1[:, None, 1], wh2[None, :, 1]
    )
    area1 = wh1[:, 0] * wh1[:, 1]
    area2 = wh2[:, 0] * wh2[:, 1]
    return inter / (area1[:, None] + area2[None, :] - inter)


def mean_best_iou(gt_wh: Tensor, anchor_wh: Tensor) -> float:
    """Mean over gt boxes ``(M, 2)`` of the best centred IoU with any anchor shape ``(K, 2)``.

    YOLOv2's "Avg IOU": how well K shapes could fit the boxes if positions were free.
    """
    _check_wh(gt_wh, "gt_wh")
    _check_wh(anchor_wh, "anchor_wh")
    if gt_wh.shape[0] == 0 or anchor_wh.shape[0] == 0:
        return math.nan
    return float(
        wh_iou(gt_wh.to(torch.float64), anchor_wh.to(torch.float64)).max(dim=1).values.mean()
    )


def kmeans_anchors(gt_wh: Tensor, k: int, iters: int = 100, seed: int = 0) -> Tensor:
    """Cluster box shapes into ``k`` anchor shapes with the distance ``1 - IoU`` (YOLOv2).

    Args:
        gt_wh: ``(M, 2)`` widths and heights of the gt boxes (``M >= k``).
        k: the number of anchor shapes.
        iters: at most this many assignment/update rounds (stops early once stable).
        seed: seeds the initialisation; the same inputs and seed give the same anchors.

    Returns:
        ``(k, 2)`` widths and heights sorted by area, small to large, dtype and device of ``gt_wh``.

    Euclidean k-means on ``(w, h)`` would let big boxes dominate (their errors are big in
    pixels); ``1 - IoU`` is scale-free. Centres start by k-means++ (each new centre drawn with
    probability proportional to its squared distance from the nearest chosen one), are updated as
    the mean shape of their members, and a centre that loses all members restarts at the box
    that the current centres fit worst.
    """
    _check_wh(gt_wh, "gt_wh")
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= gt_wh.shape[0]:
        raise ValueError(
            f"k must be an integer in [1, {gt_wh.shape[0]}] (the number of boxes), got {k!r}"
        )
    if not isinstance(iters, int) or iters < 0:
        raise ValueError(f"iters must be a non-negative integer, got {iters!r}")
    generator = torch.Generator().manual_seed(seed)
    wh = gt_wh.detach().to("cpu", torch.float64)  # a few thousand points: the CPU is quickest

    # k-means++ initialisation.
    centres = wh[torch.randint(wh.shape[0], (1,), generator=generator)]
    while centres.shape[0] < k:
        distance = 1 - wh_iou(wh, centres).max(dim=1).values
        weights = distance**2
        if float(weights.sum()) <= 0:  # every box already equals a centre: take any
            weights = torch.ones_like(weights)
        pick = torch.multinomial(weights, 1, generator=generator)
        centres = torch.cat([centres, wh[pick]])

    for _ in range(iters):
        iou = wh_iou(wh, centres)  # (M, k)
        assign = iou.argmax(dim=1)
        counts = torch.bincount(assign, minlength=k).to(wh.dtype)
        sums = torch.zeros_like(centres).index_add_(0, assign, wh)
        new = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], centres)
        worst_fit = iou.max(dim=1).values.argsort()  # boxes the centres fit least well first
        for slot, c in enumerate(torch.nonzero(counts == 0).flatten().tolist()):
            new[c] = wh[worst_fit[slot]]
        if torch.equal(new, centres):
            break
        centres = new

    centres = centres[(centres[:, 0] * centres[:, 1]).argsort()]
    return centres.to(device=gt_wh.device, dtype=gt_wh.dtype)


def wh_to_sizes_ratios(
    wh: Tensor, ratio_convention: str = "h/w"
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Anchor shapes ``(K, 2)`` as ``sizes`` (``sqrt(w * h)``) and ``ratios`` (``h / w`` or ``w / h``).

    Returned as tuples of Python floats, the form ``AnchorConfig`` takes. Note that an
    ``AnchorGenerator`` makes *every* size with *every* ratio, while k-means gives K paired shapes.
    """
    _check_wh(wh, "wh")
    if ratio_convention not in ("h/w", "w/h"):
        raise ValueError(f"ratio_convention must be 'h/w' or 'w/h', got {ratio_convention!r}")
    w, h = wh.detach().to("cpu", torch.float64).unbind(dim=1)
    sizes = torch.sqrt(w * h)
    ratios = h / w if ratio_convention == "h/w" else w / h
    return tuple(sizes.tolist()), tuple(ratios.tolist())


def plot_base_anchors(base_anchors: Any, sizes: Sequence[float] | None = None,
                      ratios: Sequence[float] | None = None, ax: Axes | None = None,
                      title: str | None = None) -> Figure:
    """The ``k`` anchors of one location, centred on (0, 0), one colour per size.

    ``base_anchors`` is ``(k, 4)`` or an ``AnchorGenerator`` (its level 0). With ``sizes`` and
    ``ratios`` (generator order: ratios outer, sizes inner) each anchor is named in the legend.
    """
    if hasattr(base_anchors, "base_anchors"):
        sizes = sizes or base_anchors.sizes[0]
        ratios = ratios or base_anchors.aspect_ratios[0]
        base_anchors = base_anchors.base_anchors(0)
    b = boxes_numpy(base_anchors, "base_anchors")
    fig, ax = single_ax(ax, (5.5, 5.5))
    n_sizes = len(sizes) if sizes else 1
    styles = ["-", "--", ":", "-."]
    for i, box in enumerate(b):
        s_idx, r_idx = i % n_sizes, i // n_sizes
        label = None
        if sizes and ratios:
            label = f"size {sizes[s_idx]:g}, ratio {ratios[r_idx]:g}: {box[2] - box[0]:g} x {box[3] - box[1]:g}"
        add_box(ax, box, CLASS_COLORS[s_idx % len(CLASS_COLORS)] if sizes else COLORS["anchor"],
                 linestyle=styles[r_idx % len(styles)], label=label)
    extent = float(np.abs(b).max()) * 1.1 if b.size else 1.0
    ax.set_xlim(-extent, extent)
    ax.set_ylim(extent, -extent)  # image convention: y grows downwards
    ax.set_aspect("equal")
    ax.axhline(0, color="gray", lw=0.5)
    ax.axvline(0, color="gray", lw=0.5)
    ax.set_xlabel("x offset from the centre (pixels)")
    ax.set_ylabel("y offset from the centre (pixels)")
    ax.set_title(title or f"{b.shape[0]} base anchors at one location")
    if sizes and ratios:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def _anchor_centres(anchors: np.ndarray) -> tuple[np.ndarray, int]:
    """Distinct centres (row-major, as the generator makes them) and ``k`` anchors per centre."""
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    _, first = np.unique(np.round(centres, 3), axis=0, return_index=True)
    unique = centres[np.sort(first)]
    k = max(1, anchors.shape[0] // max(1, unique.shape[0]))
    return unique, k


def plot_anchor_grid(
    image: Any,
    anchors: Any,
    stride: float,
    highlight: int | Sequence[int] | None = None,
    gt_boxes: Any = None,
    ax: Axes | None = None,
    title: str | None = None,
) -> Figure:
    """Anchor centres over an image, the anchors of the ``highlight`` location(s), and for each
    gt box its best anchor (dashed, with its IoU).

    Args:
        anchors: ``(H*W*k, 4)`` in the generator's order (locations row-major, k per location).
        stride: feature stride in pixels (drawn as the cell grid).
        highlight: location index(es) ``row * W + col`` whose k anchors are drawn; default the
            location nearest the image centre.
        gt_boxes: ``(M, 4)``; each is drawn with its best anchor.
    """
    from rpnlab.detector.boxes import box_iou

    a = boxes_numpy(anchors, "anchors")
    fig, ax = single_ax(ax, (5.5, 5.5))
    h, w = show_image(ax, image, fade=0.35)
    centres, k = _anchor_centres(a)
    for x in np.arange(0, w + 1e-6, stride):
        ax.axvline(x, color="white", lw=0.3, alpha=0.5)
    for y in np.arange(0, h + 1e-6, stride):
        ax.axhline(y, color="white", lw=0.3, alpha=0.5)
    ax.scatter(centres[:, 0], centres[:, 1], s=6, color=COLORS["anchor"], edgecolors="white",
               linewidths=0.3, zorder=3, label=f"{centres.shape[0]} anchor centres")
    if highlight is None:
        highlight = int(np.argmin(((centres - [w / 2, h / 2]) ** 2).sum(1)))
    locations = [highlight] if isinstance(highlight, (int, np.integer)) else list(highlight)
    drawn = [np.array([[0.0, 0.0, w, h]])]  # the axes show the image and every drawn anchor
    for n, loc in enumerate(locations):
        group = a[int(loc) * k : (int(loc) + 1) * k]
        drawn.append(group)
        for j, box in enumerate(group):
            add_box(ax, box, COLORS["anchor"], linewidth=1.0,
                     label=f"the {k} anchors of one location" if n == 0 and j == 0 else None)
    if gt_boxes is not None and len(gt_boxes) and a.shape[0]:
        gt = torch.as_tensor(boxes_numpy(gt_boxes, "gt_boxes"), dtype=torch.float32)
        best, idx = box_iou(gt, torch.as_tensor(a, dtype=torch.float32)).max(dim=1)
        drawn.append(a[idx.numpy()])
        for j, box in enumerate(gt.numpy()):
            add_box(ax, box, COLORS["gt"], linewidth=2, outline=True, label="ground truth" if j == 0 else None)
            add_box(ax, a[int(idx[j])], "yellow", linewidth=1.5, linestyle="--", outline=True,
                     label="best anchor of each gt box" if j == 0 else None)
            ax.text(box[0], box[3], f"IoU {float(best[j]):.2f}", fontsize=7, va="top", color="black",
                    bbox={"facecolor": "yellow", "alpha": 0.8, "pad": 1, "linewidth": 0})
    extent = np.concatenate(drawn)
    margin = 0.03 * max(w, h)
    ax.set_xlim(min(-0.5, extent[:, 0].min()) - margin, max(w - 0.5, extent[:, 2].max()) + margin)
    ax.set_ylim(max(h - 0.5, extent[:, 3].max()) + margin, min(-0.5, extent[:, 1].min()) - margin)
    ax.legend(fontsize=7, loc="upper right", framealpha=0.8)
    ax.set_title(title or f"{a.shape[0]} anchors: stride {stride:g}, k = {k}")
    return fig


def plot_anchor_coverage(best_iou: Any, thresholds: Sequence[float] = (0.5, 0.7), bins: int = 20,
                         ax: Axes | None = None, title: str | None = None) -> Figure:
    """Histogram of each gt box's best IoU over all anchors, the thresholds drawn with the share
    of boxes at or above each."""
    best = as_numpy(best_iou).reshape(-1).astype(np.float64)
    fig, ax = single_ax(ax, (5.0, 3.6))
    ax.hist(best, bins=np.linspace(0, 1, bins + 1), color=COLORS["anchor"], edgecolor="white")
    styles = ["--", ":", "-."]
    for i, t in enumerate(thresholds):
        share = float((best >= t).mean()) if best.size else float("nan")
        ax.axvline(t, color="black", linestyle=styles[i % len(styles)], label=f"IoU >= {t:g}: {share:.0%} of boxes")
    ax.set_xlim(0, 1)
    ax.set_xlabel("best IoU of a gt box with any anchor")
    ax.set_ylabel("gt boxes")
    mean = f", mean {best.mean():.2f}" if best.size else ""
    ax.set_title(title or f"anchor coverage of {best.size} gt boxes{mean}")
    ax.legend(fontsize=8, loc="upper left")
    return fig


def plot_kmeans_anchors(gt_wh: Any, anchor_wh: Any, grid_wh: Any = None, ax: Axes | None = None,
                        title: str | None = None) -> Figure:
    """Gt box widths vs heights (points), k-means anchor shapes (stars) and, optionally, the
    shapes of a sizes x ratios grid (crosses), all on log axes."""
    g = as_numpy(gt_wh).reshape(-1, 2)
    c = as_numpy(anchor_wh).reshape(-1, 2)
    fig, ax = single_ax(ax, (5.0, 4.5))
    ax.scatter(g[:, 0], g[:, 1], s=5, alpha=0.4, color="gray", label=f"{g.shape[0]} gt boxes")
    ax.scatter(c[:, 0], c[:, 1], s=150, marker="*", color=COLORS["positive"], edgecolors="black",
               label=f"{c.shape[0]} k-means anchors")
    if grid_wh is not None:
        gw = as_numpy(grid_wh).reshape(-1, 2)
        ax.scatter(gw[:, 0], gw[:, 1], s=60, marker="x", color=COLORS["anchor"], label=f"{gw.shape[0]} grid anchors")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("width (pixels, log scale)")
    ax.set_ylabel("height (pixels, log scale)")
    ax.set_title(title or "anchor shapes from k-means (1 - IoU distance)")
    ax.legend(fontsize=8)
    return fig
