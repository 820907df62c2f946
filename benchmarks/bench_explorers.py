"""How long an explorer takes from a value change to its new figure: ``make bench`` (last line).

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 MPLBACKEND=Agg .venv/bin/python benchmarks/bench_explorers.py
    ... bench_explorers.py --quick            # 5 changes per control instead of 15, 120 images in 01
    ... bench_explorers.py --out runs/bench   # where explorers.csv / explorers.json go
    ... bench_explorers.py --only 01          # the explorers whose name contains "01"

Every explorer of the course is built as its notebook builds it (00's dataset browser, 01's
anchors over 600 images, 02's box coding, 03's matching thresholds, 05's proposals from the
cached course RPN; 04, 06 and 07 have none). Then one control at a time takes a run of new
values, and each change is timed from setting the value to the new PNG in the ``Output`` widget:
wall clock and process CPU time (``time.process_time``, which does not count the time other
processes hold the cores, so it reads the same on a busy machine), split into compute and draw
as the explorer reports them.

``scratch`` is the way the explorers drew before figures were kept (issue 11, item 4): a new
figure from the stage's plotting functions, laid out and encoded at every change. It is timed
right after each change on the same result (A, B, A, B, ...), so machine load hits both alike;
Columns: ``wall`` and ``cpu`` for the whole change, ``p90 cpu``, ``compute`` (wall) and ``draw
cpu`` as the explorer reports them, ``full``: the changes that redrew the whole figure (a new axis
range or a new image) rather than only what moved, ``before cpu``: compute + the scratch drawing,
``draw x``: the scratch drawing's CPU time over the kept figure's. The goal: compute + draw under
150 ms.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import platform
import random
import statistics
import time
from datetime import datetime
from pathlib import Path

import matplotlib
import torch

from rpnlab.data import SyntheticShapes
from rpnlab.detector.anchors import AnchorGenerator
from rpnlab.detector.boxes import box_iou
from rpnlab.lab import widgets
from rpnlab.lab.anchors import default_feature_sizes, plot_anchor_coverage, plot_anchor_grid
from rpnlab.lab.box_coding import plot_box_coding
from rpnlab.lab.course import course_setup
from rpnlab.lab.figures import draw_boxes, new_figure
from rpnlab.lab.matching import plot_matching
from rpnlab.lab.proposals import plot_proposal_steps, proposal_funnel, rpn_outputs

GOAL_MS = 150.0


def _encode(fig, dpi: int = 80) -> int:
    """The old ``show_figure``: the whole figure laid out and encoded as PNG."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return len(buffer.getvalue())


def _old_legends_outside(fig) -> None:
    for ax in fig.axes:
        legend = ax.get_legend()
        if legend is not None:
            ax.legend(legend.legend_handles, [t.get_text() for t in legend.get_texts()], loc="upper center",
                      bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize=7, frameon=False)


def _old_thresholds(ax, best_iou, low: float, high: float) -> None:
    """The old matching explorer's right panel, drawn from scratch."""
    ax.hist(best_iou.numpy(), bins=50, range=(0.0, 1.0), color="0.35", log=True)
    ax.axvspan(0.0, low, color="tab:red", alpha=0.15, label=f"negative: IoU < {low:.2f}")
    ax.axvspan(low, high, color="tab:orange", alpha=0.2, label="ignored")
    ax.axvspan(high, 1.0, color="tab:green", alpha=0.2, label=f"positive: IoU \u2265 {high:.2f}")
    for t in (low, high):
        ax.axvline(t, color="black", linewidth=1.5)
    ax.set_xlim(0.0, 1.0)
    ax.set_xlabel("each anchor's best IoU with a gt box")
    ax.set_ylabel("anchors")
    ax.set_title("the thresholds cut the IoU axis")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), fontsize=8, frameon=False)


# ------------------------------------------------------------------- the explorers, as in the notebooks


def build(quick: bool) -> list[dict]:
    """Each explorer with its scratch drawing and the controls to move: ``[{name, explorer, scratch, moves}]``."""
    course = course_setup()
    sizes, ratios, stride = course.anchor_sizes, course.anchor_ratios, course.anchor_stride
    train = SyntheticShapes("train", num_images=120 if quick else 600, seed=0)
    cases = []

    browser = widgets.dataset_browser(train)

    def scratch_browser(ex):
        image, target = train[ex.last_result["index"]]
        return _encode(draw_boxes(image, target["boxes"], target.get("labels"), class_names=train.classes,
                                  title=f"image {ex.last_result['index']}: {len(target['boxes'])} objects"))

    cases.append({"name": "00 dataset browser", "explorer": browser, "scratch": scratch_browser,
                  "moves": {"index": lambda n: [1 + i % (len(train) - 1) for i in range(n)]}})

    anchors_ex = widgets.anchor_explorer(train, sizes=sizes, ratios=ratios, stride=stride)

    def scratch_anchors(ex):
        r = ex.last_result
        image, target = train[r["index"]]
        generator = AnchorGenerator(r["sizes"], r["ratios"], (r["stride"],), cache=False)
        anchors = generator(default_feature_sizes(tuple(image.shape[-2:]), [r["stride"]]))
        fig, axes = new_figure(1, 2, (5.0, 4.6))
        plot_anchor_grid(image, anchors, r["stride"], gt_boxes=target["boxes"], ax=axes[0, 0],
                         title=f"image {r['index']}: {anchors.shape[0]} anchors, k = {r['k']}")
        plot_anchor_coverage(r["best_iou"], (0.5, 0.7), ax=axes[0, 1])
        return _encode(fig)

    options = anchors_ex.controls["sizes"].options

    def toggles(n: int) -> list[tuple]:
        """What a learner does: add or remove one size (ctrl-click), a set not seen before each time
        (so the coverage of every box is computed, never taken from the cache)."""
        rng, current, seen, out = random.Random(0), set(sizes), {tuple(sorted(sizes))}, []
        while len(out) < n:
            nxt = current ^ {rng.choice(options)}
            if nxt and tuple(sorted(nxt)) not in seen:
                current = nxt
                seen.add(tuple(sorted(nxt)))
                out.append(tuple(sorted(nxt)))
        return out

    cases.append({"name": "01 anchors", "explorer": anchors_ex, "scratch": scratch_anchors, "moves": {
        "index": lambda n: [1 + i % 50 for i in range(n)],
        "sizes (one toggled: coverage of every box)": toggles,
    }})

    puzzle_anchor, puzzle_gt = torch.tensor([8.0, 40.0, 104.0, 88.0]), torch.tensor([24.0, 20.0, 72.0, 116.0])
    coding = widgets.box_coding_explorer(puzzle_anchor, puzzle_gt)

    def scratch_coding(ex):
        r = ex.last_result
        return _encode(plot_box_coding(puzzle_anchor, puzzle_gt, torch.tensor(r["deltas"]),
                                       others={"decoded": torch.tensor(r["decoded"])},
                                       title=f"decoded box: IoU {r['iou']:.3f} with the gt box"))

    cases.append({"name": "02 box coding", "explorer": coding, "scratch": scratch_coding,
                  "moves": {"tx": lambda n: [round(-1.0 + 0.13 * i, 2) for i in range(n)]}})

    matching = widgets.matching_explorer(train, sizes=sizes, ratios=ratios, stride=stride,
                                         high_threshold=course.high_threshold, low_threshold=course.low_threshold)

    def scratch_matching(ex):
        r = ex.last_result
        image, target = train[r["index"]]
        generator = AnchorGenerator(sizes, ratios, (stride,), cache=False)
        anchors = generator(default_feature_sizes(tuple(image.shape[-2:]), [stride]))
        gt = target["boxes"]
        best = box_iou(gt, anchors).amax(dim=0) if len(gt) else anchors.new_zeros(anchors.shape[0])
        fig, axes = new_figure(1, 2, (5.0, 4.2))
        plot_matching(image, anchors, r["labels"], target["boxes"], ax=axes[0, 0])
        _old_thresholds(axes[0, 1], best, r["low"], r["high"])
        _old_legends_outside(fig)
        return _encode(fig)

    cases.append({"name": "03 matching", "explorer": matching, "scratch": scratch_matching, "moves": {
        "high IoU": lambda n: [0.5 + 0.05 * (i % 9) for i in range(n)],
        "index": lambda n: [1 + i % 50 for i in range(n)],
    }})

    from rpnlab.lab.stage_training import course_rpn

    rpn = course_rpn(3, 8, seed=0, device="cpu")  # the cached course RPN (smoke size: any trained RPN does)
    val = SyntheticShapes("val", num_images=4, seed=0)
    outputs = rpn_outputs(rpn.model, val)
    image, target = val[0]
    proposals = widgets.proposal_explorer(image, outputs["anchors"], outputs["objectness"][0], outputs["deltas"][0],
                                          target["boxes"], pre_nms_top_n=600, post_nms_top_n=100, nms_thresh=0.7,
                                          box_coder=rpn.model.rpn.box_coder)

    def scratch_proposals(ex):
        r = ex.last_result
        funnel = proposal_funnel(outputs["anchors"], outputs["objectness"][0], outputs["deltas"][0],
                                 tuple(image.shape[-2:]), r["pre_nms_top_n"], r["post_nms_top_n"], r["nms_thresh"],
                                 r["min_size"], box_coder=rpn.model.rpn.box_coder)
        fig = plot_proposal_steps(image, funnel, target["boxes"], top=20, show_pre_nms=False)
        _old_legends_outside(fig)
        return _encode(fig)

    cases.append({"name": "05 proposals", "explorer": proposals, "scratch": scratch_proposals, "moves": {
        "NMS IoU": lambda n: [round(0.3 + 0.05 * (i % 13), 2) for i in range(n)],
        "post-NMS top-n": lambda n: [5 + 17 * (i % 6) for i in range(n)],
    }})
    return cases


# ------------------------------------------------------------------------------------------ timing


def _control(explorer, label: str):
    key = label.split(" (")[0]
    for name, control in explorer.controls.items():
        if key in (name, control.description):
            return control
    raise KeyError(f"no control {key!r} in {list(explorer.controls)}")


def measure(case: dict, label: str, values: list, scratch: bool) -> dict:
    ex, control = case["explorer"], _control(case["explorer"], label)
    rows = []
    for value in values:
        view = getattr(ex, "view", None)  # None: explorers older than the kept figures
        before_png, draws = ex.output.outputs, view.full_draws if view is not None else 0
        wall, cpu = time.perf_counter(), time.process_time()
        control.value = value
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        r = ex.last_result
        row = {"wall": wall, "cpu": cpu, "compute_wall": r["seconds"], "draw_wall": r["render_seconds"],
               "draw_cpu": r.get("render_cpu_seconds", float("nan")), "changed": ex.output.outputs != before_png,
               "full_draw": view.full_draws > draws if view is not None else True}
        if scratch:
            w, c = time.perf_counter(), time.process_time()
            case["scratch"](ex)
            row["scratch_wall"], row["scratch_cpu"] = time.perf_counter() - w, time.process_time() - c
        rows.append(row)

    def med(key):
        return 1000 * statistics.median(r[key] for r in rows)

    def p90(key):
        ordered = sorted(r[key] for r in rows)
        return 1000 * ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]

    out = {"explorer": case["name"], "control": label, "changes": len(rows),
           "figure_changed": sum(r["changed"] for r in rows), "full_draws": sum(r["full_draw"] for r in rows)}
    for key in ("wall", "cpu", "compute_wall", "draw_wall", "draw_cpu"):
        out[f"{key}_ms"], out[f"{key}_p90_ms"] = med(key), p90(key)
    if scratch:
        for key in ("scratch_wall", "scratch_cpu"):
            out[f"{key}_ms"], out[f"{key}_p90_ms"] = med(key), p90(key)
        out["before_cpu_ms"] = out["cpu_ms"] - out["draw_cpu_ms"] + out["scratch_cpu_ms"]
        out["speedup_draw"] = out["scratch_cpu_ms"] / max(out["draw_cpu_ms"], 1e-6)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="5 changes per control and 120 images in 01")
    parser.add_argument("--changes", type=int, default=0, help="changes per control (default 15, --quick 5)")
    parser.add_argument("--only", default="", help="explorers whose name contains this (e.g. 01)")
    parser.add_argument("--no-scratch", action="store_true", help="skip the draw-from-scratch comparison")
    parser.add_argument("--out", default="runs/bench", help="folder for explorers.csv and explorers.json")
    args = parser.parse_args()
    n = args.changes or (5 if args.quick else 15)
    if n < 1:
        raise SystemExit(f"--changes must be >= 1, got {n}")
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    start = time.perf_counter()
    cases = build(args.quick)
    build_seconds = time.perf_counter() - start
    results = []
    for case in cases:
        if args.only not in case["name"]:
            continue
        for label, values in case["moves"].items():
            results.append(measure(case, label, values(n), scratch=not args.no_scratch))
    load_after = os.getloadavg()

    header = (f"{'explorer':<20} {'control':<40} {'wall':>7} {'cpu':>7} {'p90 cpu':>8} {'compute':>8} {'draw cpu':>9}"
              f" {'full':>5}")
    if not args.no_scratch:
        header += f" {'before cpu':>11} {'draw x':>7}"
    print(f"explorers: {n} changes per control, medians in ms (wall, process CPU); goal {GOAL_MS:.0f} ms per change")
    print(f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after; {os.cpu_count()} CPUs; "
          f"torch {torch.__version__} ({torch.get_num_threads()} thread), matplotlib {matplotlib.__version__}; "
          f"explorers built in {build_seconds:.1f} s")
    print(header)
    for r in results:
        line = (f"{r['explorer']:<20} {r['control']:<40} {r['wall_ms']:7.1f} {r['cpu_ms']:7.1f} {r['cpu_p90_ms']:8.1f} "
                f"{r['compute_wall_ms']:8.1f} {r['draw_cpu_ms']:9.1f} {r['full_draws']:2d}/{r['changes']:<2d}")
        if not args.no_scratch:
            line += f" {r['before_cpu_ms']:11.1f} {r['speedup_draw']:6.1f}x"
        if r["figure_changed"] < r["changes"]:
            line += f"  (figure unchanged {r['changes'] - r['figure_changed']}x)"
        print(line)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"date": datetime.now().isoformat(timespec="seconds"), "changes": n, "quick": args.quick,
            "load_before": load_before, "load_after": load_after, "cpus": os.cpu_count(),
            "platform": platform.platform(), "torch": torch.__version__, "matplotlib": matplotlib.__version__,
            "goal_ms": GOAL_MS}
    (out / "explorers.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2), encoding="utf-8")
    with (out / "explorers.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(results[0]))
        writer.writeheader()
        writer.writerows(results)
    print(f"written: {out / 'explorers.csv'}, {out / 'explorers.json'}")


if __name__ == "__main__":
    main()
