"""rpnlab.lab.proposals (the proposal layer step by step, recall per setting) and
widgets.proposal_explorer (notebook 05)."""

import pytest
import torch

from rpnlab.detector.anchors import AnchorGenerator
from rpnlab.detector.boxes import BoxCoder
from rpnlab.detector.proposals import ProposalLayer
from rpnlab.engine.evaluation import proposal_recall
from rpnlab.lab import widgets
from rpnlab.lab.proposals import (
    FUNNEL_STEPS,
    proposal_funnel,
    proposals_for,
    recall_by_setting,
    rpn_outputs,
)
from tests.conftest import random_boxes

IMAGE = (128, 128)


def _predictions(seed, feature=(8, 8), spread=0.3):
    """Anchors of a 128-pixel image and random logits / offsets for them."""
    g = torch.Generator().manual_seed(seed)
    anchors = AnchorGenerator(sizes=(16, 32, 64, 128), aspect_ratios=(0.5, 1.0, 2.0), strides=(16,))([feature])
    objectness = torch.randn(anchors.shape[0], generator=g) * 2
    deltas = torch.randn(anchors.shape[0], 4, generator=g) * spread
    return anchors, objectness, deltas


# ----------------------------------------------------------------------------- proposal_funnel


@pytest.mark.parametrize("seed", range(6))
def test_funnel_gives_the_proposal_layers_proposals(seed):
    anchors, objectness, deltas = _predictions(seed)
    settings = [
        {"pre_nms_top_n": 600, "post_nms_top_n": 100, "nms_thresh": 0.7},
        {"pre_nms_top_n": 50, "post_nms_top_n": 20, "nms_thresh": 0.5, "min_size": 20.0},
        {"pre_nms_top_n": 768, "post_nms_top_n": 768, "nms_thresh": 0.9, "score_thresh": 0.6},
    ][seed % 3]
    coder = BoxCoder((1.0, 1.0, 2.0, 2.0)) if seed == 5 else None
    funnel = proposal_funnel(anchors, objectness, deltas, IMAGE, box_coder=coder, **settings)
    layer = ProposalLayer(box_coder=coder, **settings).eval()
    (boxes,), (scores,) = layer(anchors, objectness[None], deltas[None], [IMAGE])
    torch.testing.assert_close(funnel["boxes"], boxes)
    torch.testing.assert_close(funnel["scores"], scores)
    assert len(boxes) > 0


@pytest.mark.parametrize("seed", range(4))
def test_funnel_counts_follow_the_steps(seed):
    anchors, objectness, deltas = _predictions(seed, spread=1.0)
    funnel = proposal_funnel(anchors, objectness, deltas, IMAGE, pre_nms_top_n=300, post_nms_top_n=40,
                             nms_thresh=0.6, min_size=8.0, score_thresh=0.3)
    counts = funnel["counts"]
    assert tuple(counts) == FUNNEL_STEPS
    values = list(counts.values())
    assert values == sorted(values, reverse=True)  # no step adds boxes
    assert counts["anchors"] == anchors.shape[0] and counts["top-k"] == 300
    assert counts["top-n"] == min(40, counts["NMS"]) == len(funnel["boxes"])
    assert counts["NMS"] == len(funnel["nms_boxes"]) and counts["score threshold"] == len(funnel["pre_nms_boxes"])
    # the steps did what they say
    wh = funnel["pre_nms_boxes"][:, 2:] - funnel["pre_nms_boxes"][:, :2]
    assert (wh >= 8.0).all() and (funnel["pre_nms_scores"] >= 0.3).all()
    assert funnel["topk_boxes"].min() >= 0 and funnel["topk_boxes"][:, 2].max() <= IMAGE[1]
    assert 0 < funnel["num_clipped"] <= counts["top-k"]
    assert (funnel["scores"][:-1] >= funnel["scores"][1:]).all()


def test_funnel_reuses_decoded_boxes_and_python_nms_agrees():
    anchors, objectness, deltas = _predictions(7)
    first = proposal_funnel(anchors, objectness, deltas, IMAGE, nms_thresh=0.5)
    again = proposal_funnel(anchors, objectness, None, IMAGE, nms_thresh=0.5, decoded=first["decoded"])
    python = proposal_funnel(anchors, objectness, deltas, IMAGE, nms_thresh=0.5, nms_implementation="python")
    for other in (again, python):
        assert torch.equal(first["boxes"], other["boxes"]) and first["counts"] == other["counts"]


def test_funnel_edge_cases():
    anchors = torch.tensor([[10.0, 10.0, 50.0, 50.0]])  # a single anchor
    funnel = proposal_funnel(anchors, torch.tensor([0.0]), torch.zeros(1, 4), IMAGE)
    assert list(funnel["counts"].values()) == [1] * len(FUNNEL_STEPS)
    torch.testing.assert_close(funnel["boxes"], anchors)
    torch.testing.assert_close(funnel["scores"], torch.tensor([0.5]))
    # everything below the score threshold: an empty proposal set, not an error
    anchors, objectness, deltas = _predictions(0)
    empty = proposal_funnel(anchors, objectness - 100, deltas, IMAGE, score_thresh=0.5)
    assert empty["counts"]["score threshold"] == 0 and empty["boxes"].shape == (0, 4)


def test_funnel_rejects_bad_arguments():
    anchors, objectness, deltas = _predictions(0)
    with pytest.raises(ValueError, match="objectness"):
        proposal_funnel(anchors, objectness[None], deltas, IMAGE)
    with pytest.raises(ValueError, match="deltas"):
        proposal_funnel(anchors, objectness, deltas[:5], IMAGE)
    with pytest.raises(ValueError, match="pre_nms_top_n"):
        proposal_funnel(anchors, objectness, deltas, IMAGE, pre_nms_top_n=0)
    with pytest.raises(ValueError, match="nms_thresh"):
        proposal_funnel(anchors, objectness, deltas, IMAGE, nms_thresh=1.5)
    with pytest.raises(ValueError, match="nms_implementation"):
        proposal_funnel(anchors, objectness, deltas, IMAGE, nms_implementation="cuda")


# ----------------------------------------------------------------------------- over a dataset


class _Boxes:
    """A tiny dataset: random images with random boxes (no file, no cache)."""

    def __init__(self, n, size=128, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.items = [(torch.rand(3, size, size, generator=g),
                       {"boxes": random_boxes(3, size, g, min_wh=10.0), "labels": torch.tensor([1, 2, 3])})
                      for _ in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


@pytest.fixture(scope="module")
def small_model():
    from rpnlab.detector.model import FasterRCNN, synthetic_model_config

    torch.manual_seed(0)
    model = FasterRCNN.from_config(synthetic_model_config()).eval()
    with torch.no_grad():  # a less uniform head than its 0.01-std init
        for p in model.rpn.head.parameters():
            p.normal_(0, 0.05)
    return model


def test_rpn_outputs_and_proposals_match_the_models_rpn(small_model):
    data = _Boxes(5)
    outputs = rpn_outputs(small_model, data, batch_size=2)
    stride = small_model.config.anchors.strides[0]
    a = small_model.rpn.head.num_anchors * (128 // stride) ** 2  # k anchors at every cell
    assert outputs["objectness"].shape == (5, a) and outputs["deltas"].shape == (5, a, 4)
    assert outputs["anchors"].shape == (a, 4) and outputs["num_anchors_per_level"] == [a]
    assert len(outputs["gt_boxes"]) == 5 and outputs["image_sizes"] == [(128, 128)] * 5
    cfg = small_model.rpn.config
    boxes, scores = proposals_for(outputs, pre_nms_top_n=cfg.pre_nms_top_n_test,
                                  post_nms_top_n=cfg.post_nms_top_n_test, nms_thresh=cfg.nms_thresh,
                                  min_size=cfg.min_size)
    with torch.no_grad():
        expected = small_model([data[i][0] for i in range(5)], rpn_only=True)
    # batches of 2 and of 5 take different convolution paths: equal up to float rounding
    for b, s, e in zip(boxes, scores, expected):
        torch.testing.assert_close(b, e["boxes"], rtol=1e-5, atol=1e-3)
        torch.testing.assert_close(s, e["scores"], rtol=1e-5, atol=1e-5)
    assert rpn_outputs(small_model, data, num_images=2)["objectness"].shape == (2, a)


def test_rpn_outputs_rejects_mixed_sizes_and_empty(small_model):
    data = _Boxes(2)
    data.items.append((torch.rand(3, 64, 96), data.items[0][1]))
    with pytest.raises(ValueError, match="different sizes"):
        rpn_outputs(small_model, data, batch_size=2)
    with pytest.raises(ValueError, match="empty"):
        rpn_outputs(small_model, _Boxes(0))


def test_recall_by_setting(small_model):
    outputs = rpn_outputs(small_model, _Boxes(4, seed=1))
    settings = {"nms": {"pre_nms_top_n": 600, "post_nms_top_n": 300, "nms_thresh": 0.7},
                "top": {"pre_nms_top_n": 600, "post_nms_top_n": 300, "mode": "top"}}
    counts = (1, 10, 100, 300)
    results = recall_by_setting(outputs, settings, counts)
    assert set(results) == {"nms", "top"}
    for name, r in results.items():
        assert r["num_proposals"] == list(counts) and r["num_gt"] == 12
        assert (r["recall_50"][1:] >= r["recall_50"][:-1]).all()  # more proposals never lose a box
        boxes, _ = proposals_for(outputs, **settings[name])
        expected = proposal_recall(boxes, outputs["gt_boxes"], counts)
        torch.testing.assert_close(r["recall"], expected["recall"])
    assert results["nms"]["recall_50"][-1] > 0


# ----------------------------------------------------------------------------- the explorer


@pytest.fixture
def explorer_inputs():
    anchors, objectness, deltas = _predictions(3)
    image = torch.rand(3, *IMAGE, generator=torch.Generator().manual_seed(0))
    return image, anchors, objectness, deltas, random_boxes(3, 120.0, torch.Generator().manual_seed(1))


def test_explorer_matches_the_pure_function(explorer_inputs):
    image, anchors, objectness, deltas, gt = explorer_inputs
    ex = widgets.proposal_explorer(image, anchors, objectness, deltas, gt, pre_nms_top_n=300, post_nms_top_n=50,
                                   nms_thresh=0.6, render=False)
    r = ex.last_result
    direct = proposal_funnel(anchors, objectness, deltas, IMAGE, 300, 50, 0.6)
    assert r["counts"] == direct["counts"] and r["num_proposals"] == 50
    torch.testing.assert_close(r["boxes"], direct["boxes"])
    ex.controls["nms_thresh"].value = 0.3
    assert ex.last_result["nms_thresh"] == 0.3
    assert ex.last_result["counts"] == proposal_funnel(anchors, objectness, deltas, IMAGE, 300, 50, 0.3)["counts"]


def test_explorer_controls_move_the_counts_the_right_way(explorer_inputs):
    image, anchors, objectness, deltas, gt = explorer_inputs
    ex = widgets.proposal_explorer(image, anchors, objectness, deltas, gt, post_nms_top_n=5, render=False)
    kept = []
    for n in (5, 20, 80, 300, 768):  # raising the post-NMS top-n never keeps fewer proposals
        ex.controls["post_nms_top_n"].value = n
        kept.append(ex.last_result["num_proposals"])
    assert kept == sorted(kept) and kept[0] == 5 and kept[-1] == ex.last_result["counts"]["NMS"]
    survivors = []
    for t in (0.3, 0.5, 0.7, 0.9, 1.0):  # a higher NMS threshold suppresses less
        ex.controls["nms_thresh"].value = t
        survivors.append(ex.last_result["counts"]["NMS"])
    assert survivors == sorted(survivors) and survivors[0] < survivors[-1]
    assert survivors[-1] == ex.last_result["counts"]["score threshold"]  # IoU > 1 never happens
    ex.controls["pre_nms_top_n"].value = 37
    assert ex.last_result["counts"]["top-k"] == 37 and ex.last_result["num_proposals"] <= 37
    ex.controls["min_size"].value = 24.0
    assert ex.last_result["counts"]["min size"] < 37
    assert ex.last_result["seconds"] < 1.0  # only the counts are recomputed (~ms); generous under load


def test_explorer_draws_and_reports(explorer_inputs):
    image, anchors, objectness, deltas, gt = explorer_inputs
    ex = widgets.proposal_explorer(image, anchors, objectness, deltas, gt)
    (out,) = ex.output.outputs
    assert "image/png" in out["data"] and len(out["data"]["image/png"]) > 1000
    assert ex.last_result["render_seconds"] > 0
    assert "&rarr;" in ex.status.value and "ms" in ex.status.value
    with pytest.raises(ValueError, match="anchors is empty"):
        widgets.proposal_explorer(image, anchors[:0], objectness[:0], deltas[:0])


def test_post_nms_slider_stays_at_or_below_pre_nms(explorer_inputs):
    image, anchors, objectness, deltas, gt = explorer_inputs
    ex = widgets.proposal_explorer(image, anchors, objectness, deltas, gt, pre_nms_top_n=300,
                                   post_nms_top_n=200, render=False)
    assert ex.controls["post_nms_top_n"].max == 300
    ex.controls["pre_nms_top_n"].value = 100
    assert ex.controls["post_nms_top_n"].value == 100 and ex.controls["post_nms_top_n"].max == 100
    assert ex.last_result["post_nms_top_n"] == 100 and ex.last_result["pre_nms_top_n"] == 100
    ex.controls["pre_nms_top_n"].value = 400  # raising it lets post-NMS go higher, without moving it
    assert ex.controls["post_nms_top_n"].max == 400 and ex.last_result["pre_nms_top_n"] == 400
