"""rpnlab.detector.roi_heads: proposal-target sampling, the Fast R-CNN head, detection post-processing and
RoIHeads, against torchvision's RoIHeads where it has the same piece."""

from collections import OrderedDict

import pytest
import torch
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.roi_heads import RoIHeads as TVRoIHeads
from torchvision.ops import MultiScaleRoIAlign

from rpnlab.config import RoIConfig
from rpnlab.detector.boxes import BoxCoder, box_iou
from rpnlab.detector.matching import Matcher
from rpnlab.detector.roi import RoIPooler
from rpnlab.detector.roi_heads import (
    FastRCNNHead,
    ProposalTargetSampler,
    RoIHeads,
    postprocess_detections,
)
from tests.conftest import random_boxes

NUM_CLASSES = 3
IMAGE = 128


def scene(seed: int, num_gt=(3, 0, 2), num_props=(30, 20, 0)):
    """Per image: gt boxes and labels, and proposals: random boxes plus jittered copies of the gt
    (so that there are foreground, ignored and background proposals). Image 1 has no objects,
    image 2 no proposals."""
    g = torch.Generator().manual_seed(seed)
    targets, proposals = [], []
    for m, p in zip(num_gt, num_props):
        gt = random_boxes(m, IMAGE, g, min_wh=8.0)
        labels = torch.randint(1, NUM_CLASSES + 1, (m,), generator=g)
        props = random_boxes(p, IMAGE, g)
        if m and p:
            near = gt[torch.randint(0, m, (p // 2,), generator=g)]
            near = near + torch.randn(near.shape, generator=g) * 4
            near = torch.cat((near[:, :2], torch.maximum(near[:, 2:], near[:, :2] + 1)), dim=1)
            props[: p // 2] = near
        targets.append({"boxes": gt, "labels": labels})
        proposals.append(props)
    return proposals, targets


def tv_roi_heads(batch_size_per_image=64, positive_fraction=0.25, score_thresh=0.05, nms_thresh=0.5, detections=100):
    return TVRoIHeads(
        None, None, None, 0.5, 0.5, batch_size_per_image, positive_fraction, (10.0, 10.0, 5.0, 5.0),
        score_thresh, nms_thresh, detections,
    )


class RecordingSampler:
    """Wraps a sampler, keeping the labels it was given and the masks it returned."""

    def __init__(self, sampler):
        self.sampler, self.labels, self.masks = sampler, None, None

    def __call__(self, labels):
        self.labels = [lab.clone() for lab in labels]
        self.masks = self.sampler(labels)
        return self.masks


# ----------------------------------------------------------------------------- ProposalTargetSampler


@pytest.mark.parametrize("seed", range(8))
def test_target_sampling_matches_torchvision(seed):
    proposals, targets = scene(seed)
    sampler = ProposalTargetSampler(batch_size_per_image=16, generator=torch.Generator().manual_seed(seed))
    recorder = RecordingSampler(sampler.sampler)
    sampler.sampler = recorder
    ours = sampler(proposals, targets)

    tv = tv_roi_heads()
    tv_labels_seen = []

    def replay(labels):  # torchvision samples exactly the RoIs we sampled
        tv_labels_seen.extend(labels)
        return recorder.masks

    tv.fg_bg_sampler = replay
    tv_props, tv_matched, tv_labels, tv_targets = tv.select_training_samples(list(proposals), targets)

    for i in range(len(proposals)):
        # Both label every proposal (gt appended) identically before sampling...
        assert torch.equal(recorder.labels[i], tv_labels_seen[i])
        # ...and keep the same RoIs with the same labels.
        assert torch.equal(ours.proposals[i], tv_props[i])
        assert torch.equal(ours.labels[i], tv_labels[i])
        fg = ours.labels[i] > 0
        torch.testing.assert_close(ours.regression_targets[i][fg], tv_targets[i][fg], atol=1e-5, rtol=0)
        assert torch.equal(ours.matched_idxs[i][fg], tv_matched[i][fg])
        # Background: no target (torchvision keeps unused offsets to gt 0 there), matched -1.
        assert torch.count_nonzero(ours.regression_targets[i][~fg]) == 0
        assert (ours.matched_idxs[i][~fg] == Matcher.BELOW_LOW_THRESHOLD).all()
    assert sum(int((lab > 0).sum()) for lab in ours.labels) > 0  # the scene has foreground


def test_sampling_counts_and_gt_boxes_join_the_proposals():
    proposals, targets = scene(0, num_gt=(4,), num_props=(300,))
    sampler = ProposalTargetSampler(batch_size_per_image=64, positive_fraction=0.25,
                                    generator=torch.Generator().manual_seed(0))
    out = sampler(proposals, targets)
    labels = out.labels[0]
    assert len(labels) == 64 and int((labels > 0).sum()) <= 16 and (labels >= 0).all()
    # Only 4 gt boxes and no other RoI: the gt boxes are foreground of their own class.
    only_gt = sampler([torch.zeros(0, 4)], targets)
    assert torch.equal(only_gt.proposals[0], targets[0]["boxes"])
    assert torch.equal(only_gt.labels[0], targets[0]["labels"])
    assert torch.equal(only_gt.matched_idxs[0], torch.arange(4))
    torch.testing.assert_close(only_gt.regression_targets[0], torch.zeros(4, 4))


def test_regression_targets_decode_back_to_the_matched_gt():
    proposals, targets = scene(1)
    out = ProposalTargetSampler(generator=torch.Generator().manual_seed(1))(proposals, targets)
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    for i, t in enumerate(targets):
        fg = out.labels[i] > 0
        decoded = coder.decode(out.regression_targets[i][fg], out.proposals[i][fg])
        torch.testing.assert_close(decoded, t["boxes"][out.matched_idxs[i][fg]], atol=1e-4, rtol=0)
        assert torch.equal(out.labels[i][fg], t["labels"][out.matched_idxs[i][fg]])


def test_foreground_background_thresholds():
    proposals, targets = scene(2)
    out = ProposalTargetSampler(bg_iou_thresh_low=0.1, generator=torch.Generator().manual_seed(2))(proposals, targets)
    checked = 0
    for i, t in enumerate(targets):
        if len(t["boxes"]) == 0:
            # No objects: every RoI is background, whatever bg_iou_thresh_low says.
            assert len(out.labels[i]) == len(proposals[i]) and (out.labels[i] == 0).all()
            continue
        best = box_iou(t["boxes"], out.proposals[i]).max(dim=0).values
        fg = out.labels[i] > 0
        assert (best[fg] >= 0.5).all()
        assert ((best[~fg] >= 0.1) & (best[~fg] < 0.5)).all()  # the paper's [0.1, 0.5)
        checked += int((~fg).sum())
    assert checked > 0

    # The labelling itself: IoU 0.05 is ignored with bg_iou_thresh_low=0.1, background without.
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    props = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 4.0], [0.0, 0.0, 10.0, 0.5], [50.0, 50, 60, 60]])
    labels, matched = ProposalTargetSampler(bg_iou_thresh_low=0.1).label_proposals(props, gt, torch.tensor([2]))
    assert labels.tolist() == [2, 0, -1, -1] and matched.tolist() == [0, -1, -2, -2]
    labels, _ = ProposalTargetSampler().label_proposals(props, gt, torch.tensor([2]))
    assert labels.tolist() == [2, 0, 0, 0]


def test_target_sampler_rejects_bad_targets():
    sampler = ProposalTargetSampler()
    props = [torch.zeros(0, 4)]
    with pytest.raises(ValueError, match="one dict"):
        sampler(props, [])
    with pytest.raises(ValueError, match="labels"):
        sampler(props, [{"boxes": torch.zeros(2, 4), "labels": torch.zeros(3, dtype=torch.long)}])
    with pytest.raises(ValueError, match=r"targets\[0\]\['boxes'\]"):
        sampler(props, [{"boxes": torch.zeros(2, 3), "labels": torch.zeros(2, dtype=torch.long)}])
    with pytest.raises(ValueError, match="bg_iou_thresh_low"):
        ProposalTargetSampler(bg_iou_thresh_low=0.6)


# ----------------------------------------------------------------------------- FastRCNNHead


def test_fast_rcnn_head_shapes_and_paper_init():
    torch.manual_seed(0)
    head = FastRCNNHead(16, pool_size=7, representation_size=256, num_classes=NUM_CLASSES)
    logits, deltas = head(torch.randn(5, 16, 7, 7))
    assert logits.shape == (5, NUM_CLASSES + 1) and deltas.shape == (5, 4 * (NUM_CLASSES + 1))
    assert abs(head.cls_score.weight.std().item() - 0.01) < 0.002
    assert abs(head.bbox_pred.weight.std().item() - 0.001) < 0.0002
    assert torch.count_nonzero(head.cls_score.bias) == 0 and torch.count_nonzero(head.bbox_pred.bias) == 0
    assert head(torch.randn(0, 16, 7, 7))[0].shape == (0, NUM_CLASSES + 1)
    with pytest.raises(ValueError, match="pooled"):
        head(torch.randn(5, 16, 5, 5))
    with pytest.raises(ValueError, match="num_classes"):
        FastRCNNHead(16)


def test_fast_rcnn_head_is_torchvisions_two_mlp_head_and_predictor():
    head = FastRCNNHead(4, pool_size=(3, 5), representation_size=32, num_classes=NUM_CLASSES)
    tv_head, tv_pred = TwoMLPHead(4 * 15, 32), FastRCNNPredictor(32, NUM_CLASSES + 1)
    tv_head.load_state_dict({k: v for k, v in head.state_dict().items() if k.startswith("fc")})
    tv_pred.load_state_dict({k: v for k, v in head.state_dict().items() if not k.startswith("fc")})
    x = torch.randn(6, 4, 3, 5, generator=torch.Generator().manual_seed(0))
    for ours, ref in zip(head(x), tv_pred(tv_head(x))):
        torch.testing.assert_close(ours, ref)


# ----------------------------------------------------------------------------- postprocess_detections


def head_outputs(seed, counts, num_classes=NUM_CLASSES):
    g = torch.Generator().manual_seed(seed)
    proposals = [random_boxes(n, IMAGE, g, min_wh=2.0) for n in counts]
    r = sum(counts)
    logits = torch.randn(r, num_classes + 1, generator=g) * 3
    deltas = torch.randn(r, 4 * (num_classes + 1), generator=g)
    return logits, deltas, proposals


@pytest.mark.parametrize("seed", range(8))
def test_postprocess_matches_torchvision(seed):
    logits, deltas, proposals = head_outputs(seed, [60, 0, 25])
    # Some boxes stick out of the (non-square) images and get clipped.
    sizes = [(IMAGE, IMAGE), (IMAGE, IMAGE // 2), (IMAGE // 2, IMAGE)]
    thresholds = {"score_thresh": 0.05 * (seed % 3), "nms_thresh": 0.5,
                  "detections_per_img": (100, 10)[seed % 2]}
    ours = postprocess_detections(logits, deltas, proposals, sizes, BoxCoder((10.0, 10.0, 5.0, 5.0)), **thresholds)
    tv = tv_roi_heads(
        score_thresh=thresholds["score_thresh"], nms_thresh=0.5, detections=thresholds["detections_per_img"]
    )
    boxes, scores, labels = tv.postprocess_detections(logits, deltas, proposals, sizes)
    assert len(ours) == 3
    for i in range(3):
        assert torch.equal(ours[i]["labels"], labels[i])
        # 1-ulp differences: rpnlab computes box centres as (x1 + x2) / 2, torchvision as x1 + w / 2.
        torch.testing.assert_close(ours[i]["boxes"], boxes[i], atol=1e-5, rtol=1e-6)
        torch.testing.assert_close(ours[i]["scores"], scores[i], atol=1e-5, rtol=0)
    assert len(ours[0]["boxes"]) > 0 and len(ours[1]["boxes"]) == 0
    if thresholds["detections_per_img"] == 10:
        assert len(ours[0]["boxes"]) == 10


def test_postprocess_empty_and_thresholds():
    logits, deltas, _ = head_outputs(0, [0, 0])
    out = postprocess_detections(logits, deltas, [torch.zeros(0, 4)] * 2, [(64, 64)] * 2)
    assert len(out) == 2 and all(d["boxes"].shape == (0, 4) and d["labels"].dtype == torch.int64 for d in out)
    assert postprocess_detections(logits, deltas, [], []) == []
    # One confident RoI: one detection of class 2, the proposal itself (zero offsets).
    logits = torch.tensor([[0.0, 0.0, 10.0, 0.0]])
    box = torch.tensor([[10.0, 20.0, 30.0, 50.0]])
    (det,) = postprocess_detections(logits, torch.zeros(1, 16), [box], [(64, 64)], score_thresh=0.5)
    assert det["labels"].tolist() == [2]
    torch.testing.assert_close(det["boxes"], box)
    with pytest.raises(ValueError, match="box_regression"):
        postprocess_detections(logits, torch.zeros(1, 8), [box], [(64, 64)])
    with pytest.raises(ValueError, match="proposals"):
        postprocess_detections(logits, torch.zeros(1, 16), [box, box], [(64, 64)] * 2)


# ----------------------------------------------------------------------------- RoIHeads


def small_config(**kw):
    return RoIConfig(**{"batch_size_per_image": 32, "representation_size": 32, "output_size": 5, **kw})


def test_roi_heads_training_losses_and_gradient_into_features():
    for implementation in ("torchvision", "python"):
        torch.manual_seed(0)
        heads = RoIHeads.from_config(small_config(implementation=implementation), 8, NUM_CLASSES, 1 / 16,
                                     generator=torch.Generator().manual_seed(0))
        heads.train()
        proposals, targets = scene(3)
        features = torch.randn(3, 8, IMAGE // 16, IMAGE // 16, requires_grad=True)
        detections, losses, inter = heads(features, proposals, [(IMAGE, IMAGE)] * 3, targets, return_intermediates=True)
        assert detections == [] and set(losses) == {"loss_classifier", "loss_box_reg"}
        assert all(torch.isfinite(v) for v in losses.values()) and losses["loss_box_reg"] > 0
        sum(losses.values()).backward()
        assert features.grad is not None and features.grad.abs().sum() > 0
        assert heads.head.fc6.weight.grad.abs().sum() > 0
        r = sum(len(p) for p in inter["rois"])
        assert inter["pooled"].shape == (r, 8, 5, 5) and inter["class_logits"].shape == (r, NUM_CLASSES + 1)
        assert [len(lab) for lab in inter["labels"]] == [len(p) for p in inter["rois"]]


def test_roi_heads_image_without_objects():
    heads = RoIHeads.from_config(small_config(), 8, NUM_CLASSES, 1 / 16, generator=torch.Generator().manual_seed(0))
    features = torch.randn(1, 8, 8, 8, requires_grad=True)
    targets = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    _, losses, _ = heads(features, [random_boxes(20, IMAGE)], [(IMAGE, IMAGE)], targets)
    assert torch.isfinite(losses["loss_classifier"]) and losses["loss_classifier"] > 0
    assert losses["loss_box_reg"] == 0
    losses["loss_classifier"].backward()
    assert features.grad.abs().sum() > 0


def test_roi_heads_eval_gives_detections():
    heads = RoIHeads.from_config(small_config(score_thresh=0.0), 8, NUM_CLASSES, 1 / 16).eval()
    proposals = [random_boxes(10, IMAGE), torch.zeros(0, 4)]
    with torch.no_grad():
        detections, losses, inter = heads(torch.randn(2, 8, 8, 8), proposals, [(IMAGE, IMAGE)] * 2)
    assert losses == {} and inter == {} and len(detections) == 2
    assert len(detections[0]["boxes"]) > 0 and len(detections[1]["boxes"]) == 0
    assert set(detections[0]) == {"boxes", "scores", "labels"}
    with pytest.raises(ValueError, match="targets"):
        heads.train()(torch.randn(2, 8, 8, 8), proposals, [(IMAGE, IMAGE)] * 2)
    with pytest.raises(ValueError, match="num_classes"):
        RoIHeads(heads.pooler, heads.head, small_config(), num_classes=5)


def test_roi_heads_match_torchvision_end_to_end():
    """Same pooler, same weights, same sampled RoIs: same losses (beta 1/9, torchvision's) and
    the same detections."""
    torch.manual_seed(0)
    config = small_config(output_size=7, smooth_l1_beta=1 / 9)
    heads = RoIHeads(RoIPooler(7, 1 / 16, 2), FastRCNNHead(8, 7, 32, num_classes=NUM_CLASSES), config,
                     generator=torch.Generator().manual_seed(0))
    tv_head, tv_pred = TwoMLPHead(8 * 49, 32), FastRCNNPredictor(32, NUM_CLASSES + 1)
    tv_head.load_state_dict({k: v for k, v in heads.head.state_dict().items() if k.startswith("fc")})
    tv_pred.load_state_dict({k: v for k, v in heads.head.state_dict().items() if not k.startswith("fc")})
    tv = TVRoIHeads(MultiScaleRoIAlign(["0"], 7, 2), tv_head, tv_pred, 0.5, 0.5, 32, 0.25, (10.0, 10.0, 5.0, 5.0),
                    config.score_thresh, config.nms_thresh, config.detections_per_img)
    proposals, targets = scene(4)
    sizes = [(IMAGE, IMAGE)] * 3
    features = torch.randn(3, 8, IMAGE // 16, IMAGE // 16, generator=torch.Generator().manual_seed(4))

    recorder = RecordingSampler(heads.target_sampler.sampler)
    heads.target_sampler.sampler = recorder
    tv.fg_bg_sampler = lambda labels: recorder.masks
    _, losses, _ = heads.train()(features, proposals, sizes, targets)
    _, tv_losses = tv.train()(OrderedDict([("0", features)]), proposals, sizes, targets)
    for name in ("loss_classifier", "loss_box_reg"):
        torch.testing.assert_close(losses[name], tv_losses[name], atol=1e-5, rtol=0)

    with torch.no_grad():
        heads.head.cls_score.weight.mul_(300)  # confident scores, so that detections survive 0.05
        tv_pred.cls_score.weight.copy_(heads.head.cls_score.weight)
        detections, _, _ = heads.eval()(features, proposals, sizes)
        tv_detections, _ = tv.eval()(OrderedDict([("0", features)]), proposals, sizes)
    assert sum(len(d["boxes"]) for d in detections) > 0
    for ours, ref in zip(detections, tv_detections):
        assert torch.equal(ours["labels"], ref["labels"])
        torch.testing.assert_close(ours["boxes"], ref["boxes"], atol=1e-5, rtol=1e-6)
        torch.testing.assert_close(ours["scores"], ref["scores"], atol=1e-5, rtol=0)
