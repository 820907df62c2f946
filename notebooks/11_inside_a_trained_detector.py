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
# # 11 · Inside a trained detector: torchvision's Faster R-CNN, opened up
#
# **Goal.** Take one of torchvision's COCO-trained Faster R-CNN models, turn it into an rpnlab
# model with the same weights (`FasterRCNN.from_torchvision`), and look at every stage the course
# built on your own photos: which anchors fire, the proposals before and after NMS, the RoIs and
# the pyramid level each is pooled from, and the head's class scores down to the detections.
#
# **Weights.** rpnlab never downloads inside a notebook. With torchvision's COCO weights in the
# torch hub cache (`~/.cache/torch/hub/checkpoints/`; `rpnlab train --init torchvision:<name>` or
# `torchvision.models.get_weight(...).get_state_dict()` put them there when online) you see a
# trained detector. Without them, and in CI, the model has **random weights**: every figure below
# still shows the machinery, but its boxes mean nothing. The cell after the imports says which.
#
# **Photos.** Point `photo_folder` at a folder of JPEG/PNG photos; empty uses synthetic shapes.

# %% tags=["parameters"]
device: str = "auto"  # where tensors live: "auto" (CUDA, then MPS, then CPU), "cpu", "cuda", "cuda:N" or "mps"
seed: int = 0  # seeds the synthetic images (when photo_folder is empty)
smoke: bool = False  # tiny sizes for CI: random weights, two small images
record_path: str = ""  # JSON file for the key figures; empty: runs/records/11_inside_a_trained_detector.json
model_name: str = "fasterrcnn_mobilenet_v3_large_320_fpn"  # torchvision detector: fasterrcnn_resnet50_fpn(_v2), fasterrcnn_mobilenet_v3_large(_320)_fpn
weights: str = "auto"  # "auto" (COCO weights if cached, else random), "coco" (cached, else an error) or "random"
photo_folder: str = ""  # folder of your photos (JPEG, PNG); empty: synthetic shapes
max_photos: int = 4  # photos read from the folder
image_index: int = 0  # the photo the figures show
top: int = 30  # boxes drawn per figure
score_thresh: float = 0.5  # detections drawn at the end score at least this

# %%
# %matplotlib inline
import torch
import torch.nn.functional as F
from IPython.display import display

from rpnlab.data import render_image
from rpnlab.data.transforms import ResizeShortestSide
from rpnlab.engine.devices import resolve_device, seed_everything
from rpnlab.lab import records
from rpnlab.lab.figures import draw_boxes, plot_funnel
from rpnlab.lab.inside import firing_anchors, open_torchvision_detector, plot_firing_anchors, read_photos, roi_levels
from rpnlab.lab.proposals import plot_proposals
from rpnlab.lab.roi import detection_funnel

records.begin("11_inside_a_trained_detector", record_path)
seed_everything(seed)
dev = resolve_device(device)
if smoke:
    weights, max_photos, top = "random", 2, 10
model, tv_model, what = open_torchvision_detector(model_name, weights)
model.to(dev)
min_size, max_size = model.input_size
if smoke:
    min_size, max_size = 192, 256
print(f"{model_name}: {what}")
print(f"input size {min_size}/{max_size} px, {model.num_classes} classes, strides {model.backbone.strides}")

# %% [markdown]
# The converted model holds torchvision's weights and nothing else: the same number of
# parameters. Its anchors and strides are read from torchvision's model, level by level.

# %%
# NBVAL_CHECK_OUTPUT
tv_parameters = sum(p.numel() for p in tv_model.parameters())
rpnlab_parameters = sum(p.numel() for p in model.parameters())
print(f"parameters: torchvision {tv_parameters:,}, rpnlab {rpnlab_parameters:,}")
for level, (sizes, stride) in enumerate(zip(model.config.anchors.sizes, model.backbone.strides)):
    print(f"level {level}: stride {stride}, anchor sizes {[int(s) for s in sizes]}, "
          f"ratios (h/w) {list(model.config.anchors.aspect_ratios[level])}")

# %% [markdown]
# ## The photos
#
# Resized as torchvision resizes them for this model (shorter side `min_size`, longer at most
# `max_size`). Large JPEGs are decoded at reduced scale, straight to about that size.

# %%
if photo_folder:
    images, names = read_photos(photo_folder, min_size, max_size, max_photos)
else:
    resize = ResizeShortestSide(min_size, max_size)
    images, names = [], []
    for i in range(max_photos):
        pixels = torch.from_numpy(render_image(seed, "test", i, 128).image).float() / 255
        images.append(resize(pixels, {"boxes": torch.zeros(0, 4)})[0])
        names.append(f"synthetic {i}")
image = images[image_index]
with torch.no_grad():
    detections, inter = model([im.to(dev) for im in images], return_intermediates=True)
rpn = inter["rpn"]
print(f"{len(images)} images; image {image_index} ({names[image_index]}) is {tuple(image.shape[1:])} px")

# %% [markdown]
# ## Anchors that fire
#
# The RPN scores every anchor of every pyramid level. Here are the anchors it scores highest on
# this photo, coloured by level: small anchors on the fine levels, large ones on the coarse.

# %%
fired = firing_anchors(rpn["anchors"], rpn["objectness"][image_index], rpn["num_anchors_per_level"], top=top)
display(plot_firing_anchors(image, fired, list(model.backbone.strides)))
print("anchors per level:", rpn["num_anchors_per_level"])
print("anchors with objectness >= 0.5 per level:", fired["firing_per_level"])

# %% [markdown]
# ## Proposals before and after NMS
#
# Each level's best anchors are decoded, clipped and filtered; NMS (per level) then removes
# near-duplicates, and the best proposals over all levels go on to the second stage.

# %%
before, before_scores = rpn["pre_nms_boxes"][image_index], rpn["pre_nms_scores"][image_index]
after, after_scores = rpn["post_nms_boxes"][image_index], rpn["post_nms_scores"][image_index]
proposals = inter["proposals"][image_index]
display(plot_funnel({"anchors": sum(rpn["num_anchors_per_level"]), "top-k per level": len(before),
                     "after NMS": len(after), "proposals": len(proposals)}, title="the proposal layer"))
display(plot_proposals(image, before, before_scores, top=top, title=f"before NMS: best {top} of {len(before)}"))
display(plot_proposals(image, after, after_scores, top=top, title=f"after NMS: best {top} of {len(after)}"))

# %% [markdown]
# ## RoIs and the level they are pooled from
#
# In inference the RoIs are the proposals. FPN pools each from the level that suits its size
# (a 224 px box from stride 16, each halving one level finer).

# %%
rois = inter["roi"]["rois"][image_index]
levels = roi_levels(rois, model.roi_heads.pooler)
print(f"{len(rois)} RoIs of image {image_index}, pooled to {tuple(inter['roi']['pooled'].shape[1:])} each")
print("RoIs per pooling level:", levels)

# %% [markdown]
# ## The head's scores, down to the detections
#
# For every RoI the head gives `C + 1` class scores (background first) and a box per class.
# Post-processing keeps (RoI, class) pairs above the score threshold, drops tiny boxes, runs
# per-class NMS and keeps the best 100.

# %%
start = sum(len(r) for r in inter["roi"]["rois"][:image_index])
count = len(rois)
logits = inter["roi"]["class_logits"][start:start + count]
regression = inter["roi"]["box_regression"][start:start + count]
probs = F.softmax(logits, dim=-1)
print(f"background probability over the RoIs: median {probs[:, 0].median():.3f}, min {probs[:, 0].min():.3f}")
cfg = model.roi_heads.config
funnel = detection_funnel(logits, regression, rois, tuple(image.shape[1:]), model.roi_heads.box_coder,
                          cfg.score_thresh, cfg.nms_thresh, cfg.detections_per_img)
display(plot_funnel(funnel["counts"], title="post-processing"))
det = detections[image_index]
keep = det["scores"] >= score_thresh
display(draw_boxes(image, det["boxes"][keep].cpu(), det["labels"][keep].cpu(), det["scores"][keep].cpu(),
                   class_names=model.class_names, title=f"{int(keep.sum())} detections scoring >= {score_thresh}"))

# %% [markdown]
# ## Check: torchvision's own model gives the same detections
#
# On a crop whose sides are multiples of 64 (where torchvision's per-batch anchor strides equal
# the true ones, see `rpnlab.detector.torchvision_models`), with torchvision's resize switched to
# scale 1, both models see the same pixels. The score threshold is lowered to 0.001 for the
# comparison, so that random weights (whose class scores are all near 1/91) leave detections too.

# %%
h, w = (s // 64 * 64 for s in image.shape[1:])
crop = image[:, :h, :w]
tv_model.transform.min_size, tv_model.transform.max_size = (min(h, w),), max(h, w)
kept_thresh = cfg.score_thresh
tv_model.roi_heads.score_thresh = cfg.score_thresh = 0.001
with torch.no_grad():
    theirs = tv_model([crop])[0]
    ours = model.cpu()([crop])[0]
cfg.score_thresh = kept_thresh
same_count = len(theirs["boxes"]) == len(ours["boxes"])
max_box_diff = float((theirs["boxes"] - ours["boxes"]).abs().max()) if same_count and len(ours["boxes"]) else 0.0
print(f"torchvision: {len(theirs['boxes'])} detections, rpnlab: {len(ours['boxes'])}; "
      f"largest box difference {max_box_diff:.2e} px")

# %% [markdown]
# ## What we measured

# %%
records.record("model_name", model_name)
records.record("coco_weights", what.startswith("COCO"))
records.record("num_images", len(images))
records.record("anchors_per_level", rpn["num_anchors_per_level"])
records.record("firing_per_level", fired["firing_per_level"])
records.record("proposals_before_nms", len(before))
records.record("proposals_after_nms", len(after))
records.record("rois_per_level", levels)
records.record("detection_counts", funnel["counts"])
records.record("same_detection_count_as_torchvision", same_count)
records.record("max_box_difference_px", max_box_diff)
records.record("device", str(dev))
records.save_record();
