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
# # 10 · Feature Pyramid Networks: one RPN over several feature maps
#
# **Goal.** See how the RPN works when the backbone gives a *pyramid* of feature maps instead
# of one (FPN, Lin et al. 2017, the setup of torchvision's and detectron2's Faster R-CNN): the
# anchors of each level and how many each contributes, the one head shared by all levels, why
# the proposal layer keeps a top-k *per level* and runs NMS per level, and which level each RoI
# is pooled from. Every piece is rpnlab's, and each is checked against torchvision's on the same
# features (the checks print True).
#
# One feature map at stride 16 sees a 32 px object as 2 x 2 cells and a 512 px one as 32 x 32:
# a single head and a single set of anchors must serve both. FPN builds feature maps at strides
# 4 to 64, each as deep in meaning as the last backbone stage (a top-down path adds the coarse
# map, upsampled, to each finer one), and gives each level the anchors of one size: small
# objects are found on the fine maps, large ones on the coarse.
#
# **Weights.** Nothing is downloaded. With torchvision's COCO weights in the torch hub cache
# the scores are a trained detector's; without them (and in CI) the model has random weights:
# the machinery, the counts of anchors and the checks are the same, the scores mean nothing.

# %% tags=["parameters"]
device: str = "auto"  # where tensors live: "auto" (CUDA, then MPS, then CPU), "cpu", "cuda", "cuda:N" or "mps"
seed: int = 0  # seeds the synthetic images and the random scores of the top-k comparison
smoke: bool = False  # tiny sizes for CI: 256 px input, fewer images for the level statistics
record_path: str = ""  # JSON file for the key figures; empty: runs/records/10_fpn.json
model_name: str = "fasterrcnn_resnet50_fpn"  # torchvision FPN detector: fasterrcnn_resnet50_fpn or fasterrcnn_resnet50_fpn_v2
weights: str = "auto"  # "auto" (COCO weights if cached, else random), "coco" (cached, else an error) or "random"
image_size: int = 512  # side of the input in pixels, a multiple of 64: the course's 128 px images are resized to it
image_index: int = 0  # the test image the figures show
num_images: int = 300  # training images whose boxes show the RoI level assignment
per_level: int = 5  # proposals drawn per level

# %%
# %matplotlib inline
import torch
import torch.nn.functional as F
from IPython.display import display

from rpnlab.data import SyntheticShapes, render_image
from rpnlab.detector.proposals import batched_nms
from rpnlab.engine.devices import resolve_device, seed_everything
from rpnlab.lab import records
from rpnlab.lab.course import course_setup
from rpnlab.lab.fpn import (
    check_anchors,
    check_image_size,
    check_level_assignment,
    check_proposals,
    check_roi_pooling,
    check_shared_head,
    fpn_departures,
    nms_by_level,
    open_fpn_detector,
    plot_level_assignment,
    plot_level_counts,
    plot_proposals_by_level,
    plot_pyramid_anchors,
    pyramid_levels,
    top_k_by_level,
    top_k_explorer,
)

records.begin("10_fpn", record_path)
seed_everything(seed)
dev = resolve_device(device)
if smoke:
    image_size, num_images = 256, 24
check_image_size(image_size)
model, tv_model, what = open_fpn_detector(model_name, weights)
model.to(dev)
print(f"{model_name}: {what}")

# %% [markdown]
# ## This notebook departs from the course setup
#
# Notebooks 01-09 use one feature map and the course's anchors (below, from `course_setup()`).
# An FPN has several levels by design, so everything here is torchvision's model and settings:

# %%
course = course_setup()
print(course.describe())
print("\nThis notebook departs from it:")
print("\n".join(f"- {line}" for line in fpn_departures(course, model.config.anchors, image_size, model_name)))

# %% [markdown]
# ## The pyramid and its anchors
#
# One synthetic test image, resized to `image_size`, goes through the backbone (a ResNet-50
# whose stages C2-C5 feed the FPN). The FPN gives P2-P5, 256 channels each, and torchvision adds
# P6 (`"pool"`, a max-pool of P5) for the RPN only. Each level gets anchors of one size in three
# aspect ratios, so `k = 3` anchors per location on every level, placed every `stride` pixels:

# %%
# NBVAL_CHECK_OUTPUT
generator = model.rpn.anchor_generator
names = list(model.backbone.names)
for name, stride, sizes, ratios, k in zip(names, generator.strides, generator.sizes, generator.aspect_ratios,
                                          generator.num_anchors_per_location()):
    print(f"P{stride.bit_length() - 1} (torchvision's {name!r:>6}): stride {stride:2d}, anchor sizes "
          f"{[int(s) for s in sizes]} px, ratios (h/w) {list(ratios)}, k = {k}")

# %%
pixels = render_image(seed, "test", image_index, 128)
image = F.interpolate(torch.from_numpy(pixels.image).float()[None] / 255, size=(image_size, image_size),
                      mode="bilinear", align_corners=False)[0].clamp(0, 1)
gt_boxes = torch.as_tensor(pixels.boxes, dtype=torch.float32) * image_size / 128
with torch.no_grad():
    x, image_sizes = model.prepare_images([image.to(dev)])
    features = model.backbone(x)
levels = pyramid_levels(generator, features, names)
for lv in levels:
    print(f"{lv['level']}: {lv['feature'][0]:3d} x {lv['feature'][1]:3d} cells x k = {lv['k']} "
          f"-> {lv['anchors']:6,} anchors ({lv['share']:.1%} of all)")
total_anchors = sum(lv["anchors"] for lv in levels)
print(f"{total_anchors:,} anchors in all on a {image_size} x {image_size} image; the finest level holds "
      f"{levels[0]['share']:.0%} of them, the coarsest {levels[-1]['share']:.2%}")

# %% [markdown]
# Each level has four times the cells of the next coarser one, so the finest level holds about
# three quarters of all anchors. Left, the anchors of one location per level (near the image
# centre; the filled square is that level's feature cell); right, the counts:

# %%
display(plot_pyramid_anchors(image, levels, [generator.base_anchors(i) for i in range(len(levels))],
                             title=f"{len(levels)} levels, one anchor size each"))

# %% [markdown]
# **Check.** torchvision's `AnchorGenerator`, given the same batch and feature maps, makes the
# same anchors in the same order (levels one after another, then locations row by row, then
# the `k` anchors of a location), bit for bit:

# %%
# NBVAL_CHECK_OUTPUT
anchors = generator([tuple(f.shape[-2:]) for f in features], device=x.device, dtype=x.dtype)
anchor_check = check_anchors(tv_model.rpn.anchor_generator, x.cpu(), image_sizes, [f.cpu() for f in features],
                             anchors.cpu())
print("anchors equal torchvision's AnchorGenerator, bit for bit:", anchor_check["equal"])

# %% [markdown]
# ## One head for every level
#
# The RPN head (a 3 x 3 conv, then 1 x 1 convs for the `k` objectness logits and `4k` offsets)
# is *shared*: the same weights slide over every level. It can be, because every level has the
# same channels (256) and the same `k` anchors per location, and on each level an object of that
# level's anchor size covers about the same number of cells. The FPN paper (sec. 4.1) also tried
# a head per level and found similar accuracy: the levels carry features of a similar kind. One
# head per level would hold one set of weights per level, and each would learn from its level's
# objects only.

# %%
# NBVAL_CHECK_OUTPUT
head_check = check_shared_head(model.rpn.head, tv_model.rpn.head, [f.cpu() for f in features])
print(f"one shared head: {head_check['parameters']:,} parameters "
      f"(one head per level would need {head_check['parameters_if_one_per_level']:,})")
print("objectness and offsets equal torchvision's RPNHead on every level (max difference < 1e-5):",
      max(head_check["max_diff"]) < 1e-5)

# %%
for lv, (objectness_shape, deltas_shape) in zip(levels, head_check["shapes"]):
    print(f"{lv['level']}: objectness {objectness_shape}, offsets {deltas_shape}")

# %% [markdown]
# ## Top-k per level, not over all anchors
#
# Before NMS the proposal layer keeps the best `pre_nms_top_n` boxes **of each level** (the
# model's counts are printed below), then clips, drops tiny boxes, and runs NMS. A single top-k
# over all anchors would take them mostly from the finest level, where most anchors are, and
# starve the coarse levels that hold the large objects. Here is what each does, first with this
# model's scores, then with scores drawn from one distribution on every level (no level
# favoured: a global ranking then picks about in proportion to the levels' anchor counts):

# %%
with torch.no_grad():
    rpn_out = model.rpn(features, image_sizes, return_intermediates=True)
inter = rpn_out.intermediates
pre_n = model.rpn.proposal_layer.pre_nms_top_n[1]  # the test count (eval mode)
print(f"pre_nms_top_n per level: {model.rpn.proposal_layer.pre_nms_top_n[0]} in training, {pre_n} at test time")
counts_model = top_k_by_level(inter["objectness"][0], inter["num_anchors_per_level"], pre_n)
g = torch.Generator().manual_seed(seed)
counts_even = top_k_by_level(torch.randn(total_anchors, generator=g), inter["num_anchors_per_level"], pre_n)
level_names = [f"{lv['level']} (stride {lv['stride']})" for lv in levels]
for label, counts in (("this model's scores", counts_model), ("scores alike on every level", counts_even)):
    print(f"{label}: per-level top-{pre_n} keeps {counts['per-level top-k']}, "
          f"a global top-{sum(counts['per-level top-k'])} keeps {counts['global top-k']}")
display(plot_level_counts({"anchors": counts_model["anchors"], "per-level top-k": counts_model["per-level top-k"],
                           "global top-k, this model": counts_model["global top-k"],
                           "global top-k, scores alike": counts_even["global top-k"]}, level_names,
                          title=f"boxes kept before NMS, per level: top-{pre_n} per level or the same number over all",
                          y_label="anchors"))
starved = counts_even["global top-k"][-1]
print(f"with scores alike, the global ranking gives the coarsest level {starved} of its "
      f"{counts_even['per-level top-k'][-1]} anchors that a per-level top-k keeps")

# %% [markdown]
# Move `k` (and pick the scores) to see where a global ranking starts to starve a level: the
# coarse levels keep all their anchors under a per-level top-k as soon as `k` exceeds their
# count, while a global top-k of the same total gives them only about their share of anchors.

# %%
explorer = top_k_explorer({"this model's": inter["objectness"][0].cpu(),
                           "alike on every level": torch.randn(total_anchors, generator=g)},
                          inter["num_anchors_per_level"], level_names, k=pre_n)
explorer

# %%
explorer.controls["k"].value = pre_n // 2  # one change, as a slider move makes it
r = explorer.last_result
print(f"explorer update: {1000 * r['seconds']:.0f} ms to compute, {1000 * r['render_seconds']:.0f} ms to draw; "
      f"at k = {pre_n // 2} a global top-k keeps {r['global top-k']} of the per-level {r['per-level top-k']}")
explorer.controls["k"].value = pre_n

# %% [markdown]
# ### Exercise 1: top-k per level
#
# Write `my_top_k_per_level(objectness, num_anchors_per_level, k)`: for a batch of logits
# `(B, A)` whose anchors are the levels' anchors one after another (`num_anchors_per_level`
# counts them), the indices `(B, K)` of the `k` best anchors *of each level* (all of a level's
# anchors when it has fewer than `k`), as positions in the full list of `A`. Why it matters: this
# is what keeps the coarse levels in the race, as the counts above show.
#
# Exercises: write the function's body in place of `raise NotImplementedError` (between the
# `### BEGIN SOLUTION` and `### END SOLUTION` markers) and run the cell; the `check` line tries it
# on hidden cases against rpnlab and torchvision and says right, or the first wrong case and why.
# Until then it says "not done yet" and the notebook runs on.

# %%
from rpnlab.lab.exercises import check


def my_top_k_per_level(objectness, num_anchors_per_level, k):
    """objectness (B, A) logits, num_anchors_per_level: list of A_l, k: int -> (B, K) int64 anchor indices."""
    ### BEGIN SOLUTION
    raise NotImplementedError
    ### END SOLUTION


check.top_k_per_level(my_top_k_per_level)

# %% [markdown]
# ## NMS per level
#
# NMS too runs per level (`batched_nms` with the level as the group, as torchvision and
# detectron2 do): a box never suppresses a box of another level. Boxes of different levels can
# cover the same object (after regression a P3 box and a P4 box may nearly coincide), so one
# NMS over all levels would remove more, mostly from whichever level scores lower. Then the best
# `post_nms_top_n` survivors over all levels are the proposals. Counted per level on this image:

# %%
post_n = model.rpn.proposal_layer.post_nms_top_n[1]
nms_thresh = model.rpn.proposal_layer.nms_thresh
nms_counts = nms_by_level(inter["pre_nms_boxes"][0], inter["pre_nms_scores"][0], inter["pre_nms_levels"][0],
                          len(levels), nms_thresh, post_n)
for label, counts in nms_counts.items():
    print(f"{label:>17}: {counts} ({sum(counts)} boxes)")
display(plot_level_counts(nms_counts, level_names, title=f"NMS at IoU {nms_thresh} per level or across levels "
                          f"(at most {post_n} kept)"))

# %% [markdown]
# The proposals are exactly the best survivors of this per-level NMS (at most `post_nms_top_n`),
# so each keeps its level. The best few of each level:

# %%
pre_boxes, pre_scores, pre_levels = (inter[key][0] for key in ("pre_nms_boxes", "pre_nms_scores", "pre_nms_levels"))
keep = batched_nms(pre_boxes, pre_scores, pre_levels, nms_thresh)[:post_n]
print(f"the {len(rpn_out.proposals[0])} proposals are the best (at most {post_n}) survivors of per-level NMS:",
      torch.equal(pre_boxes[keep], rpn_out.proposals[0]))
display(plot_proposals_by_level(image, pre_boxes[keep], pre_scores[keep], pre_levels[keep], level_names, per_level))

# %% [markdown]
# **Check.** torchvision's `RegionProposalNetwork` (eval mode), given the same features, gives
# the same proposals:

# %%
# NBVAL_CHECK_OUTPUT
proposal_check = check_proposals(tv_model.rpn, x.cpu(), image_sizes, [f.cpu() for f in features], names,
                                 [p.cpu() for p in rpn_out.proposals])
print("proposals equal torchvision's RegionProposalNetwork (same count, max difference < 1e-3 px):",
      proposal_check["same_count"] and proposal_check["max_diff"] < 1e-3)


# %% [markdown]
# ## Which level pools a RoI
#
# The second stage pools each RoI from one level, P2-P5 (not P6). FPN's rule (eq. 1 of the
# paper) sends a RoI of `sqrt(w h) = 224` px (ImageNet's image size) to P4, and each halving of
# its side one level finer: `k = floor(4 + log2(sqrt(w h) / 224))`, clamped to `[2, 5]`. So a
# RoI is pooled where it covers about the same number of cells as a 224 px box does on P4, 14 x
# 14.
#
# ### Exercise 2: the level of a RoI
#
# Write `my_fpn_level(boxes, k_min, k_max)`: for boxes `(K, 4)` in pixels, the index `k - k_min`
# of the level each is pooled from, as an int64 tensor `(K,)`. Add torchvision's `eps = 1e-6`
# before the floor. Why it matters: the rule decides which features the head sees for every
# RoI, and it is the one place where the second stage needs to know about the pyramid.

# %%
def my_fpn_level(boxes, k_min, k_max):
    """boxes (K, 4) x1, y1, x2, y2 in pixels, k_min, k_max: the pooler's levels -> (K,) int64 in [0, k_max - k_min]."""
    ### BEGIN SOLUTION
    raise NotImplementedError
    ### END SOLUTION


check.fpn_level(my_fpn_level)

# %% [markdown]
# The course's objects, resized with their images to `image_size`, span the first levels. The
# boxes of the training images, by the level that pools them:

# %%
pooler = getattr(model.roi_heads.pooler, "pooler", model.roi_heads.pooler)  # the pooler's own levels, P2-P5
k_min, k_max = pooler.k_min, pooler.k_max
train_set = SyntheticShapes("train", num_images=num_images, seed=seed)
train_boxes = torch.cat([train_set[i][1]["boxes"] for i in range(len(train_set))]) * image_size / 128
gt_levels = check_level_assignment(train_boxes, k_min, k_max)
train_scale = torch.sqrt((train_boxes[:, 2] - train_boxes[:, 0]) * (train_boxes[:, 3] - train_boxes[:, 1]))
print(f"box scale sqrt(w h) at {image_size} px: {train_scale.min():.0f} to {train_scale.max():.0f} px")
proposal_levels = check_level_assignment(rpn_out.proposals[0].cpu(), k_min, k_max)
print(f"{len(train_boxes)} boxes of {num_images} training images at {image_size} px, per level "
      f"P{k_min}-P{k_max}: {gt_levels['counts']}")
print(f"the {len(rpn_out.proposals[0])} proposals of the image above, per level: {proposal_levels['counts']}")
display(plot_level_assignment(train_boxes, k_min, k_max))

# %% [markdown]
# **Check.** The level rule equals torchvision's `LevelMapper`, and rpnlab's `RoIPooler` over
# P2-P5 pools the same 7 x 7 features as torchvision's `MultiScaleRoIAlign` for the proposals
# above and the image's boxes:

# %%
# NBVAL_CHECK_OUTPUT
pool_boxes = [torch.cat((rpn_out.proposals[0].cpu(), gt_boxes))]
pool_levels = len(pooler.spatial_scales)
pooling_check = check_roi_pooling(pooler, [f.cpu() for f in features[:pool_levels]], names[:pool_levels],
                                  pool_boxes, image_sizes, pooler.sampling_ratio)
print("level of every box equals torchvision's LevelMapper:",
      gt_levels["equal"] and proposal_levels["equal"] and check_level_assignment(pool_boxes[0], k_min, k_max)["equal"])
print("RoIPooler equals torchvision's MultiScaleRoIAlign (max difference < 1e-5 of the largest value):",
      pooling_check["rel_diff"] < 1e-5)

# %% [markdown]
# ## What we measured

# %%
records.record("model_name", model_name)
records.record("coco_weights", what.startswith("COCO"))
records.record("image_size", image_size)
records.record("strides", [lv["stride"] for lv in levels])
records.record("anchors_per_level", [lv["anchors"] for lv in levels])
records.record("anchors_equal_torchvision", anchor_check["equal"])
records.record("head_parameters", head_check["parameters"])
records.record("head_max_diff", max(head_check["max_diff"]))
records.record("pre_nms_top_n", pre_n)
records.record("top_k_per_level", counts_model["per-level top-k"])
records.record("global_top_k_model_scores", counts_model["global top-k"])
records.record("global_top_k_even_scores", counts_even["global top-k"])
records.record("nms_counts", nms_counts)
records.record("explorer_ms", 1000 * r["seconds"])
records.record("explorer_draw_ms", 1000 * r["render_seconds"])
records.record("proposals_max_diff_px", proposal_check["max_diff"])
records.record("proposals_same_count", proposal_check["same_count"])
records.record("gt_boxes_per_level", gt_levels["counts"])
records.record("proposals_per_level", proposal_levels["counts"])
records.record("levels_equal_torchvision", gt_levels["equal"] and proposal_levels["equal"])
records.record("roi_pooling_max_diff", pooling_check["max_diff"])
records.record("device", str(dev))
records.save_record();
