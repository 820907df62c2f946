"""Evaluation: PASCAL VOC average precision written out by hand, COCO mAP through pycocotools,
and the recall of region proposals.

Formats (one list entry per image, in the same order for detections and ground truth):

- detections: ``dict(boxes (D, 4) float, scores (D,), labels (D,) int64 in 1..C)``
- ground truth: ``dict(boxes (M, 4) float, labels (M,) int64 in 1..C, difficult (M,) bool optional)``

Class 0 is background and never appears. Boxes are ``x1, y1, x2, y2`` pixels with widths
``x2 - x1`` (torchvision's convention; the VOC devkit and py-faster-rcnn add ``+ 1`` to widths,
so numbers on tiny boxes differ slightly from theirs).

Evaluation runs once per model, not per step: it copies everything to the CPU in float64 and
returns plain Python numbers, NumPy curves and CPU tensors, ready for tables and plots.

Longer than 500 lines because VOC AP is written out by hand (the lesson) beside the COCO and
proposal-recall metrics it is checked against.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from rpnlab.detector.boxes import box_iou, check_boxes

__all__ = [
    "DEFAULT_IOU_THRESHOLDS",
    "DEFAULT_NUM_PROPOSALS",
    "evaluate_coco",
    "evaluate_voc",
    "per_class_ap_table",
    "proposal_recall",
    "voc_ap",
]

#: Proposal counts of the recall-vs-proposals curve (Ren et al. 2015, Fig. 4 goes to 2000).
DEFAULT_NUM_PROPOSALS = (10, 20, 50, 100, 200, 300, 500, 1000, 2000)
#: IoU thresholds 0.50, 0.55, ..., 0.95 (COCO's); rounding keeps 0.7 exactly 0.7, not 0.7000000000000001.
DEFAULT_IOU_THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))


# --------------------------------------------------------------------------------------------
# Average precision of one precision/recall curve
# --------------------------------------------------------------------------------------------


def voc_ap(recall, precision, use_07_metric: bool = False) -> float:
    """Average precision: the area under a precision/recall curve, the PASCAL VOC way.

    Args:
        recall: ``(N,)`` recall after each of the N ranked detections (non-decreasing).
        precision: ``(N,)`` precision after each of the N ranked detections.
        use_07_metric: ``True`` for VOC2007's 11-point interpolation, ``False`` (default) for
            the all-point area used from VOC2010 on.

    Returns:
        AP in ``[0, 1]`` as a Python float; 0.0 for an empty curve (no detections).

    *11-point (VOC2007).* At each recall level ``t`` in ``0, 0.1, ..., 1`` take the best precision
    reached at recall ``>= t`` (0 if recall never gets there) and average the 11 numbers.

    *All-point (VOC2010+).* First replace precision by its *envelope*, the best precision at this
    recall or any higher one: a detector that would gain precision by going further down its
    ranking should not be penalised for the dip. The envelope is a decreasing staircase, and AP is
    the exact area under it: the sum of ``(recall step) x (envelope height)`` over the points where
    recall increases.
    """
    rec = _as_curve(recall, "recall")
    prec = _as_curve(precision, "precision")
    if rec.shape != prec.shape:
        raise ValueError(
            f"recall and precision must have the same length, got {rec.shape[0]} and {prec.shape[0]}"
        )

    if use_07_metric:
        ap = 0.0
        # t = i / 10 gives exactly 0.3, where np.arange(0, 1.1, 0.1) (py-faster-rcnn) gives
        # 0.30000000000000004 and so misses a recall of exactly 3/10.
        for t in (i / 10 for i in range(11)):
            reached = rec >= t
            best_precision = prec[reached].max() if reached.any() else 0.0
            ap += best_precision / 11
        return float(ap)

    # Sentinels: the curve starts at recall 0 and is closed at recall 1 with precision 0, so the
    # area covers the whole recall axis (beyond the last detection the precision counts as 0).
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    # The envelope: a running maximum taken from the right (highest recall) to the left.
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    # Only the points where recall moves contribute area; step i spans mrec[i] -> mrec[i + 1].
    steps = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


def _as_curve(values, name: str) -> np.ndarray:
    if isinstance(values, Tensor):
        values = values.detach().cpu().numpy()
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence, got shape {arr.shape}")
    if arr.size and (not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1):
        raise ValueError(f"{name} must hold finite values in [0, 1]")
    return arr


# --------------------------------------------------------------------------------------------
# Input checking shared by the VOC and COCO evaluators
# --------------------------------------------------------------------------------------------


def _image_arrays(item: Mapping, name: str, keys: tuple[str, ...]) -> dict[str, Tensor]:
    if not isinstance(item, Mapping):
        raise TypeError(f"{name} must be a dict with keys {keys}, got {type(item).__name__}")
    missing = [k for k in keys if k not in item]
    if missing:
        raise ValueError(f"{name} is missing key(s) {missing}; expected {keys}")
    boxes = check_boxes(torch.as_tensor(item["boxes"]), f"{name}['boxes']")
    if boxes.dim() != 2:
        raise ValueError(f"{name}['boxes'] must have shape (N, 4), got {tuple(boxes.shape)}")
    out = {"boxes": boxes.detach().to("cpu", torch.float64)}
    n = boxes.shape[0]
    for key in keys[1:]:
        value = torch.as_tensor(item[key]).detach().cpu().reshape(-1)
        if value.shape[0] != n:
            raise ValueError(
                f"{name}['{key}'] must have one entry per box ({n}), got {value.shape[0]}"
            )
        out[key] = value
    return out


def _check_labels(labels: Tensor, num_classes: int, name: str) -> Tensor:
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor of class ids, got dtype {labels.dtype}")
    labels = labels.to(torch.int64)
    if labels.numel() and (labels.min() < 1 or labels.max() > num_classes):
        raise ValueError(
            f"{name} must hold class ids in 1..{num_classes} (0 is background), "
            f"got values in {labels.min().item()}..{labels.max().item()}"
        )
    return labels


def _prepare(
    detections: Sequence, ground_truth: Sequence, num_classes: int
) -> tuple[list[dict], list[dict]]:
    """Check both lists; return CPU copies (boxes, scores float64; labels int64; difficult bool)."""
    if not isinstance(detections, Sequence) or not isinstance(ground_truth, Sequence):
        raise TypeError("detections and ground_truth must be lists with one dict per image")
    if len(detections) != len(ground_truth):
        raise ValueError(
            "detections and ground_truth must have one entry per image each, "
            f"got {len(detections)} and {len(ground_truth)}"
        )
    dets, gts = [], []
    for i, (det, gt) in enumerate(zip(detections, ground_truth)):
        d = _image_arrays(det, f"detections[{i}]", ("boxes", "scores", "labels"))
        d["labels"] = _check_labels(d["labels"], num_classes, f"detections[{i}]['labels']")
        d["scores"] = d["scores"].to(torch.float64)
        if not bool(torch.isfinite(d["scores"]).all()):
            raise ValueError(f"detections[{i}]['scores'] must be finite numbers")
        dets.append(d)
        g = _image_arrays(gt, f"ground_truth[{i}]", ("boxes", "labels"))
        g["labels"] = _check_labels(g["labels"], num_classes, f"ground_truth[{i}]['labels']")
        if gt.get("difficult") is not None:
            difficult = torch.as_tensor(gt["difficult"]).detach().cpu().reshape(-1).to(torch.bool)
            if difficult.shape[0] != g["boxes"].shape[0]:
                raise ValueError(f"ground_truth[{i}]['difficult'] must have one entry per box")
        else:
            difficult = torch.zeros(g["boxes"].shape[0], dtype=torch.bool)
        g["difficult"] = difficult
        gts.append(g)
    return dets, gts


def _check_num_classes(num_classes) -> int:
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(
            f"num_classes must be a positive integer (foreground classes), got {num_classes!r}"
        )
    return num_classes


def _class_name(class_names, c: int, num_classes: int) -> str:
    """Name of class ``c``: ``class_names`` is a mapping id -> name, C names (classes 1..C) or C + 1
    names (index = class id, entry 0 the background)."""
    if class_names is None:
        return str(c)
    if isinstance(class_names, Mapping):
        return str(class_names.get(c, c))
    if len(class_names) == num_classes + 1:
        return str(class_names[c])
    if len(class_names) == num_classes:
        return str(class_names[c - 1])
    raise ValueError(
        f"class_names must have {num_classes} names (classes 1..{num_classes}) or {num_classes + 1} "
        f"(with the background first), got {len(class_names)}"
    )


# --------------------------------------------------------------------------------------------
# PASCAL VOC
# --------------------------------------------------------------------------------------------

TP, FP, IGNORED = 1, 0, -1


def _match_image(det: dict, gt: dict, iou_threshold: float) -> np.ndarray:
    """Mark each detection of one image TP, FP or IGNORED by the VOC devkit's greedy rule.

    ``det`` must be sorted by descending score. Returns ``(D,)`` int codes.

    The devkit walks detections from the highest score down; each looks only at its *best*
    same-class ground truth (highest IoU). If that IoU reaches the threshold, the detection is a
    TP when the gt is still free, an FP (a duplicate) when a higher-scored detection took it, and
    ignored when the gt is marked difficult. Below the threshold it is an FP. (COCO differs: a
    detection whose best gt is taken falls back to the best *free* gt.)

    Because a detection's fate depends only on its best gt and on which earlier detections chose
    the same gt, the walk vectorises: a hit is a TP exactly when it is the first hit on its gt.
    """
    num_det, num_gt = det["boxes"].shape[0], gt["boxes"].shape[0]
    status = np.full(num_det, FP, dtype=np.int8)
    if num_det == 0 or num_gt == 0:
        return status
    iou = box_iou(det["boxes"], gt["boxes"])  # (D, M)
    # Only a gt of the detection's own class can be matched; -1 is below any threshold.
    iou[det["labels"][:, None] != gt["labels"][None, :]] = -1.0
    best_iou, best_gt = iou.max(dim=1)
    best_iou, best_gt = best_iou.numpy(), best_gt.numpy()
    difficult = gt["difficult"].numpy()

    hit = best_iou >= iou_threshold
    status[hit & difficult[best_gt]] = IGNORED
    candidates = np.flatnonzero(hit & ~difficult[best_gt])  # in descending score order
    # np.unique returns the index of the first occurrence of each gt id: the highest-scored hit.
    _, first = np.unique(best_gt[candidates], return_index=True)
    status[candidates[first]] = TP
    return status


def evaluate_voc(
    detections: Sequence[Mapping],
    ground_truth: Sequence[Mapping],
    num_classes: int,
    iou_threshold: float = 0.5,
    use_07_metric: bool = False,
    class_names=None,
) -> dict:
    """PASCAL VOC evaluation: average precision per class and their mean.

    Args:
        detections: one ``dict(boxes (D, 4), scores (D,), labels (D,))`` per image.
        ground_truth: one ``dict(boxes (M, 4), labels (M,), difficult (M,) optional)`` per image.
        num_classes: C, the number of foreground classes (labels are 1..C).
        iou_threshold: a detection hits a gt box at IoU ``>=`` this (the devkit's ``minoverlap``).
        use_07_metric: 11-point AP (VOC2007) instead of all-point AP (VOC2010+), see ``voc_ap``.
        class_names: optional names, C of them (or C + 1 with the background first, or a dict).

    Returns:
        ``dict`` with

        - ``map``: mean AP over the classes that have at least one non-difficult gt (NaN if none),
        - ``ap``: ``{class_id: AP}``, NaN for a class without non-difficult gt,
        - ``per_class``: list of ``dict(class_id, name, ap, num_gt, num_difficult, num_detections,
          tp, fp, ignored)`` (``num_gt`` counts non-difficult boxes, ``tp``/``fp`` are totals),
        - ``curves``: ``{class_id: dict(recall (N,), precision (N,), scores (N,))}`` NumPy arrays
          over the ranked, non-ignored detections, for plotting precision/recall,
        - ``iou_threshold``, ``use_07_metric``, ``num_classes``.

    Matching follows the official devkit (and py-faster-rcnn's ``voc_eval``): detections of a
    class are ranked by score over the whole dataset, each gt box is matched at most once,
    duplicates are false positives and detections matched to a difficult gt count for nothing.
    """
    num_classes = _check_num_classes(num_classes)
    if not 0 <= iou_threshold <= 1:
        raise ValueError(f"iou_threshold must be in [0, 1], got {iou_threshold}")
    dets, gts = _prepare(detections, ground_truth, num_classes)

    # 1. Match per image (all classes at once), detections sorted by score inside the image.
    scores, labels, status = [], [], []
    for det, gt in zip(dets, gts):
        # A stable sort keeps ties in input order, so results do not depend on the sort algorithm.
        order = torch.argsort(det["scores"], descending=True, stable=True)
        det = {k: v[order] for k, v in det.items()}
        status.append(_match_image(det, gt, iou_threshold))
        scores.append(det["scores"].numpy())
        labels.append(det["labels"].numpy())
    scores = np.concatenate(scores) if scores else np.zeros(0)
    labels = np.concatenate(labels) if labels else np.zeros(0, dtype=np.int64)
    status = np.concatenate(status) if status else np.zeros(0, dtype=np.int8)

    gt_labels = (
        torch.cat([g["labels"] for g in gts]).numpy() if gts else np.zeros(0, dtype=np.int64)
    )
    gt_difficult = (
        torch.cat([g["difficult"] for g in gts]).numpy() if gts else np.zeros(0, dtype=bool)
    )
    num_gt = np.bincount(gt_labels[~gt_difficult], minlength=num_classes + 1)
    num_difficult = np.bincount(gt_labels[gt_difficult], minlength=num_classes + 1)

    # 2. Per class: rank all its detections over the dataset and accumulate the PR curve.
    ap, per_class, curves = {}, [], {}
    for c in range(1, num_classes + 1):
        mine = labels == c
        order = np.argsort(-scores[mine], kind="stable")
        cls_status, cls_scores = status[mine][order], scores[mine][order]
        counted = cls_status != IGNORED
        cls_status, cls_scores = cls_status[counted], cls_scores[counted]
        tp = np.cumsum(cls_status == TP)
        fp = np.cumsum(cls_status == FP)
        n_gt = int(num_gt[c])
        recall = tp / n_gt if n_gt > 0 else np.full(tp.shape, np.nan)
        precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
        ap[c] = voc_ap(recall, precision, use_07_metric) if n_gt > 0 else math.nan
        curves[c] = {"recall": recall, "precision": precision, "scores": cls_scores}
        per_class.append(
            {
                "class_id": c,
                "name": _class_name(class_names, c, num_classes),
                "ap": ap[c],
                "num_gt": n_gt,
                "num_difficult": int(num_difficult[c]),
                "num_detections": int(mine.sum()),
                "tp": int(tp[-1]) if tp.size else 0,
                "fp": int(fp[-1]) if fp.size else 0,
                "ignored": int((~counted).sum()),
            }
        )

    defined = [v for v in ap.values() if not math.isnan(v)]
    return {
        "map": float(np.mean(defined)) if defined else math.nan,
        "ap": ap,
        "per_class": per_class,
        "curves": curves,
        "iou_threshold": float(iou_threshold),
        "use_07_metric": bool(use_07_metric),
        "num_classes": num_classes,
    }


# --------------------------------------------------------------------------------------------
# COCO, through pycocotools
# --------------------------------------------------------------------------------------------

_COCO_KEYS = (
    "map",
    "map_50",
    "map_75",
    "map_small",
    "map_medium",
    "map_large",
    "mar_1",
    "mar_10",
    "mar_100",
)


def _xywh(boxes: Tensor) -> list[list[float]]:
    xywh = boxes.clone()
    xywh[:, 2:] -= xywh[:, :2]
    return xywh.tolist()


def evaluate_coco(
    detections: Sequence[Mapping], ground_truth: Sequence[Mapping], num_classes: int | None = None
) -> dict:
    """COCO-style box mAP with the official ``pycocotools`` code (``COCOeval``, ``iouType="bbox"``).

    Args:
        detections, ground_truth: as for ``evaluate_voc``. A ``difficult`` gt becomes a COCO
            *crowd* region (``iscrowd=1``): it is not counted as a gt, and detections that fall
            on it are neither true nor false positives.
        num_classes: C; ``None`` takes the largest label found in either list.

    Returns:
        ``dict`` with ``map`` (AP at IoU 0.50:0.95), ``map_50``, ``map_75``, ``map_small``,
        ``map_medium``, ``map_large`` (COCO's area ranges, < 32^2 and < 96^2 pixels), ``mar_1``,
        ``mar_10``, ``mar_100`` (average recall with at most 1/10/100 detections per image),
        ``ap_per_class`` and ``ap50_per_class`` (``{class_id: AP}``), and ``summary`` (the text
        pycocotools would have printed). As in pycocotools, a metric with no gt to measure
        (say ``map_small`` on a dataset without small boxes) is -1. With no detections at all
        every metric is 0.

    COCO interpolates precision at 101 recall points, not VOC's all-point area, and matches a
    detection whose best gt is taken to the next free one, so ``map_50`` is close to but not
    exactly ``evaluate_voc(...)["map"]``. At most 100 detections per image are scored.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if num_classes is None:
        labels = [
            torch.as_tensor(x["labels"]).reshape(-1)
            for x in (*detections, *ground_truth)
            if "labels" in x
        ]
        num_classes = max([int(t.max()) for t in labels if t.numel()] + [1])
    num_classes = _check_num_classes(num_classes)
    dets, gts = _prepare(detections, ground_truth, num_classes)

    images, annotations, results = [], [], []
    for i, (det, gt) in enumerate(zip(dets, gts)):
        image_id = i + 1
        images.append({"id": image_id})
        for box, label, difficult in zip(
            _xywh(gt["boxes"]), gt["labels"].tolist(), gt["difficult"].tolist()
        ):
            annotations.append(
                {
                    # Annotation ids start at 1: COCOeval stores "matched gt id" with 0 meaning none.
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": label,
                    "bbox": box,
                    "area": box[2] * box[3],
                    "iscrowd": int(difficult),
                }
            )
        for box, score, label in zip(
            _xywh(det["boxes"]), det["scores"].tolist(), det["labels"].tolist()
        ):
            results.append(
                {"image_id": image_id, "category_id": label, "bbox": box, "score": score}
            )

    classes = range(1, num_classes + 1)
    if not results:
        # pycocotools' loadRes cannot take an empty list; nothing detected scores 0 everywhere.
        zeros = {key: 0.0 for key in _COCO_KEYS}
        return {
            **zeros,
            "ap_per_class": dict.fromkeys(classes, 0.0),
            "ap50_per_class": dict.fromkeys(classes, 0.0),
            "summary": "no detections",
        }

    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        coco_gt = COCO()
        coco_gt.dataset = {
            "images": images,
            "annotations": annotations,
            "categories": [{"id": c, "name": str(c)} for c in classes],
        }
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(results)
        coco_eval = COCOeval(coco_gt, coco_dt, iouType="bbox")
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    stats = [float(s) for s in coco_eval.stats]

    # precision: (T iou thresholds, R=101 recall points, K classes, A area ranges, M max-dets);
    # area "all" is index 0 and maxDets=100 the last. -1 marks "no gt for this class".
    precision = coco_eval.eval["precision"]
    cat_ids = list(coco_eval.params.catIds)

    def class_ap(c: int, iou_index: slice | int) -> float:
        p = precision[iou_index, :, cat_ids.index(c), 0, -1]
        p = p[p > -1]
        return float(p.mean()) if p.size else -1.0

    out = dict(
        zip(
            _COCO_KEYS,
            (
                stats[0],
                stats[1],
                stats[2],
                stats[3],
                stats[4],
                stats[5],
                stats[6],
                stats[7],
                stats[8],
            ),
        )
    )
    out["ap_per_class"] = {c: class_ap(c, slice(None)) for c in classes}
    out["ap50_per_class"] = {c: class_ap(c, 0) for c in classes}  # iouThrs[0] == 0.5
    out["summary"] = "\n".join(
        line for line in captured.getvalue().splitlines() if line.lstrip().startswith("Average")
    )
    return out


# --------------------------------------------------------------------------------------------
# Proposal recall (Ren et al. 2015, Fig. 4; Hosang et al.'s average recall)
# --------------------------------------------------------------------------------------------


def proposal_recall(
    proposals: Sequence[Tensor],
    gt_boxes: Sequence[Tensor],
    num_proposals: Sequence[int] = DEFAULT_NUM_PROPOSALS,
    iou_thresholds: Sequence[float] = DEFAULT_IOU_THRESHOLDS,
) -> dict:
    """Recall of ground-truth boxes by the top-N proposals of each image.

    Args:
        proposals: one ``(P_i, 4)`` tensor per image, sorted by descending objectness (as the
            proposal layer returns them); the first N are "the top N".
        gt_boxes: one ``(M_i, 4)`` tensor per image.
        num_proposals: the N values, one point of the recall-vs-proposals curve each. An image
            with fewer than N proposals uses all it has.
        iou_thresholds: T thresholds; a gt box is recalled at threshold t when some top-N
            proposal overlaps it with IoU ``>= t``.

    Returns:
        ``dict`` of CPU tensors and lists:

        - ``recall``: ``(len(num_proposals), T)`` recall for each N and threshold,
        - ``recall_50``, ``recall_70``: ``(len(num_proposals),)`` recall vs N at IoU 0.5 and 0.7,
        - ``average_recall``: ``(len(num_proposals),)`` the mean of ``recall`` over thresholds
          (with the default 0.5:0.95 this is COCO's AR, a discrete version of Hosang et al.'s),
        - ``best_iou``: ``(len(num_proposals), M)`` best IoU of each gt box (all images, in order)
          among the top N,
        - ``num_proposals``, ``iou_thresholds``, ``num_gt``.

        With no gt boxes at all recalls are NaN.
    """
    if len(proposals) != len(gt_boxes):
        raise ValueError(
            f"proposals and gt_boxes need one entry per image, got {len(proposals)} and {len(gt_boxes)}"
        )
    counts = [int(n) for n in num_proposals]
    if not counts or any(n < 1 for n in counts):
        raise ValueError(f"num_proposals must be positive integers, got {tuple(num_proposals)}")
    thresholds = torch.tensor([float(t) for t in iou_thresholds], dtype=torch.float64)
    if thresholds.numel() == 0 or (thresholds < 0).any() or (thresholds > 1).any():
        raise ValueError(f"iou_thresholds must be values in [0, 1], got {tuple(iou_thresholds)}")

    best = []  # per image: (len(counts), M_i)
    for i, (props, gts) in enumerate(zip(proposals, gt_boxes)):
        check_boxes(props, f"proposals[{i}]", values=False)
        check_boxes(gts, f"gt_boxes[{i}]", values=False)
        props, gts = props.detach().to("cpu", torch.float64), gts.detach().to("cpu", torch.float64)
        if gts.shape[0] == 0:
            continue
        if props.shape[0] == 0:
            best.append(gts.new_zeros(len(counts), gts.shape[0]))
            continue
        # running[n - 1, j] = best IoU of gt j among the first n proposals: one cumulative max
        # gives every N at once.
        running = box_iou(props, gts).cummax(dim=0).values  # (P, M)
        rows = torch.tensor([min(n, props.shape[0]) - 1 for n in counts])
        best.append(running[rows])
    best_iou = torch.cat(best, dim=1) if best else torch.zeros(len(counts), 0, dtype=torch.float64)

    def recall_at(t: Tensor) -> Tensor:  # t: (T,) -> (len(counts), T)
        return (best_iou[:, :, None] >= t[None, None, :]).to(torch.float64).mean(dim=1)

    recall = recall_at(thresholds)
    recall_50_70 = recall_at(torch.tensor([0.5, 0.7], dtype=torch.float64))
    return {
        "recall": recall,
        "recall_50": recall_50_70[:, 0],
        "recall_70": recall_50_70[:, 1],
        "average_recall": recall.mean(dim=1),
        "best_iou": best_iou,
        "num_proposals": counts,
        "iou_thresholds": thresholds.tolist(),
        "num_gt": best_iou.shape[1],
    }


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------


def per_class_ap_table(result: Mapping, class_names=None) -> str:
    """A markdown table of per-class AP from ``evaluate_voc`` (or ``evaluate_coco``) results.

    ``class_names`` overrides the names stored in the result (same forms as in ``evaluate_voc``).
    Shows AP in percent with one decimal; a class without ground truth shows "-".
    """

    def fmt(ap: float) -> str:
        return "-" if ap is None or math.isnan(ap) or ap < 0 else f"{100 * ap:.1f}"

    if "per_class" in result:  # evaluate_voc
        num_classes = result["num_classes"]
        lines = [
            "| class | AP | gt | difficult | detections | TP | FP |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for row in result["per_class"]:
            name = (
                _class_name(class_names, row["class_id"], num_classes)
                if class_names is not None
                else row["name"]
            )
            lines.append(
                f"| {name} | {fmt(row['ap'])} | {row['num_gt']} | {row['num_difficult']} | "
                f"{row['num_detections']} | {row['tp']} | {row['fp']} |"
            )
        lines.append(f"| **mAP** | **{fmt(result['map'])}** | | | | | |")
        return "\n".join(lines)
    if "ap_per_class" in result:  # evaluate_coco
        num_classes = len(result["ap_per_class"])
        lines = ["| class | AP | AP50 |", "|---|---:|---:|"]
        for c, ap in result["ap_per_class"].items():
            lines.append(
                f"| {_class_name(class_names, c, num_classes)} | {fmt(ap)} "
                f"| {fmt(result['ap50_per_class'][c])} |"
            )
        lines.append(f"| **mean** | **{fmt(result['map'])}** | **{fmt(result['map_50'])}** |")
        return "\n".join(lines)
    raise ValueError(
        "result must come from evaluate_voc (has 'per_class') or evaluate_coco (has 'ap_per_class')"
    )
