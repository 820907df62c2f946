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
# # 06 · RoI pooling: a fixed-size feature grid for every proposal
#
# **Goal.** See how the second stage cuts a fixed `7 x 7` grid of features out of the feature
# map for a proposal of any size: RoI Pool (Fast R-CNN), RoI Align (Mask R-CNN) and
# crop-and-resize (tf-faster-rcnn). Draw the rounding RoI Pool does and measure what it costs,
# then check our plain-PyTorch kernels against torchvision's, forward and backward, and time them.
#
# The Fast R-CNN head ends in fully connected layers, which need the same number of inputs
# from every proposal; proposals come in every size and position.

# %% tags=["parameters"]
device: str = "auto"  # where tensors live: "auto" (CUDA, then MPS, then CPU), "cpu", "cuda", "cuda:N" or "mps"
seed: int = 0  # seeds the data and the random RoIs
smoke: bool = False  # tiny sizes for CI: fewer boxes and RoIs
record_path: str = ""  # JSON file for the key figures; empty: runs/records/06_roi_pooling.json
output_size: int = 7  # pooled grid per RoI, output_size x output_size (7 for VGG-16's fc6)
sampling_ratio: int = 2  # RoI Align: bilinear sample points per bin along each axis
stride: int = 16  # feature stride (VGG-16's in the paper): RoIs are scaled by 1 / stride onto the feature map
image_index: int = 0  # the image whose first box the figures pool
num_images: int = 600  # training images whose boxes measure the quantisation
num_rois: int = 256  # random RoIs of the equality check and the timing
channels: int = 64  # feature channels of the equality check and the timing

# %%
# %matplotlib inline
import torch
import torch.nn.functional as F

from rpnlab.data import SyntheticShapes
from rpnlab.detector.boxes import box_iou
from rpnlab.detector.roi import crop_and_resize_pool, roi_align, roi_pool
from rpnlab.engine.devices import resolve_device, seed_everything
from rpnlab.lab import records
from rpnlab.lab.course import course_setup, departures
from rpnlab.lab.pitfalls import roi_align_shift
from rpnlab.lab.figures import plot_value_histograms
from rpnlab.lab.roi import (
    compare_roi_kernels,
    plot_pooled_rois,
    plot_roi_quantisation,
    roi_pool_region,
    sparse_align_check,
)

records.begin("06_roi_pooling", record_path)
seed_everything(seed)
dev = resolve_device(device)
if smoke:
    num_images, num_rois = 24, 32
dataset = SyntheticShapes("train", num_images=num_images, seed=seed)
image, target = dataset[image_index]
box = target["boxes"][0]

# %% [markdown]
# ## The course setup
#
# RoI pooling uses no anchors; what it shares with the course is the feature stride. This
# notebook pools at the paper's stride 16 by default (VGG-16's), where RoI Pool's rounding is
# twice as coarse as at the course's stride and easier to see; it also measures the course's
# stride below (`stride // 2` when `stride` is 16).

# %%
course = course_setup()
print(course.describe())
print("\n".join(departures(course, {"anchor_stride": stride}, {
    "anchor_stride": "RoI pooling is shown at the paper's (VGG-16's) stride, where its rounding is coarsest"}))
      or "this notebook: the course setup, unchanged")

# %% [markdown]
# ## Rounding: what RoI Pool does to a box
#
# RoI Pool scales the box onto the feature grid (`x / stride`) and rounds its corners to whole
# cells; it then cuts the rounded box into `out x out` bins whose edges are rounded again
# (outwards) and takes each bin's maximum. Following Caffe, the rounded box spans cells `x1..x2`
# *inclusive*. RoI Align rounds nothing: its bins are exact and each averages a few bilinearly
# interpolated points. Left RoI Pool, right RoI Align, for this image's first box (2 x 2 bins,
# to keep the drawing readable). The grid lines are the cells' borders: each cell is centred on
# its integer coordinate, as `roi_pool_region` and RoI Align's bilinear sampling count them, so
# the rounded box encloses the exact one to within half a cell on each side:

# %%
plot_roi_quantisation(box.tolist(), spatial_scale=1 / stride, output_size=2, sampling_ratio=sampling_ratio)

# %%
# NBVAL_CHECK_OUTPUT
region = roi_pool_region(box[None], 1 / stride)[0]
print("box (pixels):          ", [round(v, 1) for v in box.tolist()])
print("box (feature cells):   ", [round(v / stride, 2) for v in box.tolist()])
print("RoI Pool reads (pixels):", [round(v, 1) for v in region.tolist()])
print(f"IoU of the box with what RoI Pool reads: {box_iou(box[None], region[None]).item():.3f}")

# %% [markdown]
# Which pixels do the cells `x1..x2` stand for? Cell `i` sits at pixel `i * stride` (as the
# anchors with offset 0 and RoI Align's sample points do), so it stands for the `stride` pixels
# around it, and RoI Pool reads `[(x1 - 1/2) * stride, (x2 + 1/2) * stride]`
# (`rpnlab.lab.roi.roi_pool_region`): a region that always contains the box, each edge
# pushed out by 0 to 1 cell, half a cell on average. Over every box of the training images,
# the IoU of the box with that region: small boxes are pooled together with a lot of their
# surroundings at stride 16. Halving the stride halves the damage; RoI Align avoids it.

# %%
boxes = torch.cat([dataset[i][1]["boxes"] for i in range(len(dataset))])
quantisation_iou = {f"stride {s}": box_iou(boxes, roi_pool_region(boxes, 1 / s)).diagonal() for s in (stride, stride // 2)}
for name, iou in quantisation_iou.items():
    print(f"{name}: mean IoU {iou.mean():.3f}, boxes below IoU 0.7: {(iou < 0.7).float().mean():.1%} of {len(iou)}")
plot_value_histograms(quantisation_iou, "IoU of a box with the region RoI Pool reads",
                          title="RoI Pool's rounding, over the training boxes", y_label="boxes")


# %% [markdown]
# ### Exercise 1: one RoI Pool bin
#
# Write `my_roi_pool_bin(feature, roi, output_size, i, j)`: the value of bin `(i, j)` of RoI
# Pool on a one-channel feature map, with the box already in feature cells. Round the corners
# (halves away from zero: `math.floor(v + 0.5)`); the box spans cells `x1..x2` inclusive; bin `j`
# covers columns `x1 + floor(j * w / out)` to `x1 + ceil((j + 1) * w / out)` (end excluded), rows
# likewise; clip to the map; the bin's maximum, or 0 if it is empty. Why it matters: this rounding
# is exactly the misalignment measured above, and what RoI Align removes.
#
# Exercises: write the function's body in place of `raise NotImplementedError` (between the
# `### BEGIN SOLUTION` and `### END SOLUTION` markers) and run the cell; the `check` line tries it
# on hidden cases against rpnlab and torchvision and says right, or the first wrong case and why.
# Until then it says "not done yet" and the notebook runs on.

# %%
import math

from rpnlab.lab.exercises import check


def my_roi_pool_bin(feature, roi, output_size, i, j):
    """feature (H, W), roi (4,) x1, y1, x2, y2 in cells, output_size: int, i, j: bin row and column -> a scalar tensor."""
    ### BEGIN SOLUTION
    raise NotImplementedError
    ### END SOLUTION


check.roi_pool_bin(my_roi_pool_bin)

# %% [markdown]
# ## Three ways to pool one box
#
# Pool the image itself, so that the outputs can be looked at: first at full resolution
# (spatial scale 1), then from the image averaged down to the stride, which is how coarse a
# real feature map is (`128 / stride` cells a side for our 128 x 128 images).
# crop-and-resize samples a `2out x 2out` grid bilinearly and max-pools it 2 x 2.

# %%
def pool_three_ways(feature_map, scale):
    rois = [box[None].to(feature_map)]
    return {"RoI Pool": roi_pool(feature_map, rois, output_size, scale)[0],
            "RoI Align": roi_align(feature_map, rois, output_size, scale, sampling_ratio)[0],
            "crop and resize": crop_and_resize_pool(feature_map, rois, output_size, scale)[0]}


plot_pooled_rois(image, box, pool_three_ways(image[None], 1.0), title="pooling the image itself (spatial scale 1)")

# %%
coarse = F.avg_pool2d(image[None], stride)  # (1, 3, H / stride, W / stride)
plot_pooled_rois(coarse[0], box / stride, pool_three_ways(coarse, 1 / stride),
                     title=f"pooling a {coarse.shape[-2]} x {coarse.shape[-1]} map: the image at stride {stride}")

# %% [markdown]
# ### Exercise 2: a bilinear read
#
# Write `my_bilinear(feature, y, x)`: the value at a point between cells (cell `(r, c)` holds
# the value at `y = r, x = c`), blending the four surrounding cells by their distances; on the
# last row or column there is no neighbour beyond, read the border cell. Why it matters: this is
# RoI Align's only operation: each bin averages a few such reads, so no coordinate is rounded.

# %%
def my_bilinear(feature, y, x):
    """feature (H, W), y, x: floats in [0, H - 1] and [0, W - 1] -> a scalar tensor."""
    ### BEGIN SOLUTION
    raise NotImplementedError
    ### END SOLUTION


check.bilinear(my_bilinear)

# %% [markdown]
# ## Check against torchvision, and timing
#
# `rpnlab.detector.roi.roi_pool` and `roi_align` are written in plain PyTorch, for reading:
# `roi_pool` groups the bins by size, reads each group's cells at once and keeps each channel's
# first maximum; `roi_align` writes the bilinear reads and each bin's mean as two small matrices
# per box, `out = Wy @ feature_map @ Wx^T`. On random features and RoIs (some reaching outside the
# map) they must give what `torchvision.ops.roi_pool` / `roi_align` give, and the same gradient
# with respect to the features (for one random upstream gradient).

# %%
# NBVAL_CHECK_OUTPUT
g = torch.Generator().manual_seed(seed)
features = torch.randn(2, channels, 32, 32, generator=g).to(dev)  # 2 images of 512 x 512 pixels at stride 16
corners = torch.rand(num_rois, 2, generator=g) * 480 - 20
sizes = torch.rand(num_rois, 2, generator=g) * 200 + 1
batch_index = torch.randint(0, 2, (num_rois, 1), generator=g).float()
rois = torch.cat([batch_index, corners, corners + sizes], dim=1).to(dev)  # (K, 5): [image, x1, y1, x2, y2]
kernels = compare_roi_kernels(features, rois, output_size, 1 / stride, sampling_ratio)
for name, result in kernels.items():
    ok = result["forward_max_diff"] < 1e-4 and result["grad_max_diff"] < 1e-4
    print(f"{name}: forward and gradient match torchvision.ops.{name} (max difference < 1e-4): {ok}")

# %%
for name, result in kernels.items():
    print(f"{name}: plain PyTorch {1000 * result['python_seconds']:.1f} ms, torchvision {1000 * result['torchvision_seconds']:.1f} ms "
          f"per forward + backward of {num_rois} RoIs x {channels} channels on {dev}; max differences "
          f"{result['forward_max_diff']:.1e} (forward), {result['grad_max_diff']:.1e} (gradient)")

# %% [markdown]
# ### The detector's RoI Align on a CPU: one sparse matrix per image
#
# RoI Align is linear in the feature map: every bin is a weighted sum of a few cells (each of its
# `sampling_ratio x sampling_ratio` points blends 4 cells, and each point weighs
# `1 / sampling_ratio**2` in the bin's mean). So all bins of one image form one matrix `S`, a row
# per bin and a column per cell of the map, almost all zeros: `pooled = S @ map^T`, and the
# gradient the map receives is `S^T @ upstream`, two sparse products and no loop.
# `rpnlab.detector.roi_sparse` stores `S` as compressed sparse rows and lets MKL's sparse BLAS
# multiply; the detector's `RoIPooler` takes this path on a CPU for maps too large for the two
# small dense matrices above, when the level has enough RoIs to pay for transposing the map
# (`sparse_align_min_rois`; `RoIConfig(implementation="auto")`, the default). The same check
# against torchvision, on the CPU:

# %%
# NBVAL_CHECK_OUTPUT
sparse = sparse_align_check(features, rois, output_size, 1 / stride, sampling_ratio)
print(f"S of image 0: one row per bin, {sparse['columns']} columns (the cells of the {features.shape[-2]} x {features.shape[-1]} map), "
      f"{sparse['entries_per_row']} stored entries per row")
ok = sparse["forward_max_diff"] < 1e-4 and sparse["grad_max_diff"] < 1e-4
print(f"sparse RoI Align: forward and gradient match torchvision.ops.roi_align (max difference < 1e-4): {ok}")

# %%
print(f"image 0: S is {sparse['rows']} x {sparse['columns']} with {100 * sparse['density']:.2f}% of its entries stored; "
      f"{1000 * sparse['sparse_seconds']:.1f} ms against torchvision's {1000 * sparse['torchvision_seconds']:.1f} ms "
      f"per forward + backward of {num_rois} RoIs x {channels} channels on the CPU; max differences "
      f"{sparse['forward_max_diff']:.1e} (forward), {sparse['grad_max_diff']:.1e} (gradient)")

# %% [markdown]
# ### Pitfall: RoI Align's `aligned=True`
#
# RoI Align (Mask R-CNN) first shipped reading every box half a cell off: it takes a box
# coordinate `x` to the point `x * scale` of the map, as if cell `c`'s value sat at `c`, while a
# cell of a map that tiles the image stands for the area `[c, c + 1)`, centred at `c + 0.5`.
# Detectron2 and torchvision added `aligned=True`, which subtracts that half cell (detectron2's
# default; torchvision keeps `False` for old models, and so does `RoIConfig`). Measured on a
# known pattern: a feature map holding its own column index (`f[y, x] = x`), where one RoI Align
# bin returns the mean column it read, so the shift of the read centre from the box's centre
# can be read off in pixels, for rpnlab's plain-PyTorch `roi_align` and torchvision's
# (`rpnlab.lab.pitfalls.roi_align_shift`):

# %%
# NBVAL_CHECK_OUTPUT
shift_box = [20.0, 30.0, 100.0, 90.0]
shifts = {}
for s in (1, stride // 2, stride):
    shifts[s] = roi_align_shift(shift_box, spatial_scale=1 / s, size=max(8, 128 // s))
    for aligned in (False, True):
        m = shifts[s][aligned]
        print(f"stride {s:>2}, aligned={aligned!s:>5}: read centre off by {m['rpnlab']:+.2f} px (rpnlab), "
              f"{m['torchvision']:+.2f} px (torchvision)")
print(f"expected with aligned=False: half a cell, {[shifts[s]['expected_unaligned_px'] for s in shifts]} px")

# %% [markdown]
# Half a cell is `stride / 2` image pixels: at stride 16 every RoI is read that far to the right
# (and, by the same rule, down) of where it is, a large share of our small objects (notebook 00
# printed their sizes). Both kernels agree, so this is the convention, not a bug of one of them.
# A model trained with `aligned=False` learns around the shift; the damage comes from switching
# the setting between training and test, or from porting weights between libraries whose
# defaults differ. `aligned=True` matches anchors centred in their cells (the course's anchor
# offset, printed above).
#
# The detector pools with `rpnlab.detector.roi.RoIPooler`: `implementation="auto"` (the
# detector's default) takes the matrix forms above on a CPU and torchvision's compiled kernels on
# a GPU; `"torchvision"` always the kernels, `"python"` the plain versions of this notebook.
#
# ## What we measured

# %%
records.record("box", box)
records.record("roi_align_shift_px", {f"stride_{s}": {str(a): shifts[s][a]["rpnlab"] for a in (False, True)} for s in shifts})
records.record("box_quantisation_iou", box_iou(box[None], region[None]).item())
for name, iou in quantisation_iou.items():
    records.record(f"mean_quantisation_iou_{name.replace(' ', '_')}", iou.mean())
for name, result in kernels.items():
    records.record(f"{name}_forward_max_diff", result["forward_max_diff"])
    records.record(f"{name}_grad_max_diff", result["grad_max_diff"])
    records.record(f"{name}_python_ms", 1000 * result["python_seconds"])
    records.record(f"{name}_torchvision_ms", 1000 * result["torchvision_seconds"])
for key in ("forward_max_diff", "grad_max_diff"):
    records.record(f"roi_align_sparse_{key}", sparse[key])
records.record("roi_align_sparse_ms", 1000 * sparse["sparse_seconds"])
records.save_record();
