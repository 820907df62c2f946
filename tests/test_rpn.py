"""RPNHead, flatten_head_outputs and RegionProposalNetwork, with torchvision's RPN as reference."""

import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork as TVRPN
from torchvision.models.detection.rpn import RPNHead as TVRPNHead
from torchvision.models.detection.rpn import concat_box_prediction_layers

from rpnlab.config import AnchorConfig, RPNConfig
from rpnlab.detector.anchors import AnchorGenerator
from rpnlab.detector.rpn import RegionProposalNetwork, RPNHead, RPNOutput, flatten_head_outputs
from tests.conftest import random_boxes

ATOL = 1e-5
C = 8  # feature channels (small, so the tests are fast)


# ---------------------------------------------------------------- head


@pytest.mark.parametrize("mode,cls_channels", [("sigmoid", 3), ("softmax", 6)])
def test_head_output_shapes_and_init(mode, cls_channels):
    torch.manual_seed(0)
    head = RPNHead(C, 3, conv_channels=16, objectness=mode)
    feats = [torch.randn(2, C, 5, 7), torch.randn(2, C, 3, 4)]
    obj, deltas = head(feats)
    assert [o.shape for o in obj] == [(2, cls_channels, 5, 7), (2, cls_channels, 3, 4)]
    assert [d.shape for d in deltas] == [(2, 12, 5, 7), (2, 12, 3, 4)]
    flat_obj, flat_deltas = flatten_head_outputs(obj, deltas, mode)
    a = 3 * (5 * 7 + 3 * 4)
    assert flat_obj.shape == ((2, a) if mode == "sigmoid" else (2, a, 2))
    assert flat_deltas.shape == (2, a, 4)
    for layer in (head.conv, head.cls_logits, head.bbox_pred):
        assert layer.bias.abs().max() == 0
        assert 0.005 < layer.weight.std() < 0.015


def test_flatten_matches_torchvision_order(gen):
    obj = [torch.randn(2, 3, 4, 5, generator=gen), torch.randn(2, 3, 2, 3, generator=gen)]
    deltas = [torch.randn(2, 12, 4, 5, generator=gen), torch.randn(2, 12, 2, 3, generator=gen)]
    ours_obj, ours_deltas = flatten_head_outputs(obj, deltas)
    tv_obj, tv_deltas = concat_box_prediction_layers(obj, deltas)
    torch.testing.assert_close(ours_obj.reshape(-1), tv_obj.reshape(-1))
    torch.testing.assert_close(ours_deltas.reshape(-1, 4), tv_deltas)


def test_flatten_softmax_channel_layout(gen):
    bg, fg = torch.randn(1, 3, 4, 5, generator=gen), torch.randn(1, 3, 4, 5, generator=gen)
    deltas = torch.randn(1, 12, 4, 5, generator=gen)
    pairs, _ = flatten_head_outputs([torch.cat([bg, fg], 1)], [deltas], "softmax")
    sig_bg, _ = flatten_head_outputs([bg], [deltas])
    sig_fg, _ = flatten_head_outputs([fg], [deltas])
    torch.testing.assert_close(pairs[..., 0], sig_bg)
    torch.testing.assert_close(pairs[..., 1], sig_fg)


def test_head_and_flatten_reject_bad_arguments():
    with pytest.raises(ValueError, match="objectness"):
        RPNHead(C, 3, objectness="tanh")
    with pytest.raises(ValueError, match="num_anchors"):
        RPNHead(C, 0)
    with pytest.raises(ValueError, match="softmax objectness"):
        flatten_head_outputs([torch.zeros(1, 3, 2, 2)], [torch.zeros(1, 12, 2, 2)], "softmax")


# ---------------------------------------------------------------- RPN vs torchvision

SIZES = ((16.0, 32.0),)
RATIOS = ((0.5, 1.0, 2.0),)
STRIDE = 8


def _config(**kw):
    base = {
        "conv_channels": C,
        "fg_iou_thresh": 0.7,
        "bg_iou_thresh": 0.3,
        "batch_size_per_image": 64,
        "positive_fraction": 0.5,
        "pre_nms_top_n_train": 200,
        "post_nms_top_n_train": 100,
        "pre_nms_top_n_test": 100,
        "post_nms_top_n_test": 50,
        "nms_thresh": 0.7,
        "min_size": 1e-3,
        "score_thresh": 0.0,
    }
    return RPNConfig(**{**base, **kw})


def _problem(seed, batch=2, feat_hw=(8, 10)):
    g = torch.Generator().manual_seed(seed)
    h, w = feat_hw
    features = [torch.randn(batch, C, h, w, generator=g)]
    image_sizes = [(h * STRIDE, w * STRIDE), (h * STRIDE - 5, w * STRIDE - 9)][:batch]
    targets = [{"boxes": random_boxes(3, 60.0, g, min_wh=8.0)} for _ in range(batch)]
    return features, image_sizes, targets


def _pair(seed, config, batch=2, feat_hw=(8, 10)):
    """Our RPN and torchvision's with the same head weights, anchors and settings."""
    torch.manual_seed(seed)
    ours = RegionProposalNetwork.from_config(
        AnchorConfig(sizes=SIZES, aspect_ratios=RATIOS, strides=(STRIDE,)),
        config,
        in_channels=C,
        generator=torch.Generator().manual_seed(seed),
    )
    # make the head's outputs less uniform than its 0.01-std init
    with torch.no_grad():
        for p in ours.head.parameters():
            p.normal_(0, 0.2)
    if config.objectness != "sigmoid":
        return ours, None  # torchvision has no 2k-score RPN
    tv_head = TVRPNHead(C, 6)
    tv_head.conv[0][0].load_state_dict(ours.head.conv.state_dict())
    tv_head.cls_logits.load_state_dict(ours.head.cls_logits.state_dict())
    tv_head.bbox_pred.load_state_dict(ours.head.bbox_pred.state_dict())
    tv = TVRPN(
        TVAnchorGenerator(SIZES, RATIOS),
        tv_head,
        config.fg_iou_thresh,
        config.bg_iou_thresh,
        config.batch_size_per_image,
        config.positive_fraction,
        {"training": config.pre_nms_top_n_train, "testing": config.pre_nms_top_n_test},
        {"training": config.post_nms_top_n_train, "testing": config.post_nms_top_n_test},
        config.nms_thresh,
        config.score_thresh,
    )
    tv.min_size = config.min_size
    return ours, tv


def _tv_forward(tv, features, image_sizes, targets, pos=None, neg=None):
    b, _, h, w = features[0].shape
    images = ImageList(torch.zeros(b, 3, h * STRIDE, w * STRIDE), list(image_sizes))
    if pos is not None:
        tv.fg_bg_sampler = lambda _labels: (list(pos.to(torch.uint8)), list(neg.to(torch.uint8)))
    return tv(images, {"0": features[0]}, targets)


@pytest.mark.parametrize("seed", range(4))
def test_training_loss_and_proposals_match_torchvision(seed):
    config = _config()
    ours, tv = _pair(seed, config)
    features, image_sizes, targets = _problem(seed)
    ours.train()
    tv.train()
    out = ours(features, image_sizes, targets, return_intermediates=True)
    assert isinstance(out, RPNOutput)
    inter = out.intermediates
    tv_boxes, tv_losses = _tv_forward(
        tv, features, image_sizes, targets, inter["pos_mask"], inter["neg_mask"]
    )

    # same anchors and labels as torchvision's
    b, _, h, w = features[0].shape
    tv_anchors = tv.anchor_generator(
        ImageList(torch.zeros(b, 3, h * STRIDE, w * STRIDE), image_sizes), features
    )
    torch.testing.assert_close(inter["anchors"], tv_anchors[0])
    tv_labels, _ = tv.assign_targets_to_anchors(tv_anchors, targets)
    assert torch.equal(inter["labels"], torch.stack(tv_labels))
    assert inter["pos_mask"].any() and inter["neg_mask"].any()

    for key in ("loss_objectness", "loss_rpn_box_reg"):
        torch.testing.assert_close(out.losses[key], tv_losses[key], atol=ATOL, rtol=ATOL)
    assert out.losses["loss_rpn_box_reg"] > 0
    for p, tb in zip(out.proposals, tv_boxes):
        torch.testing.assert_close(p, tb, atol=1e-4, rtol=ATOL)

    # gradients of the loss with respect to the head agree (and are not zero)
    ours_grads = torch.autograd.grad(sum(out.losses.values()), list(ours.head.parameters()))
    tv_params = [
        tv.head.conv[0][0].weight,
        tv.head.conv[0][0].bias,
        tv.head.cls_logits.weight,
        tv.head.cls_logits.bias,
        tv.head.bbox_pred.weight,
        tv.head.bbox_pred.bias,
    ]
    tv_grads = torch.autograd.grad(sum(tv_losses.values()), tv_params)
    for g_ours, g_tv in zip(ours_grads, tv_grads):
        assert g_ours.abs().sum() > 0
        torch.testing.assert_close(g_ours, g_tv, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("seed", range(3))
def test_eval_proposals_match_torchvision(seed):
    ours, tv = _pair(seed, _config(nms_thresh=0.6, score_thresh=0.3))
    features, image_sizes, _ = _problem(seed, feat_hw=(9, 7))
    ours.eval()
    tv.eval()
    with torch.no_grad():
        out = ours(features, image_sizes)
        tv_boxes, tv_losses = _tv_forward(tv, features, image_sizes, None)
    assert out.losses == {} and tv_losses == {} and out.intermediates == {}
    for p, s, tb in zip(out.proposals, out.scores, tv_boxes):
        assert 0 < len(p) <= 50
        torch.testing.assert_close(p, tb, atol=1e-4, rtol=ATOL)
        assert (s >= 0.3).all()


def test_image_without_objects_gives_finite_losses_and_zero_box_loss():
    ours, _ = _pair(0, _config())
    features, image_sizes, targets = _problem(0)
    targets[1] = {"boxes": torch.zeros(0, 4)}
    out = ours(features, image_sizes, targets, return_intermediates=True)
    assert all(torch.isfinite(v) for v in out.losses.values())
    assert (out.intermediates["labels"][1] == 0).all()
    assert not out.intermediates["pos_mask"][1].any()
    assert torch.isfinite(out.intermediates["regression_targets"]).all()

    empty = [{"boxes": torch.zeros(0, 4)}, torch.zeros(0, 4)]  # a bare tensor works too
    out = ours(features, image_sizes, empty)
    assert out.losses["loss_rpn_box_reg"].item() == 0.0
    assert torch.isfinite(out.losses["loss_objectness"]) and out.losses["loss_objectness"] > 0
    grads = torch.autograd.grad(
        sum(out.losses.values()), list(ours.head.parameters()), allow_unused=True
    )
    assert all(g is None or torch.isfinite(g).all() for g in grads)


def test_intermediates_and_detached_proposals():
    ours, _ = _pair(1, _config(objectness="softmax"))
    features, image_sizes, targets = _problem(1)
    out = ours(features, image_sizes, targets, return_intermediates=True)
    inter = out.intermediates
    a = 8 * 10 * 6
    assert inter["anchors"].shape == (a, 4) and inter["num_anchors_per_level"] == [a]
    assert inter["objectness"].shape == (2, a) and inter["objectness_pairs"].shape == (2, a, 2)
    assert inter["deltas"].shape == (2, a, 4) and inter["decoded_boxes"].shape == (2, a, 4)
    assert inter["labels"].shape == (2, a) and inter["matched_gt_boxes"].shape == (2, a, 4)
    assert inter["pos_mask"].dtype == torch.bool and inter["neg_mask"].shape == (2, a)
    assert not (inter["pos_mask"] & inter["neg_mask"]).any()
    assert ((inter["pos_mask"] | inter["neg_mask"]).sum(1) <= 64).all()
    assert (inter["labels"][inter["pos_mask"]] == 1).all() and (
        inter["labels"][inter["neg_mask"]] == 0
    ).all()
    assert len(inter["pre_nms_boxes"]) == len(inter["post_nms_boxes"]) == 2
    assert not any(p.requires_grad for p in out.proposals + out.scores)
    # softmax scores are the foreground probability of the pairs
    pairs = inter["objectness_pairs"].detach()
    torch.testing.assert_close(
        torch.sigmoid(inter["objectness"].detach()), pairs.softmax(-1)[..., 1]
    )


@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
def test_gradient_reaches_every_head_parameter(mode):
    ours, _ = _pair(2, _config(objectness=mode))
    features, image_sizes, targets = _problem(2)
    out = ours(features, image_sizes, targets)
    sum(out.losses.values()).backward()
    for name, p in ours.head.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("normalization", ["sampled", "paper"])
def test_softmax_rpn_trains_on_a_toy_input(normalization):
    torch.manual_seed(0)
    config = _config(objectness="softmax", loss_normalization=normalization)
    rpn = RegionProposalNetwork.from_config(
        AnchorConfig(sizes=SIZES, aspect_ratios=RATIOS, strides=(STRIDE,)),
        config,
        C,
        generator=torch.Generator().manual_seed(0),
    )
    features, image_sizes, targets = _problem(3, batch=1)
    opt = torch.optim.SGD(rpn.parameters(), lr=0.05, momentum=0.9)
    history = []
    for _ in range(50):
        loss = sum(rpn(features, image_sizes, targets).losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
    assert all(torch.isfinite(torch.tensor(history)))
    assert sum(history[-5:]) / 5 < 0.5 * sum(history[:5]) / 5


def test_paper_normalization_uses_locations():
    ours, _ = _pair(0, _config(loss_normalization="paper", reg_loss_weight=10.0))
    features, image_sizes, targets = _problem(0)
    sampled, _ = _pair(0, _config())
    ours.sampler.generator.manual_seed(5)
    sampled.sampler.generator.manual_seed(5)
    paper = ours(features, image_sizes, targets).losses
    torchvision_like = sampled(features, image_sizes, targets).losses
    n_sampled = 2 * 64  # both images have enough negatives to fill the 64-anchor minibatch
    locations = 2 * 8 * 10
    torch.testing.assert_close(paper["loss_objectness"], torchvision_like["loss_objectness"])
    torch.testing.assert_close(
        paper["loss_rpn_box_reg"],
        torchvision_like["loss_rpn_box_reg"] * n_sampled * 10.0 / locations,
        atol=ATOL,
        rtol=ATOL,
    )


def test_from_config_and_multi_level():
    anchor_cfg = AnchorConfig(
        sizes=((16.0,), (32.0,)), aspect_ratios=((0.5, 1.0, 2.0),) * 2, strides=(8, 16)
    )
    rpn = RegionProposalNetwork.from_config(anchor_cfg, _config(), C)
    assert rpn.head.num_anchors == 3 and rpn.head.conv.out_channels == C
    features = [torch.randn(1, C, 8, 8), torch.randn(1, C, 4, 4)]
    out = rpn.eval()(features, [(64, 64)], return_intermediates=True)
    assert out.intermediates["num_anchors_per_level"] == [192, 48]
    assert out.intermediates["topk_idxs"].shape == (1, 100 + 48)
    assert out.proposals[0].shape[1] == 4 and len(out.proposals[0]) <= 50


def test_bad_inputs_give_clear_errors():
    ours, _ = _pair(0, _config())
    features, image_sizes, targets = _problem(0)
    with pytest.raises(TypeError, match="features must be a non-empty list"):
        ours(features[0], image_sizes)
    with pytest.raises(ValueError, match=r"features\[0\] must be a \(B, C, H, W\)"):
        ours([features[0][0]], image_sizes)
    with pytest.raises(ValueError, match="image_sizes must be a list with one"):
        ours(features, image_sizes[:1])
    with pytest.raises(ValueError, match="targets must be a list"):
        ours(features, image_sizes, targets[:1])
    with pytest.raises(ValueError, match="x2 < x1"):
        ours(features, image_sizes, [{"boxes": torch.tensor([[10.0, 10, 5, 20]])}, targets[1]])
    with pytest.raises(ValueError, match="head objectness"):
        RegionProposalNetwork(ours.anchor_generator, RPNHead(C, 6, objectness="softmax"), _config())
    with pytest.raises(ValueError, match="anchors per location"):
        RegionProposalNetwork(ours.anchor_generator, RPNHead(C, 4), _config())
    with pytest.raises(TypeError, match="RPNConfig"):
        RegionProposalNetwork(ours.anchor_generator, ours.head, None)
    with pytest.raises(ValueError, match="bg_iou_thresh"):
        RegionProposalNetwork(ours.anchor_generator, ours.head, RPNConfig(bg_iou_thresh=0.9))


def test_anchor_generator_is_the_rpnlab_one():
    anchor_cfg = AnchorConfig(sizes=SIZES, aspect_ratios=RATIOS, strides=(STRIDE,))
    rpn = RegionProposalNetwork.from_config(anchor_cfg, _config(), C)
    assert isinstance(rpn.anchor_generator, AnchorGenerator)


def test_ignore_cross_boundary_leaves_border_anchors_out():
    ours, _ = _pair(0, _config(ignore_cross_boundary=True))
    features, image_sizes, targets = _problem(0)
    out = ours(features, image_sizes, targets, return_intermediates=True)
    inter = out.intermediates
    anchors = inter["anchors"]
    for i, (h, w) in enumerate(image_sizes):
        outside = (
            (anchors[:, 0] < 0) | (anchors[:, 1] < 0) | (anchors[:, 2] > w) | (anchors[:, 3] > h)
        )
        assert outside.any() and (~outside).any()
        assert (inter["labels"][i][outside] == -1).all()
        assert not (inter["pos_mask"][i] | inter["neg_mask"][i])[outside].any()
    assert all(torch.isfinite(v) for v in out.losses.values())


def test_mixed_precision_keeps_boxes_in_float32():
    ours, _ = _pair(0, _config())
    features, image_sizes, targets = _problem(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ours(features, image_sizes, targets, return_intermediates=True)
    assert out.intermediates["anchors"].dtype == torch.float32
    assert out.intermediates["deltas"].dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in out.proposals)
    assert all(torch.isfinite(v) and v.dtype == torch.float32 for v in out.losses.values())
