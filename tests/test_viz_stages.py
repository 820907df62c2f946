"""The package pieces of notebooks 04-07: the stage figures of rpnlab.lab.figures, rpnlab.lab.roi,
rpnlab.lab.reference (torchvision twins) and rpnlab.lab.stage_training."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from matplotlib.figure import Figure

from rpnlab.config import AnchorConfig, RPNConfig
from rpnlab.detector.boxes import BoxCoder
from rpnlab.detector.roi_heads import postprocess_detections
from rpnlab.detector.rpn import RegionProposalNetwork
from rpnlab.lab.figures import plot_funnel, plot_value_histograms
from rpnlab.lab.proposals import plot_proposal_steps
from rpnlab.lab.roi import (
    DETECTION_STEPS,
    compare_roi_kernels,
    detection_funnel,
    plot_pooled_rois,
    plot_regression_targets,
    roi_pool_region,
)
from rpnlab.lab.rpn import plot_objectness_forms, plot_smooth_l1, plot_softmax_reshape
from rpnlab.lab.timing import time_call
from tests.conftest import random_boxes


def _labelled(fig: Figure) -> None:
    """Every visible axes of ``fig`` has a title and both axis labels."""
    for ax in fig.axes:
        if not ax.get_visible() or ax.get_label() == "<colorbar>":
            continue
        assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel(), ax


# ----------------------------------------------------------------------------- figures (04)


def test_softmax_reshape_figure_shows_the_real_reshape():
    k, h, w = 3, 2, 4
    fig = plot_softmax_reshape(k, h, w)
    assert isinstance(fig, Figure) and len(fig.axes) == 3
    _labelled(fig)
    stacked, background, foreground = (ax.images[0].get_array() for ax in fig.axes)
    assert stacked.shape == (2 * k * h, w) and background.shape == foreground.shape == (k * h, w)
    # channel 0 of the reshaped scores holds only background channels [0, k), channel 1 only [k, 2k)
    assert set(np.unique(background)) == set(range(k)) and set(np.unique(foreground)) == set(range(k, 2 * k))
    np.testing.assert_array_equal(np.concatenate([background, foreground]), stacked)
    with pytest.raises(ValueError, match="k must be a positive int"):
        plot_softmax_reshape(0)


def test_objectness_forms_softmax_points_lie_on_the_sigmoid():
    fig = plot_objectness_forms(logit_range=4.0, backgrounds=(-1.0, 3.0))
    _labelled(fig)
    probability_ax = fig.axes[0]
    _sigmoid_line, *dots = probability_ax.lines
    assert len(dots) == 2
    for line in dots:
        x, y = line.get_xdata(), line.get_ydata()
        np.testing.assert_allclose(y, 1 / (1 + np.exp(-np.asarray(x))), atol=1e-9)
    loss_lines = fig.axes[1].lines
    for bce, ce in zip(loss_lines[0::2], loss_lines[1::2]):  # BCE curve, then its CE dots
        np.testing.assert_allclose(np.interp(ce.get_xdata(), bce.get_xdata(), bce.get_ydata()), ce.get_ydata(),
                                   atol=1e-6)


def test_smooth_l1_figure_curves_and_gradients():
    betas = (1 / 9, 1.0)
    fig = plot_smooth_l1(betas, limit=2.0)
    _labelled(fig)
    loss_lines, grad_lines = fig.axes[0].lines, fig.axes[1].lines
    assert len(loss_lines) == len(grad_lines) == 2 + len(betas)
    d = torch.as_tensor(loss_lines[0].get_xdata())
    for line, beta in zip(loss_lines[2:], betas):
        expected = F.smooth_l1_loss(d, torch.zeros_like(d), beta=beta, reduction="none")
        np.testing.assert_allclose(line.get_ydata(), expected.numpy(), atol=1e-9)
    for line in grad_lines[2:]:  # smooth L1's gradient is bounded by 1, L2's is not
        assert np.abs(line.get_ydata()).max() <= 1 + 1e-9
    assert np.abs(grad_lines[1].get_ydata()).max() == pytest.approx(2.0)


# ----------------------------------------------------------------------------- figures (05-07)


def test_funnel_figure_bars_carry_the_counts():
    counts = {"anchors": 768, "top-k": 600, "NMS": 0, "top-n": 0}
    fig = plot_funnel(counts)
    _labelled(fig)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == list(counts)
    assert [t.get_text() for t in ax.texts] == ["768", "600", "0", "0"]
    assert ax.get_xscale() == "log"  # a zero count still draws (as a stub)
    linear = plot_funnel(counts, log=False).axes[0]
    assert [p.get_width() for p in linear.patches] == [768, 600, 0, 0]
    with pytest.raises(ValueError, match="empty"):
        plot_funnel({})


def test_proposal_steps_figure():
    from rpnlab.lab.proposals import proposal_funnel

    g = torch.Generator().manual_seed(0)
    anchors = random_boxes(50, 120.0, g, min_wh=8.0)
    funnel = proposal_funnel(anchors, torch.randn(50, generator=g), torch.zeros(50, 4), (128, 128),
                             pre_nms_top_n=40, post_nms_top_n=10)
    image = torch.rand(3, 128, 128, generator=g)
    fig = plot_proposal_steps(image, funnel, gt_boxes=anchors[:2], top=5)
    assert len(fig.axes) == 3
    _labelled(fig)
    assert "best 5 of 10" in fig.axes[2].get_title()
    assert len(plot_proposal_steps(image, funnel, show_pre_nms=False).axes) == 2


def test_pooled_rois_figure():
    from rpnlab.detector.roi import roi_align, roi_pool

    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))
    box = torch.tensor([8.0, 8.0, 40.0, 30.0])
    pooled = {"pool": roi_pool(image[None], [box[None]], 7)[0], "align": roi_align(image[None], [box[None]], 7)[0],
              "features": torch.rand(1, 16, 5, 5)}
    fig = plot_pooled_rois(image, box, pooled)
    assert len(fig.axes) == 4
    _labelled(fig)
    assert fig.axes[1].images[0].get_array().shape == (7, 7, 3)  # RGB shown as an image
    assert fig.axes[3].images[0].get_array().shape == (5, 5)  # other channel counts: their mean
    with pytest.raises(ValueError, match="pooled"):
        plot_pooled_rois(image, box, {"bad": torch.rand(7, 7)})


def test_histograms_and_regression_targets():
    g = torch.Generator().manual_seed(0)
    fig = plot_value_histograms({"a": torch.randn(100, generator=g), "b": [1.0, 2.0, float("nan")]}, "value")
    _labelled(fig)
    heights = [sum(p.get_height() for p in c.patches) for c in fig.axes[0].containers]
    assert heights == [100, 2]  # the NaN is left out
    small, large = torch.randn(200, 4, generator=g) * 0.1, torch.randn(200, 4, generator=g)
    fig = plot_regression_targets({"small": small, "large": large})
    assert len(fig.axes) == 4
    _labelled(fig)
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend[0].startswith(f"small, std {small[:, 0].numpy().std():.2f}")


# ----------------------------------------------------------------------------- roi_analysis


def test_roi_pool_region_is_what_roi_pool_reads():
    """One channel per feature cell, 1 at that cell: RoI Pool's output says which cells it read."""
    height = width = 10
    stride = 16
    one_hot = torch.eye(height * width).reshape(1, height * width, height, width)
    g = torch.Generator().manual_seed(0)
    boxes = random_boxes(60, 150.0, g, min_wh=1.0)
    boxes = torch.cat([boxes, torch.tensor([[8.0, 8.0, 40.0, 40.0], [24.0, 24.0, 24.5, 24.5]])])
    read = torchvision.ops.roi_pool(one_hot, [boxes], output_size=1, spatial_scale=1 / stride)[:, :, 0, 0] > 0
    regions = roi_pool_region(boxes, 1 / stride)
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    centres = torch.stack([xs.flatten(), ys.flatten()], dim=1).float() * stride  # cell i sits at pixel i * stride
    inside = ((centres[None] > regions[:, None, :2]) & (centres[None] < regions[:, None, 2:])).all(dim=2)
    assert torch.equal(read, inside)
    # the region always contains the box and is a whole number of cells
    assert (regions[:, :2] <= boxes[:, :2]).all() and (regions[:, 2:] >= boxes[:, 2:]).all()
    cells = (regions[:, 2:] - regions[:, :2]) / stride
    torch.testing.assert_close(cells, cells.round())
    with pytest.raises(ValueError, match="spatial_scale"):
        roi_pool_region(boxes, 0.0)


def test_time_call_counts_calls_and_returns_seconds():
    calls = []
    seconds = time_call(lambda: calls.append(1), repeat=4, warmup=2)
    assert len(calls) == 6 and 0 <= seconds < 1
    with pytest.raises(ValueError, match="repeat"):
        time_call(lambda: None, repeat=0)


def test_compare_roi_kernels_agree_with_torchvision():
    g = torch.Generator().manual_seed(1)
    features = torch.randn(2, 4, 12, 12, generator=g)
    boxes = random_boxes(20, 180.0, g, min_wh=2.0) - 10  # some reach outside the map
    rois = torch.cat([torch.randint(0, 2, (20, 1), generator=g).float(), boxes], dim=1)
    results = compare_roi_kernels(features, rois, output_size=5, spatial_scale=1 / 16, sampling_ratio=2, repeat=1)
    assert set(results) == {"roi_pool", "roi_align"}
    for r in results.values():
        assert r["forward_max_diff"] < 1e-4 and r["grad_max_diff"] < 1e-4
        assert r["python_seconds"] > 0 and r["torchvision_seconds"] > 0


def _head_outputs(seed, r=40, num_classes=3):
    g = torch.Generator().manual_seed(seed)
    proposals = random_boxes(r, 100.0, g, min_wh=2.0)
    logits = torch.randn(r, num_classes + 1, generator=g) * 3
    regression = torch.randn(r, 4 * (num_classes + 1), generator=g)
    return logits, regression, proposals


@pytest.mark.parametrize("seed", range(5))
def test_detection_funnel_equals_postprocess_detections(seed):
    logits, regression, proposals = _head_outputs(seed)
    settings = {"score_thresh": (0.05, 0.2, 0.0)[seed % 3], "nms_thresh": 0.5, "detections_per_img": (100, 10)[seed % 2]}
    size = (100, 80)
    funnel = detection_funnel(logits, regression, proposals, size, **settings)
    (expected,) = postprocess_detections(logits, regression, [proposals], [size], BoxCoder((10.0, 10.0, 5.0, 5.0)),
                                         **settings)
    for key in ("boxes", "scores", "labels"):
        torch.testing.assert_close(funnel[key], expected[key])
    counts = funnel["counts"]
    assert tuple(counts) == DETECTION_STEPS and counts["candidates"] == 40 * 3
    values = list(counts.values())
    assert values == sorted(values, reverse=True) and values[-1] == len(funnel["boxes"]) > 0
    assert sum(funnel["per_class"].values()) == len(funnel["boxes"]) and set(funnel["per_class"]) == {1, 2, 3}


def test_detection_funnel_rejects_mismatched_shapes():
    logits, regression, proposals = _head_outputs(0)
    with pytest.raises(ValueError, match="proposals must be"):
        detection_funnel(logits, regression, proposals[:5], (100, 100))
    with pytest.raises(ValueError, match="box_regression"):
        detection_funnel(logits, regression[:, :8], proposals, (100, 100))


# ----------------------------------------------------------------------------- reference


def _rpn(seed, objectness="sigmoid", offset=0.0, conv_channels=8):
    torch.manual_seed(seed)
    config = RPNConfig(conv_channels=conv_channels, batch_size_per_image=64, pre_nms_top_n_train=200,
                       post_nms_top_n_train=50, pre_nms_top_n_test=100, post_nms_top_n_test=30, objectness=objectness)
    anchors = AnchorConfig(sizes=((16.0, 32.0),), strides=(8,), offset=offset)
    rpn = RegionProposalNetwork.from_config(anchors, config, in_channels=8,
                                            generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for p in rpn.head.parameters():
            p.normal_(0, 0.2)
    return rpn


@pytest.mark.parametrize(("seed", "offset", "conv_channels"), [(0, 0.0, 8), (1, 0.0, 8), (2, 0.5, 16), (3, 0.5, 8)])
def test_torchvision_rpn_twin_gives_the_same_losses_and_proposals(seed, offset, conv_channels):
    """torchvision's own anchors and head copy where it can express ours, ours behind its interface
    otherwise (anchor offset 0.5, a conv that changes the width)."""
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.rpn import RPNHead

    from rpnlab.lab.reference import torchvision_rpn, torchvision_rpn_forward

    rpn = _rpn(seed, offset=offset, conv_channels=conv_channels).train()
    g = torch.Generator().manual_seed(seed)
    features = [torch.randn(2, 8, 8, 10, generator=g)]
    sizes = [(64, 80), (60, 71)]
    targets = [random_boxes(3, 60.0, g, min_wh=8.0) for _ in range(2)]
    out = rpn(features, sizes, targets, return_intermediates=True)
    tv = torchvision_rpn(rpn)
    assert tv.training
    assert isinstance(tv.anchor_generator, AnchorGenerator) == (offset == 0.0)
    assert isinstance(tv.head, RPNHead) == (conv_channels == 8)
    tv_boxes, tv_losses = torchvision_rpn_forward(tv, features, sizes, 8, targets,
                                                  out.intermediates["pos_mask"], out.intermediates["neg_mask"])
    for key, value in out.losses.items():
        torch.testing.assert_close(value, tv_losses[key], rtol=1e-5, atol=1e-5)
    for ours, theirs in zip(out.proposals, tv_boxes):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-4)
    # eval mode and overridden settings carry over too
    rpn.eval()
    tv = torchvision_rpn(rpn, nms_thresh=0.5, post_nms_top_n_test=7)
    assert not tv.training and tv.nms_thresh == 0.5 and tv.post_nms_top_n() == 7
    with torch.no_grad():
        tv_boxes, tv_losses = torchvision_rpn_forward(tv, features, sizes, 8)
    assert tv_losses == {} and all(len(b) <= 7 for b in tv_boxes)


def test_torchvision_rpn_refuses_what_torchvision_lacks():
    from rpnlab.lab.reference import torchvision_rpn, torchvision_rpn_forward

    with pytest.raises(ValueError, match="sigmoid"):
        torchvision_rpn(_rpn(0, objectness="softmax"))
    with pytest.raises(ValueError, match="one feature level"):
        torchvision_rpn_forward(torchvision_rpn(_rpn(0)), [torch.zeros(1, 8, 4, 4)] * 2, [(32, 32)], 8)


def test_torchvision_postprocess_twin():
    from rpnlab.lab.reference import torchvision_postprocess

    logits, regression, proposals = _head_outputs(3, r=50)
    split = [proposals[:30], proposals[30:]]
    sizes = [(100, 100), (90, 60)]
    ours = postprocess_detections(logits, regression, split, sizes, BoxCoder((10.0, 10.0, 5.0, 5.0)), score_thresh=0.1)
    theirs = torchvision_postprocess(logits, regression, split, sizes, score_thresh=0.1)
    assert len(theirs) == 2
    for a, b in zip(ours, theirs):
        assert torch.equal(a["labels"], b["labels"]) and len(a["labels"]) > 0
        torch.testing.assert_close(a["boxes"], b["boxes"], rtol=1e-6, atol=1e-4)
        torch.testing.assert_close(a["scores"], b["scores"])


# ----------------------------------------------------------------------------- stage_training


class _Shapes:
    """A few synthetic-shapes images, read once."""

    def __init__(self, n):
        from rpnlab.data import SyntheticShapes

        data = SyntheticShapes("val", num_images=n, seed=0)
        self.items = [data[i] for i in range(n)]
        self.num_classes = data.num_classes

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


@pytest.fixture(scope="module")
def rpn_run(tmp_path_factory):
    from rpnlab.lab.stage_training import train_rpn

    return train_rpn(2, num_images=4, batch_size=2, device="cpu", out_dir=str(tmp_path_factory.mktemp("rpn")),
                     loss_normalization="paper")


def test_train_rpn_runs_the_asked_iterations(rpn_run):
    assert rpn_run.iterations == 2 and len(rpn_run.history) == 2
    assert rpn_run.checkpoint is not None and rpn_run.checkpoint.exists()
    assert rpn_run.model.config.rpn.loss_normalization == "paper"
    assert all(np.isfinite(h["loss_rpn_box_reg"]) for h in rpn_run.history)
    from rpnlab.lab.stage_training import train_rpn

    with pytest.raises(ValueError, match="iterations"):
        train_rpn(0)


def test_train_fast_rcnn_head_trains_only_the_head(rpn_run):
    import copy

    from rpnlab.lab.stage_training import frozen_rpn_proposals, train_fast_rcnn_head

    model = copy.deepcopy(rpn_run.model)
    next(model.backbone.parameters()).requires_grad_(False)  # frozen from the start: must stay frozen
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = _Shapes(4)
    records = []
    history = train_fast_rcnn_head(model, data, 2, batch_size=2, callback=records.append)
    assert len(history) == 2 and records == history
    assert set(history[0]) >= {"step", "lr", "loss_classifier", "loss_box_reg", "total"}
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("roi_heads.") for k in changed)
    assert not model.training
    flags = [p.requires_grad for p in model.parameters()]
    assert flags.count(False) == 1  # everything trainable again, except what was frozen before
    with pytest.raises(ValueError, match="iterations"):
        train_fast_rcnn_head(model, data, 0)

    model.rpn.train()
    images = [data[i][0] for i in range(2)]
    features, proposals, sizes = frozen_rpn_proposals(model, images)
    assert model.rpn.training  # left as it was
    stride = model.config.anchors.strides[0]
    assert features[0].shape == (2, model.backbone.out_channels, 128 // stride, 128 // stride)
    assert sizes == [(128, 128)] * 2
    assert all(len(p) <= model.config.rpn.post_nms_top_n_train for p in proposals)
    _, test_proposals, _ = frozen_rpn_proposals(model, images, train_counts=False)
    assert all(len(p) <= model.config.rpn.post_nms_top_n_test for p in test_proposals)
    _, again, _, scores = frozen_rpn_proposals(model, images, with_scores=True)
    for p, q, s in zip(proposals, again, scores):
        torch.testing.assert_close(p, q)
        assert s.shape == (len(p),) and bool(((s >= 0) & (s <= 1)).all())
        assert bool((s[:-1] >= s[1:]).all())  # best first, as the proposals
