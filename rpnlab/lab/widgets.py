"""ipywidgets explorers: controls wired to the pure functions of ``rpnlab.lab.anchors`` and ``rpnlab.lab.figures``.

Nothing is computed here that the package does not also offer as a plain function; an explorer
only reads its controls, calls those functions and shows the figure. Each returns an
``Explorer``:

- ``.widget``: the ``VBox`` to display (displaying the explorer itself works too);
- ``.controls``: name -> widget, so code and tests can set values (``controls["stride"].value = 8``);
- ``.update()``: the callback every control triggers; returns ``.last_result``;
- ``.view``: the kept figure (``rpnlab.lab.views``; ``.view.fig`` is the matplotlib ``Figure``);
- ``.last_result``: what the last update computed (counts, coverage, ``seconds`` for the
  computation, ``render_seconds`` and ``render_cpu_seconds`` for drawing the figure and encoding
  it as PNG, wall clock and process CPU time).

Each explorer keeps one figure (``rpnlab.lab.views``) and a change only gives its artists new
data, so that a change shows its figure within 150 ms on a laptop CPU
(``benchmarks/bench_explorers.py`` measures it). The figure is encoded to PNG and placed in the
``Output`` widget's outputs directly, which works the same in JupyterLab, in a headless run and
in a test without a kernel.
"""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import ipywidgets as W
import torch

from rpnlab.detector.anchors import AnchorGenerator
from rpnlab.detector.boxes import BoxCoder, box_iou
from rpnlab.detector.matching import Matcher, label_anchors
from rpnlab.lab.anchors import anchor_coverage, default_feature_sizes
from rpnlab.lab.matching import label_counts
from rpnlab.lab.views import (
    AnchorView,
    BoxCodingView,
    DatasetView,
    KeptFigure,
    MatchingView,
    ProposalView,
    png_output,
)

__all__ = [
    "Explorer",
    "anchor_explorer",
    "box_coding_explorer",
    "dataset_browser",
    "matching_explorer",
    "show_figure",
]


@dataclass
class Explorer:
    """A displayed set of controls and the figure and numbers they drive (see the module docstring)."""

    widget: W.VBox
    controls: dict[str, W.Widget]
    output: W.Output
    status: W.HTML
    update: Callable[[], dict[str, Any]] = field(repr=False)
    last_result: dict[str, Any] = field(default_factory=dict)
    view: KeptFigure | None = field(default=None, repr=False)  # the kept figure (None: render=False)

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)


def show_figure(output: W.Output, fig, dpi: int = 80) -> float:
    """Replace ``output``'s content with ``fig`` as a PNG; returns the seconds spent encoding.

    The figure is a pyplot-free ``Figure`` (``rpnlab.lab.figures``), so nothing needs closing.
    """
    start = time.perf_counter()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    png = base64.b64encode(buffer.getvalue()).decode("ascii")
    title = fig.axes[0].get_title() if fig.axes else "figure"
    output.outputs = (
        {"output_type": "display_data", "data": {"image/png": png, "text/plain": f"<figure: {title}>"}, "metadata": {}},
    )
    return time.perf_counter() - start


# Labels wide enough to read ("pre-NMS top-k", not "pre-NMS t..."); sliders update when released,
# not at every pixel of a drag (the debounce: one figure per decision, not twenty).
_STYLE = {"description_width": "initial"}


def _styled(control: W.Widget) -> W.Widget:
    control.style = _STYLE
    if hasattr(control, "continuous_update"):
        control.continuous_update = False
    return control


def _draw(output: W.Output, view: KeptFigure, draw: Callable[[], None], result: dict[str, Any]) -> None:
    """``draw()`` gives the kept figure's artists their new data; its PNG replaces ``output``'s content.

    Records ``render_seconds`` (wall) and ``render_cpu_seconds`` (process CPU) in ``result``.
    """
    wall, cpu = time.perf_counter(), time.process_time()
    draw()
    output.outputs = (png_output(view.png(), view.title),)
    result["render_seconds"] = time.perf_counter() - wall
    result["render_cpu_seconds"] = time.process_time() - cpu


def _status_html(lines: Sequence[str]) -> str:
    return "<br>".join(lines)


def _anchors_for(sizes, ratios, stride: int, image_size: tuple[int, int]) -> tuple[AnchorGenerator, torch.Tensor]:
    generator = AnchorGenerator(sizes=tuple(sizes), aspect_ratios=tuple(ratios), strides=(int(stride),), cache=False)
    return generator, generator(default_feature_sizes(image_size, [int(stride)]))


def _explorer(controls: dict[str, W.Widget], layout: W.Widget, output: W.Output, status: W.HTML,
              update: Callable[[], dict[str, Any]], result: dict[str, Any], view: KeptFigure | None) -> Explorer:
    for control in controls.values():
        _styled(control)
    box = W.VBox([layout, status, output])
    explorer = Explorer(widget=box, controls=controls, output=output, status=status, update=update,
                        last_result=result, view=view)
    update()
    return explorer


# --------------------------------------------------------------------------- 00: data


def dataset_browser(dataset, index: int = 0, render: bool = True) -> Explorer:
    """An image slider over a detection dataset, each image drawn with its boxes (``draw_boxes``)."""
    if len(dataset) == 0:
        raise ValueError("dataset is empty: nothing to browse")
    controls = {"index": W.IntSlider(value=index, min=0, max=len(dataset) - 1, description="image")}
    output, status = W.Output(), W.HTML()
    result: dict[str, Any] = {}
    names = getattr(dataset, "classes", None)
    view = DatasetView(names) if render else None

    def update() -> dict[str, Any]:
        start = time.perf_counter()
        i = controls["index"].value
        image, target = dataset[i]
        labels = target.get("labels")
        seconds = time.perf_counter() - start
        result.clear()
        result.update(index=i, num_boxes=len(target["boxes"]), seconds=seconds, render_seconds=0.0, render_cpu_seconds=0.0,
                      labels=[] if labels is None else [int(v) for v in labels])
        if view is not None:
            _draw(output, view, lambda: view.update(image, target["boxes"], labels,
                                                    title=f"image {i}: {result['num_boxes']} objects"), result)
        classes = [names[v - 1] if names else str(v) for v in result["labels"]]
        status.value = f"image {i}: {', '.join(classes) or 'no objects'}"
        return result

    controls["index"].observe(lambda _change: update(), names="value")
    return _explorer(controls, controls["index"], output, status, update, result, view)


# --------------------------------------------------------------------------- 01: anchors


def anchor_explorer(
    dataset,
    sizes: Sequence[float] = (16, 32, 64, 128),
    ratios: Sequence[float] = (0.5, 1.0, 2.0),
    stride: int = 16,
    index: int = 0,
    size_options: Sequence[float] = (8, 16, 24, 32, 48, 64, 96, 128, 256),
    ratio_options: Sequence[float] = (0.25, 0.33, 0.5, 1.0, 2.0, 3.0, 4.0),
    stride_options: Sequence[int] = (4, 8, 16, 32),
    thresholds: Sequence[float] = (0.5, 0.7),
    max_images: int | None = None,
    render: bool = True,
) -> Explorer:
    """Sizes, ratios and stride -> anchors on one image and the coverage of every gt box.

    Coverage (``rpnlab.lab.anchors.anchor_coverage``) is each gt box's best IoU over the anchors
    of its image, over the first ``max_images`` images of ``dataset`` (default all); the status
    line gives the mean and the share of boxes at or above each threshold.
    """
    n = len(dataset) if max_images is None else min(len(dataset), max_images)
    if n == 0:
        raise ValueError("dataset is empty: nothing to explore")
    # Read every target once; images of the same size share one anchor grid, so group by size.
    image_sizes, by_size = [], {}
    for i in range(n):
        image, target = dataset[i]
        image_sizes.append(tuple(image.shape[-2:]))
        by_size.setdefault(image_sizes[-1], []).append(target["boxes"].reshape(-1, 4))
    gt_by_size = {size: torch.cat(parts) for size, parts in by_size.items()}

    size_list = sorted(set(size_options) | set(sizes))
    ratio_list = sorted(set(ratio_options) | set(ratios))
    controls = {
        # One row per option: a list that scrolls hides selected entries.
        "sizes": W.SelectMultiple(options=size_list, value=tuple(sizes), description="sizes", rows=len(size_list)),
        "ratios": W.SelectMultiple(options=ratio_list, value=tuple(ratios), description="ratios (h/w)",
                                   rows=len(ratio_list)),
        "stride": W.Dropdown(options=sorted(set(stride_options) | {stride}), value=stride, description="stride"),
        "index": W.IntSlider(value=index, min=0, max=len(image_sizes) - 1, description="image"),
    }
    output, status = W.Output(), W.HTML()
    result: dict[str, Any] = {}
    # The dataset coverage depends on sizes, ratios and stride, not on the image shown: moving
    # the image slider reuses it (it is the slow part, every gt box of every image). A box's best
    # IoU over a union of anchor sets is the max of its best IoU over each set, so the cache holds
    # one (size, ratio, stride) pair at a time and a toggled size or ratio costs one max.
    pair_cache: dict[tuple, tuple[torch.Tensor, dict]] = {}
    view = AnchorView(thresholds) if render else None

    def pair_coverage(size_v, ratio_v, stride_v):
        key = (size_v, ratio_v, stride_v)
        if key not in pair_cache:
            best, num_anchors = [], {}
            for size, gt in gt_by_size.items():
                _, anchors = _anchors_for([size_v], [ratio_v], stride_v, size)
                num_anchors[size] = anchors.shape[0]
                best.append(anchor_coverage(anchors, gt, thresholds)["best_iou"])
            if len(pair_cache) > 256:
                pair_cache.clear()
            pair_cache[key] = (torch.cat(best), num_anchors)
        return pair_cache[key]

    last: dict[tuple, tuple[torch.Tensor, dict]] = {}

    def coverage(sel_sizes, sel_ratios, stride_v):
        key = (tuple(sel_sizes), tuple(sel_ratios), stride_v)
        if key not in last:
            pairs = [pair_coverage(s, r, stride_v) for s in sel_sizes for r in sel_ratios]
            best = torch.stack([b for b, _ in pairs]).amax(dim=0)
            last.clear()
            last[key] = (best, {size: sum(n[size] for _, n in pairs) for size in gt_by_size})
        return last[key]

    def update() -> dict[str, Any]:
        sel_sizes, sel_ratios = controls["sizes"].value, controls["ratios"].value
        stride_v, i = controls["stride"].value, controls["index"].value
        if not sel_sizes or not sel_ratios:
            status.value = "<b>select at least one size and one ratio</b>"
            return result
        start = time.perf_counter()
        best_iou, num_anchors = coverage(sel_sizes, sel_ratios, stride_v)
        # Summaries over all boxes (per-size groups merged): the mean and the share above each t.
        mean_best = float(best_iou.mean()) if best_iou.numel() else float("nan")
        covered = {float(t): float((best_iou >= t).float().mean()) if best_iou.numel() else float("nan")
                   for t in thresholds}
        seconds = time.perf_counter() - start
        result.clear()
        result.update(
            sizes=tuple(sel_sizes), ratios=tuple(sel_ratios), stride=stride_v, index=i,
            k=len(sel_sizes) * len(sel_ratios), num_anchors=num_anchors[image_sizes[i]],
            num_gt=int(best_iou.numel()), best_iou=best_iou, mean_best_iou=mean_best,
            covered=covered, seconds=seconds, render_seconds=0.0, render_cpu_seconds=0.0,
        )
        if view is not None:
            def draw() -> None:
                image, target = dataset[i]
                _, anchors = _anchors_for(sel_sizes, sel_ratios, stride_v, image_sizes[i])
                view.update(image, anchors, stride_v, target["boxes"], best_iou,
                            title=f"image {i}: {anchors.shape[0]} anchors, k = {result['k']}")

            _draw(output, view, draw, result)
        shares = ", ".join(f"IoU &ge; {t:g}: {c:.0%}" for t, c in result["covered"].items())
        status.value = _status_html([
            f"k = {result['k']} anchors per location, {result['num_anchors']} anchors on this image",
            f"coverage of {result['num_gt']} gt boxes: mean best IoU {result['mean_best_iou']:.3f}; {shares}",
            f"update {1000 * seconds:.0f} ms (+ figure {1000 * result['render_seconds']:.0f} ms)",
        ])
        return result

    for control in controls.values():
        control.observe(lambda _change: update(), names="value")
    layout = W.HBox([controls["sizes"], controls["ratios"], W.VBox([controls["stride"], controls["index"]])])
    return _explorer(controls, layout, output, status, update, result, view)


# --------------------------------------------------------------------------- 02: box coding


def box_coding_explorer(anchor, gt, weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0), limit: float = 2.0,
                        render: bool = True) -> Explorer:
    """Sliders for ``(tx, ty, tw, th)`` applied to ``anchor: (4,)``; shows the decoded box, the
    ``gt: (4,)`` box and their IoU, with the offsets that would reach the gt exactly."""
    coder = BoxCoder(weights=tuple(weights))
    anchor = torch.as_tensor(anchor, dtype=torch.float64).reshape(1, 4)
    gt = torch.as_tensor(gt, dtype=torch.float64).reshape(1, 4)
    target = coder.encode(anchor, gt)[0]
    controls = {name: W.FloatSlider(value=0.0, min=-limit, max=limit, step=0.01, description=name)
                for name in ("tx", "ty", "tw", "th")}
    output, status = W.Output(), W.HTML()
    result: dict[str, Any] = {}
    view = BoxCodingView(anchor[0], gt[0]) if render else None

    def update() -> dict[str, Any]:
        start = time.perf_counter()
        deltas = torch.tensor([[controls[n].value for n in ("tx", "ty", "tw", "th")]], dtype=torch.float64)
        decoded = coder.decode(deltas, anchor)
        iou = float(box_iou(decoded, gt)[0, 0])
        seconds = time.perf_counter() - start
        result.clear()
        result.update(deltas=deltas[0].tolist(), decoded=decoded[0].tolist(), iou=iou, target=target.tolist(),
                      seconds=seconds, render_seconds=0.0, render_cpu_seconds=0.0)
        if view is not None:
            _draw(output, view, lambda: view.update(result["deltas"], result["decoded"],
                                                    title=f"decoded box: IoU {iou:.3f} with the gt box"), result)
        aim = ", ".join(f"{n} = {v:+.3f}" for n, v in zip(("tx", "ty", "tw", "th"), target.tolist()))
        status.value = f"IoU with the gt box: {iou:.3f}. The exact offsets: {aim}"
        return result

    for control in controls.values():
        control.observe(lambda _change: update(), names="value")
    layout = W.HBox([W.VBox([controls["tx"], controls["ty"]]), W.VBox([controls["tw"], controls["th"]])])
    return _explorer(controls, layout, output, status, update, result, view)


# --------------------------------------------------------------------------- 03: matching


def matching_explorer(
    dataset,
    sizes: Sequence[float] = (16, 32, 64, 128),
    ratios: Sequence[float] = (0.5, 1.0, 2.0),
    stride: int = 16,
    index: int = 0,
    high_threshold: float = 0.7,
    low_threshold: float = 0.3,
    allow_low_quality_matches: bool = True,
    render: bool = True,
) -> Explorer:
    """IoU thresholds and the low-quality rule -> positive / negative / ignored anchors of one image.

    Labels come from ``rpnlab.detector.matching.label_anchors`` with a ``Matcher`` built from the controls;
    the status line counts each kind and the gt boxes left without any positive anchor.
    The low threshold is kept at or below the high one (moving one past the other drags it along).
    """
    controls = {
        "high": W.FloatSlider(value=high_threshold, min=0.0, max=1.0, step=0.05, description="high IoU"),
        "low": W.FloatSlider(value=low_threshold, min=0.0, max=1.0, step=0.05, description="low IoU"),
        "low_quality": W.Checkbox(value=allow_low_quality_matches, description="low-quality matches"),
        "index": W.IntSlider(value=index, min=0, max=len(dataset) - 1, description="image"),
    }
    output, status = W.Output(), W.HTML()
    result: dict[str, Any] = {}
    image_cache: dict[int, tuple] = {}  # index -> image, gt, anchors, each anchor's best IoU
    view = MatchingView() if render else None

    def image_data(i: int):
        if i not in image_cache:
            image, target = dataset[i]
            gt = target["boxes"]
            _, anchors = _anchors_for(sizes, ratios, stride, tuple(image.shape[-2:]))
            best = box_iou(gt, anchors).amax(dim=0) if gt.shape[0] else anchors.new_zeros(anchors.shape[0])
            image_cache.clear()  # one image at a time: the thresholds move far more often
            image_cache[i] = (image, gt, anchors, best)
        return image_cache[i]

    def update() -> dict[str, Any]:
        high, low = controls["high"].value, controls["low"].value
        i = controls["index"].value
        start = time.perf_counter()
        image, gt, anchors, best_iou = image_data(i)
        matcher = Matcher(high, low, allow_low_quality_matches=controls["low_quality"].value)
        labels, _ = label_anchors(anchors, gt, matcher)
        matched = matcher.match_boxes(gt, anchors)
        counts = label_counts(labels)
        covered_gt = torch.unique(matched[labels == 1]).numel()
        seconds = time.perf_counter() - start
        result.clear()
        result.update(high=high, low=low, allow_low_quality_matches=controls["low_quality"].value, index=i,
                      num_anchors=anchors.shape[0], num_gt=gt.shape[0], labels=labels,
                      gt_without_positive=gt.shape[0] - covered_gt, seconds=seconds, render_seconds=0.0, render_cpu_seconds=0.0, **counts)
        if view is not None:
            def draw() -> None:
                view.show_image(i, image, gt, best_iou)  # nothing to do while only the thresholds move
                view.update(anchors, labels, low, high)

            _draw(output, view, draw, result)
        status.value = _status_html([
            (f"{counts['positive']} positive, {counts['negative']} negative, {counts['ignored']} ignored "
            f"of {anchors.shape[0]} anchors; gt boxes without a positive anchor: {result['gt_without_positive']}"
            f" of {gt.shape[0]}"),
            f"update {1000 * seconds:.0f} ms (+ figure {1000 * result['render_seconds']:.0f} ms)",
        ])
        return result

    def on_high(change) -> None:
        if controls["low"].value > change["new"]:
            controls["low"].value = change["new"]  # triggers its own update
        else:
            update()

    def on_low(change) -> None:
        if controls["high"].value < change["new"]:
            controls["high"].value = change["new"]
        else:
            update()

    controls["high"].observe(on_high, names="value")
    controls["low"].observe(on_low, names="value")
    controls["low_quality"].observe(lambda _change: update(), names="value")
    controls["index"].observe(lambda _change: update(), names="value")
    layout = W.HBox([W.VBox([controls["high"], controls["low"]]), W.VBox([controls["low_quality"], controls["index"]])])
    return _explorer(controls, layout, output, status, update, result, view)


# --------------------------------------------------------------------------- 05: proposals
# (appended for notebook 05; imports stay inside the function)


def proposal_explorer(
    image,
    anchors,
    objectness,
    deltas,
    gt_boxes=None,
    pre_nms_top_n: int = 600,
    post_nms_top_n: int = 100,
    nms_thresh: float = 0.7,
    min_size: float = 0.0,
    box_coder=None,
    top: int = 20,
    render: bool = True,
) -> Explorer:
    """Pre-NMS top-k, post-NMS top-n, NMS threshold and minimum size -> the proposals of one image.

    A thin layer over ``rpnlab.lab.proposals.proposal_funnel`` (the offsets are decoded once,
    at creation) and ``plot_proposal_steps``. Args: ``anchors (A, 4)``, ``objectness (A,)``
    logits and ``deltas (A, 4)`` of one image (e.g. from ``proposal_analysis.rpn_outputs``),
    ``gt_boxes (M, 4)`` drawn for reference, ``top`` proposals drawn. ``last_result`` holds
    ``counts`` (boxes after each step), ``num_proposals``, the settings, ``seconds`` and
    ``render_seconds``.
    """
    from rpnlab.lab.proposals import FUNNEL_STEPS, proposal_funnel

    num_anchors = int(anchors.shape[0])
    if num_anchors == 0:
        raise ValueError("anchors is empty: nothing to propose")
    decoded = proposal_funnel(anchors, objectness, deltas, tuple(image.shape[-2:]), box_coder=box_coder)["decoded"]
    controls = {
        "pre_nms_top_n": W.IntSlider(value=min(pre_nms_top_n, num_anchors), min=1, max=num_anchors,
                                     description="pre-NMS top-k"),
        "post_nms_top_n": W.IntSlider(value=min(post_nms_top_n, num_anchors), min=1, max=num_anchors,
                                      description="post-NMS top-n"),
        "nms_thresh": W.FloatSlider(value=nms_thresh, min=0.05, max=1.0, step=0.05, description="NMS IoU"),
        "min_size": W.FloatSlider(value=min_size, min=0.0, max=32.0, step=1.0, description="min size (px)"),
    }
    output, status = W.Output(), W.HTML()
    result: dict[str, Any] = {}
    view = ProposalView(image, gt_boxes, FUNNEL_STEPS, top=top) if render else None

    def update() -> dict[str, Any]:
        settings = {name: control.value for name, control in controls.items()}
        start = time.perf_counter()
        funnel = proposal_funnel(anchors, objectness, None, tuple(image.shape[-2:]), decoded=decoded, **settings)
        seconds = time.perf_counter() - start
        result.clear()
        result.update(settings, counts=funnel["counts"], num_proposals=int(funnel["boxes"].shape[0]),
                      boxes=funnel["boxes"], scores=funnel["scores"], seconds=seconds, render_seconds=0.0, render_cpu_seconds=0.0)
        if view is not None:
            _draw(output, view, lambda: view.update(funnel["counts"], funnel["boxes"], funnel["scores"]), result)
        chain = " &rarr; ".join(f"{n} {name}" for name, n in funnel["counts"].items())
        status.value = _status_html([
            chain,
            f"update {1000 * seconds:.1f} ms (+ figure {1000 * result['render_seconds']:.0f} ms)",
        ])
        return result

    def on_pre(change) -> None:
        # NMS only removes boxes: keeping more after it than went in means nothing. Lowering the
        # post-NMS maximum clamps its value, which triggers its own update.
        post = controls["post_nms_top_n"]
        if post.value > change["new"]:
            post.max = change["new"]
        else:
            post.max = change["new"]
            update()

    controls["post_nms_top_n"].max = controls["pre_nms_top_n"].value
    controls["pre_nms_top_n"].observe(on_pre, names="value")
    for name in ("post_nms_top_n", "nms_thresh", "min_size"):
        controls[name].observe(lambda _change: update(), names="value")
    layout = W.HBox([W.VBox([controls["pre_nms_top_n"], controls["post_nms_top_n"]]),
                     W.VBox([controls["nms_thresh"], controls["min_size"]])])
    return _explorer(controls, layout, output, status, update, result, view)


__all__ += ["proposal_explorer"]
