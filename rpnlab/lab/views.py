"""The explorers' figures, built once and updated in place (``rpnlab.lab.widgets``).

Drawing a figure from scratch (new axes, a patch per box, a layout pass, a legend, PNG
compression) takes a few hundred ms; a slider wants its figure within 150 ms. So each explorer
keeps one ``Figure`` and, at every change, only gives its artists new data: the image
(``AxesImage.set_data``), every set of boxes as one ``LineCollection`` (``set_segments``), points
(``set_offsets``), histogram bars (``set_height``), texts and legend labels (``set_text``). The
layout is computed once, at the first draw, and then kept (a layout pass per change costs as much
as the drawing). What a change moves is drawn over a kept background (matplotlib's blitting:
axes, ticks and labels are the slow part of a draw), which is redrawn only when an axis range or
a still part changed; ranges are rounded outward so that a small change keeps them. The PNG is
written with light compression at the resolution the notebook shows (80 dpi).

Each view draws what the stage's plotting function draws (``plot_anchor_grid``,
``plot_box_coding``, ``plot_matching``, ``plot_proposal_steps``, ``draw_boxes``), with the same
colours and words; those functions stay the plain way to draw one figure in a notebook cell.
Boxes are ``(N, 4)`` ``x1, y1, x2, y2`` pixels throughout.

Longer than 500 lines because it holds the kept figure of every explorer of the course (00-05), one
class each, over the same few helpers.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import FancyArrowPatch, Rectangle
from matplotlib.transforms import blended_transform_factory
from PIL import Image

from rpnlab.detector.boxes import box_iou
from rpnlab.lab.anchors import _anchor_centres
from rpnlab.lab.figures import COLORS, OUTLINE, as_numpy, boxes_numpy, class_color, to_numpy_image

__all__ = [
    "AnchorView", "BoxCodingView", "DatasetView", "KeptFigure", "MatchingView", "ProposalView", "box_segments",
]

DPI = 80  # what the notebook shows: an 800-pixel-wide PNG for a 10-inch figure


def box_segments(boxes: Any) -> np.ndarray:
    """``boxes: (N, 4)`` -> ``(N, 5, 2)`` closed outlines, for ``LineCollection.set_segments``."""
    b = boxes_numpy(boxes)
    x1, y1, x2, y2 = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
    return np.stack([np.stack([x1, y1], 1), np.stack([x2, y1], 1), np.stack([x2, y2], 1),
                     np.stack([x1, y2], 1), np.stack([x1, y1], 1)], axis=1)


class KeptFigure:
    """A figure that is laid out once and then only redrawn: ``png()`` after each ``update``."""

    def __init__(self, ncols: int, size: tuple[float, float], dpi: int = DPI):
        self.fig = Figure(figsize=(size[0] * ncols, size[1]), dpi=dpi, layout="constrained")
        FigureCanvasAgg(self.fig)
        self.axes: list[Axes] = list(self.fig.subplots(1, ncols, squeeze=False)[0])
        self._laid_out = False
        self._moving: list[Any] = []
        self._background: Any = None
        self._background_key: Any = None
        self.still_version = 0  # bumped by ``still_changed`` when an artist of the background changes
        self.full_draws = 0  # how often the background was redrawn (tests and benchmarks read it)

    def moving(self, artist):
        """Mark ``artist`` as one that an update changes: drawn over the kept background; returns it."""
        artist.set_animated(True)
        self._moving.append(artist)
        return artist

    def still_changed(self) -> None:
        """Say that an artist of the background (not ``moving``) changed: the next ``png`` redraws it."""
        self.still_version += 1

    @property
    def title(self) -> str:
        return self.axes[0].get_title() or "figure"

    def png(self) -> bytes:
        """The figure as PNG bytes; the first call also fixes the layout for the next ones."""
        canvas = self.fig.canvas
        key = (self.still_version, tuple((ax.get_xlim(), ax.get_ylim()) for ax in self.axes))
        if key != self._background_key:
            canvas.draw()  # everything but the moving artists (the first time, the layout too)
            if not self._laid_out:
                self.fig.set_layout_engine("none")  # the positions stay where the layout put them
                self._laid_out = True
            self._background, self._background_key = canvas.copy_from_bbox(self.fig.bbox), key
            self.full_draws += 1
        else:
            canvas.restore_region(self._background)
        for artist in sorted(self._moving, key=lambda a: a.get_zorder()):
            if artist.get_visible():
                self.fig.draw_artist(artist)
        buffer = io.BytesIO()
        Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3]).save(buffer, format="png", compress_level=1)
        return buffer.getvalue()


def _ceil_to(value: float, step: float) -> float:
    return float(np.ceil(value / step) * step)


def _nice_top(value: float) -> float:
    """The smallest of 1, 2, 5 x 10^n at or above ``value``: a histogram's top that small changes keep."""
    value = max(float(value), 1.0)
    base = 10.0 ** np.floor(np.log10(value))
    return float(next(m * base for m in (1, 2, 5, 10) if m * base >= value))


# ------------------------------------------------------------------------------------ helpers


def _boxes(ax: Axes, color: Any = "black", linewidth: float = 1.5, linestyle: str = "-", alpha: float = 1.0,
           outline: bool = False, zorder: float = 2.0) -> LineCollection:
    """An empty set of boxes on ``ax``; fill it with ``set_segments(box_segments(boxes))``."""
    lines = LineCollection([], colors=[to_rgba(color, alpha)], linewidths=linewidth, linestyles=linestyle,
                           zorder=zorder)
    if outline:
        lines.set_path_effects(OUTLINE)
    ax.add_collection(lines, autolim=False)
    return lines


def _handle(color: Any, linewidth: float = 1.5, linestyle: str = "-", outline: bool = False, **kwargs) -> Line2D:
    """A legend entry drawn like a set of boxes."""
    line = Line2D([], [], color=color, linewidth=linewidth, linestyle=linestyle, **kwargs)
    if outline:
        line.set_path_effects(OUTLINE)
    return line


class _Texts:
    """A pool of text artists on ``ax``: ``show([(x, y, text), ...])`` reuses them, hiding the rest."""

    def __init__(self, ax: Axes, view: KeptFigure, **style):
        self.ax, self.view, self.style, self.items = ax, view, style, []

    def show(self, entries: Sequence[tuple[float, float, str]], colors: Sequence[Any] | None = None) -> None:
        while len(self.items) < len(entries):
            self.items.append(self.view.moving(self.ax.text(0, 0, "", **self.style)))
        for i, item in enumerate(self.items):
            visible = i < len(entries)
            item.set_visible(visible)
            if visible:
                x, y, s = entries[i]
                item.set_position((float(x), float(y)))
                item.set_text(s)
                if colors is not None:
                    item.get_bbox_patch().set_facecolor(colors[i])


class _Image:
    """The image of an axes, replaced in place (any size: the extent and limits follow)."""

    def __init__(self, ax: Axes):
        self.ax = ax
        self.artist = ax.imshow(np.zeros((1, 1, 3)), interpolation="nearest")
        ax.set_xlabel("x (pixels)")
        ax.set_ylabel("y (pixels)")
        self.shape = (1, 1)

    def show(self, image: Any, fade: float = 0.0) -> tuple[int, int]:
        arr = to_numpy_image(image)
        if fade:
            arr = arr[..., :3].astype(np.float64) / (255.0 if arr.dtype == np.uint8 else 1.0)
            arr = arr * (1 - fade) + fade
        h, w = arr.shape[:2]
        self.artist.set_data(arr)
        self.artist.set_extent((-0.5, w - 0.5, h - 0.5, -0.5))
        self.shape = (h, w)
        return h, w

    def fit(self, extra: np.ndarray | None = None, margin: float = 0.0) -> None:
        """Axis limits: the image, and every box of ``extra: (N, 4)`` with a margin around both.

        A new range redraws the whole axes (half of a change's time), so the part beyond the image
        is rounded up to a quarter of the image, and a range one step wider than needed is kept.
        """
        h, w = self.shape
        step = max(w, h) / 4
        need = np.array([-0.5, -0.5, w - 0.5, h - 0.5])  # x1, y1, x2, y2
        if extra is not None and len(extra):
            need[:2] -= [_ceil_to(max(0.0, need[i] - float(extra[:, i].min())), step) for i in (0, 1)]
            need[2:] += [_ceil_to(max(0.0, float(extra[:, i].max()) - need[i]), step) for i in (2, 3)]
        _set_range(self.ax, need + [-margin, -margin, margin, margin], slack=step)


def _set_range(ax: Axes, need: np.ndarray, slack: float) -> None:
    """Show ``need`` (x1, y1, x2, y2; y pointing down), keeping the range shown while it holds
    ``need`` and is at most ``slack`` wider on each side (a new range redraws the whole axes)."""
    (x1, x2), (y2, y1) = ax.get_xlim(), ax.get_ylim()
    wider = np.array([-1, -1, 1, 1]) * (np.array([x1, y1, x2, y2]) - need)  # per side
    if ax.get_autoscale_on() or (wider < -1e-6).any() or (wider > slack + 1e-6).any():
        ax.set_xlim(need[0], need[2])
        ax.set_ylim(need[3], need[1])
        ax.set_autoscale_on(False)


def _caption_box(color: Any) -> dict:
    return {"facecolor": color, "alpha": 0.8, "pad": 1, "linewidth": 0}


# ------------------------------------------------------------------------------ 00: dataset


class DatasetView(KeptFigure):
    """One image with its boxes, captioned by class (``draw_boxes``)."""

    def __init__(self, class_names: Sequence[str] | None = None):
        super().__init__(1, (5.0, 5.0))
        ax = self.axes[0]
        self.names = class_names
        self.image = _Image(ax)
        self.boxes = self.moving(_boxes(ax, outline=True))
        self.captions = _Texts(ax, self, fontsize=7, color="black", va="bottom", bbox=_caption_box("white"))
        self.moving(self.image.artist)
        self.moving(ax.title)

    def update(self, image: Any, boxes: Any, labels: Any = None, title: str = "") -> None:
        self.image.show(image)
        self.image.fit()
        b = boxes_numpy(boxes)
        labs = None if labels is None else as_numpy(labels).reshape(-1)
        colors = [class_color(v) if labs is not None else COLORS["gt"] for v in (labs if labs is not None else b[:, 0])]
        self.boxes.set_segments(box_segments(b))
        self.boxes.set_colors(colors or ["white"])
        if labs is not None:
            words = [self.names[int(v) - 1] if self.names else str(int(v)) for v in labs]
            self.captions.show([(box[0], box[1], word) for box, word in zip(b, words)], colors)
        else:
            self.captions.show([])
        self.axes[0].set_title(title or f"{b.shape[0]} boxes")


# ------------------------------------------------------------------------------ 01: anchors


class AnchorView(KeptFigure):
    """Left: anchor centres, the anchors of the centre location, each gt box with its best anchor
    (``plot_anchor_grid``); right: the coverage histogram (``plot_anchor_coverage``)."""

    def __init__(self, thresholds: Sequence[float] = (0.5, 0.7), bins: int = 20):
        super().__init__(2, (5.0, 4.6))
        ax, hist = self.axes
        self.thresholds = tuple(float(t) for t in thresholds)
        # The image moves (with the image slider) under a still grid and still anchor centres
        # (they change with the stride only): the image is drawn over the background, so the grid
        # and the centres are drawn again over it, as moving artists of the lowest order.
        self.image = _Image(ax)
        self.moving(self.image.artist)
        self.grid = self.moving(LineCollection([], colors=[to_rgba("white", 0.5)], linewidths=0.3, zorder=1.5))
        ax.add_collection(self.grid, autolim=False)
        self.centres = self.moving(ax.scatter(np.zeros(0), np.zeros(0), s=6, color=COLORS["anchor"],
                                              edgecolors="white", linewidths=0.3, zorder=3))
        self.location = self.moving(_boxes(ax, COLORS["anchor"], linewidth=1.0))
        self.gt = self.moving(_boxes(ax, COLORS["gt"], linewidth=2, outline=True, zorder=4))
        self.best = self.moving(_boxes(ax, "yellow", linewidth=1.5, linestyle="--", outline=True, zorder=4))
        self.ious = _Texts(ax, self, fontsize=7, va="top", color="black", bbox=_caption_box("yellow"), zorder=5)
        handles = [
            Line2D([], [], linestyle="none", marker="o", markersize=3, color=COLORS["anchor"], markeredgecolor="white"),
            _handle(COLORS["anchor"], 1.0), _handle(COLORS["gt"], 2, outline=True),
            _handle("yellow", 1.5, "--", outline=True),
        ]
        self.legend = ax.legend(handles, ["anchor centres", "the k anchors of one location", "ground truth",
                                          "best anchor of each gt box"], fontsize=7, loc="upper right",
                                framealpha=0.8)
        self.edges = np.linspace(0, 1, bins + 1)
        self.bars = hist.bar(self.edges[:-1], np.zeros(bins), width=np.diff(self.edges), align="edge",
                             color=COLORS["anchor"], edgecolor="white")
        styles = ["--", ":", "-."]
        lines = [hist.axvline(t, color="black", linestyle=styles[i % 3]) for i, t in enumerate(self.thresholds)]
        self.shares = hist.legend(lines, [f"IoU >= {t:g}" for t in self.thresholds], fontsize=8, loc="upper left")
        for artist in (*self.bars, *lines, self.legend, self.shares, ax.title, hist.title):
            self.moving(artist)
        hist.set_xlim(0, 1)
        hist.set_xlabel("best IoU of a gt box with any anchor")
        hist.set_ylabel("gt boxes")

    def update(self, image: Any, anchors: Any, stride: float, gt_boxes: Any, best_iou: Any, title: str = "") -> None:
        """``anchors: (H*W*k, 4)`` of the image (generator order), ``gt_boxes: (M, 4)`` of the image,
        ``best_iou: (G,)`` of every gt box of the dataset (the histogram)."""
        ax, hist = self.axes
        a = boxes_numpy(anchors, "anchors")
        h, w = self.image.show(image, fade=0.35)
        centres, k = _anchor_centres(a)
        xs, ys = np.arange(0, w + 1e-6, stride), np.arange(0, h + 1e-6, stride)
        big = 1e6  # grid lines run across the whole view, as axvline / axhline do
        self.grid.set_segments([[(x, -big), (x, big)] for x in xs] + [[(-big, y), (big, y)] for y in ys])
        self.centres.set_offsets(centres.reshape(-1, 2))
        location = int(np.argmin(((centres - [w / 2, h / 2]) ** 2).sum(1))) if len(centres) else 0
        group = a[location * k:(location + 1) * k]
        self.location.set_segments(box_segments(group))
        drawn = [group]
        gt = boxes_numpy(gt_boxes, "gt_boxes")
        if len(gt) and len(a):
            best, idx = box_iou(torch.as_tensor(gt, dtype=torch.float32), torch.as_tensor(a, dtype=torch.float32)).max(1)
            chosen = a[idx.numpy()]
            drawn.append(chosen)
            self.ious.show([(box[0], box[3], f"IoU {float(v):.2f}") for box, v in zip(gt, best)])
        else:
            chosen = np.zeros((0, 4))
            self.ious.show([])
        self.gt.set_segments(box_segments(gt))
        self.best.set_segments(box_segments(chosen))
        self.image.fit(np.concatenate(drawn), margin=0.03 * max(w, h))
        texts = self.legend.get_texts()
        texts[0].set_text(f"{centres.shape[0]} anchor centres")
        texts[1].set_text(f"the {k} anchors of one location")
        ax.set_title(title or f"{a.shape[0]} anchors: stride {stride:g}, k = {k}")

        values = as_numpy(best_iou).reshape(-1).astype(np.float64)
        counts, _ = np.histogram(values, bins=self.edges)
        for bar, c in zip(self.bars, counts):
            bar.set_height(c)
        hist.set_ylim(0, _nice_top(counts.max(initial=0) * 1.05))
        for text, t in zip(self.shares.get_texts(), self.thresholds):
            share = float((values >= t).mean()) if values.size else float("nan")
            text.set_text(f"IoU >= {t:g}: {share:.0%} of boxes")
        mean = f", mean {values.mean():.2f}" if values.size else ""
        hist.set_title(f"anchor coverage of {values.size} gt boxes{mean}")


# ------------------------------------------------------------------------------ 02: box coding


class BoxCodingView(KeptFigure):
    """An anchor, a gt box and the box that the offsets decode to (``plot_box_coding``)."""

    def __init__(self, anchor: Any, gt: Any):
        super().__init__(1, (5.5, 5.0))
        ax = self.axes[0]
        self.a, self.g = boxes_numpy(anchor, "anchor")[0], boxes_numpy(gt, "gt")[0]
        ac, gc = (self.a[:2] + self.a[2:]) / 2, (self.g[:2] + self.g[2:]) / 2
        self.rects = {}
        for name, box, color, style in (("anchor", self.a, COLORS["anchor"], "-"), ("ground truth", self.g, "black", "-"),
                                        ("decoded", self.a, COLORS["negative"], "--")):
            rect = Rectangle(box[:2], *(box[2:] - box[:2]), fill=False, edgecolor=color, linewidth=2,
                             linestyle=style, label=name)
            self.rects[name] = ax.add_patch(rect)
        self.moving(self.rects["decoded"])
        ax.add_patch(FancyArrowPatch(tuple(ac), tuple(gc), arrowstyle="->", mutation_scale=15, color="black"))
        ax.plot(*ac, "o", color=COLORS["anchor"])
        ax.plot(*gc, "o", color="black")
        self.text = self.moving(ax.text(0.02, 0.98, "", transform=ax.transAxes, va="top", family="monospace",
                                        fontsize=9, bbox={"facecolor": "white", "alpha": 0.9}))
        self.moving(ax.title)
        ax.set_aspect("equal")
        ax.set_xlabel("x (pixels)")
        ax.set_ylabel("y (pixels)")
        ax.legend(fontsize=8, loc="lower right")

    def update(self, deltas: Sequence[float], decoded: Sequence[float], title: str = "") -> None:
        ax = self.axes[0]
        d = boxes_numpy(decoded, "decoded")[0]
        self.rects["decoded"].set_bounds(d[0], d[1], d[2] - d[0], d[3] - d[1])
        self.text.set_text("\n".join(f"{n} = {v:+.3f}" for n, v in zip(("tx", "ty", "tw", "th"), deltas)))
        stacked = np.stack([self.a, self.g, d])
        pad = 0.15 * float(max(stacked[:, 2].max() - stacked[:, 0].min(), stacked[:, 3].max() - stacked[:, 1].min()))
        step = 16.0  # limits on a 16-pixel grid, kept while at most 2 steps too wide (the background too)
        need = np.array([np.floor((stacked[:, 0].min() - pad) / step) * step,
                         np.floor((stacked[:, 1].min() - pad) / step) * step,
                         _ceil_to(stacked[:, 2].max() + pad, step), _ceil_to(stacked[:, 3].max() + pad, step)])
        _set_range(ax, need, slack=2 * step)
        ax.set_title(title or "box coding: anchor -> ground truth")


# ------------------------------------------------------------------------------ 03: matching


class MatchingView(KeptFigure):
    """Left: positive, negative and ignored anchors on the image (``plot_matching``); right: each
    anchor's best IoU as a histogram cut into the three zones by the thresholds."""

    KINDS = (("negative", 0, "-", 0.8, 0.9), ("ignored", -1, "--", 0.9, 1.0), ("positive", 1, "-", 1.0, 2.2))

    def __init__(self, max_negatives: int = 15, max_ignored: int = 15, seed: int = 0, bins: int = 50):
        super().__init__(2, (5.0, 4.2))
        ax, hist = self.axes
        self.limits = {"negative": max_negatives, "ignored": max_ignored, "positive": None}
        self.seed = seed
        self.image = _Image(ax)
        self.sets = {kind: self.moving(_boxes(ax, COLORS[kind], lw, style, alpha, outline=kind == "positive"))
                     for kind, _, style, alpha, lw in self.KINDS}
        self.gt = _boxes(ax, COLORS["gt"], 2.2, outline=True, zorder=3)
        handles = [_handle(COLORS[kind], lw, style, outline=kind == "positive", alpha=alpha)
                   for kind, _, style, alpha, lw in self.KINDS] + [_handle(COLORS["gt"], 2.2, outline=True)]
        self.legend = ax.legend(handles, ["negative", "ignored", "positive", "ground truth"],
                                loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize=7, frameon=False)
        self.edges = np.linspace(0.0, 1.0, bins + 1)
        # One step patch for the histogram (one artist to redraw, not 50 bars), under the zones.
        self.bars = hist.stairs(np.ones(bins), self.edges, fill=True, color="0.35", baseline=0.1, zorder=0.4)
        hist.set_yscale("log")
        span = blended_transform_factory(hist.transData, hist.transAxes)
        self.zones = {name: hist.add_patch(Rectangle((0, 0), 0, 1, transform=span, color=color, alpha=alpha, zorder=0.5))
                      for name, color, alpha in (("negative", "tab:red", 0.15), ("ignored", "tab:orange", 0.2),
                                                 ("positive", "tab:green", 0.2))}
        self.cuts = [hist.axvline(0, color="black", linewidth=1.5) for _ in range(2)]
        self.zone_legend = hist.legend(list(self.zones.values()), ["negative", "ignored", "positive"],
                                       loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize=7,
                                       frameon=False)
        hist.set_xlim(0.0, 1.0)
        hist.set_xlabel("each anchor's best IoU with a gt box")
        hist.set_ylabel("anchors")
        hist.set_title("the thresholds cut the IoU axis")
        # Another image moves the picture, its boxes and the histogram, not the axes: all of them
        # are drawn with the moving artists, and the background is redrawn only for a new range.
        for artist in (self.image.artist, self.bars, *self.zones.values(), *self.cuts, self.legend, self.zone_legend,
                       ax.title, self.gt):
            self.moving(artist)
        self._image_key: Any = None

    def show_image(self, key: Any, image: Any, gt_boxes: Any, best_iou: Any) -> None:
        """What depends on the image only: the picture, its gt boxes, the IoU histogram."""
        if key == self._image_key:
            return
        self._image_key = key
        self.image.show(image, fade=0.5)
        self.image.fit()
        self.gt.set_segments(box_segments(gt_boxes))
        values = as_numpy(best_iou).reshape(-1)
        counts, _ = np.histogram(values, bins=self.edges)
        self.bars.set_data(values=counts)
        # On the log axis, the number of anchors as the top costs little room and stays the same
        # from image to image (a new range would redraw the axes).
        self.axes[1].set_ylim(0.5, _nice_top(max(2, values.size) * 1.5))

    def update(self, anchors: Any, labels: Any, low: float, high: float, title: str = "") -> None:
        """``anchors: (A, 4)``, ``labels: (A,)`` (1, 0, -1) of the image last given to ``show_image``."""
        a = boxes_numpy(anchors, "anchors")
        lab = as_numpy(labels).reshape(-1)
        rng = np.random.default_rng(self.seed)  # the same choice as plot_matching's
        counts = {}
        for (kind, value, *_), text in zip(self.KINDS, self.legend.get_texts()):
            idx = np.flatnonzero(lab == value)
            total, limit = idx.size, self.limits[kind]
            if limit is not None and idx.size > limit:
                idx = np.sort(rng.choice(idx, size=limit, replace=False))
            self.sets[kind].set_segments(box_segments(a[idx]))
            counts[kind] = total
            text.set_text(f"{kind} ({total}{'' if idx.size == total else f', {idx.size} drawn'})")
        self.axes[0].set_title(title or "anchors: " + ", ".join(f"{counts[k]} {k}" for k in ("positive", "negative",
                                                                                            "ignored")))
        for zone, (x1, x2) in zip(self.zones.values(), ((0.0, low), (low, high), (high, 1.0))):
            zone.set_x(x1)
            zone.set_width(x2 - x1)
        for line, t in zip(self.cuts, (low, high)):
            line.set_xdata([t, t])
        texts = self.zone_legend.get_texts()
        texts[0].set_text(f"negative: IoU < {low:.2f}")
        texts[2].set_text(f"positive: IoU \u2265 {high:.2f}")


# ------------------------------------------------------------------------------ 05: proposals


class ProposalView(KeptFigure):
    """Left: boxes left after each step of the proposal layer (``plot_funnel``); right: the ``top``
    best proposals over the image and the gt boxes (``plot_proposals``)."""

    def __init__(self, image: Any, gt_boxes: Any, steps: Sequence[str], top: int = 20):
        super().__init__(2, (4.2, 4.0))
        funnel_ax, ax = self.axes
        self.top, self.steps = top, list(steps)
        y = np.arange(len(self.steps))
        self.bars = funnel_ax.barh(y, np.ones(len(y)), color=COLORS["anchor"])
        self.bar_labels = [funnel_ax.annotate("", xy=(1, v), xytext=(3, 0), textcoords="offset points", va="center",
                                              fontsize=8) for v in y]
        funnel_ax.set_yticks(y, labels=self.steps)
        funnel_ax.invert_yaxis()
        funnel_ax.set_xscale("log")
        funnel_ax.set_xlabel("boxes left (log scale)")
        funnel_ax.set_ylabel("step")
        funnel_ax.set_title("boxes after each step")
        self.image = _Image(ax)
        self.image.show(image)
        self.image.fit()
        self.proposals = _boxes(ax, COLORS["prediction"], 1.2)
        gt = boxes_numpy(gt_boxes, "gt_boxes") if gt_boxes is not None else np.zeros((0, 4))
        self.gt = _boxes(ax, COLORS["gt"], 2, outline=True, zorder=3)
        self.gt.set_segments(box_segments(gt))
        self.legend = ax.legend([_handle(COLORS["prediction"], 1.2), _handle(COLORS["gt"], 2, outline=True)],
                                ["proposals", "ground truth"], loc="upper center", bbox_to_anchor=(0.5, -0.16),
                                ncol=2, fontsize=7, frameon=False)
        self.fig.suptitle("the proposal layer, step by step")
        for artist in (*self.bars, *self.bar_labels, self.proposals, self.gt, self.legend, ax.title):
            self.moving(artist)

    def update(self, counts: Mapping[str, int], boxes: Any, scores: Any) -> None:
        """``counts``: boxes after each step; ``boxes: (P, 4)``, ``scores: (P,)`` the proposals."""
        funnel_ax, ax = self.axes
        values = [int(counts[n]) for n in self.steps]
        for bar, label, v in zip(self.bars, self.bar_labels, values):
            bar.set_width(max(v, 0.8))
            label.xy = (max(v, 0.8), label.xy[1])
            label.set_text(str(v))
        funnel_ax.set_xlim(0.7, max(values + [1]) * 4)
        p = boxes_numpy(boxes, "proposals")
        order = np.argsort(-as_numpy(scores).reshape(-1), kind="stable")[:self.top]
        self.proposals.set_segments(box_segments(p[order]))
        n = len(order)
        self.proposals.set_colors([to_rgba(COLORS["prediction"], max(0.25, 1 - r / max(1, n))) for r in range(n)]
                                  or [COLORS["prediction"]])
        self.legend.get_texts()[0].set_text(f"top {n} of {p.shape[0]} proposals")
        ax.set_title(f"proposals: best {n} of {p.shape[0]}")


def png_output(png: bytes, title: str) -> dict:
    """One ``display_data`` output holding ``png`` (for ``Output.outputs``)."""
    import base64

    return {"output_type": "display_data", "metadata": {},
            "data": {"image/png": base64.b64encode(png).decode("ascii"), "text/plain": f"<figure: {title}>"}}


__all__ += ["png_output"]
