"""Box coding (notebook 02): the (tx, ty, tw, th) parameterisation drawn."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch

from rpnlab.lab.figures import (
    COLORS,
    add_box,
    as_numpy,
    boxes_numpy,
    single_ax,
)

__all__ = ["plot_box_coding"]


def plot_box_coding(anchor: Any, gt: Any, deltas: Any = None, others: Mapping[str, Any] | None = None,
                    ax: Axes | None = None, title: str | None = None) -> Figure:
    """An anchor, a gt box and the offsets ``(tx, ty, tw, th)`` that take one to the other.

    Args:
        anchor, gt: ``(4,)`` boxes.
        deltas: ``(4,)``; default ``BoxCoder().encode(anchor, gt)``.
        others: more boxes to draw dashed, name -> ``(4,)`` (e.g. a wrongly decoded box).
    """
    from rpnlab.detector.boxes import BoxCoder

    a = boxes_numpy(anchor, "anchor")[0]
    g = boxes_numpy(gt, "gt")[0]
    if deltas is None:
        deltas = BoxCoder().encode(torch.tensor(a, dtype=torch.float64), torch.tensor(g, dtype=torch.float64))
    d = as_numpy(deltas).reshape(-1)
    fig, ax = single_ax(ax, (5.5, 5.0))
    add_box(ax, a, COLORS["anchor"], linewidth=2, label="anchor")
    add_box(ax, g, "black", linewidth=2, label="ground truth")
    ac, gc = (a[:2] + a[2:]) / 2, (g[:2] + g[2:]) / 2
    ax.add_patch(FancyArrowPatch(tuple(ac), tuple(gc), arrowstyle="->", mutation_scale=15, color="black"))
    ax.plot(*ac, "o", color=COLORS["anchor"])
    ax.plot(*gc, "o", color="black")
    all_boxes = [a, g]
    dashed_colors = [COLORS["negative"], COLORS["prediction"], COLORS["ignored"]]
    for i, (name, box) in enumerate((others or {}).items()):
        b = boxes_numpy(box, name)[0]
        add_box(ax, b, dashed_colors[i % len(dashed_colors)], linewidth=2, linestyle="--", label=name)
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
