"""Cost of the reliability guards, measured interleaved in one process (ratios, not wall times).

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_guards.py [cpu|cuda] [N]

Per training iteration (joint schedule, synthetic preset, batch 4): the gradient-norm guard
(``get_total_norm``, read in the iteration's one existing host sync) and the CPU target check;
per checkpoint: the finite/magnitude state check; per call: the value checks of ``nms`` and
``roi_align`` (CPU tensors; on an accelerator they run only with value checks switched on).
Each guard is timed right after the work it guards, alternating, so machine load hits both alike.
"""

from __future__ import annotations

import sys
import tempfile
import time

import torch

from rpnlab.config import DataConfig
from rpnlab.data import build_dataset, collate
from rpnlab.detector.checks import check_finite
from rpnlab.detector.model import FasterRCNN, synthetic_model_config
from rpnlab.detector.proposals import nms
from rpnlab.detector.roi import _check_rois, boxes_to_rois, roi_align
from rpnlab.engine.checkpoint import first_non_finite
from rpnlab.engine.train import Trainer, _move_batch


def main(device: str = "cpu", n: int = 30) -> None:
    dev = torch.device(device)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    torch.manual_seed(0)
    model = FasterRCNN.from_config(synthetic_model_config()).to(dev).train()
    with tempfile.TemporaryDirectory() as root:
        ds = build_dataset(DataConfig(root=root, num_train=16), "train")
        images, targets = collate([ds[i] for i in range(4)])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    holder = type("T", (), {"model_cfg": synthetic_model_config()})()
    t_iter = t_norm = t_tgt = 0.0
    for i in range(n + 3):
        a = time.perf_counter()
        im, tg = _move_batch(images, targets, dev)
        losses = model(im, tg)
        total = sum(losses.values())
        opt.zero_grad()
        total.backward()
        torch.stack([v.detach() for v in losses.values()]).tolist()
        opt.step()
        sync()
        b = time.perf_counter()
        torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]).float()
        sync()
        c = time.perf_counter()
        Trainer._check_targets(holder, targets)
        d = time.perf_counter()
        if i >= 3:  # warm-up iterations excluded
            t_iter, t_norm, t_tgt = t_iter + b - a, t_norm + c - b, t_tgt + d - c
    print(f"device {dev}: iteration {1e3 * t_iter / n:.1f} ms; gradient-norm guard {1e3 * t_norm / n:.3f} ms "
          f"({100 * t_norm / t_iter:.2f}%); target check {1e3 * t_tgt / n:.3f} ms ({100 * t_tgt / t_iter:.2f}%)")

    a = time.perf_counter()
    for _ in range(10):
        first_non_finite(model.state_dict(), "model")
        first_non_finite(opt.state_dict()["state"], "optimizer")
        [float(p.detach().abs().max()) for p in model.parameters()]
    sync()
    t_state = (time.perf_counter() - a) / 10
    print(f"  state check before a save: {1e3 * t_state:.2f} ms = {t_state / (t_iter / n):.2f} iterations "
          "(once per checkpoint)")

    for count in (1000, 4000):
        boxes = torch.rand(count, 4, device=dev) * 100
        boxes[:, 2:] += boxes[:, :2]
        scores = torch.rand(count, device=dev)
        tn = tc = 0.0
        for _ in range(5):
            a = time.perf_counter()
            nms(boxes, scores, 0.7)
            sync()
            b = time.perf_counter()
            check_finite(boxes, "boxes")
            check_finite(scores, "scores")
            sync()
            c = time.perf_counter()
            tn, tc = tn + b - a, tc + c - b
        print(f"  nms N={count}: value checks {1e3 * tc / 5:.3f} ms of {1e3 * tn / 5:.1f} ms ({100 * tc / tn:.2f}%)")

    feat = torch.rand(2, 64, 32, 32, device=dev)
    boxes = [torch.tensor([[0.0, 0, 100, 100]], device=dev).repeat(256, 1) for _ in range(2)]
    ta = tc = 0.0
    for _ in range(5):
        a = time.perf_counter()
        roi_align(feat, boxes, 7, 1 / 16, 2)
        sync()
        b = time.perf_counter()
        _check_rois(boxes_to_rois(boxes), 2)
        sync()
        c = time.perf_counter()
        ta, tc = ta + b - a, tc + c - b
    print(f"  roi_align 512 RoIs: value checks {1e3 * tc / 5:.3f} ms of {1e3 * ta / 5:.1f} ms ({100 * tc / ta:.2f}%)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "cpu", int(sys.argv[2]) if len(sys.argv) > 2 else 30)
