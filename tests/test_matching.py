"""rpnlab.detector.matching against torchvision's Matcher and sampler, plus the labelling rules."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler
from torchvision.models.detection._utils import Matcher as TVMatcher

import rpnlab.detector.boxes as B
from rpnlab.detector.boxes import box_iou
from rpnlab.detector.matching import (
    BalancedSampler,
    Matcher,
    inside_image_mask,
    label_anchors,
    label_anchors_batch,
)
from tests.conftest import random_boxes

THRESHOLDS = [
    (0.7, 0.3, True),
    (0.7, 0.3, False),
    (0.5, 0.5, True),
    (0.5, 0.4, False),
    (0.6, 0.0, True),
]


def _quantized_iou(m, a, g, levels=5):
    """A quality matrix with few distinct values, so ties (per anchor and per gt) are common."""
    return torch.randint(0, levels, (m, a), generator=g).float() / (levels - 1)


# ---------------------------------------------------------------- Matcher vs torchvision


@pytest.mark.parametrize("high, low, allow", THRESHOLDS)
@pytest.mark.parametrize("seed", range(8))
def test_matcher_matches_torchvision_on_random_iou(high, low, allow, seed):
    g = torch.Generator().manual_seed(seed)
    gt, anchors = random_boxes(6, generator=g), random_boxes(300, generator=g)
    iou = box_iou(gt, anchors)
    ours = Matcher(high, low, allow)(iou)
    ref = TVMatcher(high, low, allow)(iou)
    assert ours.dtype == torch.int64
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("high, low, allow", THRESHOLDS)
@pytest.mark.parametrize("seed", range(8))
def test_matcher_matches_torchvision_with_ties(high, low, allow, seed):
    g = torch.Generator().manual_seed(seed)
    m, a = int(torch.randint(1, 6, (1,), generator=g)), int(torch.randint(1, 40, (1,), generator=g))
    q = _quantized_iou(m, a, g)
    assert torch.equal(Matcher(high, low, allow)(q), TVMatcher(high, low, allow)(q))


@pytest.mark.parametrize(
    "q",
    [
        torch.tensor([[0.9]]),  # a single anchor, a single gt
        torch.tensor([[0.1]]),  # its best is low: the low-quality rule still makes it positive
        torch.tensor([[0.2], [0.2], [0.1]]),  # a single anchor tied between two gts
        torch.zeros(3, 5),  # no overlap anywhere: every anchor "ties" at 0
        torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.5, 0.8, 0.2, 0.0]]),  # a gt that overlaps nothing
        torch.tensor([[0.3, 0.7, 0.29999, 0.69999]]),  # values on and just below the thresholds
    ],
)
@pytest.mark.parametrize("high, low, allow", THRESHOLDS)
def test_matcher_edge_cases_match_torchvision(q, high, low, allow):
    assert torch.equal(Matcher(high, low, allow)(q), TVMatcher(high, low, allow)(q))


def test_matcher_zero_quality_quirk_and_its_switch():
    # gt 0 overlaps no anchor, so its best quality is 0 and it claims every anchor at 0 with it.
    q = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.5, 0.8, 0.1, 0.0]])
    assert Matcher(0.7, 0.3)(q).tolist() == [1, 1, 1, 0]  # torchvision's result
    assert torch.equal(Matcher(0.7, 0.3)(q), TVMatcher(0.7, 0.3, True)(q))
    # with the switch only gt 1 makes low-quality matches (anchor 1 is already >= 0.7)
    assert Matcher(0.7, 0.3, low_quality_min_iou=1e-6)(q).tolist() == [-2, 1, -1, -1]


def test_matcher_low_quality_match_takes_the_anchors_own_best_gt():
    # anchor 0 is gt 0's best (0.4), but anchor 0 prefers gt 1 (0.5): it becomes a match of gt 1.
    q = torch.tensor([[0.4, 0.1], [0.5, 0.6]])
    assert Matcher(0.7, 0.3)(q).tolist() == [1, 1]
    assert torch.equal(Matcher(0.7, 0.3)(q), TVMatcher(0.7, 0.3, True)(q))


def test_matcher_without_gt_returns_background():
    ours = Matcher()(torch.zeros(0, 7))
    assert ours.tolist() == [-1] * 7 and ours.dtype == torch.int64
    with pytest.raises(ValueError):  # torchvision refuses; we do not
        TVMatcher(0.7, 0.3)(torch.zeros(0, 7))
    assert Matcher()(torch.zeros(3, 0)).shape == (0,)


def test_matcher_validation():
    with pytest.raises(ValueError, match="low_threshold=0.8 must not exceed high_threshold=0.7"):
        Matcher(0.7, 0.8)
    with pytest.raises(ValueError, match="high_threshold"):
        Matcher("0.7", 0.3)
    with pytest.raises(ValueError, match="match_quality_matrix must be a 2-D tensor"):
        Matcher()(torch.zeros(5))
    with pytest.raises(ValueError, match="gt_boxes"):
        Matcher().match_boxes(torch.zeros(2, 3), random_boxes(4))
    with pytest.raises(ValueError, match="anchors"):
        Matcher().match_boxes(random_boxes(2), torch.zeros(4, 4, dtype=torch.int64))
    assert Matcher.BELOW_LOW_THRESHOLD == -1 and Matcher.BETWEEN_THRESHOLDS == -2


# ---------------------------------------------------------------- chunked matching


@pytest.mark.parametrize("high, low, allow", THRESHOLDS)
@pytest.mark.parametrize("chunk_size", [None, 1, 7, 64, 10_000])
def test_match_boxes_equals_call_on_full_matrix(high, low, allow, chunk_size, gen):
    matcher = Matcher(high, low, allow)
    for _ in range(3):
        gt, anchors = random_boxes(5, generator=gen), random_boxes(200, generator=gen)
        full = matcher(box_iou(gt, anchors))
        assert torch.equal(matcher.match_boxes(gt, anchors, chunk_size), full)
        assert torch.equal(full, TVMatcher(high, low, allow)(box_iou(gt, anchors)))


def test_match_boxes_with_ties_and_degenerate_boxes(gen):
    # anchors on a coarse grid with repeated boxes: many exact IoU ties per gt
    xy = torch.randint(0, 6, (120, 2), generator=gen).float() * 10
    anchors = torch.cat([xy, xy + 20], dim=1)
    gt = torch.tensor(
        [
            [0.0, 0.0, 20.0, 20.0],
            [15.0, 15.0, 35.0, 35.0],
            [5.0, 5.0, 5.0, 5.0],
            [200.0, 200, 210, 210],
        ]
    )
    for matcher in (Matcher(), Matcher(0.5, 0.5), Matcher(low_quality_min_iou=1e-6)):
        full = matcher(box_iou(gt, anchors))
        for chunk in (None, 1, 13):
            assert torch.equal(matcher.match_boxes(gt, anchors, chunk), full)
    assert torch.equal(
        Matcher()(box_iou(gt, anchors)), TVMatcher(0.7, 0.3, True)(box_iou(gt, anchors))
    )


def test_low_quality_rule_needs_an_exact_tie():
    # anchor 1 is only 2.5e-4 below the gt's best IoU (0.5): it must not be claimed
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    anchors = torch.tensor(
        [[0.0, 0.0, 10.0, 20.0], [0.0, 0.0, 10.0, 20.01], [0.0, 0.0, 20.0, 10.0]]
    )
    expected = [0, -2, 0]  # anchors 0 and 2 tie exactly at 0.5
    assert Matcher().match_boxes(gt, anchors).tolist() == expected
    assert Matcher().match_boxes(gt, anchors, chunk_size=1).tolist() == expected
    assert TVMatcher(0.7, 0.3, True)(box_iou(gt, anchors)).tolist() == expected


def test_match_boxes_empty_inputs():
    anchors = random_boxes(9)
    assert Matcher().match_boxes(anchors[:0], anchors).tolist() == [-1] * 9
    assert Matcher().match_boxes(anchors, anchors[:0]).shape == (0,)


def test_match_boxes_never_builds_the_full_matrix(monkeypatch, gen):
    gt, anchors = random_boxes(50, generator=gen), random_boxes(5000, generator=gen)
    expected = Matcher()(box_iou(gt, anchors))
    shapes = []
    real = B.box_iou

    def recording(b1, b2):
        shapes.append(tuple(b1.shape[:1]) + tuple(b2.shape[:1]))
        return real(b1, b2)

    monkeypatch.setattr(B, "box_iou", recording)
    got = Matcher().match_boxes(gt, anchors, chunk_size=256)
    monkeypatch.undo()
    assert torch.equal(got, expected)
    assert max(s[0] for s in shapes) == 256 and all(s[1] == 50 for s in shapes)
    # two passes over the anchors: reductions, then the low-quality ties
    assert sum(s[0] for s in shapes) == 2 * 5000


# ---------------------------------------------------------------- BalancedSampler


def _labels(g, a, p_pos, p_neg):
    u = torch.rand(a, generator=g)
    lab = torch.full((a,), -1.0)
    lab[u < p_pos] = 1.0
    lab[(u >= p_pos) & (u < p_pos + p_neg)] = 0.0
    return lab


@pytest.mark.parametrize("batch, frac", [(256, 0.5), (64, 0.25), (10, 1.0), (7, 0.3)])
@pytest.mark.parametrize("seed", range(4))
def test_sampler_equals_torchvision_under_the_same_seed(batch, frac, seed):
    g = torch.Generator().manual_seed(seed)
    labels = [
        _labels(g, 500, 0.03, 0.8),
        _labels(g, 300, 0.5, 0.4),
        _labels(g, 100, 0.0, 0.0),
        _labels(g, 50, 0.0, 1.0),
    ]
    torch.manual_seed(seed)
    pos, neg = BalancedSampler(batch, frac)(labels)
    torch.manual_seed(seed)
    ref_pos, ref_neg = BalancedPositiveNegativeSampler(batch, frac)(labels)
    for p, n, rp, rn in zip(pos, neg, ref_pos, ref_neg):
        assert p.dtype == torch.bool and n.dtype == torch.bool
        assert torch.equal(p, rp.bool()) and torch.equal(n, rn.bool())


_label_lists = st.lists(
    st.tuples(st.integers(0, 400), st.floats(0, 1), st.floats(0, 1)), min_size=1, max_size=3
)


@settings(max_examples=40, deadline=None)
@given(
    images=_label_lists,
    batch=st.integers(1, 300),
    frac=st.floats(0.01, 1.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_sampler_budget_fraction_and_sources(images, batch, frac, seed):
    g = torch.Generator().manual_seed(seed)
    labels = [_labels(g, a, p * 0.5, n * 0.5) for a, p, n in images]
    pos, neg = BalancedSampler(batch, frac, generator=g)(labels)
    for lab, p, n in zip(labels, pos, neg):
        n_pos, n_neg = int((lab == 1).sum()), int((lab == 0).sum())
        assert not (p & n).any()
        assert (lab[p] == 1).all() and (lab[n] == 0).all()  # only from the right labels
        assert int(p.sum()) == min(n_pos, int(batch * frac))  # never above the fraction
        assert int(p.sum() + n.sum()) == min(batch, int(p.sum()) + n_neg)  # never above budget


def test_sampler_is_deterministic_given_a_generator():
    labels = [_labels(torch.Generator().manual_seed(3), 2000, 0.1, 0.7) for _ in range(2)]
    run = lambda seed: BalancedSampler(128, 0.5, torch.Generator().manual_seed(seed))(labels)
    (p1, n1), (p2, n2), (p3, n3) = run(0), run(0), run(1)
    assert all(torch.equal(a, b) for a, b in zip(p1 + n1, p2 + n2))
    assert not all(torch.equal(a, b) for a, b in zip(p1 + n1, p3 + n3))
    # a generator is not the global RNG: the global state does not change the draw
    torch.manual_seed(123)
    p4, n4 = run(0)
    assert all(torch.equal(a, b) for a, b in zip(p1 + n1, p4 + n4))


def test_sampler_accepts_class_labels_and_validates():
    lab = torch.tensor([0, 3, 1, -1, 0, 2])  # class labels >= 1 count as positives
    pos, neg = BalancedSampler(10, 0.5)([lab])
    assert pos[0].tolist() == [False, True, True, False, False, True]
    assert neg[0].tolist() == [True, False, False, False, True, False]
    with pytest.raises(ValueError, match="batch_size_per_image"):
        BalancedSampler(0)
    with pytest.raises(ValueError, match="positive_fraction"):
        BalancedSampler(256, 1.5)
    with pytest.raises(TypeError, match="generator"):
        BalancedSampler(256, 0.5, generator=0)
    with pytest.raises(TypeError, match="list"):
        BalancedSampler()(torch.zeros(2, 5))
    with pytest.raises(ValueError, match=r"labels\[0\]"):
        BalancedSampler()([torch.zeros(2, 5)])


# ---------------------------------------------------------------- labelling anchors


def test_inside_image_mask():
    anchors = torch.tensor(
        [
            [0.0, 0.0, 50.0, 40.0],
            [-1.0, 0.0, 10.0, 10.0],
            [0.0, 0.0, 50.5, 10.0],
            [10.0, 10.0, 20.0, 41.0],
        ]
    )
    assert inside_image_mask(anchors, (40, 50)).tolist() == [True, False, False, False]
    assert inside_image_mask(anchors, (40, 50), allowed_border=1).tolist() == [
        True,
        True,
        True,
        True,
    ]
    with pytest.raises(ValueError, match="image_size"):
        inside_image_mask(anchors, 40)
    with pytest.raises(ValueError, match="image_size"):
        inside_image_mask(anchors, (0, 50))


def test_label_anchors_follows_the_matcher(gen):
    gt, anchors = random_boxes(4, generator=gen), random_boxes(400, generator=gen)
    matcher = Matcher(0.5, 0.3)
    labels, boxes = label_anchors(anchors, gt, matcher)
    matched = TVMatcher(0.5, 0.3, True)(box_iou(gt, anchors))
    expected = torch.where(matched >= 0, 1.0, torch.where(matched == -1, 0.0, -1.0))
    assert labels.dtype == anchors.dtype and torch.equal(labels, expected)
    assert (labels == 1).any() and (labels == 0).any() and (labels == -1).any()
    assert torch.equal(boxes, gt[matched.clamp(min=0)])  # torchvision's RPN does the same
    chunked, _ = label_anchors(anchors, gt, matcher, chunk_size=17)
    assert torch.equal(chunked, labels)


def test_label_anchors_without_gt_is_all_background(gen):
    anchors = random_boxes(50, size=100.0, generator=gen) - 20.0
    labels, boxes = label_anchors(anchors, torch.zeros(0, 4), Matcher())
    assert torch.equal(labels, torch.zeros(50)) and torch.equal(boxes, torch.zeros(50, 4))
    labels, _ = label_anchors(
        anchors, torch.zeros(0, 4), Matcher(), (60, 60), ignore_cross_boundary=True
    )
    inside = inside_image_mask(anchors, (60, 60))
    assert 0 < int(inside.sum()) < 50
    assert torch.equal(labels, torch.where(inside, 0.0, -1.0))


def test_ignore_cross_boundary_matches_only_inside_anchors():
    # The gt's best anchor overall crosses the border; ignoring it, the best *inside* anchor must
    # become the low-quality positive (py-faster-rcnn matches the inside anchors only).
    gt = torch.tensor([[0.0, 0.0, 30.0, 30.0]])
    anchors = torch.tensor(
        [
            [-2.0, -2.0, 30.0, 30.0],  # best IoU (0.88) but outside
            [0.0, 0.0, 20.0, 20.0],  # best inside (0.44)
            [50.0, 50.0, 90.0, 90.0],  # far away: negative
            [10.0, 10.0, 60.0, 60.0],  # inside, low IoU (0.15)
        ]
    )
    plain, _ = label_anchors(anchors, gt, Matcher())
    assert plain.tolist() == [1.0, -1.0, 0.0, 0.0]
    labels, boxes = label_anchors(anchors, gt, Matcher(), (100, 100), ignore_cross_boundary=True)
    assert labels.tolist() == [-1.0, 1.0, 0.0, 0.0]
    assert torch.equal(boxes[1], gt[0])
    # the same as labelling the inside subset alone and marking the rest ignored
    inside = inside_image_mask(anchors, (100, 100))
    sub, _ = label_anchors(anchors[inside], gt, Matcher())
    assert torch.equal(labels[inside], sub) and (labels[~inside] == -1).all()
    with pytest.raises(ValueError, match="image_size"):
        label_anchors(anchors, gt, Matcher(), ignore_cross_boundary=True)


@pytest.mark.parametrize("seed", range(5))
def test_ignore_cross_boundary_equals_subset_labelling(seed):
    g = torch.Generator().manual_seed(seed)
    anchors = random_boxes(300, size=140.0, generator=g) - 20.0
    gt = random_boxes(5, size=100.0, generator=g)
    labels, _ = label_anchors(
        anchors, gt, Matcher(0.6, 0.3), (100, 100), ignore_cross_boundary=True
    )
    inside = inside_image_mask(anchors, (100, 100))
    sub, _ = label_anchors(anchors[inside], gt, Matcher(0.6, 0.3))
    assert torch.equal(labels[inside], sub) and (labels[~inside] == -1).all()


def test_label_anchors_batch(gen):
    anchors = random_boxes(200, size=140.0, generator=gen) - 20.0
    gts = [random_boxes(3, generator=gen), torch.zeros(0, 4), random_boxes(1, generator=gen)]
    sizes = [(100, 100), (80, 120), (100, 60)]
    labels, boxes = label_anchors_batch(anchors, gts, Matcher(), sizes, ignore_cross_boundary=True)
    assert labels.shape == (3, 200) and boxes.shape == (3, 200, 4)
    for i, (gt, size) in enumerate(zip(gts, sizes)):
        ref_l, ref_b = label_anchors(anchors, gt, Matcher(), size, ignore_cross_boundary=True)
        assert torch.equal(labels[i], ref_l) and torch.equal(boxes[i], ref_b)
    assert not torch.equal(labels[0], labels[2])
    plain, _ = label_anchors_batch(anchors, gts, Matcher())
    assert plain.shape == (3, 200) and (plain[1] == 0).all()
    with pytest.raises(ValueError, match="image_sizes"):
        label_anchors_batch(anchors, gts, Matcher(), sizes[:2])
    with pytest.raises(ValueError, match="image_sizes"):
        label_anchors_batch(anchors, gts, Matcher(), ignore_cross_boundary=True)
    with pytest.raises(TypeError, match="gt_boxes_list"):
        label_anchors_batch(anchors, torch.zeros(3, 2, 4), Matcher())
    with pytest.raises(TypeError, match="matcher"):
        label_anchors(anchors, gts[0], object())
