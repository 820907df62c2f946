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
# # 03 · Matching and sampling: which anchors learn from which box
#
# **Goal.** Turn anchors and ground-truth boxes into training labels for the RPN. Each anchor is
# *positive* (it should say "object" and regress onto a box), *negative* ("background") or
# *ignored* (too ambiguous to teach anything). Then pick a balanced mini-batch of them, because
# an image has a few positives and hundreds of negatives.
#
# The paper's rule (sec. 3.1.2): an anchor is positive if its IoU with some box is at least
# 0.7, **or** if it is a box's best anchor (so that every object gets at least one, even when no
# anchor reaches 0.7); negative if its IoU with every box is below 0.3; ignored otherwise. Each
# image then contributes 256 anchors, up to half of them positive.

# %% tags=["parameters"]
device: str = "auto"  # where tensors live: "auto" (CUDA, then MPS, then CPU), "cpu", "cuda", "cuda:N" or "mps"
seed: int = 0  # seeds the dataset and the sampler
smoke: bool = False  # tiny sizes for CI: a handful of images instead of the full split
record_path: str = ""  # JSON file for the key figures; empty: runs/records/03_matching_sampling.json
anchor_sizes: list = []  # anchor sizes in pixels (square root of the area); empty: the course setup's
anchor_ratios: list = []  # anchor aspect ratios as height / width; empty: the course setup's
anchor_stride: int = 0  # feature stride in pixels (one anchor location every this many); 0: the course setup's
high_threshold: float = 0.7  # IoU at or above which an anchor is positive
low_threshold: float = 0.3  # IoU below which an anchor is negative; in between it is ignored
allow_low_quality_matches: bool = True  # each box also takes its best anchors, even below high_threshold
batch_size_per_image: int = 0  # anchors sampled per image for the loss; 0: the course setup's
positive_fraction: float = 0.5  # at most this share of the sampled anchors is positive
image_index: int = 0  # the image the figures show
num_images: int = 600  # training images the label statistics are gathered over

# %%
# %matplotlib inline
import torch
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler
from torchvision.models.detection._utils import Matcher as TorchvisionMatcher

from rpnlab.data import SyntheticShapes
from rpnlab.detector.anchors import AnchorGenerator
from rpnlab.detector.boxes import box_iou
from rpnlab.detector.matching import BalancedSampler, Matcher, label_anchors, label_anchors_batch
from rpnlab.engine.devices import resolve_device, seed_everything
from rpnlab.lab import records, widgets
from rpnlab.lab.course import course_setup, departures, resolve
from rpnlab.lab.anchors import coverage_over_dataset, default_feature_sizes
from rpnlab.lab.matching import label_counts, plot_iou_matrix, plot_matching

records.begin("03_matching_sampling", record_path)
seed_everything(seed)
dev = resolve_device(device)
if smoke:
    num_images = 24
dataset = SyntheticShapes("train", num_images=num_images, seed=seed)
course = course_setup()
used = resolve(course, anchor_sizes=anchor_sizes, anchor_ratios=anchor_ratios, anchor_stride=anchor_stride,
               batch_size_per_image=batch_size_per_image)
anchor_sizes, anchor_ratios = list(used["anchor_sizes"]), list(used["anchor_ratios"])
anchor_stride, batch_size_per_image, anchor_offset = used["anchor_stride"], used["batch_size_per_image"], course.anchor_offset
used.update(high_threshold=high_threshold, low_threshold=low_threshold, positive_fraction=positive_fraction)
generator = AnchorGenerator(sizes=anchor_sizes, aspect_ratios=anchor_ratios, strides=anchor_stride, offset=anchor_offset)
image, target = dataset[image_index]
feature_size = default_feature_sizes(tuple(image.shape[-2:]), [anchor_stride])
anchors = generator(feature_size, device=dev)
gt = target["boxes"].to(dev)

# %% [markdown]
# ## The course setup
#
# The anchors of notebook 01 and the matching and sampling of the detector that notebooks 04-09
# train (`synthetic_model_config`); a notebook that departs from them says so here.

# %%
print(course.describe())
print("\n".join(departures(course, used)) or "this notebook: the course setup, unchanged")

# %% [markdown]
# ## The IoU matrix
#
# Everything starts from the IoU of every box with every anchor: an `(M, A)` matrix, `M` boxes
# by `A` anchors. Below, its columns for the 4 best anchors of each box; squares mark IoU >= the
# high threshold, circles >= the low one.

# %%
# NBVAL_CHECK_OUTPUT
iou = box_iou(gt, anchors)  # (M, A)
print(f"{gt.shape[0]} boxes x {anchors.shape[0]} anchors -> IoU matrix {tuple(iou.shape)}")
print("best IoU of each box:", [round(v, 3) for v in iou.max(dim=1).values.tolist()])
print(f"anchors with IoU >= {high_threshold} with some box:", int((iou.max(dim=0).values >= high_threshold).sum()))

# %%
columns = iou.topk(min(4, iou.shape[1]), dim=1).indices.flatten().unique()
plot_iou_matrix(iou[:, columns].cpu(), row_labels=[f"gt {i}" for i in range(gt.shape[0])],
                    col_labels=[f"a{j}" for j in columns.tolist()], thresholds=(high_threshold, low_threshold))

# %% [markdown]
# ## The matcher
#
# `Matcher` turns the matrix into one code per anchor, as torchvision's does: the index of the
# matched box (`>= 0`), `-1` below the low threshold (background) or `-2` in between (ignored).
# With `allow_low_quality_matches` each box also claims the anchors that reach *its* best IoU,
# ties included. Compare the two settings: which boxes get positives only through that rule?

# %%
# NBVAL_CHECK_OUTPUT
matcher = Matcher(high_threshold, low_threshold, allow_low_quality_matches=allow_low_quality_matches)
strict = Matcher(high_threshold, low_threshold, allow_low_quality_matches=False)
for name, m in (("with low-quality matches", matcher), ("without", strict)):
    codes = m(iou)
    matched_boxes = sorted(codes[codes >= 0].unique().tolist())
    print(f"{name:>25}: {int((codes >= 0).sum())} matched, {int((codes == -1).sum())} background, "
          f"{int((codes == -2).sum())} ignored; boxes with a positive: {matched_boxes}")

# %% [markdown]
# `label_anchors` gives the RPN's labels (1 positive, 0 negative, -1 ignored) and each
# positive's box. Drawn: all positives, and a sample of the ignored and negative anchors.

# %%
# NBVAL_CHECK_OUTPUT
labels, matched_gt_boxes = label_anchors(anchors, gt, matcher)
counts = label_counts(labels)
print(counts)

# %%
plot_matching(image, anchors, labels, gt)

# %% [markdown]
# ### Exercise 1: label anchors
#
# Write `my_label_anchors(iou, high, low)`: from the `(M, A)` IoU matrix (gt boxes x anchors),
# the label of every anchor: 1 if its best IoU is `>= high`, 0 if `< low`, -1 in between, and 1
# for every anchor that reaches some gt box's own best IoU (the low-quality rule, ties
# included). Why it matters: these labels are what the RPN learns; without the last rule the
# small objects above would have no positive anchor at all.
#
# Exercises: write the function's body in place of `raise NotImplementedError` (between the
# `### BEGIN SOLUTION` and `### END SOLUTION` markers) and run the cell; the `check` line tries it
# on hidden cases against rpnlab and torchvision and says right, or the first wrong case and why.
# Until then it says "not done yet" and the notebook runs on.

# %%
from rpnlab.lab.exercises import check


def my_label_anchors(iou, high, low):
    """iou (M, A), high, low: floats -> labels (A,) float: 1 positive, 0 negative, -1 ignored."""
    ### BEGIN SOLUTION
    raise NotImplementedError
    ### END SOLUTION


check.label_anchors(my_label_anchors)

# %% [markdown]
# ## Explore: thresholds and the low-quality rule
#
# The explorer recomputes the labels with `label_anchors` and draws what `plot_matching` draws,
# moving only the boxes and bars that changed. Try: raise the high threshold to 0.9 with the low-quality rule off (how many
# boxes keep a positive?), then turn the rule on; lower the low threshold to 0.1 (fewer
# negatives, more ignored).

# %%
explorer = widgets.matching_explorer(dataset, sizes=anchor_sizes, ratios=anchor_ratios, stride=anchor_stride,
                                     index=image_index, high_threshold=high_threshold,
                                     low_threshold=low_threshold, allow_low_quality_matches=allow_low_quality_matches)
explorer

# %%
r = explorer.last_result
print(f"explorer update: {1000 * r['seconds']:.0f} ms to compute, {1000 * r['render_seconds']:.0f} ms to draw")

# %% [markdown]
# ## Anchors that cross the border
#
# The paper (sec. 3.1.3) ignores, during training, every anchor that reaches beyond the image:
# about two thirds of its 20000 anchors per image. Those anchors would give large, hard-to-learn
# targets and, kept, they do not let training converge. torchvision and detectron2 keep them.
# rpnlab follows either: `label_anchors(..., image_size=..., ignore_cross_boundary=True)` (and
# `RPNConfig(ignore_cross_boundary=True)` for the model) leaves them out of the matching and
# labels them -1. At test time nothing is dropped: the proposals are clipped to the image.

# %%
inside = ((anchors[:, 0] >= 0) & (anchors[:, 1] >= 0) & (anchors[:, 2] <= image.shape[-1])
          & (anchors[:, 3] <= image.shape[-2]))
border_labels, _ = label_anchors(anchors, gt, matcher, image_size=tuple(image.shape[-2:]), ignore_cross_boundary=True)
border_counts = label_counts(border_labels)
print(f"{int((~inside).sum())} of {anchors.shape[0]} anchors cross the border of this image ({(~inside).float().mean():.0%})")
print("labels, all anchors:          ", counts)
print("labels, ignore_cross_boundary:", border_counts)
assert bool((border_labels[~inside] == -1).all())

# %% [markdown]
# ## The balanced sampler
#
# The loss is computed on `batch_size_per_image` anchors per image, at most
# `positive_fraction` of them positive; when an image has fewer positives, negatives fill the
# rest. Without it, hundreds of easy negatives would dominate the loss and the network would
# learn to say "background" everywhere.

# %%
# NBVAL_CHECK_OUTPUT
sampler = BalancedSampler(batch_size_per_image, positive_fraction, generator=torch.Generator().manual_seed(seed))
pos_masks, neg_masks = sampler([labels])
sampled = torch.full_like(labels, -1)
sampled[pos_masks[0]], sampled[neg_masks[0]] = 1, 0
print(f"{counts['positive']} positives, {counts['negative']} negatives -> sampled "
      f"{int(pos_masks[0].sum())} positive + {int(neg_masks[0].sum())} negative")

# %%
plot_matching(image, anchors, sampled, gt, max_ignored=0,
                  names={"positive": "sampled positive", "negative": "sampled negative", "ignored": "not sampled"})

# %% [markdown]
# ### Exercise 2: a balanced sample
#
# Write `my_sample(labels, batch_size, positive_fraction)`: pick at random at most
# `int(batch_size * positive_fraction)` positives, then negatives to fill the batch, as the
# sampler above; return two boolean masks. Why it matters: an image has hundreds of easy
# negatives for a handful of positives; the loss only sees this sample.

# %%
def my_sample(labels, batch_size, positive_fraction):
    """labels (A,) 1/0/-1 -> (pos_mask, neg_mask), each bool (A,)."""
    ### BEGIN SOLUTION
    raise NotImplementedError
    ### END SOLUTION


check.sample(my_sample)

# %% [markdown]
# ## Over the training set
#
# How many positives does an image get, and how many boxes get one only through the
# low-quality rule (their best IoU is below the high threshold)? With small objects that share
# is large (measured below): the rule is not a corner case here. Notebook 01's explorer shows how
# the stride changes it.

# %%
gt_list = [dataset[i][1]["boxes"].to(dev) for i in range(len(dataset))]
all_labels, _ = label_anchors_batch(anchors, gt_list, matcher)  # (B, A)
all_counts = label_counts(all_labels)
pos_masks_all, neg_masks_all = sampler(list(all_labels))
sampled_pos = torch.stack([m.sum() for m in pos_masks_all]).float()
sampled_total = sampled_pos + torch.stack([m.sum() for m in neg_masks_all]).float()
coverage = coverage_over_dataset(generator, dataset, thresholds=(high_threshold,))
mean_positives = sum(all_counts["positive"]) / len(dataset)
positive_share = (sampled_pos.sum() / sampled_total.sum()).item()
low_quality_share = 1 - coverage["covered"][high_threshold]
print(f"{len(dataset)} images: {mean_positives:.1f} positive anchors per image on average")
print(f"share of positives among the sampled anchors: {positive_share:.1%} (at most {positive_fraction:.0%})")
print(f"boxes whose best IoU is below {high_threshold}: {low_quality_share:.1%} of {coverage['num_gt']}")

# %% [markdown]
# ## Check against torchvision
#
# torchvision's `Matcher` on the same IoU matrices (every image with boxes, with and without the
# low-quality rule), and its `BalancedPositiveNegativeSampler` after the same `manual_seed`
# (our sampler without a generator draws from the global RNG, in the same order).

# %%
# NBVAL_CHECK_OUTPUT
same = True
for boxes in gt_list:
    if len(boxes) == 0:
        continue  # torchvision's Matcher refuses an image without boxes; ours returns all -1
    q = box_iou(boxes, anchors)
    for low_quality in (True, False):
        ours = Matcher(high_threshold, low_threshold, low_quality)(q)
        theirs = TorchvisionMatcher(high_threshold, low_threshold, allow_low_quality_matches=low_quality)(q)
        same &= torch.equal(ours, theirs)
print("matched indices of every image match torchvision:", same)

# %%
# NBVAL_CHECK_OUTPUT
torch.manual_seed(seed)
ours_pos, ours_neg = BalancedSampler(batch_size_per_image, positive_fraction)([labels])
torch.manual_seed(seed)
theirs_pos, theirs_neg = BalancedPositiveNegativeSampler(batch_size_per_image, positive_fraction)([labels])
print("sampled the same anchors as torchvision:",
      torch.equal(ours_pos[0], theirs_pos[0].bool()) and torch.equal(ours_neg[0], theirs_neg[0].bool()))

# %% [markdown]
# ## What we measured

# %%
records.record("num_anchors", anchors.shape[0])
records.record("image_positive", counts["positive"])
records.record("image_negative", counts["negative"])
records.record("image_ignored", counts["ignored"])
records.record("sampled_positive", pos_masks[0].sum())
records.record("sampled_negative", neg_masks[0].sum())
records.record("mean_positives_per_image", mean_positives)
records.record("sampled_positive_share", positive_share)
records.record("low_quality_only_share", low_quality_share)
records.record("explorer_ms", 1000 * r["seconds"])
records.record("explorer_render_ms", 1000 * r["render_seconds"])
records.save_record();
