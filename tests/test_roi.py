"""rpnlab.detector.roi: the plain-PyTorch RoI Pool / RoI Align against torchvision's kernels, crop pooling
checked by hand, and RoIPooler (one level and FPN) against torchvision."""

from collections import OrderedDict

import pytest
import torch
import torchvision
from torchvision.ops import MultiScaleRoIAlign

from rpnlab.config import RoIConfig
from rpnlab.detector.roi import (
    RoIPooler,
    boxes_to_rois,
    crop_and_resize_pool,
    fpn_level_of_boxes,
    roi_align,
    roi_pool,
)

ATOL = 1e-4


def random_case(seed: int, dtype=torch.float32):
    """A seeded batch: features (N, C, H, W) and (K, 5) rois in image pixels, with every hard case:
    boxes partly or fully outside the map, zero-size boxes, boxes smaller than a cell, and a
    corner on an exact half cell (where C's round() and torch.round() disagree)."""
    g = torch.Generator().manual_seed(seed)
    n, c = 2, 3
    h, w = (int(v) for v in torch.randint(1, 11, (2,), generator=g))
    scale = (1.0, 0.25, 1 / 16)[seed % 3]
    x = torch.randn(n, c, h, w, generator=g, dtype=dtype)
    k = 10
    size = torch.tensor([w, h], dtype=dtype) / scale  # the map's extent in image pixels
    xy = (torch.rand(k, 2, generator=g, dtype=dtype) * 1.6 - 0.3) * size  # some start outside
    wh = torch.rand(k, 2, generator=g, dtype=dtype) * size
    wh[0] = 0.0  # a point
    wh[1, 0] = 0.0  # a vertical line
    wh[2] = 0.4 / scale  # smaller than one cell
    xy[3] = -2.0 * size  # fully outside, above-left
    xy[4] = 1.5 * size  # fully outside, below-right
    xy[5] = torch.tensor([1.5, 0.5], dtype=dtype) / scale  # corners on half cells
    wh[5] = 2.0 / scale
    batch = torch.randint(0, n, (k, 1), generator=g).to(dtype)
    return x, torch.cat((batch, xy, xy + wh), dim=1), scale


def assert_same_forward_and_grad(ours, ref, x, atol):
    x = x.clone().requires_grad_(True)
    out, expected = ours(x), ref(x)
    torch.testing.assert_close(out, expected, atol=atol, rtol=0)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=x.dtype)
    (grad,) = torch.autograd.grad(out, x, upstream)
    (expected_grad,) = torch.autograd.grad(expected, x, upstream)
    torch.testing.assert_close(grad, expected_grad, atol=atol, rtol=0)


# ----------------------------------------------------------------------------- RoI Pool


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("output_size", [7, (3, 5)])
def test_roi_pool_matches_torchvision(seed, output_size):
    x, rois, scale = random_case(seed)
    assert_same_forward_and_grad(
        lambda t: roi_pool(t, rois, output_size, scale),
        lambda t: torchvision.ops.roi_pool(t, rois, output_size, scale),
        x,
        ATOL,
    )


def test_roi_pool_rounds_halves_away_from_zero():
    # 2.5 cells: C's round() gives 3, torch.round() would give 2 and pool a different column.
    x = torch.arange(2 * 8 * 8, dtype=torch.float32).reshape(2, 1, 8, 8)
    rois = torch.tensor([[0, 2.5, 0.5, 4.5, 6.5], [1, 0.5, 1.5, 0.5, 1.5]])
    torch.testing.assert_close(roi_pool(x, rois, 2), torchvision.ops.roi_pool(x, rois, 2), atol=0, rtol=0)
    assert roi_pool(x, rois, 1)[0, 0, 0, 0] == x[0, 0, 7, 5]  # box snapped to columns 3..5, rows 1..7


def test_roi_pool_ties_send_gradient_to_the_first_maximum():
    # A constant map: every cell of a bin ties; torchvision credits the first one, row by row.
    # A wrong pick moves a whole upstream value (order 1); the tolerance only allows the rounding
    # of adding a cell's gradients from several bins in another order.
    x = torch.ones(1, 2, 6, 6)
    rois = torch.tensor([[0, 0.0, 0.0, 5.0, 5.0], [0, 1.0, 2.0, 4.0, 3.0]])
    assert_same_forward_and_grad(
        lambda t: roi_pool(t, rois, 3), lambda t: torchvision.ops.roi_pool(t, rois, 3), x, 1e-6
    )


def test_roi_pool_bins_of_more_than_255_cells_match_torchvision():
    # A 7 x 7 pooling of a 130-cell box gives bins of 19 x 19 = 361 cells: more ranks than uint8 holds.
    # Constant rows make ties too, so the first-maximum rule is checked at that size as well.
    x = torch.randn(1, 3, 150, 150, generator=torch.Generator().manual_seed(0))
    x[:, :, 40:60] = 1.0
    rois = torch.tensor([[0, 0.0, 0.0, 130.0, 130.0], [0, 3.0, 5.0, 140.0, 120.0]])
    assert_same_forward_and_grad(
        lambda t: roi_pool(t, rois, 7), lambda t: torchvision.ops.roi_pool(t, rois, 7), x, 1e-5
    )


def test_roi_pool_is_exact_in_float64():
    for seed in range(3):
        x, rois, scale = random_case(seed, torch.float64)
        assert_same_forward_and_grad(
            lambda t, rois=rois, scale=scale: roi_pool(t, rois, (3, 5), scale),
            lambda t, rois=rois, scale=scale: torchvision.ops.roi_pool(t, rois, (3, 5), scale),
            x,
            1e-12,
        )


# ----------------------------------------------------------------------------- RoI Align


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("sampling_ratio", [-1, 0, 1, 2])
@pytest.mark.parametrize("aligned", [False, True])
def test_roi_align_matches_torchvision(seed, sampling_ratio, aligned):
    x, rois, scale = random_case(seed)
    for output_size in (7, (3, 5)):
        assert_same_forward_and_grad(
            lambda t, size=output_size: roi_align(t, rois, size, scale, sampling_ratio, aligned),
            lambda t, size=output_size: torchvision.ops.roi_align(t, rois, size, scale, sampling_ratio, aligned),
            x,
            ATOL,
        )


@pytest.mark.parametrize("aligned", [False, True])
def test_roi_align_is_exact_in_float64(aligned):
    for seed in range(3):
        x, rois, scale = random_case(seed, torch.float64)
        assert_same_forward_and_grad(
            lambda t, rois=rois, scale=scale: roi_align(t, rois, 7, scale, 0, aligned),
            lambda t, rois=rois, scale=scale: torchvision.ops.roi_align(t, rois, 7, scale, 0, aligned),
            x,
            1e-12,
        )


def test_roi_align_adaptive_grid_differs_per_roi():
    # Boxes of very different sizes need different point counts (1..5 per axis): all groups agree.
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 2, 40, 40, generator=g)
    sides = torch.tensor([1.0, 3.0, 9.0, 17.0, 30.0, 35.0])
    rois = torch.stack((torch.zeros(6), torch.ones(6), 2 * torch.ones(6), 1 + sides, 2 + sides.flip(0)), dim=1)
    assert_same_forward_and_grad(
        lambda t: roi_align(t, rois, 7, 1.0, 0), lambda t: torchvision.ops.roi_align(t, rois, 7, 1.0, 0), x, ATOL
    )


def test_roi_align_on_a_linear_map_reads_bin_centres():
    # Bilinear reads of a linear map are exact, so each bin's mean is the map at the bin centre.
    h = w = 12
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    x = (2 * ys + xs)[None, None]
    out = roi_align(x, [torch.tensor([[2.0, 3.0, 8.0, 9.0]])], 2, 1.0, 2, aligned=True)
    # aligned: box x 2..8 -> cells 1.5..7.5, bin centres 3.0 and 6.0; y 3..9 -> 2.5..8.5: 4.0, 7.0
    expected = torch.tensor([[2 * 4.0 + 3.0, 2 * 4.0 + 6.0], [2 * 7.0 + 3.0, 2 * 7.0 + 6.0]])
    torch.testing.assert_close(out[0, 0], expected)


# ----------------------------------------------------------------------------- shared behaviour


@pytest.mark.parametrize("fn", ["pool", "align", "crop"])
def test_empty_box_set_gives_empty_output(fn):
    x = torch.randn(2, 3, 5, 6, requires_grad=True)
    call = {
        "pool": lambda b: roi_pool(x, b, (3, 5)),
        "align": lambda b: roi_align(x, b, (3, 5), sampling_ratio=0),
        "crop": lambda b: crop_and_resize_pool(x, b, (3, 5)),
    }[fn]
    for boxes in ([torch.zeros(0, 4), torch.zeros(0, 4)], torch.zeros(0, 5)):
        out = call(boxes)
        assert out.shape == (0, 3, 3, 5)
        out.sum().backward()  # still part of the graph, with zero gradient
        assert torch.count_nonzero(x.grad) == 0
    if fn != "crop":
        ref = getattr(torchvision.ops, f"roi_{fn}")(x, torch.zeros(0, 5), (3, 5))
        assert ref.shape == out.shape


def test_list_of_boxes_equals_rois_tensor():
    x, rois, scale = random_case(0)
    per_image = [rois[rois[:, 0] == i, 1:] for i in range(2)]
    ordered = torch.cat([rois[rois[:, 0] == i] for i in range(2)])
    assert torch.equal(boxes_to_rois(per_image), ordered)
    for fn in (roi_pool, roi_align, crop_and_resize_pool):
        torch.testing.assert_close(fn(x, per_image, 3, scale), fn(x, ordered, 3, scale), atol=0, rtol=0)


def test_no_gradient_reaches_the_boxes():
    x, rois, scale = random_case(1)
    boxes = rois.clone().requires_grad_(True)
    for fn in (roi_pool, roi_align, crop_and_resize_pool):
        assert not fn(x, boxes, 3, scale).requires_grad


@pytest.mark.parametrize("fn", [roi_pool, roi_align, crop_and_resize_pool])
def test_bad_arguments_raise_clear_errors(fn):
    x = torch.randn(1, 2, 4, 4)
    rois = torch.tensor([[0, 0.0, 0.0, 2.0, 2.0]])
    with pytest.raises(ValueError, match="output_size"):
        fn(x, rois, 0)
    with pytest.raises(ValueError, match="output_size"):
        fn(x, rois, (2, 2, 2))
    with pytest.raises(ValueError, match="input"):
        fn(x[0], rois, 2)
    with pytest.raises(ValueError, match=r"\(K, 5\)"):
        fn(x, rois[:, 1:], 2)
    with pytest.raises(ValueError, match=r"boxes\[0\]"):
        fn(x, [torch.zeros(2, 5)], 2)
    with pytest.raises(TypeError, match="boxes"):
        fn(x, "boxes", 2)


# ----------------------------------------------------------------------------- crop and resize


def test_crop_pool_on_a_constant_map():
    x = torch.full((1, 2, 10, 10), 3.0)
    inside = crop_and_resize_pool(x, [torch.tensor([[8.0, 8.0, 120.0, 72.0]])], 7, 1 / 16)
    assert inside.shape == (1, 2, 7, 7)
    torch.testing.assert_close(inside, torch.full_like(inside, 3.0))
    # Rows beyond the last cell centre (coordinate 9) read 0; the box spans y = 6..13.5 in cells.
    outside = crop_and_resize_pool(x, [torch.tensor([[0.0, 6.0, 9.0, 13.5]])], 2, 1.0)
    # Sample rows at 6, 8.5, 11, 13.5: the first pooled row holds 6 and 8.5 (inside), the second none.
    torch.testing.assert_close(outside[0, 0], torch.tensor([[3.0, 3.0], [0.0, 0.0]]))


def test_crop_pool_on_a_linear_map_by_hand():
    # f(y, x) = 2y + x + 1 is reproduced exactly by bilinear reads; max of a 2x2 block of samples
    # is its bottom-right sample, since f grows with y and x.
    ys, xs = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    x = (2 * ys + xs + 1)[None, None]
    box = torch.tensor([[2.0, 1.0, 8.0, 10.0]])  # x 2..8, y 1..10, at scale 1
    out = crop_and_resize_pool(x, [box], 2, 1.0)
    # 4 samples per axis from edge to edge: x at 2, 4, 6, 8; y at 1, 4, 7, 10. Keep 4, 8 and 4, 10.
    expected = torch.tensor([[2 * 4 + 4 + 1, 2 * 4 + 8 + 1], [2 * 10 + 4 + 1, 2 * 10 + 8 + 1]], dtype=torch.float32)
    torch.testing.assert_close(out[0, 0], expected)
    # Through the spatial scale: the same box in a 4x larger image at scale 1/4.
    torch.testing.assert_close(crop_and_resize_pool(x, [box * 4], 2, 0.25), out)


def _tf_crop_and_resize_loop(image, box, crop):
    """tf.image.crop_and_resize for one (C, H, W) image and a box in cell coordinates, by loops."""
    _, h, w = image.shape
    x1, y1, x2, y2 = box.tolist()
    out = torch.zeros(image.shape[0], crop, crop, dtype=image.dtype)
    for i in range(crop):
        y = y1 + i * (y2 - y1) / (crop - 1)
        for j in range(crop):
            xx = x1 + j * (x2 - x1) / (crop - 1)
            if not (0 <= y <= h - 1 and 0 <= xx <= w - 1):
                continue
            t, b, le, r = int(y // 1), min(int(y // 1) + 1, h - 1), int(xx // 1), min(int(xx // 1) + 1, w - 1)
            fy, fx = y - t, xx - le
            top = image[:, t, le] * (1 - fx) + image[:, t, r] * fx
            bottom = image[:, b, le] * (1 - fx) + image[:, b, r] * fx
            out[:, i, j] = top * (1 - fy) + bottom * fy
    return out


def test_crop_pool_matches_a_loop_reference():
    x, rois, scale = random_case(4, torch.float64)
    out = crop_and_resize_pool(x, rois, 3, scale)
    for k in range(len(rois)):
        crops = _tf_crop_and_resize_loop(x[int(rois[k, 0])], rois[k, 1:] * scale, 6)
        torch.testing.assert_close(out[k], torch.nn.functional.max_pool2d(crops[None], 2)[0])


def test_crop_pool_gradient_flows_and_is_correct():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 2, 6, 7, generator=g, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor([[0, 1.0, 1.0, 5.0, 4.0], [1, -1.0, 0.5, 3.3, 7.0]], dtype=torch.float64)
    out = crop_and_resize_pool(x, rois, 3)
    out.sum().backward()
    assert x.grad[0].abs().sum() > 0 and x.grad[1].abs().sum() > 0
    assert torch.autograd.gradcheck(lambda t: crop_and_resize_pool(t, rois, 3), (x.detach().requires_grad_(),))


# ----------------------------------------------------------------------------- RoIPooler


def _proposals(seed, sizes, image=256.0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        xy = torch.rand(n, 2, generator=g) * image * 0.7
        wh = torch.rand(n, 2, generator=g) * image * 0.6 + 1.0
        out.append(torch.cat((xy, xy + wh), dim=1))
    return out


@pytest.mark.parametrize("mode", ["align", "pool"])
def test_pooler_python_equals_torchvision(mode):
    g = torch.Generator().manual_seed(0)
    features = torch.randn(2, 4, 16, 16, generator=g)
    proposals = _proposals(0, [7, 0])
    kwargs = {"output_size": 7, "spatial_scale": 1 / 16, "sampling_ratio": 2, "mode": mode,
              "aligned": mode == "align"}
    fast = RoIPooler(implementation="torchvision", **kwargs)
    slow = RoIPooler(implementation="python", **kwargs)
    assert_same_forward_and_grad(lambda t: slow(t, proposals), lambda t: fast(t, proposals), features, ATOL)
    assert slow(features, proposals).shape == (7, 4, 7, 7)


def test_pooler_single_level_equals_torchvision_ops():
    g = torch.Generator().manual_seed(1)
    features = torch.randn(2, 3, 16, 16, generator=g)
    proposals = _proposals(1, [5, 4])
    out = RoIPooler(output_size=(3, 5), spatial_scale=1 / 16, sampling_ratio=0)(features, proposals)
    ref = torchvision.ops.roi_align(features, proposals, (3, 5), 1 / 16, 0)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    ms = MultiScaleRoIAlign(["0"], 7, 2)(OrderedDict([("0", features)]), proposals, [(256, 256)] * 2)
    torch.testing.assert_close(RoIPooler()(features, proposals), ms, atol=0, rtol=0)


@pytest.mark.parametrize("implementation", ["torchvision", "python", "auto"])
def test_pooler_fpn_matches_multiscale_roi_align(implementation):
    g = torch.Generator().manual_seed(2)
    names, scales = ["p2", "p3", "p4", "p5"], (1 / 4, 1 / 8, 1 / 16, 1 / 32)
    levels = [torch.randn(2, 3, int(512 * s), int(512 * s), generator=g, requires_grad=True) for s in scales]
    proposals = _proposals(2, [12, 9], 512.0)
    # One box per level for sure: sides 20 (P2), 150 (P3), 300 (P4), 480 (P5); plus a point.
    sides = torch.tensor([20.0, 150.0, 300.0, 480.0, 0.0])
    proposals[0][:5] = torch.stack((torch.full((5,), 10.0), torch.full((5,), 20.0), 10 + sides, 20 + sides), dim=1)
    pooler = RoIPooler(7, scales, sampling_ratio=2, implementation=implementation)
    ref_pooler = MultiScaleRoIAlign(names, 7, 2)
    out = pooler(levels, proposals)
    ref = ref_pooler(OrderedDict(zip(names, levels)), proposals, [(512, 512)] * 2)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    upstream = torch.randn(out.shape, generator=g)
    grads = torch.autograd.grad(out, levels, upstream)
    ref_grads = torch.autograd.grad(ref, levels, upstream)
    for grad, ref_grad in zip(grads, ref_grads):
        assert grad.abs().sum() > 0  # every level received some RoIs
        torch.testing.assert_close(grad, ref_grad, atol=ATOL, rtol=0)
    assert torch.equal(fpn_level_of_boxes(torch.cat(proposals), 2, 5), ref_pooler.map_levels(proposals))


def test_pooler_auto_takes_the_matrix_form_on_small_cpu_maps_only(monkeypatch):
    from rpnlab.detector import roi as roi_module

    calls = []
    real = roi_module.roi_align
    monkeypatch.setattr(roi_module, "roi_align", lambda *a, **k: calls.append(a[0].shape[-2:]) or real(*a, **k))
    side = int(roi_module.matrix_align_max_cells(5, 1) ** 0.5)  # 5 bin columns, 1 point per bin
    pooler = RoIPooler(5, (1 / 8, 1 / 16), sampling_ratio=1, implementation="auto")
    levels = [torch.randn(1, 3, 2 * side, 2 * side), torch.randn(1, 3, side, side)]
    proposals = [torch.tensor([[0.0, 0.0, 40.0, 40.0], [0.0, 0.0, 400.0, 400.0]])]  # one per level
    out = pooler(levels, proposals)
    assert calls == [torch.Size([side, side])]  # the coarse level only (the fine one: the sparse form)
    ref = RoIPooler(5, (1 / 8, 1 / 16), sampling_ratio=1)(levels, proposals)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    # Under bf16 autocast the matrix form still pools in float32, as torchvision's kernel does.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        small = RoIPooler(5, 1 / 16, sampling_ratio=1, implementation="auto")(levels[1].bfloat16(), proposals)
    assert small.dtype == torch.float32
    adaptive = RoIPooler(5, 1 / 16, sampling_ratio=0, implementation="auto")
    calls.clear()
    adaptive(levels[1], proposals)
    assert calls == []  # adaptive sampling: always the kernel
    expected = torchvision.ops.roi_align(levels[1].bfloat16().float(), proposals, 5, 1 / 16, 1)
    torch.testing.assert_close(small, expected, atol=1e-5, rtol=0)


def test_pooler_crop_mode_and_gradient_into_features():
    features = torch.randn(1, 2, 8, 8, requires_grad=True)
    out = RoIPooler(output_size=3, spatial_scale=1 / 16, mode="crop")(features, _proposals(3, [4], 128.0))
    assert out.shape == (4, 2, 3, 3)
    out.sum().backward()
    assert features.grad.abs().sum() > 0


def test_pooler_from_config():
    pooler = RoIPooler.from_config(RoIConfig(pooler="pool", output_size=5, implementation="python"), 1 / 8)
    assert (pooler.mode, pooler.output_size, pooler.spatial_scales, pooler.implementation) == (
        "pool", (5, 5), (0.125,), "python"
    )
    features = torch.randn(1, 2, 8, 8)
    proposals = _proposals(4, [3], 64.0)
    torch.testing.assert_close(pooler(features, proposals), torchvision.ops.roi_pool(features, proposals, 5, 1 / 8))
    with pytest.raises(ValueError, match="pooler"):
        RoIPooler.from_config(RoIConfig(pooler="nope"), 1 / 16)


def test_pooler_rejects_bad_arguments():
    with pytest.raises(ValueError, match="mode"):
        RoIPooler(mode="max")
    with pytest.raises(ValueError, match="implementation"):
        RoIPooler(implementation="cuda")
    with pytest.raises(ValueError, match="spatial_scale"):
        RoIPooler(spatial_scale=(1 / 4, 1 / 16))
    with pytest.raises(ValueError, match="spatial_scale"):
        RoIPooler(spatial_scale=0)
    pooler = RoIPooler()
    features = torch.randn(2, 2, 4, 4)
    with pytest.raises(ValueError, match="feature level"):
        pooler([features, features], [torch.zeros(0, 4)] * 2)
    with pytest.raises(ValueError, match="one \\(P_i, 4\\) tensor per image"):
        pooler(features, [torch.zeros(0, 4)])
