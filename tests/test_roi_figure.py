"""06's quantisation figure draws RoI Pool's rounded box where ``roi_pool_region`` puts it."""

import torch

from rpnlab.lab.roi import plot_roi_quantisation, roi_pool_region


def test_rounded_box_drawn_is_the_pooled_region_and_holds_the_roi():
    box, scale = [21.0, 30.0, 77.0, 70.0], 1 / 16
    fig = plot_roi_quantisation(box, spatial_scale=scale, output_size=2, sampling_ratio=2)
    patch = next(p for p in fig.axes[0].patches if p.get_label() == "rounded RoI")
    x, y = patch.get_xy()
    drawn = torch.tensor([x, y, x + patch.get_width(), y + patch.get_height()])
    region = roi_pool_region(torch.tensor([box]), scale)[0] * scale
    torch.testing.assert_close(drawn, region.to(drawn.dtype))
    exact = torch.tensor(box, dtype=drawn.dtype) * scale
    assert (drawn[:2] <= exact[:2]).all() and (drawn[2:] >= exact[2:]).all(), (drawn, exact)
