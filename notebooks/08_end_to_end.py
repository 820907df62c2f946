# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 08 · End to end: training the whole detector
#
# **Goal.** Put every piece of notebooks 01-07 together and train Faster R-CNN on the synthetic
# shapes in the two ways the paper describes: *approximate joint training* (one network, the four
# losses summed) and the *4-step alternating training* the paper used for its results. Then
# measure what came out: loss curves, detections drawn on validation images, PASCAL VOC mAP@0.5
# (with its per-class AP table), COCO's mAP@[.5:.95], and the recall of the proposals against
# their number, as in the paper's Fig. 4.
#
# Training runs for a fixed time per schedule (`time_budget_s`): the notebook times a few
# iterations first and picks the number of epochs that fits, so the learning-rate schedule still
# decays to its end. A laptop CPU trains for a few minutes and gets a rough detector; a GPU gets
# many more epochs in the same time.

# %% tags=["parameters"]
preset: str = "synthetic"  # starting configuration: "synthetic" (CPU-sized, the 128 px shapes) or "gpu" (the shapes at 512 px, for a CUDA GPU)
input_size: int = 128  # "synthetic" preset: the side the shapes are fed at, anchors scaled to match; 128: the course's (notebooks 01-07), 192: the preset's; 0: the preset's
device: str = "auto"  # where training runs: "auto" (CUDA, then MPS, then CPU), "cpu", "cuda", "cuda:N" or "mps"
seed: int = 0  # seeds the data order, the initial weights and every random generator
smoke: bool = False  # tiny sizes for CI: a few iterations on a few images
record_path: str = ""  # JSON file for the key figures; empty: runs/records/08_end_to_end.json
schedules: list = ["joint", "alternating"]  # training schedules to run: "joint" (approximate joint) and/or "alternating" (4 steps)
time_budget_s: float = 300.0  # seconds of training per schedule; the number of epochs is fitted to it
max_epochs: int = 40  # upper bound on the fitted epochs (a fast GPU would otherwise train for very long)
num_train: int = 600  # training images (the synthetic train split has 600)
num_val: int = 150  # validation images for mAP and recall
batch_size: int = 0  # images per SGD step; 0: the preset's
lr: float = 0.0  # base learning rate (linear warm-up, then cosine decay to 0); 0: the preset's
roi_batch_size: int = 0  # RoIs sampled per image for the Fast R-CNN loss; 0: the preset's
alternating_init: str = ""  # 4-step schedule, step 2's backbone: "step1" (step 1's trained one), "fresh" (random, the paper's separate network); empty: the preset's
alternating_split: list = []  # 4-step schedule: steps 1-4's epochs in this proportion, e.g. [2, 1, 2, 1] (py-faster-rcnn's); empty: the preset's
out_dir: str = ""  # folder for the checkpoints (<out_dir>/<schedule>/checkpoint.pt); empty: a temporary folder, deleted at the end
num_show: int = 3  # validation images drawn with their detections
score_threshold: float = 0.5  # display threshold: detections scoring below it are not drawn
reference_path: str = "../docs/results/end_to_end_cpu.json"  # a committed reference run of this notebook, shown beside this one; empty: none

# %%
# %matplotlib inline
import dataclasses
import tempfile
from pathlib import Path

import torch
from IPython.display import Markdown, display

from rpnlab.data import build_dataset
from rpnlab.engine.devices import resolve_amp, resolve_device, seed_everything
from rpnlab.engine.evaluation import per_class_ap_table
from rpnlab.engine.presets import preset_configs
from rpnlab.engine.train import evaluate, stages_for, train
from rpnlab.lab import experiments, records
from rpnlab.lab.anchors import default_feature_sizes
from rpnlab.lab.detections import plot_detection_grid, plot_training_history
from rpnlab.lab.proposals import plot_recall_curves
from rpnlab.lab.reference import torchvision_postprocess

records.begin("08_end_to_end", record_path)
seed_everything(seed)
dev = resolve_device(device)
model_cfg, data_cfg, preset_train = preset_configs(preset, input_size if preset == "synthetic" else 0)
if smoke:
    num_train, num_val, batch_size, num_show = 4, 4, 4, min(num_show, 2)
workdir = None if out_dir else tempfile.TemporaryDirectory(prefix="rpnlab-08-")  # deleted when the kernel stops
out_dir = Path(out_dir or workdir.name)
print(f"device {dev}, checkpoints in {out_dir}")

# %% [markdown]
# ## The detector and the data
#
# `preset_configs("synthetic")` is the CPU-sized Faster R-CNN of the earlier notebooks: a small
# backbone trained from scratch, an RPN and a Fast R-CNN head with RoI Align. This notebook feeds
# it the 128 x 128 shapes as they are (`input_size=128`), with the anchors of notebooks 01-07 (16,
# 32, 64). The preset itself resizes them to 192 x 192 and scales the anchors to 24, 48, 96
# (`input_size=192`): per minute of training that gives the better detector (0.874 mAP@0.5 after 5
# minutes, 0.915 after 15, in `docs/results/detector_cpu.md`), but each iteration costs more, and in
# a 300 s budget the 4-step schedule then gets too few epochs to share among its four steps
# (measured: joint 0.817, 4-step 0.744). For training the preset also flips the shapes top-bottom
# (they have no up and down) and jitters their colours (`synthetic_data_config`), and on a CPU
# with native bfloat16 (AMX) it trains under bf16 autocast (`amp="auto"`); all of this was measured
# (see `rpnlab.engine.presets`). `preset="gpu"` draws the same shapes at 512 px and uses the paper's
# anchor scales where they fit, its proposal and RoI counts and bf16 mixed precision.

# %%
if roi_batch_size:
    model_cfg.roi.batch_size_per_image = roi_batch_size
data_cfg.num_train, data_cfg.num_val, data_cfg.seed = num_train, num_val, seed
train_set = build_dataset(data_cfg, "train")  # with random flips and colour jitter
val_set = build_dataset(data_cfg, "val")
print(f"preset {preset!r}: {len(train_set)} training images, {len(val_set)} validation images, "
      f"drawn at {data_cfg.image_size} px, fed to the network at {tuple(val_set[0][0].shape[-2:])}, "
      f"classes {val_set.classes}")
feature_sizes = default_feature_sizes(tuple(val_set[0][0].shape[-2:]), model_cfg.anchors.strides)
num_anchors = sum(h * w * k for (h, w), k in zip(feature_sizes, model_cfg.anchors.num_anchors_per_location))
print(f"backbone {model_cfg.backbone!r} ({model_cfg.small_norm} norm), stride {model_cfg.anchors.strides}: "
      f"feature map {feature_sizes}")
print(f"anchors: sizes {model_cfg.anchors.sizes[0]}, ratios {model_cfg.anchors.aspect_ratios[0]}: "
      f"{num_anchors} per image; the RPN keeps {model_cfg.rpn.post_nms_top_n_test} proposals at test time")

# %% [markdown]
# ## Two ways to train it
#
# The RPN and Fast R-CNN share the backbone, but the RoI pooling layer takes the proposals as
# inputs, and its output depends on the box coordinates too. The paper (sec. 3.2) offers:
#
# - **Approximate joint training**: one forward pass computes proposals, treats them as
#   constants, and runs Fast R-CNN on them; the four losses are summed and back-propagated
#   together. "Approximate" because the gradient through the proposal coordinates is ignored.
#   The paper found it about as accurate and 25-50% faster; torchvision and detectron2 train this way.
# - **4-step alternating training**, the paper's main recipe: (1) train backbone + RPN; (2) train
#   a *separate* backbone + Fast R-CNN on step 1's proposals; (3) take step 2's backbone, freeze
#   it, and fine-tune only the RPN layers on it, so the two now share features; (4) keep it
#   frozen and fine-tune only the Fast R-CNN layers on the new proposals.
#
# One adaptation: the paper starts steps 1 and 2 from the same ImageNet-trained network. We
# train from scratch, and a fresh random backbone in step 2 would have only a sixth of the
# epochs to learn its features: the presets set `alternating_init="step1"`, so step 2 starts from
# step 1's trained backbone, our stand-in for the pre-trained weights (`"fresh"` gives the literal
# recipe; compare them with the `alternating_init` parameter).
#
# `rpnlab.engine.train` splits the epochs of the alternating schedule 2 : 1 : 2 : 1 between the steps
# by default, as py-faster-rcnn's iteration counts. For 12 epochs:


# %%
# NBVAL_CHECK_OUTPUT
for schedule in ("joint", "alternating"):
    for stage in stages_for(schedule, 12):
        print(f"{schedule:>11} | {stage.name:<16} {stage.epochs:>2} epochs | trains {', '.join(stage.trainable):<28}"
              f"| losses {', '.join(k.removeprefix('loss_') for k in stage.loss_keys)}")

# %% [markdown]
# py-faster-rcnn fine-tuned ImageNet weights, so each of its steps only adapted a network that
# already saw images. From scratch, step 2 trains the detector's features and its head and needs
# most of a short budget, while steps 3 and 4 fine-tune a few layers on a frozen backbone. The
# preset's `alternating_split` gives the steps (the split this run uses, for 12 epochs):

# %%
split = tuple(int(w) for w in alternating_split) or preset_train.alternating_split
print(f"alternating_split {split}: " + ", ".join(f"{stage.name} {stage.epochs}"
                                                for stage in stages_for("alternating", 12, split)))

# %% [markdown]
# ## Fitting the epochs to the time budget
#
# A throw-away model trains a couple of iterations of each stage on a few images, and their
# cost (after each stage's first iteration, which is slower) gives the number of epochs that
# fits in `time_budget_s`. The stages cost very differently: the RPN steps skip the Fast R-CNN
# head, and the last alternating step trains only the head on a frozen backbone. In smoke mode
# there is no timing: a handful of iterations, one per step.

# %%
train_cfgs, plans = {}, {}
for schedule in schedules:
    base = dataclasses.replace(preset_train, schedule=schedule, seed=seed, device=str(dev),
                               out_dir=str(out_dir / schedule),
                               # off CUDA, bf16 only where the CPU has it natively
                               amp=preset_train.amp if dev.type == "cuda" or preset_train.amp == "off" else "auto")
    base.batch_size, base.lr = batch_size or base.batch_size, lr or base.lr
    base.alternating_init = alternating_init or base.alternating_init
    base.alternating_split = split
    if smoke:
        base.epochs, base.warmup_iters, base.max_iters = 4 if schedule == "alternating" else 3, 1, None
        train_cfgs[schedule], plans[schedule] = base, {"epochs": base.epochs}
    else:
        base.warmup_iters = min(base.warmup_iters, 50)
        train_cfgs[schedule], plans[schedule] = experiments.fit_to_budget(
            model_cfg, data_cfg, base, time_budget_s, train_dataset=train_set, max_epochs=max_epochs)
    timing = ", ".join(f"{k} {v:.3f}" for k, v in plans[schedule].get("seconds_per_iteration", {}).items())
    steps = stages_for(schedule, train_cfgs[schedule].epochs, split)
    print(f"{schedule}: {train_cfgs[schedule].epochs} epochs, amp {resolve_amp(train_cfgs[schedule].amp, dev)}"
          + (f" ({', '.join(f'{st.name} {st.epochs}' for st in steps)})" if len(steps) > 1 else "")
          + (f", ~{plans[schedule]['planned_seconds']:.0f} s planned (s/iteration: {timing})" if timing else ""))

# %% [markdown]
# ## Training
#
# Each schedule starts from the same seed. `train` returns the history of every iteration,
# the trained model (in eval mode) and why it stopped (`completed`, or `time_budget` if the
# estimate was too optimistic and the hard stop at 1.5 x the budget was reached).

# %%
results = {}
for schedule in schedules:
    results[schedule] = train(model_cfg, data_cfg, train_cfgs[schedule], train_dataset=train_set, progress=False)
    r = results[schedule]
    print(f"{schedule}: {r.stop_reason}, {r.iterations} iterations in {r.seconds:.1f} s "
          f"({r.images_per_second:.1f} images/s), last total loss {r.history[-1]['total']:.3f}")

# %% [markdown]
# ## Loss curves
#
# Joint training lowers all four losses at once. In the alternating schedule each step trains
# only its own losses; step 3 starts its RPN from step 2's backbone, which never saw the RPN
# loss, so the RPN losses jump back up before they fall again.

# %%
for schedule, r in results.items():
    display(plot_training_history(r.history, smooth=1 if smoke else 10, title=f"{schedule} training: losses"))

# %% [markdown]
# ## Detections on validation images
#
# Each row is one validation image: its ground truth on the left, then what each trained
# detector finds, drawn down to the display threshold `score_threshold` (coloured by class, with
# scores; the ground truth is dashed in white underneath).

# %%
shown = [val_set[i] for i in range(min(num_show, len(val_set)))]
found = {schedule: [r.model.to(dev).predict([image.to(dev)])[0] for image, _ in shown]
         for schedule, r in results.items()}
plot_detection_grid(shown, found, val_set.classes, score_threshold=score_threshold)

# %% [markdown]
# ## Check against torchvision: the last step of the detector
#
# After Fast R-CNN scores every proposal for every class, post-processing decodes one box per
# class, clips it, drops low scores and tiny boxes, runs NMS per class and keeps the best 100.
# Run on the trained model's own outputs, torchvision's `RoIHeads.postprocess_detections` must
# give the same detections.

# %%
# NBVAL_CHECK_OUTPUT
model = next(iter(results.values())).model
images = [val_set[i][0].to(dev) for i in range(min(4, len(val_set)))]
with torch.no_grad():
    ours, inter = model(images, return_intermediates=True)
roi = model.config.roi
theirs = torchvision_postprocess(inter["roi"]["class_logits"], inter["roi"]["box_regression"], inter["proposals"],
                                 inter["image_sizes"], roi.box_weights, roi.score_thresh, roi.nms_thresh,
                                 roi.detections_per_img)
for a, b in zip(ours, theirs):
    for key in ("boxes", "scores", "labels"):
        torch.testing.assert_close(a[key], b[key])
print("detections match torchvision's RoIHeads.postprocess_detections: True")

# %% [markdown]
# ## Accuracy: VOC mAP@0.5, COCO mAP, per-class AP
#
# `evaluate` runs the detector over the validation set and scores it twice: PASCAL VOC's AP at
# IoU 0.5 (all-point interpolation, boxes matched as the VOC devkit does, `rpnlab.engine.evaluation`),
# and COCO's AP averaged over IoU 0.5:0.95 (pycocotools), which rewards tight boxes.
# `recall_50` / `recall_70`: the share of ground-truth boxes that some test-time proposal
# overlaps with IoU >= 0.5 / 0.7.

# %%
scores = {schedule: evaluate(r.model, val_set) for schedule, r in results.items()}
summary = [{"schedule": s, "epochs": train_cfgs[s].epochs, "iterations": results[s].iterations,
            "train_s": results[s].seconds, "VOC mAP@0.5": e["map_50"], "COCO mAP": e["map"],
            "recall@0.5": e["recall_50"], "recall@0.7": e["recall_70"]} for s, e in scores.items()]
display(Markdown(experiments.rows_to_markdown(summary, digits={"train_s": 0})))
for schedule, e in scores.items():
    display(Markdown(f"**{schedule}**, per class (VOC AP@0.5, %):\n\n" + per_class_ap_table(e["voc"])))
if {"joint", "alternating"} <= set(scores):
    gap = scores["alternating"]["map_50"] - scores["joint"]["map_50"]
    print(f"4-step minus joint: {gap:+.3f} mAP@0.5 on {len(val_set)} validation images "
          "(the paper found the two schedules about equally accurate)")

# %% [markdown]
# For scale: the paper's VGG-16 reaches 69.9% VOC 2007 mAP (Table 3, 4-step training) after
# tens of thousands of iterations from ImageNet weights, on far harder photos. Ours starts from
# random weights and trains for minutes on simple shapes; what matters here is that the whole
# pipeline learns, and how the two schedules compare on the same budget (the paper found them
# about equal). `benchmarks/bench_detector.py --curve` draws the preset's learning curve:
# mAP@0.5 against minutes of training.
#
# ## Proposal recall against the number of proposals (the paper's Fig. 4)
#
# The paper plots recall against the IoU threshold for the top 300, 1000 and 2000 proposals and
# notes that RPN's recall barely drops from 2000 to 300: its objectness ranks the good boxes
# first. Our small feature map has only hundreds of anchors (printed above), so we look at
# fewer proposals. Left: recall vs
# IoU for several N (one schedule); right: recall vs N at IoU 0.5 and 0.7, every schedule.

# %%
counts = [10, 20, 50, 100, 300]
recall = {s: experiments.proposal_recall_for(r.model, val_set, counts) for s, r in results.items()}
first = next(iter(recall))
fig_iou = plot_recall_curves({f"top {n}": (recall[first]["iou_thresholds"], recall[first]["recall"][i])
                                  for i, n in enumerate(counts)}, x_label="IoU threshold",
                                 title=f"recall vs IoU ({first})")
fig_n = plot_recall_curves({f"{s}, IoU {t}": (counts, rec[f"recall_{t[2:]}"]) for s, rec in recall.items()
                                for t in ("0.50", "0.70")}, x_label="number of proposals per image",
                               title="recall vs number of proposals")
fig_n.axes[0].set_xscale("log")
fig_n.axes[0].set_xticks(counts, [str(n) for n in counts])
display(fig_iou, fig_n)

# %% [markdown]
# ## What we measured

# %%
for schedule in results:
    e, r = scores[schedule], results[schedule]
    records.record(f"{schedule}_map_50", e["map_50"])
    records.record(f"{schedule}_coco_map", e["map"])
    records.record(f"{schedule}_ap_per_class", e["ap_per_class"])
    records.record(f"{schedule}_recall_50", e["recall_50"])
    records.record(f"{schedule}_recall_70", e["recall_70"])
    records.record(f"{schedule}_recall_50_at_300", recall[schedule]["recall_50"][-1])
    records.record(f"{schedule}_epochs", train_cfgs[schedule].epochs)
    records.record(f"{schedule}_iterations", r.iterations)
    records.record(f"{schedule}_train_seconds", r.seconds)
    records.record(f"{schedule}_stop_reason", r.stop_reason)
records.record("alternating_split", list(split))
if {"joint", "alternating"} <= set(scores):
    records.record("alternating_minus_joint_map_50", gap)
records.record("device", str(dev))
# Beside the committed reference run (docs/results/end_to_end_cpu.json: the defaults on a 2-core CPU)
keys = [f"{s}_{k}" for s in results for k in ("map_50", "coco_map", "recall_70", "iterations", "train_seconds")]
keys += ["alternating_minus_joint_map_50"] if {"joint", "alternating"} <= set(results) else []
beside = records.beside_reference(records.current(), reference_path, keys)
if beside:
    display(Markdown("This run beside the reference run:\n\n" + experiments.rows_to_markdown(beside)))
if workdir is not None:
    workdir.cleanup()  # the temporary checkpoints; the trained models stay in memory
records.save_record();
