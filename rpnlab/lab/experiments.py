"""The paper's ablations in miniature (notebook 09) and the training-budget helpers of notebook 08.

Ren et al. (2015) vary one thing at a time and report detection mAP on PASCAL VOC 2007 test:
the anchors (Table 8), the weight lambda of the box term in the RPN loss (Table 9), and the
number of RPN proposals at test time (Table 2). Here each ablation trains one short model per
setting on the embedded synthetic shapes with ``rpnlab.engine.train.train``, scores it with
``rpnlab.engine.train.evaluate``, and returns *tidy rows*: one flat dict per setting holding the
setting, what we measured and the paper's number beside it. ``rows_to_markdown`` turns rows
into a table; a list of rows also goes straight into ``pandas.DataFrame``.

Every row of a trained setting has the same measured keys (``MEASURED_KEYS``):
``map_50`` (VOC AP at IoU 0.5, all-point), ``map`` (COCO AP@[.5:.95]), ``recall_50`` and
``recall_70`` (share of gt boxes that some test-time proposal overlaps with IoU >= 0.5 / 0.7),
``average_recall`` (recall averaged over IoU 0.5:0.95), ``mean_proposals`` (proposals per image),
``final_loss`` (mean total loss of the last iterations), ``iterations``, ``train_seconds`` and
``eval_seconds``. Scores are fractions in [0, 1]; the paper's are percentages (``paper_map``).

The budget helpers turn "train for about N seconds" into a number of epochs, so the
learning-rate schedule (warm-up, cosine decay) still runs to its end: ``measure_stage_seconds``
times a few iterations of each stage, ``plan_epochs`` does the arithmetic, ``fit_to_budget`` both.

Longer than 500 lines because each of the paper's tables (anchors, lambda, proposal counts) needs
its settings, its runner and its reference rows side by side.
"""

from __future__ import annotations

import copy
import math
import re
import statistics
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

from rpnlab.config import DataConfig, ModelConfig, TrainConfig
from rpnlab.lab.figures import (
    new_figure,
)

__all__ = [
    "MEASURED_KEYS",
    "PAPER_ANCHORS",
    "PAPER_LAMBDA",
    "PAPER_TEST_PROPOSALS",
    "anchor_ablation",
    "anchor_settings",
    "fit_to_budget",
    "lambda_ablation",
    "loss_balance",
    "measure_iteration_seconds",
    "measure_stage_seconds",
    "paper_reference_rows",
    "plan_epochs",
    "proposal_count_ablation",
    "proposal_recall_for",
    "rows_to_markdown",
    "train_and_evaluate",
]

# ---------------------------------------------------------------------------------------------
# The paper's numbers (Ren et al. 2015, arXiv:1506.01497v3): detection mAP (%) on PASCAL VOC 2007
# test, trained on VOC 2007 trainval.

# Table 8: anchor settings, VGG-16. "scales" are anchor areas (128^2 = 128 x 128 px), ratios w:h.
PAPER_ANCHORS: tuple[dict[str, Any], ...] = (
    {"setting": "1 scale, 1 ratio", "scales": "128²", "ratios": "1:1", "paper_map": 65.8},
    {"setting": "1 scale, 1 ratio", "scales": "256²", "ratios": "1:1", "paper_map": 66.7},
    {"setting": "1 scale, 3 ratios", "scales": "128²", "ratios": "{2:1, 1:1, 1:2}", "paper_map": 68.8},
    {"setting": "1 scale, 3 ratios", "scales": "256²", "ratios": "{2:1, 1:1, 1:2}", "paper_map": 67.9},
    {"setting": "3 scales, 1 ratio", "scales": "{128², 256², 512²}", "ratios": "1:1", "paper_map": 69.8},
    {"setting": "3 scales, 3 ratios", "scales": "{128², 256², 512²}", "ratios": "{2:1, 1:1, 1:2}",
     "paper_map": 69.9},
)

# Table 9: lambda of the RPN loss (eq. 1) with the paper's normalisation, VGG-16.
PAPER_LAMBDA: dict[float, float] = {0.1: 67.2, 1.0: 68.9, 3.0: 69.8, 10.0: 69.9, 100.0: 69.1}

# Table 2: test-time proposals. A Fast R-CNN (ZF) trained on 2000 Selective Search proposals,
# tested on the top-N proposals of an RPN (ZF) that shares no features with it. The paper has
# no row with a jointly trained model at several counts; this is the closest.
PAPER_TEST_PROPOSALS: dict[int, float] = {100: 55.1, 300: 56.8, 1000: 56.3}

MEASURED_KEYS = (
    "map_50",
    "map",
    "recall_50",
    "recall_70",
    "average_recall",
    "mean_proposals",
    "final_loss",
    "iterations",
    "train_seconds",
    "eval_seconds",
)


def paper_reference_rows() -> dict[str, list[dict[str, Any]]]:
    """The paper's numbers as tidy rows: ``{"anchors" (Table 8), "lambda" (Table 9),
    "proposals" (Table 2)}``, each a list of flat dicts with a ``table`` key naming the source."""
    anchors = [{"table": "Table 8", **row} for row in PAPER_ANCHORS]
    lambdas = [{"table": "Table 9", "lambda": lam, "paper_map": m} for lam, m in PAPER_LAMBDA.items()]
    proposals = [{"table": "Table 2", "test_proposals": n, "paper_map": m} for n, m in PAPER_TEST_PROPOSALS.items()]
    return {"anchors": anchors, "lambda": lambdas, "proposals": proposals}


# ---------------------------------------------------------------------------------------------
# Tables


def _format_value(value: Any, digits: int) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.{digits}f}"
    if isinstance(value, (list, tuple)):  # a setting such as anchor sizes: shortest exact form
        return ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return str(value).replace("|", "\\|").replace("\n", " ")


def rows_to_markdown(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str] | None = None,
    headers: Mapping[str, str] | None = None,
    digits: int | Mapping[str, int] = 3,
) -> str:
    """A markdown table of ``rows`` (one dict per row).

    Args:
        rows: the rows; a key missing from a row shows as ``-``, as do ``None`` and NaN.
        columns: which keys, in order (default: every key, in the order first seen).
        headers: display names for some columns (default: the key itself).
        digits: decimals for floats, one number for all or ``{column: digits}`` (default 3).
    Returns:
        The table as a string: header line, alignment line (numbers right-aligned), one line per row.
    """
    if isinstance(rows, Mapping) or not all(isinstance(r, Mapping) for r in rows):
        raise TypeError("rows must be a sequence of dicts, one per table row")
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k in r))
    if not columns:
        raise ValueError("rows_to_markdown needs at least one column (rows is empty and no columns were given)")
    headers = dict(headers or {})

    def decimals(col: str) -> int:
        return digits.get(col, 3) if isinstance(digits, Mapping) else int(digits)

    def numeric(col: str) -> bool:
        values = [r[col] for r in rows if r.get(col) is not None]
        return bool(values) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)

    lines = [
        "| " + " | ".join(_format_value(headers.get(c, c), 0) for c in columns) + " |",
        "|" + "|".join("---:" if numeric(c) else "---" for c in columns) + "|",
    ]
    for r in rows:
        lines.append("| " + " | ".join(_format_value(r.get(c), decimals(c)) for c in columns) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Training budget


def _stage_cost(schedule: str, epochs: int, iterations_per_epoch: int, seconds: float | Mapping[str, float]) -> float:
    """Estimated seconds of ``epochs`` epochs of ``schedule`` (seconds per iteration: one number, or
    one per stage name as ``rpnlab.engine.train.stages_for`` names them)."""
    from rpnlab.engine.train import stages_for

    total = 0.0
    for stage in stages_for(schedule, epochs):
        per_iteration = seconds[stage.name] if isinstance(seconds, Mapping) else seconds
        total += stage.epochs * iterations_per_epoch * per_iteration
    return total


def plan_epochs(
    time_budget_s: float,
    seconds_per_iteration: float | Mapping[str, float],
    iterations_per_epoch: int,
    schedule: str = "joint",
    max_epochs: int | None = None,
) -> int:
    """The most epochs of ``schedule`` that fit in ``time_budget_s``.

    ``seconds_per_iteration``: one number for every iteration, or ``{stage name: seconds}``
    (``measure_stage_seconds``), for schedules whose stages cost differently: the alternating
    schedule's RPN steps and its last step (a frozen backbone) are much cheaper than step 2.
    At least 1 epoch (4 for ``"alternating"``, one per step); at most ``max_epochs`` if given.
    """
    values = list(seconds_per_iteration.values()) if isinstance(seconds_per_iteration, Mapping) else [
        seconds_per_iteration]
    if not (time_budget_s > 0 and values and all(v > 0 for v in values)):
        raise ValueError(f"time_budget_s={time_budget_s!r} and seconds_per_iteration={seconds_per_iteration!r} "
                         "must be positive")
    if iterations_per_epoch < 1:
        raise ValueError(f"iterations_per_epoch={iterations_per_epoch!r} must be at least 1")
    least = 4 if schedule == "alternating" else 1
    # Any schedule costs at least epochs * iterations_per_epoch * (its cheapest stage), which bounds
    # the search. The cost is not monotonic in the epochs (the 2:1:2:1 split of 5 epochs gives the
    # expensive step 2 two of them, that of 6 one), so every candidate is tried.
    most = int(time_budget_s // (min(values) * iterations_per_epoch))
    if max_epochs is not None:
        most = min(most, max_epochs)
    fitting = [e for e in range(least, most + 1)
               if _stage_cost(schedule, e, iterations_per_epoch, seconds_per_iteration) <= time_budget_s]
    return max(fitting, default=least)


def measure_stage_seconds(
    model_cfg: ModelConfig,
    data_cfg: DataConfig,
    train_cfg: TrainConfig,
    iterations: int = 2,
    train_dataset=None,
) -> dict[str, float]:
    """Seconds per training iteration of each stage of ``train_cfg.schedule`` -> ``{stage name: s}``.

    Trains a throw-away model on the first ``(iterations + 1) * batch_size`` training images, one
    epoch per stage, and keeps the median time of each stage's iterations after its first (which
    allocates memory and picks kernels, so it is slower). Writes to a temporary folder.
    """
    import tempfile

    from torch.utils.data import Subset

    from rpnlab.data import build_dataset
    from rpnlab.engine.train import stages_for, train

    if iterations < 1:
        raise ValueError(f"iterations={iterations!r} must be at least 1")
    dataset = train_dataset if train_dataset is not None else build_dataset(data_cfg, "train")
    subset = Subset(dataset, range(min(len(dataset), (iterations + 1) * train_cfg.batch_size)))
    stamps: list[tuple[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="rpnlab-probe-") as tmp:
        probe = copy.deepcopy(train_cfg)
        probe.epochs = len(stages_for(train_cfg.schedule, 4))  # 1 epoch per stage (4 for alternating)
        probe.max_iters, probe.time_budget_s, probe.out_dir = None, None, tmp
        start = time.perf_counter()
        train(model_cfg, data_cfg, probe, progress=False, train_dataset=subset,
              callback=lambda record: stamps.append((record["stage"], time.perf_counter())))
    seconds: dict[str, list[float]] = {}
    previous = start
    for stage, now in stamps:
        seconds.setdefault(stage, []).append(now - previous)
        previous = now
    return {stage: statistics.median(v[1:] if len(v) > 1 else v) for stage, v in seconds.items()}


def measure_iteration_seconds(
    model_cfg: ModelConfig,
    data_cfg: DataConfig,
    train_cfg: TrainConfig,
    iterations: int = 2,
    train_dataset=None,
) -> float:
    """Seconds per training iteration, averaged over the stages of ``train_cfg.schedule`` with the
    weights of their epochs (see ``measure_stage_seconds``)."""
    from rpnlab.engine.train import stages_for

    per_stage = measure_stage_seconds(model_cfg, data_cfg, train_cfg, iterations, train_dataset)
    stages = stages_for(train_cfg.schedule, max(train_cfg.epochs, 4))
    return sum(s.epochs * per_stage[s.name] for s in stages) / sum(s.epochs for s in stages)


def fit_to_budget(
    model_cfg: ModelConfig,
    data_cfg: DataConfig,
    train_cfg: TrainConfig,
    time_budget_s: float,
    train_dataset=None,
    probe_iterations: int = 2,
    max_epochs: int | None = None,
    safety: float = 1.5,
) -> tuple[TrainConfig, dict[str, Any]]:
    """A copy of ``train_cfg`` whose epochs fit ``time_budget_s`` -> ``(train_cfg, plan)``.

    Times each stage (``measure_stage_seconds``), then sets ``epochs`` with ``plan_epochs`` and
    ``time_budget_s = safety * time_budget_s`` as a hard stop in case the estimate was optimistic
    (the result's ``stop_reason`` then says ``"time_budget"``). ``plan``: ``seconds_per_iteration``
    (``{stage: seconds}``), ``iterations_per_epoch``, ``epochs``, ``planned_seconds``.
    """
    n = len(train_dataset) if train_dataset is not None else data_cfg.num_train
    per_epoch = max(1, math.ceil(n / train_cfg.batch_size))
    seconds = measure_stage_seconds(model_cfg, data_cfg, train_cfg, probe_iterations, train_dataset)
    fitted = copy.deepcopy(train_cfg)
    fitted.epochs = plan_epochs(time_budget_s, seconds, per_epoch, train_cfg.schedule, max_epochs)
    fitted.time_budget_s = safety * time_budget_s
    fitted.validate()
    plan = {"seconds_per_iteration": seconds, "iterations_per_epoch": per_epoch, "epochs": fitted.epochs,
            "planned_seconds": _stage_cost(train_cfg.schedule, fitted.epochs, per_epoch, seconds)}
    return fitted, plan


# ---------------------------------------------------------------------------------------------
# One setting: train, evaluate, summarise


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower() or "setting"


def _final_loss(history: Sequence[Mapping[str, Any]], last: int = 10) -> float:
    totals = [float(h["total"]) for h in history[-last:] if "total" in h]
    return sum(totals) / len(totals) if totals else float("nan")


def _summary(result: Mapping[str, Any]) -> dict[str, float]:
    """The measured keys of one ``rpnlab.engine.train.evaluate`` result (recall: all test-time proposals)."""
    recall = result["proposal_recall"]
    return {
        "map_50": float(result["map_50"]),
        "map": float(result["map"]),
        "recall_50": float(result["recall_50"]),
        "recall_70": float(result["recall_70"]),
        "average_recall": float(recall["average_recall"][-1]),
        "eval_seconds": float(result["seconds"]),
    }


@torch.no_grad()
def _mean_proposals(model: nn.Module, dataset, batch_size: int = 8) -> float:
    """Proposals per image the model's RPN gives in eval mode, averaged over ``dataset``."""
    from torch.utils.data import DataLoader

    from rpnlab.data import collate

    device = next(model.parameters()).device
    model.eval()
    counts = []
    for images, _ in DataLoader(dataset, batch_size=batch_size, collate_fn=collate):
        out = model(images.to(device), rpn_only=True)
        counts += [len(o["boxes"]) for o in out]
    return sum(counts) / len(counts) if counts else float("nan")


def train_and_evaluate(
    model_cfg: ModelConfig,
    data_cfg: DataConfig,
    train_cfg: TrainConfig,
    val_dataset=None,
    train_dataset=None,
) -> tuple[dict[str, Any], Any]:
    """Train one model and score it on ``val_dataset`` -> ``(row, train_result)``.

    ``row`` holds ``MEASURED_KEYS``; ``train_result`` is ``rpnlab.engine.train.TrainResult`` (its
    ``model`` and ``history``). ``val_dataset`` defaults to ``build_dataset(data_cfg, "val")``.
    """
    from rpnlab.data import build_dataset
    from rpnlab.engine.train import evaluate, train

    if val_dataset is None:
        val_dataset = build_dataset(data_cfg, "val")
    result = train(model_cfg, data_cfg, train_cfg, progress=False, train_dataset=train_dataset)
    scores = evaluate(result.model, val_dataset)
    row = {**_summary(scores), "mean_proposals": _mean_proposals(result.model, val_dataset),
           "final_loss": _final_loss(result.history), "iterations": int(result.iterations),
           "train_seconds": float(result.seconds)}
    return {k: row[k] for k in MEASURED_KEYS}, result


def _setting_train_cfg(train_cfg: TrainConfig, name: str) -> TrainConfig:
    # Each setting writes its checkpoint in its own folder, so settings never overwrite each other.
    cfg = copy.deepcopy(train_cfg)
    cfg.out_dir = str(Path(train_cfg.out_dir) / _slug(name))
    return cfg


# ---------------------------------------------------------------------------------------------
# Ablation 1: anchors (Table 8)


def anchor_settings(
    sizes: Sequence[float] = (16, 32, 64),
    ratios: Sequence[float] = (0.5, 1.0, 2.0),
    single_size: float | None = None,
) -> list[dict[str, Any]]:
    """The four settings of the paper's Table 8, scaled to our data.

    ``sizes`` are the "3 scales" (the paper's 128, 256, 512 for ~600-pixel images), ``ratios`` the
    "3 ratios"; the "1 scale" settings use ``single_size`` (default: the middle size, the paper's
    256²) and "1 ratio" is 1:1. Each setting: ``setting``, ``sizes``, ``ratios`` and ``paper_map``,
    Table 8's number for the same setting: for "1 scale" the paper's 128² row if ``single_size`` is
    the smallest of ``sizes``, its 256² row if it is the second, else None (no guessing); None too
    when there are not exactly 3 sizes or ratios where the paper has 3.
    """
    sizes, ratios = tuple(float(s) for s in sizes), tuple(float(r) for r in ratios)
    if len(sizes) < 2 or len(ratios) < 2:
        raise ValueError(f"sizes={sizes} and ratios={ratios} need at least two values each (the 'several' settings)")
    single = float(single_size) if single_size is not None else sizes[len(sizes) // 2]
    paper_scale = {0: "128²", 1: "256²"}.get(sizes.index(single)) if single in sizes else None

    def paper(setting: str, scale: str | None) -> float | None:
        for row in PAPER_ANCHORS:
            if row["setting"] == setting and (scale is None or row["scales"] == scale):
                return row["paper_map"]
        return None

    many_scales, many_ratios = f"{len(sizes)} scales", f"{len(ratios)} ratios"
    return [
        {"setting": "1 scale, 1 ratio", "sizes": (single,), "ratios": (1.0,),
         "paper_map": paper("1 scale, 1 ratio", paper_scale) if paper_scale else None},
        {"setting": f"{many_scales}, 1 ratio", "sizes": sizes, "ratios": (1.0,),
         "paper_map": paper("3 scales, 1 ratio", None) if len(sizes) == 3 else None},
        {"setting": f"1 scale, {many_ratios}", "sizes": (single,), "ratios": ratios,
         "paper_map": paper("1 scale, 3 ratios", paper_scale) if paper_scale and len(ratios) == 3 else None},
        {"setting": f"{many_scales}, {many_ratios}", "sizes": sizes, "ratios": ratios,
         "paper_map": paper("3 scales, 3 ratios", None) if len(sizes) == 3 and len(ratios) == 3 else None},
    ]


def _check_configs(data_cfg, train_cfg, base_model_cfg) -> None:
    for name, cfg, cls in (("data_cfg", data_cfg, DataConfig), ("train_cfg", train_cfg, TrainConfig),
                           ("base_model_cfg", base_model_cfg, ModelConfig)):
        if not isinstance(cfg, cls):
            raise TypeError(f"{name} must be a {cls.__name__}, got {type(cfg).__name__}")


def anchor_ablation(
    settings: Iterable[Mapping[str, Any]],
    data_cfg: DataConfig,
    train_cfg: TrainConfig,
    base_model_cfg: ModelConfig,
    val_dataset=None,
    train_dataset=None,
    progress=None,
) -> list[dict[str, Any]]:
    """Train and evaluate one detector per anchor setting (the paper's Table 8).

    Args:
        settings: dicts with ``setting`` (a name), ``sizes`` and ``ratios`` (one feature level;
            ratios as h/w), optionally ``paper_map``; ``anchor_settings()`` makes the paper's four.
        data_cfg, train_cfg: the data and the (short) schedule, the same for every setting.
        base_model_cfg: everything else of the model; only its anchors change.
        val_dataset: where to evaluate (default ``build_dataset(data_cfg, "val")``).
        train_dataset: train on this instead of ``build_dataset(data_cfg, "train")``.
        progress: called with each finished row (e.g. ``print``), or None.
    Returns:
        One row per setting: ``setting``, ``sizes``, ``ratios``, ``k`` (anchors per location),
        ``coverage_70`` (share of the validation gt boxes whose best anchor has IoU >= 0.7),
        ``paper_map`` and ``MEASURED_KEYS``.
    """
    from rpnlab.data import build_dataset
    from rpnlab.lab.anchors import coverage_over_dataset

    _check_configs(data_cfg, train_cfg, base_model_cfg)
    settings = list(settings)
    if not settings:
        raise ValueError("settings is empty: give at least one anchor setting")
    if val_dataset is None:
        val_dataset = build_dataset(data_cfg, "val")
    rows = []
    for s in settings:
        if not {"sizes", "ratios"} <= set(s):
            raise ValueError(f"each anchor setting needs 'sizes' and 'ratios', got keys {sorted(s)}")
        name = s.get("setting", f"sizes {tuple(s['sizes'])}, ratios {tuple(s['ratios'])}")
        cfg = copy.deepcopy(base_model_cfg)
        cfg.anchors.sizes = (tuple(float(v) for v in s["sizes"]),)
        cfg.anchors.aspect_ratios = (tuple(float(v) for v in s["ratios"]),)
        cfg.validate()
        measured, _ = train_and_evaluate(cfg, data_cfg, _setting_train_cfg(train_cfg, f"anchors-{name}"),
                                         val_dataset, train_dataset)
        # How well the anchors fit the boxes before any training: the RPN refines an anchor that
        # already overlaps an object, so low coverage caps what it can learn.
        coverage = coverage_over_dataset(cfg.anchors, val_dataset, thresholds=(0.7,))
        row = {"setting": name, "sizes": tuple(cfg.anchors.sizes[0]), "ratios": tuple(cfg.anchors.aspect_ratios[0]),
               "k": cfg.anchors.num_anchors_per_location[0], "coverage_70": float(coverage["covered"][0.7]),
               "paper_map": s.get("paper_map"), **measured}
        rows.append(row)
        if progress is not None:
            progress(row)
    return rows


# ---------------------------------------------------------------------------------------------
# Ablation 2: lambda (Table 9)


def loss_balance(reg_weight: float, num_sampled: int, num_locations: int) -> float:
    """How much the box term weighs against the objectness term in the paper's RPN loss.

    Eq. 1 divides the objectness sum by ``N_cls`` (sampled anchors, 256 per image) and the box sum
    by ``N_reg`` (anchor locations, ~2400 for a 600 x 1000 VGG-16 image) times ``lambda``; per
    sampled anchor the box term thus weighs ``lambda * N_cls / N_reg`` times the objectness term.
    The paper's ``lambda = 10`` gives ~1 ("roughly equally weighted"); an 8 x 8 feature map
    (64 locations) makes the same lambda weigh the box term ~37 times more.
    """
    if num_sampled <= 0 or num_locations <= 0:
        raise ValueError(f"num_sampled={num_sampled!r} and num_locations={num_locations!r} must be positive")
    return float(reg_weight) * num_sampled / num_locations


def _locations_per_image(model_cfg: ModelConfig, dataset) -> int:
    """Anchor locations (sum of H * W over levels) of the first image of ``dataset``."""
    from rpnlab.lab.anchors import default_feature_sizes

    image, _ = dataset[0]
    sizes = default_feature_sizes(tuple(image.shape[-2:]), model_cfg.anchors.strides)
    return sum(h * w for h, w in sizes)


def lambda_ablation(
    lambdas: Iterable[float],
    data_cfg: DataConfig,
    train_cfg: TrainConfig,
    base_model_cfg: ModelConfig,
    val_dataset=None,
    train_dataset=None,
    progress=None,
) -> list[dict[str, Any]]:
    """Train and evaluate one detector per ``lambda`` of the RPN loss (the paper's Table 9).

    Every run uses the paper's normalisation (``rpn.loss_normalization = "paper"``:
    ``1/N_cls sum L_cls + lambda/N_reg sum p* L_reg``) with ``rpn.reg_loss_weight = lambda``;
    the rest of ``base_model_cfg`` is kept. Arguments as ``anchor_ablation``.

    Returns:
        One row per lambda: ``lambda``, ``balance`` (``loss_balance``: box vs objectness weight
        per sampled anchor on our feature maps), ``paper_balance`` (the same for the paper's
        ~2400 locations), ``paper_map`` and ``MEASURED_KEYS``.
    """
    from rpnlab.data import build_dataset

    _check_configs(data_cfg, train_cfg, base_model_cfg)
    lambdas = [float(v) for v in lambdas]
    if not lambdas or any(not math.isfinite(v) or v < 0 for v in lambdas):
        raise ValueError(f"lambdas must be a non-empty list of numbers >= 0, got {lambdas}")
    if val_dataset is None:
        val_dataset = build_dataset(data_cfg, "val")
    locations = _locations_per_image(base_model_cfg, val_dataset)
    sampled = base_model_cfg.rpn.batch_size_per_image
    rows = []
    for lam in lambdas:
        cfg = copy.deepcopy(base_model_cfg)
        cfg.rpn.loss_normalization = "paper"
        cfg.rpn.reg_loss_weight = lam
        cfg.validate()
        measured, _ = train_and_evaluate(cfg, data_cfg, _setting_train_cfg(train_cfg, f"lambda-{lam:g}"),
                                         val_dataset, train_dataset)
        row = {"lambda": lam, "balance": loss_balance(lam, sampled, locations),
               "paper_balance": loss_balance(lam, 256, 2400), "paper_map": PAPER_LAMBDA.get(lam), **measured}
        rows.append(row)
        if progress is not None:
            progress(row)
    return rows


# ---------------------------------------------------------------------------------------------
# Ablation 3: test-time proposals (Table 2)


def _set_test_count(layer, n: int) -> tuple:
    """Make ``layer`` keep ``n`` proposals at test time -> the counts to restore afterwards."""
    saved = (layer.pre_nms_top_n, layer.post_nms_top_n)
    layer.pre_nms_top_n = (saved[0][0], max(saved[0][1], n))
    layer.post_nms_top_n = (saved[1][0], n)
    return saved


@torch.no_grad()
def proposal_recall_for(model: nn.Module, dataset, counts: Sequence[int] = (10, 20, 50, 100, 300),
                        iou_thresholds: Sequence[float] | None = None, batch_size: int = 8) -> dict[str, Any]:
    """Recall of the gt boxes of ``dataset`` by the top-N test-time proposals of ``model``, each N.

    The RPN is run once keeping ``max(counts)`` proposals per image (the model is restored after);
    ``rpnlab.engine.evaluation.proposal_recall`` then reads every N off the same sorted lists (the
    paper's Fig. 4 compares 300, 1000 and 2000). Returns its dict plus ``mean_proposals``.
    """
    from torch.utils.data import DataLoader

    from rpnlab.data import collate
    from rpnlab.engine.evaluation import DEFAULT_IOU_THRESHOLDS, proposal_recall

    counts = [int(n) for n in counts]
    if not counts or any(n < 1 for n in counts):
        raise ValueError(f"counts must be positive integers, got {counts}")
    device = next(model.parameters()).device
    model.eval()
    saved = _set_test_count(model.rpn.proposal_layer, max(counts))
    proposals, gt = [], []
    try:
        for images, targets in DataLoader(dataset, batch_size=batch_size, collate_fn=collate):
            out = model(images.to(device), rpn_only=True)
            proposals += [o["boxes"].cpu() for o in out]
            gt += [t["boxes"] for t in targets]
    finally:
        model.rpn.proposal_layer.pre_nms_top_n, model.rpn.proposal_layer.post_nms_top_n = saved
    result = proposal_recall(proposals, gt, counts, iou_thresholds or DEFAULT_IOU_THRESHOLDS)
    result["mean_proposals"] = sum(len(p) for p in proposals) / max(len(proposals), 1)
    return result


def proposal_count_ablation(model: nn.Module, dataset, counts: Iterable[int]) -> list[dict[str, Any]]:
    """Evaluate one trained ``model`` keeping the top ``N`` RPN proposals at test time, for each N.

    Only the proposal layer's test-time ``post_nms_top_n`` changes (its ``pre_nms_top_n`` is raised
    to N where it is smaller); the model is restored afterwards. With few anchors (an 8 x 8 map
    with 9 anchors has 576), NMS leaves fewer boxes than a large N asks for: ``mean_proposals``
    says how many there really were.

    Returns:
        One row per N: ``test_proposals``, ``paper_map`` (Table 2, where the paper has N) and
        ``map_50``, ``map``, ``recall_50``, ``recall_70``, ``average_recall``, ``mean_proposals``,
        ``eval_seconds``.
    """
    from rpnlab.engine.train import evaluate

    counts = [int(n) for n in counts]
    if not counts or any(n < 1 for n in counts):
        raise ValueError(f"counts must be positive integers, got {counts}")
    layer = model.rpn.proposal_layer
    saved = (layer.pre_nms_top_n, layer.post_nms_top_n)
    rows = []
    try:
        for n in counts:
            layer.pre_nms_top_n, layer.post_nms_top_n = saved
            _set_test_count(layer, n)
            scores = evaluate(model, dataset)
            rows.append({"test_proposals": n, "paper_map": PAPER_TEST_PROPOSALS.get(n), **_summary(scores),
                         "mean_proposals": _mean_proposals(model, dataset)})
    finally:
        layer.pre_nms_top_n, layer.post_nms_top_n = saved
    return rows


def plot_ablation(rows: Sequence[Mapping[str, Any]], x: str, metrics: Sequence[str] = ("map_50",),
                  paper_key: str | None = "paper_map", log_x: bool = False, x_label: str | None = None,
                  labels: Mapping[str, str] | None = None, title: str | None = None) -> Figure:
    """An ablation's rows side by side with the paper's: our ``metrics`` (left panel, fractions drawn
    in percent) and the paper's ``paper_key`` (right panel, percent) against the setting ``x``.

    A numeric ``x`` draws lines (``log_x`` for lambda or proposal counts), a text ``x`` grouped bars.
    Rows without a paper number are left out of the right panel.
    """
    labels = dict(labels or {})
    names = [r[x] for r in rows]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in names)
    paper = [(r[x], r.get(paper_key)) for r in rows] if paper_key else []
    paper = [(v, p) for v, p in paper if p is not None]
    fig, axes = new_figure(1, 2 if paper else 1, (4.8, 3.6))
    ax = axes[0, 0]
    positions = np.asarray(names, dtype=np.float64) if numeric else np.arange(len(rows), dtype=np.float64)
    width = 0.8 / max(len(metrics), 1)
    for j, m in enumerate(metrics):
        values = np.array([100 * float(r[m]) if r.get(m) is not None else np.nan for r in rows])
        if numeric:
            ax.plot(positions, values, marker="o", label=labels.get(m, m))
        else:
            ax.bar(positions + (j - (len(metrics) - 1) / 2) * width, values, width, label=labels.get(m, m))
    ax.set_ylabel("ours (%)")
    ax.set_title("measured here")
    ax.legend(fontsize=7)
    axes_used = [ax]
    if paper:
        pax = axes[0, 1]
        axes_used.append(pax)
        pv = np.array([p for _, p in paper], dtype=np.float64)
        if numeric:
            pax.plot(np.asarray([v for v, _ in paper], dtype=np.float64), pv, marker="s", color="tab:gray")
        else:
            idx = [names.index(v) for v, _ in paper]
            pax.bar(np.asarray(idx, dtype=np.float64), pv, 0.6, color="tab:gray")
            pax.set_ylim(max(0.0, pv.min() - 5), pv.max() + 2)
        pax.set_ylabel("paper mAP (%)")
        pax.set_title("Ren et al. 2015 (VOC 2007 test)")
    for a in axes_used:
        if numeric:
            if log_x:
                a.set_xscale("log")
            a.set_xticks(positions, [f"{v:g}" for v in names])
        else:
            a.set_xticks(positions, [str(v) for v in names], rotation=20, ha="right", fontsize=8)
        a.set_xlabel(x_label or x)
        a.grid(alpha=0.3, axis="y")
    fig.suptitle(title or f"ablation over {x}")
    return fig
