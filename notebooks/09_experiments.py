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
# # 09 · Experiments: the paper's ablations, with results that can be trusted
#
# **Goal.** Repeat the paper's sensitivity studies on the synthetic shapes and set our numbers
# beside the paper's: the **anchors** (1 or 3 scales x 1 or 3 aspect ratios, Table 8), the weight
# **lambda** of the box term in the RPN loss (Table 9), what happens when the RPN loses one of its
# parts at test time (**no NMS, no objectness scores, no box regression**, Table 2) and **recall
# against IoU** for 300, 1000 and 2000 proposals (Figure 4).
#
# Two rules make the tables readable:
#
# 1. **Every setting runs over several seeds** (`seeds`, 3 by default) and is shown as a mean
#    ± a 95% interval (Student's t, `rpnlab.lab.stats`). Two settings are called different only
#    when their intervals do not overlap; the notebook prints which pairs do.
# 2. **Measure where a setting acts first.** Anchors and lambda change the RPN, so each run trains
#    the backbone + RPN alone (`schedule="rpn"`, a fraction of the detector's cost) and is scored
#    by its proposals: `ar_100` and `ar_300`, the recall of the ground-truth boxes averaged over
#    IoU 0.5:0.95 by the top 100 / 300 proposals, and `recall_70`, the recall at IoU 0.7. The
#    paper's numbers are detector mAP; `schedule="joint"` trains the whole detector per setting
#    and adds `map_50` (the longer mode: use it on a GPU).
#
# All the logic is in `rpnlab.lab.ablations` (the experiments) and `rpnlab.lab.results` (the
# reference results); `make results` runs the same tables into `docs/results/`, and every table
# here is shown beside that committed CPU reference.

# %% tags=["parameters"]
device: str = "auto"  # where training runs: "auto" (CUDA, then MPS, then CPU), "cpu", "cuda", "cuda:N" or "mps"
seed: int = 0  # seeds the synthetic data (the training seeds are `seeds`)
smoke: bool = False  # tiny sizes for CI: one iteration per run on a few images, two seeds
record_path: str = ""  # JSON file for the key figures; empty: runs/records/09_experiments.json
seeds: list = [0, 1, 2]  # training seeds: every setting runs once per seed (3 or more for a useful interval)
tables: list = ["anchors", "lambda", "proposals", "recall_iou"]  # which of the paper's tables to run
schedule: str = "rpn"  # "rpn": backbone + RPN only, scored by proposal recall; "joint": the detector, mAP too (slow on a CPU)
epochs: int = 2  # epochs per run (2 x 400 images in batches of 4: 200 SGD steps)
num_train: int = 400  # training images
num_val: int = 150  # validation images for recall (and mAP)
lambdas: list = [0.1, 1.0, 3.0, 10.0, 100.0]  # weights of the RPN box term (paper's eq. 1), Table 9
test_counts: list = [100, 300, 1000]  # proposals per image for Table 2's variants
reference_dir: str = "../docs/results"  # the committed reference run (make results), shown beside this one

# %%
# %matplotlib inline
import tempfile
import time
from pathlib import Path

from IPython.display import Markdown, display

from rpnlab.data import build_dataset
from rpnlab.engine.devices import resolve_device, seed_everything
from rpnlab.lab import ablations, experiments, records, results
from rpnlab.lab.course import course_setup, departures, setup_of

records.begin("09_experiments", record_path)
seed_everything(seed)
dev = resolve_device(device)
if smoke:
    num_train, num_val, epochs, seeds = 8, 4, 1, seeds[:2]
workdir = tempfile.TemporaryDirectory(prefix="rpnlab-09-")  # checkpoints of every run, deleted at the end
data_cfg, train_cfg, base_cfg = results.ablation_configs(num_train, num_val, epochs, schedule, str(dev),
                                                         workdir.name, data_seed=seed)
train_set, val_set = build_dataset(data_cfg, "train"), build_dataset(data_cfg, "val")
reference = results.read_reference(reference_dir)
steps = epochs * -(-num_train // train_cfg.batch_size)
print(f"device {dev}; every run: {steps} SGD steps ({schedule}), batch {train_cfg.batch_size}, lr {train_cfg.lr}; "
      f"seeds {seeds}")
if reference:
    m = reference["meta"]
    print(f"reference run: {m['started']}, {m['device']} ({m['cpu']}), {m['wall_seconds']:.0f} s, seeds {m['seeds']}, "
          f"{m['epochs']} epochs of {m['num_train']} images, schedule {m['schedule']}")
else:
    print(f"no reference results in {reference_dir} (make results writes them)")
started = time.perf_counter()


def show(name, rows, by, metrics, keep=(), pairs_metric="ar_300"):
    """This run's table (mean ± 95% interval over the seeds), the pairs that differ, and the reference."""
    summary = ablations.summarise(rows, by, metrics, keep=keep)
    display(Markdown(f"**{name}, this run** (mean ± 95% interval over {len(seeds)} seeds)\n\n"
                     + ablations.summary_markdown(summary, by, metrics, keep=keep)))
    pairs = ablations.differing_pairs(summary, by, pairs_metric)
    differ = [p for p in pairs if p["differ"]]
    print(f"{len(differ)} of {len(pairs)} pairs differ in {pairs_metric} (intervals apart):")
    for p in differ:
        low = p["b"] if p["higher"] == p["a"] else p["a"]
        print(f"  {p['higher']}  >  {low}")
    ref = reference.get(name)
    if ref:
        display(Markdown(f"**{name}: this run beside the reference**\n\n" + experiments.rows_to_markdown(
            results.beside_reference(summary, ref, by, pairs_metric), digits={"paper_map": 1, "lambda": 1})))
    return summary, ref


# %% [markdown]
# ## The course setup, and what this notebook sweeps away from it
#
# Every run starts from the course's model preset (the anchors and sampling of notebooks 01 and
# 03, the detector of 04-08); each table then moves one setting away from it, listed here with
# the training every run gets.

# %%
course = course_setup()
print(course.describe())
print("\n".join(departures(course, vars(setup_of(base_cfg)))) or "every run starts from the course setup")
swept = {
    "anchors": "anchor_sizes x anchor_ratios, Table 8's six rows: "
               + "; ".join(s["setting"] for s in ablations.table8_settings(course.anchor_sizes, course.anchor_ratios)),
    "lambda": f"the RPN's box-loss weight lambda over {lambdas} with the paper's loss normalisation "
              f"(the course: {base_cfg.rpn.loss_normalization!r} normalisation)",
    "proposals": f"test-time proposals {test_counts} per image, and the RPN without NMS, scores or box regression "
                 f"(the course: {base_cfg.rpn.post_nms_top_n_test} after NMS)",
    "recall_iou": "recall against IoU for 300, 1000 and 2000 proposals (the course keeps "
                  f"{base_cfg.rpn.post_nms_top_n_test})",
}
print("swept away from it, by table:")
for name in tables:
    print(f"  {name}: {swept.get(name, '(unknown table)')}")
print(f"training of every run: {steps} SGD steps ({schedule}) of {train_cfg.batch_size} images from {num_train}, "
      f"seeds {seeds}")

# %% [markdown]
# ## The paper's numbers
#
# Ren et al. 2015 (arXiv:1506.01497v3), detection mAP (%) on PASCAL VOC 2007 test, trained on
# VOC 2007 trainval. Tables 8 and 9 use VGG-16 with the 4-step training; Table 2 uses ZF: a
# Fast R-CNN trained on 2000 Selective Search proposals and tested on the top-N proposals of an
# RPN that shares no features with it. Anchor scales are areas (128² is 128 x 128 pixels) of
# anchors on ~600 x 1000 images. The paper gives one run per setting, without an interval.

# %%
# NBVAL_CHECK_OUTPUT
paper = experiments.paper_reference_rows()
for name, rows in paper.items():
    print(f"{name}:\n" + experiments.rows_to_markdown(rows, digits=1) + "\n")

# %% [markdown]
# ## 1. Anchors (Table 8)
#
# Six settings, as the paper's table: one size or three, one ratio (1:1) or three, and the two
# single-scale rows at the smallest and middle size. Our sizes 16, 32, 64 px play the paper's
# 128², 256², 512² (our objects are 12-77 px on 128-px images). The paper found that several
# scales matter more than several ratios (69.8% with 3 scales x 1 ratio against 69.9% with 3 x 3)
# and that one anchor per location loses 1-4 points.
#
# Beside the recall, three columns measured *before any training*: `coverage_50` / `coverage_70`,
# the share of validation boxes whose best anchor already has IoU >= 0.5 / 0.7, and
# `mean_best_iou`. The RPN refines an anchor that overlaps an object; a box no anchor reaches is
# hard to propose, so coverage is the first suspect when our order differs from the paper's.

# %%
anchor_rows, kept, anchor_summary = [], {}, []
need_models = "proposals" in tables or "recall_iou" in tables
if "anchors" in tables or need_models:
    settings = ablations.table8_settings(base_cfg.anchors.sizes[0], base_cfg.anchors.aspect_ratios[0])
    if "anchors" not in tables:
        settings = [s for s in settings if s["setting"] == results.DEFAULT_SETTING]
    anchor_rows, kept = ablations.anchor_rows(settings, seeds, data_cfg, train_cfg, base_cfg, val_set, train_set,
                                              keep=[results.DEFAULT_SETTING] if need_models else [])
if "anchors" in tables:
    metrics = [m for m in results.TABLES["anchors"]["metrics"] if m in anchor_rows[0]]
    anchor_summary, anchor_ref = show("anchors", anchor_rows, "setting", metrics,
                                      keep=("k", "coverage_50", "coverage_70", "mean_best_iou", "paper_map"))
    display(ablations.plot_intervals(anchor_summary, "setting", ["ar_300", "recall_70"], reference=anchor_ref,
                                     title="anchors: proposal recall, mean ± 95% interval (hollow: reference)"))

# %% [markdown]
# **Does our order agree with the paper's?** For each pair of settings: the paper's order (a gap
# under 1 mAP point counts as "about equal") and ours (`≈` when the intervals overlap). Where
# they disagree, read the coverage columns above. The paper's 3 x 1 and 3 x 3 are about equal
# because on VOC both cover most boxes; on our shapes only 3 x 3 does (in the reference run
# `coverage_70` 0.35 against 0.14 for 3 x 1), and it is the only setting whose recall at IoU
# 0.7 stands out. The other way round, the paper's single-scale rows lose 1-4 points where our
# intervals may overlap: 200 steps is short, and every RPN starts from the same untrained
# backbone, so the small gaps of the paper are below what 3 seeds can resolve here.

# %%
if anchor_summary:
    agreement = ablations.compare_with_paper(anchor_summary, "setting", "ar_300")
    display(Markdown(experiments.rows_to_markdown(agreement, ["paper", "ours", "agree"])))
    print(f"our ar_300 order agrees with the paper's mAP order on {sum(a['agree'] for a in agreement)} "
          f"of {len(agreement)} pairs")

# %% [markdown]
# ## 2. The loss weight lambda (Table 9)
#
# The RPN loss of the paper (eq. 1) is `1/N_cls sum L_cls + lambda/N_reg sum p* L_reg`, with
# `N_cls` = 256 sampled anchors and `N_reg` ~ 2400 anchor locations; `lambda = 10` then weighs
# the two terms about equally (`paper_balance` ~ 1). Our small feature map has far fewer
# locations (printed below), so the same lambda weighs the box term several times more than in
# the paper (`balance`: box vs objectness weight per sampled anchor,
# `rpnlab.lab.experiments.loss_balance`). `box_share` is what training really saw: the box
# term's share of the RPN loss over the last iterations. The paper found mAP insensitive to
# lambda within two orders of magnitude (1 to 100; 0.1 loses 2.7 points).

# %%
lambda_summary = []
if "lambda" in tables:
    n_reg = experiments.locations_per_image(base_cfg, val_set)
    n_cls = base_cfg.rpn.batch_size_per_image
    print(f"N_cls = {n_cls} sampled anchors, N_reg = {n_reg} locations per image: a lambda weighs the box term "
          f"{experiments.loss_balance(1, n_cls, n_reg) / experiments.loss_balance(1, 256, 2400):.1f} times "
          "more than in the paper (256 and ~2400)")
    lambda_rows = ablations.lambda_rows(lambdas, seeds, data_cfg, train_cfg, base_cfg, val_set, train_set)
    metrics = [m for m in results.TABLES["lambda"]["metrics"] if m in lambda_rows[0]]
    lambda_summary, lambda_ref = show("lambda", lambda_rows, "lambda", metrics,
                                      keep=("balance", "paper_balance", "paper_map"))
    display(ablations.plot_intervals(lambda_summary, "lambda", ["ar_300", "box_share"], reference=lambda_ref,
                                     title="lambda: proposal recall and the box term's share of the loss"))

# %% [markdown]
# **Agreement with the paper.** Where ours differs, look at `balance` and `box_share`: a lambda
# that gives the box term most of the loss starves the objectness term that ranks the proposals
# (in the reference run lambda 100 has `box_share` 0.73 and the only recall that drops), and a
# tiny lambda leaves the boxes where the anchors put them. That costs the paper 2.7 points at
# lambda 0.1 but costs our recall nothing, and section 3 shows why: after 200 steps our box
# regression does not yet beat the anchors themselves ("no regression" ≈ "RPN"), so weakening it
# loses nothing. The paper's flat region (lambda 1-100) has `paper_balance` 0.1-11; ours is
# shifted by the factor printed above, which is why our flat region ends below lambda 100.

# %%
if lambda_summary:
    agreement = ablations.compare_with_paper(lambda_summary, "lambda", "ar_300")
    display(Markdown(experiments.rows_to_markdown(agreement, ["paper", "ours", "agree"])))
    print(f"our ar_300 order agrees with the paper's mAP order on {sum(a['agree'] for a in agreement)} "
          f"of {len(agreement)} pairs")

# %% [markdown]
# ## 3. An RPN without NMS, scores or regression (Table 2)
#
# The trained "3 scales x 3 ratios" RPN of every seed, changed at test time only:
#
# - **no NMS**: the top 6000 boxes by objectness, not de-duplicated (our 16 x 16 x 9 map has only
#   2304 anchors, so that is all of them: `mean_proposals` says so);
# - **no scores (random)**: N of the regressed boxes in random order: what the objectness ranking buys;
# - **no regression (anchors)**: the anchors themselves, ranked and de-duplicated as usual: what
#   the box regression buys.
#
# The paper measured detector mAP (Fast R-CNN on these proposals); we measure `ar` (recall
# averaged over IoU 0.5:0.95) by the same proposals, and `map_50` too with `schedule="joint"`.
# The paper's reading: NMS costs nothing (55.2 without it on 6000 boxes vs 56.8 with 300), the
# scores matter most when proposals are few (44.6 random vs 55.1 ranked at 100), and the
# regression is worth ~5 points at 300 (52.1 vs 56.8).
#
# Read recall with care: more boxes can only raise it, so "no NMS" (all 2304 boxes) and larger N
# always score higher here, while the paper's mAP also pays for the extra boxes (the detector
# sees more false positives); what recall does show is the ranking (random < RPN at the same N,
# the gap closing as N grows, as in the paper) and the regression (compare "no regression" with
# "RPN" at the same N: in the reference run they overlap, unlike the paper's 4.7 points).

# %%
proposal_summary = []
if "proposals" in tables:
    proposal_rows = []
    for (_, s), model in kept.items():
        proposal_rows += [{**r, "seed": s} for r in
                          ablations.proposal_variants(model, val_set, test_counts, seed=s, detector=schedule != "rpn")]
    metrics = [m for m in results.TABLES["proposals"]["metrics"] if m in proposal_rows[0]]
    proposal_summary, proposal_ref = show("proposals", proposal_rows, "setting", metrics, keep=("paper_map",),
                                          pairs_metric="ar")
    display(ablations.plot_intervals(proposal_summary, "setting", ["ar", "recall_70"], reference=proposal_ref,
                                     title="Table 2's variants: proposal recall"))

# %% [markdown]
# ## 4. Recall against IoU (Figure 4)
#
# The paper's Figure 4: the share of ground-truth boxes that the top N proposals reach with IoU
# at least x, for N = 300, 1000, 2000. RPN's curve falls slowly as N shrinks from 2000 to 300,
# which is why 300 proposals are enough. With ~2300 anchors per image, NMS (at 0.7) leaves far
# fewer than 1000 proposals, so our curves for 1000 and 2000 coincide.

# %%
if "recall_iou" in tables:
    curve_rows = []
    for (_, s), model in kept.items():
        curve_rows += [{**r, "seed": s} for r in ablations.recall_vs_iou(model, val_set, (300, 1000, 2000))]
    display(ablations.plot_recall_vs_iou(curve_rows))
    print(f"proposals per image at N = 2000: {curve_rows[-1]['mean_proposals']:.0f}")

# %% [markdown]
# ## What we measured
#
# The summaries go into the record; `make results` writes the same tables (CSV + Markdown) with
# the machine, the versions and the wall time, for comparison with the committed reference.

# %%
wall = time.perf_counter() - started
print(f"wall time of the experiments: {wall:.0f} s on {dev}")
for name, summary, by, metric in (("anchors", anchor_summary, "setting", "ar_300"),
                                  ("lambda", lambda_summary, "lambda", "ar_300"),
                                  ("proposals", proposal_summary, "setting", "ar")):
    for row in summary:  # e.g. anchors_ar_300[3 scales, 3 ratios]: mean, low, high over the seeds
        records.record(f"{name}_{metric}[{row[by]}]",
                       [row[f"{metric}_mean"], row[f"{metric}_low"], row[f"{metric}_high"]])
records.record("seeds", seeds)
records.record("steps_per_run", steps)
records.record("schedule", schedule)
records.record("device", str(dev))
records.record("wall_seconds", wall)
workdir.cleanup()
records.save_record();
