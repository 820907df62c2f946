"""Drawing shared by every stage: figures without pyplot, box drawing, the course's colours, and the
dataset figures of notebook 00.

Every drawing function in ``rpnlab.lab`` builds a ``Figure`` without pyplot (so nothing is shown twice
in a notebook and nothing leaks when called in a loop), or draws into an ``ax`` you pass and returns
its figure. Nothing calls ``plt.show``.

Colours are fixed across the course: ground truth white with a black outline, positives green,
negatives red, ignored orange, anchors blue.
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
from matplotlib.patches import Rectangle

__all__ = [
    "CLASS_COLORS", "COLORS", "OUTLINE", "add_box", "as_numpy", "boxes_numpy", "class_color",
    "draw_boxes", "new_figure", "plot_dataset_statistics", "plot_funnel", "plot_loss_curves",
    "plot_value_histograms", "show_dataset_samples", "show_image", "single_ax",
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
CLASS_COLORS = ["tab:cyan", "tab:pink", "gold", "tab:olive", "tab:purple", "tab:brown", "lime", "tab:gray"]


OUTLINE = [patheffects.withStroke(linewidth=3, foreground="black")]


def new_figure(nrows: int = 1, ncols: int = 1, size: tuple[float, float] = (4.0, 4.0), **kwargs) -> tuple[Figure, np.ndarray]:
    """A pyplot-free ``Figure`` with an ``(nrows, ncols)`` array of axes; ``size`` is per panel."""
    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, **kwargs)
    return fig, axes


def single_ax(ax: Axes | None, size: tuple[float, float] = (5.0, 5.0)) -> tuple[Figure, Axes]:
    if ax is not None:
        return ax.figure, ax
    fig, axes = new_figure(1, 1, size)
    return fig, axes[0, 0]


def as_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def boxes_numpy(boxes: Any, name: str = "boxes") -> np.ndarray:
    b = as_numpy(boxes).astype(np.float64, copy=False)
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


def show_image(ax: Axes, image: Any, fade: float = 0.0) -> tuple[int, int]:
    """Draw ``image``; ``fade`` in [0, 1) blends it towards white so that boxes drawn over stand out."""
    arr = to_numpy_image(image)
    if fade:
        arr = arr[..., :3].astype(np.float64) / (255.0 if arr.dtype == np.uint8 else 1.0)
        arr = arr * (1 - fade) + fade
    ax.imshow(arr, interpolation="nearest")
    ax.set_xlabel("x (pixels)")
    ax.set_ylabel("y (pixels)")
    return arr.shape[0], arr.shape[1]


def add_box(ax: Axes, box: Sequence[float], color: str, linewidth: float = 1.5, linestyle: str = "-",
             alpha: float = 1.0, outline: bool = False, label: str | None = None) -> Rectangle:
    x1, y1, x2, y2 = (float(v) for v in box)
    rect = Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=color, linewidth=linewidth,
                     linestyle=linestyle, alpha=alpha, label=label)
    if outline:
        rect.set_path_effects(OUTLINE)
    ax.add_patch(rect)
    return rect


def class_color(label: int) -> str:
    return CLASS_COLORS[(int(label) - 1) % len(CLASS_COLORS)]


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
    fig, ax = single_ax(ax)
    show_image(ax, image)
    b = boxes_numpy(boxes)
    labs = None if labels is None else as_numpy(labels).reshape(-1)
    scs = None if scores is None else as_numpy(scores).reshape(-1)
    for name, arr in (("labels", labs), ("scores", scs)):
        if arr is not None and arr.shape[0] != b.shape[0]:
            raise ValueError(f"{name} has {arr.shape[0]} entries but there are {b.shape[0]} boxes")
    for i, box in enumerate(b):
        c = color or (class_color(labs[i]) if labs is not None else COLORS["gt"])
        add_box(ax, box, c, linestyle=linestyle, outline=True)
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
    ``rpnlab.lab.anchors.dataset_gt_boxes``.
    """
    b = boxes_numpy(boxes)
    labs = as_numpy(labels).reshape(-1).astype(int)
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    fig, axes = new_figure(1, 3, (4.0, 3.2))
    ax = axes[0, 0]
    counts = [int((labs == i + 1).sum()) for i in range(len(class_names))]
    bars = ax.bar(list(class_names), counts, color=[class_color(i + 1) for i in range(len(class_names))])
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


def plot_funnel(counts: Mapping[str, int], ax: Axes | None = None, title: str | None = None,
                log: bool = True, x_label: str = "boxes left") -> Figure:
    """How many boxes each step leaves: ``counts`` is ``{step: number}`` in order, drawn top-down."""
    names = list(counts)
    values = [int(counts[n]) for n in names]
    if not names:
        raise ValueError("counts is empty: nothing to draw")
    fig, ax = single_ax(ax, (5.0, 0.9 + 0.42 * len(names)))
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


def plot_value_histograms(values: Mapping[str, Any], x_label: str, bins: int = 30, ax: Axes | None = None,
                          title: str | None = None, y_label: str = "count") -> Figure:
    """Overlaid histograms of ``values`` (name -> 1-D array), on shared bins."""
    arrays = {k: as_numpy(v).astype(np.float64).reshape(-1) for k, v in values.items()}
    finite = [a[np.isfinite(a)] for a in arrays.values()]
    everything = np.concatenate(finite) if finite else np.zeros(0)
    lo, hi = (float(everything.min()), float(everything.max())) if everything.size else (0.0, 1.0)
    edges = np.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)
    fig, ax = single_ax(ax, (5.0, 3.6))
    for name, a in arrays.items():
        ax.hist(a[np.isfinite(a)], bins=edges, alpha=0.55, label=f"{name} ({a.size})")
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.set_title(title or x_label)
    if arrays:
        ax.legend(fontsize=8)
    return fig


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
