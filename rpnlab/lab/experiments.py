"""The paper's reference numbers and the helpers notebooks 08 and 09 share.

Ren et al. (2015) vary one thing at a time and report detection mAP on PASCAL VOC 2007 test:
the anchors (Table 8), the weight lambda of the box term in the RPN loss (Table 9), and the
number of RPN proposals at test time (Table 2). ``PAPER_*`` and ``paper_reference_rows`` hold
those numbers as *tidy rows* (one flat dict per setting); ``rows_to_markdown`` turns rows into a
table. The ablations themselves, over seeds and with intervals, are ``rpnlab.lab.ablations``.

``loss_balance`` and ``locations_per_image`` give the weight of the RPN's box term relative to its
objectness term, the measurement that explains where our lambda trend departs from the paper's.
``proposal_recall_for`` scores a trained model's proposals at several test-time counts.

The budget helpers turn "train for about N seconds" into a number of epochs, so the
learning-rate schedule (warm-up, cosine decay) still runs to its end: ``measure_stage_seconds``
times a few iterations of each stage, ``plan_epochs`` does the arithmetic, ``fit_to_budget`` both.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from rpnlab.config import DataConfig, ModelConfig, TrainConfig

__all__ = [
    "PAPER_ANCHORS",
    "PAPER_LAMBDA",
    "PAPER_TEST_PROPOSALS",
    "fit_to_budget",
    "locations_per_image",
    "loss_balance",
    "measure_iteration_seconds",
    "measure_stage_seconds",
    "paper_reference_rows",
    "plan_epochs",
    "proposal_recall_for",
    "rows_to_markdown",
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


def _stage_cost(schedule: str, epochs: int, iterations_per_epoch: int, seconds: float | Mapping[str, float],
                split: Sequence[int] = (2, 1, 2, 1)) -> float:
    """Estimated seconds of ``epochs`` epochs of ``schedule`` (seconds per iteration: one number, or
    one per stage name as ``rpnlab.engine.train.stages_for`` names them; ``split``: the 4-step
    schedule's ``TrainConfig.alternating_split``)."""
    from rpnlab.engine.train import stages_for

    total = 0.0
    for stage in stages_for(schedule, epochs, split):
        per_iteration = seconds[stage.name] if isinstance(seconds, Mapping) else seconds
        total += stage.epochs * iterations_per_epoch * per_iteration
    return total


def plan_epochs(
    time_budget_s: float,
    seconds_per_iteration: float | Mapping[str, float],
    iterations_per_epoch: int,
    schedule: str = "joint",
    max_epochs: int | None = None,
    split: Sequence[int] = (2, 1, 2, 1),
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
               if _stage_cost(schedule, e, iterations_per_epoch, seconds_per_iteration, split) <= time_budget_s]
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
    stages = stages_for(train_cfg.schedule, max(train_cfg.epochs, 4), train_cfg.alternating_split)
    return sum(s.epochs * per_stage[s.name] for s in stages) / sum(s.epochs for s in stages)


def fit_to_budget(
    model_cfg: ModelConfig,
    data_cfg: DataConfig,
    train_cfg: TrainConfig,
    time_budget_s: float,
    train_dataset=None,
    probe_iterations: int = 5,
    max_epochs: int | None = None,
    safety: float = 1.5,
) -> tuple[TrainConfig, dict[str, Any]]:
    """A copy of ``train_cfg`` whose epochs fit ``time_budget_s`` -> ``(train_cfg, plan)``.

    Times each stage (``measure_stage_seconds``, median of ``probe_iterations - 1``: with 2, one
    slow second iteration of a 4-step stage once gave it 26 epochs that trained in 177 of 300 s),
    then sets ``epochs`` with ``plan_epochs`` and
    ``time_budget_s = safety * time_budget_s`` as a hard stop in case the estimate was optimistic
    (the result's ``stop_reason`` then says ``"time_budget"``). ``plan``: ``seconds_per_iteration``
    (``{stage: seconds}``), ``iterations_per_epoch``, ``epochs``, ``planned_seconds``.
    """
    n = len(train_dataset) if train_dataset is not None else data_cfg.num_train
    per_epoch = max(1, math.ceil(n / train_cfg.batch_size))
    seconds = measure_stage_seconds(model_cfg, data_cfg, train_cfg, probe_iterations, train_dataset)
    fitted = copy.deepcopy(train_cfg)
    fitted.epochs = plan_epochs(time_budget_s, seconds, per_epoch, train_cfg.schedule, max_epochs,
                                train_cfg.alternating_split)
    fitted.time_budget_s = safety * time_budget_s
    fitted.validate()
    plan = {"seconds_per_iteration": seconds, "iterations_per_epoch": per_epoch, "epochs": fitted.epochs,
            "planned_seconds": _stage_cost(train_cfg.schedule, fitted.epochs, per_epoch, seconds,
                                           train_cfg.alternating_split)}
    return fitted, plan


# ---------------------------------------------------------------------------------------------
# One setting: train, evaluate, summarise


# ---------------------------------------------------------------------------------------------
# Ablation 1: anchors (Table 8)


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


# ---------------------------------------------------------------------------------------------
# Ablation 3: test-time proposals (Table 2)


def _set_test_count(layer, n: int) -> tuple:
    """Make ``layer`` keep ``n`` proposals at test time -> the counts to restore afterwards."""
    saved = (layer.pre_nms_top_n, layer.post_nms_top_n)
    layer.pre_nms_top_n = (saved[0][0], max(saved[0][1], n))
    layer.post_nms_top_n = (saved[1][0], n)
    return saved


@torch.no_grad()
def locations_per_image(model_cfg: ModelConfig, dataset) -> int:
    """Anchor locations (sum of H * W over levels) of the first image of ``dataset``: the paper's
    N_reg for one image, which ``loss_balance`` weighs the box term by."""
    from rpnlab.lab.anchors import default_feature_sizes

    image, _ = dataset[0]
    sizes = default_feature_sizes(tuple(image.shape[-2:]), model_cfg.anchors.strides)
    return sum(h * w for h, w in sizes)


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


