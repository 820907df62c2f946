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
# # 02 · Box coding: how the RPN describes a box relative to an anchor
#
# **Goal.** The RPN does not predict box corners. For each anchor it predicts four numbers
# `(tx, ty, tw, th)` that say how to move and stretch the anchor onto the object. This notebook
# writes down that encoding, checks that decoding inverts it, shows why the weights and the
# clamp exist, and shows the most common slip (dividing `x` by the anchor's *height*), with
# numbers.
#
# The paper's equation 2, with centres `x, y`, width `w` and height `h` of the ground-truth box,
# and `xa, ya, wa, ha` of the anchor:
#
# `tx = (x - xa) / wa`,  `ty = (y - ya) / ha`,  `tw = log(w / wa)`,  `th = log(h / ha)`
#
# Dividing by the anchor's size makes a shift of "half an anchor" the same number for a small
# and a large anchor (the targets are scale-invariant); the logarithm makes "twice as wide" and
# "half as wide" symmetric around 0 and keeps decoded sizes positive (`w = wa * exp(tw)`).

# %% tags=["parameters"]
device: str = "auto"  # where tensors live: "auto" (CUDA, then MPS, then CPU), "cpu", "cuda", "cuda:N" or "mps"
seed: int = 0  # seeds the random boxes of the round trip
smoke: bool = False  # tiny sizes for CI: fewer random boxes
record_path: str = ""  # JSON file for the key figures; empty: runs/records/02_box_coding.json
num_pairs: int = 100000  # random anchor / box pairs for the encode-decode round trip
head_weights: list = [10.0, 10.0, 5.0, 5.0]  # (wx, wy, ww, wh) of the Fast R-CNN head's box coder

# %%
# %matplotlib inline
import math

import torch
from torchvision.models.detection._utils import BoxCoder as TorchvisionBoxCoder

from rpnlab.data.synthetic import SHAPE_CLASSES
from rpnlab.detector.boxes import (
    DEFAULT_BBOX_CLAMP,
    BoxCoder,
    box_iou,
    cxcywh_to_xyxy,
    xyxy_to_cxcywh,
)
from rpnlab.engine.devices import resolve_device, seed_everything
from rpnlab.lab import records, widgets
from rpnlab.lab.box_coding import plot_box_coding
from rpnlab.lab.pitfalls import plus_one_convention, target_normalisation

records.begin("02_box_coding", record_path)
seed_everything(seed)
dev = resolve_device(device)
if smoke:
    num_pairs = 1000

# %% [markdown]
# ## One anchor, one box
#
# A wide anchor (96 x 48, centre (56, 64)) and a box to its right (88 x 64, centre (84, 68)).

# %%
# NBVAL_CHECK_OUTPUT
anchor = torch.tensor([8.0, 40.0, 104.0, 88.0])
gt = torch.tensor([40.0, 36.0, 128.0, 100.0])
coder = BoxCoder()  # the RPN's: weights (1, 1, 1, 1)
deltas = coder.encode(anchor, gt)
print("anchor cx, cy, w, h:", xyxy_to_cxcywh(anchor).tolist())
print("gt     cx, cy, w, h:", xyxy_to_cxcywh(gt).tolist())
print("tx, ty, tw, th     :", [round(v, 4) for v in deltas.tolist()])
print("by hand            :", [round(v, 4) for v in (28 / 96, 4 / 48, math.log(88 / 96), math.log(64 / 48))])

# %%
plot_box_coding(anchor, gt, deltas)

# %% [markdown]
# Now a puzzle: the same anchor and another box (drawn by the explorer). First work out on
# paper which `(tx, ty, tw, th)` lands on it, then set the sliders to your answer: the figure's
# title gives the IoU of the decoded box with the target (1.000 when you are right). The status
# line with the exact offsets is hidden; run `explorer.status.layout.display = ""` to see it.

# %%
puzzle_gt = torch.tensor([24.0, 20.0, 72.0, 116.0])  # a tall box up and left of the anchor
explorer = widgets.box_coding_explorer(anchor, puzzle_gt)
explorer.status.layout.display = "none"  # it would print the answer
explorer

# %% [markdown]
# ### Exercise 1: encode
#
# Write `my_encode(anchors, boxes)`: the offsets `(tx, ty, tw, th)` of each box from its anchor,
# as above (weights 1): centre shifts divided by the anchor's width and height, size ratios as
# logarithms. Why it matters: these are the RPN's regression targets; a slip here (x over the
# height) trains without an error and misplaces every box.
#
# Exercises: write the function's body in place of `raise NotImplementedError` (between the
# `### BEGIN SOLUTION` and `### END SOLUTION` markers) and run the cell; the `check` line tries it
# on hidden cases against rpnlab and torchvision and says right, or the first wrong case and why.
# Until then it says "not done yet" and the notebook runs on.

# %%
from rpnlab.lab.exercises import check


def my_encode(anchors, boxes):
    """anchors (N, 4), boxes (N, 4) as x1, y1, x2, y2 -> offsets (N, 4): tx, ty, tw, th."""
    ### BEGIN SOLUTION
    raise NotImplementedError
    ### END SOLUTION


check.encode(my_encode)

# %% [markdown]
# ## Decoding inverts encoding
#
# `decode(encode(anchor, gt), anchor)` must give back `gt`. On many random pairs, in float32
# and float64: the error is rounding only. (Sizes stay within 4 to 200 pixels: a box more than
# 62.5 times larger than its anchor would hit the clamp described below and not come back.)

# %%
g = torch.Generator().manual_seed(seed)
def random_boxes(n):
    centre = torch.rand(n, 2, generator=g) * 512
    size = 4 * torch.exp(torch.rand(n, 2, generator=g) * math.log(50))  # 4 to 200 px, log-uniform
    return cxcywh_to_xyxy(torch.cat([centre, size], dim=1))

anchors, boxes = random_boxes(num_pairs).to(dev), random_boxes(num_pairs).to(dev)
errors = {}
for dtype in (torch.float32, torch.float64):
    a, b = anchors.to(dtype), boxes.to(dtype)
    errors[str(dtype)] = (coder.decode(coder.encode(a, b), a) - b).abs().max().item()
    print(f"{dtype}: largest round-trip error over {num_pairs} pairs: {errors[str(dtype)]:.2e} px")

# %% [markdown]
# ### Exercise 2: decode
#
# Write `my_decode(deltas, anchors)`: the boxes that offsets describe on their anchors, the
# inverse of `my_encode` (no clamp needed here). Why it matters: decoding turns every anchor's
# predicted offsets into a proposal (05) and every RoI's into a detection (07).

# %%
def my_decode(deltas, anchors):
    """deltas (N, 4) tx, ty, tw, th, anchors (N, 4) -> boxes (N, 4) as x1, y1, x2, y2."""
    ### BEGIN SOLUTION
    raise NotImplementedError
    ### END SOLUTION


check.decode(my_decode)

# %% [markdown]
# ## The common slip: `x` divided by the anchor's height
#
# Write `tx = (x - xa) / ha` by mistake (or swap the width and height columns) and nothing
# crashes: training still runs, the targets just mean something else, and on any non-square
# anchor the decoded boxes land in the wrong place. With our wide anchor (`wa = 96`, `ha = 48`):

# %%
# NBVAL_CHECK_OUTPUT
a_c, g_c = xyxy_to_cxcywh(anchor), xyxy_to_cxcywh(gt)
tx_right = (g_c[0] - a_c[0]) / a_c[2]  # divided by the anchor width
tx_slip = (g_c[0] - a_c[0]) / a_c[3]  # divided by the anchor height: the slip
slip_deltas = torch.stack([tx_slip, deltas[1], deltas[2], deltas[3]])
slipped = coder.decode(slip_deltas[None], anchor[None])[0]  # a correct decoder reads the slipped target
print(f"tx (right) = 28 / 96 = {tx_right:.4f};  tx (slip) = 28 / 48 = {tx_slip:.4f}")
print(f"decoded centre x: right {xyxy_to_cxcywh(coder.decode(deltas[None], anchor[None]))[0, 0]:.1f}, "
      f"slip {xyxy_to_cxcywh(slipped)[0]:.1f} (gt {g_c[0]:.1f})")
slip_iou = box_iou(slipped[None], gt[None]).item()
print(f"IoU of the slipped box with the gt box: {slip_iou:.3f} (instead of 1.000)")

# %%
plot_box_coding(anchor, gt, deltas, others={"decoded from the slipped tx": slipped},
                    title="dividing x by the anchor height moves the box twice as far")

# %% [markdown]
# ## Weights and the clamp
#
# **Weights.** The Fast R-CNN head regresses from proposals that are already close to their
# objects, so its raw offsets are small (a spread of a few hundredths to a tenth).
# torchvision and detectron2 multiply them by `(10, 10, 5, 5)` so that the targets are closer
# to unit spread and the box loss is not drowned by the classification loss.
# The RPN's anchors are further from the objects, and it uses `(1, 1, 1, 1)`.
#
# **Clamp.** Decoding computes `wa * exp(tw)`. An untrained network can output `tw = 10`:
# `exp(10)` is 22 026 times the anchor. Decoders clamp `tw, th` at `log(1000 / 16)` (about 4.135),
# at most 62.5 times the anchor, so nothing overflows in the first iterations.

# %%
# NBVAL_CHECK_OUTPUT
head_coder = BoxCoder(weights=tuple(head_weights))
print("weights", tuple(head_weights), "->", [round(v, 4) for v in head_coder.encode(anchor, gt).tolist()])
wild = torch.tensor([[0.0, 0.0, 10.0, 0.0]])
decoded_wild = coder.decode(wild, anchor[None])[0]
print(f"tw = 10 -> width {decoded_wild[2] - decoded_wild[0]:.0f} px with the clamp at {DEFAULT_BBOX_CLAMP:.3f} "
      f"(without it: {96 * math.exp(10):.0f} px)")

# %%
# Proposals jittered around random boxes (corners moved by up to 15% of the box size).
jitter = (torch.rand(boxes.shape, generator=g).to(dev) - 0.5) * 0.3
size = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)
proposals = boxes + jitter * size
for name, c in (("weights (1, 1, 1, 1)", coder), (f"weights {tuple(head_weights)}", head_coder)):
    spread = c.encode(proposals, boxes).std(dim=0)
    print(f"{name:>28}: spread of tx, ty, tw, th = {[round(v, 3) for v in spread.tolist()]}")

# %% [markdown]
# ### Pitfall: weights `(10, 10, 5, 5)` *are* target normalisation
#
# py-faster-rcnn encodes with weights 1 and then divides the targets by
# `BBOX_NORMALIZE_STDS = (0.1, 0.1, 0.2, 0.2)` (means 0; `BBOX_NORMALIZE_TARGETS_PRECOMPUTED`);
# torchvision and detectron2 fold the same division into the coder as weights `1 / std`. People
# porting a model apply both (targets 100 times too large in x, 25 times in w) or neither. On
# 2000 proposals jittered around boxes as above: the two are the same numbers (compared with
# torchvision's `BoxCoder`), and leaving them out shrinks the box loss an untrained head starts
# from (smooth L1 with torchvision's `beta = 1/9` of a zero prediction, per pair) by the factor
# printed:

# %%
# NBVAL_CHECK_OUTPUT
g_norm = torch.Generator().manual_seed(seed)  # its own pairs, so the numbers do not depend on num_pairs
pair_size = 8 + torch.rand(2000, 2, generator=g_norm) * 120
gt_pairs = cxcywh_to_xyxy(torch.cat([torch.rand(2000, 2, generator=g_norm) * 512, pair_size], dim=1))
jittered = gt_pairs + (torch.rand(2000, 4, generator=g_norm) - 0.5) * 0.3 * pair_size.repeat(1, 2)
norm = target_normalisation(jittered, gt_pairs, tuple(head_weights))
stds = tuple(round(1 / w, 3) for w in head_weights)
print(f"torchvision BoxCoder(weights={tuple(head_weights)}) equals BoxCoder(1, 1, 1, 1) / std {stds} "
      f"(largest difference < 1e-9): {norm['max_difference'] < 1e-9}")
print(f"box loss of a zero prediction per pair: {norm['loss_raw']:.3f} without the weights, "
      f"{norm['loss_weighted']:.3f} with them ({norm['loss_ratio']:.1f}x)")
print(f"an untrained classifier's loss, log(C + 1) for the course's {len(SHAPE_CLASSES)} classes: "
      f"{math.log(len(SHAPE_CLASSES) + 1):.3f}")

# %% [markdown]
# Without them the box term starts far below the classification loss of an untrained head
# (both printed), and its targets sit in smooth L1's flat quadratic part, where the gradient is
# as small as the error: the head learns to classify long before it learns to move its boxes.
#
# ### Pitfall: the +1 pixel convention
#
# Caffe-era code (py-faster-rcnn, the VOC devkit) counts pixels *inclusive*: a box `x1..x2`
# covers pixels `x1` to `x2`, so its width is `x2 - x1 + 1`, two boxes sharing an edge overlap by a
# pixel, and the box's centre is `x1 + 0.5 * width`. torchvision, detectron2 (since 2019) and
# rpnlab use continuous coordinates: width `x2 - x1`. Mixing the two (annotations, IoU, or
# trained targets from one, code from the other) makes no error; it moves numbers, and the
# smaller the box, the more. Measured by `rpnlab.lab.pitfalls.plus_one_convention` for square
# boxes: the IoU of a box with its copy moved 1 pixel, the `tw` target of the box on an anchor
# twice its size, and the IoU with the box of what the +1 targets decode to under torchvision's
# convention:

# %%
# NBVAL_CHECK_OUTPUT
plus_one = plus_one_convention(sizes=(4, 8, 16, 32, 64, 128))
print(f"{'side':>5} {'IoU':>6} {'IoU +1':>7} {'tw':>7} {'tw +1':>7} {'mixed IoU':>9}")
for row in plus_one["rows"]:
    print(f"{row['size']:5.0f} {row['iou']:6.3f} {row['iou_plus_one']:7.3f} {row['tw']:7.3f} {row['tw_plus_one']:7.3f} "
          f"{row['mixed_iou']:9.3f}")

# %% [markdown]
# Both gaps shrink as the box grows: a pixel is a large share of a small box and nothing of a
# large one, so a convention mix-up that is invisible on VOC's 100-pixel objects shows on our
# small shapes (notebook 00 printed their sizes) and on small objects in general. Pick one
# convention for the data, the IoU and the coder; rpnlab's VOC reader converts the XML's
# inclusive, 1-based pixels to continuous coordinates once, on loading.
#
# ## Check against torchvision
#
# torchvision's `BoxCoder.encode_single(reference_boxes, proposals)` takes the *target* boxes
# first and the anchors second (the opposite of our `encode(anchors, gt_boxes)`); its
# `decode_single(rel_codes, boxes)` matches ours. Both coders, on all the random pairs, in
# float64 (in float32 the two differ in the last bit, ~1e-5 px, because they order the same
# arithmetic differently):

# %%
# NBVAL_CHECK_OUTPUT
a64, b64 = anchors.double(), boxes.double()
for weights in ((1.0, 1.0, 1.0, 1.0), tuple(head_weights)):
    ours_c, theirs_c = BoxCoder(weights=weights), TorchvisionBoxCoder(weights=weights)
    enc_ours, enc_theirs = ours_c.encode(a64, b64), theirs_c.encode_single(b64, a64)
    torch.testing.assert_close(enc_ours, enc_theirs)
    torch.testing.assert_close(ours_c.decode(enc_ours, a64), theirs_c.decode_single(enc_theirs, a64))
    print(f"weights {weights}: encode and decode match torchvision: True")

# %% [markdown]
# ## What we measured

# %%
records.record("example_deltas", deltas)
records.record("roundtrip_error_float32", errors["torch.float32"])
records.record("roundtrip_error_float64", errors["torch.float64"])
records.record("slip_tx", tx_slip)
records.record("slip_iou", slip_iou)
records.record("clamped_width_px", decoded_wild[2] - decoded_wild[0])
records.record("weights_equal_normalised_targets", norm["max_difference"] < 1e-9)
records.record("box_loss_ratio_with_weights", norm["loss_ratio"])
records.record("plus_one_iou_gap_at_8px", next(r["iou_plus_one"] - r["iou"] for r in plus_one["rows"] if r["size"] == 8))
records.save_record();
