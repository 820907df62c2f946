"""The proposal layer one step at a time, and proposal recall under its settings (notebook 05).

``proposal_funnel`` repeats what ``rpnlab.detector.proposals.ProposalLayer`` does for one image and one
feature level, in the same order (decode, top-k, clip, drop small, score threshold, NMS, top-n),
but keeps what every step leaves, so that the counts can be drawn and each step inspected. Its
final proposals are the proposal layer's (a test checks it).

``rpn_outputs`` runs a trained model's backbone and RPN head once over a dataset and keeps the
dense predictions; ``proposals_for`` and ``recall_by_setting`` then turn them into proposals
under any proposal-layer setting without running the network again.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from torch import Tensor

from rpnlab.detector.boxes import BoxCoder, check_boxes, clip_boxes, remove_small_boxes
from rpnlab.detector.proposals import ProposalLayer, nms
from rpnlab.lab.figures import (
    COLORS,
    add_box,
    as_numpy,
    boxes_numpy,
    new_figure,
    plot_funnel,
    show_image,
    single_ax,
)

__all__ = [
    "FUNNEL_STEPS", "plot_proposal_steps", "plot_proposals", "plot_recall_curves",
    "proposal_funnel", "proposals_for", "recall_by_setting", "rpn_outputs",
]


# Names of the counts ``proposal_funnel`` returns, in order.
FUNNEL_STEPS = ("anchors", "top-k", "min size", "score threshold", "NMS", "top-n")


def proposal_funnel(
    anchors: Tensor,
    objectness: Tensor,
    deltas: Tensor | None,
    image_size: tuple[int, int],
    pre_nms_top_n: int = 600,
    post_nms_top_n: int = 100,
    nms_thresh: float = 0.7,
    min_size: float = 0.0,
    score_thresh: float = 0.0,
    box_coder: BoxCoder | None = None,
    decoded: Tensor | None = None,
    nms_implementation: str = "torchvision",
) -> dict[str, Any]:
    """Proposals of one image, step by step, with the number of boxes each step leaves.

    Args:
        anchors: ``(A, 4)``.
        objectness: ``(A,)`` logits (``fg - bg`` for a softmax head).
        deltas: ``(A, 4)`` predicted offsets; may be ``None`` when ``decoded`` is given.
        image_size: ``(h, w)`` to clip to.
        pre_nms_top_n, post_nms_top_n, nms_thresh, min_size, score_thresh: as ``ProposalLayer``.
        box_coder: decodes ``deltas``; default ``BoxCoder()``.
        decoded: ``(A, 4)`` boxes already decoded (``result["decoded"]`` of an earlier call), so
            that a widget changing only the counts does not decode again.
        nms_implementation: ``"torchvision"`` (compiled) or ``"python"`` (``rpnlab.detector.proposals.nms``).
    Returns:
        A dict with ``counts`` (``{step: int}`` for ``FUNNEL_STEPS``), ``num_clipped`` (top-k boxes
        that clipping changed), ``decoded (A, 4)``, ``topk_idxs (K,)``, ``topk_boxes (K, 4)``
        (clipped), ``pre_nms_boxes``, ``pre_nms_scores`` (what enters NMS), ``nms_boxes``,
        ``nms_scores`` (its survivors, best first) and ``boxes (P, 4)``, ``scores (P,)`` (the
        proposals: probabilities, best first).
    """
    check_boxes(anchors, "anchors", values=False)
    if anchors.dim() != 2:
        raise ValueError(f"anchors must have shape (A, 4), got {tuple(anchors.shape)}")
    a = anchors.shape[0]
    if not isinstance(objectness, Tensor) or objectness.shape != (a,):
        raise ValueError(f"objectness must be logits of shape ({a},), got {getattr(objectness, 'shape', objectness)}")
    for name, value in (("pre_nms_top_n", pre_nms_top_n), ("post_nms_top_n", post_nms_top_n)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not 0 <= nms_thresh <= 1:
        raise ValueError(f"nms_thresh must be an IoU in [0, 1], got {nms_thresh!r}")
    if decoded is None:
        if deltas is None or deltas.shape != (a, 4):
            raise ValueError(f"deltas must have shape ({a}, 4), got {getattr(deltas, 'shape', deltas)}")
        decoded = (box_coder or BoxCoder()).decode(deltas.detach(), anchors)
    elif decoded.shape != (a, 4):
        raise ValueError(f"decoded must have shape ({a}, 4), got {tuple(decoded.shape)}")
    objectness = objectness.detach()

    topk_idxs = objectness.topk(min(pre_nms_top_n, a)).indices  # best first
    raw = decoded[topk_idxs]
    boxes = clip_boxes(raw, image_size)
    num_clipped = int((boxes != raw).any(dim=1).sum())
    scores = torch.sigmoid(objectness[topk_idxs])
    topk_boxes = boxes

    keep = remove_small_boxes(boxes, min_size)
    boxes, scores = boxes[keep], scores[keep]
    after_small = boxes.shape[0]
    keep = torch.where(scores >= score_thresh)[0]
    boxes, scores = boxes[keep], scores[keep]

    if nms_implementation == "python":
        keep = nms(boxes, scores, nms_thresh)
    elif nms_implementation == "torchvision":
        import torchvision

        keep = torchvision.ops.nms(boxes, scores, nms_thresh)
    else:
        raise ValueError(f"nms_implementation must be 'torchvision' or 'python', got {nms_implementation!r}")
    nms_boxes, nms_scores = boxes[keep], scores[keep]
    final = slice(0, post_nms_top_n)
    counts = dict(zip(FUNNEL_STEPS, (a, topk_idxs.shape[0], after_small, boxes.shape[0], nms_boxes.shape[0],
                                     nms_boxes[final].shape[0])))
    return {
        "counts": counts,
        "num_clipped": num_clipped,
        "decoded": decoded,
        "topk_idxs": topk_idxs,
        "topk_boxes": topk_boxes,
        "pre_nms_boxes": boxes,
        "pre_nms_scores": scores,
        "nms_boxes": nms_boxes,
        "nms_scores": nms_scores,
        "boxes": nms_boxes[final],
        "scores": nms_scores[final],
    }


@torch.no_grad()
def rpn_outputs(model, dataset, num_images: int | None = None, batch_size: int = 16,
                device: str | torch.device | None = None) -> dict[str, Any]:
    """The RPN's dense predictions for the first ``num_images`` images of ``dataset``.

    Args:
        model: an ``rpnlab.detector.model.FasterRCNN`` (only its backbone and RPN head run; eval mode).
        dataset: yields ``(image, target)``; every image must give the same feature-map size
            (the synthetic shapes do), so that one set of anchors serves all.
        device: default the model's.
    Returns:
        ``anchors (A, 4)``, ``num_anchors_per_level`` (list), ``objectness (N, A)`` logits
        (``fg - bg`` for a softmax head), ``deltas (N, A, 4)``, ``image_sizes`` (N pairs),
        ``gt_boxes`` (N tensors ``(M_i, 4)``), all on the model's device except ``gt_boxes``.
    """
    from rpnlab.data import collate
    from rpnlab.detector.rpn import flatten_head_outputs

    n = len(dataset) if num_images is None else min(int(num_images), len(dataset))
    if n <= 0:
        raise ValueError("dataset is empty (or num_images <= 0): no images to run the RPN on")
    dev = next(model.parameters()).device if device is None else torch.device(device)
    model.eval()
    objectness, deltas, image_sizes, gt_boxes = [], [], [], []
    anchors, per_level, feature_sizes = None, None, None
    for start in range(0, n, batch_size):
        images, targets = collate([dataset[i] for i in range(start, min(start + batch_size, n))])
        x, sizes = model.prepare_images(images.to(dev))
        features = model.backbone(x)
        sizes_now = [tuple(f.shape[-2:]) for f in features]
        if feature_sizes is None:
            feature_sizes = sizes_now
            anchors = model.rpn.anchor_generator(feature_sizes, device=dev, dtype=x.dtype)
            per_level = model.rpn.anchor_generator.num_anchors_per_level(feature_sizes)
        elif sizes_now != feature_sizes:
            raise ValueError(
                f"images give feature maps of different sizes ({feature_sizes} and {sizes_now}): "
                "rpn_outputs needs one set of anchors for all images"
            )
        obj, dlt = flatten_head_outputs(*model.rpn.head(features), mode=model.rpn.mode)
        if model.rpn.mode == "softmax":
            obj = obj[..., 1] - obj[..., 0]
        objectness.append(obj)
        deltas.append(dlt)
        image_sizes += sizes
        gt_boxes += [t["boxes"] for t in targets]
    return {
        "anchors": anchors,
        "num_anchors_per_level": per_level,
        "objectness": torch.cat(objectness),
        "deltas": torch.cat(deltas),
        "image_sizes": image_sizes,
        "gt_boxes": gt_boxes,
    }


def proposals_for(outputs: Mapping[str, Any], box_coder: BoxCoder | None = None,
                  **settings: Any) -> tuple[list[Tensor], list[Tensor]]:
    """Proposals of every image of ``rpn_outputs(...)`` under ``ProposalLayer(**settings)`` (eval counts).

    ``settings``: ``pre_nms_top_n``, ``post_nms_top_n``, ``nms_thresh``, ``min_size``,
    ``score_thresh``, ``mode`` (``"top"``: no NMS). Returns per image ``boxes (P_i, 4)`` and
    ``scores (P_i,)``, best first.
    """
    layer = ProposalLayer(box_coder=box_coder, **settings).eval()
    return layer(outputs["anchors"], outputs["objectness"], outputs["deltas"], outputs["image_sizes"],
                 outputs["num_anchors_per_level"])


def recall_by_setting(
    outputs: Mapping[str, Any],
    settings: Mapping[str, Mapping[str, Any]],
    num_proposals: Sequence[int] = (1, 5, 10, 20, 50, 100, 200, 300),
    iou_thresholds: Sequence[float] | None = None,
    box_coder: BoxCoder | None = None,
) -> dict[str, dict]:
    """Proposal recall (``rpnlab.engine.evaluation.proposal_recall``) for named proposal-layer settings.

    ``settings``: name -> ``ProposalLayer`` keyword arguments, e.g.
    ``{"NMS 0.7": dict(pre_nms_top_n=600, post_nms_top_n=300, nms_thresh=0.7)}``.
    Returns name -> the recall dict (``recall_50``, ``recall_70``, ``average_recall`` per N, ...).
    """
    from rpnlab.engine.evaluation import DEFAULT_IOU_THRESHOLDS, proposal_recall

    thresholds = DEFAULT_IOU_THRESHOLDS if iou_thresholds is None else iou_thresholds
    results = {}
    for name, kwargs in settings.items():
        boxes, _ = proposals_for(outputs, box_coder=box_coder, **kwargs)
        results[name] = proposal_recall([b.cpu() for b in boxes], outputs["gt_boxes"], num_proposals, thresholds)
    return results


def plot_proposals(image: Any, proposals: Any, scores: Any = None, gt_boxes: Any = None, top: int = 20,
                   ax: Axes | None = None, title: str | None = None) -> Figure:
    """The ``top`` highest-scoring proposals (purple, faded by rank) over the image and gt boxes."""
    p = boxes_numpy(proposals, "proposals")
    order = np.argsort(-as_numpy(scores).reshape(-1), kind="stable") if scores is not None else np.arange(p.shape[0])
    order = order[:top]
    fig, ax = single_ax(ax, (5.5, 5.5))
    h, w = show_image(ax, image)
    for rank, i in enumerate(order):
        add_box(ax, p[i], COLORS["prediction"], linewidth=1.2, alpha=max(0.25, 1 - rank / max(1, len(order))),
                 label=f"top {len(order)} of {p.shape[0]} proposals" if rank == 0 else None)
    if gt_boxes is not None:
        for j, box in enumerate(boxes_numpy(gt_boxes, "gt_boxes")):
            add_box(ax, box, COLORS["gt"], linewidth=2, outline=True, label="ground truth" if j == 0 else None)
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)
    ax.legend(fontsize=7, loc="upper right")
    ax.set_title(title or f"{p.shape[0]} proposals")
    return fig


def plot_recall_curves(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], x_label: str = "IoU threshold",
                       ax: Axes | None = None, title: str | None = None) -> Figure:
    """Recall curves, ``{name: (x values, recall values)}`` (e.g. recall vs IoU, or vs #proposals)."""
    fig, ax = single_ax(ax, (5.0, 3.8))
    for name, (x, y) in curves.items():
        ax.plot(as_numpy(x), as_numpy(y), marker=".", label=name)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel(x_label)
    ax.set_ylabel("recall")
    ax.set_title(title or "proposal recall")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def plot_proposal_steps(image: Any, funnel: Mapping[str, Any], gt_boxes: Any = None, top: int = 20,
                        show_pre_nms: bool = True, title: str | None = None) -> Figure:
    """A ``rpnlab.lab.proposals.proposal_funnel`` result: the counts of each step, the ``top``
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
