"""The course setup is the model preset's, and departures from it are named."""

import pytest

from rpnlab.detector.model import synthetic_model_config
from rpnlab.lab.course import course_setup, departures, resolve


def test_course_setup_reads_the_model_preset():
    setup, cfg = course_setup(), synthetic_model_config()
    assert setup.anchor_sizes == tuple(cfg.anchors.sizes[0])
    assert setup.anchor_ratios == tuple(cfg.anchors.aspect_ratios[0])
    assert setup.anchor_stride == cfg.anchors.strides[0]
    assert setup.anchor_offset == cfg.anchors.offset
    assert setup.batch_size_per_image == cfg.rpn.batch_size_per_image
    assert (setup.high_threshold, setup.low_threshold) == (cfg.rpn.fg_iou_thresh, cfg.rpn.bg_iou_thresh)
    assert "anchor_stride" in setup.describe()


def test_empty_parameters_take_the_course_values_and_others_are_departures():
    setup = course_setup()
    used = resolve(setup, anchor_sizes=[], anchor_stride=0, batch_size_per_image=setup.batch_size_per_image + 1)
    assert used["anchor_sizes"] == setup.anchor_sizes and used["anchor_stride"] == setup.anchor_stride
    lines = departures(setup, used, reasons={"batch_size_per_image": "to see the sampler's limit"})
    assert len(lines) == 1 and "batch_size_per_image" in lines[0] and "the sampler's limit" in lines[0]
    assert departures(setup, {"anchor_sizes": list(setup.anchor_sizes)}) == []
    with pytest.raises(ValueError, match="stride"):
        resolve(setup, stride=8)


def test_course_rpn_is_trained_once_then_loaded(tmp_path):
    import torch

    from rpnlab.lab.stage_training import course_rpn

    first = course_rpn(2, num_images=4, batch_size=2, device="cpu", cache_dir=tmp_path)
    assert first.trained_here and first.checkpoint.is_file()
    again = course_rpn(2, num_images=4, batch_size=2, device="cpu", cache_dir=tmp_path)
    assert not again.trained_here and again.checkpoint == first.checkpoint
    assert "loaded from the course cache" in again.describe()
    assert len(first.history) == len(again.history) == 2 and again.history[-1]["total"] == first.history[-1]["total"]
    for (name, a), (_, b) in zip(first.model.state_dict().items(), again.model.state_dict().items()):
        torch.testing.assert_close(a.cpu(), b.cpu(), msg=name)
    other = course_rpn(3, num_images=4, batch_size=2, device="cpu", cache_dir=tmp_path)  # other settings
    assert other.trained_here and other.checkpoint != first.checkpoint
    paper = course_rpn(2, num_images=4, batch_size=2, device="cpu", cache_dir=tmp_path, loss_normalization="paper")
    assert paper.trained_here and paper.checkpoint not in (first.checkpoint, other.checkpoint)
    assert paper.model.config.rpn.loss_normalization == "paper"
    (first.checkpoint.parent / "history.json").unlink()  # a cache from before the history was kept
    assert course_rpn(2, num_images=4, batch_size=2, device="cpu", cache_dir=tmp_path).history is None
    assert course_rpn(2, num_images=4, batch_size=2, device="cpu", cache_dir=tmp_path, need_history=True).trained_here


def test_setup_of_names_what_a_model_changed():
    from dataclasses import asdict

    from rpnlab.lab.course import setup_of

    cfg = synthetic_model_config()
    assert setup_of(cfg) == course_setup()
    cfg.anchors.strides = (16,)
    lines = departures(course_setup(), asdict(setup_of(cfg)), reasons={"anchor_stride": "VGG-16's"})
    assert lines == [f"anchor_stride = 16 instead of the course's {course_setup().anchor_stride}: VGG-16's"]
    cfg.anchors.strides = (8, 16)
    with pytest.raises(ValueError, match="one feature level"):
        setup_of(cfg)
