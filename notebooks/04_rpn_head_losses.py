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
# # 04 · The RPN head and its losses
#
# **Goal.** Follow the tensors through the Region Proposal Network's head, understand its two
# losses (objectness and box regression) and how they are weighted, check them against
# torchvision, then train the RPN alone on the synthetic shapes and watch the losses fall.
#
# The head (Ren et al. 2015, sec. 3.1) slides a small network over the backbone's feature map:
# a 3x3 conv, then two sibling 1x1 convs. At each location one predicts an *objectness* score
# for each of the `k` anchors there, the other 4 box offsets per anchor (notebook 02's
# `tx, ty, tw, th`). The anchor labels of notebook 03 say what these should be.

# %% tags=["parameters"]
device: str = "auto"  # where tensors live: "auto" (CUDA, then MPS, then CPU), "cpu", "cuda", "cuda:N" or "mps"
seed: int = 0  # seeds the data order, the weights and the anchor sampler
smoke: bool = False  # tiny sizes for CI: a few training iterations on a handful of images
record_path: str = ""  # JSON file for the key figures; empty: runs/records/04_rpn_head_losses.json
objectness: str = "sigmoid"  # objectness of the trained RPN: "sigmoid" (k scores) or "softmax" (2k scores)
loss_normalization: str = "sampled"  # loss weighting of the main run: "sampled" (torchvision's) or "paper" (1/N_cls, lambda/N_reg)
compare_normalizations: bool = True  # also train with the other weighting, for the comparison at the end
iterations: int = 250  # SGD steps of each training run (250, with the defaults below: the course RPN, cached)
batch_size: int = 8  # images per SGD step
num_images: int = 600  # training images (the synthetic train split has 600)
num_val_images: int = 150  # validation images the proposals are scored on
checkpoint_dir: str = ""  # cache folder of the trained RPNs (reused when the settings match); empty: the course cache (data/cache/course)

# %%
# %matplotlib inline
import torch
import torch.nn.functional as F

from rpnlab.data import SyntheticShapes, collate
from rpnlab.detector.losses import objectness_loss, rpn_loss, smooth_l1, softmax_objectness_reshape
from rpnlab.detector.model import FasterRCNN, synthetic_model_config
from rpnlab.detector.rpn import RPNHead, flatten_head_outputs
from rpnlab.engine.devices import resolve_device, seed_everything
from rpnlab.engine.train import RPN_LOSSES
from rpnlab.lab import records
from rpnlab.lab.course import course_setup, departures, setup_of
from rpnlab.lab.figures import plot_loss_curves
from rpnlab.lab.proposals import plot_proposals, recall_by_setting, rpn_outputs
from rpnlab.lab.reference import torchvision_rpn, torchvision_rpn_forward
from rpnlab.lab.rpn import plot_objectness_forms, plot_smooth_l1, plot_softmax_reshape
from rpnlab.lab.stage_training import course_rpn

records.begin("04_rpn_head_losses", record_path)
seed_everything(seed)
dev = resolve_device(device)
if smoke:
    iterations, batch_size, num_images, num_val_images = 3, 4, 8, 4
train_set = SyntheticShapes("train", num_images=num_images, seed=seed)
val_set = SyntheticShapes("val", num_images=num_val_images, seed=seed)
model_cfg = synthetic_model_config(train_set.num_classes)
model = FasterRCNN.from_config(model_cfg).to(dev).train()
images, targets = collate([train_set[i] for i in range(2)])
images, gt_boxes = images.to(dev), [t["boxes"].to(dev) for t in targets]

# %% [markdown]
# ## The course setup
#
# The anchors and the anchor sampling of notebooks 01 and 03 are those of the detector trained
# from here on (`synthetic_model_config`); a notebook that departs from them says so here.

# %%
course = course_setup()
print(course.describe())
print("\n".join(departures(course, vars(setup_of(model_cfg)))) or "this notebook: the course setup, unchanged")

# %% [markdown]
# ## Shapes through the head
#
# Two 128 x 128 images go through the course's small backbone (`synthetic_model_config()`:
# its stride, channels and anchors are printed below). At every cell of the `H x W` feature
# map the head predicts `k` objectness logits, one per anchor, and `4k` offsets;
# `flatten_head_outputs` puts them in anchor order (row-major cells, then the `k` anchors of a
# cell: the order of notebook 01's `AnchorGenerator`), `A = H * W * k` anchors per image.
#
# The paper's head predicts `2k` scores instead: a background and a foreground logit per anchor,
# turned into probabilities by a 2-class softmax.

# %%
# NBVAL_CHECK_OUTPUT
x, image_sizes = model.prepare_images(images)
with torch.no_grad():
    features = model.backbone(x)  # one level, stride 16
head = model.rpn.head
k = head.num_anchors
(scores,), (deltas,) = head(features)
flat_scores, flat_deltas = flatten_head_outputs([scores], [deltas])
print(f"images {tuple(x.shape)} -> features {tuple(features[0].shape)} (stride {model_cfg.anchors.strides[0]}); "
      f"k = {k} anchors per location")
print(f"sigmoid head: objectness {tuple(scores.shape)} (k channels), offsets {tuple(deltas.shape)} (4k channels)")
print(f"in anchor order: objectness {tuple(flat_scores.shape)}, offsets {tuple(flat_deltas.shape)}")
softmax_head = RPNHead(features[0].shape[1], k, model_cfg.rpn.conv_channels, objectness="softmax").to(dev)
(pairs,), _ = softmax_head(features)
print(f"softmax head: objectness {tuple(pairs.shape)} (2k channels) -> reshaped for the softmax "
      f"{tuple(softmax_objectness_reshape(pairs).shape)}")
print("head parameters:", {name: sum(p.numel() for p in m.parameters()) for name, m in head.named_children()})

# %% [markdown]
# py-faster-rcnn (Caffe) applies its softmax over the channel axis, so it reshapes the
# `(B, 2k, H, W)` scores to `(B, 2, k*H, W)`: with channels `[0:k]` background and `[k:2k]`
# foreground, the reshape simply cuts the stack of `2k` channel maps in two halves, and each
# position of the two output channels holds the (background, foreground) pair of one anchor.
# Drawn for a tiny case, every cell labelled with the channel it came from:

# %%
plot_softmax_reshape(k=3, height=2, width=3)

# %% [markdown]
# ## Sigmoid or softmax: the same probabilities
#
# A 2-class softmax depends only on the difference of its logits:
# `softmax(bg, fg)[fg] = 1 / (1 + exp(bg - fg)) = sigmoid(fg - bg)`. So `2k` scores describe
# exactly the probabilities `k` scores do, and the cross-entropy of the pair equals the binary
# cross-entropy of `z = fg - bg`. The softmax head just spends `k` redundant outputs
# (torchvision and detectron2 use the sigmoid; rpnlab offers both, `RPNHead(objectness=...)`).

# %%
# NBVAL_CHECK_OUTPUT
g = torch.Generator().manual_seed(seed)
pair_logits = 3 * torch.randn(1000, 2, generator=g)  # (bg, fg) logits of 1000 anchors
labels = torch.randint(0, 2, (1000,), generator=g)
z = pair_logits[:, 1] - pair_logits[:, 0]
torch.testing.assert_close(F.softmax(pair_logits, dim=1)[:, 1], torch.sigmoid(z))
torch.testing.assert_close(objectness_loss(pair_logits, labels, "softmax"), objectness_loss(z, labels, "sigmoid"))
print("softmax(bg, fg)[fg] == sigmoid(fg - bg), and the two losses are equal: True")

# %%
plot_objectness_forms()

# %% [markdown]
# ## Smooth L1 for the offsets
#
# The offsets are regressed with the smooth L1 loss of Fast R-CNN: quadratic for errors below
# `beta`, linear above. Its gradient never exceeds 1, so a badly matched anchor with a huge
# error cannot swamp the others (L2's gradient grows with the error), and it is smooth near 0
# (L1's jumps). Fast R-CNN's smooth L1 switches at 1 (`beta = 1`). The `sigma` comes from
# py-faster-rcnn's code, not the paper: `beta = 1 / sigma^2`, and its RPN uses `sigma = 3`, so
# `beta = 1/9` (torchvision keeps it); detectron2 uses `beta = 0` (plain L1) for the RPN.

# %%
plot_smooth_l1(betas=(1 / 9, 0.5, 1.0))

# %%
# NBVAL_CHECK_OUTPUT
prediction, target = 2 * torch.randn(2, 500, 4, generator=g)
for beta in (0.0, 1 / 9, 1.0):
    torch.testing.assert_close(smooth_l1(prediction, target, beta), F.smooth_l1_loss(prediction, target, beta=beta, reduction="sum"))
print("smooth_l1 equals torch.nn.functional.smooth_l1_loss for beta 0, 1/9 and 1: True")

# %% [markdown]
# ### Exercise 1: smooth L1
#
# Write `my_smooth_l1(input, target, beta)`: `0.5 * d**2 / beta` where `|d| < beta`, else
# `|d| - 0.5 * beta`, with `d = input - target`, summed over all elements. Why it matters: this is
# the RPN's (and the head's) box loss; its bounded gradient keeps a few badly matched anchors from
# swamping the rest.
#
# Exercises: write the function's body in place of `raise NotImplementedError` (between the
# `### BEGIN SOLUTION` and `### END SOLUTION` markers) and run the cell; the `check` line tries it
# on hidden cases against rpnlab and torchvision and says right, or the first wrong case and why.
# Until then it says "not done yet" and the notebook runs on.

# %%
from rpnlab.lab.exercises import check


def my_smooth_l1(input, target, beta):
    """input, target: same shape, beta > 0 -> the summed loss, a scalar."""
    ### BEGIN SOLUTION
    raise NotImplementedError
    ### END SOLUTION


check.smooth_l1(my_smooth_l1)

# %% [markdown]
# ## The two loss normalisations
#
# Each image contributes a sampled mini-batch of `batch_size_per_image` anchors (notebook 03; the
# course samples fewer than the paper's 256, see the count printed below). The paper's loss
# (eq. 1) is
#
# `L = 1/N_cls * sum_i L_cls(p_i, p*_i) + lambda/N_reg * sum_i p*_i L_reg(t_i, t*_i)`
#
# with `N_cls = 256`, `N_reg` the number of anchor *locations* (about 2400 for a 1000 x 600
# image at stride 16) and `lambda = 10`, so that both terms weigh about the same:
# `10 / 2400 ~ 1 / 256`. torchvision divides both sums by the number of anchors it actually
# sampled instead ("sampled"); detectron2 divides by `batch_size_per_image x images`, the number
# it would sample if every image filled its quota (the same here unless an image runs short of
# anchors). Our feature maps have far fewer than 2400 cells, so
# with the same `lambda` the paper's rule weighs the box term more than torchvision's; by how
# much is computed below, on the same sampled anchors of the untrained RPN:

# %%
out = model.rpn(features, image_sizes, gt_boxes, return_intermediates=True)
inter = out.intermediates
sampled = torch.where(inter["pos_mask"], 1.0, torch.where(inter["neg_mask"], 0.0, -1.0))
locations = features[0].shape[-2] * features[0].shape[-1]
num_positive, num_sampled = int(inter["pos_mask"].sum()), int((sampled >= 0).sum())
lam = model_cfg.rpn.reg_loss_weight
initial_losses = {}
for norm in ("sampled", "paper"):
    initial_losses[norm] = rpn_loss(inter["objectness"], inter["deltas"], sampled, inter["regression_targets"],
                                    normalization=norm, reg_weight=lam, num_anchor_locations=locations)
    print(f"{norm:>7}: objectness {initial_losses[norm]['loss_objectness']:.4f}, "
          f"box regression {initial_losses[norm]['loss_rpn_box_reg']:.4f}")
box_weight_ratio = (lam / (2 * locations)) / (1 / num_sampled)
print(f"{num_positive} positive among {num_sampled} sampled anchors (2 images, {locations} locations each): "
      f"the paper's box term weighs lambda / N_reg = {lam:g} / {2 * locations}, {box_weight_ratio:.1f}x torchvision's "
      f"1 / {num_sampled}")

# %% [markdown]
# ### Exercise 2: the RPN loss
#
# Write `my_rpn_loss(objectness, deltas, labels, targets)` with torchvision's normalisation
# ("sampled" above): objectness = binary cross-entropy with logits averaged over the sampled
# anchors (label 1 or 0); box = smooth L1 (`beta = 1/9`) over the positives, summed and divided
# by the number of sampled anchors; label -1 takes no part. Why it matters: it is the loss the
# RPN trains on below; which anchors count, and by what you divide, set the balance of the two
# terms.

# %%
def my_rpn_loss(objectness, deltas, labels, targets):
    """objectness (B, A) logits, deltas (B, A, 4), labels (B, A) 1/0/-1, targets (B, A, 4) -> (loss_objectness, loss_box)."""
    ### BEGIN SOLUTION
    raise NotImplementedError
    ### END SOLUTION


check.rpn_loss(my_rpn_loss)

# %% [markdown]
# ## Check against torchvision
#
# torchvision's `RegionProposalNetwork` with the same settings (`rpnlab.lab.reference.torchvision_rpn`),
# fed our sampled anchors so that both see the same random draw: torchvision's own code
# flattens the head's outputs, decodes, matches, computes the losses (its normalisation is
# "sampled") and filters the proposals. Where torchvision cannot express our convention (anchors
# centred in their cells, a 3x3 conv that narrows the channels) it runs our anchor generator or
# head inside its network; notebook 01 compared the anchors themselves.

# %%
# NBVAL_CHECK_OUTPUT
tv_rpn = torchvision_rpn(model.rpn)
tv_boxes, tv_losses = torchvision_rpn_forward(tv_rpn, features, image_sizes, model_cfg.anchors.strides[0], gt_boxes,
                                              inter["pos_mask"], inter["neg_mask"])
for key in RPN_LOSSES:
    torch.testing.assert_close(out.losses[key], tv_losses[key], rtol=1e-5, atol=1e-5)
for ours, theirs in zip(out.proposals, tv_boxes):
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-4)
print(f"losses {list(RPN_LOSSES)} match torchvision's: True")
print("proposals of both images match torchvision's: True")

# %% [markdown]
# ## Training the RPN alone
#
# Backbone + RPN, trained from scratch with SGD (`rpnlab.engine.train.train(schedule="rpn")`, through
# `rpnlab.lab.stage_training.train_rpn`), no Fast R-CNN head. With `compare_normalizations` a
# second run uses the other loss weighting, everything else equal.
#
# Each run is kept in the course cache (`course_rpn`), keyed by its settings: with the default
# parameters the first run *is* the course RPN that notebooks 05 and 07 use, and `make prepare`
# trains both runs ahead of a workshop. A run the cache lacks is trained here; the cell says
# which happened and how long the training took (then or now).

# %%
other = {"paper": "sampled", "sampled": "paper"}[loss_normalization]
runs = {}
for norm in [loss_normalization] + ([other] if compare_normalizations else []):
    runs[norm] = course_rpn(iterations, num_images, seed=seed, device=device, batch_size=batch_size,
                            cache_dir=checkpoint_dir or None, objectness=objectness, loss_normalization=norm,
                            need_history=True)  # trains only when the cache lacks it
    print(f"{norm}: {runs[norm].describe()}")
print(f"training here: {sum(r.train_seconds for r in runs.values() if r.trained_here):.0f} s; "
      f"loading from the cache: {sum(r.seconds for r in runs.values() if not r.trained_here):.1f} s")

# %%
curves = {f"{norm}: {key}": [h[key] for h in run.history] for norm, run in runs.items() for key in RPN_LOSSES}
fig = plot_loss_curves(curves, smooth=max(1, iterations // 20), title=f"RPN losses, {iterations} iterations of {batch_size} images")
fig.axes[0].set_yscale("log")
fig

# %% [markdown]
# The curves of the two runs are not comparable as numbers (the box losses are weighted
# differently); what counts is the proposals. Recall: the share of the validation boxes that
# one of an image's 100 best proposals overlaps with IoU >= 0.5 (or 0.7). Notebook 05 looks at
# proposals and recall in detail.

# %%
recall = {}
for norm, run in runs.items():
    outputs = rpn_outputs(run.model, val_set)
    test_setting = {"test": dict(pre_nms_top_n=600, post_nms_top_n=100, nms_thresh=0.7)}
    recall[norm] = recall_by_setting(outputs, test_setting, num_proposals=(10, 100))["test"]
    r = recall[norm]
    print(f"{norm:>7}: recall with 100 proposals: {r['recall_50'][-1]:.1%} at IoU 0.5, {r['recall_70'][-1]:.1%} at IoU 0.7 "
          f"({r['num_gt']} boxes in {len(val_set)} images)")

# %% [markdown]
# Recall at IoU 0.7 needs boxes that were *moved* onto the objects, not just well-ranked
# anchors, so it shows whether the box regression was learnt: compare the two weightings
# there, and their box-loss curves above. How much heavier the paper's rule makes the box term
# was printed in the normalisation section; the coarser the feature map, the larger that factor
# and the gap between the two runs.

# %%
image, target = val_set[0]
main_model = runs[loss_normalization].model
proposals = main_model([image.to(dev)], rpn_only=True)[0]
plot_proposals(image, proposals["boxes"], proposals["scores"], target["boxes"], top=10,
                   title=f"the 10 best proposals ({loss_normalization} normalisation)")

# %% [markdown]
# ## What we measured

# %%
records.record("k", k)
records.record("num_anchors", flat_scores.shape[1])
records.record("head_parameters", sum(p.numel() for p in head.parameters()))
records.record("initial_losses", initial_losses)
records.record("paper_box_weight_ratio", box_weight_ratio)
for norm, run in runs.items():
    tail = run.history[-max(1, len(run.history) // 10):]
    records.record(f"{norm}_final_losses", {key: sum(h[key] for h in tail) / len(tail) for key in RPN_LOSSES})
    records.record(f"{norm}_train_seconds", run.train_seconds)
    records.record(f"{norm}_trained_here", run.trained_here)
    records.record(f"{norm}_recall_50_at_100", recall[norm]["recall_50"][-1])
    records.record(f"{norm}_recall_70_at_100", recall[norm]["recall_70"][-1])
records.record("iterations", iterations)
records.save_record();
