"""rpnlab.detector.anchors against torchvision's AnchorGenerator, plus conventions and validation."""

import math

import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.image_list import ImageList

from rpnlab.config import AnchorConfig
from rpnlab.detector.anchors import AnchorGenerator, paper_base_anchors
from rpnlab.detector.boxes import box_area, xyxy_to_cxcywh


def torchvision_anchors(sizes, ratios, strides, feature_sizes, dtype=torch.float32):
    """torchvision's anchors for one image whose size is each level's feature size x stride.

    torchvision derives a level's stride as ``image_size // feature_size``, so the image must be
    exactly ``feature_size * stride`` on every level.
    """
    image_hw = {(h * s, w * s) for (h, w), s in zip(feature_sizes, strides)}
    assert len(image_hw) == 1, "feature sizes and strides must imply one image size"
    (ih, iw) = image_hw.pop()
    images = ImageList(torch.zeros(1, 3, ih, iw, dtype=dtype), [(ih, iw)])
    features = [torch.zeros(1, 1, h, w, dtype=dtype) for h, w in feature_sizes]
    return TVAnchorGenerator(sizes, ratios)(images, features)[0]


@pytest.mark.parametrize(
    "sizes, ratios, stride, hw",
    [
        (((128, 256, 512),), ((0.5, 1.0, 2.0),), 16, (5, 7)),
        (((32, 64),), ((0.25, 0.5, 1.0, 2.0, 4.0),), 8, (6, 4)),
        (((33, 45, 91, 100),), ((0.3, 0.7, 1.3),), 4, (3, 9)),
        (((64,),), ((1.0,),), 32, (1, 1)),
    ],
)
def test_single_level_matches_torchvision(sizes, ratios, stride, hw):
    ours = AnchorGenerator(sizes, ratios, (stride,))([hw])
    ref = torchvision_anchors(sizes, ratios, (stride,), [hw])
    assert ours.shape == ref.shape == (hw[0] * hw[1] * len(sizes[0]) * len(ratios[0]), 4)
    assert torch.equal(ours, ref)


def test_fpn_five_levels_match_torchvision():
    sizes = ((32,), (64,), (128,), (256,), (512,))
    ratios = ((0.5, 1.0, 2.0),) * 5
    strides = (4, 8, 16, 32, 64)
    feature_sizes = [(64, 48), (32, 24), (16, 12), (8, 6), (4, 3)]  # a 256 x 192 image
    gen = AnchorGenerator(sizes, ratios, strides)
    ours = gen(feature_sizes)
    ref = torchvision_anchors(sizes, ratios, strides, feature_sizes)
    assert torch.equal(ours, ref)
    per_level = gen.grid_anchors(feature_sizes)
    assert [len(a) for a in per_level] == gen.num_anchors_per_level(feature_sizes)
    assert torch.equal(torch.cat(per_level), ours)


def test_several_sizes_per_level_and_float64_match_torchvision():
    sizes = ((16, 24, 40), (48, 80, 120))
    ratios = ((0.5, 1.0, 2.0), (0.33, 1.0, 3.0))
    strides = (8, 16)
    feature_sizes = [(10, 12), (5, 6)]
    ours = AnchorGenerator(sizes, ratios, strides)(feature_sizes, dtype=torch.float64)
    ref = torchvision_anchors(sizes, ratios, strides, feature_sizes, dtype=torch.float64)
    assert ours.dtype == torch.float64
    assert torch.equal(ours, ref)


def test_base_anchor_order_is_ratios_outer_sizes_inner():
    gen = AnchorGenerator(((10, 20),), ((0.25, 4.0),), (8,), round_base=False)
    wh = xyxy_to_cxcywh(gen.base_anchors())[:, 2:]
    expected = torch.tensor([[20.0, 5.0], [40.0, 10.0], [5.0, 20.0], [10.0, 40.0]])  # (w, h)
    torch.testing.assert_close(wh, expected)
    # rounded, the same as torchvision's (round half to even: 2.5 -> 2)
    rounded = AnchorGenerator(((10, 20),), ((0.25, 4.0),), (8,)).base_anchors()
    assert rounded[0].tolist() == [-10.0, -2.0, 10.0, 2.0]
    assert torch.equal(rounded, TVAnchorGenerator(((10, 20),), ((0.25, 4.0),)).cell_anchors[0])


def test_grid_order_row_major_then_k():
    gen = AnchorGenerator(((16, 32),), ((1.0,),), (10,), round_base=False)
    anchors = gen([(2, 3)])
    centres = xyxy_to_cxcywh(anchors)[:, :2].reshape(2, 3, 2, 2)  # (H, W, k, xy)
    for i in range(2):
        for j in range(3):
            assert centres[i, j].tolist() == [[j * 10.0, i * 10.0]] * 2
    assert anchors[1, 2] - anchors[1, 0] == 32 and anchors[0, 2] - anchors[0, 0] == 16


def test_paper_base_anchors():
    base = paper_base_anchors()
    assert base.shape == (9, 4)
    cx, cy, w, h = xyxy_to_cxcywh(base).unbind(-1)
    assert torch.equal(cx, torch.zeros(9)) and torch.equal(cy, torch.zeros(9))
    assert torch.equal(base, base.round())
    # areas within rounding of 128^2, 256^2, 512^2, repeated for the three ratios
    areas = torch.tensor([128.0, 256.0, 512.0]).repeat(3) ** 2
    torch.testing.assert_close(box_area(base), areas, rtol=0.01, atol=0)
    # ratio h/w = 0.5 first: the wide anchors
    assert (w[:3] > h[:3]).all() and torch.equal(w[3:6], h[3:6]) and (w[6:] < h[6:]).all()
    assert base[0].tolist() == [-91.0, -45.0, 91.0, 45.0]
    assert torch.equal(base, TVAnchorGenerator().cell_anchors[0])


@pytest.mark.parametrize("ratio_convention", ["h/w", "w/h"])
def test_unrounded_areas_and_ratios_are_exact(ratio_convention):
    sizes, ratios = (24.0, 100.0, 333.0), (0.3, 0.5, 1.0, 2.0, 3.7)
    gen = AnchorGenerator(sizes, ratios, 16, ratio_convention=ratio_convention, round_base=False)
    _, _, w, h = xyxy_to_cxcywh(gen.base_anchors().double()).unbind(-1)
    size = torch.tensor(sizes, dtype=torch.float64).repeat(len(ratios))
    ratio = torch.tensor(ratios, dtype=torch.float64).repeat_interleave(len(sizes))
    torch.testing.assert_close(w * h, size**2, rtol=1e-5, atol=0)
    measured = h / w if ratio_convention == "h/w" else w / h
    torch.testing.assert_close(measured, ratio, rtol=1e-5, atol=0)


@pytest.mark.parametrize("round_base", [True, False])
def test_ratio_conventions_swap_widths_and_heights(round_base):
    kw = {
        "sizes": (32, 90, 200),
        "aspect_ratios": (0.5, 1.0, 2.0, 3.0),
        "strides": 8,
        "round_base": round_base,
    }
    hw = AnchorGenerator(ratio_convention="h/w", **kw)
    wh = AnchorGenerator(ratio_convention="w/h", **kw)
    assert torch.equal(wh.base_anchors(), hw.base_anchors()[:, [1, 0, 3, 2]])
    a_hw, a_wh = hw([(3, 4)]), wh([(3, 4)])
    s_hw, s_wh = xyxy_to_cxcywh(a_hw), xyxy_to_cxcywh(a_wh)
    torch.testing.assert_close(s_hw[:, :2], s_wh[:, :2], atol=1e-5, rtol=0)  # same centres
    torch.testing.assert_close(s_hw[:, 2:], s_wh[:, [3, 2]], atol=1e-5, rtol=0)  # w and h swapped
    assert not torch.allclose(s_hw[:, 2:], s_wh[:, 2:])


def test_offset_half_shifts_centres_by_half_a_stride():
    kw = {"sizes": ((32, 64),), "aspect_ratios": ((0.5, 1.0, 2.0),), "strides": (16,)}
    a0 = AnchorGenerator(offset=0.0, **kw)([(4, 5)])
    a5 = AnchorGenerator(offset=0.5, **kw)([(4, 5)])
    assert torch.equal(a5 - a0, torch.full_like(a0, 8.0))
    # the first location's centre is the middle of the first 16 x 16 cell
    assert xyxy_to_cxcywh(a5[:1])[0, :2].tolist() == [8.0, 8.0]


@pytest.mark.parametrize("feature_sizes", [[(1, 1)], [(7, 3)], [(13, 20)]])
def test_count_is_h_w_k(feature_sizes):
    gen = AnchorGenerator((16, 32, 64), (0.5, 1.0), 8)
    (h, w), k = feature_sizes[0], 6
    assert gen.num_anchors_per_location() == [k]
    assert gen.num_anchors_per_level(feature_sizes) == [h * w * k]
    assert gen(feature_sizes).shape == (h * w * k, 4)


def test_from_config_and_flat_tuples():
    cfg = AnchorConfig(
        sizes=(32, 64), aspect_ratios=(1.0, 2.0), strides=8, offset=0.5, ratio_convention="w/h"
    )
    gen = AnchorGenerator.from_config(cfg)
    assert gen.sizes == ((32, 64),) and gen.aspect_ratios == ((1.0, 2.0),) and gen.strides == (8,)
    assert gen.offset == 0.5 and gen.ratio_convention == "w/h"
    same = AnchorGenerator((32, 64), (1.0, 2.0), 8, offset=0.5, ratio_convention="w/h")
    assert torch.equal(gen([(3, 3)]), same([(3, 3)]))
    # a flat tuple of ratios is shared by every level
    two = AnchorGenerator(((16,), (32,)), (0.5, 1.0, 2.0), (4, 8))
    assert two.aspect_ratios == ((0.5, 1.0, 2.0),) * 2 and two.num_anchors_per_location() == [3, 3]
    with pytest.raises(TypeError, match="AnchorConfig"):
        AnchorGenerator.from_config({"sizes": (32,)})


def test_device_dtype_and_cache():
    gen = AnchorGenerator((32,), (1.0,), 8)
    a = gen([(2, 2)], device="cpu", dtype=torch.float64)
    assert a.dtype == torch.float64 and a.device.type == "cpu"
    assert gen([(2, 2)], device=torch.device("cpu"), dtype=torch.float64) is a  # cached
    assert gen([(2, 3)], dtype=torch.float64) is not a
    assert gen([(2, 2)], dtype=torch.float32).dtype == torch.float32
    nocache = AnchorGenerator((32,), (1.0,), 8, cache=False)
    b1, b2 = nocache([(2, 2)]), nocache([(2, 2)])
    assert b1 is not b2 and torch.equal(b1, b2)
    for n in range(1, 40):  # the cache stays bounded
        gen([(n, 1)])
    assert len(gen._cache) <= 16
    assert gen.base_anchors() is not gen.base_anchors()  # a copy, safe to edit


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"sizes": ((32, -1),)}, r"sizes\[0\]"),
        ({"sizes": ((),)}, r"sizes\[0\]"),
        ({"sizes": ()}, "sizes"),
        ({"aspect_ratios": ((0.5, 0.0),)}, r"aspect_ratios\[0\]"),
        ({"aspect_ratios": ((1.0,), (1.0,))}, "aspect_ratios"),
        ({"strides": (16, 32)}, "strides"),
        ({"strides": (0,)}, "strides"),
        ({"offset": 1.0}, "offset"),
        ({"offset": -0.5}, "offset"),
        ({"ratio_convention": "hw"}, "ratio_convention"),
        ({"sizes": ((32, math.nan),)}, r"sizes\[0\]"),
    ],
)
def test_constructor_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AnchorGenerator(**kwargs)


def test_feature_sizes_and_level_validation():
    gen = AnchorGenerator(((32,), (64,)), (1.0,), (8, 16))
    with pytest.raises(ValueError, match="feature_sizes has 1 level"):
        gen([(4, 4)])
    with pytest.raises(ValueError, match="feature_sizes must be positive"):
        gen([(4, 4), (0, 2)])
    with pytest.raises(TypeError, match="feature_sizes must be a sequence of"):
        gen([4, 4])
    with pytest.raises(ValueError, match="level"):
        gen.base_anchors(2)
    # torch.Size pairs, as from feature.shape[-2:], are fine
    assert gen([torch.zeros(1, 1, 4, 4).shape[-2:], torch.Size([2, 2])]).shape == (20, 4)
