"""Pure drawing functions: ``(data, params) -> matplotlib.figure.Figure``.

Every function builds a ``Figure`` without pyplot (so nothing is shown twice in a notebook and
nothing leaks when called in a loop), or draws into an ``ax`` you pass and returns its figure.
In a notebook a returned figure is displayed as the cell's value; elsewhere call
``fig.savefig(path)``. Nothing here calls ``plt.show``.

Colours are fixed across the course: ground truth white with a black outline, positives green,
negatives red, ignored orange, anchors blue.

Functions by notebook:
    00  draw_boxes, show_dataset_samples, plot_dataset_statistics
    01  plot_base_anchors, plot_anchor_grid, plot_anchor_coverage, plot_kmeans_anchors
    02  plot_box_coding
    03  plot_iou_matrix, plot_matching
    later  plot_loss_curves, plot_proposals, plot_recall_curves, plot_roi_quantisation,
           plot_detections (first versions; the notebooks that use them may extend them)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from matplotlib import patheffects
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, Rectangle

__all__ = [
    "COLORS",
    "draw_boxes",
    "new_figure",
    "plot_anchor_coverage",
    "plot_anchor_grid",
    "plot_base_anchors",
    "plot_box_coding",
    "plot_dataset_statistics",
    "plot_detections",
    "plot_iou_matrix",
    "plot_kmeans_anchors",
    "plot_loss_curves",
    "plot_matching",
    "plot_proposals",
    "plot_recall_curves",
    "plot_roi_quantisation",
    "show_dataset_samples",
    "to_numpy_image",
]

COLORS = {
    "gt": "white",
    "positive": "tab:green",
    "negative": "tab:red",
    "ignored": "tab:orange",
    "anchor": "tab:blue",
    "prediction": "tab:purple",
}
# One colour per class label 1..C (cycled); 0 (background) is never drawn.
_CLASS_COLORS = ["tab:cyan", "tab:pink", "gold", "tab:olive", "tab:purple", "tab:brown", "lime", "tab:gray"]
_OUTLINE = [patheffects.withStroke(linewidth=3, foreground="black")]


# --------------------------------------------------------------------------- helpers


def new_figure(nrows: int = 1, ncols: int = 1, size: tuple[float, float] = (4.0, 4.0), **kwargs) -> tuple[Figure, np.ndarray]:
    """A pyplot-free ``Figure`` with an ``(nrows, ncols)`` array of axes; ``size`` is per panel."""
    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, **kwargs)
    return fig, axes


def _single_ax(ax: Axes | None, size: tuple[float, float] = (5.0, 5.0)) -> tuple[Figure, Axes]:
    if ax is not None:
        return ax.figure, ax
    fig, axes = new_figure(1, 1, size)
    return fig, axes[0, 0]


def _np(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _boxes_np(boxes: Any, name: str = "boxes") -> np.ndarray:
    b = _np(boxes).astype(np.float64, copy=False)
    if b.size == 0:
        return b.reshape(0, 4)
    if b.ndim == 1 and b.shape[0] == 4:
        b = b[None]
    if b.ndim != 2 or b.shape[1] != 4:
        raise ValueError(f"{name} must have shape (N, 4) as x1, y1, x2, y2; got {b.shape}")
    return b


def to_numpy_image(image: Any) -> np.ndarray:
    """``(3, H, W)`` float tensor in [0, 1], ``(H, W, 3)`` array or a PIL image -> ``(H, W, 3)`` array."""
    if isinstance(image, torch.Tensor):
        if image.dim() != 3 or image.shape[0] not in (1, 3):
            raise ValueError(f"image tensor must be (3, H, W) or (1, H, W), got {tuple(image.shape)}")
        arr = image.detach().cpu().float().permute(1, 2, 0).numpy()
        return np.clip(arr.repeat(3, axis=2) if arr.shape[2] == 1 else arr, 0.0, 1.0)
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ValueError(f"image must be (3, H, W), (H, W, 3) or a PIL image, got shape {arr.shape}")
    return arr


def _show_image(ax: Axes, image: Any, fade: float = 0.0) -> tuple[int, int]:
    """Draw ``image``; ``fade`` in [0, 1) blends it towards white so that boxes drawn over stand out."""
    arr = to_numpy_image(image)
    if fade:
        arr = arr[..., :3].astype(np.float64) / (255.0 if arr.dtype == np.uint8 else 1.0)
        arr = arr * (1 - fade) + fade
    ax.imshow(arr, interpolation="nearest")
    ax.set_xlabel("x (pixels)")
    ax.set_ylabel("y (pixels)")
    return arr.shape[0], arr.shape[1]


def _add_box(ax: Axes, box: Sequence[float], color: str, linewidth: float = 1.5, linestyle: str = "-",
             alpha: float = 1.0, outline: bool = False, label: str | None = None) -> Rectangle:
    x1, y1, x2, y2 = (float(v) for v in box)
    rect = Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=color, linewidth=linewidth,
                     linestyle=linestyle, alpha=alpha, label=label)
    if outline:
        rect.set_path_effects(_OUTLINE)
    ax.add_patch(rect)
    return rect


def _class_color(label: int) -> str:
    return _CLASS_COLORS[(int(label) - 1) % len(_CLASS_COLORS)]


# --------------------------------------------------------------------------- 00: data


def draw_boxes(
    image: Any,
    boxes: Any,
    labels: Any = None,
    scores: Any = None,
    class_names: Sequence[str] | None = None,
    ax: Axes | None = None,
    title: str | None = None,
    color: str | None = None,
    linestyle: str = "-",
) -> Figure:
    """``image`` with ``boxes: (N, 4)`` drawn as one rectangle each, captioned by class and score.

    Args:
        labels: ``(N,)`` ints in ``1..C`` (colour and caption per class); None: one colour.
        scores: ``(N,)`` shown after the class name.
        class_names: the C foreground names, ``class_names[label - 1]``.
        color: one colour for every box (overrides the per-class colours).
    """
    fig, ax = _single_ax(ax)
    _show_image(ax, image)
    b = _boxes_np(boxes)
    labs = None if labels is None else _np(labels).reshape(-1)
    scs = None if scores is None else _np(scores).reshape(-1)
    for name, arr in (("labels", labs), ("scores", scs)):
        if arr is not None and arr.shape[0] != b.shape[0]:
            raise ValueError(f"{name} has {arr.shape[0]} entries but there are {b.shape[0]} boxes")
    for i, box in enumerate(b):
        c = color or (_class_color(labs[i]) if labs is not None else COLORS["gt"])
        _add_box(ax, box, c, linestyle=linestyle, outline=True)
        caption = []
        if labs is not None:
            caption.append(class_names[int(labs[i]) - 1] if class_names else str(int(labs[i])))
        if scs is not None:
            caption.append(f"{float(scs[i]):.2f}")
        if caption:
            ax.text(box[0], box[1], " ".join(caption), fontsize=7, color="black", va="bottom",
                    bbox={"facecolor": c, "alpha": 0.8, "pad": 1, "linewidth": 0})
    ax.set_title(title if title is not None else f"{b.shape[0]} boxes")
    return fig


def show_dataset_samples(dataset, n: int = 8, cols: int = 4, indices: Sequence[int] | None = None,
                         title: str | None = None) -> Figure:
    """The first ``n`` samples (or ``indices``) of a detection dataset with their boxes and classes."""
    indices = list(range(min(n, len(dataset)))) if indices is None else list(indices)
    if not indices:
        raise ValueError("nothing to show: the dataset is empty or indices is empty")
    cols = max(1, min(cols, len(indices)))
    rows = math.ceil(len(indices) / cols)
    fig, axes = new_figure(rows, cols, (2.6, 2.6))
    names = getattr(dataset, "classes", None)
    for ax, i in zip(axes.ravel(), indices):
        image, target = dataset[i]
        n_obj = len(target["boxes"])
        draw_boxes(image, target["boxes"], target.get("labels"), class_names=names, ax=ax,
                   title=f"image {i}: {n_obj} object{'' if n_obj == 1 else 's'}")
        ax.tick_params(labelsize=6)
    for ax in axes.ravel()[len(indices):]:
        ax.set_visible(False)
    fig.suptitle(title or f"{type(dataset).__name__}: {len(indices)} samples")
    return fig


def plot_dataset_statistics(boxes: Any, labels: Any, class_names: Sequence[str], bins: int = 30,
                            title: str | None = None) -> Figure:
    """Three panels: objects per class, box sizes ``sqrt(w h)`` and aspect ratios ``h / w`` (log axis).

    ``boxes: (M, 4)`` and ``labels: (M,)`` of the whole dataset, e.g. from
    ``rpnlab.analysis.dataset_gt_boxes``.
    """
    b = _boxes_np(boxes)
    labs = _np(labels).reshape(-1).astype(int)
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    fig, axes = new_figure(1, 3, (4.0, 3.2))
    ax = axes[0, 0]
    counts = [int((labs == i + 1).sum()) for i in range(len(class_names))]
    bars = ax.bar(list(class_names), counts, color=[_class_color(i + 1) for i in range(len(class_names))])
    ax.bar_label(bars)
    ax.set_title("objects per class")
    ax.set_xlabel("class")
    ax.set_ylabel("objects")
    ax = axes[0, 1]
    ax.hist(np.sqrt(np.clip(w * h, 0, None)), bins=bins, color=COLORS["anchor"])
    ax.set_title("box size")
    ax.set_xlabel("sqrt(w * h) (pixels)")
    ax.set_ylabel("boxes")
    ax = axes[0, 2]
    ratios = h[(w > 0) & (h > 0)] / w[(w > 0) & (h > 0)]
    if ratios.size:
        ax.hist(ratios, bins=np.geomspace(ratios.min(), ratios.max() * 1.0001, bins), color=COLORS["anchor"])
        ax.set_xscale("log")
        ticks = [t for t in (0.25, 1 / 3, 0.5, 1, 2, 3, 4) if ratios.min() <= t * 1.05 and t <= ratios.max() * 1.05]
        ax.set_xticks(ticks, labels=[f"{t:.2g}" for t in ticks], minor=False)
        ax.minorticks_off()
    ax.set_title("aspect ratio")
    ax.set_xlabel("h / w (log scale)")
    ax.set_ylabel("boxes")
    fig.suptitle(title or f"{b.shape[0]} ground-truth boxes")
    return fig


# --------------------------------------------------------------------------- 01: anchors


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
    b = _boxes_np(base_anchors, "base_anchors")
    fig, ax = _single_ax(ax, (5.5, 5.5))
    n_sizes = len(sizes) if sizes else 1
    styles = ["-", "--", ":", "-."]
    for i, box in enumerate(b):
        s_idx, r_idx = i % n_sizes, i // n_sizes
        label = None
        if sizes and ratios:
            label = f"size {sizes[s_idx]:g}, ratio {ratios[r_idx]:g}: {box[2] - box[0]:g} x {box[3] - box[1]:g}"
        _add_box(ax, box, _CLASS_COLORS[s_idx % len(_CLASS_COLORS)] if sizes else COLORS["anchor"],
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
    from rpnlab.boxes import box_iou

    a = _boxes_np(anchors, "anchors")
    fig, ax = _single_ax(ax, (5.5, 5.5))
    h, w = _show_image(ax, image, fade=0.35)
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
            _add_box(ax, box, COLORS["anchor"], linewidth=1.0,
                     label=f"the {k} anchors of one location" if n == 0 and j == 0 else None)
    if gt_boxes is not None and len(gt_boxes) and a.shape[0]:
        gt = torch.as_tensor(_boxes_np(gt_boxes, "gt_boxes"), dtype=torch.float32)
        best, idx = box_iou(gt, torch.as_tensor(a, dtype=torch.float32)).max(dim=1)
        drawn.append(a[idx.numpy()])
        for j, box in enumerate(gt.numpy()):
            _add_box(ax, box, COLORS["gt"], linewidth=2, outline=True, label="ground truth" if j == 0 else None)
            _add_box(ax, a[int(idx[j])], "yellow", linewidth=1.5, linestyle="--", outline=True,
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
    best = _np(best_iou).reshape(-1).astype(np.float64)
    fig, ax = _single_ax(ax, (5.0, 3.6))
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
    g = _np(gt_wh).reshape(-1, 2)
    c = _np(anchor_wh).reshape(-1, 2)
    fig, ax = _single_ax(ax, (5.0, 4.5))
    ax.scatter(g[:, 0], g[:, 1], s=5, alpha=0.4, color="gray", label=f"{g.shape[0]} gt boxes")
    ax.scatter(c[:, 0], c[:, 1], s=150, marker="*", color=COLORS["positive"], edgecolors="black",
               label=f"{c.shape[0]} k-means anchors")
    if grid_wh is not None:
        gw = _np(grid_wh).reshape(-1, 2)
        ax.scatter(gw[:, 0], gw[:, 1], s=60, marker="x", color=COLORS["anchor"], label=f"{gw.shape[0]} grid anchors")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("width (pixels, log scale)")
    ax.set_ylabel("height (pixels, log scale)")
    ax.set_title(title or "anchor shapes from k-means (1 - IoU distance)")
    ax.legend(fontsize=8)
    return fig


# --------------------------------------------------------------------------- 02: box coding


def plot_box_coding(anchor: Any, gt: Any, deltas: Any = None, others: Mapping[str, Any] | None = None,
                    ax: Axes | None = None, title: str | None = None) -> Figure:
    """An anchor, a gt box and the offsets ``(tx, ty, tw, th)`` that take one to the other.

    Args:
        anchor, gt: ``(4,)`` boxes.
        deltas: ``(4,)``; default ``BoxCoder().encode(anchor, gt)``.
        others: more boxes to draw dashed, name -> ``(4,)`` (e.g. a wrongly decoded box).
    """
    from rpnlab.boxes import BoxCoder

    a = _boxes_np(anchor, "anchor")[0]
    g = _boxes_np(gt, "gt")[0]
    if deltas is None:
        deltas = BoxCoder().encode(torch.tensor(a, dtype=torch.float64), torch.tensor(g, dtype=torch.float64))
    d = _np(deltas).reshape(-1)
    fig, ax = _single_ax(ax, (5.5, 5.0))
    _add_box(ax, a, COLORS["anchor"], linewidth=2, label="anchor")
    _add_box(ax, g, "black", linewidth=2, label="ground truth")
    ac, gc = (a[:2] + a[2:]) / 2, (g[:2] + g[2:]) / 2
    ax.add_patch(FancyArrowPatch(tuple(ac), tuple(gc), arrowstyle="->", mutation_scale=15, color="black"))
    ax.plot(*ac, "o", color=COLORS["anchor"])
    ax.plot(*gc, "o", color="black")
    all_boxes = [a, g]
    dashed_colors = [COLORS["negative"], COLORS["prediction"], COLORS["ignored"]]
    for i, (name, box) in enumerate((others or {}).items()):
        b = _boxes_np(box, name)[0]
        _add_box(ax, b, dashed_colors[i % len(dashed_colors)], linewidth=2, linestyle="--", label=name)
        all_boxes.append(b)
    text = "\n".join(f"{n} = {v:+.3f}" for n, v in zip(("tx", "ty", "tw", "th"), d))
    ax.text(0.02, 0.98, text, transform=ax.transAxes, va="top", family="monospace", fontsize=9,
            bbox={"facecolor": "white", "alpha": 0.9})
    stacked = np.stack(all_boxes)
    pad = 0.15 * float(max(stacked[:, 2].max() - stacked[:, 0].min(), stacked[:, 3].max() - stacked[:, 1].min()))
    ax.set_xlim(stacked[:, 0].min() - pad, stacked[:, 2].max() + pad)
    ax.set_ylim(stacked[:, 3].max() + pad, stacked[:, 1].min() - pad)
    ax.set_aspect("equal")
    ax.set_xlabel("x (pixels)")
    ax.set_ylabel("y (pixels)")
    ax.set_title(title or "box coding: anchor -> ground truth")
    ax.legend(fontsize=8, loc="lower right")
    return fig


# --------------------------------------------------------------------------- 03: matching


def plot_iou_matrix(iou: Any, row_labels: Sequence[str] | None = None, col_labels: Sequence[str] | None = None,
                    thresholds: Sequence[float] = (), annotate: bool | None = None, ax: Axes | None = None,
                    title: str | None = None) -> Figure:
    """``iou: (M, N)`` as a heat map (rows gt boxes, columns anchors); cells at or above each of
    ``thresholds`` get a marker; values are written in the cells when the matrix is small."""
    m = _np(iou).astype(np.float64)
    if m.ndim != 2:
        raise ValueError(f"iou must be 2-D (M, N), got shape {m.shape}")
    fig, ax = _single_ax(ax, (min(12.0, 2.0 + 0.35 * m.shape[1]), min(6.0, 1.5 + 0.4 * m.shape[0])))
    im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    fig.colorbar(im, ax=ax, label="IoU")
    if annotate is None:
        annotate = m.size <= 300
    if annotate:
        for (r, c), v in np.ndenumerate(m):
            ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=6, color="white" if v < 0.6 else "black")
    markers = ["s", "o"]
    for i, t in enumerate(sorted(thresholds, reverse=True)):
        rr, cc = np.nonzero(m >= t)
        ax.scatter(cc, rr, marker=markers[i % 2], facecolors="none", edgecolors="red", s=120,
                   label=f"IoU >= {t:g}")
    if row_labels is not None:
        ax.set_yticks(range(m.shape[0]), labels=list(row_labels))
    if col_labels is not None:
        ax.set_xticks(range(m.shape[1]), labels=list(col_labels), rotation=90, fontsize=7)
    ax.set_xlabel("anchor")
    ax.set_ylabel("ground-truth box")
    ax.set_title(title or f"IoU matrix ({m.shape[0]} gt x {m.shape[1]} anchors)")
    if thresholds:
        ax.legend(fontsize=7, loc="upper right")
    return fig


def plot_matching(
    image: Any,
    anchors: Any,
    labels: Any,
    gt_boxes: Any,
    max_negatives: int = 15,
    max_ignored: int = 15,
    seed: int = 0,
    names: Mapping[str, str] | None = None,
    ax: Axes | None = None,
    title: str | None = None,
) -> Figure:
    """Anchor labels on an image: positives (green), ignored (orange, dashed), negatives (red).

    Args:
        anchors: ``(A, 4)``; labels: ``(A,)`` with 1 positive, 0 negative, -1 ignored
            (``label_anchors``' convention).
        max_negatives, max_ignored: at most this many of those are drawn (a seeded random
            choice; there are usually hundreds), every positive is drawn. The legend gives the
            full counts.
        names: legend words for the three kinds (e.g. "sampled positive").
    """
    a = _boxes_np(anchors, "anchors")
    lab = _np(labels).reshape(-1)
    if lab.shape[0] != a.shape[0]:
        raise ValueError(f"labels has {lab.shape[0]} entries but there are {a.shape[0]} anchors")
    names = {"positive": "positive", "negative": "negative", "ignored": "ignored", **(names or {})}
    rng = np.random.default_rng(seed)
    fig, ax = _single_ax(ax, (5.5, 5.5))
    h, w = _show_image(ax, image, fade=0.5)
    kinds = (("negative", lab == 0, max_negatives, "-", 0.8, 0.9),
             ("ignored", lab == -1, max_ignored, "--", 0.9, 1.0),
             ("positive", lab == 1, None, "-", 1.0, 2.2))
    for kind, mask, limit, style, alpha, lw in kinds:
        idx = np.flatnonzero(mask)
        total = idx.size
        if limit is not None and idx.size > limit:
            idx = np.sort(rng.choice(idx, size=limit, replace=False))
        shown = "" if idx.size == total else f", {idx.size} drawn"
        for j, i in enumerate(idx):
            _add_box(ax, a[i], COLORS[kind], linewidth=lw, linestyle=style, alpha=alpha, outline=kind == "positive",
                     label=f"{names[kind]} ({total}{shown})" if j == 0 else None)
        if idx.size == 0:  # keep the count in the legend even when nothing is drawn
            ax.plot([], [], color=COLORS[kind], linestyle=style, label=f"{names[kind]} ({total}{shown})")
    for j, box in enumerate(_boxes_np(gt_boxes, "gt_boxes")):
        _add_box(ax, box, COLORS["gt"], linewidth=2.2, outline=True, label="ground truth" if j == 0 else None)
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)
    ax.legend(fontsize=7, loc="upper right", framealpha=0.85)
    counts = {k: int((lab == v).sum()) for k, v in (("positive", 1), ("negative", 0), ("ignored", -1))}
    ax.set_title(title or "anchors: " + ", ".join(f"{counts[k]} {names[k]}" for k in ("positive", "negative", "ignored")))
    return fig


# --------------------------------------------------------------------------- later notebooks


def plot_loss_curves(history: Mapping[str, Sequence[float]] | Sequence[Mapping[str, float]],
                     keys: Sequence[str] | None = None, x_label: str = "iteration", smooth: int = 1,
                     title: str | None = None) -> Figure:
    """Loss curves: ``history`` as ``{name: values}`` or a list of ``{name: value}`` per step.

    ``smooth`` > 1 adds a running mean over that many steps (the raw curve stays, faded).
    """
    if isinstance(history, Mapping):
        series = {k: list(map(float, v)) for k, v in history.items()}
    else:
        series = {}
        for step in history:
            for k, v in step.items():
                if isinstance(v, (int, float)):
                    series.setdefault(k, []).append(float(v))
    keys = list(keys) if keys is not None else [k for k in series if "loss" in k] or list(series)
    fig, axes = new_figure(1, 1, (6.0, 3.8))
    ax = axes[0, 0]
    for k in keys:
        y = np.asarray(series[k], dtype=np.float64)
        line = ax.plot(y, alpha=0.35 if smooth > 1 else 1.0, label=None if smooth > 1 else k)[0]
        if smooth > 1 and y.size >= smooth:
            mean = np.convolve(y, np.ones(smooth) / smooth, mode="valid")
            ax.plot(np.arange(smooth - 1, y.size), mean, color=line.get_color(), label=k)
    ax.set_xlabel(x_label)
    ax.set_ylabel("loss")
    ax.set_title(title or "training losses")
    if keys:
        ax.legend(fontsize=8)
    return fig


def plot_proposals(image: Any, proposals: Any, scores: Any = None, gt_boxes: Any = None, top: int = 20,
                   ax: Axes | None = None, title: str | None = None) -> Figure:
    """The ``top`` highest-scoring proposals (purple, faded by rank) over the image and gt boxes."""
    p = _boxes_np(proposals, "proposals")
    order = np.argsort(-_np(scores).reshape(-1), kind="stable") if scores is not None else np.arange(p.shape[0])
    order = order[:top]
    fig, ax = _single_ax(ax, (5.5, 5.5))
    h, w = _show_image(ax, image)
    for rank, i in enumerate(order):
        _add_box(ax, p[i], COLORS["prediction"], linewidth=1.2, alpha=max(0.25, 1 - rank / max(1, len(order))),
                 label=f"top {len(order)} of {p.shape[0]} proposals" if rank == 0 else None)
    if gt_boxes is not None:
        for j, box in enumerate(_boxes_np(gt_boxes, "gt_boxes")):
            _add_box(ax, box, COLORS["gt"], linewidth=2, outline=True, label="ground truth" if j == 0 else None)
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)
    ax.legend(fontsize=7, loc="upper right")
    ax.set_title(title or f"{p.shape[0]} proposals")
    return fig


def plot_recall_curves(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], x_label: str = "IoU threshold",
                       ax: Axes | None = None, title: str | None = None) -> Figure:
    """Recall curves, ``{name: (x values, recall values)}`` (e.g. recall vs IoU, or vs #proposals)."""
    fig, ax = _single_ax(ax, (5.0, 3.8))
    for name, (x, y) in curves.items():
        ax.plot(_np(x), _np(y), marker=".", label=name)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel(x_label)
    ax.set_ylabel("recall")
    ax.set_title(title or "proposal recall")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def plot_roi_quantisation(box: Sequence[float], spatial_scale: float = 1 / 16, output_size: int = 2,
                          sampling_ratio: int = 2, feature_size: tuple[int, int] | None = None,
                          title: str | None = None) -> Figure:
    """One RoI on the feature grid: RoI Pool's rounded box and integer bins (left) against RoI
    Align's exact bins and bilinear sample points (right)."""
    x1, y1, x2, y2 = (float(v) * spatial_scale for v in box)
    if feature_size is None:
        feature_size = (math.ceil(y2) + 1, math.ceil(x2) + 1)
    fh, fw = feature_size
    fig, axes = new_figure(1, 2, (4.5, 4.5))
    for ax in axes[0]:
        for x in range(fw + 1):
            ax.axvline(x, color="lightgray", lw=0.6)
        for y in range(fh + 1):
            ax.axhline(y, color="lightgray", lw=0.6)
        ax.set_xlim(-0.2, fw + 0.2)
        ax.set_ylim(fh + 0.2, -0.2)
        ax.set_aspect("equal")
        ax.set_xlabel("feature x (cells)")
        ax.set_ylabel("feature y (cells)")
        _add_box(ax, (x1, y1, x2, y2), "black", linewidth=1.5, linestyle=":", label="RoI (exact)")
    # RoI Pool (torchvision): round the corners, at least one cell, integer bin edges.
    ax = axes[0, 0]
    rx1, ry1, rx2, ry2 = (math.floor(v + 0.5) for v in (x1, y1, x2, y2))
    rw, rh = max(rx2 - rx1 + 1, 1), max(ry2 - ry1 + 1, 1)
    _add_box(ax, (rx1, ry1, rx1 + rw, ry1 + rh), COLORS["negative"], linewidth=2, label="rounded RoI")
    for b in range(output_size):
        for c in range(output_size):
            bx1 = rx1 + math.floor(c * rw / output_size)
            bx2 = rx1 + math.ceil((c + 1) * rw / output_size)
            by1 = ry1 + math.floor(b * rh / output_size)
            by2 = ry1 + math.ceil((b + 1) * rh / output_size)
            ax.add_patch(Rectangle((bx1, by1), bx2 - bx1, by2 - by1, facecolor=COLORS["negative"], alpha=0.12,
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


def plot_detections(image: Any, detections: Mapping[str, Any], class_names: Sequence[str] | None = None,
                    gt_boxes: Any = None, score_threshold: float = 0.0, ax: Axes | None = None,
                    title: str | None = None) -> Figure:
    """Detections ``dict(boxes, labels, scores)`` above ``score_threshold``, gt boxes dashed."""
    scores = _np(detections["scores"]).reshape(-1)
    keep = scores >= score_threshold
    boxes = _boxes_np(detections["boxes"])[keep]
    labels = _np(detections["labels"]).reshape(-1)[keep]
    fig, ax = _single_ax(ax)
    draw_boxes(image, boxes, labels, scores[keep], class_names=class_names, ax=ax,
               title=title or f"{int(keep.sum())} detections (score >= {score_threshold:g})")
    if gt_boxes is not None:
        for box in _boxes_np(gt_boxes, "gt_boxes"):
            _add_box(ax, box, COLORS["gt"], linewidth=1.2, linestyle="--", outline=True)
    return fig


# --------------------------------------------------------------------------- 04-07: stages
# (appended for notebooks 04-07; imports stay inside the functions)


def plot_softmax_reshape(k: int = 3, height: int = 2, width: int = 3, title: str | None = None) -> Figure:
    """Where each logit goes in py-faster-rcnn's reshape ``(B, 2k, H, W) -> (B, 2, k*H, W)``.

    Every cell of a ``(1, 2k, H, W)`` tensor holds its channel number; the real
    ``rpnlab.losses.softmax_objectness_reshape`` moves them, and the three panels show the ``2k``
    input channels stacked, then the two output channels: background logits of all ``k`` anchors
    in channel 0, foreground logits in channel 1, so a softmax over the 2 channels pairs them.
    """
    from rpnlab.losses import softmax_objectness_reshape

    for name, v in (("k", k), ("height", height), ("width", width)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    codes = torch.arange(2 * k, dtype=torch.float32).view(1, 2 * k, 1, 1).expand(1, 2 * k, height, width)
    reshaped = softmax_objectness_reshape(codes)[0]  # (2, k*H, W)
    panels = [("input (B, 2k, H, W): the 2k channels stacked", codes[0].reshape(2 * k * height, width)),
              ("output channel 0 (background)", reshaped[0]), ("output channel 1 (foreground)", reshaped[1])]
    fig, axes = new_figure(1, 3, (2.2 + 0.5 * width, 1.0 + 0.45 * 2 * k * height))
    cmap = "tab20" if 2 * k <= 20 else "viridis"
    for ax, (name, grid) in zip(axes[0], panels):
        g = grid.numpy()
        ax.imshow(g, cmap=cmap, vmin=-0.5, vmax=max(2 * k, 20) - 0.5 if cmap == "tab20" else 2 * k - 1,
                  aspect="auto")
        for (r, c), ch in np.ndenumerate(g):
            kind, anchor = ("bg", int(ch)) if ch < k else ("fg", int(ch) - k)
            ax.text(c, r, f"{kind} a{anchor}\nch {int(ch)}", ha="center", va="center", fontsize=6)
        for r in range(height, g.shape[0], height):
            ax.axhline(r - 0.5, color="black", lw=1.2)
        ax.set_xlabel("x (feature column)")
        ax.set_ylabel("rows: H per channel / per anchor")
        ax.set_title(name, fontsize=9)
    fig.suptitle(title or f"softmax objectness reshape, k = {k}, H = {height}, W = {width}")
    return fig


def plot_objectness_forms(logit_range: float = 6.0, backgrounds: Sequence[float] = (-2.0, 0.0, 2.0),
                          title: str | None = None) -> Figure:
    """Sigmoid over one logit against a 2-class softmax over ``(bg, fg)`` logits.

    Left: the object probability against ``z = fg - bg``: ``sigmoid(z)`` and the softmax's
    foreground probability for several ``bg`` values (dots) fall on one curve. Right: the two
    losses for a positive and a negative anchor (binary cross-entropy on ``z``, cross-entropy on
    the pair) coincide the same way.
    """
    import torch.nn.functional as F

    z = torch.linspace(-logit_range, logit_range, 121, dtype=torch.float64)
    fig, axes = new_figure(1, 2, (4.6, 3.6))
    ax = axes[0, 0]
    ax.plot(z, torch.sigmoid(z), color="black", lw=2, label="sigmoid(z): k scores")
    zs = z[::8]
    for i, bg in enumerate(backgrounds):
        pair = torch.stack((torch.full_like(zs, bg), zs + bg), dim=1)  # (bg, fg) with fg - bg = z
        ax.plot(zs, F.softmax(pair, dim=1)[:, 1], "o", ms=4 + 2 * i, mfc="none",
                label=f"softmax(bg={bg:g}, fg=bg+z)[fg]: 2k scores")
    ax.set_xlabel("z = fg logit - bg logit")
    ax.set_ylabel("P(object)")
    ax.set_title("probabilities")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    ax = axes[0, 1]
    for label, color in ((1.0, COLORS["positive"]), (0.0, COLORS["negative"])):
        target = torch.full_like(z, label)
        ax.plot(z, F.binary_cross_entropy_with_logits(z, target, reduction="none"), color=color, lw=2,
                label=f"BCE(z), label {int(label)}")
        pair = torch.stack((torch.zeros_like(zs), zs), dim=1)
        ax.plot(zs, F.cross_entropy(pair, torch.full((zs.shape[0],), int(label)), reduction="none"), "o",
                color=color, mfc="none", label=f"CE(bg, fg), label {int(label)}")
    ax.set_xlabel("z = fg logit - bg logit")
    ax.set_ylabel("loss")
    ax.set_title("losses")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.suptitle(title or "sigmoid over z = 2-class softmax over (bg, fg), when z = fg - bg")
    return fig


def plot_smooth_l1(betas: Sequence[float] = (1 / 9, 0.5, 1.0), limit: float = 2.0,
                   title: str | None = None) -> Figure:
    """Smooth L1 (``rpnlab.losses.smooth_l1``) for several ``beta`` against L1 and L2, with gradients.

    Left: the loss of an error ``d``. Right: its gradient: L2's grows with the error (an outlier
    dominates), L1's jumps at 0; smooth L1 is L2 inside ``|d| < beta`` and L1 outside, so its
    gradient is bounded by 1 and continuous.
    """
    from rpnlab.losses import smooth_l1

    d = torch.linspace(-limit, limit, 401, dtype=torch.float64, requires_grad=True)
    curves = {"L1 |d|": lambda x: x.abs(), "L2 d^2 / 2": lambda x: 0.5 * x * x}
    for beta in betas:
        curves[f"smooth L1, beta = {beta:.3g}"] = lambda x, b=beta: smooth_l1(x, torch.zeros_like(x), b, "none")
    fig, axes = new_figure(1, 2, (4.6, 3.6))
    for name, fn in curves.items():
        loss = fn(d)
        (grad,) = torch.autograd.grad(loss.sum(), d)
        style = "--" if name.startswith(("L1", "L2")) else "-"
        axes[0, 0].plot(d.detach(), loss.detach(), style, label=name)
        axes[0, 1].plot(d.detach(), grad, style, label=name)
    axes[0, 0].set_ylim(0, limit * 1.2)
    axes[0, 1].set_ylim(-1.6, 1.6)
    for ax, what in zip(axes[0], ("loss", "gradient d loss / d d")):
        ax.set_xlabel("error d = prediction - target")
        ax.set_ylabel(what)
        ax.set_title(what)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(title or "smooth L1 against L1 and L2")
    return fig


def plot_funnel(counts: Mapping[str, int], ax: Axes | None = None, title: str | None = None,
                log: bool = True, x_label: str = "boxes left") -> Figure:
    """How many boxes each step leaves: ``counts`` is ``{step: number}`` in order, drawn top-down."""
    names = list(counts)
    values = [int(counts[n]) for n in names]
    if not names:
        raise ValueError("counts is empty: nothing to draw")
    fig, ax = _single_ax(ax, (5.0, 0.9 + 0.42 * len(names)))
    y = np.arange(len(names))
    bars = ax.barh(y, [max(v, 0.8) if log else v for v in values], color=COLORS["anchor"])
    ax.bar_label(bars, labels=[str(v) for v in values], padding=3, fontsize=8)
    ax.set_yticks(y, labels=names)
    ax.invert_yaxis()
    if log:
        ax.set_xscale("log")
    ax.set_xlim(0.7 if log else 0, max(values + [1]) * (4 if log else 1.2))
    ax.set_xlabel(x_label + (" (log scale)" if log else ""))
    ax.set_ylabel("step")
    ax.set_title(title or " -> ".join(str(v) for v in values))
    return fig


def plot_proposal_steps(image: Any, funnel: Mapping[str, Any], gt_boxes: Any = None, top: int = 20,
                        show_pre_nms: bool = True, title: str | None = None) -> Figure:
    """A ``rpnlab.proposal_analysis.proposal_funnel`` result: the counts of each step, the ``top``
    best boxes entering NMS and the ``top`` best proposals it leaves (``show_pre_nms=False``: no
    middle panel, a lighter figure for widgets)."""
    panels = 3 if show_pre_nms else 2
    fig, axes = new_figure(1, panels, (4.2, 4.0))
    plot_funnel(funnel["counts"], ax=axes[0, 0], title="boxes after each step")
    if show_pre_nms:
        plot_proposals(image, funnel["pre_nms_boxes"], funnel["pre_nms_scores"], gt_boxes, top=top,
                       ax=axes[0, 1], title=f"before NMS: best {min(top, len(funnel['pre_nms_boxes']))}")
    plot_proposals(image, funnel["boxes"], funnel["scores"], gt_boxes, top=top, ax=axes[0, -1],
                   title=f"proposals: best {min(top, len(funnel['boxes']))} of {len(funnel['boxes'])}")
    fig.suptitle(title or "the proposal layer, step by step")
    return fig


def plot_pooled_rois(image: Any, box: Sequence[float], pooled: Mapping[str, Any], title: str | None = None) -> Figure:
    """One box on an image, then each pooling method's output for it, drawn as a small image.

    ``pooled``: name -> ``(C, out_h, out_w)`` (or ``(1, C, out_h, out_w)``); 3 channels are shown
    as RGB (pool the image itself to see what each method keeps), others as their channel mean.
    """
    fig, axes = new_figure(1, 1 + len(pooled), (3.0, 3.0))
    ax = axes[0, 0]
    h, w = _show_image(ax, image)
    _add_box(ax, box, COLORS["prediction"], linewidth=2, outline=True)
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)
    ax.set_title("the RoI")
    ax.set_xlabel("x (pixels)")
    ax.set_ylabel("y (pixels)")
    for ax, (name, value) in zip(axes[0, 1:], pooled.items()):
        v = _np(value).astype(np.float64)
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


def plot_value_histograms(values: Mapping[str, Any], x_label: str, bins: int = 30, ax: Axes | None = None,
                          title: str | None = None, y_label: str = "count") -> Figure:
    """Overlaid histograms of ``values`` (name -> 1-D array), on shared bins."""
    arrays = {k: _np(v).astype(np.float64).reshape(-1) for k, v in values.items()}
    finite = [a[np.isfinite(a)] for a in arrays.values()]
    everything = np.concatenate(finite) if finite else np.zeros(0)
    lo, hi = (float(everything.min()), float(everything.max())) if everything.size else (0.0, 1.0)
    edges = np.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)
    fig, ax = _single_ax(ax, (5.0, 3.6))
    for name, a in arrays.items():
        ax.hist(a[np.isfinite(a)], bins=edges, alpha=0.55, label=f"{name} ({a.size})")
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.set_title(title or x_label)
    if arrays:
        ax.legend(fontsize=8)
    return fig


def plot_regression_targets(targets: Mapping[str, Any], bins: int = 40, title: str | None = None) -> Figure:
    """Histograms of ``(tx, ty, tw, th)`` (name -> ``(N, 4)`` encoded targets), one panel each, with
    each set's standard deviation in the legend: the box weights (10, 10, 5, 5) scale them up."""
    arrays = {k: _np(v).astype(np.float64).reshape(-1, 4) for k, v in targets.items()}
    fig, axes = new_figure(1, 4, (3.0, 2.9))
    for j, (ax, coord) in enumerate(zip(axes[0], ("tx", "ty", "tw", "th"))):
        column = {f"{name}, std {a[:, j].std():.2f}" if a.shape[0] else name: a[:, j] for name, a in arrays.items()}
        plot_value_histograms(column, coord, bins=bins, ax=ax, title=coord, y_label="RoIs")
        ax.legend(fontsize=6)
    fig.suptitle(title or "regression targets of the foreground RoIs")
    return fig


__all__ += [
    "plot_funnel",
    "plot_objectness_forms",
    "plot_pooled_rois",
    "plot_proposal_steps",
    "plot_regression_targets",
    "plot_smooth_l1",
    "plot_softmax_reshape",
    "plot_value_histograms",
]


# --------------------------------------------------------------------------- 08-09: end to end, ablations


def plot_training_history(history: Sequence[Mapping[str, Any]], keys: Sequence[str] | None = None, smooth: int = 1,
                          ax: Axes | None = None, title: str | None = None) -> Figure:
    """Losses against the iteration (``history``: ``rpnlab.train.TrainResult.history``), stages marked.

    Unlike ``plot_loss_curves`` each value is drawn at its own ``step``, so a schedule whose stages
    train different losses (the 4-step alternating one) shows each loss where it was trained; a
    dotted line and the stage's name mark where each stage starts. ``smooth`` > 1 draws a running
    mean over that many iterations of one stage (the raw values stay, faded).
    """
    records = [r for r in history if "step" in r]
    keys = list(keys) if keys is not None else list(dict.fromkeys(
        k for r in records for k in r if k.startswith("loss") and isinstance(r[k], (int, float))))
    fig, ax = _single_ax(ax, (7.0, 3.8))
    stages = list(dict.fromkeys(r.get("stage", "") for r in records))
    for k in keys:
        color = None
        for stage in stages:
            pts = [(r["step"], float(r[k])) for r in records if r.get("stage", "") == stage and k in r]
            if not pts:
                continue
            x, y = np.array(pts).T
            line = ax.plot(x, y, alpha=0.3 if smooth > 1 else 1.0, color=color, marker="." if y.size < 20 else None,
                           label=None if (smooth > 1 or color is not None) else k)[0]
            if smooth > 1 and y.size >= smooth:
                mean = np.convolve(y, np.ones(smooth) / smooth, mode="valid")
                ax.plot(x[smooth - 1:], mean, color=line.get_color(), label=k if color is None else None)
            color = line.get_color()
    if len(stages) > 1:
        for stage in stages:
            first = min(r["step"] for r in records if r.get("stage", "") == stage)
            ax.axvline(first, color="gray", linestyle=":", linewidth=1)
            ax.annotate(stage, (first, 1.0), xycoords=("data", "axes fraction"), xytext=(3, -12),
                        textcoords="offset points", fontsize=7, color="dimgray")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.set_title(title or "training losses")
    if keys:
        ax.legend(fontsize=8, loc="center right")
    ax.grid(alpha=0.3)
    return fig


def plot_ablation(rows: Sequence[Mapping[str, Any]], x: str, metrics: Sequence[str] = ("map_50",),
                  paper_key: str | None = "paper_map", log_x: bool = False, x_label: str | None = None,
                  labels: Mapping[str, str] | None = None, title: str | None = None) -> Figure:
    """An ablation's rows side by side with the paper's: our ``metrics`` (left panel, fractions drawn
    in percent) and the paper's ``paper_key`` (right panel, percent) against the setting ``x``.

    A numeric ``x`` draws lines (``log_x`` for lambda or proposal counts), a text ``x`` grouped bars.
    Rows without a paper number are left out of the right panel.
    """
    labels = dict(labels or {})
    names = [r[x] for r in rows]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in names)
    paper = [(r[x], r.get(paper_key)) for r in rows] if paper_key else []
    paper = [(v, p) for v, p in paper if p is not None]
    fig, axes = new_figure(1, 2 if paper else 1, (4.8, 3.6))
    ax = axes[0, 0]
    positions = np.asarray(names, dtype=np.float64) if numeric else np.arange(len(rows), dtype=np.float64)
    width = 0.8 / max(len(metrics), 1)
    for j, m in enumerate(metrics):
        values = np.array([100 * float(r[m]) if r.get(m) is not None else np.nan for r in rows])
        if numeric:
            ax.plot(positions, values, marker="o", label=labels.get(m, m))
        else:
            ax.bar(positions + (j - (len(metrics) - 1) / 2) * width, values, width, label=labels.get(m, m))
    ax.set_ylabel("ours (%)")
    ax.set_title("measured here")
    ax.legend(fontsize=7)
    axes_used = [ax]
    if paper:
        pax = axes[0, 1]
        axes_used.append(pax)
        pv = np.array([p for _, p in paper], dtype=np.float64)
        if numeric:
            pax.plot(np.asarray([v for v, _ in paper], dtype=np.float64), pv, marker="s", color="tab:gray")
        else:
            idx = [names.index(v) for v, _ in paper]
            pax.bar(np.asarray(idx, dtype=np.float64), pv, 0.6, color="tab:gray")
            pax.set_ylim(max(0.0, pv.min() - 5), pv.max() + 2)
        pax.set_ylabel("paper mAP (%)")
        pax.set_title("Ren et al. 2015 (VOC 2007 test)")
    for a in axes_used:
        if numeric:
            if log_x:
                a.set_xscale("log")
            a.set_xticks(positions, [f"{v:g}" for v in names])
        else:
            a.set_xticks(positions, [str(v) for v in names], rotation=20, ha="right", fontsize=8)
        a.set_xlabel(x_label or x)
        a.grid(alpha=0.3, axis="y")
    fig.suptitle(title or f"ablation over {x}")
    return fig


__all__ += ["plot_ablation", "plot_training_history"]
