"""Detections drawn for notebook 08: captions placed without collisions, the ground-truth grid."""

import numpy as np
import pytest
import torch
from matplotlib.patches import Rectangle

from rpnlab.lab.detections import label_positions, plot_detection_grid, plot_detections


def _overlap(a, b):
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


def test_captions_of_stacked_boxes_do_not_collide():
    # Four nearly identical boxes: naive captions (all at the top-left corner) would pile up.
    boxes = torch.tensor([[40.0, 40.0, 90.0, 90.0], [41.0, 41.0, 91.0, 91.0], [42.0, 40.0, 89.0, 92.0],
                          [40.0, 42.0, 90.0, 90.0]])
    spots = label_positions(boxes, [(30.0, 8.0)] * 4, (128, 128))
    assert spots.shape == (4, 4)
    for i in range(4):
        for j in range(i):
            assert _overlap(spots[i], spots[j]) == 0, (i, j, spots)
    # The first (highest-scoring) box keeps the first choice: just above its top-left corner.
    np.testing.assert_allclose(spots[0], [40.0, 32.0, 70.0, 40.0])


def test_captions_stay_inside_the_image():
    spots = label_positions(torch.tensor([[0.0, 0.0, 20.0, 10.0], [110.0, 120.0, 128.0, 128.0]]),
                            [(40.0, 8.0), (40.0, 8.0)], (128, 128))
    assert (spots[:, :2] >= 0).all() and (spots[:, 2] <= 128).all() and (spots[:, 3] <= 128).all()


def test_detection_grid_puts_ground_truth_beside_each_model():
    image = torch.rand(3, 64, 64)
    target = {"boxes": torch.tensor([[5.0, 5.0, 30.0, 40.0]]), "labels": torch.tensor([1])}
    dets = {"boxes": torch.tensor([[6.0, 5.0, 31.0, 41.0], [30.0, 30.0, 60.0, 60.0]]),
            "labels": torch.tensor([1, 2]), "scores": torch.tensor([0.9, 0.2])}
    fig = plot_detection_grid([(image, target)] * 2, {"joint": [dets, dets], "4-step": [dets, dets]},
                              ["a", "b", "c"], score_threshold=0.5)
    axes = fig.axes
    assert len(axes) == 6
    assert axes[0].get_title() == "ground truth: 1 objects"
    assert axes[1].get_title() == "joint: 1 detections" and axes[2].get_title() == "4-step: 1 detections"
    # joint panel: one detection (0.2 is under the display threshold) over one dashed gt box.
    assert len([p for p in axes[1].patches if isinstance(p, Rectangle)]) == 2
    assert [t.get_text() for t in axes[1].texts] == ["a 0.90"]
    assert [t.get_text() for t in axes[0].texts] == ["a"]
    with pytest.raises(ValueError, match="detections\\['joint'\\] has 1 entries for 2 samples"):
        plot_detection_grid([(image, target)] * 2, {"joint": [dets]})


def test_plot_detections_orders_captions_by_score():
    image = torch.rand(3, 64, 64)
    dets = {"boxes": torch.tensor([[5.0, 20.0, 30.0, 40.0], [5.0, 20.0, 30.0, 41.0]]),
            "labels": torch.tensor([1, 1]), "scores": torch.tensor([0.6, 0.95])}
    fig = plot_detections(image, dets, ["a"], score_threshold=0.5)
    assert [t.get_text() for t in fig.axes[0].texts] == ["a 0.95", "a 0.60"]
