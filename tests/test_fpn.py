"""Notebook 10's FPN analysis (``rpnlab.lab.fpn``) and its exercises.

The checks against torchvision run on hand-built pieces (torchvision's ``AnchorGenerator``,
``RPNHead``, ``RegionProposalNetwork``, ``MultiScaleRoIAlign`` beside rpnlab's) over small random
feature pyramids, so no ResNet-50 is built here; each check is also shown to fail when one
setting differs. The notebook itself runs smoke-sized in tests/test_notebooks.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from matplotlib.figure import Figure
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.rpn import RegionProposalNetwork as TVRegionProposalNetwork
from torchvision.models.detection.rpn import RPNHead as TVRPNHead

from rpnlab.detector.anchors import AnchorGenerator
from rpnlab.detector.proposals import ProposalLayer
from rpnlab.detector.roi import RoIPooler
from rpnlab.detector.rpn import RPNHead, flatten_head_outputs
from rpnlab.lab import fpn
from rpnlab.lab.course import course_setup
from rpnlab.lab.exercises import solutions

SIZES = ((32.0,), (64.0,), (128.0,), (256.0,), (512.0,))
RATIOS = ((0.5, 1.0, 2.0),) * 5
STRIDES = (4, 8, 16, 32, 64)
NAMES = ["0", "1", "2", "3", "pool"]
CHANNELS = 8
IMAGE = 128  # a multiple of 64: torchvision's strides are the true ones


def _pyramid(batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, list[tuple[int, int]], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    images = torch.zeros(batch, 3, IMAGE, IMAGE)
    features = [torch.randn(batch, CHANNELS, IMAGE // s, IMAGE // s, generator=g) for s in STRIDES]
    return images, [(IMAGE, IMAGE), (IMAGE - 20, IMAGE)][:batch], features


def _heads(seed: int = 0) -> tuple[RPNHead, TVRPNHead]:
    torch.manual_seed(seed)
    tv_head = TVRPNHead(CHANNELS, 3)
    for p in tv_head.parameters():  # larger than the 0.01 init: scores and offsets with margins
        torch.nn.init.normal_(p, std=0.3)
    head = RPNHead(CHANNELS, 3, conv_channels=CHANNELS)
    head.conv.load_state_dict(tv_head.conv[0][0].state_dict())
    head.cls_logits.load_state_dict(tv_head.cls_logits.state_dict())
    head.bbox_pred.load_state_dict(tv_head.bbox_pred.state_dict())
    return head, tv_head


def _tv_rpn(tv_head: TVRPNHead, pre: int, post: int) -> TVRegionProposalNetwork:
    counts = {"training": pre, "testing": pre}
    posts = {"training": post, "testing": post}
    return TVRegionProposalNetwork(TVAnchorGenerator(SIZES, RATIOS), tv_head, 0.7, 0.3, 256, 0.5, counts, posts, 0.7)


# --------------------------------------------------------------------------- counts per level


def test_pyramid_levels_count_anchors_per_level():
    _, _, features = _pyramid()
    levels = fpn.pyramid_levels(AnchorGenerator(SIZES, RATIOS, STRIDES), features, NAMES)
    assert [lv["level"] for lv in levels] == ["P2", "P3", "P4", "P5", "P6"]
    assert [lv["anchors"] for lv in levels] == [(IMAGE // s) ** 2 * 3 for s in STRIDES]
    assert [lv["feature"] for lv in levels] == [(IMAGE // s, IMAGE // s) for s in STRIDES]
    assert math.isclose(sum(lv["share"] for lv in levels), 1.0)
    assert levels[0]["share"] > 0.74  # four times the cells of the next level: about 3/4 of all


def test_top_k_by_level_against_a_global_ranking():
    counts = [40, 10, 5]
    scores = torch.cat([torch.full((40,), -1.0), torch.full((10,), 2.0), torch.full((5,), 1.0)])
    scores = scores + torch.linspace(0, 0.01, 55)  # no ties
    out = fpn.top_k_by_level(scores, counts, 8)
    assert out["anchors"] == counts
    assert out["per-level top-k"] == [8, 8, 5]
    # The 21 best over all: the 10 of level 1, the 5 of level 2, then 6 of level 0.
    assert out["global top-k"] == [6, 10, 5]
    with pytest.raises(ValueError, match="k must be a positive int"):
        fpn.top_k_by_level(scores, counts, 0)
    with pytest.raises(ValueError, match="A = 55"):
        fpn.top_k_by_level(scores[:-1], counts, 4)


def test_nms_by_level_keeps_overlaps_of_different_levels():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 11.0], [50.0, 50.0, 60.0, 60.0],
                          [0.5, 0.0, 10.0, 10.0]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    levels = torch.tensor([0, 1, 1, 0])
    out = fpn.nms_by_level(boxes, scores, levels, 3, 0.7, post_nms_top_n=10)
    assert out["NMS input"] == [2, 2, 0]
    # box 3 overlaps box 0 on its own level: gone either way; box 1 overlaps box 0 across levels.
    assert out["NMS per level"] == [1, 2, 0]
    assert out["NMS across levels"] == [1, 1, 0]
    assert fpn.nms_by_level(boxes, scores, levels, 3, 0.7, post_nms_top_n=2)["NMS per level"] == [1, 1, 0]


def test_level_of_anchors():
    assert fpn.level_of_anchors([2, 0, 3]).tolist() == [0, 0, 2, 2, 2]


# --------------------------------------------------------------------------- against torchvision


def test_anchors_equal_torchvision_and_the_check_can_fail():
    images, sizes, features = _pyramid()
    feature_sizes = [tuple(f.shape[-2:]) for f in features]
    ours = AnchorGenerator(SIZES, RATIOS, STRIDES)(feature_sizes)
    tv = TVAnchorGenerator(SIZES, RATIOS)
    result = fpn.check_anchors(tv, images, sizes, features, ours)
    assert result["equal"] and result["max_diff"] == 0.0 and result["num_anchors"] == ours.shape[0]
    shifted = AnchorGenerator(SIZES, RATIOS, STRIDES, offset=0.5)(feature_sizes)
    result = fpn.check_anchors(tv, images, sizes, features, shifted)
    assert not result["equal"] and result["max_diff"] == pytest.approx(32.0)  # half of stride 64


def test_shared_head_equals_torchvision_and_the_check_can_fail():
    _, _, features = _pyramid()
    head, tv_head = _heads()
    result = fpn.check_shared_head(head, tv_head, features)
    assert len(result["max_diff"]) == 5 and max(result["max_diff"]) < 1e-5
    one = sum(p.numel() for p in head.parameters())
    assert result["parameters"] == one and result["parameters_if_one_per_level"] == 5 * one
    assert result["shapes"][0] == ((3, 32, 32), (12, 32, 32))
    with torch.no_grad():
        head.cls_logits.bias += 0.5
    assert min(fpn.check_shared_head(head, tv_head, features)["max_diff"]) > 0.4


@pytest.mark.parametrize("nms_thresh", [0.7, 0.5])
def test_proposals_equal_torchvision_only_with_its_settings(nms_thresh):
    images, sizes, features = _pyramid()
    head, tv_head = _heads()
    generator = AnchorGenerator(SIZES, RATIOS, STRIDES)
    feature_sizes = [tuple(f.shape[-2:]) for f in features]
    with torch.no_grad():
        objectness, deltas = flatten_head_outputs(*head(features))
    layer = ProposalLayer(pre_nms_top_n=200, post_nms_top_n=1000, nms_thresh=nms_thresh, min_size=1e-3).eval()
    boxes, _ = layer(generator(feature_sizes), objectness, deltas, sizes, generator.num_anchors_per_level(feature_sizes))
    result = fpn.check_proposals(_tv_rpn(tv_head, 200, 1000), images, sizes, features, NAMES, boxes)
    assert result["counts"] == [len(b) for b in boxes] and min(result["counts"]) > 10
    if nms_thresh == 0.7:  # torchvision's
        assert result["same_count"] and result["max_diff"] < 1e-4
    else:
        assert not (result["same_count"] and result["max_diff"] < 1e-4)
        assert sum(result["counts"]) < sum(result["torchvision_counts"])  # NMS at 0.5 removes more


def test_level_assignment_and_pooling_equal_torchvision():
    g = torch.Generator().manual_seed(3)
    xy = torch.rand(40, 2, generator=g) * 100
    wh = 2 + torch.rand(40, 2, generator=g) * 600
    boxes = torch.cat((xy, xy + wh), dim=1)
    levels = fpn.check_level_assignment(boxes, 2, 5)
    assert levels["equal"] and sum(levels["counts"]) == 40 and len(levels["counts"]) == 4
    assert min(levels["counts"]) > 0  # 2 to 600 px: every level gets some

    _, sizes, features = _pyramid()
    pooler = RoIPooler(7, spatial_scale=(1 / 4, 1 / 8, 1 / 16, 1 / 32), sampling_ratio=2)
    per_image = [boxes[:25], boxes[25:]]  # RoI Align reads zeros outside the map, both alike
    result = fpn.check_roi_pooling(pooler, features[:4], NAMES[:4], per_image, sizes, 2)
    assert result["shape"] == (40, CHANNELS, 7, 7) and result["max_diff"] < 1e-5
    moved = RoIPooler(7, spatial_scale=(1 / 4, 1 / 8, 1 / 16, 1 / 32), sampling_ratio=2, canonical_level=3)
    assert fpn.check_roi_pooling(moved, features[:4], NAMES[:4], per_image, sizes, 2)["max_diff"] > 0.01


# --------------------------------------------------------------------------- inputs, departures, figures


@pytest.mark.parametrize("bad", [500, 0, -64, True, 512.0, "512"])
def test_image_size_must_be_a_multiple_of_64(bad):
    with pytest.raises(ValueError, match=f"image_size={bad!r} must be a positive multiple of 64"):
        fpn.check_image_size(bad)
    assert fpn.check_image_size(256) == 256


def test_open_fpn_detector_names_the_models_it_opens():
    with pytest.raises(ValueError, match="model_name='fasterrcnn_mobilenet_v3_large_fpn' is not one of"):
        fpn.open_fpn_detector("fasterrcnn_mobilenet_v3_large_fpn", "random")


def test_departures_say_what_differs_from_the_course():
    from rpnlab.config import AnchorConfig

    course = course_setup()
    lines = fpn.fpn_departures(course, AnchorConfig(sizes=SIZES, aspect_ratios=RATIOS, strides=STRIDES),
                               512, "fasterrcnn_resnet50_fpn")
    text = "\n".join(lines)
    assert "5 (strides [4, 8, 16, 32, 64])" in text and f"stride {course.anchor_stride}" in text
    assert "[[32], [64], [128], [256], [512]]" in text and "512 x 512" in text


def test_figures_draw_every_level():
    _, _, features = _pyramid(batch=1)
    generator = AnchorGenerator(SIZES, RATIOS, STRIDES)
    levels = fpn.pyramid_levels(generator, features, NAMES)
    image = torch.rand(3, IMAGE, IMAGE)
    fig = fpn.plot_pyramid_anchors(image, levels, [generator.base_anchors(i) for i in range(5)])
    assert isinstance(fig, Figure)
    left, right = fig.axes[:2]
    assert len(right.patches) == 5  # one bar per level
    assert len(left.get_legend().get_texts()) == 5
    names = [f"P{i}" for i in range(2, 7)]
    fig = fpn.plot_level_counts({"a": [1, 2, 3, 4, 5], "b": [0, 0, 1, 1, 1]}, names)
    assert len(fig.axes[0].patches) == 10
    with pytest.raises(ValueError, match="counts\\['a'\\] has 2 values for 5 levels"):
        fpn.plot_level_counts({"a": [1, 2]}, names)
    boxes = torch.tensor([[0.0, 0.0, 40.0, 40.0], [0.0, 0.0, 150.0, 150.0], [0.0, 0.0, 300.0, 300.0]])
    fig = fpn.plot_level_assignment(boxes, 2, 5)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels[:3] == ["P2 (stride 4): 1", "P3 (stride 8): 1", "P4 (stride 16): 1"]
    fig = fpn.plot_proposals_by_level(image, boxes, torch.tensor([0.9, 0.8, 0.7]), torch.tensor([0, 0, 2]), names, 1)
    assert len(fig.axes[0].patches) == 2  # the best of level 0 and the one of level 2


def test_top_k_explorer_follows_its_controls():
    counts = [300, 60, 12]
    g = torch.Generator().manual_seed(0)
    scores = {"alike": torch.randn(372, generator=g), "coarse first": torch.cat(
        [torch.randn(300, generator=g) - 5, torch.randn(72, generator=g) + 5])}
    explorer = fpn.top_k_explorer(scores, counts, ["P2", "P3", "P4"], k=20)
    assert explorer.last_result["per-level top-k"] == [20, 20, 12]
    assert sum(explorer.last_result["global top-k"]) == 52
    assert "P4:" in explorer.status.value  # alike: the coarsest level loses anchors
    first_png = explorer.output.outputs[0]["data"]["image/png"]
    explorer.controls["scores"].value = "coarse first"
    chosen = explorer.last_result["global top-k"]
    assert chosen[0] == 0 and sum(chosen) == 52  # the 72 coarse anchors all outrank the fine ones
    explorer.controls["k"].value = 5
    assert explorer.last_result["per-level top-k"] == [5, 5, 5]
    assert explorer.output.outputs[0]["data"]["image/png"] != first_png
    assert explorer.last_result["render_seconds"] > 0 and explorer.last_result["seconds"] >= 0
    with pytest.raises(ValueError, match="objectness is empty"):
        fpn.top_k_explorer({}, counts, ["P2", "P3", "P4"])


# --------------------------------------------------------------------------- exercises: typical mistakes


def _level_rounded(boxes, k_min, k_max):
    s = torch.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    return torch.round(4 + torch.log2(s / 224)).clamp(k_min, k_max).long() - k_min


def _level_longer_side(boxes, k_min, k_max):
    s = torch.max(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    return torch.floor(4 + torch.log2(s / 224) + 1e-6).clamp(k_min, k_max).long() - k_min


def _level_no_eps(boxes, k_min, k_max):
    s = torch.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    return torch.floor(4 + torch.log2(s / 224)).clamp(k_min, k_max).long() - k_min


def _top_k_global(objectness, num_anchors_per_level, k):
    return objectness.topk(min(k * len(num_anchors_per_level), objectness.shape[1]), dim=1).indices


def _top_k_no_offset(objectness, num_anchors_per_level, k):
    return torch.cat([s.topk(min(k, s.shape[1]), dim=1).indices
                      for s in objectness.split(list(num_anchors_per_level), dim=1)], dim=1)


def _top_k_no_min(objectness, num_anchors_per_level, k):
    picked, offset = [], 0
    for scores in objectness.split(list(num_anchors_per_level), dim=1):
        picked.append(scores.topk(k, dim=1).indices + offset)  # fails on a level with fewer than k
        offset += scores.shape[1]
    return torch.cat(picked, dim=1)


def _top_k_over_batch(objectness, num_anchors_per_level, k):
    picked = solutions.top_k_per_level(objectness[:1], num_anchors_per_level, k)
    return picked.expand(objectness.shape[0], -1)


# Typical mistakes in notebook 10's exercises; tests/test_exercises.py runs them with the others.
FPN_MISTAKES = [
    ("fpn_level", _level_rounded, "112, 180, 300", "floor, not a rounding"),
    ("fpn_level", _level_longer_side, "thin box", "sqrt(w * h)"),
    ("fpn_level", lambda b, lo, hi: solutions.fpn_level(b, -100, 100) - 100 - lo, "20 px", "clamp"),
    ("fpn_level", _level_no_eps, "hair smaller", "eps"),
    ("fpn_level", lambda b, lo, hi: solutions.fpn_level(b, lo, hi) + lo, "224 x 224", "k - k_min"),
    ("top_k_per_level", lambda o, n, k: o.topk(k, dim=1).values, "one level", "indices"),
    ("top_k_per_level", _top_k_global, "second scoring lower", "EACH level"),
    ("top_k_per_level", _top_k_no_offset, "three levels", "offset"),
    ("top_k_per_level", _top_k_no_min, "fewer anchors than k", "min(k, A_l)"),
    ("top_k_per_level", _top_k_over_batch, "two images", "each image"),
]
