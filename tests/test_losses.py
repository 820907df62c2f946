"""Smooth L1, objectness (sigmoid, softmax), RPN and Fast R-CNN losses vs torchvision."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torchvision.models.detection import _utils as tv_utils
from torchvision.models.detection.roi_heads import fastrcnn_loss as tv_fastrcnn_loss
from torchvision.models.detection.rpn import RegionProposalNetwork as TVRPN
from torchvision.models.detection.rpn import permute_and_flatten

from rpnlab.detector.losses import (
    fast_rcnn_loss,
    objectness_loss,
    rpn_loss,
    smooth_l1,
    softmax_objectness_pairs,
    softmax_objectness_reshape,
)

ATOL = 1e-5


# ---------------------------------------------------------------- smooth L1


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    beta=st.sampled_from([0.0, 1.0 / 9, 0.5, 1.0, 3.0]),
    reduction=st.sampled_from(["sum", "mean", "none"]),
)
def test_smooth_l1_matches_torch_value_and_gradient(seed, beta, reduction):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(50, 4, generator=g) * 2).requires_grad_()
    y = torch.randn(50, 4, generator=g) * 2
    y[0] = x[0].detach()  # a zero difference, where L1's gradient is a choice
    ours = smooth_l1(x, y, beta, reduction)
    ref = F.smooth_l1_loss(x, y, beta=beta, reduction=reduction)
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=ATOL)
    (g_ours,) = torch.autograd.grad(ours.sum(), x)
    (g_ref,) = torch.autograd.grad(ref.sum(), x)
    torch.testing.assert_close(g_ours, g_ref, atol=ATOL, rtol=ATOL)


def test_smooth_l1_beta_zero_is_l1_and_known_values():
    x = torch.tensor([0.0, 0.05, 0.5, -2.0])
    y = torch.zeros(4)
    torch.testing.assert_close(smooth_l1(x, y, 0.0, "none"), x.abs())
    # beta = 0.1: quadratic inside (0.5 * 0.05^2 / 0.1 = 0.0125), linear outside (|d| - 0.05)
    torch.testing.assert_close(
        smooth_l1(x, y, 0.1, "none"), torch.tensor([0.0, 0.0125, 0.45, 1.95])
    )


def test_smooth_l1_rejects_bad_arguments():
    x = torch.zeros(3, 4)
    with pytest.raises(ValueError, match="reduction"):
        smooth_l1(x, x, 1.0, "max")
    with pytest.raises(ValueError, match="beta"):
        smooth_l1(x, x, -1.0)
    with pytest.raises(ValueError, match="same shape"):
        smooth_l1(x, torch.zeros(3, 2), 1.0)


# ---------------------------------------------------------------- objectness


def test_objectness_loss_sigmoid_and_softmax_match_torch(gen):
    logits = torch.randn(100, generator=gen)
    labels = torch.randint(0, 2, (100,), generator=gen).float()
    torch.testing.assert_close(
        objectness_loss(logits, labels, "sigmoid"),
        F.binary_cross_entropy_with_logits(logits, labels),
    )
    pairs = torch.randn(100, 2, generator=gen)
    torch.testing.assert_close(
        objectness_loss(pairs, labels, "softmax"), F.cross_entropy(pairs, labels.long())
    )


def test_softmax_over_two_logits_is_sigmoid_of_difference(gen):
    pairs = torch.randn(200, 2, generator=gen) * 5
    labels = torch.randint(0, 2, (200,), generator=gen).float()
    diff = pairs[:, 1] - pairs[:, 0]
    torch.testing.assert_close(pairs.softmax(-1)[:, 1], torch.sigmoid(diff), atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(
        objectness_loss(pairs, labels, "softmax"),
        objectness_loss(diff, labels, "sigmoid"),
        atol=ATOL,
        rtol=ATOL,
    )


def test_objectness_loss_rejects_bad_shape_and_mode():
    with pytest.raises(ValueError, match="softmax objectness logits must have shape"):
        objectness_loss(torch.zeros(5), torch.zeros(5), "softmax")
    with pytest.raises(ValueError, match="mode"):
        objectness_loss(torch.zeros(5), torch.zeros(5), "tanh")


def _bg_fg(gen, b=2, k=3, h=4, w=5):
    return torch.randn(b, k, h, w, generator=gen), torch.randn(b, k, h, w, generator=gen)


def test_softmax_reshape_is_py_faster_rcnn_layout(gen):
    bg, fg = _bg_fg(gen)
    x = torch.cat([bg, fg], dim=1)  # channels [0:k] background, [k:2k] foreground
    r = softmax_objectness_reshape(x)
    assert r.shape == (2, 2, 3 * 4, 5)
    torch.testing.assert_close(r[:, 0], bg.reshape(2, 12, 5))
    torch.testing.assert_close(r[:, 1], fg.reshape(2, 12, 5))
    # py-faster-rcnn: softmax over dim 1, reshape back, take channels [k:2k] as fg probabilities
    prob = r.softmax(dim=1).reshape(x.shape)[:, 3:]
    torch.testing.assert_close(prob, torch.sigmoid(fg - bg), atol=ATOL, rtol=ATOL)


def test_softmax_pairs_follow_sigmoid_anchor_order(gen):
    bg, fg = _bg_fg(gen)
    pairs = softmax_objectness_pairs(torch.cat([bg, fg], dim=1))
    assert pairs.shape == (2, 4 * 5 * 3, 2)
    # torchvision flattens a k-channel sigmoid map as (H, W, k)
    torch.testing.assert_close(pairs[..., 0], permute_and_flatten(bg, 2, 3, 1, 4, 5).squeeze(-1))
    torch.testing.assert_close(pairs[..., 1], permute_and_flatten(fg, 2, 3, 1, 4, 5).squeeze(-1))


def test_softmax_helpers_reject_odd_channels():
    for fn in (softmax_objectness_reshape, softmax_objectness_pairs):
        with pytest.raises(ValueError, match=r"\(B, 2k, H, W\)"):
            fn(torch.zeros(1, 3, 2, 2))


# ---------------------------------------------------------------- RPN loss


def _rpn_problem(seed, b=2, a=300, neg_label_frac=0.6):
    """Random head outputs, matcher labels (1/0/-1), targets and torchvision-sampled masks."""
    g = torch.Generator().manual_seed(seed)
    objectness = torch.randn(b, a, generator=g) * 2
    deltas = torch.randn(b, a, 4, generator=g)
    targets = torch.randn(b, a, 4, generator=g)
    u = torch.rand(b, a, generator=g)
    labels = torch.where(u < 0.1, 1.0, torch.where(u < 0.1 + neg_label_frac, 0.0, -1.0))
    torch.manual_seed(seed)
    pos, neg = tv_utils.BalancedPositiveNegativeSampler(64, 0.5)(list(labels))
    pos, neg = torch.stack(pos).bool(), torch.stack(neg).bool()
    return objectness, deltas, labels, targets, pos, neg


def _sampled_labels(pos, neg):
    return torch.where(pos, 1.0, torch.where(neg, 0.0, -1.0))


def _torchvision_rpn_loss(objectness, deltas, labels, targets, pos, neg):
    rpn = TVRPN(
        None,
        None,
        0.7,
        0.3,
        64,
        0.5,
        {"training": 10, "testing": 10},
        {"training": 5, "testing": 5},
        0.7,
    )
    rpn.fg_bg_sampler = lambda _labels: (list(pos.to(torch.uint8)), list(neg.to(torch.uint8)))
    return rpn.compute_loss(
        objectness.reshape(-1, 1), deltas.reshape(-1, 4), list(labels), list(targets)
    )


@pytest.mark.parametrize("seed", range(10))
def test_rpn_loss_sampled_matches_torchvision(seed):
    objectness, deltas, labels, targets, pos, neg = _rpn_problem(seed)
    objectness.requires_grad_()
    deltas.requires_grad_()
    ours = rpn_loss(objectness, deltas, _sampled_labels(pos, neg), targets, normalization="sampled")
    ref_cls, ref_box = _torchvision_rpn_loss(objectness, deltas, labels, targets, pos, neg)
    torch.testing.assert_close(ours["loss_objectness"], ref_cls, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(ours["loss_rpn_box_reg"], ref_box, atol=ATOL, rtol=ATOL)
    assert ours["loss_rpn_box_reg"] > 0
    g_ours = torch.autograd.grad(sum(ours.values()), (objectness, deltas))
    g_ref = torch.autograd.grad(ref_cls + ref_box, (objectness, deltas))
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=ATOL)


def test_rpn_loss_paper_normalization_formula():
    objectness, deltas, _, targets, pos, neg = _rpn_problem(3)
    sampled = pos | neg
    locations = 100  # e.g. k = 3 anchors at 100 locations per image
    ours = rpn_loss(
        objectness,
        deltas,
        _sampled_labels(pos, neg),
        targets,
        "paper",
        reg_weight=10.0,
        num_anchor_locations=locations,
    )
    n_cls = sampled.sum()
    l_cls = (
        F.binary_cross_entropy_with_logits(
            objectness[sampled], pos[sampled].float(), reduction="sum"
        )
        / n_cls
    )
    l_reg = (
        10.0
        * F.smooth_l1_loss(deltas[pos], targets[pos], beta=1 / 9, reduction="sum")
        / (2 * locations)
    )
    torch.testing.assert_close(ours["loss_objectness"], l_cls, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(ours["loss_rpn_box_reg"], l_reg, atol=ATOL, rtol=ATOL)


def test_rpn_loss_paper_needs_locations():
    objectness, deltas, _, targets, pos, neg = _rpn_problem(0)
    with pytest.raises(ValueError, match="num_anchor_locations"):
        rpn_loss(objectness, deltas, _sampled_labels(pos, neg), targets, "paper")


@pytest.mark.parametrize("normalization", ["sampled", "paper"])
def test_rpn_loss_softmax_equals_sigmoid_of_difference(normalization):
    objectness, deltas, _, targets, pos, neg = _rpn_problem(5)
    labels = _sampled_labels(pos, neg)
    bg = torch.randn(objectness.shape, generator=torch.Generator().manual_seed(1))
    pairs = torch.stack([bg, bg + objectness], dim=-1)
    kw = {"normalization": normalization, "num_anchor_locations": 100}
    sig = rpn_loss(objectness, deltas, labels, targets, mode="sigmoid", **kw)
    soft = rpn_loss(pairs, deltas, labels, targets, mode="softmax", **kw)
    for key in sig:
        torch.testing.assert_close(soft[key], sig[key], atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
def test_rpn_loss_image_without_objects(mode):
    """All sampled anchors negative and gt-less targets of inf: box loss exactly 0, nothing NaN."""
    g = torch.Generator().manual_seed(0)
    shape = (1, 50) if mode == "sigmoid" else (1, 50, 2)
    objectness = torch.randn(shape, generator=g).requires_grad_()
    deltas = torch.randn(1, 50, 4, generator=g).requires_grad_()
    targets = torch.full((1, 50, 4), -float("inf"))  # what encoding a zero gt box gives
    labels = torch.zeros(1, 50)
    labels[0, 40:] = -1
    for normalization in ("sampled", "paper"):
        losses = rpn_loss(
            objectness, deltas, labels, targets, normalization, num_anchor_locations=10, mode=mode
        )
        assert losses["loss_rpn_box_reg"].item() == 0.0
        assert torch.isfinite(losses["loss_objectness"]) and losses["loss_objectness"] > 0
        grads = torch.autograd.grad(sum(losses.values()), (objectness, deltas))
        assert all(torch.isfinite(gr).all() for gr in grads)
        assert grads[1].abs().sum() == 0


def test_rpn_loss_nothing_sampled_is_zero_not_nan():
    losses = rpn_loss(
        torch.randn(2, 10), torch.randn(2, 10, 4), -torch.ones(2, 10), torch.randn(2, 10, 4)
    )
    assert losses["loss_objectness"].item() == 0.0 and losses["loss_rpn_box_reg"].item() == 0.0


def test_rpn_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="pred_deltas"):
        rpn_loss(
            torch.zeros(2, 10), torch.zeros(2, 10, 3), torch.zeros(2, 10), torch.zeros(2, 10, 3)
        )
    with pytest.raises(ValueError, match="sigmoid objectness logits"):
        rpn_loss(
            torch.zeros(2, 9), torch.zeros(2, 10, 4), torch.zeros(2, 10), torch.zeros(2, 10, 4)
        )
    with pytest.raises(ValueError, match="normalization"):
        rpn_loss(
            torch.zeros(2, 10),
            torch.zeros(2, 10, 4),
            torch.zeros(2, 10),
            torch.zeros(2, 10, 4),
            "batch",
        )


# ---------------------------------------------------------------- Fast R-CNN loss


def _fast_rcnn_problem(seed, sizes=(20, 13), num_classes=4, no_positives=False):
    g = torch.Generator().manual_seed(seed)
    r = sum(sizes)
    logits = torch.randn(r, num_classes + 1, generator=g, requires_grad=True)
    box = torch.randn(r, 4 * (num_classes + 1), generator=g, requires_grad=True)
    high = 1 if no_positives else num_classes + 1
    labels = [torch.randint(0, high, (n,), generator=g) for n in sizes]
    targets = [torch.randn(n, 4, generator=g) for n in sizes]
    return logits, box, labels, targets


@pytest.mark.parametrize("seed", range(5))
def test_fast_rcnn_loss_matches_torchvision(seed):
    logits, box, labels, targets = _fast_rcnn_problem(seed)
    ours = fast_rcnn_loss(logits, box, labels, targets)
    ref = tv_fastrcnn_loss(logits, box, labels, targets)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=ATOL)
    g_ours = torch.autograd.grad(sum(ours), (logits, box))
    g_ref = torch.autograd.grad(sum(ref), (logits, box))
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=ATOL)
    # tensors instead of per-image lists give the same
    flat = fast_rcnn_loss(logits, box, torch.cat(labels), torch.cat(targets))
    torch.testing.assert_close(flat[1], ours[1])


def test_fast_rcnn_loss_beta_is_a_parameter():
    logits, box, labels, targets = _fast_rcnn_problem(0)
    labels, targets = torch.cat(labels), torch.cat(targets)
    _, ours = fast_rcnn_loss(logits, box, labels, targets, beta=1.0)
    pos = labels > 0
    picked = box.reshape(len(labels), -1, 4)[pos, labels[pos]]
    ref = F.smooth_l1_loss(picked, targets[pos], beta=1.0, reduction="sum") / len(labels)
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=ATOL)


def test_fast_rcnn_loss_only_background():
    logits, box, labels, targets = _fast_rcnn_problem(1, no_positives=True)
    targets = [torch.full_like(t, float("inf")) for t in targets]
    cls, reg = fast_rcnn_loss(logits, box, labels, targets)
    assert reg.item() == 0.0 and torch.isfinite(cls)
    grads = torch.autograd.grad(cls + reg, (logits, box))
    assert all(torch.isfinite(gr).all() for gr in grads)


def test_fast_rcnn_loss_rejects_bad_shapes():
    with pytest.raises(ValueError, match="box_regression"):
        fast_rcnn_loss(
            torch.zeros(5, 3),
            torch.zeros(5, 8),
            torch.zeros(5, dtype=torch.long),
            torch.zeros(5, 4),
        )
    with pytest.raises(ValueError, match="labels"):
        fast_rcnn_loss(
            torch.zeros(5, 3),
            torch.zeros(5, 12),
            torch.zeros(4, dtype=torch.long),
            torch.zeros(5, 4),
        )
