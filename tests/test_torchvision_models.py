"""``FasterRCNN.from_torchvision``: torchvision's detectors (random weights) give the same proposals and detections."""

import pytest
import torch

from rpnlab.detector.model import FasterRCNN
from rpnlab.detector.torchvision_models import TORCHVISION_DETECTORS, torchvision_detector

pytestmark = pytest.mark.xdist_group("torchvision_models")  # large models: one worker builds them


def _images(n: int, h: int, w: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    # Smooth blobs rather than noise, so random-weight detectors still rank boxes with margins.
    base = torch.rand(n, 3, h // 16, w // 16, generator=g)
    return [torch.nn.functional.interpolate(b[None], size=(h, w), mode="bilinear")[0] for b in base]


def _torchvision_detections(tv, images):
    h, w = images[0].shape[-2:]
    tv.transform.min_size, tv.transform.max_size = (min(h, w),), max(h, w)  # scale 1: no resampling
    with torch.no_grad():
        tv_images, _ = tv.transform(images)
        features = tv.backbone(tv_images.tensors)
        proposals, _ = tv.rpn(tv_images, features)
        detections = tv(images)
    return proposals, detections


@pytest.mark.parametrize("name", TORCHVISION_DETECTORS)
def test_same_proposals_and_detections(name):
    torch.manual_seed(0)
    tv = torchvision_detector(name, num_classes=5).eval()
    # Random heads score every box near 0.5 and keep few above torchvision's 0.05; lower the bar
    # so that many detections are compared.
    tv.roi_heads.score_thresh = 0.01
    tv.rpn._post_nms_top_n["testing"] = min(300, tv.rpn._post_nms_top_n["testing"])  # fewer RoIs: cheaper heads
    ours = FasterRCNN.from_torchvision(tv)
    assert ours.num_classes == 4 and ours.torchvision_name == name
    tv_params = sum(p.numel() for p in tv.parameters())
    assert sum(p.numel() for p in ours.parameters()) == tv_params  # the same weights, none added
    from rpnlab.detector.roi import RoIPooler

    assert [m.implementation for m in ours.modules() if isinstance(m, RoIPooler)] == ["auto"]  # RoIConfig's default
    # With torchvision's RoI Align kernel rpnlab reproduces torchvision's detections in order, to
    # 1e-4. With the default (on the CPU rpnlab's matrix or sparse RoI Align: the same sums in
    # another order) the pooled features differ in the last float32 bits: the same detections to
    # 1e-3, but random heads give many near-equal scores, whose order those bits can swap.
    kernels = FasterRCNN.from_torchvision(tv)
    for module in kernels.modules():
        if isinstance(module, RoIPooler):
            module.implementation = "torchvision"
    for h, w, seed in ((256, 320, 1), (192, 256, 2)):  # padded sides multiples of 64 (module docstring)
        images = _images(2, h, w, seed)
        tv_proposals, tv_dets = _torchvision_detections(tv, images)
        for model in (kernels, ours):
            with torch.no_grad():
                dets, inter = model(images, return_intermediates=True)
            for p, q in zip(inter["proposals"], tv_proposals):
                assert p.shape == q.shape and torch.allclose(p, q, atol=1e-4)
            assert sum(len(d["boxes"]) for d in dets) > 0
            for d, t in zip(dets, tv_dets):
                assert d["boxes"].shape == t["boxes"].shape
                if model is kernels:
                    assert torch.equal(d["labels"], t["labels"])
                    assert torch.allclose(d["boxes"], t["boxes"], atol=1e-4)
                    assert torch.allclose(d["scores"], t["scores"], atol=1e-4)
                else:  # the same set: every detection has a twin (label, box, score) on the other side
                    def rows(x):
                        return torch.cat((x["boxes"], x["scores"][:, None], x["labels"][:, None] * 1e3), dim=1)

                    gap = torch.cdist(rows(d), rows(t), p=float("inf"))
                    assert gap.min(dim=1).values.max() < 1e-3 and gap.min(dim=0).values.max() < 1e-3


def test_not_a_torchvision_faster_rcnn():
    with pytest.raises(TypeError, match="torchvision FasterRCNN"):
        FasterRCNN.from_torchvision(torch.nn.Linear(2, 2))
