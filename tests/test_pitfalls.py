"""The pitfall measurements measure the mechanism they name (rpnlab.lab.pitfalls)."""

import math

import pytest
import torch

from rpnlab.detector.boxes import box_iou
from rpnlab.lab import pitfalls


def _pairs(n=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    corner = torch.rand(n, 2, generator=g) * 100
    size = torch.rand(n, 2, generator=g) * 60 + 8
    boxes = torch.cat([corner, corner + size], dim=1)
    proposals = boxes + (torch.rand(n, 4, generator=g) - 0.5) * 0.3 * size.repeat(1, 2)
    return proposals, boxes


def test_plus_one_iou_counts_inclusive_pixels():
    a = torch.tensor([[0.0, 0.0, 9.0, 9.0]])  # pixels 0..9: 10 x 10 inclusive
    b = torch.tensor([[5.0, 0.0, 14.0, 9.0]])  # pixels 5..14
    assert pitfalls.iou_plus_one(a, b).item() == pytest.approx(50 / 150)
    assert box_iou(a, b).item() == pytest.approx(36 / 126)
    touching = torch.tensor([[9.0, 0.0, 18.0, 9.0]])  # shares one column of pixels
    assert pitfalls.iou_plus_one(a, touching).item() > 0 and box_iou(a, touching).item() == 0


def test_plus_one_convention_matters_most_for_small_boxes():
    rows = pitfalls.plus_one_convention(sizes=(4, 16, 128))["rows"]
    for row in rows:  # a box and its copy moved one pixel: (s - 1) / (s + 1) against s / (s + 2)
        s = row["size"]
        assert row["iou"] == pytest.approx((s - 1) / (s + 1))
        assert row["iou_plus_one"] == pytest.approx(s / (s + 2))
        assert row["tw"] == pytest.approx(math.log(0.5))  # anchor twice the box
        assert row["tw_plus_one"] == pytest.approx(math.log((s + 1) / (2 * s + 1)))
    gaps = [r["iou_plus_one"] - r["iou"] for r in rows]
    assert gaps[0] > gaps[1] > gaps[2] > 0
    assert rows[0]["mixed_iou"] < rows[-1]["mixed_iou"] < 1


def test_weights_are_target_normalisation_and_scale_the_loss():
    proposals, boxes = _pairs()
    out = pitfalls.target_normalisation(proposals, boxes)
    assert out["max_difference"] < 1e-12
    for raw, weighted, w in zip(out["std_raw"], out["std_weighted"], (10, 10, 5, 5)):
        assert weighted == pytest.approx(w * raw)
    assert out["loss_ratio"] > 3  # small raw targets sit in smooth L1's flat quadratic part
    same = pitfalls.target_normalisation(proposals, boxes, weights=(1.0, 1.0, 1.0, 1.0))
    assert same["loss_ratio"] == pytest.approx(1.0)


def test_per_batch_topk_lets_one_image_take_the_slots():
    g = torch.Generator().manual_seed(0)
    gt = [torch.tensor([[10.0, 10.0, 40.0, 40.0]]), torch.tensor([[60.0, 60.0, 90.0, 90.0]])]
    boxes = [torch.cat([gt[i], torch.rand(19, 2, generator=g).repeat(1, 2) * 50 + torch.tensor([0, 0, 5, 5])])
             for i in range(2)]
    scores = [torch.linspace(0.99, 0.9, 20), torch.linspace(0.6, 0.5, 20)]  # image 1 scores lower everywhere
    out = pitfalls.topk_per_image_vs_batch(boxes, scores, gt, k=5)
    assert out["per_image"]["kept"] == [5, 5] and out["per_image"]["recall"] == 1.0
    assert out["per_batch"]["kept"] == [10, 0] and out["per_batch"]["found"] == [1, 0]
    with pytest.raises(ValueError, match="k must be positive"):
        pitfalls.topk_per_image_vs_batch(boxes, scores, gt, k=0)


def test_score_threshold_leaves_boxes_without_proposals():
    gt = [torch.tensor([[10.0, 10.0, 40.0, 40.0], [60.0, 60.0, 90.0, 90.0]])]
    proposals = [torch.tensor([[11.0, 11.0, 40.0, 41.0], [59.0, 61.0, 90.0, 90.0], [0.0, 0.0, 5.0, 5.0]])]
    scores = [torch.tensor([0.9, 0.3, 0.2])]
    out = pitfalls.score_threshold_starvation(proposals, scores, gt, threshold=0.5)
    assert out["all"]["proposals"] == [3] and out["all"]["positives"] == [2]
    assert out["all"]["gt_without_proposal"] == 0
    assert out["thresholded"]["proposals"] == [1] and out["thresholded"]["gt_without_proposal"] == 0.5


def test_background_lower_threshold_drops_far_proposals():
    gt = [torch.tensor([[0.0, 0.0, 10.0, 10.0]])]
    proposals = [torch.tensor([[50.0, 50.0, 60.0, 60.0], [5.0, 0.0, 15.0, 10.0], [0.0, 0.0, 10.0, 10.0]])]
    out = pitfalls.background_candidates(proposals, gt, lows=(0.0, 0.1))
    assert out[0.0]["candidates"] == 2 and out[0.1]["candidates"] == 1  # IoU 0 and 1/3; the gt itself is fg
    assert out[0.1]["touching"] == 1.0 and out[0.0]["touching"] == 0.5


@pytest.mark.parametrize("scale", [1.0, 1 / 8, 1 / 16])
def test_roi_align_unaligned_reads_half_a_cell_off(scale):
    out = pitfalls.roi_align_shift([20.0, 30.0, 100.0, 90.0], spatial_scale=scale, size=int(128 * scale))
    assert out[True]["rpnlab"] == pytest.approx(0.0, abs=1e-9)
    assert out[False]["rpnlab"] == pytest.approx(0.5 / scale)
    for aligned in (False, True):
        assert out[aligned]["torchvision"] == pytest.approx(out[aligned]["rpnlab"], abs=1e-9)
