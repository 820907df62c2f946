"""Train rpnlab's default CPU detector and torchvision's smallest Faster R-CNN on the same data
for the same wall-clock budget, then compare mAP on the synthetic validation split.

    python benchmarks/bench_detector.py                  # 10 minutes each, on the CPU
    python benchmarks/bench_detector.py --minutes 5 --only rpnlab            # the preset's 5-minute target
    python benchmarks/bench_detector.py --minutes 15 --only rpnlab --curve 1,2,3,5,10   # its learning curve
    python benchmarks/bench_detector.py --minutes 15 --only rpnlab --min-size 128       # the course's 128 px images
    python benchmarks/bench_detector.py --device cuda --minutes 5 --json bench.json

Both detectors start from random weights (no pretrained backbone), see the same training images
in the same augmentation (the preset's data, ``synthetic_data_config()``: the shapes upsampled
to 192 px, horizontal and vertical flips, a colour jitter), and are
scored by the same code (``rpnlab.engine.evaluation``). Both follow the same learning-rate schedule: a
linear warm-up over 50 iterations, then a cosine that runs on the wall clock and reaches 0 as the
budget ends (see ``ClockCosine``), so no iteration count has to be guessed in advance.

``--curve M1,M2,...`` also scores rpnlab's detector on the validation split when its training
clock passes each of those minutes, and prints the learning curve (mAP@0.5 against training
minutes, iterations and images). The clock stops while it evaluates, so the budget and the
learning-rate schedule see training time only; an intermediate point is a model in the middle of
its schedule (learning rate not yet decayed), so it is a lower bound on what a run *ending* at
that minute reaches.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import tempfile
import time
from pathlib import Path

import torch

from rpnlab.config import DataConfig
from rpnlab.data import build_dataset
from rpnlab.engine.devices import describe_environment, resolve_device, seed_everything
from rpnlab.engine.evaluation import evaluate_coco, evaluate_voc
from rpnlab.engine.presets import synthetic_data_config, synthetic_detector_config
from rpnlab.engine.train import Trainer, evaluate, lr_factor, synthetic_train_config

WARMUP_ITERS = 50
MAX_EPOCHS = 10_000  # the clock, not the epoch count, ends a benchmark run


class TrainClock:
    """Seconds of training since the first call of ``elapsed``, less the time spent in ``paused()``.

    ``cpu_s()``: the process's CPU seconds over the same span (all threads), less those spent
    paused: with the iteration count, a cost per iteration that the load of other processes
    changes far less than the wall time.
    """

    def __init__(self):
        self.start, self.paused_s = None, 0.0
        self.cpu_start, self.paused_cpu_s = None, 0.0

    def cpu_s(self) -> float:
        return time.process_time() - self.cpu_start - self.paused_cpu_s if self.cpu_start is not None else 0.0

    def elapsed(self) -> float:
        if self.start is None:
            self.start, self.cpu_start = time.perf_counter(), time.process_time()
        return time.perf_counter() - self.start - self.paused_s

    @contextlib.contextmanager
    def paused(self):
        begin, begin_cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.paused_s += time.perf_counter() - begin
            self.paused_cpu_s += time.process_time() - begin_cpu


class ClockCosine:
    """Learning-rate factor: linear warm-up over iterations, then a cosine over *wall-clock* time.

    A fixed iteration count cannot be planned for a time budget on a machine whose speed varies
    (shared cores, thermal limits); following the clock, the rate reaches 0 as the budget ends
    however many iterations fit. (``rpnlab.engine.train`` itself schedules by iteration, reproducibly.)
    """

    def __init__(self, budget_s: float, warmup_iters: int = WARMUP_ITERS, clock: TrainClock | None = None):
        self.budget_s, self.warmup_iters = budget_s, warmup_iters
        self.clock = clock or TrainClock()

    def __call__(self, step: int) -> float:
        progress = min(1.0, self.clock.elapsed() / self.budget_s)
        warmup = lr_factor(step, 1, self.warmup_iters, schedule="step")  # the warm-up alone
        return warmup * 0.5 * (1 + math.cos(math.pi * progress))


# --------------------------------------------------------------------------------- rpnlab


class _ClockTrainer(Trainer):
    """``rpnlab.engine.train.Trainer`` with its LR schedule swapped for ``ClockCosine`` on ``clock``."""

    def __init__(self, *args, budget_s: float, clock: TrainClock, **kwargs):
        super().__init__(*args, **kwargs)
        self.budget_s, self.clock = budget_s, clock

    def _prepare_stage(self, index):
        stage, net, wrapped, optimizer, scheduler, scaler = super()._prepare_stage(index)
        schedule = ClockCosine(self.budget_s, clock=self.clock)
        scheduler.lr_lambdas = [schedule] * len(optimizer.param_groups)
        for group, base_lr in zip(optimizer.param_groups, scheduler.base_lrs):
            group["lr"] = base_lr * schedule(0)
        return stage, net, wrapped, optimizer, scheduler, scaler


def bench_rpnlab(data_cfg: DataConfig, budget_s: float, device: str, out_dir: Path, progress: bool,
                 curve_minutes: list[float] = (), seed: int = 0) -> dict:
    """Train the synthetic preset for ``budget_s`` seconds of training, score it on the val split.

    ``curve_minutes``: also score it whenever the training clock passes one of these minutes
    (the clock stops meanwhile) -> ``"curve"``, one row per point, the final one included.
    """
    from rpnlab.engine.train import _train_mode

    model_cfg = synthetic_detector_config(data_cfg)
    train_cfg = synthetic_train_config(device=device, out_dir=str(out_dir / "rpnlab"), epochs=MAX_EPOCHS,
                                       warmup_iters=WARMUP_ITERS, seed=seed, checkpoint_every=MAX_EPOCHS)
    dataset, val = build_dataset(data_cfg, "train"), build_dataset(data_cfg, "val")
    clock = TrainClock()
    pending = sorted(60.0 * m for m in curve_minutes if 0 < 60.0 * m < budget_s)
    curve: list[dict] = []
    state = {"iterations": 0}
    trainer: _ClockTrainer

    def point(model, seconds: float) -> dict:
        metrics = evaluate(model, val, batch_size=16)
        row = {"minutes": seconds / 60, "iterations": state["iterations"],
               "images": state["iterations"] * train_cfg.batch_size, "map_50": metrics["map_50"],
               "map": metrics["map"], "recall_70": metrics["recall_70"]}
        if curve_minutes:
            print(f"  curve: {row['minutes']:5.2f} min  {row['iterations']:6d} it  mAP@0.5 {row['map_50']:.3f}  "
                  f"mAP {row['map']:.3f}", flush=True)
        return row

    def callback(record: dict):
        state["iterations"] += 1
        elapsed = clock.elapsed()
        if elapsed >= budget_s:
            return False
        if pending and elapsed >= pending[0]:
            pending.pop(0)
            with clock.paused():
                curve.append(point(trainer.model, elapsed))
                _train_mode(trainer.model)  # evaluate() left it in eval mode
        return True

    trainer = _ClockTrainer(model_cfg, data_cfg, train_cfg, progress=progress, train_dataset=dataset,
                            budget_s=budget_s, clock=clock, callback=callback)
    clock.elapsed()  # start the clock
    result = trainer.run()
    train_s, cpu_s = clock.elapsed(), clock.cpu_s()
    # The thread count the Trainer trained with (it sets its own: RPNLAB_THREADS, else the load).
    threads = trainer.cpu_threads or torch.get_num_threads()
    final = point(result.model, train_s)
    curve.append(final)
    return {
        "name": "rpnlab (synthetic preset)",
        "map_50": final["map_50"],
        "map": final["map"],
        "iterations": result.iterations,
        "images_per_s": result.images / train_s,
        "train_s": train_s,
        "threads": threads,
        "amp": trainer.amp,
        "cpu_ms_per_iteration": 1000 * cpu_s / max(result.iterations, 1),
        "stop_reason": "time_budget" if result.stop_reason == "callback" else result.stop_reason,
        "parameters": sum(p.numel() for p in result.model.parameters()),
        "curve": curve,
    }


# --------------------------------------------------------------------------------- torchvision


def _torchvision_model(num_classes: int):
    from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_320_fpn

    return fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None, num_classes=num_classes + 1)


def _tv_batches(dataset, batch_size: int, seed: int, device: torch.device):
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    for start in range(0, len(order), batch_size):
        samples = [dataset[i] for i in order[start:start + batch_size]]
        images = [img.to(device) for img, _ in samples]
        targets = [{"boxes": t["boxes"].to(device), "labels": t["labels"].to(device)} for _, t in samples]
        yield images, targets


def bench_torchvision(data_cfg: DataConfig, budget_s: float, device: torch.device, batch_size: int,
                      lr: float, progress: bool) -> dict:
    dataset = build_dataset(data_cfg, "train")
    num_classes = dataset.num_classes

    def make():
        seed_everything(0)
        model = _torchvision_model(num_classes).to(device).train()
        params = [p for p in model.parameters() if p.requires_grad]
        return model, torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-4)

    def step(model, optimizer, images, targets, lr_now):
        for group in optimizer.param_groups:
            group["lr"] = lr_now
        losses = model(images, targets)
        total = sum(losses.values())
        if not torch.isfinite(total):
            raise RuntimeError(f"torchvision model: non-finite loss {({k: float(v) for k, v in losses.items()})}")
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()

    model, optimizer = make()
    schedule = ClockCosine(budget_s)
    schedule.clock.elapsed()  # start the clock
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(desc="torchvision", unit="it", dynamic_ncols=True)
    start, it, epoch = time.perf_counter(), 0, 0
    while time.perf_counter() - start < budget_s:
        for images, targets in _tv_batches(dataset, batch_size, epoch, device):
            step(model, optimizer, images, targets, lr * schedule(it))
            it += 1
            if bar is not None:
                bar.update(1)
            if time.perf_counter() - start >= budget_s:
                break
        epoch += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if bar is not None:
        bar.close()

    model.eval()
    val = build_dataset(data_cfg, "val")
    detections, ground_truth = [], []
    with torch.no_grad():
        for i in range(0, len(val), 16):
            samples = [val[j] for j in range(i, min(i + 16, len(val)))]
            out = model([img.to(device) for img, _ in samples])
            detections += [{k: v.cpu() for k, v in d.items()} for d in out]
            ground_truth += [t for _, t in samples]
    voc = evaluate_voc(detections, ground_truth, num_classes)
    coco = evaluate_coco(detections, ground_truth, num_classes)
    return {
        "name": "torchvision fasterrcnn_mobilenet_v3_large_320_fpn",
        "map_50": voc["map"],
        "map": coco["map"],
        "iterations": it,
        "images_per_s": it * batch_size / seconds,
        "train_s": seconds,
        "threads": torch.get_num_threads(),
        "stop_reason": "time_budget",
        "parameters": sum(p.numel() for p in model.parameters()),
    }


# --------------------------------------------------------------------------------- report


def table(rows: list[dict]) -> str:
    lines = [
        "| detector | mAP@0.5 | mAP@[.5:.95] | iterations | images/s | training s | threads | amp | CPU ms/it | parameters |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        cpu = f"{r['cpu_ms_per_iteration']:.0f}" if "cpu_ms_per_iteration" in r else "-"
        lines.append(
            f"| {r['name']} | {100 * r['map_50']:.1f} | {100 * r['map']:.1f} | {r['iterations']} | "
            f"{r['images_per_s']:.1f} | {r['train_s']:.0f} | {r.get('threads', '-')} | {r.get('amp', 'off')} | {cpu} | "
            f"{r['parameters'] / 1e6:.2f}M |"
        )
    return "\n".join(lines)


def curve_table(rows: list[dict]) -> str:
    """The learning curve: one row per evaluation during a run."""
    lines = ["| training min | iterations | images | mAP@0.5 | mAP@[.5:.95] | recall@0.7 |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['minutes']:.2f} | {r['iterations']} | {r['images']} | {100 * r['map_50']:.1f} | "
                     f"{100 * r['map']:.1f} | {100 * r['recall_70']:.1f} |")
    return "\n".join(lines)


def _minutes_list(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--curve {text!r}: expected minutes separated by commas, e.g. 1,2,5")
    if not values or any(not (v > 0 and math.isfinite(v)) for v in values):
        raise argparse.ArgumentTypeError(f"--curve {text!r}: expected positive minutes, e.g. 1,2,5")
    return values


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="training budget per detector")
    parser.add_argument("--device", default="cpu", help="'cpu', 'cuda', 'cuda:N', 'mps' or 'auto'")
    parser.add_argument("--only", choices=("rpnlab", "torchvision"), default=None, help="run one detector")
    parser.add_argument("--num-train", type=int, default=600, help="synthetic training images")
    parser.add_argument("--num-val", type=int, default=150, help="synthetic validation images")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--min-size", type=int, default=None,
                        help="resize the images' shorter side to this (default: the preset's); rpnlab's anchors scale with it")
    parser.add_argument("--tv-batch-size", type=int, default=8, help="torchvision model's batch size")
    parser.add_argument("--tv-lr", type=float, default=0.02, help="torchvision model's base learning rate")
    parser.add_argument("--curve", type=_minutes_list, default=[], metavar="M1,M2,...",
                        help="rpnlab only: also evaluate when training passes these minutes, print the learning curve")
    parser.add_argument("--seed", type=int, default=0, help="rpnlab's training seed")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
        # The Trainer would otherwise pick its own count from the load average, which lags by
        # minutes (after a busy spell it chose 1 thread on an idle machine).
        os.environ["RPNLAB_THREADS"] = str(args.threads)
    device = resolve_device(args.device)
    env = describe_environment(device)
    print(f"device {env['device']} ({env['device_name']}), torch {env['torch']}, {env['cpu_threads']} threads; "
          f"budget {args.minutes:g} min per detector", flush=True)
    data_cfg = synthetic_data_config(num_train=args.num_train, num_val=args.num_val)
    if args.min_size is not None:
        if args.min_size < 32:
            parser.error(f"--min-size {args.min_size}: expected at least 32 px")
        data_cfg.min_size, data_cfg.max_size = args.min_size, 2 * args.min_size
    budget_s = 60.0 * args.minutes
    rows = []
    with tempfile.TemporaryDirectory(prefix="rpnlab-bench-") as tmp:
        if args.only in (None, "rpnlab"):
            rows.append(bench_rpnlab(data_cfg, budget_s, str(device), Path(tmp), not args.no_progress,
                                     curve_minutes=args.curve, seed=args.seed))
            print(table(rows[-1:]), flush=True)
            if args.curve:
                print("\nlearning curve of rpnlab's preset (one run; the clock stops while it evaluates):")
                print(curve_table(rows[-1]["curve"]), flush=True)
        if args.only in (None, "torchvision"):
            rows.append(bench_torchvision(data_cfg, budget_s, device, args.tv_batch_size, args.tv_lr,
                                          not args.no_progress))
            print(table(rows[-1:]), flush=True)
    print()
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"environment": env, "minutes": args.minutes, "results": rows},
                                              indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
