"""rpnlab.lab.widgets: setting a control recomputes what the pure functions give, and shows a figure."""

from __future__ import annotations

import statistics

import ipywidgets as W
import pytest
import torch

from rpnlab.data import SyntheticShapes
from rpnlab.detector.anchors import AnchorGenerator
from rpnlab.detector.matching import Matcher, label_anchors
from rpnlab.lab import widgets
from rpnlab.lab.anchors import coverage_over_dataset


@pytest.fixture(scope="module")
def dataset():
    return SyntheticShapes("train", num_images=12, cache=False)


def png_of(explorer) -> str:
    (output,) = explorer.output.outputs
    return output["data"]["image/png"]


def test_anchor_explorer_matches_analysis(dataset):
    ex = widgets.anchor_explorer(dataset)
    assert isinstance(ex.widget, W.VBox)
    assert set(ex.controls) == {"sizes", "ratios", "stride", "index"}
    r = ex.last_result
    assert (r["k"], r["num_anchors"], r["stride"]) == (12, 768, 16)
    reference = coverage_over_dataset(AnchorGenerator((16, 32, 64, 128), (0.5, 1.0, 2.0), 16), dataset)
    torch.testing.assert_close(r["best_iou"], reference["best_iou"])
    assert r["mean_best_iou"] == pytest.approx(reference["mean_best_iou"])
    assert r["covered"] == pytest.approx(reference["covered"])
    assert r["num_gt"] == reference["num_gt"]
    assert png_of(ex) and "coverage of" in ex.status.value
    assert "application/vnd.jupyter.widget-view+json" in ex._repr_mimebundle_()


def test_anchor_explorer_controls(dataset):
    ex = widgets.anchor_explorer(dataset, render=False)
    before = dict(ex.last_result)
    ex.controls["stride"].value = 8
    after = ex.last_result
    assert after["num_anchors"] == 16 * 16 * 12
    # Stride 8 puts anchors at every stride-16 centre and more: no box can lose coverage.
    assert bool((after["best_iou"] >= before["best_iou"]).all())
    ex.controls["sizes"].value = (32,)
    assert ex.last_result["k"] == 3 and ex.last_result["sizes"] == (32,)
    ex.controls["ratios"].value = ()
    assert "select at least one" in ex.status.value
    assert ex.last_result["k"] == 3  # the last valid result stays
    ex.controls["ratios"].value = (1.0,)
    ex.controls["index"].value = 5
    assert ex.last_result["index"] == 5 and ex.last_result["k"] == 1


def test_matching_explorer_counts_match_label_anchors(dataset):
    ex = widgets.matching_explorer(dataset, index=0)
    r = ex.last_result
    target = dataset[0][1]
    anchors = AnchorGenerator((16, 32, 64, 128), (0.5, 1.0, 2.0), 16)([(8, 8)])
    labels, _ = label_anchors(anchors, target["boxes"], Matcher(0.7, 0.3, True))
    assert torch.equal(r["labels"], labels)
    assert (r["positive"], r["negative"], r["ignored"]) == tuple(int((labels == v).sum()) for v in (1, 0, -1))
    assert r["positive"] + r["negative"] + r["ignored"] == r["num_anchors"] == 768
    assert r["gt_without_positive"] == 0  # the low-quality rule gives every box an anchor
    assert png_of(ex) and f"{r['positive']} positive" in ex.status.value


def test_raising_high_threshold_never_adds_positives(dataset):
    ex = widgets.matching_explorer(dataset, index=3, render=False)
    for low_quality in (True, False):
        ex.controls["low_quality"].value = low_quality
        ex.controls["low"].value = 0.1
        positives = []
        for high in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0):
            ex.controls["high"].value = high
            assert ex.last_result["high"] == high
            positives.append(ex.last_result["positive"])
        assert positives == sorted(positives, reverse=True)
        assert positives[0] > positives[-1]
    # Without the low-quality rule no anchor reaches IoU 1: every box is left without a positive.
    assert ex.last_result["positive"] == 0
    assert ex.last_result["gt_without_positive"] == ex.last_result["num_gt"] > 0


def test_matching_thresholds_stay_ordered(dataset):
    ex = widgets.matching_explorer(dataset, render=False)
    ex.controls["high"].value = 0.2  # below low (0.3): low follows
    assert ex.controls["low"].value == 0.2 and ex.last_result["low"] == 0.2
    ex.controls["low"].value = 0.5  # above high: high follows
    assert ex.controls["high"].value == 0.5 and ex.last_result["high"] == 0.5
    assert ex.last_result["ignored"] == 0  # equal thresholds leave nothing in between


def test_update_times(dataset):
    """The computation behind a slider move stays interactive (< 150 ms) on one CPU core."""
    anchors_ex = widgets.anchor_explorer(dataset, render=False)
    matching_ex = widgets.matching_explorer(dataset, render=False)
    for ex in (anchors_ex, matching_ex):
        times = [ex.update()["seconds"] for _ in range(5)]
        assert statistics.median(times) < 0.15, times


def test_box_coding_explorer(dataset):
    anchor, gt = [8.0, 40.0, 104.0, 88.0], [40.0, 36.0, 128.0, 100.0]
    ex = widgets.box_coding_explorer(anchor, gt)
    assert ex.last_result["decoded"] == pytest.approx(anchor)  # all offsets 0: the anchor itself
    start_iou = ex.last_result["iou"]
    for name, value in zip(("tx", "ty", "tw", "th"), ex.last_result["target"]):
        ex.controls[name].value = round(value, 2)
    assert ex.last_result["iou"] > 0.97 > start_iou
    assert png_of(ex)


def test_dataset_browser(dataset):
    ex = widgets.dataset_browser(dataset)
    for i in (0, 4, 11):
        ex.controls["index"].value = i
        target = dataset[i][1]
        assert ex.last_result["num_boxes"] == len(target["boxes"])
        assert ex.last_result["labels"] == target["labels"].tolist()
    assert ex.controls["index"].max == len(dataset) - 1
    assert png_of(ex)


def test_anchor_explorer_reuses_coverage_when_only_the_image_changes(dataset, monkeypatch):
    ex = widgets.anchor_explorer(dataset, render=False)
    calls = []
    real = widgets.anchor_coverage
    monkeypatch.setattr(widgets, "anchor_coverage", lambda *a, **k: calls.append(1) or real(*a, **k))
    best = ex.last_result["best_iou"]
    ex.controls["index"].value = 3
    assert calls == [] and ex.last_result["index"] == 3 and ex.last_result["best_iou"] is best
    ex.controls["stride"].value = 8
    assert calls  # a setting that changes the anchors recomputes it


def test_anchor_explorer_toggling_a_size_reuses_the_other_sizes(dataset, monkeypatch):
    ex = widgets.anchor_explorer(dataset, render=False)
    calls = []
    real = widgets.anchor_coverage
    monkeypatch.setattr(widgets, "anchor_coverage", lambda *a, **k: calls.append(1) or real(*a, **k))
    ex.controls["sizes"].value = (16, 64)  # a subset of the shown sizes: every pair is cached
    assert calls == []
    reference = coverage_over_dataset(AnchorGenerator((16, 64), (0.5, 1.0, 2.0), 16), dataset)
    torch.testing.assert_close(ex.last_result["best_iou"], reference["best_iou"])
    assert ex.last_result["num_anchors"] == 8 * 8 * 6
    ex.controls["ratios"].value = (1.0,)
    reference = coverage_over_dataset(AnchorGenerator((16, 64), (1.0,), 16), dataset)
    torch.testing.assert_close(ex.last_result["best_iou"], reference["best_iou"])
    assert calls == []


def test_explorer_looks(dataset):
    ex = widgets.anchor_explorer(dataset, render=False)
    for name in ("sizes", "ratios"):  # every option visible: no scrolling list hides a selection
        assert ex.controls[name].rows == len(ex.controls[name].options)
    for control in ex.controls.values():  # labels are not cut off; sliders update on release
        assert control.style.description_width == "initial"
    assert ex.controls["index"].continuous_update is False


def test_matching_figure_draws_the_thresholds(dataset):
    ex = widgets.matching_explorer(dataset, index=1)
    first = png_of(ex)
    ex.controls["high"].value = 0.5
    assert png_of(ex) != first  # the figure itself changes with a threshold, not only the counts
    ex.controls["low"].value = 0.1
    assert ex.last_result["low"] == 0.1 and ex.last_result["high"] == 0.5
