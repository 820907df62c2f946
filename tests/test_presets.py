"""The named presets (synthetic CPU, GPU, paper defaults): they validate, build and learn on tiny sizes."""

import dataclasses
import statistics

import pytest
import torch
from torch import nn

from rpnlab import cli
from rpnlab.config import DataConfig, ModelConfig
from rpnlab.data import build_dataset
from rpnlab.detector.model import FasterRCNN, gpu_model_config, synthetic_model_config
from rpnlab.engine.presets import (
    PRESETS,
    gpu_data_config,
    preset_configs,
    synthetic_detector_config,
)
from rpnlab.engine.train import Trainer, gpu_train_config, stages_for, synthetic_train_config


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_validates_and_builds(name):
    model_cfg, data_cfg, train_cfg = preset_configs(name)
    for cfg in (model_cfg, data_cfg, train_cfg):
        assert cfg.validate() is cfg
    if name != "defaults":  # the paper's defaults pair stride-16 anchors with a VGG-16 (built in test_model)
        model = FasterRCNN.from_config(model_cfg)
        assert model.rpn.anchor_generator.num_anchors_per_location() == model_cfg.anchors.num_anchors_per_location


@pytest.mark.parametrize("name", ["synthetic", "gpu"])
def test_from_scratch_presets_start_step2_from_step1(name):
    assert preset_configs(name)[2].alternating_init == "step1"


@pytest.mark.parametrize("name", ["synthetic", "gpu"])
def test_from_scratch_presets_give_step2_the_largest_share(name):
    # Step 2 trains the features and the head; py-faster-rcnn's 2:1:2:1 gave it a sixth.
    train_cfg = preset_configs(name)[2]
    steps = [s.epochs for s in stages_for("alternating", train_cfg.epochs, train_cfg.alternating_split)]
    assert steps[1] == max(steps) and steps[1] >= sum(steps) / 3


def test_unknown_preset_is_named():
    with pytest.raises(ValueError, match="preset='laptop'"):
        preset_configs("laptop")


def test_gpu_preset_is_the_paper_scaled_to_512px_images():
    model_cfg, data_cfg, train_cfg = preset_configs("gpu")
    assert data_cfg.image_size == 512 and data_cfg.min_size == 512  # drawn at 512 px, not resized
    # The paper's 128 and 256 px scales, and its 3 ratios: 9 anchors per location.
    assert {128.0, 256.0} <= set(model_cfg.anchors.sizes[0])
    assert model_cfg.anchors.num_anchors_per_location == [9]
    assert (model_cfg.rpn.post_nms_top_n_train, model_cfg.rpn.post_nms_top_n_test) == (2000, 300)
    assert model_cfg.roi.positive_fraction == 0.25
    assert train_cfg.amp == "bf16" and train_cfg.device == "cuda"
    assert train_cfg.epochs > synthetic_train_config().epochs
    # Objects of the 512 px shapes (48-307 px) fit the anchors: the smallest anchor is no more
    # than the smallest object's size x 1.5, the largest no less than half the largest object.
    assert min(model_cfg.anchors.sizes[0]) <= 1.5 * 0.094 * 512
    assert max(model_cfg.anchors.sizes[0]) >= 0.5 * 0.6 * 512


def test_gpu_preset_runs_forward_on_the_cpu():
    # Built and run once in float32 on the CPU (no training: that needs CUDA and minutes).
    torch.manual_seed(0)
    model = FasterRCNN.from_config(gpu_model_config()).train()
    image = torch.rand(3, 512, 512)
    target = {"boxes": torch.tensor([[40.0, 60.0, 200.0, 300.0]]), "labels": torch.tensor([2])}
    losses = model([image], [target])
    assert set(losses) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values())
    detections = model.predict([image])
    assert detections[0]["boxes"].shape[1] == 4


def test_gpu_preset_refuses_a_cpu_without_being_told(tmp_path, monkeypatch):
    from rpnlab.engine import devices

    monkeypatch.setattr(devices, "native_bf16", lambda device: False)  # a CPU without AMX / AVX512-BF16
    model_cfg, data_cfg, train_cfg = preset_configs("gpu")
    train_cfg.device, train_cfg.out_dir = "cpu", str(tmp_path)
    data_cfg.num_train, data_cfg.root = 1, str(tmp_path)
    with pytest.raises(ValueError, match="amp='bf16' needs CUDA or a CPU with native bfloat16"):
        Trainer(model_cfg, data_cfg, train_cfg, progress=False)


def test_cli_selects_the_gpu_preset_and_options_still_override_it():
    parser = cli.build_parser()
    model, data, train = cli.configs_from_args(parser.parse_args(["train", "--preset", "gpu"]))
    assert (model, data, train) == (gpu_model_config(), gpu_data_config(), gpu_train_config())
    args = parser.parse_args(["train", "--preset", "gpu", "--amp", "off", "--device", "cpu", "--epochs", "2"])
    model, data, train = cli.configs_from_args(args)
    assert (train.amp, train.device, train.epochs) == ("off", "cpu", 2)
    assert data.image_size == 512


def test_small_backbone_norm_is_a_choice():
    cfg = synthetic_model_config()
    norms = {type(m) for m in FasterRCNN.from_config(cfg).backbone.modules()}
    assert (nn.BatchNorm2d in norms) == (cfg.small_norm == "batch")
    cfg.small_norm = "group" if cfg.small_norm == "batch" else "batch"
    other = {type(m) for m in FasterRCNN.from_config(cfg).backbone.modules()}
    assert (nn.GroupNorm in other) == (cfg.small_norm == "group")
    with pytest.raises(ValueError, match="small_norm='layer'"):
        ModelConfig(small_norm="layer").validate()


def test_synthetic_recipe_lowers_the_loss_in_a_few_iterations(tmp_path):
    # The preset as shipped (its lr, batch norm, warm-up) on 4 images seen 6 times: the loss falls.
    data_cfg = DataConfig(num_train=4, num_val=1, root=str(tmp_path / "data"))
    train_cfg = synthetic_train_config(epochs=6, batch_size=2, warmup_iters=2, device="cpu",
                                       out_dir=str(tmp_path / "run"), checkpoint_every=6)
    result = Trainer(synthetic_model_config(), data_cfg, train_cfg, progress=False,
                     train_dataset=build_dataset(data_cfg, "train")).run()
    totals = [h["total"] for h in result.history]
    assert len(totals) == 12
    # 32 RoIs of 2 images per step make single steps noisy: the median of the second half.
    assert statistics.median(totals[6:]) < 0.8 * sum(totals[:3]) / 3, totals


def test_synthetic_preset_upsamples_flips_both_ways_and_scales_the_anchors_with_the_images(tmp_path):
    model_cfg, data_cfg, train_cfg = preset_configs("synthetic")
    assert (data_cfg.image_size, data_cfg.min_size, data_cfg.max_size) == (128, 192, 384)
    assert data_cfg.vflip_prob > 0 and data_cfg.color_jitter > 0 and train_cfg.amp == "auto"
    assert model_cfg.roi.implementation == "auto"  # RoI Align in matrix form from small CPU maps (the default)
    assert model_cfg.anchors.sizes == ((24.0, 48.0, 96.0),)  # the course's 16, 32, 64 x 192 / 128
    image, _ = build_dataset(dataclasses.replace(data_cfg, root=str(tmp_path), num_val=1), "val")[0]
    assert tuple(image.shape[-2:]) == (192, 192)
    course = dataclasses.replace(data_cfg, min_size=128, max_size=256)
    model_cfg = synthetic_detector_config(course)
    assert model_cfg == synthetic_model_config()  # at 128 px: the course's model


def test_preset_input_size_resizes_the_synthetic_shapes_and_rejects_what_it_cannot_apply():
    model_cfg, data_cfg, _ = preset_configs("synthetic", input_size=128)
    assert (data_cfg.min_size, data_cfg.max_size) == (128, 256)
    assert model_cfg.anchors.sizes == ((16.0, 32.0, 64.0),)  # the course's
    assert preset_configs("synthetic", 0)[1] == preset_configs("synthetic")[1]
    for bad in (16, 128.0, True, "128"):
        with pytest.raises(ValueError, match="input_size"):
            preset_configs("synthetic", input_size=bad)
    with pytest.raises(ValueError, match="input_size=128 applies to the 'synthetic' preset only"):
        preset_configs("gpu", input_size=128)
