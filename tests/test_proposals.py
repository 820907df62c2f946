"""NMS (plain PyTorch) and ProposalLayer vs torchvision.ops.nms and RPN.filter_proposals."""


import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from torchvision.models.detection.rpn import RegionProposalNetwork as TVRPN

from rpnlab.config import RPNConfig
from rpnlab.detector.proposals import ProposalLayer, batched_nms, nms
from tests.conftest import random_boxes

ATOL = 1e-5


def _boxes_scores(seed, n, size=100.0, tie_levels=None):
    g = torch.Generator().manual_seed(seed)
    boxes = random_boxes(n, size, g)
    if tie_levels is None:
        scores = torch.rand(n, generator=g)
    else:
        scores = torch.randint(0, tie_levels, (n,), generator=g).float()
    return boxes, scores


# ---------------------------------------------------------------- nms


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 300),
    thresh=st.floats(0.0, 1.0),
    chunk=st.sampled_from([7, 64, 1024]),
)
def test_nms_matches_torchvision(seed, n, thresh, chunk):
    boxes, scores = _boxes_scores(seed, n)
    assert torch.equal(
        nms(boxes, scores, thresh, chunk_size=chunk), torchvision.ops.nms(boxes, scores, thresh)
    )


@pytest.mark.parametrize("seed", range(10))
def test_nms_ties_keep_input_order_like_torchvision_cpu(seed):
    boxes, scores = _boxes_scores(seed, 200, tie_levels=4)  # ~50 boxes share each score
    ours = nms(boxes, scores, 0.5)
    assert torch.equal(ours, torchvision.ops.nms(boxes, scores, 0.5))
    # identical boxes with identical scores: the first one wins
    same = torch.tensor([[0.0, 0, 10, 10]] * 3)
    assert nms(same, torch.ones(3), 0.5).tolist() == [0]


def test_nms_edge_cases():
    empty = nms(torch.zeros(0, 4), torch.zeros(0), 0.5)
    assert empty.shape == (0,) and empty.dtype == torch.int64
    assert nms(torch.tensor([[1.0, 2, 3, 4]]), torch.tensor([0.3]), 0.5).tolist() == [0]

    boxes, scores = _boxes_scores(1, 100)
    # threshold 1: IoU is never > 1, everything is kept, sorted by score
    assert torch.equal(nms(boxes, scores, 1.0), scores.argsort(descending=True))
    # threshold 0: kept boxes do not overlap at all
    keep = nms(boxes, scores, 0.0)
    assert torch.equal(keep, torchvision.ops.nms(boxes, scores, 0.0))
    iou = torchvision.ops.box_iou(boxes[keep], boxes[keep])
    assert (iou - torch.eye(len(keep))).max() == 0

    # zero-area boxes (points, lines, repeated) are never suppressed nor suppress; the last box
    # is suppressed by the 10 x 10 one (IoU 0.64)
    degenerate = torch.tensor(
        [[5.0, 5, 5, 5], [5, 5, 5, 5], [0, 0, 10, 0], [0, 0, 10, 10], [1, 1, 9, 9]]
    )
    s = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5])
    assert nms(degenerate, s, 0.5).tolist() == [0, 1, 2, 3]
    assert torch.equal(nms(degenerate, s, 0.5), torchvision.ops.nms(degenerate, s, 0.5))


def test_nms_6000_boxes_is_exact():
    # Its speed is measured by benchmarks/bench_ops.py, not asserted here (timed tests flake under load).
    boxes, scores = _boxes_scores(0, 6000, size=800.0)
    keep = nms(boxes, scores, 0.7)
    assert torch.equal(keep, torchvision.ops.nms(boxes, scores, 0.7))


def test_nms_rejects_bad_input():
    with pytest.raises(ValueError, match="scores must have shape"):
        nms(torch.zeros(3, 4), torch.zeros(4), 0.5)
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        nms(torch.zeros(2, 3, 4), torch.zeros(2), 0.5)


# ---------------------------------------------------------------- batched_nms


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(0, 250),
    groups=st.integers(1, 5),
    thresh=st.floats(0.1, 0.9),
)
def test_batched_nms_python_matches_torchvision(seed, n, groups, thresh):
    boxes, scores = _boxes_scores(seed, n)
    idxs = torch.randint(0, groups, (n,), generator=torch.Generator().manual_seed(seed + 1))
    ref = torchvision.ops.batched_nms(boxes, scores, idxs, thresh)
    assert torch.equal(batched_nms(boxes, scores, idxs, thresh, "python"), ref)
    assert torch.equal(batched_nms(boxes, scores, idxs, thresh, "torchvision"), ref)


def test_batched_nms_python_separates_groups_with_negative_coordinates():
    boxes, scores = _boxes_scores(3, 120)
    boxes = boxes - 150.0  # all coordinates negative
    idxs = torch.arange(120) % 3
    keep = batched_nms(boxes, scores, idxs, 0.5, "python")
    # reference: NMS of each group on its own, merged by score
    per_group = [
        torch.where(idxs == c)[0][nms(boxes[idxs == c], scores[idxs == c], 0.5)] for c in range(3)
    ]
    merged = torch.cat(per_group)
    merged = merged[scores[merged].argsort(descending=True)]
    assert torch.equal(keep, merged)


def test_batched_nms_rejects_unknown_implementation():
    with pytest.raises(ValueError, match="implementation"):
        batched_nms(
            torch.zeros(1, 4), torch.zeros(1), torch.zeros(1, dtype=torch.long), 0.5, "cuda"
        )


# ---------------------------------------------------------------- ProposalLayer vs torchvision


def _rpn_inputs(seed, level_sizes, batch=2):
    g = torch.Generator().manual_seed(seed)
    a = sum(level_sizes)
    anchors = random_boxes(a, 120.0, g, min_wh=4.0) - 10.0  # some cross the border
    objectness = torch.randn(batch, a, generator=g) * 3
    deltas = torch.randn(batch, a, 4, generator=g) * 0.5
    image_sizes = [(100, 90), (80, 110), (95, 95)][:batch]
    return anchors, objectness, deltas, image_sizes


def _torchvision_filter(
    decoded, objectness, image_sizes, levels, pre, post, nms_thresh, score_thresh, min_size, train
):
    rpn = TVRPN(
        None,
        None,
        0.7,
        0.3,
        256,
        0.5,
        {"training": pre[0], "testing": pre[1]},
        {"training": post[0], "testing": post[1]},
        nms_thresh,
        score_thresh,
    )
    rpn.min_size = min_size
    rpn.train(train)
    return rpn.filter_proposals(decoded, objectness.reshape(-1), image_sizes, levels)


CASES = [
    # level sizes, pre (train, test), post (train, test), nms, score_thresh, min_size
    ([400], (300, 200), (100, 50), 0.7, 0.0, 1e-3),
    ([400], (1000, 1000), (1000, 1000), 0.5, 0.3, 2.0),
    ([300, 120, 30], (100, 60), (80, 40), 0.7, 0.0, 1e-3),
    ([300, 120, 30], (50, 50), (200, 200), 0.6, 0.2, 0.0),
    ([1], (5, 5), (5, 5), 0.7, 0.0, 0.0),  # a single anchor
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("seed", range(3))
def test_proposal_layer_matches_torchvision_filter_proposals(case, train, seed):
    levels, pre, post, nms_thresh, score_thresh, min_size = case
    anchors, objectness, deltas, image_sizes = _rpn_inputs(seed, levels)
    layer = ProposalLayer(pre, post, nms_thresh, min_size, score_thresh).train(train)
    boxes, scores, inter = layer(
        anchors, objectness, deltas, image_sizes, levels, return_intermediates=True
    )
    ref_boxes, ref_scores = _torchvision_filter(
        inter["decoded_boxes"],
        objectness,
        image_sizes,
        levels,
        pre,
        post,
        nms_thresh,
        score_thresh,
        min_size,
        train,
    )
    assert len(boxes) == len(ref_boxes) == 2
    for b, s, rb, rs in zip(boxes, scores, ref_boxes, ref_scores):
        assert b.shape == rb.shape and s.shape == rs.shape
        torch.testing.assert_close(b, rb, atol=ATOL, rtol=ATOL)
        torch.testing.assert_close(s, rs, atol=ATOL, rtol=ATOL)
    # decoding itself agrees with torchvision's BoxCoder
    tv_coder = torchvision.models.detection._utils.BoxCoder((1.0, 1.0, 1.0, 1.0))
    tv_decoded = tv_coder.decode(deltas.reshape(-1, 4), [anchors] * 2).reshape(2, -1, 4)
    torch.testing.assert_close(inter["decoded_boxes"], tv_decoded, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("train", [True, False])
def test_proposal_layer_python_nms_matches_torchvision_nms(train):
    levels = [300, 120, 30]
    anchors, objectness, deltas, image_sizes = _rpn_inputs(7, levels)
    kw = {"pre_nms_top_n": (200, 100), "post_nms_top_n": (150, 60), "nms_thresh": 0.6}
    a = ProposalLayer(**kw).train(train)(anchors, objectness, deltas, image_sizes, levels)
    b = ProposalLayer(**kw, nms_implementation="python").train(train)(
        anchors, objectness, deltas, image_sizes, levels
    )
    for x, y in zip(a[0] + a[1], b[0] + b[1]):
        assert torch.equal(x, y)


def test_proposal_layer_empty_when_all_below_score_thresh():
    anchors, objectness, deltas, image_sizes = _rpn_inputs(0, [200])
    objectness = -objectness.abs() - 1  # every probability < sigmoid(-1) = 0.27
    layer = ProposalLayer((100, 100), (50, 50), score_thresh=0.5)
    boxes, scores, inter = layer(
        anchors, objectness, deltas, image_sizes, [200], return_intermediates=True
    )
    assert [b.shape for b in boxes] == [(0, 4), (0, 4)] and [s.shape for s in scores] == [
        (0,),
        (0,),
    ]
    assert all(p.shape == (0, 4) for p in inter["post_nms_boxes"])
    ref_boxes, _ = _torchvision_filter(
        inter["decoded_boxes"],
        objectness,
        image_sizes,
        [200],
        (100, 100),
        (50, 50),
        0.7,
        0.5,
        0.0,
        True,
    )
    assert [b.shape for b in ref_boxes] == [(0, 4), (0, 4)]
    for impl in ("python", "torchvision"):
        layer.nms_implementation = impl
        assert layer(anchors, objectness, deltas, image_sizes)[0][0].shape == (0, 4)


def test_proposal_layer_train_and_test_counts():
    anchors, objectness, deltas, image_sizes = _rpn_inputs(1, [400])
    layer = ProposalLayer(pre_nms_top_n=(300, 40), post_nms_top_n=(200, 10), nms_thresh=1.0)
    layer.train()
    boxes, _, inter = layer(anchors, objectness, deltas, image_sizes, return_intermediates=True)
    assert inter["topk_idxs"].shape == (2, 300) and all(len(b) == 200 for b in boxes)
    layer.eval()
    boxes, _, inter = layer(anchors, objectness, deltas, image_sizes, return_intermediates=True)
    assert inter["topk_idxs"].shape == (2, 40) and all(len(b) == 10 for b in boxes)


def test_proposal_layer_top_k_is_per_level():
    levels = [100, 50]
    anchors, objectness, deltas, image_sizes = _rpn_inputs(2, levels)
    objectness[:, 100:] -= 20  # level 1 scores far below level 0's: a global top-k would skip it
    _, _, inter = ProposalLayer((10, 10), (10, 10))(
        anchors, objectness, deltas, image_sizes, levels, True
    )
    idx = inter["topk_idxs"]
    assert idx.shape == (2, 20)
    assert (idx[:, :10] < 100).all() and (idx[:, 10:] >= 100).all()
    assert torch.equal(idx[:, :10], objectness[:, :100].topk(10, dim=1).indices)


def test_proposal_layer_top_mode_skips_nms():
    anchors, objectness, deltas, image_sizes = _rpn_inputs(4, [300])
    anchors = anchors[:1].repeat(300, 1)
    deltas = deltas * 0.01  # every box nearly the same: NMS keeps very few
    layer = ProposalLayer((100, 100), (30, 30), mode="top")
    boxes, scores, inter = layer(
        anchors, objectness, deltas, image_sizes, return_intermediates=True
    )
    nms_boxes, _ = ProposalLayer((100, 100), (30, 30))(anchors, objectness, deltas, image_sizes)
    for i in range(2):
        assert len(boxes[i]) == 30 and len(nms_boxes[i]) < 30
        expected = torch.sigmoid(objectness[i]).sort(descending=True).values[:30]
        torch.testing.assert_close(scores[i], expected)
        torch.testing.assert_close(boxes[i], inter["pre_nms_boxes"][i][:30])


def test_proposal_layer_intermediates_are_consistent():
    levels = [200, 60]
    anchors, objectness, deltas, image_sizes = _rpn_inputs(5, levels)
    layer = ProposalLayer((80, 80), (30, 30), nms_thresh=0.5).eval()
    boxes, scores, inter = layer(
        anchors, objectness, deltas, image_sizes, levels, return_intermediates=True
    )
    assert inter["decoded_boxes"].shape == (2, 260, 4)
    for i, (h, w) in enumerate(image_sizes):
        pre = inter["pre_nms_boxes"][i]
        assert (
            pre.shape[0]
            == inter["pre_nms_scores"][i].shape[0]
            == inter["pre_nms_levels"][i].shape[0]
            <= 160
        )
        assert (pre[:, 2] <= w).all() and (pre[:, 3] <= h).all() and (pre >= 0).all()
        assert inter["post_nms_boxes"][i].shape[0] <= pre.shape[0]
        assert torch.equal(boxes[i], inter["post_nms_boxes"][i][:30])
        assert torch.equal(scores[i], inter["post_nms_scores"][i][:30])
        assert (scores[i][1:] <= scores[i][:-1]).all()


def test_proposal_layer_does_not_backpropagate():
    anchors, objectness, deltas, image_sizes = _rpn_inputs(0, [100])
    objectness.requires_grad_()
    deltas.requires_grad_()
    boxes, scores = ProposalLayer((50, 50), (20, 20))(anchors, objectness, deltas, image_sizes)
    assert not any(t.requires_grad for t in boxes + scores)


def test_proposal_layer_softmax_difference_gives_softmax_probability():
    anchors, objectness, deltas, image_sizes = _rpn_inputs(6, [150])
    bg = torch.randn(objectness.shape, generator=torch.Generator().manual_seed(0))
    pairs = torch.stack([bg, bg + objectness], dim=-1)
    layer = ProposalLayer((100, 100), (100, 100), nms_thresh=1.0)
    _, scores, inter = layer(
        anchors, pairs[..., 1] - pairs[..., 0], deltas, image_sizes, return_intermediates=True
    )
    fg_prob = pairs.softmax(-1)[..., 1]
    for i in range(2):
        kept_anchor = inter["topk_idxs"][i]
        expected = fg_prob[i, kept_anchor].sort(descending=True).values[: len(scores[i])]
        torch.testing.assert_close(scores[i], expected, atol=ATOL, rtol=ATOL)


def test_proposal_layer_from_config():
    cfg = RPNConfig(
        pre_nms_top_n_train=500,
        post_nms_top_n_train=100,
        pre_nms_top_n_test=200,
        post_nms_top_n_test=20,
        nms_thresh=0.6,
        min_size=2.0,
        score_thresh=0.1,
        proposal_mode="top",
        box_weights=(2.0, 2.0, 1.0, 1.0),
    )
    layer = ProposalLayer.from_config(cfg)
    assert layer.pre_nms_top_n == (500, 200) and layer.post_nms_top_n == (100, 20)
    assert (layer.nms_thresh, layer.min_size, layer.score_thresh, layer.mode) == (
        0.6,
        2.0,
        0.1,
        "top",
    )
    assert layer.box_coder.weights == (2.0, 2.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="nms_thresh"):
        ProposalLayer.from_config(RPNConfig(nms_thresh=1.5))
    with pytest.raises(TypeError, match="RPNConfig"):
        ProposalLayer.from_config({"nms_thresh": 0.7})


def test_proposal_layer_rejects_bad_input():
    anchors, objectness, deltas, image_sizes = _rpn_inputs(0, [100])
    layer = ProposalLayer()
    with pytest.raises(ValueError, match="objectness"):
        layer(anchors, objectness[:, :50], deltas, image_sizes)
    with pytest.raises(ValueError, match="deltas"):
        layer(anchors, objectness, deltas[..., :2], image_sizes)
    with pytest.raises(ValueError, match="image_sizes"):
        layer(anchors, objectness, deltas, image_sizes[:1])
    with pytest.raises(ValueError, match="num_anchors_per_level"):
        layer(anchors, objectness, deltas, image_sizes, [60, 30])
    with pytest.raises(ValueError, match="pre_nms_top_n"):
        ProposalLayer(pre_nms_top_n=(0, 10))
    with pytest.raises(ValueError, match="mode"):
        ProposalLayer(mode="soft")


# ---------------------------------------------------------------- NMS on a growing prefix


@pytest.mark.parametrize("max_kept", [1, 5, 40, 300])
@pytest.mark.parametrize("implementation", ["torchvision", "python"])
def test_batched_nms_first_equals_full_nms_cut(max_kept, implementation):
    from rpnlab.detector.proposals import batched_nms, batched_nms_first

    g = torch.Generator().manual_seed(max_kept)
    n = 3000 if implementation == "torchvision" else 700
    boxes = random_boxes(n, size=300.0, generator=g)
    scores = torch.rand(n, generator=g)
    scores[::50] = scores[1::50][: scores[::50].shape[0]]  # some equal scores
    idxs = torch.randint(0, 3, (n,), generator=g)
    for thresh in (0.3, 0.7):
        kept = batched_nms(boxes, scores, idxs, thresh, implementation)
        first = batched_nms_first(boxes, scores, idxs, thresh, max_kept, implementation)
        # torchvision's kernel may order equal scores either way: the same scores, all kept boxes
        assert torch.equal(scores[first], scores[kept[:max_kept]]), thresh
        assert set(first.tolist()) <= set(kept.tolist())
        if implementation == "python":  # stable throughout: the very same indices
            assert torch.equal(first, kept[:max_kept])
