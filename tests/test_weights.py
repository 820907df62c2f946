"""Pretrained weights through torchvision's weights API, from files the tests write (nothing is downloaded)."""

import os
import urllib.error

import pytest
import torch

from rpnlab import cli
from rpnlab.config import ModelConfig
from rpnlab.detector.backbones import build_backbone, imagenet_weights
from rpnlab.detector.model import FasterRCNN
from rpnlab.detector.torchvision_models import torchvision_detector, torchvision_model_config
from tests.test_own_photos import SMALL, make_voc

NAME = "fasterrcnn_mobilenet_v3_large_320_fpn"


def _config(**changes) -> ModelConfig:
    import dataclasses

    return dataclasses.replace(torchvision_model_config(NAME), **changes)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty torch hub cache, and a network that is down."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", offline)
    folder = tmp_path / "torch" / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    return folder


def test_imagenet_backbone_weights_from_the_hub_cache(hub):
    weights = imagenet_weights("mobilenet_v3")
    with pytest.raises(FileNotFoundError, match=f"copy it to {hub / os.path.basename(weights.url)}"):
        build_backbone("mobilenet_v3", "imagenet")  # offline, nothing cached: says where the file goes
    from torchvision.models import mobilenet_v3_large

    state = mobilenet_v3_large(weights=None).state_dict()
    torch.save(state, hub / os.path.basename(weights.url))
    backbone, _, _ = build_backbone("mobilenet_v3", "imagenet")
    assert torch.equal(backbone.body[3].block[0][0].weight, state["features.3.block.0.0.weight"])
    assert not backbone.body[0][0].weight.requires_grad  # the stem is frozen when fine-tuning


def test_init_from_torchvision_weights_new_predictor(hub, tmp_path):
    from torchvision.models import get_model_weights

    with pytest.raises(FileNotFoundError, match="could not be downloaded"):
        FasterRCNN.from_config(_config(init=f"torchvision:{NAME}", num_classes=2))
    torch.manual_seed(0)
    coco_like = torchvision_detector(NAME, num_classes=91).state_dict()
    path = hub / os.path.basename(get_model_weights(NAME).DEFAULT.url)
    torch.save(coco_like, path)
    model = FasterRCNN.from_config(_config(init=f"torchvision:{NAME}", num_classes=2))
    fpn = model.backbone.body.fpn.inner_blocks[0][0].weight
    assert torch.equal(fpn, coco_like["backbone.fpn.inner_blocks.0.0.weight"])
    assert model.roi_heads.head.cls_score.out_features == 3  # a new predictor for 2 classes
    assert not model.backbone.body.body["0"][0].weight.requires_grad  # torchvision's frozen stem
    # 90 classes: COCO's own predictor and category names.
    coco = FasterRCNN.from_config(_config(init=f"torchvision:{NAME}", num_classes=90))
    assert coco.class_names[0] == "person" and len(coco.class_names) == 90
    # A local file works too.
    local = tmp_path / "mine.pth"
    torch.save(coco_like, local)
    same = FasterRCNN.from_config(_config(init=str(local), num_classes=90))
    assert torch.equal(same.backbone.body.fpn.inner_blocks[0][0].weight, fpn)


def test_train_init_torchvision_through_the_cli(hub, tmp_path, capsys):
    from torchvision.models import get_model_weights

    torch.manual_seed(0)
    torch.save(torchvision_detector(NAME, num_classes=91).state_dict(),
               hub / os.path.basename(get_model_weights(NAME).DEFAULT.url))
    root = make_voc(tmp_path / "voc", n_train=2, n_test=2)
    run = tmp_path / "run"
    argv = ["train", "--dataset", "voc", "--root", str(root), "--init", f"torchvision:{NAME}", *SMALL,
            "--out-dir", str(run)]
    assert cli.main(argv) == 0
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    model_cfg = state["configs"]["model"]
    assert model_cfg["backbone"] == NAME and model_cfg["num_classes"] == 2
    assert tuple(model_cfg["anchors"]["sizes"][0]) == (32.0, 64.0, 128.0, 256.0, 512.0)  # torchvision's anchors
    assert cli.main(["evaluate", "--checkpoint", str(run / "checkpoint.pt"), "--device", "cpu", "--no-progress"]) == 0
    assert "| stapler |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["train", "--dataset", "voc", "--root", str(root), "--init", "torchvision:yolo", *SMALL])
    assert "--init=torchvision:yolo is invalid" in capsys.readouterr().err
