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


def _count_head_training(monkeypatch):
    """Wrap ``train_fast_rcnn_head`` as ``course_head`` calls it; returns the list of calls."""
    from rpnlab.lab import stage_training

    calls = []
    real = stage_training.train_fast_rcnn_head

    def counted(*args, **kwargs):
        calls.append(args[2])  # iterations
        return real(*args, **kwargs)

    monkeypatch.setattr(stage_training, "train_fast_rcnn_head", counted)
    return calls


def test_course_head_is_trained_once_then_loaded_and_keyed_by_its_settings(tmp_path, monkeypatch):
    import torch

    from rpnlab.lab.stage_training import course_head, course_rpn

    calls = _count_head_training(monkeypatch)
    small = {"num_images": 4, "batch_size": 2, "device": "cpu", "cache_dir": tmp_path}
    rpn = course_rpn(2, **small)
    assert rpn.trained_here
    first = course_head(rpn.model, 2, **small, lr=0.05)
    assert first.trained_here and first.checkpoint.is_file() and calls == [2] and len(first.history) == 2
    assert "trained here" in first.describe() and "next run" in first.describe()
    trained = {k: v.clone() for k, v in first.model.roi_heads.state_dict().items()}

    # A fresh process's view: the RPN loaded from its cache (same weights as the one trained above),
    # its head still untrained; the head comes from the cache, with no training call.
    loaded_rpn = course_rpn(2, **small)
    assert not loaded_rpn.trained_here
    before = {k: v.clone() for k, v in loaded_rpn.model.roi_heads.state_dict().items()}
    again = course_head(loaded_rpn.model, 2, **small, lr=0.05)
    assert not again.trained_here and calls == [2] and again.checkpoint == first.checkpoint
    assert "loaded from the course cache" in again.describe()
    assert again.history == first.history
    changed = [k for k in trained if not torch.equal(before[k], trained[k])]
    assert changed, "training changed no weight of the head: the load below would prove nothing"
    for name, value in again.model.roi_heads.state_dict().items():
        torch.testing.assert_close(value, trained[name], rtol=0, atol=0, msg=name)

    # Every setting that determines the head is in its key: each change trains a new one.
    checkpoints = {first.checkpoint}
    for change in ({"lr": 0.01}, {"seed": 1}, {"batch_size_per_image": 8}, {"positive_fraction": 0.25},
                   {"iterations": 3}, {"batch_size": 1}, {"num_images": 3}):
        settings = {**small, "lr": 0.05, "iterations": 2, **change}
        other = course_head(course_rpn(2, **small).model, **settings)
        assert other.trained_here and other.checkpoint not in checkpoints, change
        checkpoints.add(other.checkpoint)
    assert len(calls) == 1 + 7
    # Another RPN (other weights) under the same head settings: its own head too.
    other_rpn = course_rpn(3, **small)
    assert course_head(other_rpn.model, 2, **small, lr=0.05).checkpoint not in checkpoints
    assert course_head(course_rpn(2, **small).model, 2, **small, lr=0.05, refresh=True).trained_here


def test_a_corrupt_course_head_entry_is_retrained_not_a_crash(tmp_path, monkeypatch):
    import torch

    from rpnlab.lab.stage_training import course_head, course_rpn

    calls = _count_head_training(monkeypatch)
    small = {"num_images": 4, "batch_size": 2, "device": "cpu", "cache_dir": tmp_path}
    first = course_head(course_rpn(2, **small).model, 2, **small)
    good = first.checkpoint.read_bytes()
    first.checkpoint.write_bytes(good[: len(good) // 2])  # a truncated file
    redone = course_head(course_rpn(2, **small).model, 2, **small)
    assert redone.trained_here and len(calls) == 2 and "unusable" in redone.note and "unusable" in redone.describe()
    assert not course_head(course_rpn(2, **small).model, 2, **small).trained_here  # the rewrite is good

    # A readable file whose weights do not fit this head (or are NaN) is retrained as well.
    state = torch.load(first.checkpoint, weights_only=True)
    name = next(iter(state["roi_heads"]))
    state["roi_heads"][name] = torch.full_like(state["roi_heads"][name], float("nan"))
    torch.save(state, first.checkpoint)
    assert course_head(course_rpn(2, **small).model, 2, **small).trained_here and len(calls) == 3
    # A tensor of the wrong shape, among good ones: the retraining starts from the initial head
    # (not a half-loaded one), so it gives the first training's weights again.
    state = torch.load(first.checkpoint, weights_only=True)
    expected = {k: v.clone() for k, v in state["roi_heads"].items()}
    state["roi_heads"][name] = torch.zeros(1)
    torch.save(state, first.checkpoint)
    last = course_head(course_rpn(2, **small).model, 2, **small)
    assert last.trained_here and len(calls) == 4
    for key, value in last.model.roi_heads.state_dict().items():
        torch.testing.assert_close(value, expected[key], msg=key)


def test_course_head_rejects_bad_settings_before_work(tmp_path, monkeypatch):
    from rpnlab.lab.stage_training import course_head, course_rpn

    calls = _count_head_training(monkeypatch)
    model = course_rpn(2, num_images=4, batch_size=2, device="cpu", cache_dir=tmp_path).model
    with pytest.raises(ValueError, match="iterations"):
        course_head(model, 0, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="positive_fraction"):
        course_head(model, 2, num_images=4, positive_fraction=1.5, cache_dir=tmp_path)
    assert calls == [] and not list(tmp_path.glob("head-*"))
