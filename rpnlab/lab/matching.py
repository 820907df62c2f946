"""Matching and sampling (notebook 03): label counts, the IoU matrix and the labelled anchors drawn."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from torch import Tensor

from rpnlab.lab.figures import (
    COLORS,
    add_box,
    as_numpy,
    boxes_numpy,
    show_image,
    single_ax,
)

__all__ = ["label_counts", "plot_iou_matrix", "plot_matching"]


def label_counts(labels, convention: str = "labels") -> dict:
    """Count positive, negative and ignored anchors.

    Args:
        labels: ``(A,)`` for one image, ``(B, A)`` for a batch, or a list of ``(A_i,)``.
        convention: ``"labels"``: 1 positive, 0 negative, -1 ignored (``label_anchors``);
            ``"matched_idxs"``: a gt index ``>= 0`` positive, -1 negative, -2 ignored (``Matcher``).

    Returns:
        ``dict(positive, negative, ignored)``: ints for one image, lists of ints (one per image)
        for a batch or a list.
    """
    if convention not in ("labels", "matched_idxs"):
        raise ValueError(f"convention must be 'labels' or 'matched_idxs', got {convention!r}")
    if isinstance(labels, Tensor) and labels.dim() == 1:
        counts = _count_one(labels, convention, "labels")
        return dict(zip(("positive", "negative", "ignored"), counts))
    if isinstance(labels, Tensor) and labels.dim() == 2:
        rows = list(labels.unbind(0))
    elif isinstance(labels, Sequence) and all(isinstance(x, Tensor) for x in labels):
        rows = list(labels)
    else:
        raise TypeError("labels must be a (A,) or (B, A) tensor, or a list of (A_i,) tensors")
    counts = [_count_one(row, convention, f"labels[{i}]") for i, row in enumerate(rows)]
    return {
        key: [c[j] for c in counts] for j, key in enumerate(("positive", "negative", "ignored"))
    }


def _count_one(labels: Tensor, convention: str, name: str) -> tuple[int, int, int]:
    if labels.dim() != 1:
        raise ValueError(f"{name} must be 1-D (A,), got shape {tuple(labels.shape)}")
    if convention == "labels":
        pos, neg, ign = labels == 1, labels == 0, labels == -1
        expected = "1 (positive), 0 (negative) or -1 (ignored)"
    else:
        pos, neg, ign = labels >= 0, labels == -1, labels == -2
        expected = "a gt index >= 0, -1 (negative) or -2 (ignored)"
    counts = torch.stack([pos.sum(), neg.sum(), ign.sum()]).tolist()
    if sum(counts) != labels.numel():
        raise ValueError(f"{name} must hold only {expected}")
    return tuple(int(c) for c in counts)


def plot_iou_matrix(iou: Any, row_labels: Sequence[str] | None = None, col_labels: Sequence[str] | None = None,
                    thresholds: Sequence[float] = (), annotate: bool | None = None, ax: Axes | None = None,
                    title: str | None = None) -> Figure:
    """``iou: (M, N)`` as a heat map (rows gt boxes, columns anchors); cells at or above each of
    ``thresholds`` get a marker; values are written in the cells when the matrix is small."""
    m = as_numpy(iou).astype(np.float64)
    if m.ndim != 2:
        raise ValueError(f"iou must be 2-D (M, N), got shape {m.shape}")
    fig, ax = single_ax(ax, (min(12.0, 2.0 + 0.35 * m.shape[1]), min(6.0, 1.5 + 0.4 * m.shape[0])))
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
    a = boxes_numpy(anchors, "anchors")
    lab = as_numpy(labels).reshape(-1)
    if lab.shape[0] != a.shape[0]:
        raise ValueError(f"labels has {lab.shape[0]} entries but there are {a.shape[0]} anchors")
    names = {"positive": "positive", "negative": "negative", "ignored": "ignored", **(names or {})}
    rng = np.random.default_rng(seed)
    fig, ax = single_ax(ax, (5.5, 5.5))
    h, w = show_image(ax, image, fade=0.5)
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
            add_box(ax, a[i], COLORS[kind], linewidth=lw, linestyle=style, alpha=alpha, outline=kind == "positive",
                     label=f"{names[kind]} ({total}{shown})" if j == 0 else None)
        if idx.size == 0:  # keep the count in the legend even when nothing is drawn
            ax.plot([], [], color=COLORS[kind], linestyle=style, label=f"{names[kind]} ({total}{shown})")
    for j, box in enumerate(boxes_numpy(gt_boxes, "gt_boxes")):
        add_box(ax, box, COLORS["gt"], linewidth=2.2, outline=True, label="ground truth" if j == 0 else None)
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)
    ax.legend(fontsize=7, loc="upper right", framealpha=0.85)
    counts = {k: int((lab == v).sum()) for k, v in (("positive", 1), ("negative", 0), ("ignored", -1))}
    ax.set_title(title or "anchors: " + ", ".join(f"{counts[k]} {names[k]}" for k in ("positive", "negative", "ignored")))
    return fig
