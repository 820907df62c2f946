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
# # 05 · Proposals: from hundreds of scored anchors to a short list
#
# **Goal.** Turn the RPN's dense predictions into region proposals, one step at a time
# (decode, top-k, clip, drop small boxes, NMS, top-n), count what each step keeps, check the
# result and our NMS against torchvision, and measure how many proposals it takes to find the
# objects (recall against the number of proposals).
#
# Every anchor gets a score and a box; most are background or duplicates of one another. The
# proposal layer (Ren et al. 2015, sec. 3.3) keeps the best-scoring boxes, removes
# near-duplicates by non-maximum suppression and hands a few hundred (the paper: 300 at test
# time) to the Fast R-CNN head.

# %% tags=["parameters"]
device: str = "auto"  # where tensors live: "auto" (CUDA, then MPS, then CPU), "cpu", "cuda", "cuda:N" or "mps"
seed: int = 0  # seeds the data order, the weights and the anchor sampler
smoke: bool = False  # tiny sizes for CI: a few training iterations on a handful of images
record_path: str = ""  # JSON file for the key figures; empty: runs/records/05_proposals.json
rpn_checkpoint: str = ""  # a trained RPN checkpoint.pt (notebook 04 prints where its runs are); empty: the course RPN (cached; trained here the first time)
iterations: int = 250  # SGD steps of the RPN trained here when rpn_checkpoint is empty
num_images: int = 600  # training images of that RPN
num_val_images: int = 150  # validation images the recall is measured on
image_index: int = 0  # the validation image the step-by-step figures show
pre_nms_top_n: int = 600  # best boxes kept before NMS (test time; torchvision 1000, py-faster-rcnn 6000)
post_nms_top_n: int = 100  # proposals kept after NMS (test time; the paper and py-faster-rcnn 300)
nms_thresh: float = 0.7  # NMS suppresses a box whose IoU with a better kept box is above this
min_size: float = 0.0  # boxes narrower or lower than this (pixels, after clipping) are dropped

# %%
# %matplotlib inline
import torch
import torchvision

from rpnlab.data import SyntheticShapes
from rpnlab.detector.proposals import nms
from rpnlab.engine.checkpoint import load_model
from rpnlab.engine.devices import resolve_device, seed_everything
from rpnlab.lab import records, widgets
from rpnlab.lab.course import course_setup, departures, setup_of
from rpnlab.lab.figures import new_figure
from rpnlab.lab.proposals import (
    plot_proposal_steps,
    plot_recall_curves,
    proposal_funnel,
    recall_by_setting,
    rpn_outputs,
)
from rpnlab.lab.pitfalls import topk_per_image_vs_batch
from rpnlab.lab.reference import torchvision_rpn
from rpnlab.lab.stage_training import course_rpn
from rpnlab.lab.timing import time_call

record_file = records.begin("05_proposals", record_path)
seed_everything(seed)
dev = resolve_device(device)
if smoke:
    iterations, num_images, num_val_images = 3, 8, 4
val_set = SyntheticShapes("val", num_images=num_val_images, seed=seed)

# %% [markdown]
# ## A trained RPN
#
# Proposals are only interesting from a trained RPN. Without a checkpoint this takes the course
# RPN (`course_rpn`): trained briefly, as notebook 04 does, the first time any notebook asks for
# it, then cached and shared with notebook 07 (`make prepare` trains it before a workshop). The
# cell says which happened and how long it took. Then the backbone and the head run once over
# the validation images; everything below works from these dense predictions.

# %%
if rpn_checkpoint:
    model = load_model(rpn_checkpoint, map_location=dev)
    print(f"RPN loaded from {rpn_checkpoint}")
else:
    course = course_rpn(iterations, num_images, seed=seed, device=device)  # trains only when the cache lacks it
    model = course.model
    print(course.describe())
outputs = rpn_outputs(model, val_set)
anchors, box_coder = outputs["anchors"], model.rpn.box_coder
print(f"{len(val_set)} validation images x {anchors.shape[0]} anchors: objectness {tuple(outputs['objectness'].shape)}, "
      f"offsets {tuple(outputs['deltas'].shape)}")

# %% [markdown]
# ## The course setup
#
# The anchors and anchor sampling of notebooks 01 and 03, which the RPN above was trained with;
# an RPN from another checkpoint may differ, and this cell says how. The proposal counts below
# are this notebook's parameters (the model's own training and test counts are printed at the
# end).

# %%
course = course_setup()
print(course.describe())
print("\n".join(departures(course, vars(setup_of(model.config)), {
    name: "the RPN checkpoint given was trained with it" for name in vars(course)}))
      or "this notebook: the course setup, unchanged")

# %% [markdown]
# ## The proposal layer, step by step
#
# For one image, in torchvision's order (`rpnlab.lab.proposals.proposal_funnel`):
#
# 1. **decode** the offsets of every anchor into a box (notebook 02; the RPN's weights are 1, 1, 1, 1);
# 2. **top-k**: keep the `pre_nms_top_n` best objectness logits;
# 3. **clip** the boxes to the image (the count does not change, the boxes do);
# 4. **drop small** boxes, narrower or lower than `min_size`;
# 5. **score threshold** on the probability `sigmoid(logit)` (0 here: nothing dropped);
# 6. **NMS**: from the best score down, drop every box whose IoU with an already kept box is
#    above `nms_thresh`;
# 7. **top-n**: the `post_nms_top_n` best survivors are the proposals.
#
# py-faster-rcnn clips and drops small boxes *before* its top-k; torchvision, detectron2 and
# rpnlab take the top-k first, which saves work and differs only when small boxes rank high.

# %%
image, target = val_set[image_index]
objectness, deltas = outputs["objectness"][image_index], outputs["deltas"][image_index]
image_size = outputs["image_sizes"][image_index]
funnel = proposal_funnel(anchors, objectness, deltas, image_size, pre_nms_top_n, post_nms_top_n, nms_thresh, min_size,
                         box_coder=box_coder)
for step, count in funnel["counts"].items():
    print(f"{step:>16}: {count}")
print(f"clipping changed {funnel['num_clipped']} of the {funnel['counts']['top-k']} top-k boxes")
plot_proposal_steps(image, funnel, target["boxes"])

# %% [markdown]
# ### Exercise 1: clip to the image
#
# Write `my_clip_boxes(boxes, image_size)`: move every coordinate into the image, `x` into
# `[0, width]` and `y` into `[0, height]`, with `image_size = (height, width)`. Why it matters:
# decoded boxes often reach past the border (step 3 above); unclipped, they score well and win
# NMS over boxes that fit the object.
#
# Exercises: write the function's body in place of `raise NotImplementedError` (between the
# `### BEGIN SOLUTION` and `### END SOLUTION` markers) and run the cell; the `check` line tries it
# on hidden cases against rpnlab and torchvision and says right, or the first wrong case and why.
# Until then it says "not done yet" and the notebook runs on.

# %%
from rpnlab.lab.exercises import check


def my_clip_boxes(boxes, image_size):
    """boxes (N, 4), image_size (height, width) -> (N, 4) inside the image."""
    ### BEGIN SOLUTION
    raise NotImplementedError
    ### END SOLUTION


check.clip_boxes(my_clip_boxes)

# %% [markdown]
# ## Check against torchvision
#
# torchvision's RPN with the same settings filters the same predictions (its own decoding
# included): the same proposals, in the same order, with the same scores.

# %%
# NBVAL_CHECK_OUTPUT
tv_rpn = torchvision_rpn(model.rpn, pre_nms_top_n_test=pre_nms_top_n, post_nms_top_n_test=post_nms_top_n,
                         nms_thresh=nms_thresh, min_size=min_size).eval()
tv_decoded = tv_rpn.box_coder.decode(deltas[None], [anchors]).view(1, -1, 4)
(tv_boxes,), (tv_scores,) = tv_rpn.filter_proposals(tv_decoded, objectness[None], [image_size], [anchors.shape[0]])
torch.testing.assert_close(funnel["boxes"], tv_boxes, rtol=1e-5, atol=1e-4)
torch.testing.assert_close(funnel["scores"], tv_scores)
print("step-by-step proposals match torchvision's RegionProposalNetwork.filter_proposals: True")

# %% [markdown]
# ## Non-maximum suppression
#
# `rpnlab.detector.proposals.nms` is NMS in plain PyTorch: sort by score, then keep or drop each box in
# turn, using IoUs computed in blocks. It is sequential, so it is slow next to torchvision's
# compiled kernel, but it keeps the same boxes in the same order (equal scores keep their input
# order, as torchvision's CPU kernel).

# %%
# NBVAL_CHECK_OUTPUT
boxes, scores = funnel["pre_nms_boxes"], funnel["pre_nms_scores"]
same_keep = all(torch.equal(nms(boxes, scores, t), torchvision.ops.nms(boxes, scores, t)) for t in (0.3, 0.5, 0.7, 0.9))
print("our nms keeps the same boxes, in the same order, as torchvision.ops.nms at IoU 0.3, 0.5, 0.7 and 0.9:", same_keep)

# %%
nms_ms = {"rpnlab (plain PyTorch)": 1000 * time_call(lambda: nms(boxes, scores, nms_thresh)),
          "torchvision.ops.nms": 1000 * time_call(lambda: torchvision.ops.nms(boxes, scores, nms_thresh))}
for name, ms in nms_ms.items():
    print(f"{name:>22}: {ms:.2f} ms for {boxes.shape[0]} boxes")

# %% [markdown]
# ### Exercise 2: non-maximum suppression
#
# Write `my_nms(boxes, scores, iou_threshold)`: go through the boxes from the highest score
# down; keep a box unless a box kept before it overlaps it with IoU `> iou_threshold`. Return the
# kept indices in that order. Why it matters: without NMS the 2000 proposals would be a few
# objects repeated hundreds of times; it is also the last step of every detector's output.

# %%
def my_nms(boxes, scores, iou_threshold):
    """boxes (N, 4), scores (N,), iou_threshold: float -> keep (K,) int64, by decreasing score."""
    ### BEGIN SOLUTION
    raise NotImplementedError
    ### END SOLUTION


check.nms(my_nms)

# %% [markdown]
# ## Explore: counts and threshold
#
# The explorer reruns `proposal_funnel` (the offsets are decoded once) and draws what
# `plot_proposal_steps` draws, moving only the boxes that changed. Try: an NMS threshold of 0.3 (fewer, more
# distinct proposals: do objects lose theirs?) and of 1.0 (no suppression: the best boxes
# crowd on the most confident object); a post-NMS count of 5.

# %%
explorer = widgets.proposal_explorer(image, anchors, objectness, deltas, target["boxes"], pre_nms_top_n=pre_nms_top_n,
                                     post_nms_top_n=post_nms_top_n, nms_thresh=nms_thresh, min_size=min_size,
                                     box_coder=box_coder)
explorer

# %%
r = explorer.last_result
print(f"explorer update: {1000 * r['seconds']:.1f} ms to compute, {1000 * r['render_seconds']:.0f} ms to draw")

# %% [markdown]
# ## Recall against the number of proposals
#
# How many proposals does the second stage need? For every validation image take its best `N`
# proposals and count the ground-truth boxes that one of them overlaps with IoU >= 0.5 (or 0.7):
# the recall (`rpnlab.engine.evaluation.proposal_recall`). Compared: three NMS thresholds, and no NMS
# at all (the best boxes by score, tf-faster-rcnn's "top" mode).

# %%
num_proposals = (1, 2, 5, 10, 20, 50, 100, 200, 300)
settings = {f"NMS {t}": dict(pre_nms_top_n=pre_nms_top_n, post_nms_top_n=300, nms_thresh=t, min_size=min_size)
            for t in (0.5, 0.7, 0.9)}
settings["no NMS"] = dict(pre_nms_top_n=pre_nms_top_n, post_nms_top_n=300, min_size=min_size, mode="top")
recall = recall_by_setting(outputs, settings, num_proposals, box_coder=box_coder)
at_10, at_100 = num_proposals.index(10), num_proposals.index(100)
for name, r in recall.items():
    print(f"{name:>7}: recall at IoU 0.5 with 10 / 100 proposals: {r['recall_50'][at_10]:.1%} / {r['recall_50'][at_100]:.1%}; "
          f"at IoU 0.7: {r['recall_70'][at_10]:.1%} / {r['recall_70'][at_100]:.1%}")
fig, axes = new_figure(1, 2, (5.0, 3.8))
for ax, key, iou in zip(axes[0], ("recall_50", "recall_70"), (0.5, 0.7)):
    plot_recall_curves({name: (num_proposals, r[key]) for name, r in recall.items()}, ax=ax,
                           x_label="proposals per image (log scale)", title=f"recall at IoU {iou}")
    ax.set_xscale("log")
fig

# %% [markdown]
# ## Training and test counts differ
#
# The proposal layer keeps more boxes while training than at test time. In training the Fast
# R-CNN head samples its RoIs from the proposals (notebook 07), so it needs many and varied ones;
# at test time every proposal costs a head evaluation, and recall (above) flattens after a few
# hundred. The paper gives 2000 proposals for training and 300 for testing; the counts before NMS
# (12000 in training, 6000 at test) are py-faster-rcnn's, not the paper's. `RPNConfig` has both
# pairs (`pre_nms_top_n_train` / `post_nms_top_n_train` and `..._test`); the model switches with
# `model.train()` / `model.eval()`. The defaults of `RPNConfig` (py-faster-rcnn's) and the course's
# model preset, scaled down to a few thousand anchors per image:

# %%
from rpnlab.config import RPNConfig
from rpnlab.detector.model import synthetic_model_config

for name, rpn_cfg in (("RPNConfig defaults", RPNConfig()), ("course model preset", synthetic_model_config().rpn)):
    print(f"{name:>20}: train {rpn_cfg.pre_nms_top_n_train} -> NMS -> {rpn_cfg.post_nms_top_n_train}; "
          f"test {rpn_cfg.pre_nms_top_n_test} -> NMS -> {rpn_cfg.post_nms_top_n_test}")

# %% [markdown]
# ### Pitfall: top-k per image, not per batch
#
# The last step keeps the best `post_nms_top_n` proposals *of each image*. Taking the best
# `post_nms_top_n x B` of the whole batch of `B` images instead keeps the same total, but an
# image whose objects score high (many objects, easy ones) takes the slots of an image whose
# objects score lower, which is then left with few proposals or none, so its objects get no RoI
# in the head. Detectron (Caffe2) took the top-k of its FPN proposals per batch; detectron2 takes
# it per image and says so next to `POST_NMS_TOPK_TRAIN` in its config. On a batch of 8 validation images, 10
# proposals per image either way (`rpnlab.lab.pitfalls.topk_per_image_vs_batch`, after NMS):

# %%
per_image_k, batch = 10, range(min(8, len(val_set)))
candidates = [proposal_funnel(anchors, outputs["objectness"][i], outputs["deltas"][i], outputs["image_sizes"][i],
                              pre_nms_top_n, 300, nms_thresh, min_size, box_coder=box_coder) for i in batch]
topk = topk_per_image_vs_batch([c["boxes"] for c in candidates], [c["scores"] for c in candidates],
                               [outputs["gt_boxes"][i] for i in batch], per_image_k)
print(f"{'':>10} {'proposals kept per image':>34}   gt boxes found (IoU >= 0.5)")
for name, r in topk.items():
    print(f"{name:>10} {str(r['kept']):>34}   {sum(r['found'])} of {sum(r['num_gt'])} ({r['recall']:.0%})")
starved = [i for i, n in enumerate(topk["per_batch"]["kept"]) if n < per_image_k // 2]
print(f"per batch, {len(starved)} of {len(candidates)} images keep fewer than {per_image_k // 2} proposals "
      f"(images {starved}), holding {sum(topk['per_image']['num_gt'][i] for i in starved)} gt boxes")

# %% [markdown]
# The totals are the same; what changes is who gets them. The per-batch rule can even find as
# many boxes over the batch, by spending slots where scores are high, while single images lose
# all of theirs: training then sees no RoI for their objects, and at test time an image's
# detections would depend on the other images of its batch.
#
# Things to look for (recall curves above). A strict threshold (0.5) can run out of boxes: fewer than 300 survive, and
# its curves flatten. NMS keeps the *best-scoring* box of a cluster, not the best-placed one, so
# a strict threshold costs most at IoU 0.7. Without NMS, the first places go to near-copies of
# the most confident boxes. With a few thousand anchors and a few objects per image the
# differences are smaller than on 1000 x 600 images with about 20000 anchors.
#
# ## What we measured

# %%
main = recall.get(f"NMS {nms_thresh}", recall["NMS 0.7"])
records.record("num_anchors", anchors.shape[0])
records.record("funnel_counts", funnel["counts"])
records.record("num_clipped", funnel["num_clipped"])
records.record("nms_same_keep_as_torchvision", same_keep)
records.record("nms_ms", nms_ms)
records.record("recall_50_at_100", main["recall_50"][at_100])
records.record("recall_70_at_100", main["recall_70"][at_100])
records.record("average_recall_at_100", main["average_recall"][at_100])
records.record("recall_50_at_100_by_setting", {name: r["recall_50"][at_100] for name, r in recall.items()})
records.record("topk_kept_per_image", topk["per_image"]["kept"])
records.record("topk_kept_per_batch", topk["per_batch"]["kept"])
records.record("topk_recall", {name: r["recall"] for name, r in topk.items()})
records.record("explorer_ms", 1000 * explorer.last_result["seconds"])
records.record("explorer_render_ms", 1000 * explorer.last_result["render_seconds"])
records.save_record();
