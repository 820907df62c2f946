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
# # 01 · Anchors: reference boxes at every feature-map location
#
# **Goal.** Build the anchors of the Region Proposal Network: `k` reference boxes (sizes x
# aspect ratios) centred on every cell of the feature map. Then measure how well they *cover*
# the ground-truth boxes, because the RPN can only learn to refine an anchor that already
# overlaps an object.
#
# The paper (Ren et al. 2015, sec. 3.1.1) uses 3 sizes (128, 256, 512 pixels: the square root
# of the area) and 3 aspect ratios (1:2, 1:1, 2:1), so `k = 9` anchors per location of VGG-16's
# stride-16 feature map. Our synthetic objects are much smaller, so our defaults are smaller.

# %% tags=["parameters"]
device: str = "auto"  # where tensors live: "auto" (CUDA, then MPS, then CPU), "cpu", "cuda", "cuda:N" or "mps"
seed: int = 0  # seeds the dataset, k-means and every random generator
smoke: bool = False  # tiny sizes for CI: a handful of images instead of the full split
record_path: str = ""  # JSON file for the key figures; empty: runs/records/01_anchors.json
anchor_sizes: list = []  # anchor sizes in pixels (square root of the area); empty: the course setup's
anchor_ratios: list = []  # anchor aspect ratios as height / width; empty: the course setup's
anchor_stride: int = 0  # feature stride in pixels (one anchor location every this many); 0: the course setup's
num_images: int = 600  # training images whose boxes the coverage is measured on
kmeans_k: int = 9  # anchor shapes found by k-means (the aside at the end)

# %%
# %matplotlib inline
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator as TorchvisionAnchorGenerator
from torchvision.models.detection.image_list import ImageList

from rpnlab.data import SyntheticShapes
from rpnlab.detector.anchors import AnchorGenerator
from rpnlab.engine.devices import resolve_device, seed_everything
from rpnlab.lab import records, widgets
from rpnlab.lab.course import course_setup, departures, resolve
from rpnlab.lab.anchors import (
    coverage_over_dataset,
    default_feature_sizes,
    kmeans_anchors,
    mean_best_iou,
    plot_anchor_coverage,
    plot_anchor_grid,
    plot_base_anchors,
    plot_kmeans_anchors,
    wh_to_sizes_ratios,
)

records.begin("01_anchors", record_path)
seed_everything(seed)
dev = resolve_device(device)
if smoke:
    num_images = 24
dataset = SyntheticShapes("train", num_images=num_images, seed=seed)
course = course_setup()
used = resolve(course, anchor_sizes=anchor_sizes, anchor_ratios=anchor_ratios, anchor_stride=anchor_stride)
anchor_sizes, anchor_ratios = list(used["anchor_sizes"]), list(used["anchor_ratios"])
anchor_stride, anchor_offset = used["anchor_stride"], course.anchor_offset

# %% [markdown]
# ## The course setup
#
# Every notebook starts from the same anchors and sampling, those of the detector that notebooks
# 04-09 train (`synthetic_model_config`); a notebook that departs from them says so here.

# %%
print(course.describe())
print("\n".join(departures(course, used)) or "this notebook: the course setup, unchanged")

# %% [markdown]
# ## The paper's 9 anchors
#
# An anchor of size `s` and ratio `r = h / w` keeps the area `s^2`: `w = s / sqrt(r)`,
# `h = s * sqrt(r)`. Centred on `(0, 0)` it is `(-w/2, -h/2, w/2, h/2)`, rounded to whole pixels
# as torchvision does. The order is ratios outer, sizes inner; the RPN head's `k` outputs per
# location follow this order, so it matters.
#
# Conventions differ between implementations: torchvision and py-faster-rcnn read the ratio as
# `h / w` (so 0.5 is a *wide* box), d2l as `w / h`. `AnchorGenerator(ratio_convention="w/h")`
# switches.

# %%
# NBVAL_CHECK_OUTPUT
paper = AnchorGenerator()  # sizes (128, 256, 512), ratios (0.5, 1, 2), stride 16
base = paper.base_anchors()
for (s, r), box in zip([(s, r) for r in paper.aspect_ratios[0] for s in paper.sizes[0]], base.int().tolist()):
    print(f"size {s:>5.0f}  ratio {r:>3}  ->  {box}  ({box[2] - box[0]} x {box[3] - box[1]})")

# %%
plot_base_anchors(paper, title="the paper's 9 anchors (sizes 128, 256, 512; ratios h/w 0.5, 1, 2)")

# %% [markdown]
# ### Exercise 1: the k base anchors
#
# Write `my_base_anchors(sizes, ratios)`: the `(k, 4)` anchors centred on `(0, 0)` that the
# cell above printed, for any sizes and ratios (`h / w`), ratios outer, sizes inner, rounded with
# `torch.round`. Why it matters: the RPN head's `k` outputs per location mean these shapes in
# this order; a different order trains each output on the wrong shape without any error.
#
# Exercises: write the function's body in place of `raise NotImplementedError` (between the
# `### BEGIN SOLUTION` and `### END SOLUTION` markers) and run the cell; the `check` line tries it
# on hidden cases against rpnlab and torchvision and says right, or the first wrong case and why.
# Until then it says "not done yet" and the notebook runs on.

# %%
from rpnlab.lab.exercises import check


def my_base_anchors(sizes, ratios):
    """sizes: list of k_s floats, ratios: list of k_r floats (h / w) -> (k_r * k_s, 4) centred on (0, 0)."""
    ### BEGIN SOLUTION
    raise NotImplementedError
    ### END SOLUTION


check.base_anchors(my_base_anchors)

# %% [markdown]
# ## Anchors for our data
#
# Our images are 128 x 128 with objects of 12 to 77 pixels (notebook 00), so the course takes
# smaller sizes and a finer stride (printed above). With `anchor_stride` pixels per feature cell,
# a 128-pixel image gives a `ceil(128 / stride)`-square feature map, and `H * W * k` anchors in all.

# %%
generator = AnchorGenerator(sizes=anchor_sizes, aspect_ratios=anchor_ratios, strides=anchor_stride,
                            offset=anchor_offset)
plot_base_anchors(generator)

# %%
# NBVAL_CHECK_OUTPUT
image, target = dataset[0]
feature_size = default_feature_sizes(tuple(image.shape[-2:]), [anchor_stride])
anchors = generator(feature_size, device=dev)
k = generator.num_anchors_per_location()[0]
print(f"image {tuple(image.shape[-2:])}, stride {anchor_stride}, offset {anchor_offset:g} -> feature map {feature_size[0]}")
print(f"k = {k} anchors per location, {anchors.shape[0]} anchors: shape {tuple(anchors.shape)}")
print("first location's anchors:", anchors[:k].int().tolist())

# %% [markdown]
# Drawn on an image: the dots are the anchor centres (one per feature cell, at
# `(i + offset) * stride`: the course's offset 0.5 puts them in the middle of their cell, where
# torchvision's `offset=0` puts them on its top-left corner), the blue boxes the `k` anchors of the location
# nearest the image centre, and for each ground-truth box (white) its best anchor (dashed) with
# their IoU. Anchors may reach beyond the image border; the paper ignores those in training,
# torchvision keeps them.

# %%
plot_anchor_grid(image, anchors, anchor_stride, gt_boxes=target["boxes"])

# %% [markdown]
# ### Exercise 2: anchors at every location
#
# Write `my_anchor_grid(base, feature_size, stride, offset)`: shift the `k` base anchors to the
# centre `((j + offset) * stride, (i + offset) * stride)` of every cell `(i, j)` of an `H x W`
# feature map, locations row by row and the `k` anchors of a location together, as
# `AnchorGenerator` does above. Why it matters: anchor `a` must be the anchor the head's output
# `a` predicts for; the order is the contract between the two.

# %%
def my_anchor_grid(base, feature_size, stride, offset):
    """base (k, 4), feature_size (H, W), stride: int, offset: float -> (H * W * k, 4)."""
    ### BEGIN SOLUTION
    raise NotImplementedError
    ### END SOLUTION


check.anchor_grid(my_anchor_grid)

# %% [markdown]
# ### Exercise 3: IoU of every pair
#
# Write `my_iou(boxes1, boxes2)`: the intersection over union of every pair, `(N, M)`, for
# boxes `x1, y1, x2, y2`, without a Python loop (broadcast `boxes1[:, None]` against
# `boxes2[None]`). Why it matters: every stage that follows decides with IoU: which anchors are
# positive (03), which proposals NMS removes (05), which RoIs are foreground (07), and the mAP.

# %%
def my_iou(boxes1, boxes2):
    """boxes1 (N, 4), boxes2 (M, 4) -> IoU of every pair, (N, M)."""
    ### BEGIN SOLUTION
    raise NotImplementedError
    ### END SOLUTION


check.iou(my_iou)

# %% [markdown]
# ## Coverage: the best IoU of every ground-truth box
#
# In training (notebook 03) an anchor is positive when its IoU with a box is at least 0.7, and
# each box also takes its best anchor even below that. A box whose best IoU is low starts
# far from every anchor: the RPN must learn a large correction for it. So we measure, over the
# whole training set, each box's best IoU with the anchors of its image, and the share of boxes
# with a best IoU of at least 0.5 and 0.7.

# %%
coverage = coverage_over_dataset(generator, dataset)
print(f"{coverage['num_gt']} boxes in {coverage['num_images']} images: mean best IoU {coverage['mean_best_iou']:.3f}")
for t, share in coverage["covered"].items():
    print(f"  best IoU >= {t}: {share:.1%} of the boxes")
plot_anchor_coverage(coverage["best_iou"], thresholds=(0.5, 0.7))

# %% [markdown]
# ## Explore: sizes, ratios, stride
#
# The explorer computes what the cells above compute and draws the same two panels; it keeps one
# figure and moves only what changed (`rpnlab.lab.views`), so a change shows in a fraction of a
# second. Things to try: a stride of 16 (a quarter
# of the anchors: how much coverage at 0.7 is lost?), dropping the size 16 (what happens to the
# small boxes?), adding ratios 0.33 and 3. (The explorer places anchors with torchvision's
# offset 0, at the cells' corners; coverage hardly depends on it.)

# %%
explorer = widgets.anchor_explorer(dataset, sizes=anchor_sizes, ratios=anchor_ratios, stride=anchor_stride)
explorer

# %%
r = explorer.last_result
print(f"explorer update: {1000 * r['seconds']:.0f} ms to compute, {1000 * r['render_seconds']:.0f} ms to draw")

# %% [markdown]
# ## Aside: anchors from k-means
#
# YOLOv2 chose its anchor shapes by clustering the ground-truth widths and heights with the
# distance `1 - IoU` (boxes compared as if centred on one point). Those `k` shapes fit the boxes
# better than a sizes x ratios grid with the same `k`, measured by the mean best (centred) IoU.
# Faster R-CNN keeps the grid; the gap shows what it gives away.

# %%
gt_wh = coverage["gt_boxes"][:, 2:] - coverage["gt_boxes"][:, :2]
kmeans_wh = kmeans_anchors(gt_wh, k=min(kmeans_k, len(gt_wh)), seed=seed)
base_wh = generator.base_anchors()[:, 2:] - generator.base_anchors()[:, :2]
kmeans_fit = mean_best_iou(gt_wh, kmeans_wh)
grid_fit = mean_best_iou(gt_wh, base_wh)
print(f"mean best centred IoU: k-means ({len(kmeans_wh)} shapes) {kmeans_fit:.3f}, grid ({len(base_wh)} shapes) {grid_fit:.3f}")
sizes, ratios = wh_to_sizes_ratios(kmeans_wh)
print("k-means shapes as sizes:", [round(s) for s in sizes], "ratios h/w:", [round(r, 2) for r in ratios])
plot_kmeans_anchors(gt_wh, kmeans_wh, base_wh)

# %% [markdown]
# ## Check against torchvision
#
# torchvision's `AnchorGenerator` takes the same sizes and ratios and infers the stride from the
# image and feature-map sizes; its anchors sit at offset 0, so ours are shifted back by
# `offset * stride` pixels first. Same numbers, same order?

# %%
# NBVAL_CHECK_OUTPUT
tv_generator = TorchvisionAnchorGenerator(sizes=(tuple(anchor_sizes),), aspect_ratios=(tuple(anchor_ratios),))
images = ImageList(image[None], [tuple(image.shape[-2:])])
fmap = torch.zeros(1, 1, *feature_size[0])
theirs = tv_generator(images, [fmap])[0]
shift = anchor_offset * anchor_stride  # torchvision centres anchors at offset 0
torch.testing.assert_close(anchors.cpu() - shift, theirs)
print(f"{tuple(theirs.shape)} anchors (ours moved by {shift:g} px): matches torchvision: True")

# %% [markdown]
# ## What we measured

# %%
records.record("k", k)
records.record("num_anchors", anchors.shape[0])
records.record("num_gt", coverage["num_gt"])
records.record("mean_best_iou", coverage["mean_best_iou"])
records.record("coverage_at_0.5", coverage["covered"][0.5])
records.record("coverage_at_0.7", coverage["covered"][0.7])
records.record("kmeans_mean_iou", kmeans_fit)
records.record("grid_mean_iou", grid_fit)
records.record("explorer_ms", 1000 * r["seconds"])
records.record("explorer_render_ms", 1000 * r["render_seconds"])
records.save_record();
