"""rpnlab.detector.boxes against torchvision.ops and torchvision's BoxCoder, plus properties and errors."""

import math

import pytest
import torch
import torchvision.ops as tvops
from hypothesis import given, settings
from hypothesis import strategies as st
from torchvision.models.detection._utils import BoxCoder as TVBoxCoder

import rpnlab.detector.boxes as B
from rpnlab.detector.boxes import (
    BoxCoder,
    box_area,
    box_iou,
    box_iou_chunks,
    box_iou_reduce,
    check_boxes,
    clip_boxes,
    cxcywh_to_xyxy,
    remove_small_boxes,
    xyxy_to_cxcywh,
)
from tests.conftest import random_boxes

ATOL = 1e-5
SEEDS = range(10)


def _degenerate_boxes(g: torch.Generator) -> torch.Tensor:
    """Random boxes mixed with zero-width, zero-height and point boxes (some repeated)."""
    boxes = random_boxes(12, generator=g)
    boxes[0, 2] = boxes[0, 0]  # zero width
    boxes[1, 3] = boxes[1, 1]  # zero height
    boxes[2, 2:] = boxes[2, :2]  # a point
    boxes[3] = boxes[2]  # the same point again
    boxes[4] = torch.tensor([5.0, 5.0, 5.0, 5.0])
    return boxes


# ---------------------------------------------------------------- reference tests vs torchvision


@pytest.mark.parametrize("seed", SEEDS)
def test_box_iou_matches_torchvision(seed):
    g = torch.Generator().manual_seed(seed)
    a, b = random_boxes(30, generator=g), random_boxes(17, generator=g)
    torch.testing.assert_close(box_iou(a, b), tvops.box_iou(a, b), atol=ATOL, rtol=0)


def test_box_iou_degenerate_is_zero_where_torchvision_is_nan(gen):
    a = _degenerate_boxes(gen)
    ours, ref = box_iou(a, a), tvops.box_iou(a, a)
    finite = torch.isfinite(ref)
    assert (~finite).any(), "the fixture should produce 0/0 pairs"
    torch.testing.assert_close(ours[finite], ref[finite], atol=ATOL, rtol=0)
    assert torch.equal(ours[~finite], torch.zeros_like(ours[~finite]))
    assert torch.isfinite(ours).all()


def test_box_iou_empty_sets():
    a = random_boxes(5)
    assert box_iou(a, a[:0]).shape == (5, 0)
    assert box_iou(a[:0], a).shape == (0, 5)


@pytest.mark.parametrize("seed", SEEDS)
def test_box_area_matches_torchvision(seed):
    g = torch.Generator().manual_seed(seed)
    boxes = torch.cat([random_boxes(20, generator=g), _degenerate_boxes(g)])
    torch.testing.assert_close(box_area(boxes), tvops.box_area(boxes), atol=ATOL, rtol=0)


def test_box_area_inverted_box_is_zero():
    # torchvision would give a negative area here; ours treats an inverted box as empty.
    assert box_area(torch.tensor([[10.0, 0.0, 0.0, 5.0]])).tolist() == [0.0]


@pytest.mark.parametrize("seed", SEEDS)
def test_clip_boxes_matches_torchvision(seed):
    g = torch.Generator().manual_seed(seed)
    boxes = random_boxes(40, size=200.0, generator=g) - 50.0  # many cross the border
    size = (
        int(torch.randint(20, 120, (1,), generator=g)),
        int(torch.randint(20, 120, (1,), generator=g)),
    )
    ours = clip_boxes(boxes, size)
    torch.testing.assert_close(ours, tvops.clip_boxes_to_image(boxes, size), atol=0, rtol=0)
    assert (
        (ours[:, 0::2] <= size[1]).all() and (ours[:, 1::2] <= size[0]).all() and (ours >= 0).all()
    )


@pytest.mark.parametrize("min_size", [0.0, 1.0, 5.0, 30.0])
def test_remove_small_boxes_matches_torchvision(min_size, gen):
    boxes = torch.cat([random_boxes(50, generator=gen, min_wh=0.0), _degenerate_boxes(gen)])
    keep = remove_small_boxes(boxes, min_size)
    assert torch.equal(keep, tvops.remove_small_boxes(boxes, min_size))


@pytest.mark.parametrize("seed", SEEDS)
def test_format_conversions_match_torchvision(seed):
    g = torch.Generator().manual_seed(seed)
    boxes = random_boxes(25, generator=g)
    cxcywh = xyxy_to_cxcywh(boxes)
    torch.testing.assert_close(
        cxcywh, tvops.box_convert(boxes, "xyxy", "cxcywh"), atol=ATOL, rtol=0
    )
    torch.testing.assert_close(
        cxcywh_to_xyxy(cxcywh), tvops.box_convert(cxcywh, "cxcywh", "xyxy"), atol=ATOL, rtol=0
    )
    torch.testing.assert_close(cxcywh_to_xyxy(cxcywh), boxes, atol=ATOL, rtol=0)


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
@pytest.mark.parametrize("seed", range(5))
def test_box_coder_encode_matches_torchvision(weights, seed):
    g = torch.Generator().manual_seed(seed)
    anchors, gt = random_boxes(64, generator=g), random_boxes(64, generator=g)
    ours = BoxCoder(weights).encode(anchors, gt)
    ref = TVBoxCoder(weights).encode_single(reference_boxes=gt, proposals=anchors)
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=1e-6)


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
@pytest.mark.parametrize("k", [1, 3])
def test_box_coder_decode_matches_torchvision(weights, k, gen):
    anchors = random_boxes(50, generator=gen)
    deltas = torch.randn(50, 4 * k, generator=gen)
    ours = BoxCoder(weights).decode(deltas, anchors)
    ref = TVBoxCoder(weights).decode_single(deltas, anchors)
    assert ours.shape == (50, 4 * k)
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=1e-6)


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_box_coder_clamps_huge_size_offsets(weights, gen):
    anchors = random_boxes(8, generator=gen)
    deltas = torch.zeros(8, 4)
    deltas[:, 2] = 1e4  # exp would overflow without the clamp
    deltas[:, 3] = 50.0
    ours = BoxCoder(weights).decode(deltas, anchors)
    ref = TVBoxCoder(weights).decode_single(deltas, anchors)
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=1e-6)
    # the widths grow by exactly exp(clamp) = 1000/16
    widths = ours[:, 2] - ours[:, 0]
    torch.testing.assert_close(
        widths, (anchors[:, 2] - anchors[:, 0]) * 1000 / 16, atol=0, rtol=1e-5
    )


# ---------------------------------------------------------------- properties (hypothesis)

_seeds = st.integers(min_value=0, max_value=2**31 - 1)


@settings(max_examples=40, deadline=None)
@given(
    seed=_seeds,
    n=st.integers(1, 40),
    weights=st.sampled_from([(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)]),
)
def test_encode_decode_round_trip(seed, n, weights):
    g = torch.Generator().manual_seed(seed)
    # float64 so the check is about the maths, not float32 rounding of exp(log(x))
    anchors = random_boxes(n, generator=g).double()
    gt = random_boxes(n, generator=g).double()
    coder = BoxCoder(weights)
    torch.testing.assert_close(
        coder.decode(coder.encode(anchors, gt), anchors), gt, atol=1e-9, rtol=0
    )


@settings(max_examples=40, deadline=None)
@given(seed=_seeds, n=st.integers(0, 30), m=st.integers(0, 30))
def test_iou_symmetric_and_bounded(seed, n, m):
    g = torch.Generator().manual_seed(seed)
    a = random_boxes(n, generator=g, min_wh=0.0)
    b = random_boxes(m, generator=g, min_wh=0.0)
    iou = box_iou(a, b)
    assert iou.shape == (n, m)
    assert torch.equal(iou, box_iou(b, a).T)
    assert ((iou >= 0) & (iou <= 1 + 1e-6)).all()
    if n:
        diag = box_iou(a, a).diagonal()
        nonempty = box_area(a) > 0
        torch.testing.assert_close(diag[nonempty], torch.ones_like(diag[nonempty]))


@settings(max_examples=40, deadline=None)
@given(seed=_seeds, n=st.integers(0, 60), m=st.integers(0, 12), chunk=st.integers(1, 70))
def test_chunked_iou_equals_full_matrix(seed, n, m, chunk):
    g = torch.Generator().manual_seed(seed)
    a, b = random_boxes(n, generator=g), random_boxes(m, generator=g)
    full = box_iou(a, b)
    starts, pieces = zip(*box_iou_chunks(a, b, chunk)) if n else ((), ())
    assert list(starts) == list(range(0, n, chunk))
    if n:
        assert torch.equal(torch.cat(pieces), full)
    row_max, row_arg, col_max = box_iou_reduce(a, b, chunk)
    assert row_max.shape == (n,) and row_arg.shape == (n,) and col_max.shape == (m,)
    if n and m:
        ref_max, ref_arg = full.max(dim=1)
        assert torch.equal(row_max, ref_max)
        assert torch.equal(row_arg, ref_arg)
        assert torch.equal(col_max, full.max(dim=0).values)
    else:
        assert (row_max == 0).all() and (col_max == 0).all()


# ---------------------------------------------------------------- memory-bounded reduction at scale


def test_box_iou_reduce_large_and_chunk_bounded(monkeypatch):
    g = torch.Generator().manual_seed(1)
    anchors = random_boxes(200_000, size=1000.0, generator=g, min_wh=4.0)
    gt = random_boxes(500, size=1000.0, generator=g, min_wh=4.0)
    shapes = []
    real_box_iou = B.box_iou

    def recording_box_iou(b1, b2):
        shapes.append((b1.shape[0], b2.shape[0]))
        return real_box_iou(b1, b2)

    monkeypatch.setattr(B, "box_iou", recording_box_iou)
    chunk = 4096
    row_max, row_arg, col_max = box_iou_reduce(anchors, gt, chunk_size=chunk)
    monkeypatch.undo()

    # never more than chunk x M IoU values at once, and every anchor covered exactly once
    assert max(s[0] for s in shapes) == chunk
    assert all(s[1] == 500 for s in shapes)
    assert sum(s[0] for s in shapes) == 200_000

    # rows: compare a random subset against the full matrix of that subset
    idx = torch.randperm(200_000, generator=g)[:3000]
    ref_max, ref_arg = box_iou(anchors[idx], gt).max(dim=1)
    assert torch.equal(row_max[idx], ref_max)
    assert torch.equal(row_arg[idx], ref_arg)
    # columns: an independent chunking, by gt boxes instead of by anchors
    ref_col = torch.cat(
        [box_iou(anchors, gt[j : j + 25]).max(dim=0).values for j in range(0, 500, 25)]
    )
    assert torch.equal(col_max, ref_col)


def test_box_iou_chunks_rejects_bad_chunk_size():
    with pytest.raises(ValueError, match="chunk_size"):
        next(box_iou_chunks(random_boxes(3), random_boxes(2), 0))


# ---------------------------------------------------------------- validation errors


def test_check_boxes_errors_name_the_argument():
    good = random_boxes(3)
    assert check_boxes(good, "anchors") is good
    with pytest.raises(ValueError, match=r"anchors must have shape \(\.\.\., 4\)"):
        check_boxes(torch.zeros(3, 5), "anchors")
    with pytest.raises(ValueError, match="gt_boxes contains non-finite"):
        bad = good.clone()
        bad[1, 2] = float("nan")
        check_boxes(bad, "gt_boxes")
    with pytest.raises(ValueError, match="proposals has a box with x2 < x1"):
        check_boxes(torch.tensor([[5.0, 0.0, 1.0, 3.0]]), "proposals")
    with pytest.raises(ValueError, match="boxes2 must be a floating-point tensor"):
        check_boxes(torch.zeros(2, 4, dtype=torch.int64), "boxes2")
    with pytest.raises(TypeError, match="rois must be a torch.Tensor"):
        check_boxes([[0, 0, 1, 1]], "rois")
    # values=False skips the value checks (the cheap, sync-free form)
    check_boxes(torch.tensor([[5.0, 0.0, 1.0, float("nan")]]), "x", values=False)


def test_functions_reject_bad_boxes_by_argument_name():
    with pytest.raises(ValueError, match="boxes1"):
        box_iou(torch.zeros(3, 3), random_boxes(2))
    with pytest.raises(ValueError, match="boxes2"):
        box_iou(random_boxes(2), torch.zeros(2, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"box_iou expects boxes1 \(N, 4\)"):
        box_iou(torch.zeros(2, 3, 4), random_boxes(2))
    with pytest.raises(ValueError, match="anchors must have the shape of gt_boxes or broadcast"):
        BoxCoder().encode(random_boxes(3), random_boxes(4))
    with pytest.raises(ValueError, match="multiple of 4"):
        BoxCoder().decode(torch.zeros(3, 5), random_boxes(3))
    with pytest.raises(ValueError, match="weights"):
        BoxCoder((1.0, 1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="clamp"):
        BoxCoder(clamp=-1.0)
    with pytest.raises(ValueError, match="min_size"):
        remove_small_boxes(random_boxes(3), -1.0)
    assert math.isclose(B.DEFAULT_BBOX_CLAMP, math.log(1000 / 16))
