"""Detections and training (notebook 08): detections beside the ground truth, training curves."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from rpnlab.lab.figures import (
    COLORS,
    add_box,
    as_numpy,
    boxes_numpy,
    class_color,
    new_figure,
    show_image,
    single_ax,
)

__all__ = ["label_positions", "plot_detection_grid", "plot_detections", "plot_training_history"]


def _overlap(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection area of two ``(x1, y1, x2, y2)`` rectangles."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return max(0.0, w) * max(0.0, h)


def label_positions(boxes: Any, sizes: Sequence[tuple[float, float]], image_size: tuple[int, int]) -> np.ndarray:
    """Where to put one caption per box so that captions do not cover each other.

    Args:
        boxes: ``(N, 4)`` boxes in image pixels, in drawing priority order (highest score first).
        sizes: ``(width, height)`` of each caption, in image pixels.
        image_size: ``(H, W)``; captions stay inside the image.

    Returns:
        ``(N, 4)`` caption rectangles ``x1, y1, x2, y2``. Each box tries, in order: just above its
        top-left corner, inside its top-left corner, just below its bottom-left corner, the same
        three at its right edge, then rows further up, inside and down; it takes the first spot
        that overlaps no caption placed before it, or else the one that overlaps least (greedy, so
        higher-priority boxes keep the best spots).
    """
    b = boxes_numpy(boxes)
    H, W = image_size
    placed: list[np.ndarray] = []

    def spot(left: float, top: float, w: float, h: float) -> np.ndarray:
        x = min(max(left, 0.0), max(W - w, 0.0))
        y = min(max(top, 0.0), max(H - h, 0.0))
        return np.array([x, y, x + w, y + h])

    for box, (w, h) in zip(b, sizes):
        x1, y1, x2, y2 = (float(v) for v in box)
        preferred = [spot(left, top, w, h) for left in (x1, x2 - w) for top in (y1 - h, y1, y2)]
        # Then further away, one caption height at a time, above, inside and below the box.
        rows = max(1, int(H / max(h, 1e-6)))
        farther = [spot(left, top, w, h) for k in range(1, rows) for left in (x1, x2 - w)
                   for top in (y1 - (k + 1) * h, y1 + k * h, y2 + k * h)]
        chosen, least = None, None
        for candidate in preferred + farther:
            cost = sum(_overlap(candidate, p) for p in placed)
            if cost == 0:
                chosen = candidate
                break
            if least is None or cost < least[0]:
                least = (cost, candidate)
        placed.append(chosen if chosen is not None else least[1])
    return np.array(placed, dtype=float).reshape(-1, 4)


def _caption_size(ax: Axes, text: str, fontsize: float, image_width: int) -> tuple[float, float]:
    """Approximate size of a caption in image pixels: about 0.6 em per character plus padding."""
    axes_points = ax.get_position().width * ax.figure.get_figwidth() * 72  # the axes' width in points
    pixels_per_point = image_width / max(axes_points, 1.0)
    return ((0.6 * len(text) + 0.6) * fontsize * pixels_per_point, 1.35 * fontsize * pixels_per_point)


def _draw_captioned(ax: Axes, boxes: np.ndarray, labels: np.ndarray, scores: np.ndarray | None,
                    class_names: Sequence[str] | None, image_size: tuple[int, int], linestyle: str = "-",
                    fontsize: float = 9.0) -> None:
    """Boxes coloured by class, each with a caption placed by ``label_positions``."""
    captions = []
    for i in range(len(boxes)):
        name = class_names[int(labels[i]) - 1] if class_names else str(int(labels[i]))
        captions.append(name if scores is None else f"{name} {float(scores[i]):.2f}")
    sizes = [_caption_size(ax, c, fontsize, image_size[1]) for c in captions]
    spots = label_positions(boxes, sizes, image_size)
    for box, label, caption, spot in zip(boxes, labels, captions, spots):
        color = class_color(int(label))
        add_box(ax, box, color, linewidth=2.0, linestyle=linestyle, outline=True)
        ax.text(spot[0], spot[1], caption, fontsize=fontsize, color="black", va="top", ha="left",
                bbox={"facecolor": color, "alpha": 0.85, "pad": 1.5, "linewidth": 0}, clip_on=True)


def plot_detections(image: Any, detections: Mapping[str, Any], class_names: Sequence[str] | None = None,
                    gt_boxes: Any = None, score_threshold: float = 0.0, ax: Axes | None = None,
                    title: str | None = None, fontsize: float = 9.0) -> Figure:
    """Detections ``dict(boxes (D, 4), labels (D,), scores (D,))`` scoring >= ``score_threshold``.

    Boxes are coloured by class with ``"class score"`` captions that do not cover each other
    (``label_positions``; the best-scoring detections get the best spots); ``gt_boxes`` ``(M, 4)``
    are drawn thin and dashed in white underneath.
    """
    scores = as_numpy(detections["scores"]).reshape(-1)
    keep = scores >= score_threshold
    order = np.argsort(-scores[keep], kind="stable")
    boxes = boxes_numpy(detections["boxes"])[keep][order]
    labels = as_numpy(detections["labels"]).reshape(-1)[keep][order]
    fig, ax = single_ax(ax)
    size = show_image(ax, image)
    if gt_boxes is not None:
        for box in boxes_numpy(gt_boxes, "gt_boxes"):
            add_box(ax, box, COLORS["gt"], linewidth=1.2, linestyle="--", outline=True)
    _draw_captioned(ax, boxes, labels, scores[keep][order], class_names, size, fontsize=fontsize)
    ax.set_title(title or f"{int(keep.sum())} detections (score >= {score_threshold:g})")
    return fig


def plot_detection_grid(samples: Sequence[tuple[Any, Mapping[str, Any]]],
                        detections: Mapping[str, Sequence[Mapping[str, Any]]],
                        class_names: Sequence[str] | None = None, score_threshold: float = 0.5,
                        panel_size: float = 4.2, fontsize: float = 9.0) -> Figure:
    """One row per image: its ground truth, then each model's detections beside it.

    Args:
        samples: ``(image (3, H, W), target dict(boxes (M, 4), labels (M,)))`` per row.
        detections: ``{model name: [dict(boxes, labels, scores) per sample]}``, one column each.
        score_threshold: detections scoring below it are not drawn (the display threshold).
        panel_size: inches per panel side.
    """
    if not samples:
        raise ValueError("samples is empty: give at least one (image, target) pair")
    for name, dets in detections.items():
        if len(dets) != len(samples):
            raise ValueError(f"detections[{name!r}] has {len(dets)} entries for {len(samples)} samples")
    fig, axes = new_figure(len(samples), 1 + len(detections), (panel_size, panel_size))
    for row, (image, target) in enumerate(samples):
        ax = axes[row, 0]
        size = show_image(ax, image)
        gt = boxes_numpy(target["boxes"], "target['boxes']")
        _draw_captioned(ax, gt, as_numpy(target["labels"]).reshape(-1), None, class_names, size,
                        fontsize=fontsize)
        ax.set_title(f"ground truth: {len(gt)} objects")
        for col, (name, dets) in enumerate(detections.items(), start=1):
            kept = int((as_numpy(dets[row]["scores"]) >= score_threshold).sum())
            plot_detections(image, dets[row], class_names, gt_boxes=target["boxes"], score_threshold=score_threshold,
                            ax=axes[row, col], title=f"{name}: {kept} detections", fontsize=fontsize)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel("")
        ax.set_ylabel("")
    fig.suptitle(f"ground truth (left) and detections scoring >= {score_threshold:g} (white dashes: ground truth)")
    return fig


def plot_training_history(history: Sequence[Mapping[str, Any]], keys: Sequence[str] | None = None, smooth: int = 1,
                          ax: Axes | None = None, title: str | None = None) -> Figure:
    """Losses against the iteration (``history``: ``rpnlab.engine.train.TrainResult.history``), stages marked.

    Unlike ``plot_loss_curves`` each value is drawn at its own ``step``, so a schedule whose stages
    train different losses (the 4-step alternating one) shows each loss where it was trained; a
    dotted line and the stage's name mark where each stage starts. ``smooth`` > 1 draws a running
    mean over that many iterations of one stage (the raw values stay, faded).
    """
    records = [r for r in history if "step" in r]
    keys = list(keys) if keys is not None else list(dict.fromkeys(
        k for r in records for k in r if k.startswith("loss") and isinstance(r[k], (int, float))))
    fig, ax = single_ax(ax, (7.0, 3.8))
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
