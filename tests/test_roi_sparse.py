"""RoI Align as sparse matrix products (``rpnlab.detector.roi_sparse``) against torchvision's kernel."""

import pytest
import torch
import torchvision

from rpnlab.detector.roi import RoIPooler
from rpnlab.detector.roi_sparse import roi_align_sparse, sparse_align_available

pytestmark = pytest.mark.skipif(not sparse_align_available(torch.device("cpu")), reason="PyTorch without MKL")


def _rois(g, count, batch, height, width, scale, spill=0.3):
    """Random ``(K, 5)`` rois over an image of the map's extent, some reaching past its border."""
    img_h, img_w = height / scale, width / scale
    cx = torch.rand(count, generator=g) * img_w * (1 + 2 * spill) - spill * img_w
    cy = torch.rand(count, generator=g) * img_h * (1 + 2 * spill) - spill * img_h
    w = torch.rand(count, generator=g) * img_w * 0.6 + 0.5
    h = torch.rand(count, generator=g) * img_h * 0.6 + 0.5
    b = torch.randint(0, batch, (count,), generator=g).to(torch.float64)
    return torch.stack((b, cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), dim=1)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize(("output_size", "sampling_ratio"), [((7, 7), 2), ((5, 3), 1), ((2, 4), 3)])
def test_values_and_gradient_equal_torchvision(aligned, output_size, sampling_ratio):
    g = torch.Generator().manual_seed(hash((aligned, output_size, sampling_ratio)) % 1000)
    feature = torch.randn(3, 4, 13, 21, generator=g, dtype=torch.float64)
    rois = _rois(g, 40, 3, 13, 21, 1 / 8)
    rois[:3, 1:] = torch.tensor([[0.0, 0.0, 0.0, 0.0], [-30.0, -30.0, -9.0, -9.0], [160.0, 96.0, 400.0, 300.0]],
                                dtype=torch.float64)  # a point box, one outside, one over the far corner
    feature_ref = feature.clone().requires_grad_()
    feature.requires_grad_()
    out = roi_align_sparse(feature, rois, output_size, 1 / 8, sampling_ratio, aligned)
    ref = torchvision.ops.roi_align(feature_ref, rois, output_size, 1 / 8, sampling_ratio, aligned)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    upstream = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    (grad,) = torch.autograd.grad(out, feature, upstream)
    (ref_grad,) = torch.autograd.grad(ref, feature_ref, upstream)
    torch.testing.assert_close(grad, ref_grad, atol=1e-12, rtol=0)


def test_rois_in_any_image_order_and_images_without_rois():
    g = torch.Generator().manual_seed(3)
    feature = torch.randn(4, 5, 17, 9, generator=g, requires_grad=True)
    rois = _rois(g, 30, 4, 17, 9, 1 / 4).float()
    rois[:, 0] = torch.tensor([2.0, 0.0] * 15)  # images 1 and 3 have none; 2 and 0 alternate
    out = roi_align_sparse(feature, rois, (7, 7), 1 / 4, 2)
    ref = torchvision.ops.roi_align(feature, rois, 7, 1 / 4, 2)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    upstream = torch.randn(ref.shape, generator=g)
    (grad,) = torch.autograd.grad(out, feature, upstream)
    (ref_grad,) = torch.autograd.grad(ref, feature, upstream)
    torch.testing.assert_close(grad, ref_grad, atol=1e-5, rtol=0)
    assert grad[1].abs().sum() == 0 and grad[3].abs().sum() == 0


def test_no_rois_gives_an_empty_batch_and_a_zero_gradient():
    feature = torch.randn(2, 3, 8, 8, requires_grad=True)
    out = roi_align_sparse(feature, torch.zeros(0, 5), (7, 7), 1 / 16, 2)
    assert out.shape == (0, 3, 7, 7)
    out.sum().backward()
    assert feature.grad is not None and feature.grad.abs().sum() == 0


def test_gradcheck():
    g = torch.Generator().manual_seed(0)
    feature = torch.randn(2, 2, 6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    rois = _rois(g, 5, 2, 6, 5, 1 / 2)
    assert torch.autograd.gradcheck(lambda f: roi_align_sparse(f, rois, (3, 2), 1 / 2, 2), (feature,))


@pytest.mark.parametrize(("sampling_ratio", "dtype", "match"), [(0, torch.float32, "sampling_ratio > 0"),
                                                                (2, torch.bfloat16, "float32/float64")])
def test_refuses_what_it_cannot_do(sampling_ratio, dtype, match):
    with pytest.raises(ValueError, match=match):
        roi_align_sparse(torch.zeros(1, 1, 4, 4, dtype=dtype), torch.zeros(1, 5), (2, 2), 1.0, sampling_ratio)


def _boxes(g, count, low, high, image=(320, 480)):
    """``count`` square boxes with sides in ``[low, high)`` pixels inside an image of ``(h, w)``."""
    side = torch.rand(count, generator=g) * (high - low) + low
    x = torch.rand(count, generator=g) * (image[1] - side)
    y = torch.rand(count, generator=g) * (image[0] - side)
    return torch.stack((x, y, x + side, y + side), dim=1)


def test_pooler_auto_takes_the_sparse_form_on_large_cpu_maps(monkeypatch):
    from rpnlab.detector import roi as roi_module
    from rpnlab.detector.roi_sparse import sparse_align_min_rois

    calls = []
    real = roi_module.roi_align_sparse
    monkeypatch.setattr(roi_module, "roi_align_sparse", lambda *a, **k: calls.append(a[0].shape[-2:]) or real(*a, **k))
    g = torch.Generator().manual_seed(1)
    # A 320 x 480 image: P2 80 x 120 and P3 40 x 60, both above the dense form's 1666 cells.
    levels = [torch.randn(2, 8, 80, 120, generator=g, requires_grad=True),
              torch.randn(2, 8, 40, 60, generator=g, requires_grad=True)]
    # Boxes under 224 px go to P2, larger ones to P3 (canonical level 3 at 224 px).
    proposals = [torch.cat((_boxes(g, 20, 16, 200), _boxes(g, 6, 230, 300))) for _ in range(2)]
    assert 40 >= sparse_align_min_rois(2, 80, 120, 49, 2) and 12 >= sparse_align_min_rois(2, 40, 60, 49, 2)
    pooler = RoIPooler(7, (1 / 4, 1 / 8), sampling_ratio=2, implementation="auto", canonical_level=3)
    out = pooler(levels, proposals)
    assert calls == [torch.Size([80, 120]), torch.Size([40, 60])]
    ref = RoIPooler(7, (1 / 4, 1 / 8), sampling_ratio=2, canonical_level=3)(levels, proposals)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    upstream = torch.randn(out.shape, generator=g)
    for grad, ref_grad in zip(torch.autograd.grad(out, levels, upstream), torch.autograd.grad(ref, levels, upstream)):
        # float32 sums of up to hundreds of shares per cell, added in another order
        torch.testing.assert_close(grad, ref_grad, atol=1e-4, rtol=0)
    # bf16 maps under autocast: the same pooled values and dtype as with torchvision's kernel
    half_levels = [level.detach().bfloat16() for level in levels]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = pooler(half_levels, proposals)
        half_ref = RoIPooler(7, (1 / 4, 1 / 8), sampling_ratio=2, canonical_level=3)(half_levels, proposals)
    assert len(calls) == 4 and half.dtype == half_ref.dtype
    torch.testing.assert_close(half, half_ref, atol=1e-2, rtol=0)
    # Too few RoIs on a large map: the transposes would cost more than the kernel, which keeps it.
    calls.clear()
    few = [_boxes(g, 3, 16, 200) for _ in range(2)]
    single = RoIPooler(7, 1 / 4, sampling_ratio=2, implementation="auto")
    torch.testing.assert_close(single(levels[0], few), RoIPooler(7, 1 / 4, sampling_ratio=2)(levels[0], few),
                               atol=1e-5, rtol=0)
    assert calls == [] and 6 < sparse_align_min_rois(2, 80, 120, 49, 2)


def test_align_matrices_rows_are_bins_and_columns_cells():
    from rpnlab.detector.roi_sparse import align_matrices

    g = torch.Generator().manual_seed(5)
    feature = torch.randn(2, 3, 9, 11, generator=g, dtype=torch.float64)
    rois = _rois(g, 6, 2, 9, 11, 1 / 4)
    rois = rois[torch.argsort(rois[:, 0], stable=True)]
    matrices = align_matrices(rois, 2, (9, 11), (3, 2), 1 / 4, 2)
    ref = torchvision.ops.roi_align(feature, rois, (3, 2), 1 / 4, 2)
    start = 0
    for n, matrix in enumerate(matrices):
        k = int((rois[:, 0] == n).sum())
        assert matrix.shape == (k * 3 * 2, 9 * 11)
        assert torch.equal(matrix.crow_indices().diff(), torch.full((k * 6,), 16))  # 4 cells x 2 x 2 points a bin
        dense = matrix.to_dense() @ feature[n].reshape(3, -1).t()  # (k * bins, C)
        expected = ref[start:start + k].permute(0, 2, 3, 1).reshape(k * 6, 3)
        torch.testing.assert_close(dense, expected, atol=1e-12, rtol=0)
        start += k


def test_lab_check_reports_the_matrix_and_agreement():
    from rpnlab.lab.roi import sparse_align_check

    g = torch.Generator().manual_seed(6)
    features = torch.randn(2, 4, 32, 32, generator=g)
    rois = _rois(g, 20, 2, 32, 32, 1 / 16)
    result = sparse_align_check(features, rois, 7, 1 / 16, 2, repeat=1)
    assert result["columns"] == 32 * 32 and result["entries_per_row"] == 16
    assert result["rows"] == 49 * int((rois[:, 0] == 0).sum())
    assert result["forward_max_diff"] < 1e-4 and result["grad_max_diff"] < 1e-4
    assert result["sparse_seconds"] > 0 and result["torchvision_seconds"] > 0
