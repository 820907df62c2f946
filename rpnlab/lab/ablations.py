"""Ablations that can be trusted: the paper's tables over several seeds, measured where they act.

Notebook 09 and ``benchmarks/results.py`` (``make results``) call these. Each setting of a table
is trained once per seed (``repeat_over_seeds``) and the seeds are summarised as a mean with a 95%
interval (``summarise``, via ``rpnlab.lab.stats``); two settings are called different only when
their intervals do not overlap (``differing_pairs``).

The anchors (Table 8) and lambda (Table 9) act on the RPN first, so by default each setting trains
the backbone + RPN alone (``TrainConfig.schedule = "rpn"``, much cheaper than the detector) and is
scored by its proposals (``measure_proposals``): ``ar_100`` and ``ar_300`` (recall averaged over
IoU 0.5:0.95 by the top 100 / 300 proposals), ``recall_50`` and ``recall_70`` (top 300).
With ``schedule = "joint"`` the whole detector trains and ``map_50`` / ``map`` are added.

Table 2's other rows change how a trained RPN's outputs become proposals (``proposal_variants``):
no NMS (the top 6000), no objectness scores (N random boxes), no box regression (the anchors
themselves). Figure 4 is recall against IoU for 300, 1000 and 2000 proposals (``recall_vs_iou``).

Rows are tidy: one flat dict per setting and seed; ``summarise`` gives one per setting.

Longer than 500 lines because the seed loop, the measurements, the interval tables and their
figures belong together: each table is run, summarised and compared with the paper the same way.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

from rpnlab.config import DataConfig, ModelConfig, TrainConfig
from rpnlab.lab.figures import new_figure
from rpnlab.lab.stats import aggregate_rows, intervals_differ

__all__ = [
    "PAPER_TABLE2",
    "RECALL_KEYS",
    "anchor_rows",
    "compare_with_paper",
    "differing_pairs",
    "format_interval",
    "lambda_rows",
    "measure_proposals",
    "plot_intervals",
    "plot_recall_vs_iou",
    "proposal_variants",
    "recall_vs_iou",
    "repeat_over_seeds",
    "summarise",
    "summary_markdown",
    "table8_settings",
    "train_and_measure",
    "variant_proposals",
]

# Table 2 of Ren et al. 2015 (ZF, mAP % on VOC 2007 test): a Fast R-CNN trained on Selective
# Search proposals, tested on the proposals of an unshared RPN changed at test time.
PAPER_TABLE2: tuple[dict[str, Any], ...] = (
    {"variant": "RPN", "test_proposals": 100, "paper_map": 55.1},
    {"variant": "RPN", "test_proposals": 300, "paper_map": 56.8},
    {"variant": "RPN", "test_proposals": 1000, "paper_map": 56.3},
    {"variant": "no NMS", "test_proposals": 6000, "paper_map": 55.2},
    {"variant": "no scores (random)", "test_proposals": 100, "paper_map": 44.6},
    {"variant": "no scores (random)", "test_proposals": 300, "paper_map": 51.4},
    {"variant": "no scores (random)", "test_proposals": 1000, "paper_map": 55.8},
    {"variant": "no regression (anchors)", "test_proposals": 300, "paper_map": 52.1},
)
VARIANTS = ("RPN", "no NMS", "no scores (random)", "no regression (anchors)")

# What a setting's proposals are scored by (fractions in [0, 1]).
RECALL_KEYS = ("ar_100", "ar_300", "recall_50", "recall_70")


# ---------------------------------------------------------------------------------------------
# Settings


def table8_settings(sizes: Sequence[float] = (16, 32, 64),
                    ratios: Sequence[float] = (0.5, 1.0, 2.0)) -> list[dict[str, Any]]:
    """The six rows of the paper's Table 8 on our scale: ``sizes`` play 128², 256², 512².

    The single-scale rows use ``sizes[0]`` (the paper's 128²) and ``sizes[1]`` (256²); "1 ratio"
    is 1:1. Each: ``setting`` (a name with the size), ``sizes``, ``ratios``, ``paper_map`` (None
    unless there are exactly 3 sizes and 3 ratios, as in the paper).
    """
    sizes, ratios = tuple(float(s) for s in sizes), tuple(float(r) for r in ratios)
    if len(sizes) < 2 or len(ratios) < 2 or 1.0 not in ratios:
        raise ValueError(f"sizes={sizes} and ratios={ratios} need at least two values each, ratios including 1.0")
    if any(not (math.isfinite(v) and v > 0) for v in sizes + ratios):
        raise ValueError(f"sizes={sizes} and ratios={ratios} must be positive numbers")
    from rpnlab.lab.experiments import PAPER_ANCHORS

    paper = len(sizes) == 3 and len(ratios) == 3
    n_s, n_r = f"{len(sizes)} scales", f"{len(ratios)} ratios"
    rows = [("1 scale ({:g}), 1 ratio", (sizes[0],), (1.0,)), ("1 scale ({:g}), 1 ratio", (sizes[1],), (1.0,)),
            ("1 scale ({:g}), " + n_r, (sizes[0],), ratios), ("1 scale ({:g}), " + n_r, (sizes[1],), ratios),
            (f"{n_s}, 1 ratio", sizes, (1.0,)), (f"{n_s}, {n_r}", sizes, ratios)]
    return [{"setting": name.format(s[0]), "sizes": s, "ratios": r,
             "paper_map": PAPER_ANCHORS[i]["paper_map"] if paper else None}
            for i, (name, s, r) in enumerate(rows)]


# ---------------------------------------------------------------------------------------------
# One run: train, then score the proposals


def _set_counts(layer, pre: int, post: int, mode: str | None = None) -> None:
    layer.pre_nms_top_n = (layer.pre_nms_top_n[0], int(pre))
    layer.post_nms_top_n = (layer.post_nms_top_n[0], int(post))
    if mode is not None:
        layer.mode = mode


@torch.no_grad()
def _rpn_outputs(model: nn.Module, dataset, batch_size: int = 8):
    """Per batch: ``(anchors (A, 4), logits (B, A), deltas (B, A, 4), per level A_l, image sizes, gt)``."""
    from torch.utils.data import DataLoader

    from rpnlab.data import collate

    device = next(model.parameters()).device
    model.eval()
    for images, targets in DataLoader(dataset, batch_size=batch_size, collate_fn=collate):
        _, inter = model(images.to(device), rpn_only=True, return_intermediates=True)
        r = inter["rpn"]
        yield (r["anchors"], r["objectness"], r["deltas"], r["num_anchors_per_level"], inter["image_sizes"],
               [t["boxes"] for t in targets], images)


def measure_proposals(model: nn.Module, dataset, counts: Sequence[int] = (100, 300)) -> dict[str, float]:
    """Score a trained RPN's test-time proposals on ``dataset``.

    Returns ``ar_<N>`` for each N of ``counts`` (recall averaged over IoU 0.5:0.95 by the top N),
    ``recall_50`` / ``recall_70`` by the top ``max(counts)`` and ``mean_proposals`` (how many
    proposals an image really gets: NMS may leave fewer than N). The model is left unchanged.
    """
    from rpnlab.lab.experiments import proposal_recall_for

    counts = sorted({int(n) for n in counts})
    if not counts or counts[0] < 1:
        raise ValueError(f"counts must be positive integers, got {counts}")
    r = proposal_recall_for(model, dataset, counts)
    out = {f"ar_{n}": float(r["average_recall"][i]) for i, n in enumerate(counts)}
    out.update(recall_50=float(r["recall_50"][-1]), recall_70=float(r["recall_70"][-1]),
               mean_proposals=float(r["mean_proposals"]))
    return out


def _mean_last(history: Sequence[Mapping[str, Any]], key: str, last: int = 20) -> float:
    values = [float(h[key]) for h in history[-last:] if key in h]
    return sum(values) / len(values) if values else float("nan")


def train_and_measure(model_cfg: ModelConfig, data_cfg: DataConfig, train_cfg: TrainConfig, val_dataset,
                      train_dataset=None, counts: Sequence[int] = (100, 300)) -> tuple[dict[str, Any], nn.Module]:
    """Train one model per ``train_cfg`` and score it -> ``(row, model)``.

    ``row``: ``measure_proposals`` keys, ``loss_objectness`` and ``loss_rpn_box_reg`` (means of the
    last 20 iterations), ``box_share`` (the box term's share of the RPN loss), ``iterations``,
    ``train_seconds``; when the schedule trains the detector (not ``"rpn"``) also ``map_50``, ``map``.
    """
    from rpnlab.engine.train import evaluate, train

    result = train(model_cfg, data_cfg, train_cfg, progress=False, train_dataset=train_dataset)
    row: dict[str, Any] = measure_proposals(result.model, val_dataset, counts)
    obj = _mean_last(result.history, "loss_objectness")
    box = _mean_last(result.history, "loss_rpn_box_reg")
    row.update(loss_objectness=obj, loss_rpn_box_reg=box, box_share=box / (obj + box) if obj + box > 0 else math.nan,
               iterations=int(result.iterations), train_seconds=float(result.seconds))
    if train_cfg.schedule != "rpn":
        scores = evaluate(result.model, val_dataset)
        row.update(map_50=float(scores["map_50"]), map=float(scores["map"]))
    return row, result.model


# ---------------------------------------------------------------------------------------------
# The seed loop


def repeat_over_seeds(
    settings: Sequence[Mapping[str, Any]],
    run: Callable[[Mapping[str, Any], int], tuple[Mapping[str, Any], Any]],
    seeds: Iterable[int],
    keep: Callable[[Mapping[str, Any]], bool] | None = None,
    progress: Callable[[dict], Any] | None = None,
) -> tuple[list[dict[str, Any]], dict[tuple[str, int], Any]]:
    """Run every setting once per seed -> ``(rows, kept)``.

    Args:
        settings: dicts, each with a unique ``setting`` name; their keys start each row.
        run: ``(setting, seed) -> (measured dict, model)``.
        seeds: distinct integers; the loop goes seed by seed, so an interrupted run has whole seeds.
        keep: which settings' models to return (default: none).
        progress: called with each finished row.
    Returns:
        ``rows``: one per (seed, setting): the setting's keys, ``seed``, the measured keys;
        ``kept``: ``{(setting name, seed): model}``.
    """
    settings = list(settings)
    seeds = [int(s) for s in seeds]
    if not settings:
        raise ValueError("settings is empty: give at least one setting")
    names = [s.get("setting") for s in settings]
    if None in names or len(set(names)) != len(names):
        raise ValueError(f"every setting needs a unique 'setting' name, got {names}")
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct integers, got {seeds}")
    rows, kept = [], {}
    for seed in seeds:
        for s in settings:
            measured, model = run(s, seed)
            row = {**s, "seed": seed, **measured}
            rows.append(row)
            if keep is not None and keep(s):
                kept[(s["setting"], seed)] = model
            if progress is not None:
                progress(row)
    return rows, kept


def _slug(text: str) -> str:
    """A setting's name as a folder name: ``"3 scales, 1 ratio"`` -> ``"3-scales-1-ratio"``."""
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower() or "setting"


def _seeded(train_cfg: TrainConfig, seed: int, name: str) -> TrainConfig:
    cfg = copy.deepcopy(train_cfg)
    cfg.seed = int(seed)
    cfg.out_dir = str(Path(train_cfg.out_dir) / f"{_slug(name)}-seed{seed}")
    return cfg.validate()


def anchor_rows(settings: Sequence[Mapping[str, Any]], seeds: Iterable[int], data_cfg: DataConfig,
                train_cfg: TrainConfig, base_model_cfg: ModelConfig, val_dataset, train_dataset=None,
                keep: Sequence[str] = (), progress=None) -> tuple[list[dict[str, Any]], dict]:
    """Table 8 over seeds: one row per (seed, anchor setting) -> ``(rows, kept models)``.

    ``settings``: ``table8_settings()`` or dicts with ``setting``, ``sizes``, ``ratios``. Each row
    adds ``k`` (anchors per location) and the anchors' coverage of the validation boxes before
    any training: ``coverage_50`` / ``coverage_70`` (share of gt boxes whose best anchor has IoU
    >= 0.5 / 0.7) and ``mean_best_iou``. ``keep``: settings whose models to return.
    """
    from rpnlab.lab.anchors import coverage_over_dataset

    configs, prepared = {}, []
    for s in settings:
        if not {"setting", "sizes", "ratios"} <= set(s):
            raise ValueError(f"each anchor setting needs 'setting', 'sizes' and 'ratios', got keys {sorted(s)}")
        cfg = copy.deepcopy(base_model_cfg)
        cfg.anchors.sizes = (tuple(float(v) for v in s["sizes"]),)
        cfg.anchors.aspect_ratios = (tuple(float(v) for v in s["ratios"]),)
        cfg.validate()
        cov = coverage_over_dataset(cfg.anchors, val_dataset, thresholds=(0.5, 0.7))
        configs[s["setting"]] = cfg
        prepared.append({"setting": s["setting"], "sizes": tuple(cfg.anchors.sizes[0]),
                         "ratios": tuple(cfg.anchors.aspect_ratios[0]), "k": cfg.anchors.num_anchors_per_location[0],
                         "coverage_50": float(cov["covered"][0.5]), "coverage_70": float(cov["covered"][0.7]),
                         "mean_best_iou": float(cov["mean_best_iou"]), "paper_map": s.get("paper_map")})

    def run(s, seed):
        return train_and_measure(configs[s["setting"]], data_cfg, _seeded(train_cfg, seed, "anchors-" + s["setting"]),
                                 val_dataset, train_dataset)

    return repeat_over_seeds(prepared, run, seeds, keep=lambda s: s["setting"] in keep, progress=progress)


def lambda_rows(lambdas: Iterable[float], seeds: Iterable[int], data_cfg: DataConfig, train_cfg: TrainConfig,
                base_model_cfg: ModelConfig, val_dataset, train_dataset=None, progress=None) -> list[dict[str, Any]]:
    """Table 9 over seeds: one row per (seed, lambda), the paper's loss normalisation.

    Each row adds ``lambda``, ``balance`` (box vs objectness weight per sampled anchor on our
    feature map, ``rpnlab.lab.experiments.loss_balance``), ``paper_balance`` (the paper's ~2400
    locations, 256 samples) and ``paper_map``; the measured ``box_share`` shows the balance the
    training really had.
    """
    from rpnlab.lab.experiments import PAPER_LAMBDA, locations_per_image, loss_balance

    lambdas = [float(v) for v in lambdas]
    if not lambdas or any(not math.isfinite(v) or v < 0 for v in lambdas):
        raise ValueError(f"lambdas must be a non-empty list of numbers >= 0, got {lambdas}")
    locations = locations_per_image(base_model_cfg, val_dataset)
    sampled = base_model_cfg.rpn.batch_size_per_image
    settings = [{"setting": f"lambda {lam:g}", "lambda": lam, "balance": loss_balance(lam, sampled, locations),
                 "paper_balance": loss_balance(lam, 256, 2400), "paper_map": PAPER_LAMBDA.get(lam)} for lam in lambdas]

    def run(s, seed):
        cfg = copy.deepcopy(base_model_cfg)
        cfg.rpn.loss_normalization, cfg.rpn.reg_loss_weight = "paper", s["lambda"]
        return train_and_measure(cfg.validate(), data_cfg, _seeded(train_cfg, seed, s["setting"]), val_dataset,
                                 train_dataset)

    return repeat_over_seeds(settings, run, seeds, progress=progress)[0]


# ---------------------------------------------------------------------------------------------
# Table 2's other rows and Figure 4, on trained models


def variant_proposals(layer, variant: str, n: int, anchors: Tensor, logits: Tensor, deltas: Tensor,
                      image_sizes: Sequence[tuple[int, int]], num_anchors_per_level: Sequence[int] | None = None,
                      generator: torch.Generator | None = None) -> list[Tensor]:
    """The top ``n`` proposals per image of one of Table 2's ``variant`` s (see ``proposal_variants``).

    ``layer``: the model's ``ProposalLayer`` (copied, never changed); ``anchors (A, 4)``,
    ``logits (B, A)``, ``deltas (B, A, 4)`` as the RPN computed them. Returns per image ``(P_i, 4)``
    boxes, best first (in random order for ``"no scores (random)"``), ``P_i <= n``.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r} is invalid: expected one of {VARIANTS}")
    if int(n) < 1:
        raise ValueError(f"n={n!r} must be a positive number of proposals")
    layer = copy.deepcopy(layer).eval()
    test_pre = layer.pre_nms_top_n[1]
    if variant == "RPN":
        _set_counts(layer, max(test_pre, n), n)
    elif variant == "no NMS":
        _set_counts(layer, anchors.shape[0], n, mode="top")
    elif variant == "no scores (random)":  # random scores: a random order, no ranking, no NMS
        logits = torch.rand(logits.shape, generator=generator).to(logits)
        _set_counts(layer, anchors.shape[0], n, mode="top")
        layer.score_thresh = 0.0
    else:  # no regression: zero offsets decode to the anchors themselves
        deltas = torch.zeros_like(deltas)
        _set_counts(layer, max(test_pre, n), n)
    return layer(anchors, logits, deltas, image_sizes, num_anchors_per_level)[0]


@torch.no_grad()
def proposal_variants(model: nn.Module, dataset, counts: Sequence[int] = (100, 300, 1000), no_nms_count: int = 6000,
                      seed: int = 0, detector: bool = False, batch_size: int = 8) -> list[dict[str, Any]]:
    """Table 2's test-time variants of one trained RPN, each scored by recall (and mAP if ``detector``).

    - ``"RPN"``: the proposal layer as trained (NMS), top N for each N of ``counts``;
    - ``"no NMS"``: the top ``no_nms_count`` boxes by objectness, no NMS (fewer if there are fewer anchors);
    - ``"no scores (random)"``: N of the regressed boxes drawn at random (``seed``), no ranking, no NMS;
    - ``"no regression (anchors)"``: the anchors themselves, ranked by objectness, then NMS and top N.

    Returns one row per (variant, N): ``setting`` (both in words), ``variant``, ``test_proposals``, ``ar`` (recall averaged over
    IoU 0.5:0.95), ``recall_50``, ``recall_70``, ``mean_proposals``, ``paper_map`` (Table 2) and,
    with ``detector=True``, ``map_50`` (the model's Fast R-CNN head on those proposals). The
    model is left unchanged.
    """
    from rpnlab.engine.evaluation import DEFAULT_IOU_THRESHOLDS, evaluate_voc, proposal_recall

    counts = sorted({int(n) for n in counts})
    if not counts or counts[0] < 1 or int(no_nms_count) < 1:
        raise ValueError(f"counts={counts} and no_nms_count={no_nms_count!r} must be positive integers")
    base = model.rpn.proposal_layer
    generator = torch.Generator().manual_seed(int(seed))
    plan = {"RPN": counts, "no NMS": [int(no_nms_count)], "no scores (random)": counts,
            "no regression (anchors)": counts}
    boxes = {v: [] for v in plan}
    detections = {(v, n): [] for v, ns in plan.items() for n in ns}
    gt_all, gt_labels = [], []
    for anchors, logits, deltas, levels, sizes, gt, images in _rpn_outputs(model, dataset, batch_size):
        for variant, ns in plan.items():
            props = variant_proposals(base, variant, max(ns), anchors, logits, deltas, sizes, levels, generator)
            boxes[variant] += [p.cpu() for p in props]
            if detector:
                for n in ns:
                    dets = model(images.to(anchors.device), proposals=[p[:n] for p in props])
                    detections[(variant, n)] += [{k: v.cpu() for k, v in d.items()} for d in dets]
        gt_all += gt
    if detector:
        gt_labels = [{"boxes": t["boxes"], "labels": t["labels"]} for _, t in dataset]
    paper = {(r["variant"], r["test_proposals"]): r["paper_map"] for r in PAPER_TABLE2}
    rows = []
    for variant, ns in plan.items():
        r = proposal_recall(boxes[variant], gt_all, ns, DEFAULT_IOU_THRESHOLDS)
        for i, n in enumerate(ns):
            row = {"setting": f"{variant}, top {n}", "variant": variant, "test_proposals": n, "ar": float(r["average_recall"][i]),
                   "recall_50": float(r["recall_50"][i]), "recall_70": float(r["recall_70"][i]),
                   "mean_proposals": float(np.mean([min(len(b), n) for b in boxes[variant]])),
                   "paper_map": paper.get((variant, n))}
            if detector:
                row["map_50"] = float(evaluate_voc(detections[(variant, n)], gt_labels, model.num_classes)["map"])
            rows.append(row)
    return rows


def recall_vs_iou(model: nn.Module, dataset, counts: Sequence[int] = (300, 1000, 2000),
                  thresholds: Sequence[float] | None = None) -> list[dict[str, Any]]:
    """The paper's Figure 4: recall of the gt boxes against the IoU threshold, for the top N proposals.

    Returns one row per (N, threshold): ``test_proposals``, ``iou``, ``recall``, ``mean_proposals``
    (the proposals an image really had at the largest N: with ~2300 anchors NMS leaves fewer than
    2000, so the curves for large N coincide). ``thresholds`` default 0.5, 0.55, ..., 1.0.
    """
    from rpnlab.lab.experiments import proposal_recall_for

    thresholds = [round(float(t), 4) for t in (thresholds if thresholds is not None else np.linspace(0.5, 1.0, 11))]
    r = proposal_recall_for(model, dataset, counts, thresholds)
    return [{"test_proposals": int(n), "iou": t, "recall": float(r["recall"][i, j]),
             "mean_proposals": float(r["mean_proposals"])}
            for i, n in enumerate(r["num_proposals"]) for j, t in enumerate(thresholds)]


# ---------------------------------------------------------------------------------------------
# Tables


def format_interval(mean: float, low: float, high: float, digits: int = 3) -> str:
    """``"0.412 ± 0.013"`` (half the interval's width); a missing interval shows the mean alone."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    half = (high - low) / 2 if low is not None and high is not None else math.nan
    return f"{mean:.{digits}f}" if math.isnan(half) else f"{mean:.{digits}f} ± {half:.{digits}f}"


def summarise(rows: Sequence[Mapping[str, Any]], by: Sequence[str] | str, metrics: Sequence[str],
              keep: Sequence[str] = (), confidence: float = 0.95) -> list[dict[str, Any]]:
    """One row per setting (the values of ``by``) from tidy rows over seeds.

    Output: the ``by`` keys, the ``keep`` keys (taken from the setting's first row: things that do
    not vary with the seed, such as ``paper_map`` or ``coverage_70``), ``n`` (seeds), and per
    metric ``<m>_mean``, ``<m>_std``, ``<m>_low``, ``<m>_high`` (``rpnlab.lab.stats.aggregate_rows``).
    """
    by = [by] if isinstance(by, str) else list(by)
    if not rows:
        raise ValueError("rows is empty: nothing to summarise")
    missing = [m for m in list(by) + list(metrics) if all(m not in r for r in rows)]
    if missing:
        raise ValueError(f"no row has {missing}; the rows have {sorted(rows[0])}")
    out = aggregate_rows(rows, by, metrics, confidence)
    firsts: dict[tuple, Mapping[str, Any]] = {}
    for r in rows:
        firsts.setdefault(tuple(str(r.get(k)) for k in by), r)
    for agg in out:
        first = firsts[tuple(str(agg.get(k)) for k in by)]
        for k in keep:
            agg[k] = first.get(k)
    return out


def summary_markdown(summary: Sequence[Mapping[str, Any]], by: Sequence[str] | str, metrics: Sequence[str],
                     keep: Sequence[str] = (), digits: int = 3, headers: Mapping[str, str] | None = None) -> str:
    """A markdown table of ``summarise`` output: the ``by`` and ``keep`` columns, then each
    metric as ``mean ± half-interval`` (95% by default), then ``n``."""
    from rpnlab.lab.experiments import rows_to_markdown

    by = [by] if isinstance(by, str) else list(by)
    table = []
    for s in summary:
        row = {k: s.get(k) for k in [*by, *keep]}
        for m in metrics:
            row[m] = format_interval(s.get(f"{m}_mean"), s.get(f"{m}_low"), s.get(f"{m}_high"), digits)
        row["n"] = s.get("n")
        table.append(row)
    return rows_to_markdown(table, [*by, *keep, *metrics, "n"], headers=headers,
                            digits={"paper_map": 1, "lambda": 1, "balance": 2, "paper_balance": 2})


def differing_pairs(summary: Sequence[Mapping[str, Any]], by: str, metric: str) -> list[dict[str, Any]]:
    """Every pair of settings in ``summary`` (``summarise`` output) and whether ``metric`` differs.

    One row per pair ``(a, b)`` in table order: ``a``, ``b``, ``a_mean``, ``b_mean``, ``differ``
    (the 95% intervals do not overlap: ``rpnlab.lab.stats.intervals_differ``), ``higher`` (the
    better-scoring of the two when they differ, else None).
    """
    if not summary or f"{metric}_mean" not in summary[0]:
        raise ValueError(f"summary has no {metric!r}: summarise the rows with metrics including it")
    stats = [{"mean": s[f"{metric}_mean"], "low": s[f"{metric}_low"], "high": s[f"{metric}_high"], "n": s["n"]}
             for s in summary]
    out = []
    for i in range(len(summary)):
        for j in range(i + 1, len(summary)):
            differ = intervals_differ(stats[i], stats[j])
            a, b = summary[i][by], summary[j][by]
            out.append({"a": a, "b": b, "a_mean": stats[i]["mean"], "b_mean": stats[j]["mean"], "differ": differ,
                        "higher": (a if stats[i]["mean"] > stats[j]["mean"] else b) if differ else None})
    return out


# ---------------------------------------------------------------------------------------------
# Figures


def plot_intervals(summary: Sequence[Mapping[str, Any]], x: str, metrics: Sequence[str],
                   paper_key: str | None = "paper_map", reference: Sequence[Mapping[str, Any]] | None = None,
                   title: str | None = None, log_x: bool = False) -> Figure:
    """Means with their 95% intervals per setting (left, percent), the paper's numbers (right).

    ``reference``: another ``summarise`` output of the same settings (e.g. the committed CPU
    reference run) drawn hollow beside ours.
    """
    names = [s[x] for s in summary]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in names)
    paper = [(i, s.get(paper_key)) for i, s in enumerate(summary) if paper_key and s.get(paper_key) is not None]
    fig, axes = new_figure(1, 2 if paper else 1, (5.2, 3.8))
    ax = axes[0, 0]
    pos = np.arange(len(summary), dtype=np.float64)
    groups = [("ours", summary, "o", 1.0)] + ([("reference", reference, "s", 0.5)] if reference else [])
    width = 0.7 / (len(metrics) * len(groups))
    k = 0
    for m_i, m in enumerate(metrics):
        for label, rows, marker, alpha in groups:
            by_name = {r[x]: r for r in rows}
            mean = np.array([100 * by_name[n][f"{m}_mean"] if n in by_name and f"{m}_mean" in by_name[n]
                             else np.nan for n in names])
            low = np.array([100 * by_name[n].get(f"{m}_low", np.nan) if n in by_name else np.nan for n in names])
            high = np.array([100 * by_name[n].get(f"{m}_high", np.nan) if n in by_name else np.nan for n in names])
            err = np.vstack([mean - low, high - mean])
            offset = (k - (len(metrics) * len(groups) - 1) / 2) * width
            ax.errorbar(pos + offset, mean, yerr=np.nan_to_num(err), fmt=marker, capsize=3, alpha=alpha,
                        color=f"C{m_i}", mfc="none" if label == "reference" else None,
                        label=f"{m} ({label})" if reference else m)
            k += 1
    ax.set_ylabel("ours (%), mean ± 95% interval")
    ax.set_title("measured here")
    ax.legend(fontsize=7)
    used = [ax]
    if paper:
        pax = axes[0, 1]
        used.append(pax)
        pv = np.array([p for _, p in paper], dtype=np.float64)
        pax.plot([pos[i] for i, _ in paper], pv, "s", color="tab:gray")
        pax.set_ylim(pv.min() - 3, pv.max() + 2)
        pax.set_ylabel("paper mAP (%)")
        pax.set_title("Ren et al. 2015 (VOC 2007 test)")
    for a in used:
        a.set_xticks(pos, [f"{v:g}" if numeric else str(v) for v in names], rotation=0 if numeric else 25,
                     ha="center" if numeric else "right", fontsize=8)
        a.set_xlim(-0.6, len(summary) - 0.4)
        a.set_xlabel(x)
        a.grid(alpha=0.3, axis="y")
    fig.suptitle(title or f"ablation over {x}")
    return fig


def plot_recall_vs_iou(rows: Sequence[Mapping[str, Any]], title: str | None = None) -> Figure:
    """Figure 4: recall against IoU, one line per proposal count, mean over seeds with a band
    (``rows``: ``recall_vs_iou`` rows, optionally with ``seed``)."""
    from rpnlab.lab.stats import mean_interval

    fig, axes = new_figure(1, 1, (5.0, 3.8))
    ax = axes[0, 0]
    for i, n in enumerate(sorted({int(r["test_proposals"]) for r in rows})):
        ious = sorted({r["iou"] for r in rows if r["test_proposals"] == n})
        stats = [mean_interval([r["recall"] for r in rows if r["test_proposals"] == n and r["iou"] == t]) for t in ious]
        mean = np.array([s["mean"] for s in stats])
        ax.plot(ious, mean, marker="o", ms=3, color=f"C{i}", label=f"{n} proposals")
        if all(s["n"] > 1 for s in stats):
            ax.fill_between(ious, [s["low"] for s in stats], [s["high"] for s in stats], color=f"C{i}", alpha=0.2)
    ax.set_xlabel("IoU threshold")
    ax.set_ylabel("recall")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or "recall vs IoU (the paper's Figure 4)")
    return fig


def compare_with_paper(summary: Sequence[Mapping[str, Any]], by: str, metric: str, paper_key: str = "paper_map",
                       paper_tolerance: float = 1.0) -> list[dict[str, Any]]:
    """Does our ordering of two settings agree with the paper's? One row per pair that has a paper number.

    The paper reports one number per setting (no interval): we read a gap of less than
    ``paper_tolerance`` points as "about equal". Ours is ``differing_pairs``' verdict. Each row:
    ``a``, ``b``, ``paper`` (``"a > b"``, ``"b > a"`` or ``"a ≈ b"`` with the names), ``ours`` (the
    same, ``≈`` when the intervals overlap) and ``agree``.
    """
    pairs = differing_pairs(summary, by, metric)
    paper = {s[by]: s.get(paper_key) for s in summary}
    out = []
    for p in pairs:
        pa, pb = paper.get(p["a"]), paper.get(p["b"])
        if pa is None or pb is None or (isinstance(pa, float) and math.isnan(pa)) or (
                isinstance(pb, float) and math.isnan(pb)):
            continue
        a, b = p["a"], p["b"]
        theirs = f"{a} ≈ {b}" if abs(pa - pb) < paper_tolerance else (f"{a} > {b}" if pa > pb else f"{b} > {a}")
        ours = f"{a} ≈ {b}" if not p["differ"] else (f"{a} > {b}" if p["higher"] == a else f"{b} > {a}")
        out.append({"a": a, "b": b, "paper": theirs, "ours": ours, "agree": theirs == ours})
    return out
