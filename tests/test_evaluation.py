"""Tests for rpnlab.engine.evaluation: hand-computed AP cases, a sequential VOC reference, pycocotools
agreement, proposal recall."""

import math

import numpy as np
import pytest
import torch

from rpnlab.detector.boxes import box_iou
from rpnlab.engine.evaluation import (
    DEFAULT_IOU_THRESHOLDS,
    evaluate_coco,
    evaluate_voc,
    per_class_ap_table,
    proposal_recall,
    voc_ap,
)


def det(boxes, scores, labels):
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "scores": torch.tensor(scores, dtype=torch.float32),
        "labels": torch.tensor(labels, dtype=torch.int64),
    }


def gt(boxes, labels, difficult=None):
    out = {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.int64),
    }
    if difficult is not None:
        out["difficult"] = torch.tensor(difficult, dtype=torch.bool)
    return out


# ------------------------------------------------------------------------------------------
# voc_ap on hand-made curves
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_07", [False, True])
def test_voc_ap_perfect_curve_is_one(use_07):
    assert voc_ap([0.5, 1.0], [1.0, 1.0], use_07) == pytest.approx(1.0)


@pytest.mark.parametrize("use_07", [False, True])
def test_voc_ap_fp_ranked_above_the_only_tp_is_half(use_07):
    # FP then TP with one gt: recall 0, 1 and precision 0, 1/2.
    assert voc_ap([0.0, 1.0], [0.0, 0.5], use_07) == pytest.approx(0.5)


def test_voc_ap_known_curve_both_metrics():
    recall = [0.2, 0.4, 0.4, 0.6]
    precision = [1.0, 1.0, 2 / 3, 0.6]
    # 11-point: t = 0..0.4 (5 levels) reach precision 1, t = 0.5, 0.6 reach 0.6, t >= 0.7 nothing.
    assert voc_ap(recall, precision, use_07_metric=True) == pytest.approx((5 * 1.0 + 2 * 0.6) / 11)
    # All-point: envelope 1 up to recall 0.4, 0.6 from 0.4 to 0.6, 0 after.
    assert voc_ap(recall, precision) == pytest.approx(0.4 * 1.0 + 0.2 * 0.6)


def test_voc_ap_11_point_counts_a_recall_of_exactly_0_3():
    # Thresholds are i / 10, so recall 3/10 reaches t = 0.3 (np.arange's 0.30000000000000004 would not).
    assert voc_ap([3 / 10], [1.0], use_07_metric=True) == pytest.approx(4 / 11)


@pytest.mark.parametrize("use_07", [False, True])
def test_voc_ap_empty_curve_is_zero(use_07):
    assert voc_ap([], [], use_07) == 0.0


def test_voc_ap_matches_sum_of_interpolated_precision_at_each_tp():
    # Independent formula for the all-point AP: (1 / npos) * sum over TPs of the best precision
    # at this rank or any later one.
    rng = np.random.default_rng(0)
    for _ in range(50):
        is_tp = rng.random(int(rng.integers(1, 40))) < rng.random()
        npos = int(is_tp.sum()) + int(rng.integers(0, 5))
        if npos == 0:
            continue
        tp, fp = np.cumsum(is_tp), np.cumsum(~is_tp)
        precision = tp / (tp + fp)
        expected = sum(precision[i:].max() for i in np.flatnonzero(is_tp)) / npos
        assert voc_ap(tp / npos, precision) == pytest.approx(expected, abs=1e-12)


def test_voc_ap_rejects_bad_curves():
    with pytest.raises(ValueError, match="same length"):
        voc_ap([0.1, 0.2], [1.0])
    with pytest.raises(ValueError, match="precision"):
        voc_ap([0.1], [1.5])


# ------------------------------------------------------------------------------------------
# evaluate_voc: tiny hand-computed cases
# ------------------------------------------------------------------------------------------


def test_perfect_detector_has_map_one():
    gts = [gt([[0, 0, 10, 10], [20, 20, 40, 50]], [1, 2]), gt([[5, 5, 30, 30]], [2])]
    dets = [
        det(g["boxes"].tolist(), [0.9, 0.3][: len(g["labels"])], g["labels"].tolist()) for g in gts
    ]
    for use_07 in (False, True):
        result = evaluate_voc(dets, gts, num_classes=2, use_07_metric=use_07)
        assert result["map"] == pytest.approx(1.0)
        assert result["ap"] == {1: pytest.approx(1.0), 2: pytest.approx(1.0)}
        assert [row["fp"] for row in result["per_class"]] == [0, 0]


def test_one_fp_above_one_tp_gives_half():
    gts = [gt([[0, 0, 10, 10]], [1])]
    dets = [det([[50, 50, 60, 60], [0, 0, 10, 10]], [0.9, 0.8], [1, 1])]
    assert evaluate_voc(dets, gts, 1)["map"] == pytest.approx(0.5)
    assert evaluate_voc(dets, gts, 1, use_07_metric=True)["map"] == pytest.approx(0.5)


def test_duplicate_detections_are_false_positives():
    gts = [gt([[0, 0, 10, 10], [20, 20, 30, 30]], [1, 1])]
    # TP on gt 0, a duplicate on gt 0, then TP on gt 1: precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1.
    dets = [det([[0, 0, 10, 10], [0, 0, 10, 10.5], [20, 20, 30, 30]], [0.9, 0.8, 0.7], [1, 1, 1])]
    result = evaluate_voc(dets, gts, 1)
    assert result["per_class"][0]["tp"] == 2 and result["per_class"][0]["fp"] == 1
    assert result["map"] == pytest.approx(0.5 * 1.0 + 0.5 * 2 / 3)


def test_duplicate_on_a_taken_gt_is_fp_even_if_another_gt_overlaps():
    # The devkit looks only at the best gt: det 2 prefers the taken gt 0 (IoU 0.95) over the free
    # gt 1 (IoU 0.875), so it is a duplicate (COCO would match it to gt 1).
    gts = [gt([[0, 0, 10, 10], [0, 0, 10, 12]], [1, 1])]
    dets = [det([[0, 0, 10, 10], [0, 0, 10, 10.5]], [0.9, 0.8], [1, 1])]
    result = evaluate_voc(dets, gts, 1)
    assert (result["per_class"][0]["tp"], result["per_class"][0]["fp"]) == (1, 1)
    assert result["map"] == pytest.approx(0.5)


def test_difficult_gt_is_ignored():
    boxes = [[0, 0, 10, 10], [20, 20, 30, 30]]
    # Highest-scored detection sits on the difficult box: neither TP nor FP.
    dets = [det(boxes, [0.9, 0.8], [1, 1])]
    result = evaluate_voc(dets, [gt(boxes, [1, 1], difficult=[False, True])], 1)
    row = result["per_class"][0]
    assert (row["num_gt"], row["num_difficult"], row["tp"], row["fp"], row["ignored"]) == (
        1,
        1,
        1,
        0,
        1,
    )
    assert result["map"] == pytest.approx(1.0)
    # A missed difficult box costs nothing, a missed ordinary box halves the recall.
    only_first = [det(boxes[:1], [0.9], [1])]
    assert evaluate_voc(only_first, [gt(boxes, [1, 1], [False, True])], 1)["map"] == pytest.approx(
        1.0
    )
    assert evaluate_voc(only_first, [gt(boxes, [1, 1], [False, False])], 1)["map"] == pytest.approx(
        0.5
    )


def test_empty_detections_give_ap_zero():
    gts = [gt([[0, 0, 10, 10]], [1]), gt([[0, 0, 5, 5]], [2])]
    dets = [det([], [], []), det([], [], [])]
    result = evaluate_voc(dets, gts, 2)
    assert result["map"] == 0.0 and result["ap"] == {1: 0.0, 2: 0.0}


def test_class_without_gt_is_nan_and_left_out_of_the_mean():
    gts = [gt([[0, 0, 10, 10]], [1])]
    dets = [det([[0, 0, 10, 10], [30, 30, 40, 40]], [0.9, 0.95], [1, 2])]
    result = evaluate_voc(dets, gts, 2)
    assert math.isnan(result["ap"][2])
    assert result["map"] == pytest.approx(1.0)


def test_detection_of_the_wrong_class_does_not_match():
    gts = [gt([[0, 0, 10, 10]], [1])]
    dets = [det([[0, 0, 10, 10]], [0.9], [2])]
    result = evaluate_voc(dets, gts, 2)
    assert result["ap"][1] == 0.0 and result["per_class"][1]["fp"] == 1


def test_iou_exactly_at_threshold_is_a_hit():
    gts = [gt([[0, 0, 10, 10]], [1])]
    dets = [det([[0, 0, 10, 5]], [0.9], [1])]  # IoU = 50 / 100
    assert evaluate_voc(dets, gts, 1, iou_threshold=0.5)["map"] == pytest.approx(1.0)
    assert evaluate_voc(dets, gts, 1, iou_threshold=0.51)["map"] == 0.0


def test_images_without_gt_or_detections():
    gts = [gt([], []), gt([[0, 0, 10, 10]], [1]), gt([], [])]
    dets = [det([[0, 0, 10, 10]], [0.5], [1]), det([[0, 0, 10, 10]], [0.9], [1]), det([], [], [])]
    result = evaluate_voc(dets, gts, 1)
    assert (result["per_class"][0]["tp"], result["per_class"][0]["fp"]) == (1, 1)
    assert result["map"] == pytest.approx(1.0)  # the FP ranks below the TP


@pytest.mark.parametrize(
    "dets, gts, match",
    [
        ([det([[0, 0, 1, 1]], [0.5], [0])], [gt([], [])], "1..2"),
        ([det([[0, 0, 1, 1]], [0.5], [3])], [gt([], [])], "1..2"),
        ([det([], [], [])], [gt([], []), gt([], [])], "one entry per image"),
        ([{"boxes": torch.zeros(0, 4)}], [gt([], [])], "missing"),
        ([det([[0, 0, 1, 1]], [0.5, 0.4], [1])], [gt([], [])], "one entry per box"),
        ([det([[2, 0, 1, 1]], [0.5], [1])], [gt([], [])], "x2 < x1"),
    ],
)
def test_evaluate_voc_rejects_bad_input(dets, gts, match):
    with pytest.raises(ValueError, match=match):
        evaluate_voc(dets, gts, 2)


# ------------------------------------------------------------------------------------------
# evaluate_voc against a sequential port of py-faster-rcnn's voc_eval
# ------------------------------------------------------------------------------------------


def reference_voc(dets, gts, num_classes, iou_threshold=0.5, use_07=False):
    """py-faster-rcnn's voc_eval loop (without its +1 widths, with the devkit's >= threshold)."""
    aps = {}
    for c in range(1, num_classes + 1):
        records, npos = {}, 0
        for i, g in enumerate(gts):
            keep = g["labels"] == c
            difficult = g.get("difficult", torch.zeros(len(g["labels"]), dtype=torch.bool))[keep]
            records[i] = {
                "boxes": g["boxes"][keep].double(),
                "difficult": difficult.tolist(),
                "det": [False] * int(keep.sum()),
            }
            npos += int((~difficult).sum())
        image_ids, confidence, boxes = [], [], []
        for i, d in enumerate(dets):
            keep = d["labels"] == c
            image_ids += [i] * int(keep.sum())
            confidence += d["scores"][keep].tolist()
            boxes += d["boxes"][keep].double().tolist()
        order = np.argsort(-np.array(confidence), kind="stable")
        tp, fp = np.zeros(len(order)), np.zeros(len(order))
        for rank, j in enumerate(order):
            rec = records[image_ids[j]]
            ovmax, jmax = -np.inf, -1
            if len(rec["boxes"]):
                overlaps = box_iou(torch.tensor([boxes[j]], dtype=torch.float64), rec["boxes"])[0]
                ovmax, jmax = float(overlaps.max()), int(overlaps.argmax())
            if ovmax >= iou_threshold:
                if not rec["difficult"][jmax]:
                    if not rec["det"][jmax]:
                        tp[rank] = 1
                        rec["det"][jmax] = True
                    else:
                        fp[rank] = 1
            else:
                fp[rank] = 1
        if npos == 0:
            continue
        keep = (tp + fp) > 0
        tp, fp = np.cumsum(tp[keep]), np.cumsum(fp[keep])
        aps[c] = voc_ap(tp / npos, tp / np.maximum(tp + fp, np.finfo(np.float64).eps), use_07)
    return aps


def random_scene(
    seed, num_images=30, num_classes=3, jitter=0.15, p_difficult=0.0, disjoint=False, fps=3
):
    """Random gt boxes; detections = jittered gt (some duplicated) plus random false positives."""
    g = torch.Generator().manual_seed(seed)
    gts, dets = [], []
    for _ in range(num_images):
        m = int(torch.randint(0, 7, (1,), generator=g))
        if disjoint:  # one box per cell of a 4 x 4 grid of 64-pixel cells: no two gt overlap
            cells = torch.randperm(16, generator=g)[:m]
            xy = (
                torch.stack([cells % 4, cells // 4], dim=1).float() * 64
                + torch.rand(m, 2, generator=g) * 8
            )
            wh = torch.rand(m, 2, generator=g) * 40 + 12
        else:
            xy = torch.rand(m, 2, generator=g) * 200
            wh = torch.rand(m, 2, generator=g) * 80 + 8
        boxes = torch.cat([xy, xy + wh], dim=1)
        labels = torch.randint(1, num_classes + 1, (m,), generator=g)
        difficult = torch.rand(m, generator=g) < p_difficult
        gts.append({"boxes": boxes, "labels": labels, "difficult": difficult})

        dup = torch.rand(m, generator=g) < 0.2
        src = torch.cat([torch.arange(m), torch.arange(m)[dup]])
        centre = (boxes[src, :2] + boxes[src, 2:]) / 2 + torch.randn(len(src), 2, generator=g) * wh[
            src
        ] * jitter
        size = wh[src] * torch.exp(torch.randn(len(src), 2, generator=g) * jitter)
        jittered = torch.cat([centre - size / 2, centre + size / 2], dim=1)
        fp_xy = torch.rand(fps, 2, generator=g) * 200
        fp_boxes = torch.cat([fp_xy, fp_xy + torch.rand(fps, 2, generator=g) * 60 + 5], dim=1)
        dets.append(
            {
                "boxes": torch.cat([jittered, fp_boxes]),
                "scores": torch.rand(len(src) + fps, generator=g),
                "labels": torch.cat(
                    [labels[src], torch.randint(1, num_classes + 1, (fps,), generator=g)]
                ),
            }
        )
    return dets, gts


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("use_07", [False, True])
def test_evaluate_voc_matches_sequential_reference(seed, use_07):
    dets, gts = random_scene(seed, p_difficult=0.2, jitter=0.2)
    for threshold in (0.5, 0.7):
        result = evaluate_voc(dets, gts, 3, iou_threshold=threshold, use_07_metric=use_07)
        expected = reference_voc(dets, gts, 3, threshold, use_07)
        assert set(expected) == {c for c, ap in result["ap"].items() if not math.isnan(ap)}
        for c, ap in expected.items():
            assert result["ap"][c] == pytest.approx(ap, abs=1e-12)


def test_evaluate_voc_does_not_depend_on_detection_order():
    dets, gts = random_scene(7, p_difficult=0.2)
    g = torch.Generator().manual_seed(1)
    shuffled = []
    for d in dets:
        perm = torch.randperm(len(d["scores"]), generator=g)
        shuffled.append({k: v[perm] for k, v in d.items()})
    assert evaluate_voc(shuffled, gts, 3)["ap"] == pytest.approx(
        evaluate_voc(dets, gts, 3)["ap"], abs=1e-12
    )


# ------------------------------------------------------------------------------------------
# evaluate_coco (pycocotools)
# ------------------------------------------------------------------------------------------


def coco_101_point_ap(recall, precision):
    """COCOeval.accumulate's interpolation: envelope sampled at recall 0, 0.01, ..., 1."""
    envelope = np.maximum.accumulate(np.asarray(precision)[::-1])[::-1]
    idx = np.searchsorted(recall, np.linspace(0, 1, 101), side="left")
    return np.where(idx < len(envelope), envelope[np.minimum(idx, len(envelope) - 1)], 0.0).mean()


@pytest.mark.parametrize("seed", [0, 1])
def test_coco_ap50_equals_101_point_interpolation_of_our_curve(seed):
    # With disjoint gt boxes VOC's and COCO's matching rules coincide, so the only difference
    # left is the interpolation: sampling our PR curve at COCO's 101 points must give COCO's AP.
    dets, gts = random_scene(seed, disjoint=True)
    voc = evaluate_voc(dets, gts, 3)
    coco = evaluate_coco(dets, gts, 3)
    for c in (1, 2, 3):
        curve = voc["curves"][c]
        assert coco["ap50_per_class"][c] == pytest.approx(
            coco_101_point_ap(curve["recall"], curve["precision"]), abs=1e-9
        )


@pytest.mark.parametrize("seed", range(3))
def test_hand_written_ap50_agrees_with_pycocotools(seed):
    # All-point area vs COCO's 101-point sampling: each class differs by at most about 1/101 of
    # the curve's height (plus rare differences from COCO re-matching duplicates to a free gt
    # box), so the APs agree to ~0.01 (measured: <= 0.006 per class on these scenes).
    dets, gts = random_scene(seed + 10, jitter=0.1)
    voc = evaluate_voc(dets, gts, 3)
    coco = evaluate_coco(dets, gts, 3)
    assert (
        0.3 < voc["map"] < 0.95
    )  # a curve with both hits and misses, so the check means something
    assert coco["map_50"] == pytest.approx(voc["map"], abs=0.01)
    for c in (1, 2, 3):
        assert coco["ap50_per_class"][c] == pytest.approx(voc["ap"][c], abs=0.02)


def test_coco_perfect_detector_and_quiet_stdout(capsys):
    gts = [gt([[0, 0, 10, 10], [20, 20, 60, 80]], [1, 2]), gt([[5, 5, 300, 300]], [1])]
    dets = [det(g["boxes"].tolist(), [0.9] * len(g["labels"]), g["labels"].tolist()) for g in gts]
    result = evaluate_coco(dets, gts)  # num_classes inferred: 2
    assert capsys.readouterr().out == ""
    for key in ("map", "map_50", "map_75", "mar_100"):
        assert result[key] == pytest.approx(1.0)
    assert result["map_small"] == pytest.approx(1.0) and result["map_large"] == pytest.approx(1.0)
    assert result["map_medium"] == pytest.approx(1.0)
    assert set(result["ap_per_class"]) == {1, 2}
    assert "Average Precision" in result["summary"]


def test_coco_no_detections_gives_zeros():
    gts = [gt([[0, 0, 10, 10]], [1]), gt([], [])]
    result = evaluate_coco([det([], [], []), det([], [], [])], gts, 2)
    assert all(result[k] == 0.0 for k in ("map", "map_50", "map_75", "map_small", "mar_100"))
    assert result["ap_per_class"] == {1: 0.0, 2: 0.0}


def test_coco_images_without_gt_and_difficult_as_crowd():
    boxes = [[0, 0, 40, 40], [100, 100, 140, 140]]
    gts = [gt(boxes, [1, 1], difficult=[False, True]), gt([], [])]
    # Top-scored detection on the difficult (crowd) box: ignored, so AP stays 1.
    dets = [det(boxes, [0.9, 0.95], [1, 1]), det([], [], [])]
    assert evaluate_coco(dets, gts, 1)["map_50"] == pytest.approx(1.0)
    # A detection in an image without gt is a false positive, ranked first here: AP drops.
    dets[1] = det([[0, 0, 40, 40]], [0.99], [1])
    result = evaluate_coco(dets, gts, 1)
    assert result["map_50"] == pytest.approx(evaluate_voc(dets, gts, 1)["map"], abs=0.02)
    assert result["map_50"] < 0.6


# ------------------------------------------------------------------------------------------
# proposal_recall
# ------------------------------------------------------------------------------------------


def test_proposal_recall_hand_made():
    gts = [torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30]])]
    # far away, exact on gt 0, IoU 100/160 = 0.625 with gt 1
    props = [torch.tensor([[50.0, 50, 60, 60], [0, 0, 10, 10], [20, 20, 30, 36]])]
    r = proposal_recall(props, gts, num_proposals=(1, 2, 3, 100))
    assert r["recall_50"].tolist() == [0.0, 0.5, 1.0, 1.0]
    assert r["recall_70"].tolist() == [0.0, 0.5, 0.5, 0.5]
    # At N = 3: gt 0 recalled at all 10 thresholds, gt 1 at 0.5, 0.55, 0.6 only.
    assert r["average_recall"][2].item() == pytest.approx((1.0 + 0.3) / 2)
    assert r["recall"].shape == (4, 10) and r["iou_thresholds"] == list(DEFAULT_IOU_THRESHOLDS)
    assert r["best_iou"][2].tolist() == pytest.approx([1.0, 0.625])
    assert r["num_gt"] == 2


def test_proposal_recall_empty_images():
    gts = [torch.tensor([[0.0, 0, 10, 10]]), torch.zeros(0, 4), torch.tensor([[0.0, 0, 10, 10]])]
    props = [torch.zeros(0, 4), torch.tensor([[0.0, 0, 5, 5]]), torch.tensor([[0.0, 0, 10, 10]])]
    r = proposal_recall(props, gts, num_proposals=(1, 5))
    assert r["num_gt"] == 2
    assert r["recall_50"].tolist() == [0.5, 0.5]
    nothing = proposal_recall([torch.zeros(0, 4)], [torch.zeros(0, 4)])
    assert nothing["num_gt"] == 0 and torch.isnan(nothing["recall_50"]).all()


def test_proposal_recall_matches_brute_force_on_random_data():
    g = torch.Generator().manual_seed(0)
    from tests.conftest import random_boxes

    props = [random_boxes(int(torch.randint(0, 300, (1,), generator=g)), 200, g) for _ in range(5)]
    gts = [random_boxes(int(torch.randint(0, 8, (1,), generator=g)), 200, g) for _ in range(5)]
    counts = (1, 10, 50, 100, 1000)
    r = proposal_recall(props, gts, num_proposals=counts)
    for row, n in enumerate(counts):
        best = torch.cat(
            [
                box_iou(p[:n], b).max(dim=0).values if len(p) else torch.zeros(len(b))
                for p, b in zip(props, gts)
                if len(b)
            ]
        )
        assert r["best_iou"][row].tolist() == pytest.approx(best.tolist(), abs=1e-6)
        assert r["recall_70"][row].item() == pytest.approx((best >= 0.7).double().mean().item())
    # More proposals never lower the recall.
    assert (r["recall"].diff(dim=0) >= 0).all()


def test_proposal_recall_rejects_bad_input():
    with pytest.raises(ValueError, match="one entry per image"):
        proposal_recall([torch.zeros(0, 4)], [])
    with pytest.raises(ValueError, match="num_proposals"):
        proposal_recall([torch.zeros(0, 4)], [torch.zeros(0, 4)], num_proposals=(0,))
    with pytest.raises(ValueError, match="proposals"):
        proposal_recall([torch.zeros(3, 5)], [torch.zeros(0, 4)])


# ------------------------------------------------------------------------------------------
# per_class_ap_table
# ------------------------------------------------------------------------------------------


def test_per_class_ap_table():
    gts = [gt([[0, 0, 10, 10]], [1])]
    dets = [det([[50, 50, 60, 60], [0, 0, 10, 10]], [0.9, 0.8], [1, 1])]
    table = per_class_ap_table(evaluate_voc(dets, gts, 2), ["circle", "square"])
    lines = table.splitlines()
    assert lines[0].startswith("| class | AP")
    assert lines[2].startswith("| circle | 50.0 | 1 |")
    assert lines[3].startswith("| square | - | 0 |")  # no gt: no AP
    assert lines[-1].startswith("| **mAP** | **50.0**")
    coco_table = per_class_ap_table(evaluate_coco(dets, gts, 2), ["bg", "circle", "square"])
    assert "| circle |" in coco_table and coco_table.splitlines()[-1].startswith("| **mean** |")
    with pytest.raises(ValueError, match="class_names"):
        per_class_ap_table(evaluate_voc(dets, gts, 2), ["only one", "two", "three", "four"])
