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
    draw_boxes,
    single_ax,
)

__all__ = ["plot_detections", "plot_training_history"]


def plot_detections(image: Any, detections: Mapping[str, Any], class_names: Sequence[str] | None = None,
                    gt_boxes: Any = None, score_threshold: float = 0.0, ax: Axes | None = None,
                    title: str | None = None) -> Figure:
    """Detections ``dict(boxes, labels, scores)`` above ``score_threshold``, gt boxes dashed."""
    scores = as_numpy(detections["scores"]).reshape(-1)
    keep = scores >= score_threshold
    boxes = boxes_numpy(detections["boxes"])[keep]
    labels = as_numpy(detections["labels"]).reshape(-1)[keep]
    fig, ax = single_ax(ax)
    draw_boxes(image, boxes, labels, scores[keep], class_names=class_names, ax=ax,
               title=title or f"{int(keep.sum())} detections (score >= {score_threshold:g})")
    if gt_boxes is not None:
        for box in boxes_numpy(gt_boxes, "gt_boxes"):
            add_box(ax, box, COLORS["gt"], linewidth=1.2, linestyle="--", outline=True)
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
