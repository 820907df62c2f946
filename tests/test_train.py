"""The training loop: schedules, checkpoints, exact resume, early stops, evaluation."""

import math

import pytest
import torch

from rpnlab.config import DataConfig, TrainConfig
from rpnlab.detector.model import synthetic_model_config
from rpnlab.engine import devices
from rpnlab.engine.checkpoint import load_checkpoint, load_model, save_checkpoint
from rpnlab.engine.train import (
    ROI_LOSSES,
    RPN_LOSSES,
    EpochSampler,
    LRSchedule,
    Trainer,
    evaluate,
    lr_factor,
    stages_for,
    synthetic_train_config,
    train,
)

# --------------------------------------------------------------------------------- schedules


def test_lr_factor_warmup_cosine_and_steps():
    assert lr_factor(0, 100, warmup_iters=10) == pytest.approx(1e-3)
    assert lr_factor(5, 100, warmup_iters=10) == pytest.approx((1e-3 * 0.5 + 0.5) * 0.5 * (1 + math.cos(math.pi * 0.05)))
    assert lr_factor(10, 100, warmup_iters=10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.1)))
    assert lr_factor(50, 100) == pytest.approx(0.5)
    assert lr_factor(100, 100) == pytest.approx(0.0)
    assert lr_factor(150, 100) == pytest.approx(0.0)  # past the end it stays at 0
    steps = [lr_factor(i, 100, schedule="step", milestones=[30, 60]) for i in (0, 29, 30, 59, 60, 99)]
    assert steps == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    with pytest.raises(ValueError, match="'linear'"):
        lr_factor(0, 10, schedule="linear")


def test_lr_scheduler_state_survives_a_weights_only_checkpoint(tmp_path):
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, LRSchedule(20, 5, "cosine"))
    for _ in range(7):
        opt.step()
        sched.step()
    save_checkpoint(tmp_path / "s.pt", {"scheduler": sched.state_dict()})
    opt2 = torch.optim.SGD([param], lr=0.1)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, LRSchedule(1, 0, "step"))
    sched2.load_state_dict(load_checkpoint(tmp_path / "s.pt")["scheduler"])
    opt2.step()
    sched2.step()
    opt.step()
    sched.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"])
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * lr_factor(8, 20, 5))


def test_stages():
    assert [s.name for s in stages_for("joint", 3)] == ["joint"]
    (rpn,) = stages_for("rpn", 2)
    assert rpn.loss_keys == RPN_LOSSES and "roi_heads" not in rpn.trainable
    alt = stages_for("alternating", 12)
    assert [s.epochs for s in alt] == [4, 2, 4, 2]  # py-faster-rcnn's 2 : 1 : 2 : 1
    assert [s.mode for s in alt] == ["rpn", "fast_rcnn_fixed", "rpn", "fast_rcnn"]
    assert alt[2].trainable == ("rpn",) and alt[3].trainable == ("roi_heads",)  # shared convs frozen
    for epochs in range(1, 15):
        parts = [s.epochs for s in stages_for("alternating", epochs)]
        assert min(parts) >= 1 and sum(parts) == max(epochs, 4)
    with pytest.raises(ValueError, match="'cyclic'"):
        stages_for("cyclic", 3)


def test_alternating_split_shares_the_epochs_between_the_steps():
    assert [s.epochs for s in stages_for("alternating", 12, (1, 3, 1, 1))] == [2, 6, 2, 2]
    assert [s.epochs for s in stages_for("alternating", 7, (1, 4, 1, 1))] == [1, 4, 1, 1]
    for epochs in range(1, 15):  # every step keeps at least one epoch, the total is kept
        parts = [s.epochs for s in stages_for("alternating", epochs, (1, 5, 1, 1))]
        assert min(parts) >= 1 and sum(parts) == max(epochs, 4)
    with pytest.raises(ValueError, match=r"split=\(1, 2, 3\)"):
        stages_for("alternating", 12, (1, 2, 3))
    for bad in ((1, 0, 1, 1), (1, 2, 1), (1, 2.5, 1, 1), (True, 1, 1, 1)):
        with pytest.raises(ValueError, match="alternating_split="):
            TrainConfig(alternating_split=bad).validate()


def test_trainer_uses_the_configs_alternating_split(tmp_path):
    model_cfg, data_cfg, train_cfg = tiny_configs(tmp_path, schedule="alternating", epochs=6,
                                                  alternating_split=(1, 3, 1, 1))
    trainer = Trainer(model_cfg, data_cfg, train_cfg, progress=False)
    assert [s.epochs for s in trainer.stages] == [1, 3, 1, 1]


def test_epoch_sampler_order_depends_on_seed_and_epoch_only():
    data = list(range(10))
    a, b = EpochSampler(data, seed=3, batch_size=4), EpochSampler(data, seed=3, batch_size=4)
    a.set_epoch(2)
    b.set_epoch(2)
    order = list(a)
    assert order == list(b) and sorted(order) == data
    b.set_epoch(1)
    assert list(b) != order
    b.set_epoch(2, skip_batches=1)
    assert list(b) == order[4:] and len(b) == 6
    assert a.batches_per_epoch() == 3
    # Two ranks split one epoch between them.
    ranks = [EpochSampler(data, num_replicas=2, rank=r, seed=3) for r in (0, 1)]
    for s in ranks:
        s.set_epoch(0)
    assert sorted(list(ranks[0]) + list(ranks[1])) == data


# --------------------------------------------------------------------------------- training runs


def tiny_configs(tmp_path, **train_overrides):
    model = synthetic_model_config()
    model.rpn.pre_nms_top_n_train, model.rpn.post_nms_top_n_train = 100, 30
    model.rpn.pre_nms_top_n_test, model.rpn.post_nms_top_n_test = 100, 20
    model.roi.batch_size_per_image = 16
    data = DataConfig(root=str(tmp_path / "synthetic"), image_size=64, num_train=8, num_val=4, num_test=4,
                      min_size=64, max_size=64)
    options = {"epochs": 3, "batch_size": 4, "lr": 0.01, "warmup_iters": 2, "device": "cpu",
               "out_dir": str(tmp_path / "run")}
    options.update(train_overrides)
    return model, data, TrainConfig(**options)


def test_train_records_history_and_checkpoints(tmp_path):
    model_cfg, data_cfg, train_cfg = tiny_configs(tmp_path, epochs=2)
    result = train(model_cfg, data_cfg, train_cfg, progress=False)
    assert result.stop_reason == "completed"
    assert len(result.history) == result.iterations == 4  # 2 epochs x 8 images / 4 per batch
    first = result.history[0]
    assert set(first) == {"step", "epoch", "stage", "lr", "total", *RPN_LOSSES, *ROI_LOSSES}
    assert [h["step"] for h in result.history] == [0, 1, 2, 3]
    assert [h["epoch"] for h in result.history] == [0, 0, 1, 1]
    assert first["lr"] == pytest.approx(0.01 * 1e-3)  # warm-up starts low
    for h in result.history:
        assert h["total"] == pytest.approx(sum(h[k] for k in RPN_LOSSES + ROI_LOSSES), rel=1e-5)
    state = load_checkpoint(result.checkpoint)
    assert state["step"] == 4 and state["epoch"] == 2
    assert state["history"] == result.history
    assert state["configs"]["train"]["lr"] == 0.01
    assert set(state["rng"]) == {"torch", "cuda", "python", "numpy"}
    assert {"optimizer", "scheduler", "model"} <= set(state)
    # The checkpoint rebuilds the same model.
    restored = load_model(result.checkpoint)
    for (k, a), b in zip(result.model.state_dict().items(), restored.state_dict().values()):
        assert torch.equal(a, b), k
    assert not restored.training and not result.model.training


def test_resume_continues_the_same_loss_curve(tmp_path):
    """6 iterations straight == 3 iterations (stopped mid-epoch) + resume + 3 more."""
    model_cfg, data_cfg, straight_cfg = tiny_configs(tmp_path / "a")
    straight = train(model_cfg, data_cfg, straight_cfg, progress=False)
    assert len(straight.history) == 6

    _, _, first_cfg = tiny_configs(tmp_path / "a", out_dir=str(tmp_path / "b"), max_iters=3)
    first = train(model_cfg, data_cfg, first_cfg, progress=False)
    assert first.stop_reason == "max_iters" and len(first.history) == 3
    _, _, rest_cfg = tiny_configs(tmp_path / "a", out_dir=str(tmp_path / "b"))
    resumed = train(model_cfg, data_cfg, rest_cfg, resume=first.checkpoint, progress=False)
    assert resumed.iterations == 3
    assert len(resumed.history) == 6
    for a, b in zip(straight.history, resumed.history):
        assert a.keys() == b.keys()
        for key in a:
            if isinstance(a[key], float):
                assert a[key] == pytest.approx(b[key], abs=1e-6, rel=1e-6), (a["step"], key)
            else:
                assert a[key] == b[key]
    for (k, x), y in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=k)


def test_resume_refuses_another_configuration(tmp_path):
    model_cfg, data_cfg, train_cfg = tiny_configs(tmp_path, max_iters=1)
    result = train(model_cfg, data_cfg, train_cfg, progress=False)
    _, _, other = tiny_configs(tmp_path, batch_size=2)
    with pytest.raises(ValueError, match="batch_size=4"):
        Trainer(model_cfg, data_cfg, other, resume=result.checkpoint, progress=False)
    model_cfg.roi.representation_size = 64
    with pytest.raises(ValueError, match="model config differs"):
        Trainer(model_cfg, data_cfg, train_cfg, resume=result.checkpoint, progress=False)


def test_non_finite_loss_stops_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    model_cfg, data_cfg, train_cfg = tiny_configs(tmp_path)
    original = Trainer._losses
    calls = []

    def poisoned(self, stage, wrapped, images, targets):
        losses = original(self, stage, wrapped, images, targets)
        calls.append(1)
        if len(calls) == 3:  # the first iteration of epoch 1, after epoch 0's checkpoint
            losses["loss_box_reg"] = losses["loss_box_reg"] * float("nan")
        return losses

    monkeypatch.setattr(Trainer, "_losses", poisoned)
    with pytest.raises(RuntimeError, match=r"non-finite loss at step 2 .*loss_box_reg=nan"):
        train(model_cfg, data_cfg, train_cfg, progress=False)
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert state["step"] == 2 and len(state["history"]) == 2
    assert all(math.isfinite(h["total"]) for h in state["history"])


def test_time_budget_and_callback_stop_early(tmp_path):
    model_cfg, data_cfg, train_cfg = tiny_configs(tmp_path, time_budget_s=1e-6)
    result = train(model_cfg, data_cfg, train_cfg, progress=False)
    assert result.stop_reason == "time_budget" and result.iterations == 1
    assert load_checkpoint(result.checkpoint)["step"] == 1

    seen = []
    _, _, train_cfg = tiny_configs(tmp_path, out_dir=str(tmp_path / "cb"))
    result = train(model_cfg, data_cfg, train_cfg, progress=False,
                   callback=lambda record: seen.append(record["step"]) or len(seen) < 2)
    assert result.stop_reason == "callback" and seen == [0, 1]


def _params(module):
    return [p.detach().clone() for p in module.parameters()]


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def test_alternating_schedule_freezes_the_shared_convs(tmp_path):
    model_cfg, data_cfg, train_cfg = tiny_configs(tmp_path, epochs=4, schedule="alternating")
    snapshots = {}
    trainer = Trainer(model_cfg, data_cfg, train_cfg, progress=False)

    def snapshot(record):
        snapshots.setdefault(record["stage"], (_params(trainer.model.backbone), _params(trainer.model.rpn),
                                               _params(trainer.model.roi_heads)))

    trainer.callback = snapshot
    result = trainer.run()
    stages = [h["stage"] for h in result.history]
    assert stages == ["step1_rpn"] * 2 + ["step2_fast_rcnn"] * 2 + ["step3_rpn"] * 2 + ["step4_fast_rcnn"] * 2
    assert all(set(h) >= set(RPN_LOSSES) for h in result.history if h["stage"].endswith("rpn"))
    assert all(set(ROI_LOSSES) <= set(h) for h in result.history if "fast_rcnn" in h["stage"])
    backbone3, rpn3, _ = snapshots["step3_rpn"]
    _, rpn4, roi4 = snapshots["step4_fast_rcnn"]
    final = result.model
    assert _same(backbone3, _params(final.backbone))  # frozen in steps 3 and 4
    assert not _same(rpn3, rpn4)  # step 3 trains the RPN ...
    assert _same(rpn4, _params(final.rpn))  # ... step 4 does not
    assert not _same(roi4, _params(final.roi_heads))  # step 4 trains the head
    # Step 1 trained a separate network: the final backbone is step 2's.
    assert not _same(_params(trainer.rpn_model.backbone), _params(final.backbone))
    assert all(p.requires_grad for p in final.parameters())  # handed back unfrozen


def test_alternating_steps_2_and_3_can_start_from_step1s_weights(tmp_path):
    # With a vanishing learning rate one step of step 2 hardly moves the weights, so its backbone
    # is still (close to) what it started from: step 1's with "step1", a fresh one with "fresh".
    for init in ("fresh", "step1"):
        model_cfg, data_cfg, train_cfg = tiny_configs(tmp_path / init, epochs=4, schedule="alternating",
                                                      alternating_init=init, lr=1e-9)
        trainer = Trainer(model_cfg, data_cfg, train_cfg, progress=False)
        seen = {}

        def check(record, trainer=trainer, seen=seen):
            if record["stage"] == "step2_fast_rcnn" and "backbone" not in seen:
                seen["backbone"] = all(torch.allclose(a, b, atol=1e-6) for a, b in zip(
                    _params(trainer.model.backbone), _params(trainer.rpn_model.backbone)))
            if record["stage"] == "step3_rpn" and "rpn" not in seen:  # and step 3's RPN layers
                seen["rpn"] = all(torch.allclose(a, b, atol=1e-6) for a, b in zip(
                    _params(trainer.model.rpn), _params(trainer.rpn_model.rpn)))

        trainer.callback = check
        trainer.run()
        assert seen["backbone"] == (init == "step1"), init
        assert seen["rpn"] == (init == "step1"), init


def test_rpn_schedule_trains_only_the_rpn(tmp_path):
    model_cfg, data_cfg, train_cfg = tiny_configs(tmp_path, epochs=1, schedule="rpn")
    torch.manual_seed(0)
    trainer = Trainer(model_cfg, data_cfg, train_cfg, progress=False)
    head_before = _params(trainer.model.roi_heads)
    backbone_before = _params(trainer.model.backbone)
    result = trainer.run()
    assert all(set(h) == {"step", "epoch", "stage", "lr", "total", *RPN_LOSSES} for h in result.history)
    assert _same(head_before, _params(result.model.roi_heads))
    assert not _same(backbone_before, _params(result.model.backbone))


def test_bad_settings_are_reported(tmp_path, monkeypatch):
    model_cfg, data_cfg, train_cfg = tiny_configs(tmp_path, amp="fp16")
    with pytest.raises(ValueError, match="amp='fp16' needs a CUDA device"):
        Trainer(model_cfg, data_cfg, train_cfg, progress=False)
    monkeypatch.setattr(devices, "native_bf16", lambda device: False)  # a CPU without AMX / AVX512-BF16
    model_cfg, data_cfg, train_cfg = tiny_configs(tmp_path, amp="bf16")
    with pytest.raises(ValueError, match="amp='bf16' needs CUDA or a CPU with native bfloat16"):
        Trainer(model_cfg, data_cfg, train_cfg, progress=False)
    model_cfg, data_cfg, train_cfg = tiny_configs(tmp_path)
    model_cfg.num_classes = 5
    with pytest.raises(ValueError, match="num_classes=5 .* 3 classes"):
        Trainer(model_cfg, data_cfg, train_cfg, progress=False)
    with pytest.raises(TypeError, match="train_cfg must be a TrainConfig"):
        Trainer(synthetic_model_config(), data_cfg, {"epochs": 1}, progress=False)


@pytest.mark.parametrize("native", [False, True])
def test_amp_auto_uses_bf16_only_where_the_cpu_has_it(tmp_path, monkeypatch, native):
    monkeypatch.setattr(devices, "native_bf16", lambda device: native)
    model_cfg, data_cfg, train_cfg = tiny_configs(tmp_path, amp="auto", max_iters=2)
    trainer = Trainer(model_cfg, data_cfg, train_cfg, progress=False)
    assert trainer.amp == ("bf16" if native else "off")
    seen = set()
    for module in trainer.model.backbone.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.register_forward_hook(lambda m, inputs, out: seen.add(out.dtype))
    result = trainer.run()
    assert result.iterations == 2 and all(math.isfinite(h["total"]) for h in result.history)
    # Under autocast the convolutions compute in bfloat16; without it, in float32.
    assert seen == {torch.bfloat16 if native else torch.float32}


def test_native_bf16_reads_the_cpu_flags(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    assert not devices.native_bf16("cpu") and devices.resolve_amp("auto", "cpu") == "off"
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert devices.native_bf16("cpu") and devices.resolve_amp("auto", "cpu") == "bf16"
    assert devices.resolve_amp("off", "cpu") == "off"
    assert not devices.native_bf16("meta")


def test_evaluate_reports_voc_coco_and_recall(tmp_path):
    from rpnlab.data import build_dataset

    model_cfg, data_cfg, train_cfg = tiny_configs(tmp_path, max_iters=2)
    result = train(model_cfg, data_cfg, train_cfg, progress=False)
    metrics = evaluate(result.model, build_dataset(data_cfg, "val"), batch_size=2)
    assert metrics["num_images"] == 4
    assert 0.0 <= metrics["map_50"] <= 1.0 or math.isnan(metrics["map_50"])
    assert 0.0 <= metrics["map"] <= 1.0
    assert set(metrics["ap_per_class"]) == {"rectangle", "ellipse", "triangle"}
    assert 0.0 <= metrics["recall_50"] <= 1.0
    assert metrics["proposal_recall"]["num_proposals"][-1] <= 20  # the test-time proposal count
    assert metrics["voc"]["map"] == metrics["map_50"]


def test_synthetic_train_config():
    cfg = synthetic_train_config(epochs=3)
    assert cfg.epochs == 3 and cfg.device == "auto"
    assert TrainConfig().epochs == 10  # the dataclass default is untouched
