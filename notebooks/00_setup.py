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
# # 00 · Setup: the environment, the device, the data
#
# **Goal.** Check that everything the course needs is installed, see which device PyTorch will
# use, and meet the embedded dataset that the next notebooks detect objects in.
#
# Every notebook in this course starts with a *parameters* cell. In JupyterLab you edit it and
# run all cells; headless, `papermill` or `rpnlab run` inject new values (try
# `papermill --help-notebook notebooks/00_setup.ipynb`). `smoke=True` shrinks every size so the
# whole collection runs in CI in a few minutes.

# %% tags=["parameters"]
device: str = "auto"  # where tensors live: "auto" (CUDA, then MPS, then CPU), "cpu", "cuda", "cuda:N" or "mps"
seed: int = 0  # seeds the dataset and every random generator
smoke: bool = False  # tiny sizes for CI: a handful of images instead of the full split
record_path: str = ""  # JSON file for the key figures; empty: runs/records/00_setup.json
num_images: int = 600  # training images to summarise (the full synthetic train split is 600)
num_samples: int = 8  # images drawn with their boxes

# %%
# %matplotlib inline
import torch
import torchvision

from rpnlab.data import SyntheticShapes
from rpnlab.detector.boxes import box_iou
from rpnlab.engine.devices import describe_environment, resolve_device, seed_everything
from rpnlab.lab import records, widgets
from rpnlab.lab.anchors import dataset_gt_boxes
from rpnlab.lab.figures import plot_dataset_statistics, show_dataset_samples

records.begin("00_setup", record_path)
seed_everything(seed)
if smoke:
    num_images, num_samples = 16, 4

# %% [markdown]
# ## Versions and device
#
# `resolve_device("auto")` picks CUDA if there is a GPU, then Apple's MPS, then the CPU. An
# explicit device that is not there raises an error instead of silently falling back.

# %%
env = describe_environment(device)
for key, value in env.items():
    print(f"{key:>12}: {value}")

# %%
dev = resolve_device(device)
x = torch.randn(512, 512, device=dev)
print(f"a 512 x 512 matrix product on {dev}: mean |x @ x| = {(x @ x).abs().mean().item():.2f}")

# %% [markdown]
# ## The embedded dataset
#
# `SyntheticShapes` draws rectangles, ellipses and triangles on cluttered backgrounds: 128 x 128
# images, 0 to 6 objects each, objects 12 to 77 pixels across. It is generated from a seed (the
# same pixels on every machine), cached under `data/synthetic/`, and needs no download, so a
# workshop on fresh machines can start at once. A sample is an image `(3, H, W)` in `[0, 1]` and
# a target dict: `boxes (M, 4)` as `x1, y1, x2, y2` pixels, `labels (M,)` in `1..C`
# (0 is reserved for the background).

# %%
dataset = SyntheticShapes("train", num_images=num_images, seed=seed)
print(dataset)
print("classes:", dataset.classes)

# %%
# NBVAL_CHECK_OUTPUT
image, target = dataset[0]
print("image:", tuple(image.shape), image.dtype, f"values in [{image.min():.2f}, {image.max():.2f}]")
print("boxes:", target["boxes"].int().tolist())
print("labels:", target["labels"].tolist(), "->", [dataset.classes[i - 1] for i in target["labels"]])

# %%
show_dataset_samples(dataset, n=num_samples)

# %% [markdown]
# Browse the images one by one (drag the slider; this needs a live kernel):

# %%
browser = widgets.dataset_browser(dataset)
browser

# %% [markdown]
# ## At a glance: classes, sizes, shapes
#
# The anchors of notebook 01 must fit these boxes: their sizes (`sqrt(w * h)`) and aspect
# ratios (`h / w`) decide which anchor sizes and ratios make sense. Note how small the objects
# are compared with the paper's anchors (128 to 512 pixels, for ~500-pixel images).

# %%
boxes, labels, _ = dataset_gt_boxes(dataset)
stats = dataset.describe()
print(f"{stats['num_images']} images, {stats['num_objects']} objects, {stats['empty_images']} images without objects")
print("objects per class:", stats["per_class"])
print("size sqrt(w*h) px: min {min:.0f}, median {median:.0f}, max {max:.0f}".format(**stats["size_px"]))
print("ratio h/w: min {min:.2f}, median {median:.2f}, max {max:.2f}".format(**stats["ratio_hw"]))
plot_dataset_statistics(boxes, labels, dataset.classes)

# %% [markdown]
# ## A first check against torchvision
#
# Every piece of `rpnlab` that torchvision also has is compared with it. The simplest one is
# the IoU (intersection over union) of two sets of boxes; here all boxes of the first images,
# each against each.

# %%
# NBVAL_CHECK_OUTPUT
first_boxes = torch.cat([dataset[i][1]["boxes"] for i in range(8)])
ours = box_iou(first_boxes, first_boxes)
theirs = torchvision.ops.box_iou(first_boxes, first_boxes)
torch.testing.assert_close(ours, theirs)  # raises, naming the largest difference, if they differ
print(f"IoU matrix {tuple(ours.shape)}: matches torchvision: True")

# %% [markdown]
# ## What we measured

# %%
records.record("device", str(dev))
records.record("torch", torch.__version__)
records.record("num_images", stats["num_images"])
records.record("num_objects", stats["num_objects"])
records.record("objects_per_class", stats["per_class"])
records.record("median_size_px", stats["size_px"]["median"])
records.record("median_ratio_hw", stats["ratio_hw"]["median"])
records.save_record();
