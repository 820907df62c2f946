"""The batched anchor targets and the fixed-size sampler against the per-image teaching path and torchvision."""

import pytest
import torch
from torchvision.models.detection._utils import BoxCoder as TVBoxCoder
from torchvision.models.detection._utils import Matcher as TVMatcher
from torchvision.ops import box_iou as tv_box_iou

from rpnlab.config import AnchorConfig
from rpnlab.detector import targets as targets_module
from rpnlab.detector.anchors import AnchorGenerator
from rpnlab.detector.boxes import BoxCoder, box_iou
from rpnlab.detector.matching import BalancedSampler, Matcher, label_anchors_batch
from rpnlab.detector.targets import batched_box_iou, label_anchors_batched, pad_boxes
from tests.conftest import random_boxes

MATCHERS = [Matcher(), Matcher(0.7, 0.3, False), Matcher(0.5, 0.5, True), Matcher(0.7, 0.3, True, 1e-6)]


def _batch(g, counts, n_anchors=400):
    anchors = random_boxes(n_anchors, size=140.0, generator=g) - 20.0
    # duplicated anchors make the low-quality ties that the rule must keep
    anchors[1::7] = anchors[0::7][: anchors[1::7].shape[0]]
    gts = [random_boxes(m, generator=g) for m in counts]
    sizes = [(100, 100), (80, 120), (100, 60), (64, 64), (90, 90)][: len(counts)]
    return anchors, gts, sizes


def test_batched_iou_is_box_iou_bit_for_bit(gen):
    anchors = random_boxes(300, generator=gen)
    gts = [random_boxes(m, generator=gen) for m in (4, 0, 7)]
    padded, valid = pad_boxes(gts)
    assert padded.shape == (3, 7, 4) and valid.sum(dim=1).tolist() == [4, 0, 7]
    iou = batched_box_iou(padded, anchors)
    for i, g in enumerate(gts):
        assert torch.equal(iou[i, : g.shape[0]], box_iou(anchors, g).T)
    assert torch.allclose(iou[2], tv_box_iou(gts[2], anchors))


# The CPU's two ways to find the low-quality ties: a second sweep over the stored IoU (small
# matrices) and the IoU of the tiles where a gt reaches its best, computed again (large ones).
TIE_PATHS = {"stored": 1 << 40, "recomputed": 0}


@pytest.fixture(params=list(TIE_PATHS), ids=list(TIE_PATHS))
def tie_path(request, monkeypatch):
    monkeypatch.setattr(targets_module, "RECOMPUTE_ABOVE_VALUES", TIE_PATHS[request.param])
    return request.param


@pytest.mark.parametrize("matcher", MATCHERS, ids=repr)
@pytest.mark.parametrize("cross", [False, True])
@pytest.mark.parametrize("seed", range(3))
def test_batched_labels_equal_per_image(matcher, cross, seed, tie_path):
    g = torch.Generator().manual_seed(seed)
    anchors, gts, sizes = _batch(g, [3, 0, 1, 12, 5])
    ref = label_anchors_batch(anchors, gts, matcher, sizes, cross)
    # one pass; groups; some images alone per image; tiles of 64 anchors
    for budget, tile in ((1 << 24, 1 << 16), (2 * 12 * 400, 1 << 16), (5 * 400, 1 << 16), (1 << 24, 1)):
        out = label_anchors_batched(anchors, gts, matcher, sizes, cross, max_iou_values=budget, tile_values=tile)
        assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1]), budget


@pytest.mark.parametrize("matcher", MATCHERS, ids=repr)
@pytest.mark.parametrize("cross", [False, True])
@pytest.mark.parametrize("seed", range(2))
def test_grid_anchors_separable_iou_equals_per_image(matcher, cross, seed, tie_path):
    # A real anchor grid (20 x 30 locations at stride 16, 9 shapes, many crossing the border):
    # the separable overlaps give the teaching path's labels and boxes bit for bit, in one pass,
    # in groups and in tiles of single rows.
    g = torch.Generator().manual_seed(seed)
    anchors = AnchorGenerator.from_config(AnchorConfig())([(20, 30)])
    gts = [random_boxes(m, size=400.0, generator=g) for m in (3, 0, 1, 12, 5)]
    gts[0][1] = anchors[2000]  # a gt equal to an anchor (IoU exactly 1)
    sizes = [(320, 480), (300, 470), (280, 420), (320, 400), (264, 480)]
    ref = label_anchors_batch(anchors, gts, matcher, sizes, cross)
    a = anchors.shape[0]
    for budget, tile in ((1 << 24, 1 << 16), (2 * 12 * a, 1 << 16), (1 << 24, 1)):
        out = label_anchors_batched(anchors, gts, matcher, sizes, cross, max_iou_values=budget,
                                    tile_values=tile, grid=(20, 30))
        assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1]), (budget, tile)
    assert (ref[0] == 1).any() and (ref[0] == 0).any()  # the case has positives and negatives


def test_grid_that_does_not_fit_the_anchors_is_refused():
    anchors = AnchorGenerator.from_config(AnchorConfig())([(6, 9)])
    gts = [random_boxes(2, size=150.0)]
    with pytest.raises(ValueError, match="grid"):
        label_anchors_batched(anchors, gts, Matcher(), grid=(9, 6))  # columns and rows swapped
    with pytest.raises(ValueError, match="grid"):
        label_anchors_batched(anchors, gts, Matcher(), grid=(5, 9))  # does not divide
    with pytest.raises(ValueError, match="grid"):
        label_anchors_batched(anchors, gts, Matcher(), grid=(6, 0))


def test_batched_labels_equal_torchvision_rpn_targets(gen):
    anchors, gts, _ = _batch(gen, [3, 6, 1])
    labels, matched = label_anchors_batched(anchors, gts, Matcher())
    tv_matcher, tv_coder = TVMatcher(0.7, 0.3, True), TVBoxCoder((1.0, 1.0, 1.0, 1.0))
    ours = BoxCoder().encode(anchors, matched)
    for i, gt in enumerate(gts):
        idx = tv_matcher(tv_box_iou(gt, anchors))
        tv_labels = (idx >= 0).float()
        tv_labels[idx == TVMatcher.BETWEEN_THRESHOLDS] = -1
        tv_boxes = gt[idx.clamp(min=0)]
        assert torch.equal(labels[i], tv_labels) and torch.equal(matched[i], tv_boxes)
        pos = labels[i] == 1
        assert torch.allclose(ours[i][pos], tv_coder.encode_single(tv_boxes, anchors)[pos], atol=1e-6)


def test_batched_labels_edge_cases(gen):
    anchors = random_boxes(50, generator=gen)
    labels, matched = label_anchors_batched(anchors, [torch.zeros(0, 4)] * 2, Matcher())
    assert (labels == 0).all() and (matched == 0).all() and matched.shape == (2, 50, 4)
    labels, matched = label_anchors_batched(anchors, [], Matcher())
    assert labels.shape == (0, 50) and matched.shape == (0, 50, 4)
    with pytest.raises(ValueError, match="image_sizes"):
        label_anchors_batched(anchors, [anchors[:2]], Matcher(), ignore_cross_boundary=True)
    with pytest.raises(ValueError, match="max_iou_values"):
        label_anchors_batched(anchors, [anchors[:2]], Matcher(), max_iou_values=0)
    with pytest.raises(TypeError, match="gt_boxes_list"):
        label_anchors_batched(anchors, torch.zeros(2, 3, 4), Matcher())


@pytest.mark.parametrize("batch, frac", [(256, 0.5), (16, 0.25), (1000, 0.5), (8, 1.0)])
@pytest.mark.parametrize("seed", range(3))
def test_sample_batch_equals_per_image_keys(batch, frac, seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(-1, 2, (4, 900), generator=g).float()
    labels[1] = torch.where(labels[1] == 1, 0.0, labels[1])  # an image without positives
    labels[2, 5:] = -1  # an image with almost nothing to sample
    labels[3] = torch.where(torch.rand(900, generator=g) < 0.02, 1.0, labels[3].clamp(max=0))
    pos, neg = BalancedSampler(batch, frac, torch.Generator().manual_seed(7)).sample_batch(labels)
    ref = BalancedSampler(batch, frac, torch.Generator().manual_seed(7), draw="keys")(list(labels))
    assert torch.equal(pos, torch.stack(ref[0])) and torch.equal(neg, torch.stack(ref[1]))
    # torchvision's counts: positives capped at batch * frac, negatives fill the rest
    for i in range(4):
        n_pos, n_neg = int((labels[i] == 1).sum()), int((labels[i] == 0).sum())
        assert int(pos[i].sum()) == min(n_pos, int(batch * frac))
        assert int(neg[i].sum()) == min(n_neg, batch - int(pos[i].sum()))
        assert (labels[i][pos[i]] == 1).all() and (labels[i][neg[i]] == 0).all()


def test_sample_batch_is_uniform_over_candidates():
    labels = torch.zeros(1, 20)
    labels[0, :10] = 1
    counts = torch.zeros(20)
    sampler = BalancedSampler(6, 0.5, torch.Generator().manual_seed(0))
    for _ in range(400):
        pos, neg = sampler.sample_batch(labels)
        counts += (pos | neg)[0].float()
    # each of 10 positives is taken 3/10 of the time, each negative 3/10: 120 of 400, sd ~9
    assert (counts - 120).abs().max() < 45
    with pytest.raises(ValueError, match="labels"):
        sampler.sample_batch(torch.zeros(5))
    with pytest.raises(ValueError, match="draw"):
        BalancedSampler(draw="shuffle")


@pytest.mark.parametrize("cross", [False, True])
def test_batched_targets_and_sampling_on_device_equal_teaching_on_cpu(device, cross):
    g = torch.Generator().manual_seed(3)
    anchors, gts, sizes = _batch(g, [3, 0, 12])
    ref = label_anchors_batch(anchors, gts, Matcher(), sizes, cross)
    out = label_anchors_batched(anchors.to(device), [x.to(device) for x in gts], Matcher(), sizes, cross)
    assert out[0].device.type == device.type
    assert torch.equal(out[0].cpu(), ref[0]) and torch.equal(out[1].cpu(), ref[1])
    # a CPU generator draws the same keys whatever the labels' device
    pos, neg = BalancedSampler(64, 0.5, torch.Generator().manual_seed(1)).sample_batch(out[0])
    rpos, rneg = BalancedSampler(64, 0.5, torch.Generator().manual_seed(1), draw="keys")(list(ref[0]))
    assert torch.equal(pos.cpu(), torch.stack(rpos)) and torch.equal(neg.cpu(), torch.stack(rneg))
