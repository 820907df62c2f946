"""Devices, backbones (shapes, local-only pretrained weights) and the assembled FasterRCNN."""

import math
import random

import numpy as np
import pytest
import torch
import torchvision

from rpnlab.config import AnchorConfig, ModelConfig
from rpnlab.data import ImageBatch, SyntheticShapes, collate
from rpnlab.detector import backbones
from rpnlab.detector.backbones import (
    BACKBONES,
    SmallBackbone,
    build_backbone,
    torchvision_weights_filename,
)
from rpnlab.detector.model import IMAGENET_MEAN, IMAGENET_STD, FasterRCNN, synthetic_model_config
from rpnlab.engine import devices
from rpnlab.engine.train import ROI_LOSSES, RPN_LOSSES

# --------------------------------------------------------------------------------- devices


def test_resolve_device_cpu_and_auto_without_accelerators(monkeypatch):
    assert devices.resolve_device("cpu") == torch.device("cpu")
    assert devices.resolve_device(torch.device("cpu")) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(devices, "_mps_available", lambda: False)
    assert devices.resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(devices, "_mps_available", lambda: True)
    assert devices.resolve_device("auto") == torch.device("mps")


def test_resolve_device_auto_prefers_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert devices.resolve_device("auto") == torch.device("cuda")
    assert devices.resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(RuntimeError, match="only 2 CUDA device"):
        devices.resolve_device("cuda:2")


def test_resolve_device_errors(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(devices, "_mps_available", lambda: False)
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        devices.resolve_device("cuda")
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        devices.resolve_device("cuda:0")
    with pytest.raises(RuntimeError, match="MPS"):
        devices.resolve_device("mps")
    with pytest.raises(ValueError, match="'tpu'.*expected 'auto', 'cpu'"):
        devices.resolve_device("tpu")
    with pytest.raises(TypeError, match="device must be a string"):
        devices.resolve_device(0)


def test_seed_everything_repeats_every_generator():
    def draws():
        return random.random(), float(np.random.rand()), torch.rand(2).tolist()

    devices.seed_everything(5)
    first = draws()
    devices.seed_everything(5)
    assert draws() == first
    devices.seed_everything(6)
    assert draws() != first


def test_describe_environment():
    env = devices.describe_environment("cpu")
    assert env["torch"] == torch.__version__
    assert env["torchvision"] == torchvision.__version__
    assert env["device"] == "cpu"
    assert env["cpu_threads"] >= 1
    assert set(env) >= {"python", "numpy", "cuda", "gpu_count", "device_name"}


# --------------------------------------------------------------------------------- backbones

_EXPECTED = {
    "small": (128, (8,)),
    "vgg16": (512, (16,)),
    "resnet50_c4": (1024, (16,)),
    "mobilenet_v3": (960, (16,)),
    "mobilenet_v3_fpn": (256, (8, 16, 32)),
}


@pytest.mark.parametrize("name", BACKBONES)
def test_backbone_shapes(name):
    torch.manual_seed(0)
    module, channels, strides = build_backbone(name)
    assert (channels, strides) == _EXPECTED[name]
    x = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        features = module.eval()(x)
    assert isinstance(features, list) and len(features) == len(strides)
    for f, s in zip(features, strides):
        assert f.shape == (2, channels, math.ceil(64 / s), math.ceil(96 / s))


def test_small_backbone_stride_option():
    net = SmallBackbone(widths=(8, 16, 16), stride=4)
    assert net.strides == (4,) and net.out_channels == 16
    assert net(torch.rand(1, 3, 32, 32))[0].shape == (1, 16, 8, 8)
    with pytest.raises(ValueError, match="stride=3"):
        SmallBackbone(stride=3)


def test_unknown_backbone_lists_the_choices():
    with pytest.raises(ValueError, match="backbone='foo'.*'small'.*'mobilenet_v3_fpn'"):
        build_backbone("foo")


def test_small_backbone_loads_its_own_state_dict(tmp_path):
    torch.manual_seed(1)
    source = SmallBackbone()
    path = tmp_path / "small.pth"
    torch.save(source.state_dict(), path)
    torch.manual_seed(2)
    loaded, _, _ = build_backbone("small", pretrained=str(path))
    for (k, a), b in zip(source.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    with pytest.raises(ValueError, match="no published weights"):
        build_backbone("small", pretrained="cache")


def test_backbone_weights_from_an_rpnlab_checkpoint(tmp_path):
    torch.manual_seed(3)
    source = SmallBackbone()
    state = {"model": {f"backbone.{k}": v for k, v in source.state_dict().items()} | {"rpn.x": torch.zeros(1)}}
    torch.save(state, tmp_path / "ckpt.pt")
    loaded, _, _ = build_backbone("small", pretrained=tmp_path / "ckpt.pt")
    assert torch.equal(loaded.body[0][0][0].weight, source.body[0][0][0].weight)


@pytest.fixture
def fake_torch_home(tmp_path, monkeypatch):
    """An empty torch hub cache in tmp_path (TORCH_HOME), so no real cache is read or written."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    monkeypatch.setattr(backbones, "_PROJECT_WEIGHTS_DIR", tmp_path / "project_weights")
    monkeypatch.chdir(tmp_path)
    return tmp_path / "torch" / "hub" / "checkpoints"


def test_weights_from_the_torch_hub_cache(fake_torch_home):
    torch.manual_seed(4)
    reference = torchvision.models.mobilenet_v3_large(weights=None).state_dict()
    filename = torchvision_weights_filename("mobilenet_v3")
    assert filename == "mobilenet_v3_large-8738ca79.pth"
    fake_torch_home.mkdir(parents=True)
    torch.save(reference, fake_torch_home / filename)
    for name in ("mobilenet_v3", "mobilenet_v3_fpn"):
        module, _, _ = build_backbone(name, pretrained="cache")
        own = module.state_dict()
        for key, value in reference.items():
            if key.startswith("features.") and not key.endswith("num_batches_tracked"):
                assert torch.equal(own["body." + key[len("features."):]], value), (name, key)
        # Fine-tuning from ImageNet: frozen batch norm, the stem fixed, the rest trainable.
        assert isinstance(module.body[0][1], torchvision.ops.misc.FrozenBatchNorm2d)
        assert not module.body[0][0].weight.requires_grad
        assert module.body[10].block[0][0].weight.requires_grad


def test_missing_weights_list_every_path_looked_at(fake_torch_home, tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        build_backbone("vgg16", pretrained="cache")
    message = str(info.value)
    assert str(fake_torch_home / "vgg16-397923af.pth") in message
    assert str(tmp_path / "data" / "weights" / "vgg16-397923af.pth") in message
    assert "never downloads" in message
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        build_backbone("resnet50_c4", pretrained=str(tmp_path / "nowhere.pth"))


def test_weights_that_do_not_fit_are_refused(tmp_path):
    torch.save(SmallBackbone().state_dict(), tmp_path / "small.pth")
    with pytest.raises(ValueError, match="does not fit backbone 'mobilenet_v3'"):
        build_backbone("mobilenet_v3", pretrained=str(tmp_path / "small.pth"))


# --------------------------------------------------------------------------------- the model


def tiny_config(**roi) -> ModelConfig:
    cfg = synthetic_model_config()
    cfg.rpn.pre_nms_top_n_train, cfg.rpn.post_nms_top_n_train = 200, 50
    cfg.rpn.pre_nms_top_n_test, cfg.rpn.post_nms_top_n_test = 200, 30
    cfg.roi.batch_size_per_image = 32
    for k, v in roi.items():
        setattr(cfg.roi, k, v)
    return cfg.validate()


@pytest.fixture(scope="module")
def batch():
    ds = SyntheticShapes("train", num_images=4, image_size=64, cache=False)
    return collate([ds[i] for i in range(4)])


@pytest.fixture
def model():
    torch.manual_seed(0)
    return FasterRCNN.from_config(tiny_config())


def test_synthetic_config_is_valid_and_cpu_sized():
    cfg = synthetic_model_config()
    assert cfg.backbone == "small"
    assert cfg.anchors.strides == build_backbone("small")[2]
    assert min(cfg.anchors.sizes[0]) <= 16  # the synthetic objects start at 12 px
    assert cfg.rpn.post_nms_top_n_train < 2000  # scaled down from the paper
    # The dataclass defaults stay the paper's.
    assert ModelConfig().anchors.sizes == ((128.0, 256.0, 512.0),)


def test_training_returns_the_four_losses_and_all_parts_learn(model, batch):
    images, targets = batch
    model.train()
    losses = model(images, targets)
    assert set(losses) == set(RPN_LOSSES + ROI_LOSSES)
    for name, value in losses.items():
        assert value.dim() == 0 and torch.isfinite(value), name
    sum(losses.values()).backward()
    for part in (model.backbone, model.rpn, model.roi_heads):
        grads = [p.grad for p in part.parameters()]
        assert all(g is not None for g in grads)
        assert any(g.abs().sum() > 0 for g in grads)


def test_eval_detections_are_inside_each_image(model, batch):
    images, _ = batch
    model.eval()
    with torch.no_grad():
        detections = model(images)
    assert len(detections) == len(images)
    for det, (h, w) in zip(detections, images.image_sizes):
        assert set(det) == {"boxes", "scores", "labels"}
        boxes = det["boxes"]
        assert boxes.shape[1] == 4 and boxes.shape[0] == det["scores"].shape[0] == det["labels"].shape[0]
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
        assert ((det["labels"] >= 1) & (det["labels"] <= 3)).all()


def test_list_input_equals_image_batch(model, batch):
    images, _ = batch
    tensors = [images.tensors[i, :, :h, :w] for i, (h, w) in enumerate(images.image_sizes)]
    model.eval()
    with torch.no_grad():
        a = model(images)
        b = model(tensors)
    for x, y in zip(a, b):
        torch.testing.assert_close(x["boxes"], y["boxes"])
        torch.testing.assert_close(x["scores"], y["scores"])


def test_normalisation_matches_torchvision_and_zeroes_padding(model):
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    g = torch.Generator().manual_seed(0)
    big, small = torch.rand(3, 48, 64, generator=g), torch.rand(3, 30, 40, generator=g)
    x, sizes = model.prepare_images([big, small])
    assert sizes == [(48, 64), (30, 40)]
    assert x.shape == (2, 3, 48, 64)
    reference = GeneralizedRCNNTransform(48, 64, list(IMAGENET_MEAN), list(IMAGENET_STD)).normalize
    torch.testing.assert_close(x[0], reference(big), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x[1, :, :30, :40], reference(small), rtol=1e-5, atol=1e-5)
    assert (x[1, :, 30:] == 0).all() and (x[1, :, :, 40:] == 0).all()


def test_rpn_only(model, batch):
    images, targets = batch
    model.train()
    losses = model(images, targets, rpn_only=True)
    assert set(losses) == set(RPN_LOSSES)
    sum(losses.values()).backward()
    assert all(p.grad is None for p in model.roi_heads.parameters())
    model.eval()
    with torch.no_grad():
        proposals = model(images, rpn_only=True)
    assert len(proposals) == len(images)
    assert all(set(p) == {"boxes", "scores"} and 0 < len(p["boxes"]) <= 30 for p in proposals)
    # Proposals come best first.
    assert all((p["scores"][:-1] >= p["scores"][1:]).all() for p in proposals)


def test_fast_rcnn_on_given_proposals(model, batch):
    images, targets = batch
    model.train()
    proposals = [t["boxes"] + 1.0 for t in targets]
    losses = model(images, targets, proposals=proposals)
    assert set(losses) == set(ROI_LOSSES)
    sum(losses.values()).backward()
    assert all(p.grad is None for p in model.rpn.parameters())
    with pytest.raises(ValueError, match="exclude each other"):
        model(images, targets, rpn_only=True, proposals=proposals)


def test_intermediates(model, batch):
    images, targets = batch
    model.eval()
    with torch.no_grad():
        detections, inter = model(images, return_intermediates=True)
    assert len(detections) == len(images)
    assert set(inter) >= {"images", "features", "anchors", "rpn", "proposals", "roi"}
    f = inter["features"][0]
    assert f.shape[:2] == (4, model.backbone.out_channels)
    k = len(tiny_config().anchors.sizes[0]) * 3
    assert inter["anchors"].shape == (f.shape[2] * f.shape[3] * k, 4)
    assert len(inter["proposals"]) == 4
    model.train()
    losses, inter = model(images, targets, return_intermediates=True)
    assert set(losses) == set(RPN_LOSSES + ROI_LOSSES)
    assert "labels" in inter["roi"]


def test_bad_inputs(model, batch):
    images, targets = batch
    model.train()
    with pytest.raises(ValueError, match="targets are required"):
        model(images)
    with pytest.raises(ValueError, match="targets\\[0\\]"):
        model(images, [{"boxes": torch.zeros(2, 4)}] + targets[1:])
    with pytest.raises(ValueError, match="targets has 3 entries"):
        model(images, targets[:3])
    with pytest.raises(TypeError, match="ImageBatch or a list"):
        model(images.tensors, targets)
    with pytest.raises(ValueError, match="images\\[0\\]"):
        model([torch.zeros(1, 8, 8)], targets[:1])


def test_anchor_strides_must_match_the_backbone():
    cfg = tiny_config()
    cfg.anchors = AnchorConfig(sizes=((32.0,),), strides=(16,))
    with pytest.raises(ValueError, match="anchors.strides=\\(16,\\).*strides are \\(8,\\)"):
        FasterRCNN.from_config(cfg)
    with pytest.raises(TypeError, match="ModelConfig"):
        FasterRCNN.from_config({"backbone": "small"})


def test_fpn_model_pools_from_every_level(batch):
    torch.manual_seed(0)
    cfg = tiny_config()
    cfg.backbone = "mobilenet_v3_fpn"
    cfg.anchors = AnchorConfig(sizes=((16.0, 32.0), (32.0, 64.0), (64.0, 128.0)), aspect_ratios=(0.5, 1.0, 2.0),
                               strides=(8, 16, 32))
    model = FasterRCNN.from_config(cfg)
    assert model.roi_heads.pooler.spatial_scales == (1 / 8, 1 / 16, 1 / 32)
    images, targets = batch
    model.train()
    losses = model(images, targets)
    assert set(losses) == set(RPN_LOSSES + ROI_LOSSES)
    assert all(torch.isfinite(v) for v in losses.values())


def test_predict_keeps_training_mode_and_filters(model, batch):
    images, _ = batch
    model.train()
    all_dets = model.predict(images)
    some = model.predict(images, score_thresh=0.5)
    assert model.training
    for a, b in zip(all_dets, some):
        assert (b["scores"] >= 0.5).all()
        assert len(b["boxes"]) == int((a["scores"] >= 0.5).sum())


def test_image_batch_type_from_data(batch):
    assert isinstance(batch[0], ImageBatch)
