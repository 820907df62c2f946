"""The Feature Pyramid Network's RPN, level by level, and its checks against torchvision (notebook 10).

FPN (Lin et al. 2017) gives the RPN several feature maps, strides 4 to 64, and torchvision's
Faster R-CNN puts one anchor size on each (32 px on stride 4 up to 512 px on stride 64). The
pieces are rpnlab's detector (``AnchorGenerator`` over several levels, one ``RPNHead`` shared by
all levels, ``ProposalLayer``'s top-k and NMS per level, ``RoIPooler``'s level rule); this module
measures what each does level by level, draws it, and compares it with torchvision's:

- ``pyramid_levels``: per level its stride, feature size, anchor sizes and how many anchors;
- ``top_k_by_level``: per level, what a per-level top-k keeps against one global top-k;
- ``nms_by_level``: per level, what NMS per level keeps against one NMS over all levels;
- ``check_*``: the same anchors, head outputs, proposals, RoI levels and pooled features as
  torchvision's ``AnchorGenerator``, ``RPNHead``, ``RegionProposalNetwork``, ``LevelMapper`` and
  ``MultiScaleRoIAlign``, on the same features;
- ``plot_pyramid_anchors``, ``plot_level_counts``, ``plot_proposals_by_level``,
  ``plot_level_assignment``: the figures; ``top_k_explorer``: a slider over ``top_k_by_level``.

Levels are in the backbone's order, finest first (torchvision's ``"0"`` .. ``"3"``, ``"pool"``).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import NullFormatter
from torch import Tensor

from rpnlab.detector.proposals import batched_nms, nms
from rpnlab.detector.roi import fpn_level_of_boxes
from rpnlab.lab.figures import add_box, as_numpy, boxes_numpy, new_figure, show_image

__all__ = [
    "FPN_DETECTORS",
    "LEVEL_COLORS",
    "check_anchors",
    "check_image_size",
    "check_level_assignment",
    "check_proposals",
    "check_roi_pooling",
    "check_shared_head",
    "fpn_departures",
    "level_of_anchors",
    "nms_by_level",
    "open_fpn_detector",
    "plot_level_assignment",
    "plot_level_counts",
    "plot_proposals_by_level",
    "plot_pyramid_anchors",
    "pyramid_levels",
    "top_k_by_level",
    "top_k_explorer",
]

# torchvision's detectors with the classic pyramid: P2-P6, strides 4-64, one anchor size per level.
FPN_DETECTORS = ("fasterrcnn_resnet50_fpn", "fasterrcnn_resnet50_fpn_v2")
LEVEL_COLORS = ["tab:red", "tab:orange", "tab:green", "tab:blue", "tab:purple", "tab:brown"]
_LARGEST_STRIDE = 64  # torchvision's anchor strides equal the true ones when sides divide by this


def check_image_size(image_size: int) -> int:
    """``image_size`` if it is a positive multiple of 64, else a ``ValueError`` naming it.

    torchvision computes each level's anchor stride as ``image side // feature side``; the
    max-pooled stride-64 level rounds up, so only sides that 64 divides give the true strides
    (``rpnlab.detector.torchvision_models``) and let the checks compare like with like.
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0 \
            or image_size % _LARGEST_STRIDE:
        raise ValueError(f"image_size={image_size!r} must be a positive multiple of {_LARGEST_STRIDE} "
                         f"(e.g. 256 or 512), so that every pyramid level's stride divides it")
    return image_size


def open_fpn_detector(name: str, weights: str = "auto") -> tuple[Any, Any, str]:
    """``(rpnlab model, torchvision model, what weights)`` for one of ``FPN_DETECTORS``, eval mode.

    As ``rpnlab.lab.inside.open_torchvision_detector`` (``weights``: ``"auto"``, ``"coco"`` or
    ``"random"``; nothing is downloaded), limited to the models whose levels have one anchor size
    each (the MobileNet ones put all five sizes on every level).
    """
    from rpnlab.lab.inside import open_torchvision_detector

    if name not in FPN_DETECTORS:
        raise ValueError(f"model_name={name!r} is not one of the FPN detectors this notebook opens: "
                         f"{', '.join(FPN_DETECTORS)}")
    return open_torchvision_detector(name, weights)


def fpn_departures(course, anchor_config, image_size: int, model_name: str) -> list[str]:
    """The lines of the notebook's "this departs from the course setup" cell.

    ``course``: ``rpnlab.lab.course.CourseSetup``; ``anchor_config``: the FPN model's
    ``AnchorConfig`` (``model.config.anchors``).
    """
    sizes = [[int(s) for s in level] for level in anchor_config.sizes]
    strides = list(anchor_config.strides)
    course_sizes = [int(s) for s in course.anchor_sizes]
    return [
        f"model: torchvision's {model_name} (a ResNet with an FPN), not the course's small backbone",
        f"feature levels: {len(strides)} (strides {strides}) instead of the course's one (stride {course.anchor_stride})",
        f"anchor sizes: {sizes} px, one list per level, instead of {course_sizes} px on one level",
        f"anchor offset: {anchor_config.offset:g} (torchvision's) instead of the course's {course.anchor_offset:g}",
        (f"images: the course's 128 x 128 synthetic images resized to {image_size} x {image_size}, so that "
         f"objects span the pyramid's anchor sizes"),
    ]


def pyramid_levels(anchor_generator, features: Sequence[Tensor], names: Sequence[str] | None = None) -> list[dict]:
    """One dict per level: ``name, level, stride, feature (H, W), sizes, ratios, k, anchors, share``.

    ``name`` is the backbone's key (torchvision's ``"0"``, ..., ``"pool"``), ``level`` FPN's
    ``"P<log2 stride>"`` (``"P2"`` for stride 4).

    ``anchor_generator``: rpnlab's ``AnchorGenerator``; ``features``: per level ``(B, C, H_l, W_l)``.
    ``anchors`` counts one image's anchors on that level (``H_l * W_l * k_l``), ``share`` its
    fraction of all levels'.
    """
    sizes = [tuple(int(v) for v in f.shape[-2:]) for f in features]
    counts = anchor_generator.num_anchors_per_level(sizes)
    ks = anchor_generator.num_anchors_per_location()
    names = list(names) if names is not None else [str(i) for i in range(len(features))]
    total = sum(counts)
    return [
        {"name": name, "level": f"P{round(math.log2(stride))}", "stride": int(stride), "feature": size,
         "sizes": [int(s) for s in level_sizes], "ratios": [float(r) for r in ratios], "k": k, "anchors": n,
         "share": n / total}
        for name, stride, size, level_sizes, ratios, k, n in zip(
            names, anchor_generator.strides, sizes, anchor_generator.sizes, anchor_generator.aspect_ratios, ks, counts)
    ]


def level_of_anchors(num_anchors_per_level: Sequence[int], device=None) -> Tensor:
    """``(A,)`` int64: the level of every anchor of the concatenated list."""
    counts = torch.as_tensor(list(num_anchors_per_level), dtype=torch.int64)
    return torch.repeat_interleave(torch.arange(len(counts)), counts).to(device)


def _count_levels(levels: Tensor, num_levels: int) -> list[int]:
    return torch.bincount(levels.cpu(), minlength=num_levels).tolist()


def top_k_by_level(objectness: Tensor, num_anchors_per_level: Sequence[int], k: int) -> dict[str, list[int]]:
    """Anchors per level that a per-level top-k keeps, against a global top-k of the same total.

    ``objectness: (A,)`` logits of one image. Returns ``anchors`` (per level), ``per-level top-k``
    (``min(k, A_l)`` each) and ``global top-k`` (the best ``sum_l min(k, A_l)`` anchors over all
    levels at once, counted by level).
    """
    if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
        raise ValueError(f"k must be a positive int, got {k!r}")
    counts = [int(n) for n in num_anchors_per_level]
    if objectness.dim() != 1 or objectness.numel() != sum(counts):
        raise ValueError(f"objectness must be one image's (A,) logits with A = {sum(counts)}, "
                         f"got shape {tuple(objectness.shape)}")
    per_level = [min(k, n) for n in counts]
    best = objectness.detach().topk(sum(per_level)).indices
    level = level_of_anchors(counts, objectness.device)
    return {"anchors": counts, "per-level top-k": per_level,
            "global top-k": _count_levels(level[best], len(counts))}


def nms_by_level(boxes: Tensor, scores: Tensor, levels: Tensor, num_levels: int,
                 iou_threshold: float, post_nms_top_n: int) -> dict[str, list[int]]:
    """Boxes per level that NMS keeps when run per level (FPN's) against over all levels at once.

    ``boxes: (N, 4)``, ``scores: (N,)``, ``levels: (N,)``: one image's NMS input (the proposal
    layer's ``pre_nms_*``). Returns per level ``NMS input``, and the boxes each NMS keeps among
    the ``post_nms_top_n`` best survivors (the proposals): ``NMS per level`` and ``NMS across levels``.
    """
    per_level = batched_nms(boxes, scores, levels, iou_threshold)[:post_nms_top_n]
    across = nms(boxes, scores, iou_threshold)[:post_nms_top_n]
    return {
        "NMS input": _count_levels(levels, num_levels),
        "NMS per level": _count_levels(levels[per_level], num_levels),
        "NMS across levels": _count_levels(levels[across], num_levels),
    }


# ----------------------------------------------------------------------------- against torchvision


def _image_list(images: Tensor, image_sizes: Sequence[tuple[int, int]]):
    from torchvision.models.detection.image_list import ImageList

    return ImageList(images, [tuple(int(v) for v in s) for s in image_sizes])


def check_anchors(tv_anchor_generator, images: Tensor, image_sizes, features: Sequence[Tensor],
                  anchors: Tensor) -> dict[str, Any]:
    """rpnlab's ``anchors (A, 4)`` against torchvision's ``AnchorGenerator`` on the same batch.

    ``images: (B, 3, H, W)`` the padded batch (only its size matters to torchvision). Returns
    ``equal`` (bit for bit, every image) and ``max_diff`` (pixels).
    """
    theirs = tv_anchor_generator(_image_list(images, image_sizes), list(features))
    same_shape = all(t.shape == anchors.shape for t in theirs)
    diff = max(float((t - anchors).abs().max()) for t in theirs) if same_shape and anchors.numel() else math.inf
    return {"equal": same_shape and all(torch.equal(t, anchors) for t in theirs), "max_diff": diff,
            "num_anchors": int(anchors.shape[0])}


def check_shared_head(head, tv_head, features: Sequence[Tensor]) -> dict[str, Any]:
    """rpnlab's ``RPNHead`` against torchvision's, level by level: the same weights on every level.

    Returns ``max_diff`` per level (objectness and deltas together), ``parameters`` of the one
    shared head and ``parameters_if_one_per_level`` (what a separate head per level would hold).
    """
    with torch.no_grad():
        ours = head(list(features))
        theirs = tv_head(list(features))
    diffs = [max(float((o - o_tv).abs().max()), float((d - d_tv).abs().max()))
             for o, d, o_tv, d_tv in zip(ours[0], ours[1], theirs[0], theirs[1])]
    params = sum(p.numel() for p in head.parameters())
    return {"max_diff": diffs, "parameters": params, "parameters_if_one_per_level": params * len(features),
            "shapes": [(tuple(o.shape[1:]), tuple(d.shape[1:])) for o, d in zip(*ours)]}


def check_proposals(tv_rpn, images: Tensor, image_sizes, features: Sequence[Tensor], names: Sequence[str],
                    proposals: Sequence[Tensor]) -> dict[str, Any]:
    """rpnlab's proposals (per image ``(P_i, 4)``) against torchvision's ``RegionProposalNetwork``
    in eval mode on the same features: ``same_count`` and ``max_diff`` (pixels)."""
    was_training = tv_rpn.training
    tv_rpn.eval()
    with torch.no_grad():
        theirs, _ = tv_rpn(_image_list(images, image_sizes), OrderedDict(zip(names, features)))
    tv_rpn.train(was_training)
    same = len(theirs) == len(proposals) and all(len(a) == len(b) for a, b in zip(theirs, proposals))
    diff = max((float((a - b).abs().max()) for a, b in zip(theirs, proposals) if len(a)), default=0.0) \
        if same else math.inf
    return {"same_count": same, "max_diff": diff,
            "counts": [len(p) for p in proposals], "torchvision_counts": [len(t) for t in theirs]}


def check_level_assignment(boxes: Tensor, k_min: int, k_max: int) -> dict[str, Any]:
    """``fpn_level_of_boxes`` against torchvision's ``LevelMapper`` on ``boxes: (K, 4)``."""
    from torchvision.ops.poolers import LevelMapper

    ours = fpn_level_of_boxes(boxes, k_min, k_max)
    theirs = LevelMapper(k_min, k_max)([boxes])
    return {"equal": torch.equal(ours, theirs), "counts": _count_levels(ours, k_max - k_min + 1)}


def check_roi_pooling(pooler, features: Sequence[Tensor], names: Sequence[str], boxes: Sequence[Tensor],
                      image_sizes, sampling_ratio: int = 2) -> dict[str, Any]:
    """rpnlab's ``RoIPooler`` over the FPN levels against torchvision's ``MultiScaleRoIAlign``.

    ``features``: the levels the pooler reads (``len(pooler.spatial_scales)`` of them);
    ``boxes``: per image ``(R_i, 4)``. Returns ``max_diff`` over every pooled value, ``rel_diff``
    (``max_diff`` over the largest pooled magnitude: float32 sums added in another order, as
    ``RoIPooler(implementation="auto")``'s matrix and sparse forms do, differ by a few 1e-7 of it)
    and ``shape``.
    """
    from torchvision.ops import MultiScaleRoIAlign

    tv_pool = MultiScaleRoIAlign(list(names), pooler.output_size, sampling_ratio)
    with torch.no_grad():
        ours = pooler(list(features), list(boxes))
        theirs = tv_pool(OrderedDict(zip(names, features)), list(boxes), [tuple(s) for s in image_sizes])
    same = ours.shape == theirs.shape
    max_diff = float((ours - theirs).abs().max()) if same and ours.numel() else (0.0 if same else math.inf)
    scale = float(theirs.abs().max()) if theirs.numel() else 0.0
    return {"max_diff": max_diff, "rel_diff": max_diff / scale if scale > 0 else max_diff, "shape": tuple(ours.shape)}


# ----------------------------------------------------------------------------- figures


def plot_pyramid_anchors(image: Any, levels: Sequence[Mapping[str, Any]], base_anchors: Sequence[Tensor],
                         title: str | None = None) -> Figure:
    """Left: each level's anchors at one location near the image centre, one colour per level,
    with that level's feature cell drawn as a filled square. Right: anchors per level (log scale).

    ``levels``: ``pyramid_levels(...)``; ``base_anchors``: per level ``(k_l, 4)`` anchors centred on 0.
    """
    fig, axes = new_figure(1, 2, (5.6, 4.6), gridspec_kw={"width_ratios": [1.3, 1.0]})
    ax, bars_ax = axes[0, 0], axes[0, 1]
    h, w = show_image(ax, image, fade=0.45)
    for i, (level, base) in enumerate(zip(levels, base_anchors)):
        colour = LEVEL_COLORS[i % len(LEVEL_COLORS)]
        stride = level["stride"]
        # the location nearest the centre on this level's grid (anchor offset 0: centres at j * stride)
        cx = round(w / 2 / stride) * stride
        cy = round(h / 2 / stride) * stride
        for j, box in enumerate(boxes_numpy(base)):
            add_box(ax, box + np.array([cx, cy, cx, cy]), colour, linewidth=1.3,
                    label=f"{level['level']}: stride {stride}, {level['sizes']} px" if j == 0 else None)
        ax.add_patch(Rectangle((cx - stride / 2, cy - stride / 2), stride, stride, color=colour, alpha=0.35))
    ax.set_xlim(-0.35 * w, 1.35 * w)
    ax.set_ylim(1.35 * h, -0.35 * h)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0), title="level", title_fontsize=8)
    ax.set_title("anchors of one location per level (filled: its feature cell)", fontsize=9)
    x = np.arange(len(levels))
    counts = [lv["anchors"] for lv in levels]
    bars = bars_ax.bar(x, counts, color=[LEVEL_COLORS[i % len(LEVEL_COLORS)] for i in range(len(levels))])
    bars_ax.bar_label(bars, labels=[f"{c:,}\n({lv['share']:.1%})" for c, lv in zip(counts, levels)], fontsize=7)
    bars_ax.set_yscale("log")
    bars_ax.set_ylim(top=max(counts) * 12)
    bars_ax.set_xticks(x, labels=[f"{lv['level']}\nstride {lv['stride']}\n{lv['feature'][0]}x{lv['feature'][1]}"
                                  for lv in levels], fontsize=8)
    bars_ax.set_ylabel("anchors per image (log scale)")
    bars_ax.set_title(f"{sum(counts):,} anchors on a {h} x {w} image", fontsize=9)
    fig.suptitle(title or "the pyramid's anchors", fontsize=10)
    return fig


def plot_proposals_by_level(image: Any, boxes: Tensor, scores: Tensor, levels: Tensor,
                            level_names: Sequence[str], per_level: int = 5, title: str | None = None) -> Figure:
    """The ``per_level`` best of one image's proposals on each level, one colour per level.

    ``boxes: (P, 4)``, ``scores: (P,)``, ``levels: (P,)`` index into ``level_names``.
    """
    fig, axes = new_figure(1, 1, (6.0, 5.0))
    ax = axes[0, 0]
    h, w = show_image(ax, image, fade=0.3)
    boxes, scores, levels = boxes.detach().cpu(), scores.detach().cpu(), levels.detach().cpu()
    for i, name in enumerate(level_names):
        idx = torch.where(levels == i)[0]
        idx = idx[scores[idx].argsort(descending=True)[:per_level]]
        for j, box in enumerate(boxes_numpy(boxes[idx])):
            add_box(ax, box, LEVEL_COLORS[i % len(LEVEL_COLORS)], linewidth=1.6,
                    label=f"{name}: {len(torch.where(levels == i)[0])} proposals" if j == 0 else None)
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0), title="level", title_fontsize=8)
    ax.set_title(title or f"the {per_level} best proposals of each level", fontsize=10)
    return fig


def plot_level_counts(counts: Mapping[str, Sequence[int]], level_names: Sequence[str], title: str | None = None,
                      y_label: str = "boxes", log: bool = True) -> Figure:
    """Grouped bars: for each level (x), one bar per entry of ``counts`` (``{name: per-level counts}``)."""
    if not counts:
        raise ValueError("counts is empty: nothing to draw")
    names = list(counts)
    for name in names:
        if len(counts[name]) != len(level_names):
            raise ValueError(f"counts[{name!r}] has {len(counts[name])} values for {len(level_names)} levels")
    fig, axes = new_figure(1, 1, (7.5, 3.8))
    ax = axes[0, 0]
    x = np.arange(len(level_names))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        values = np.asarray([int(v) for v in counts[name]])
        bars = ax.bar(x + (i - (len(names) - 1) / 2) * width, np.maximum(values, 0.8) if log else values,
                      width, label=name)
        ax.bar_label(bars, labels=[str(v) for v in values], fontsize=6, padding=1)
    top = max([max(int(v) for v in values) for values in counts.values()] + [1])
    if log:
        ax.set_yscale("log")
        ax.set_ylim(0.7, top * 4)  # fixed: 0 and 1 stay visible, and a widget can change heights in place
    else:
        ax.set_ylim(0, top * 1.15)
    ax.set_xticks(x, labels=list(level_names))
    ax.set_ylabel(y_label + (" (log scale)" if log else ""))
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title(title or "per level", fontsize=10)
    return fig


def plot_level_assignment(boxes: Tensor, k_min: int, k_max: int, canonical_scale: float = 224.0,
                          canonical_level: int = 4, title: str | None = None) -> Figure:
    """Histogram of the boxes' scale ``sqrt(wh)`` (log axis), coloured by the level FPN pools each from,
    with the level boundaries ``224 * 2^(k - 4)`` drawn."""
    boxes = boxes.detach().float().cpu()
    scale = as_numpy(torch.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])))
    level = as_numpy(fpn_level_of_boxes(boxes, k_min, k_max))
    fig, axes = new_figure(1, 1, (7.5, 3.6))
    ax = axes[0, 0]
    # bins of an eighth of an octave, aligned on the level boundaries 224 * 2^j
    lo, hi = (float(scale.min()), float(scale.max())) if scale.size else (16.0, 1024.0)
    steps = np.arange(math.floor(8 * math.log2(max(lo, 1.0) / canonical_scale)),
                      math.ceil(8 * math.log2(max(hi, 2.0) / canonical_scale)) + 1)
    edges = canonical_scale * 2.0 ** (steps / 8)
    stacks = [scale[level == i] for i in range(k_max - k_min + 1)]
    ax.hist(stacks, bins=edges, stacked=True, color=[LEVEL_COLORS[i % len(LEVEL_COLORS)] for i in range(len(stacks))],
            label=[f"P{k_min + i} (stride {2 ** (k_min + i)}): {len(s)}" for i, s in enumerate(stacks)])
    for k in range(k_min + 1, k_max + 1):
        edge = canonical_scale * 2.0 ** (k - canonical_level)
        if not edges[0] <= edge <= edges[-1]:
            continue
        ax.axvline(edge, color="black", linewidth=0.8, linestyle="--")
        ax.text(edge, 1.0, f" {edge:g} px", transform=ax.get_xaxis_transform(), fontsize=7, va="top")
    ax.set_xscale("log")
    ticks = [t for t in (16, 32, 64, 128, 256, 512, 1024) if edges[0] <= t <= edges[-1]]
    ax.set_xticks(ticks, labels=[str(t) for t in ticks])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("box scale sqrt(w * h) in pixels (log scale)")
    ax.set_ylabel("boxes")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0), title="pooled from", title_fontsize=8)
    ax.set_title(title or f"FPN's level of {len(scale)} boxes: k = floor({canonical_level} + log2(sqrt(wh) / "
                          f"{canonical_scale:g}))", fontsize=9)
    return fig


# ----------------------------------------------------------------------------- widget


def top_k_explorer(objectness: Mapping[str, Tensor], num_anchors_per_level: Sequence[int],
                   level_names: Sequence[str], k: int = 1000, render: bool = True):
    """A ``k`` slider and a choice of scores over ``top_k_by_level`` and ``plot_level_counts``.

    ``objectness``: ``{name: (A,) logits}`` (e.g. this model's and scores alike on every level).
    Returns an ``rpnlab.lab.widgets.Explorer``; ``last_result`` holds the counts and ``seconds``.
    """
    import time

    import ipywidgets as W

    from rpnlab.lab.widgets import Explorer, show_figure

    if not objectness:
        raise ValueError("objectness is empty: give at least one {name: (A,) logits}")
    counts = [int(n) for n in num_anchors_per_level]
    style = {"description_width": "initial"}
    controls = {
        "k": W.IntSlider(value=int(k), min=1, max=max(counts), step=1, description="top-k per level",
                         style=style, continuous_update=False),
        "scores": W.Dropdown(options=list(objectness), description="scores", style=style),
    }
    output, status = W.Output(), W.HTML()
    result: dict[str, Any] = {}
    shown = ("anchors", "per-level top-k", "global top-k")
    figure: list[Figure] = []  # drawn once, then its bars and labels change in place

    def draw(chosen: dict[str, list[int]]) -> None:
        title = f"top-{controls['k'].value} per level, or the same number over all levels"
        if not figure:
            figure.append(plot_level_counts({name: chosen[name] for name in shown}, level_names, title=title,
                                            y_label="anchors"))
            show_figure(output, figure[0])
            figure[0].set_layout_engine("none")  # keep the first layout: no re-solving per change
            return
        ax = figure[0].axes[0]
        for text in list(ax.texts):
            text.remove()
        for container, name in zip(ax.containers, shown):
            for bar, value in zip(container.patches, chosen[name]):
                bar.set_height(max(int(value), 0.8))
            ax.bar_label(container, labels=[str(v) for v in chosen[name]], fontsize=6, padding=1)
        ax.set_title(title, fontsize=10)
        show_figure(output, figure[0])

    def update() -> dict[str, Any]:
        start = time.perf_counter()
        chosen = top_k_by_level(objectness[controls["scores"].value], counts, controls["k"].value)
        result.clear()
        result.update(chosen, seconds=time.perf_counter() - start, render_seconds=0.0)
        if render:
            start = time.perf_counter()
            draw(chosen)
            result["render_seconds"] = time.perf_counter() - start
        lost = [f"{name}: {g} of {p}" for name, g, p in zip(level_names, chosen["global top-k"], chosen["per-level top-k"])
                if g < p]
        status.value = ("a global top-k keeps fewer than the per-level top-k on " + ", ".join(lost)) if lost \
            else "a global top-k keeps at least as many on every level"
        return result

    for control in controls.values():
        control.observe(lambda _change: update(), names="value")
    explorer = Explorer(widget=W.VBox([W.HBox(list(controls.values())), status, output]), controls=controls,
                        output=output, status=status, update=update, last_result=result)
    update()
    return explorer
