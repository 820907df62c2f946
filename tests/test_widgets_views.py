"""rpnlab.lab.views: every explorer keeps one figure and a value change gives it new data.

The wiring, without timing: moving a control changes the PNG shown and the numbers shown, the
figure object stays the same, and the picture drawn over the kept background is the picture that
drawing everything again gives. (``benchmarks/bench_explorers.py`` carries the times.)
"""

from __future__ import annotations

import base64
import io
import re

import numpy as np
import pytest
import torch
from PIL import Image

from rpnlab.data import SyntheticShapes
from rpnlab.lab import widgets
from rpnlab.lab.views import KeptFigure, box_segments
from tests.test_widgets_proposals import _predictions


@pytest.fixture(scope="module")
def dataset():
    return SyntheticShapes("train", num_images=8, cache=False)


def png_of(explorer) -> bytes:
    (output,) = explorer.output.outputs
    return base64.b64decode(output["data"]["image/png"])


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def numbers(explorer) -> str:
    """The status line without its timing line (that one changes at every update anyway)."""
    return re.sub(r"update [0-9.]+ ms \(\+ figure [0-9]+ ms\)", "", explorer.status.value)


@pytest.fixture(scope="module")
def explorers(dataset):
    """(name, explorer, control, new value) for every explorer of the course (built once: the first
    draw of a figure, with its layout, is the slow one)."""
    anchors, objectness, deltas = _predictions(3)
    image = torch.rand(3, 128, 128, generator=torch.Generator().manual_seed(0))
    return [
        ("00 dataset browser", widgets.dataset_browser(dataset), "index", 3),
        ("01 anchors, stride", widgets.anchor_explorer(dataset), "stride", 8),
        ("01 anchors, sizes", widgets.anchor_explorer(dataset), "sizes", (16, 32)),
        ("02 box coding", widgets.box_coding_explorer([8.0, 40.0, 104.0, 88.0], [24.0, 20.0, 72.0, 116.0]), "tx", -0.5),
        ("03 matching, threshold", widgets.matching_explorer(dataset, index=1), "high", 0.5),
        ("03 matching, image", widgets.matching_explorer(dataset, index=1), "index", 2),
        ("05 proposals, NMS", widgets.proposal_explorer(image, anchors, objectness, deltas, None), "nms_thresh", 0.3),
        ("05 proposals, top-n", widgets.proposal_explorer(image, anchors, objectness, deltas, None), "post_nms_top_n",
         5),
    ]


def test_a_change_gives_a_new_figure_and_new_numbers(explorers):
    for name, ex, control, value in explorers:
        fig, before_png, before_numbers = ex.view.fig, png_of(ex), numbers(ex)
        ex.controls[control].value = value
        after = png_of(ex)
        assert after != before_png and after.startswith(b"\x89PNG"), name
        assert ex.view.fig is fig, name  # one figure per explorer, kept
        assert numbers(ex) != before_numbers, name
        assert pixels(after).shape == pixels(before_png).shape, name  # same size: the layout is kept
        assert ex.last_result["render_seconds"] > 0 and ex.last_result["render_cpu_seconds"] >= 0, name


def test_the_kept_background_draws_what_a_full_draw_draws(explorers):
    for name, ex, control, value in explorers:
        ex.controls[control].value = value  # (already set if the test above ran)
        ex.update()  # the same values again: drawn over the kept background
        blitted = pixels(png_of(ex))
        ex.view.still_changed()  # everything drawn again
        full = pixels(ex.view.png())
        assert np.array_equal(blitted, full), name


def test_moving_a_threshold_keeps_the_background(explorers):
    ex = next(ex for name, ex, _, _ in explorers if name == "03 matching, threshold")
    assert ex.controls["index"].value == 1
    draws = ex.view.full_draws
    for high in (0.5, 0.6, 0.8):
        ex.controls["high"].value = high
    assert ex.view.full_draws == draws  # the axes did not change: only what moved was drawn
    before = png_of(ex)
    ex.controls["index"].value = 2
    assert png_of(ex) != before
    assert ex.view.full_draws <= draws + 1  # another image: a new background only for a new range


def test_render_false_keeps_no_figure(dataset):
    ex = widgets.matching_explorer(dataset, render=False)
    assert ex.view is None and ex.output.outputs == ()
    ex.controls["high"].value = 0.5
    assert ex.last_result["high"] == 0.5 and ex.last_result["render_seconds"] == 0.0


def test_box_segments():
    boxes = torch.tensor([[1.0, 2.0, 5.0, 7.0], [0.0, 0.0, 1.0, 1.0]])
    seg = box_segments(boxes)
    assert seg.shape == (2, 5, 2)
    np.testing.assert_array_equal(seg[0], [[1, 2], [5, 2], [5, 7], [1, 7], [1, 2]])
    assert box_segments(torch.zeros(0, 4)).shape == (0, 5, 2)


def test_kept_figure_png_is_the_figure():
    view = KeptFigure(1, (2.0, 2.0), dpi=50)
    view.axes[0].plot([0, 1], [0, 1])
    first = view.png()
    assert pixels(first).shape == (100, 100, 3) and view.full_draws == 1
    assert view.png() == first and view.full_draws == 1  # nothing changed: the background is reused
    view.axes[0].set_xlim(0, 2)  # a new axis range: drawn again
    assert view.png() != first and view.full_draws == 2
