"""rpnlab.lab.figures: every function returns a titled, labelled Figure with the right artists, no pyplot."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from rpnlab.data import SyntheticShapes
from rpnlab.detector.anchors import AnchorGenerator
from rpnlab.detector.matching import Matcher, label_anchors
from rpnlab.lab.anchors import plot_anchor_coverage, plot_anchor_grid, plot_base_anchors
from rpnlab.lab.box_coding import plot_box_coding
from rpnlab.lab.detections import plot_detections
from rpnlab.lab.figures import (
    COLORS,
    draw_boxes,
    new_figure,
    plot_dataset_statistics,
    plot_loss_curves,
    show_dataset_samples,
)
from rpnlab.lab.matching import plot_iou_matrix, plot_matching
from rpnlab.lab.proposals import plot_proposals, plot_recall_curves
from rpnlab.lab.roi import plot_roi_quantisation
from tests.conftest import random_boxes


@pytest.fixture(scope="module")
def dataset():
    return SyntheticShapes("train", num_images=6, cache=False)


@pytest.fixture(autouse=True)
def no_pyplot_figures():
    before = set(plt.get_fignums())
    yield
    assert set(plt.get_fignums()) == before, "viz must not create pyplot-managed figures"


def rects(ax) -> list[Rectangle]:
    return [p for p in ax.patches if type(p) is Rectangle]


def assert_labelled(ax, title_part: str = ""):
    assert ax.get_title(), "axes without a title"
    assert ax.get_xlabel() and ax.get_ylabel(), "axes without axis labels"
    assert title_part in ax.get_title()


def legend_texts(ax) -> list[str]:
    return [t.get_text() for t in ax.get_legend().get_texts()]


def test_draw_boxes_one_rectangle_per_box(dataset, gen):
    image = torch.rand(3, 64, 80, generator=gen)
    boxes = random_boxes(5, 60, gen)
    fig = draw_boxes(image, boxes, labels=torch.tensor([1, 2, 3, 1, 2]), scores=torch.rand(5, generator=gen),
                         class_names=dataset.classes)
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert len(rects(ax)) == 5
    assert_labelled(ax, "5 boxes")
    captions = [t.get_text() for t in ax.texts]
    assert len(captions) == 5 and captions[0].startswith("rectangle ")
    # Boxes are drawn where they are: the first rectangle starts at the first box's corner.
    assert rects(ax)[0].get_xy() == pytest.approx(tuple(boxes[0, :2].tolist()))
    assert ax.images[0].get_array().shape[:2] == (64, 80)


def test_draw_boxes_empty_and_errors(gen):
    fig = draw_boxes(torch.rand(3, 32, 32, generator=gen), torch.zeros(0, 4))
    assert rects(fig.axes[0]) == []
    with pytest.raises(ValueError, match="labels has 2 entries"):
        draw_boxes(torch.rand(3, 32, 32), random_boxes(3), labels=[1, 2])
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        draw_boxes(torch.rand(3, 32, 32), torch.zeros(3, 5))
    with pytest.raises(ValueError, match="image"):
        draw_boxes(torch.rand(2, 3, 32, 32), torch.zeros(0, 4))


def test_show_dataset_samples(dataset):
    fig = show_dataset_samples(dataset, n=5, cols=3)
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert len(visible) == 5 and len(fig.axes) == 6
    for i, ax in enumerate(visible):
        assert len(rects(ax)) == len(dataset[i][1]["boxes"])
        assert_labelled(ax, f"image {i}")
    assert "5 samples" in fig._suptitle.get_text()


def test_plot_dataset_statistics(dataset):
    boxes = torch.cat([dataset[i][1]["boxes"] for i in range(len(dataset))])
    labels = torch.cat([dataset[i][1]["labels"] for i in range(len(dataset))])
    fig = plot_dataset_statistics(boxes, labels, dataset.classes)
    assert len(fig.axes) == 3
    for ax in fig.axes:
        assert_labelled(ax)
    heights = [p.get_height() for p in fig.axes[0].patches]
    assert heights == [int((labels == c).sum()) for c in (1, 2, 3)]
    assert sum(p.get_height() for p in fig.axes[1].patches) == len(boxes)


def test_plot_base_anchors_paper():
    fig = plot_base_anchors(AnchorGenerator())
    ax = fig.axes[0]
    assert len(rects(ax)) == 9
    assert_labelled(ax, "9 base anchors")
    texts = legend_texts(ax)
    assert len(texts) == 9 and texts[0] == "size 128, ratio 0.5: 182 x 90"
    assert ax.get_ylim()[0] > ax.get_ylim()[1]  # y grows downwards, as in images


def test_plot_anchor_grid(dataset):
    image, target = dataset[0]
    gen = AnchorGenerator((16, 32), (0.5, 1.0, 2.0), 16)
    anchors = gen([(8, 8)])
    fig = plot_anchor_grid(image, anchors, 16, gt_boxes=target["boxes"])
    ax = fig.axes[0]
    m = len(target["boxes"])
    assert len(rects(ax)) == 6 + 2 * m  # one location's k anchors, each gt box and its best anchor
    assert_labelled(ax, "stride 16, k = 6")
    assert ax.collections[0].get_offsets().shape == (64, 2)  # one centre per feature cell
    assert len([t for t in ax.texts if t.get_text().startswith("IoU")]) == m
    two = plot_anchor_grid(image, anchors, 16, highlight=[0, 63])
    assert len(rects(two.axes[0])) == 12


def test_plot_anchor_coverage_shares():
    fig = plot_anchor_coverage(torch.tensor([0.2, 0.6, 0.8, 0.9]), thresholds=(0.5, 0.7), bins=10)
    ax = fig.axes[0]
    assert_labelled(ax, "4 gt boxes")
    assert legend_texts(ax) == ["IoU >= 0.5: 75% of boxes", "IoU >= 0.7: 50% of boxes"]
    assert len(ax.patches) == 10
    assert sum(p.get_height() for p in ax.patches) == 4


def test_plot_box_coding_shows_deltas():
    anchor, gt = torch.tensor([8.0, 40.0, 104.0, 88.0]), torch.tensor([40.0, 36.0, 128.0, 100.0])
    fig = plot_box_coding(anchor, gt, others={"slip": torch.tensor([68.0, 36.0, 156.0, 100.0])})
    ax = fig.axes[0]
    assert len(rects(ax)) == 3
    assert_labelled(ax)
    assert "tx = +0.292" in ax.texts[0].get_text() and "th = +0.288" in ax.texts[0].get_text()
    assert legend_texts(ax) == ["anchor", "ground truth", "slip"]


def test_plot_iou_matrix():
    iou = torch.tensor([[0.1, 0.8, 0.4], [0.75, 0.0, 0.2]])
    fig = plot_iou_matrix(iou, row_labels=["gt 0", "gt 1"], thresholds=(0.7, 0.3))
    ax = fig.axes[0]
    assert_labelled(ax, "2 gt x 3 anchors")
    assert np.allclose(ax.images[0].get_array(), iou.numpy())
    assert len(ax.texts) == 6
    assert ax.collections[0].get_offsets().shape[0] == 2  # cells >= 0.7
    assert ax.collections[1].get_offsets().shape[0] == 3  # cells >= 0.3
    with pytest.raises(ValueError, match="2-D"):
        plot_iou_matrix(torch.zeros(3))


def test_plot_matching_three_kinds(dataset):
    image, target = dataset[0]
    anchors = AnchorGenerator((16, 32, 64), (0.5, 1.0, 2.0), 16)([(8, 8)])
    labels, _ = label_anchors(anchors, target["boxes"], Matcher(0.7, 0.3))
    n_pos, n_neg, n_ign = (int((labels == v).sum()) for v in (1, 0, -1))
    fig = plot_matching(image, anchors, labels, target["boxes"], max_negatives=10, max_ignored=5)
    ax = fig.axes[0]
    m = len(target["boxes"])
    assert len(rects(ax)) == n_pos + min(n_neg, 10) + min(n_ign, 5) + m
    colours = {k: sum(1 for r in rects(ax) if r.get_edgecolor()[:3] == plt.matplotlib.colors.to_rgb(COLORS[k]))
               for k in ("positive", "negative", "ignored")}
    assert colours == {"positive": n_pos, "negative": min(n_neg, 10), "ignored": min(n_ign, 5)}
    assert_labelled(ax, f"{n_pos} positive, {n_neg} negative, {n_ign} ignored")
    assert any(t.startswith(f"positive ({n_pos}") for t in legend_texts(ax))
    named = plot_matching(image, anchors, labels, target["boxes"], max_ignored=0,
                              names={"ignored": "not sampled"}).axes[0]
    assert f"not sampled ({n_ign}, 0 drawn)" in legend_texts(named)  # counted even when none is drawn
    assert named.get_title().endswith(f"{n_ign} not sampled")
    with pytest.raises(ValueError, match="labels has"):
        plot_matching(image, anchors, labels[:-1], target["boxes"])


def test_later_plots(dataset, gen):
    image, target = dataset[0]
    fig = plot_loss_curves({"loss_objectness": [1.0, 0.5, 0.3, 0.2], "loss_rpn_box_reg": [0.4, 0.3, 0.2, 0.1],
                                "lr": [0.1] * 4}, smooth=2)
    ax = fig.axes[0]
    assert_labelled(ax)
    assert legend_texts(ax) == ["loss_objectness", "loss_rpn_box_reg"]  # "lr" is not a loss
    fig = plot_loss_curves([{"loss": 1.0, "step": 0}, {"loss": 0.5, "step": 1}])
    assert len(fig.axes[0].lines) == 1  # only the keys with "loss" in their name

    proposals, scores = random_boxes(30, 120, gen), torch.rand(30, generator=gen)
    fig = plot_proposals(image, proposals, scores, target["boxes"], top=7)
    assert len(rects(fig.axes[0])) == 7 + len(target["boxes"])
    assert_labelled(fig.axes[0])

    fig = plot_recall_curves({"rpn": ([0.5, 0.7, 0.9], [0.9, 0.6, 0.1])})
    assert_labelled(fig.axes[0])
    assert len(fig.axes[0].lines) == 1

    fig = plot_roi_quantisation((20.0, 27.0, 90.0, 71.0), spatial_scale=1 / 16, output_size=2, sampling_ratio=2)
    pool, align = fig.axes
    assert_labelled(pool, "RoI Pool")
    assert_labelled(align, "RoI Align")
    assert align.collections[0].get_offsets().shape == (16, 2)  # 2x2 bins x 2x2 samples

    dets = {"boxes": random_boxes(4, 100, gen), "labels": torch.tensor([1, 2, 3, 1]),
            "scores": torch.tensor([0.9, 0.2, 0.6, 0.05])}
    fig = plot_detections(image, dets, dataset.classes, gt_boxes=target["boxes"], score_threshold=0.5)
    assert len(rects(fig.axes[0])) == 2 + len(target["boxes"])
    assert_labelled(fig.axes[0], "2 detections")


def test_draw_into_given_axes(dataset):
    fig, axes = new_figure(1, 2)
    image, target = dataset[1]
    out = draw_boxes(image, target["boxes"], ax=axes[0, 1], title="right")
    assert out is fig and axes[0, 1].get_title() == "right" and not rects(axes[0, 0])
