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
# # 09 · Experiments: the paper's ablations in miniature
#
# **Goal.** Repeat three of the paper's sensitivity studies on the synthetic shapes and set our
# numbers beside the paper's: the **anchors** (1 or 3 scales x 1 or 3 aspect ratios, Table 8),
# the weight **lambda** of the box term in the RPN loss (Table 9), and the **number of proposals**
# used at test time (Table 2). Each setting trains a detector for the same number of iterations
# (fitted once to `setting_budget_s`), then is scored on the validation set.
#
# All the logic is in `rpnlab.lab.experiments`: each ablation is one function that returns *tidy
# rows* (one dict per setting), so the same calls run here, in a script, or in a sweep over
# seeds. Expect noise: one short run per setting on a CPU is a sketch of the paper's
# experiments, not a replication; `seed` and `setting_budget_s` let you check how stable a
# difference is.

# %% tags=["parameters"]
device: str = "auto"  # where training runs: "auto" (CUDA, then MPS, then CPU), "cpu", "cuda", "cuda:N" or "mps"
seed: int = 0  # seeds the data order, the initial weights and every random generator
smoke: bool = False  # tiny sizes for CI: one iteration per setting on a few images
record_path: str = ""  # JSON file for the key figures; empty: runs/records/09_experiments.json
ablations: list = ["anchors", "lambda", "proposals"]  # which ablations to run
setting_budget_s: float = 70.0  # seconds of training per setting; the epochs are fitted once and shared by all settings
max_epochs: int = 40  # upper bound on the fitted epochs (for fast GPUs)
num_train: int = 600  # training images (the synthetic train split has 600)
num_val: int = 150  # validation images for mAP and recall
batch_size: int = 8  # images per SGD step
lr: float = 0.04  # base learning rate (linear warm-up, then cosine decay to 0)
roi_batch_size: int = 32  # RoIs sampled per image for the Fast R-CNN loss (fewer train faster on a CPU)
anchor_sizes: list = [16, 32, 64]  # the "3 scales" in pixels (the paper's 128, 256, 512 for 600-px images)
anchor_ratios: list = [0.5, 1.0, 2.0]  # the "3 ratios", height / width
single_size: int = 32  # the anchor size of the "1 scale" settings (the middle one, as the paper's 256)
lambdas: list = [0.1, 1.0, 10.0, 100.0]  # weights of the RPN box term (paper's eq. 1)
proposal_counts: list = [10, 20, 50, 100, 300, 1000]  # test-time proposals per image to evaluate one model with
out_dir: str = ""  # folder for the checkpoints of every setting; empty: a temporary folder, deleted at the end

# %%
# %matplotlib inline
import tempfile
from pathlib import Path

from IPython.display import Markdown, display

from rpnlab.config import DataConfig
from rpnlab.data import build_dataset
from rpnlab.detector.model import synthetic_model_config
from rpnlab.engine.devices import resolve_device, seed_everything
from rpnlab.engine.train import synthetic_train_config
from rpnlab.lab import experiments, records
from rpnlab.lab.anchors import default_feature_sizes
from rpnlab.lab.experiments import plot_ablation

records.begin("09_experiments", record_path)
seed_everything(seed)
dev = resolve_device(device)
if smoke:
    num_train, num_val, batch_size = 4, 4, 4
workdir = None if out_dir else tempfile.TemporaryDirectory(prefix="rpnlab-09-")  # deleted when the kernel stops
out_dir = Path(out_dir or workdir.name)
columns = ["map_50", "map", "recall_50", "recall_70", "mean_proposals", "iterations", "train_seconds"]
digits = {"lambda": 1, "mean_proposals": 0, "train_seconds": 0, "balance": 2, "paper_balance": 2, "paper_map": 1}
print(f"device {dev}, checkpoints in {out_dir}")

# %% [markdown]
# ## The paper's numbers
#
# Ren et al. 2015 (arXiv:1506.01497v3), detection mAP (%) on PASCAL VOC 2007 test, trained on
# VOC 2007 trainval. Tables 8 and 9 use VGG-16 with the 4-step training; Table 2 uses ZF: a
# Fast R-CNN trained on 2000 Selective Search proposals and tested on the top-N proposals of an
# RPN that shares no features with it (the paper has no sweep over N with a shared network).
# Anchor scales are areas (128² is 128 x 128 pixels) of anchors on ~600 x 1000 images.

# %%
# NBVAL_CHECK_OUTPUT
paper = experiments.paper_reference_rows()
for name, rows in paper.items():
    print(f"{name}:\n" + experiments.rows_to_markdown(rows, digits=1) + "\n")

# %% [markdown]
# ## The common setup
#
# One base model for every run: the synthetic-shapes detector with the "3 scales x 3 ratios"
# anchors below (the paper's default, scaled to our 128-pixel images and 12-77-pixel objects).
# The number of epochs is fitted once to `setting_budget_s` and shared: every setting trains
# for the same number of iterations, whatever it costs.
#
# A word on what to expect. With about a minute per setting on a CPU the detectors are weak
# (mAP of a few percent, against ~15% after the three minutes of notebook 08), and differences
# of a point or two in mAP between settings are within the noise of one short run. The RPN's
# recall and the anchor coverage respond much more clearly, because the settings act on the
# RPN first. With a GPU, raise `setting_budget_s` and the mAP columns become meaningful too.

# %%
base_cfg = synthetic_model_config()
base_cfg.anchors.sizes = (tuple(float(s) for s in anchor_sizes),)
base_cfg.anchors.aspect_ratios = (tuple(float(r) for r in anchor_ratios),)
base_cfg.roi.batch_size_per_image = roi_batch_size
base_cfg.validate()
data_cfg = DataConfig(num_train=num_train, num_val=num_val, seed=seed)
train_set, val_set = build_dataset(data_cfg, "train"), build_dataset(data_cfg, "val")
train_cfg = synthetic_train_config(batch_size=batch_size, lr=lr, seed=seed, device=str(dev), out_dir=str(out_dir))
if smoke:
    train_cfg.epochs, train_cfg.warmup_iters, train_cfg.max_iters = 1, 1, 1
else:
    train_cfg.warmup_iters = 20  # short runs: a short warm-up
    train_cfg, plan = experiments.fit_to_budget(base_cfg, data_cfg, train_cfg, setting_budget_s,
                                                train_dataset=train_set, max_epochs=max_epochs)
    print(f"{plan['seconds_per_iteration']['joint']:.3f} s per iteration, ~{plan['planned_seconds']:.0f} s planned")
print(f"every setting: {train_cfg.epochs} epochs of {len(train_set)} images, batch {batch_size}")

# %% [markdown]
# ## 1. Anchors (Table 8)
#
# Four settings: one size or three, one ratio (1:1) or three. The paper found that several
# scales matter more than several ratios (69.8% with 3 scales x 1 ratio against 69.9% with
# 3 x 3) and that one anchor per location loses about 3-4 points. `coverage_70` is computed
# before training: the share of validation boxes whose best anchor already has IoU >= 0.7.

# %%
anchor_rows = []
if "anchors" in ablations:
    settings = experiments.anchor_settings(anchor_sizes, anchor_ratios, single_size)
    anchor_rows = experiments.anchor_ablation(settings, data_cfg, train_cfg, base_cfg, val_set, train_set)
    display(Markdown(experiments.rows_to_markdown(
        anchor_rows, ["setting", "sizes", "ratios", "k", "coverage_70", *columns, "paper_map"], digits=digits)))
    display(plot_ablation(anchor_rows, "setting", ("map_50", "recall_70", "coverage_70"),
                              title="anchors: 1 or 3 scales x 1 or 3 ratios"))

# %% [markdown]
# ## 2. The loss weight lambda (Table 9)
#
# The RPN loss of the paper (eq. 1) is `1/N_cls sum L_cls + lambda/N_reg sum p* L_reg`, with
# `N_cls` = 256 sampled anchors and `N_reg` ~ 2400 anchor locations; `lambda = 10` then weighs
# the two terms about equally. Our small feature map has far fewer locations (printed below),
# so the same lambda weighs the box term many times more: the `balance` column (box vs
# objectness weight per sampled anchor, `rpnlab.lab.experiments.loss_balance`) shows ours,
# `paper_balance` the paper's.
# The paper found the result insensitive to lambda within two orders of magnitude (1 to 100).

# %%
lambda_rows = []
if "lambda" in ablations:
    locations = sum(h * w for h, w in default_feature_sizes(tuple(val_set[0][0].shape[-2:]),
                                                                     base_cfg.anchors.strides))
    print(f"N_cls = {base_cfg.rpn.batch_size_per_image} sampled anchors, N_reg = {locations} locations per image")
    lambda_rows = experiments.lambda_ablation(lambdas, data_cfg, train_cfg, base_cfg, val_set, train_set)
    display(Markdown(experiments.rows_to_markdown(
        lambda_rows, ["lambda", "balance", "paper_balance", *columns, "paper_map"], digits=digits)))
    display(plot_ablation(lambda_rows, "lambda", ("map_50", "recall_70"), log_x=True,
                              title="RPN loss weight lambda (paper's normalisation)"))

# %% [markdown]
# ## 3. Proposals at test time (Table 2)
#
# One detector, trained with the base settings (the RPN keeps its training-time proposal count),
# evaluated keeping the top N proposals per image. The paper lost 1.7 points going from 300
# to 100 RPN proposals and gained nothing from 1000: the RPN's objectness puts the good boxes
# first. With only a few hundred anchors per image, NMS leaves fewer boxes than the largest N
# asks for; `mean_proposals` says how many there were.

# %%
proposal_rows = []
if "proposals" in ablations:
    _, trained = experiments.train_and_evaluate(base_cfg, data_cfg, train_cfg, val_set, train_set)
    proposal_rows = experiments.proposal_count_ablation(trained.model, val_set, proposal_counts)
    display(Markdown(experiments.rows_to_markdown(
        proposal_rows, ["test_proposals", "map_50", "map", "recall_50", "recall_70", "mean_proposals", "paper_map"],
        digits=digits)))
    display(plot_ablation(proposal_rows, "test_proposals", ("map_50", "recall_50", "recall_70"), log_x=True,
                              x_label="proposals per image at test time", title="test-time proposals"))

# %% [markdown]
# ## What we measured
#
# Every row goes into the record, so a sweep (`rpnlab sweep 09 -p seed 0 1 2`) can average the
# settings over seeds and show which differences hold up.

# %%
for name, rows, key in (("anchors", anchor_rows, "setting"), ("lambda", lambda_rows, "lambda"),
                        ("proposals", proposal_rows, "test_proposals")):
    records.record(f"{name}_rows", rows)
    for row in rows:
        records.record(f"{name}_map_50[{row[key]}]", row["map_50"])
records.record("epochs_per_setting", train_cfg.epochs)
records.record("device", str(dev))
if workdir is not None:
    workdir.cleanup()  # the temporary checkpoints; the trained models stay in memory
records.save_record();
