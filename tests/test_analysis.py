"""Tests for rpnlab.lab.anchors: anchor coverage, dataset gathering, k-means anchors, label counts."""

import math

import pytest
import torch

from rpnlab.config import AnchorConfig
from rpnlab.detector.anchors import AnchorGenerator
from rpnlab.detector.boxes import box_iou, box_iou_reduce
from rpnlab.lab.anchors import (
    anchor_coverage,
    best_anchor_iou,
    coverage_over_dataset,
    dataset_gt_boxes,
    default_feature_sizes,
    kmeans_anchors,
    mean_best_iou,
    wh_iou,
    wh_to_sizes_ratios,
)
from rpnlab.lab.matching import label_counts
from tests.conftest import random_boxes

# ------------------------------------------------------------------------------------------
# best_anchor_iou / anchor_coverage
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(8))
def test_best_anchor_iou_matches_full_iou_matrix(seed):
    g = torch.Generator().manual_seed(seed)
    anchors = random_boxes(int(torch.randint(1, 3000, (1,), generator=g)), 300, g)
    gt = random_boxes(int(torch.randint(1, 200, (1,), generator=g)), 300, g)
    expected = box_iou(gt, anchors).max(dim=1).values
    best = best_anchor_iou(anchors, gt)
    assert best.shape == (gt.shape[0],)
    torch.testing.assert_close(best, expected, rtol=0, atol=1e-6)
    # The same as the reduction the matcher uses, with the gt boxes as rows.
    torch.testing.assert_close(best, box_iou_reduce(gt, anchors)[0], rtol=0, atol=1e-6)


def test_best_anchor_iou_many_anchors_uses_small_blocks():
    # More anchors than one block holds: one gt box per block must still be exact.
    g = torch.Generator().manual_seed(0)
    anchors = random_boxes(600_000, 1000, g)
    gt = random_boxes(3, 1000, g)
    torch.testing.assert_close(
        best_anchor_iou(anchors, gt), box_iou(gt, anchors).max(dim=1).values, rtol=0, atol=1e-6
    )


def test_identical_anchor_gives_iou_one():
    anchors = torch.tensor([[0.0, 0, 16, 16], [10, 10, 50, 30], [100, 100, 200, 300]])
    gt = torch.tensor([[10.0, 10, 50, 30], [0, 0, 8, 16]])
    best = best_anchor_iou(anchors, gt)
    assert best.tolist() == pytest.approx([1.0, 0.5])


def test_best_anchor_iou_edge_cases():
    anchors = torch.tensor([[0.0, 0, 10, 10], [5, 5, 5, 5]])  # the second has zero area
    # zero-area gt on a zero-area anchor: union 0 -> IoU 0, not NaN; a gt outside every anchor: 0
    gt = torch.tensor([[5.0, 5, 5, 5], [200, 200, 220, 220], [-10, -10, 10, 10]])
    best = best_anchor_iou(anchors, gt)
    assert not torch.isnan(best).any()
    assert best.tolist() == pytest.approx([0.0, 0.0, 0.25])
    assert best_anchor_iou(torch.zeros(0, 4), gt).tolist() == [0.0, 0.0, 0.0]
    assert best_anchor_iou(anchors, torch.zeros(0, 4)).shape == (0,)
    assert best_anchor_iou(anchors[:1], gt[2:]).tolist() == pytest.approx([0.25])  # a single anchor
    assert best_anchor_iou(anchors.double(), gt.double()).dtype == torch.float64


def test_best_anchor_iou_rejects_bad_input():
    with pytest.raises(ValueError, match="anchors"):
        best_anchor_iou(torch.zeros(3, 5), torch.zeros(1, 4))
    with pytest.raises(TypeError, match="gt_boxes"):
        best_anchor_iou(torch.zeros(3, 4), [[0, 0, 1, 1]])


def test_anchor_coverage_hand_made():
    anchors = torch.tensor([[0.0, 0, 10, 10], [100, 100, 110, 110]])
    gt = torch.tensor(
        [
            [0.0, 0, 10, 10],  # IoU 1
            [100, 100, 110, 116],  # 100 / 160 = 0.625
            [0, 0, 20, 20],  # 100 / 400 = 0.25
        ]
    )
    cov = anchor_coverage(anchors, gt)
    assert cov["best_iou"].tolist() == pytest.approx([1.0, 0.625, 0.25])
    assert cov["mean_best_iou"] == pytest.approx((1.0 + 0.625 + 0.25) / 3)
    assert cov["covered"] == {0.5: pytest.approx(2 / 3), 0.7: pytest.approx(1 / 3)}
    assert anchor_coverage(anchors, gt, thresholds=(0.25,))["covered"] == {0.25: pytest.approx(1.0)}
    empty = anchor_coverage(anchors, torch.zeros(0, 4))
    assert math.isnan(empty["mean_best_iou"]) and math.isnan(empty["covered"][0.5])


# ------------------------------------------------------------------------------------------
# Datasets
# ------------------------------------------------------------------------------------------


class FakeDataset:
    """(image, target) samples of given sizes; box i of image j is a known box."""

    def __init__(self, sizes, boxes):
        self.sizes, self.boxes = sizes, boxes

    def __len__(self):
        return len(self.sizes)

    def __getitem__(self, i):
        h, w = self.sizes[i]
        b = torch.tensor(self.boxes[i], dtype=torch.float32).reshape(-1, 4)
        return torch.zeros(3, h, w), {"boxes": b, "labels": torch.arange(1, len(b) + 1)}


def fake_dataset():
    return FakeDataset(
        [(100, 130), (64, 64), (100, 130), (64, 64)],
        [
            [[0, 0, 50, 60], [10, 20, 100, 90]],
            [],
            [[30, 30, 40, 40]],
            [[0, 0, 64, 64], [5, 5, 30, 20], [1, 2, 3, 4]],
        ],
    )


def test_dataset_gt_boxes():
    boxes, labels, sizes = dataset_gt_boxes(fake_dataset())
    assert boxes.shape == (6, 4) and labels.tolist() == [1, 2, 1, 1, 2, 3]
    assert boxes[2].tolist() == [30, 30, 40, 40]
    assert sizes == [(100, 130), (64, 64), (100, 130), (64, 64)]
    boxes, labels, sizes = dataset_gt_boxes(fake_dataset(), max_images=2)
    assert boxes.shape == (2, 4) and len(sizes) == 2
    boxes, labels, sizes = dataset_gt_boxes(fake_dataset(), max_images=0)
    assert boxes.shape == (0, 4) and labels.shape == (0,) and sizes == []


def test_default_feature_sizes_round_up():
    assert default_feature_sizes((100, 130), (16,)) == [(7, 9)]
    assert default_feature_sizes((64, 64), (16, 32)) == [(4, 4), (2, 2)]


def test_coverage_over_dataset_matches_per_image_computation():
    gen = AnchorGenerator(sizes=(16, 32, 64), aspect_ratios=(0.5, 1.0, 2.0), strides=(16,))
    ds = fake_dataset()
    result = coverage_over_dataset(gen, ds)
    expected = []
    for i in range(len(ds)):
        image, target = ds[i]
        h, w = image.shape[-2:]
        anchors = gen([(math.ceil(h / 16), math.ceil(w / 16))])
        expected.append(
            box_iou(target["boxes"], anchors).max(dim=1).values
            if len(target["boxes"])
            else torch.zeros(0)
        )
    torch.testing.assert_close(result["best_iou"], torch.cat(expected), rtol=0, atol=1e-6)
    assert result["image_index"].tolist() == [0, 0, 2, 3, 3, 3]
    assert result["num_images"] == 4 and result["num_gt"] == 6
    # One anchor grid per image size: 7 x 9 and 4 x 4 cells, 9 anchors per cell.
    assert result["num_anchors"] == {(100, 130): 7 * 9 * 9, (64, 64): 4 * 4 * 9}
    assert result["mean_best_iou"] == pytest.approx(float(torch.cat(expected).mean()))
    assert result["covered"][0.5] == pytest.approx(
        float((torch.cat(expected) >= 0.5).float().mean())
    )


def test_coverage_over_dataset_from_config_and_custom_feature_sizes():
    cfg = AnchorConfig(sizes=(32,), aspect_ratios=(1.0,), strides=(16,))
    ds = fake_dataset()
    by_config = coverage_over_dataset(cfg, ds)
    by_generator = coverage_over_dataset(AnchorGenerator.from_config(cfg), ds)
    torch.testing.assert_close(by_config["best_iou"], by_generator["best_iou"])
    # Flooring the feature size (a backbone that rounds down) drops a row and a column of anchors.
    floored = coverage_over_dataset(cfg, ds, feature_size_fn=lambda s: [(s[0] // 16, s[1] // 16)])
    assert floored["num_anchors"][(100, 130)] == 6 * 8
    # A coarser stride gives a coarser grid.
    coarse = coverage_over_dataset(cfg, ds, stride=32)
    assert coarse["num_anchors"][(100, 130)] == 4 * 5
    with pytest.raises(TypeError, match="anchor_generator"):
        coverage_over_dataset("paper", ds)


# ------------------------------------------------------------------------------------------
# k-means anchors
# ------------------------------------------------------------------------------------------


def test_wh_iou_hand_made():
    iou = wh_iou(
        torch.tensor([[10.0, 10.0]]), torch.tensor([[5.0, 20.0], [10.0, 10.0], [20.0, 20.0]])
    )
    assert iou.tolist() == [pytest.approx([50 / 150, 1.0, 100 / 400])]


def clustered_wh(seed=0, per_cluster=60):
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[12.0, 10.0], [60.0, 25.0], [90.0, 200.0]])
    noise = torch.exp(torch.randn(3, per_cluster, 2, generator=g) * 0.05)  # +-5% in size
    wh = (centres[:, None, :] * noise).reshape(-1, 2)
    return wh[torch.randperm(wh.shape[0], generator=g)], centres


@pytest.mark.parametrize("seed", range(5))
def test_kmeans_recovers_well_separated_clusters(seed):
    wh, centres = clustered_wh(seed)
    found = kmeans_anchors(wh, 3, seed=seed)
    assert found.shape == (3, 2)
    # Sorted by area, the clusters come back within a few percent.
    torch.testing.assert_close(found, centres, rtol=0.05, atol=0)
    assert mean_best_iou(wh, found) > 0.85
    assert mean_best_iou(wh, found) > mean_best_iou(wh, found[:2])


def test_kmeans_is_deterministic_and_sorted_by_area():
    g = torch.Generator().manual_seed(3)
    wh = torch.rand(300, 2, generator=g) * 100 + 4
    a = kmeans_anchors(wh, 5, seed=7)
    b = kmeans_anchors(wh, 5, seed=7)
    assert torch.equal(a, b)
    area = a[:, 0] * a[:, 1]
    assert (area.diff() >= 0).all()
    assert a.dtype == wh.dtype


def test_kmeans_edge_cases():
    wh = torch.tensor([[10.0, 10.0], [20.0, 40.0], [80.0, 30.0]])
    # As many clusters as boxes: every box is its own centre.
    assert mean_best_iou(wh, kmeans_anchors(wh, 3)) == pytest.approx(1.0)
    one = kmeans_anchors(wh, 1)
    assert one.shape == (1, 2)
    # Identical boxes: the only possible answer, whatever k.
    same = torch.tensor([[8.0, 4.0]] * 5)
    assert kmeans_anchors(same, 2).tolist() == [[8.0, 4.0], [8.0, 4.0]]
    with pytest.raises(ValueError, match="k must be"):
        kmeans_anchors(wh, 4)
    with pytest.raises(ValueError, match="gt_wh"):
        kmeans_anchors(torch.tensor([[10.0, 0.0]]), 1)
    with pytest.raises(ValueError, match="gt_wh"):
        kmeans_anchors(torch.zeros(3, 4), 1)


def test_wh_to_sizes_ratios():
    sizes, ratios = wh_to_sizes_ratios(torch.tensor([[2.0, 8.0], [10.0, 10.0]]))
    assert sizes == pytest.approx((4.0, 10.0)) and ratios == pytest.approx((4.0, 1.0))
    _, ratios_wh = wh_to_sizes_ratios(torch.tensor([[2.0, 8.0]]), ratio_convention="w/h")
    assert ratios_wh == pytest.approx((0.25,))
    # The result feeds an AnchorConfig as is, and its anchors have the k-means shape.
    sizes, ratios = wh_to_sizes_ratios(torch.tensor([[20.0, 80.0]]))
    base = AnchorGenerator(
        sizes=sizes, aspect_ratios=ratios, strides=(16,), round_base=False
    ).base_anchors()
    assert (base[0, 2:] - base[0, :2]).tolist() == pytest.approx([20.0, 80.0], rel=1e-5)


# ------------------------------------------------------------------------------------------
# label_counts
# ------------------------------------------------------------------------------------------


def test_label_counts():
    labels = torch.tensor([1.0, 0, 0, -1, 1, 0])
    assert label_counts(labels) == {"positive": 2, "negative": 3, "ignored": 1}
    batch = torch.stack([labels, torch.tensor([0.0, 0, 0, 0, 0, -1])])
    assert label_counts(batch) == {"positive": [2, 0], "negative": [3, 5], "ignored": [1, 1]}
    assert label_counts([labels, labels[:2]]) == {
        "positive": [2, 1],
        "negative": [3, 1],
        "ignored": [1, 0],
    }
    matched = torch.tensor([3, -1, -2, 0, -1])
    assert label_counts(matched, convention="matched_idxs") == {
        "positive": 2,
        "negative": 2,
        "ignored": 1,
    }
    assert label_counts(torch.zeros(0)) == {"positive": 0, "negative": 0, "ignored": 0}


def test_label_counts_rejects_unknown_codes():
    with pytest.raises(ValueError, match="labels"):
        label_counts(torch.tensor([1, 0, 2]))
    with pytest.raises(ValueError, match="convention"):
        label_counts(torch.tensor([1, 0]), convention="other")
    with pytest.raises(TypeError):
        label_counts([[1, 0]])
