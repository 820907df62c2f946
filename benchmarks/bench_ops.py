"""rpnlab's operations side by side with torchvision's, in one process: ``make bench``.

    python benchmarks/bench_ops.py                        # every table, CPU, into runs/bench/
    python benchmarks/bench_ops.py --quick                # fewer repeats and sizes (a smoke run)
    python benchmarks/bench_ops.py --device cuda --amp    # on a GPU (and an autocast row)
    python benchmarks/bench_ops.py --markdown docs/results/bench_cpu.md

Each measure runs rpnlab's fast path, torchvision's equivalent and (where there is one) rpnlab's
per-image teaching version on the same inputs, interleaved (A, B, C, A, B, C, ...) so that a change
in machine load hits all of them alike, and reports medians. On a CPU the time is the thread's CPU
time (``time.thread_time``) with torch on ``--threads`` threads (default 1), which does not count
the time the process waits while other processes use the cores; the wall-clock medians are kept in
the CSV/JSON too. On CUDA it is the wall clock around a synchronised call.

``speedup`` is torchvision's median over rpnlab's (above 1: rpnlab is faster). ``identical`` says
whether the results agree: exactly for labels and matched boxes, within float rounding for boxes,
pooled values and gradients, and in counts for the samplers (their random draws differ by design).

The whole-detector training benchmark (mAP after a time budget) is ``benchmarks/bench_detector.py``
(``make bench-detector``).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path

import torch
import torchvision
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler
from torchvision.models.detection.rpn import RegionProposalNetwork as TVRegionProposalNetwork

from rpnlab.config import AnchorConfig
from rpnlab.detector.anchors import AnchorGenerator
from rpnlab.detector.boxes import BoxCoder
from rpnlab.detector.matching import BalancedSampler, Matcher, label_anchors_batch
from rpnlab.detector.proposals import ProposalLayer
from rpnlab.detector.roi import RoIPooler, roi_align, roi_pool
from rpnlab.detector.targets import label_anchors_batched

IMAGE = (600, 1000)  # the paper's scale: 38 x 63 locations at stride 16, 9 anchors each: 21.5k


# ------------------------------------------------------------------------------------ timing


class Clock:
    """Interleaved medians of several callables on one device."""

    def __init__(self, device: torch.device, repeats: int, warmup: int = 1):
        self.device, self.repeats, self.warmup = device, repeats, warmup
        # One torch thread: this thread's CPU time. More: the process's (all threads' CPU time).
        self.cpu_time = time.thread_time if torch.get_num_threads() == 1 else time.process_time

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def run(self, fns: dict) -> dict:
        """``{name: fn}`` -> ``{name: {"ms": median, "wall_ms": median wall}}``."""
        cpu = {k: [] for k in fns}
        wall = {k: [] for k in fns}
        for r in range(self.warmup + self.repeats):
            for name, fn in fns.items():
                self._sync()
                t_cpu, t_wall = self.cpu_time(), time.perf_counter()
                fn()
                self._sync()
                if r >= self.warmup:
                    cpu[name].append(self.cpu_time() - t_cpu)
                    wall[name].append(time.perf_counter() - t_wall)
        out = {}
        for name in fns:
            w = statistics.median(wall[name]) * 1e3
            # On a GPU the host thread mostly waits: the wall clock is the measure there.
            c = w if self.device.type == "cuda" else statistics.median(cpu[name]) * 1e3
            out[name] = {"ms": c, "wall_ms": w}
        return out


def environment(args, device) -> dict:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    env = {
        "date": datetime.now().isoformat(timespec="seconds"),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "load_avg_1_5_15": [round(v, 2) for v in load],
        "timer": "wall clock, synchronised" if device.type == "cuda" else (
            "thread CPU time" if torch.get_num_threads() == 1 else "process CPU time (all threads)"),
        "repeats": args.repeats,
        "amp": bool(args.amp),
    }
    return env


# ------------------------------------------------------------------------------------ inputs


def random_gt(num_images: int, num_boxes: int, g: torch.Generator, device) -> list[torch.Tensor]:
    h, w = IMAGE
    out = []
    for _ in range(num_images):
        xy = torch.rand(num_boxes, 2, generator=g) * torch.tensor([w - 100.0, h - 100.0])
        wh = torch.rand(num_boxes, 2, generator=g) * 300 + 20
        out.append(torch.cat([xy, (xy + wh).minimum(torch.tensor([float(w), float(h)]))], 1).to(device))
    return out


def paper_anchors(device) -> tuple[torch.Tensor, tuple[int, int]]:
    fh, fw = -(-IMAGE[0] // 16), -(-IMAGE[1] // 16)
    return AnchorGenerator.from_config(AnchorConfig())([(fh, fw)], device=device), (fh, fw)


def torchvision_rpn(pre_nms: tuple[int, int], post_nms: tuple[int, int]) -> TVRegionProposalNetwork:
    return TVRegionProposalNetwork(
        None, None, 0.7, 0.3, 256, 0.5,
        {"training": pre_nms[0], "testing": pre_nms[1]}, {"training": post_nms[0], "testing": post_nms[1]}, 0.7,
    )


# ------------------------------------------------------------------------------------ measures


def bench_anchor_targets(clock: Clock, device, quick: bool) -> list[dict]:
    anchors, grid = paper_anchors(device)
    tv = torchvision_rpn((2000, 1000), (2000, 1000))
    coder, matcher = BoxCoder(), Matcher()
    sizes = [(1, 3), (8, 3), (32, 3), (8, 50), (32, 50), (1, 500)]
    if quick:
        sizes = [(1, 3), (8, 3), (8, 50)]
    return [_one_targets(clock, anchors, grid, b, g, tv, coder, matcher, device, quick) for b, g in sizes]


def _one_targets(clock, anchors, grid, b, g, tv, coder, matcher, device, quick) -> dict:
    gts = random_gt(b, g, torch.Generator().manual_seed(b * 1000 + g), device)
    targets = [{"boxes": x} for x in gts]

    def ours():
        labels, matched = label_anchors_batched(anchors, gts, matcher, grid=grid)
        return labels, matched, coder.encode(anchors, matched)

    def teaching():
        labels, matched = label_anchors_batch(anchors, gts, matcher)
        return labels, matched, coder.encode(anchors, matched)

    def tvf():
        labels, matched = tv.assign_targets_to_anchors([anchors] * b, targets)
        return labels, matched, tv.box_coder.encode(matched, [anchors] * b)

    a, t, r = ours(), teaching(), tvf()
    same = all(
        torch.equal(a[0][i], r[0][i]) and torch.equal(a[1][i], r[1][i]) for i in range(b)
    ) and torch.equal(a[0], t[0]) and torch.equal(a[1], t[1])
    pos = a[0] == 1
    same = same and torch.allclose(a[2][pos], torch.cat(r[2]).view(b, -1, 4)[pos], atol=1e-5)
    fns = {"rpnlab": ours, "torchvision": tvf}
    if not (quick and b * g > 100):
        fns["teaching"] = teaching
    times = clock.run(fns)
    return _row("anchor targets (labels, matched, encode)", f"B={b} G={g} A={anchors.shape[0]}", times, same)


def bench_sampling(clock: Clock, device, quick: bool) -> list[dict]:
    anchors, _ = paper_anchors(device)
    return [_one_sampling(clock, anchors, b, device) for b in ([8] if quick else [1, 8, 32])]


def _one_sampling(clock, anchors, b, device) -> dict:
    labels, _ = label_anchors_batched(anchors, random_gt(b, 5, torch.Generator().manual_seed(b), device), Matcher())
    ours = BalancedSampler(256, 0.5, draw="keys")
    teaching = BalancedSampler(256, 0.5)
    tv = BalancedPositiveNegativeSampler(256, 0.5)
    label_list = list(labels)
    tv_labels = [lab.to(torch.int64) for lab in labels]
    pos, neg = ours.sample_batch(labels)
    tpos, tneg = tv(tv_labels)
    same = all(
        int(pos[i].sum()) == int(tpos[i].sum()) and int(neg[i].sum()) == int(tneg[i].sum()) for i in range(b)
    )
    times = clock.run({
        "rpnlab": lambda: ours.sample_batch(labels),
        "torchvision": lambda: tv(tv_labels),
        "teaching": lambda: teaching(label_list),
    })
    return _row("anchor sampling (256, half positive)", f"B={b} A={anchors.shape[0]}", times, same, "counts")


def bench_proposals(clock: Clock, device, quick: bool) -> list[dict]:
    anchors, _ = paper_anchors(device)
    return [
        _one_proposals(clock, anchors, b, train, device)
        for train in (False, True)
        for b in ([8] if quick else [1, 8])
    ]


def _one_proposals(clock, anchors, b, train, device) -> dict:
    pre, post = (12000, 6000), (2000, 300)
    g = torch.Generator().manual_seed(b)
    logits = torch.randn(b, anchors.shape[0], generator=g).to(device)
    deltas = (torch.randn(b, anchors.shape[0], 4, generator=g) * 0.1).to(device)
    sizes = [IMAGE] * b
    ours = ProposalLayer(pre, post).to(device).train(train)
    tv = torchvision_rpn(pre, post).train(train)

    def tvf():
        boxes = tv.box_coder.decode(deltas, [anchors] * b).view(b, -1, 4)
        return tv.filter_proposals(boxes, logits.reshape(-1, 1), sizes, [anchors.shape[0]])

    a, r = ours(anchors, logits, deltas, sizes), tvf()
    # torchvision's NMS may order equal scores either way: the same scores, the same set of boxes
    same = all(
        x.shape == y.shape and torch.equal(sx, sy)
        and torch.allclose(torch.unique(x, dim=0), torch.unique(y, dim=0), atol=1e-4)
        for x, y, sx, sy in zip(a[0], r[0], a[1], r[1])
    )
    times = clock.run({"rpnlab": lambda: ours(anchors, logits, deltas, sizes), "torchvision": tvf})
    phase, n = ("train", pre[0]) if train else ("test", pre[1])
    return _row(f"proposal layer ({phase}: top {n}, NMS 0.7)", f"B={b} A={anchors.shape[0]}", times, same,
                "values, ties in any order")


def bench_roi(clock: Clock, device, quick: bool) -> list[dict]:
    rows = [row for k in ([128] if quick else [128, 512]) for row in _one_roi(clock, device, k)]
    return rows + [_fpn_roi(clock, device, 256 if quick else 1024)]


def _fpn_roi(clock: Clock, device, k: int) -> dict:
    """RoI Align over ResNet-50 FPN's four levels at 576 x 1024, forward + backward, as the
    detector's box head uses it: ``RoIPooler(implementation="auto")`` (on the CPU rpnlab's
    matrix and sparse forms) against torchvision's ``MultiScaleRoIAlign``."""
    from collections import OrderedDict

    from torchvision.ops import MultiScaleRoIAlign

    g = torch.Generator().manual_seed(0)
    n, c, (h, w) = 2, 256, (576, 1024)
    levels = [torch.randn(n, c, h // s, w // s, generator=g).to(device) for s in (4, 8, 16, 32)]
    xy = torch.rand(k, 2, generator=g) * torch.tensor([w - 40.0, h - 40.0])
    wh = torch.exp(torch.rand(k, 2, generator=g) * math.log(400 / 16)) * 16  # 16-400 px, log-uniform
    boxes = torch.cat([xy, torch.minimum(xy + wh, torch.tensor([w, h]))], 1).to(device)
    proposals = list(boxes.chunk(n))
    grad = torch.randn(k, c, 7, 7, generator=g).to(device)
    ours = RoIPooler(7, (1 / 4, 1 / 8, 1 / 16, 1 / 32), sampling_ratio=2, implementation="auto")
    names = ["p2", "p3", "p4", "p5"]
    tv = MultiScaleRoIAlign(names, 7, 2)

    def run(fn):
        xs = [x.detach().requires_grad_(True) for x in levels]
        out = fn(xs)
        out.backward(grad)
        return out.detach(), [x.grad for x in xs]

    def run_ours():
        return run(lambda xs: ours(xs, proposals))

    def run_tv():
        return run(lambda xs: tv(OrderedDict(zip(names, xs)), proposals, [(h, w)] * n))

    a, r = run_ours(), run_tv()
    same = torch.allclose(a[0], r[0], atol=1e-4) and all(torch.allclose(x, y, atol=1e-3) for x, y in zip(a[1], r[1]))
    times = clock.run({"rpnlab": run_ours, "torchvision": run_tv})
    return _row("FPN RoI Align forward + backward (RoIPooler auto)", f"K={k} C={c} {h}x{w} P2-P5 7x7", times, same,
                "vs MultiScaleRoIAlign")


def _one_roi(clock: Clock, device, k: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    n, c = 2, 256
    features = torch.randn(n, c, 38, 63, generator=g).to(device)
    xy = torch.rand(k, 2, generator=g) * torch.tensor([900.0, 500.0])
    wh = torch.rand(k, 2, generator=g) * 300 + 16
    rois = torch.cat([torch.randint(0, n, (k, 1), generator=g).float(), xy, xy + wh], 1).to(device)
    grad = torch.randn(k, c, 7, 7, generator=g).to(device)
    rows = []
    for name, ours_fn, tv_fn, kwargs in (
        ("roi_pool", roi_pool, torchvision.ops.roi_pool, {}),
        ("roi_align", roi_align, torchvision.ops.roi_align, {"sampling_ratio": 2, "aligned": True}),
    ):
        def run(fn, kwargs=kwargs):
            x = features.detach().requires_grad_(True)
            out = fn(x, rois, (7, 7), 1 / 16, **kwargs)
            out.backward(grad)
            return out.detach(), x.grad

        a, r = run(ours_fn), run(tv_fn)
        same = torch.allclose(a[0], r[0], atol=1e-4) and torch.allclose(a[1], r[1], atol=1e-4)
        times = clock.run({"rpnlab": lambda f=ours_fn: run(f), "torchvision": lambda f=tv_fn: run(f)})
        rows.append(_row(f"{name} forward + backward (plain PyTorch)", f"K={k} C={c} 38x63 7x7", times, same))
    return rows


def bench_detector(clock: Clock, device, quick: bool) -> list[dict]:
    """The whole detector, training step and inference, with torchvision's own weights.

    rpnlab's model is ``FasterRCNN.from_torchvision(tv)``: the same backbone, FPN and head
    weights, rpnlab's anchors, RPN targets, proposal layer, RoI pooling and post-processing.
    Image sides are multiples of 64 so both compute the same anchors (``torchvision_models``'
    docstring); torchvision's transform is set to scale 1 (no resampling). Inference is checked to
    give the same detections; a training step cannot give the same losses (the samplers draw
    different anchors and RoIs), so there the check is that both losses are finite.
    """
    settings = [("fasterrcnn_mobilenet_v3_large_320_fpn", 320, 320, 2)]
    if not quick:
        settings.append(("fasterrcnn_resnet50_fpn", 576, 1024, 2))  # the paper's ~600 x 1000 scale
    # These steps take seconds each: a few interleaved repeats give a stable median.
    few = Clock(device, min(clock.repeats, 3 if quick else 5), warmup=1)
    return [row for setting in settings for row in _one_detector(few, device, *setting)]


def _one_detector(clock: Clock, device, name: str, h: int, w: int, b: int) -> list[dict]:
    from rpnlab.detector.model import FasterRCNN
    from rpnlab.detector.torchvision_models import torchvision_detector

    torch.manual_seed(0)
    tv = torchvision_detector(name, num_classes=5).to(device)
    tv.transform.min_size, tv.transform.max_size = (min(h, w),), max(h, w)
    ours = FasterRCNN.from_torchvision(tv).to(device)
    g = torch.Generator().manual_seed(1)
    base = torch.rand(b, 3, h // 16, w // 16, generator=g)
    images = [torch.nn.functional.interpolate(x[None], size=(h, w), mode="bilinear")[0].to(device) for x in base]
    targets = [
        {"boxes": gt, "labels": torch.randint(1, 5, (len(gt),), generator=g).to(device)}
        for gt in random_gt(b, 5, g, device)
    ]
    for t in targets:
        t["boxes"] = t["boxes"] * torch.tensor([w / IMAGE[1], h / IMAGE[0]] * 2, device=device)

    def train_step(model):
        model.train()
        losses = model(images, targets)
        total = sum(losses.values())
        total.backward()
        model.zero_grad(set_to_none=True)
        return float(total.detach())

    def infer(model):
        model.eval()
        with torch.no_grad():
            return model(images)

    # The same model with torchvision's RoI Align kernel: rpnlab's default (RoIConfig.implementation
    # "auto") pools on the CPU in its matrix form (small maps) or sparse form (large ones).
    ours_kernels = FasterRCNN.from_torchvision(tv).to(device)
    for module in ours_kernels.modules():
        if isinstance(module, RoIPooler):
            module.implementation = "torchvision"

    rows = []
    same = all(torch.isfinite(torch.tensor(train_step(m))) for m in (ours, ours_kernels, tv))
    times = clock.run({"rpnlab": lambda: train_step(ours), "torchvision": lambda: train_step(tv),
                       "rpnlab_kernels": lambda: train_step(ours_kernels)})
    default = {"rpnlab": times["rpnlab"], "torchvision": times["torchvision"]}
    rows.append(_row(f"whole training step ({name})", f"B={b} {h}x{w}", default, same, "same weights; losses finite"))
    kernels = {"rpnlab": times["rpnlab_kernels"], "torchvision": times["torchvision"]}
    rows.append(_row(f"whole training step ({name}), torchvision's RoI Align kernel", f"B={b} {h}x{w}", kernels,
                     same, "same weights; losses finite"))
    a, r = infer(ours), infer(tv)
    same = all(
        x["boxes"].shape == y["boxes"].shape and torch.allclose(x["boxes"], y["boxes"], atol=1e-3)
        and torch.equal(x["labels"], y["labels"])
        for x, y in zip(a, r)
    )
    times = clock.run({"rpnlab": lambda: infer(ours), "torchvision": lambda: infer(tv)})
    rows.append(_row(f"inference ({name})", f"B={b} {h}x{w}", times, same, "same detections"))
    return rows


def bench_amp(clock: Clock, device, quick: bool) -> list[dict]:
    """The RPN head + loss under autocast, against the same in float32 (rpnlab only)."""
    from rpnlab.config import RPNConfig
    from rpnlab.detector.rpn import RegionProposalNetwork

    anchors_cfg = AnchorConfig()
    rpn = RegionProposalNetwork.from_config(anchors_cfg, RPNConfig(), 256).to(device).train()
    b = 2 if quick else 8
    features = [torch.randn(b, 256, 38, 63, device=device)]
    targets = [{"boxes": x} for x in random_gt(b, 5, torch.Generator().manual_seed(0), device)]
    sizes = [IMAGE] * b
    dtype = torch.bfloat16 if device.type == "cpu" else torch.float16

    def step(amp):
        with torch.autocast(device.type, dtype=dtype, enabled=amp):
            out = rpn(features, sizes, targets)
        sum(out.losses.values()).backward()

    times = clock.run({"rpnlab": lambda: step(True), "torchvision": lambda: step(False)})
    row = _row(f"rpnlab RPN train step, autocast {dtype} (torchvision column: the same in float32)",
               f"B={b} 38x63 C=256", times, True)
    row["note"] = "'torchvision' column here: the same rpnlab step in float32"
    return [row]


def _row(measure, setting, times, same, check="values") -> dict:
    row = {"measure": measure, "setting": setting, "identical": bool(same), "check": check}
    for name, t in times.items():
        row[f"{name}_ms"] = round(t["ms"], 3)
        row[f"{name}_wall_ms"] = round(t["wall_ms"], 3)
    row["speedup"] = round(times["torchvision"]["ms"] / times["rpnlab"]["ms"], 3)
    return row


# ------------------------------------------------------------------------------------ output

TABLES = {
    "targets": bench_anchor_targets,
    "sampling": bench_sampling,
    "proposals": bench_proposals,
    "roi": bench_roi,
    "detector": bench_detector,
}


def markdown(env: dict, rows: list[dict], command: str) -> str:
    lines = [
        "# rpnlab vs torchvision, operation by operation",
        "",
        f"Command: `{command}`  ",
        (
            f"Device: {env['device']} ({env['device_name']}, {env['cpu_count']} CPUs), torch {env['torch']}, "
            f"torchvision {env['torchvision']}, Python {env['python']}, torch threads {env['torch_threads']}  "
        ),
        (
            f"Timer: {env['timer']}, median of {env['repeats']} interleaved repeats; load average at the start "
            f"{env['load_avg_1_5_15']}; {env['date']}"
        ),
        "",
        "speedup = torchvision / rpnlab (above 1: rpnlab faster); teaching = rpnlab's per-image version.",
        "",
        "| measure | setting | rpnlab ms | torchvision ms | speedup | teaching ms | identical |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        teach = f"{r['teaching_ms']:.2f}" if "teaching_ms" in r else ""
        lines.append(
            f"| {r['measure']} | {r['setting']} | {r['rpnlab_ms']:.2f} | {r['torchvision_ms']:.2f} | "
            f"{r['speedup']:.2f} | {teach} | {r['identical']} ({r['check']}) |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on the CPU")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per measure (default 15, 5 quick)")
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repeats")
    parser.add_argument("--amp", action="store_true", help="add an autocast row")
    parser.add_argument("--only", default=",".join(TABLES), help=f"comma-separated subset of {','.join(TABLES)}")
    parser.add_argument("--out", default="runs/bench", help="folder for the CSV and JSON")
    parser.add_argument("--markdown", default=None, help="also write the table as markdown here")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    only = [t.strip() for t in args.only.split(",") if t.strip()]
    unknown = sorted(set(only) - set(TABLES))
    if unknown:
        parser.error(f"--only: unknown table(s) {unknown}; choose from {list(TABLES)}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available here")
    torch.set_num_threads(args.threads)
    args.repeats = args.repeats or (5 if args.quick else 15)
    clock = Clock(device, args.repeats)
    env = environment(args, device)
    print(json.dumps(env), flush=True)

    rows = []
    for name in only:
        for row in TABLES[name](clock, device, args.quick):
            rows.append(row)
            print(f"{row['measure']:<48} {row['setting']:<24} rpnlab {row['rpnlab_ms']:9.2f} ms  "
                  f"torchvision {row['torchvision_ms']:9.2f} ms  speedup {row['speedup']:5.2f}  "
                  f"identical {row['identical']}", flush=True)
    if args.amp:
        rows.extend(bench_amp(clock, device, args.quick))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"bench_ops_{device.type}_{datetime.now():%Y%m%d-%H%M%S}"
    (out / f"{stem}.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=1))
    fields = sorted({k for r in rows for k in r}, key=lambda k: (k not in ("measure", "setting"), k))
    with open(out / f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fields)
        writer.writeheader()
        writer.writerows(rows)
    command = "python benchmarks/bench_ops.py " + " ".join(argv if argv is not None else sys.argv[1:])
    table = markdown(env, rows, command.strip())
    print("\n" + table)
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(table)
    print(f"wrote {out / stem}.csv and .json" + (f" and {args.markdown}" if args.markdown else ""))
    return 0 if all(r["identical"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
