"""The ``rpnlab`` command: train, evaluate, predict, and run or sweep the notebooks.

::

    rpnlab train --epochs 12 --out-dir runs/shapes          # the synthetic preset on the CPU
    rpnlab evaluate --checkpoint runs/shapes/checkpoint.pt --split val --json metrics.json
    rpnlab export-samples --out runs/samples                  # a few dataset images as PNG files
    rpnlab predict runs/samples/test_000.png --checkpoint runs/shapes/checkpoint.pt --out runs/predictions
    rpnlab run --smoke --out runs/smoke -p device cpu
    rpnlab sweep 03 -p anchor_stride 8 16 --parallel 2
    rpnlab sweep 02 -p seed 0 1 2 -p num_pairs 1000 5000 --aggregate seed --out runs/sw
    rpnlab sweep 02 -p seed 0 1 2 --executor dask --scheduler tcp://head:8786 --out runs/sw
    rpnlab sweep 02 -p seed 0 1 2 --shard 1/3 --out runs/sw; rpnlab sweep collect runs/sw

Every field of the config dataclasses (``rpnlab.config``) is an option of ``train`` (and the data
fields of ``evaluate``): ``--<field>`` for the data, training and top-level model fields
(``--data-seed`` for ``DataConfig.seed``), ``--anchor-<field>``, ``--rpn-<field>`` and
``--roi-<field>`` for the three stage configs. An option left out keeps the preset's value
(``--preset synthetic``, the CPU configuration, by default), or the checkpoint's with ``--resume``.

Longer than 500 lines because every command's parser, validation and output live together, so that
`rpnlab X --help` and what X does are read in one place.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rpnlab.config import (
    BACKBONE_NAMES,
    AnchorConfig,
    DataConfig,
    ModelConfig,
    RoIConfig,
    RPNConfig,
    TrainConfig,
    from_dict,
)

__all__ = [
    "PRESETS",
    "add_config_arguments",
    "build_parser",
    "configs_from_args",
    "main",
    "option_name",
    "parse_value",
    "preset_configs",
]

PRESETS = ("synthetic", "gpu", "defaults", "photos")  # rpnlab.engine.presets.PRESETS

# Sections of options: (name, config class, option prefix). Model sub-configs get a prefix, since
# several of their fields share names (fg_iou_thresh, nms_thresh, ...).
_SECTIONS = (
    ("model", ModelConfig, ""),
    ("anchors", AnchorConfig, "anchor-"),
    ("rpn", RPNConfig, "rpn-"),
    ("roi", RoIConfig, "roi-"),
    ("data", DataConfig, ""),
    ("train", TrainConfig, ""),
)
_RENAMED = {("data", "seed"): "data-seed"}  # TrainConfig.seed is --seed
_ALIASES = {("model", "pretrained"): ("--backbone-weights",)}  # second names of an option
_NESTED = ("anchors", "rpn", "roi")  # ModelConfig fields that are sections of their own

_CHOICES = {
    ("model", "backbone"): BACKBONE_NAMES,
    ("model", "small_norm"): ("group", "batch"),
    ("anchors", "ratio_convention"): ("h/w", "w/h"),
    ("rpn", "objectness"): ("sigmoid", "softmax"),
    ("rpn", "loss_normalization"): ("sampled", "paper"),
    ("rpn", "proposal_mode"): ("nms", "top"),
    ("roi", "pooler"): ("align", "pool", "crop"),
    ("roi", "implementation"): ("torchvision", "python", "auto"),
    ("data", "dataset"): ("synthetic", "voc", "coco"),
    ("train", "schedule"): ("joint", "alternating", "rpn"),
    ("train", "alternating_init"): ("fresh", "step1"),
    ("train", "lr_schedule"): ("cosine", "step"),
    ("train", "amp"): ("off", "auto", "bf16", "fp16"),
}

_HELP = {
    ("model", "num_classes"): "foreground classes C (background excluded); 3 for the synthetic shapes, 20 for VOC",
    ("model", "backbone"): "feature extractor shared by the RPN and the RoI head, or a whole torchvision "
                           "detector (fasterrcnn_*: its backbone, FPN and heads)",
    ("model", "pretrained"): "backbone weights (also --backbone-weights): 'imagenet' (torchvision's weights API: "
                             "the torch hub cache, downloaded there when online), a file path, 'cache' (the hub "
                             "cache or data/weights only, never downloaded) or 'none' (random init)",
    ("model", "init"): "start from a whole detector: 'torchvision:<name>' (COCO weights through torchvision's "
                       "weights API, a new box predictor for your classes; sets --backbone and, unless given, "
                       "the anchors, RPN/RoI settings and --min-size/--max-size to that model's) or the path "
                       "of such a torchvision state dict; 'none': no init",
    ("model", "small_norm"): "normalisation after each conv of the 'small' backbone: 'group' or 'batch'",
    ("anchors", "sizes"): "anchor sizes (sqrt of area, px); one level: '16 32 64', several levels: '32,64 128,256' "
                          "or JSON '[[32, 64], [128, 256]]'",
    ("anchors", "aspect_ratios"): "anchor aspect ratios; same forms as --anchor-sizes (a single level is used for "
                                  "every level)",
    ("anchors", "strides"): "feature stride of each anchor level in px; must equal the backbone's strides",
    ("anchors", "offset"): "anchor centres at (index + offset) * stride; 0 torchvision, 0.5 d2l",
    ("anchors", "ratio_convention"): "aspect ratio as height/width (torchvision) or width/height (d2l)",
    ("rpn", "conv_channels"): "channels of the RPN's 3x3 conv",
    ("rpn", "objectness"): "k sigmoid scores with BCE (torchvision) or 2k softmax scores (the paper)",
    ("rpn", "fg_iou_thresh"): "an anchor with IoU >= this with some gt box is positive",
    ("rpn", "bg_iou_thresh"): "an anchor whose best IoU is below this is negative",
    ("rpn", "allow_low_quality_matches"): "each gt box also takes its best-matching anchors as positives",
    ("rpn", "ignore_cross_boundary"): "ignore anchors that cross the image border during training (the paper)",
    ("rpn", "batch_size_per_image"): "anchors sampled per image for the RPN loss",
    ("rpn", "positive_fraction"): "at most this fraction of the sampled anchors is positive",
    ("rpn", "loss_normalization"): "'sampled' (mean over sampled anchors) or 'paper' (1/N_cls + lambda/N_reg)",
    ("rpn", "reg_loss_weight"): "lambda, the box loss weight with --rpn-loss-normalization paper",
    ("rpn", "smooth_l1_beta"): "smooth-L1 transition point of the RPN box loss",
    ("rpn", "box_weights"): "weights (wx, wy, ww, wh) of the RPN box encoding",
    ("rpn", "pre_nms_top_n_train"): "proposals kept per image (per level) before NMS, training",
    ("rpn", "post_nms_top_n_train"): "proposals kept per image after NMS, training",
    ("rpn", "pre_nms_top_n_test"): "proposals kept per image (per level) before NMS, testing",
    ("rpn", "post_nms_top_n_test"): "proposals kept per image after NMS, testing",
    ("rpn", "nms_thresh"): "IoU threshold of the proposal NMS",
    ("rpn", "min_size"): "drop proposals smaller than this many px (side)",
    ("rpn", "score_thresh"): "drop proposals whose objectness probability is below this",
    ("rpn", "proposal_mode"): "'nms' (the paper) or 'top' (top-k without NMS)",
    ("roi", "fg_iou_thresh"): "a proposal with IoU >= this with a gt box is a foreground RoI",
    ("roi", "bg_iou_thresh_high"): "a proposal with best IoU below this is a background RoI ...",
    ("roi", "bg_iou_thresh_low"): "... if its best IoU is at least this (0.1 in Fast R-CNN)",
    ("roi", "batch_size_per_image"): "RoIs sampled per image for the Fast R-CNN loss",
    ("roi", "positive_fraction"): "at most this fraction of the sampled RoIs is foreground",
    ("roi", "box_weights"): "weights (wx, wy, ww, wh) of the Fast R-CNN box encoding",
    ("roi", "pooler"): "'align' (RoI Align), 'pool' (RoI Pool, the paper's) or 'crop' (crop and resize)",
    ("roi", "output_size"): "pooled grid side (7 in the paper)",
    ("roi", "sampling_ratio"): "RoI Align sample points per bin and axis (0: adaptive)",
    ("roi", "aligned"): "RoI Align's half-pixel correction",
    ("roi", "implementation"): "'auto' (RoI Align on a CPU in rpnlab's matrix or sparse form, faster than the "
                               "kernels there; elsewhere the kernels), 'torchvision' (compiled kernels) or 'python' "
                               "(the readable teaching code)",
    ("roi", "representation_size"): "width of the two fully connected layers of the box head",
    ("roi", "smooth_l1_beta"): "smooth-L1 transition point of the Fast R-CNN box loss",
    ("roi", "score_thresh"): "detections scoring below this are dropped",
    ("roi", "nms_thresh"): "IoU threshold of the per-class NMS on detections",
    ("roi", "detections_per_img"): "at most this many detections per image",
    ("data", "dataset"): "which data to train on",
    ("data", "root"): "VOC or COCO folder; for the synthetic data its cache folder (default data/synthetic)",
    ("data", "image_size"): "side of the square synthetic images in px",
    ("data", "num_train"): "synthetic training images",
    ("data", "num_val"): "synthetic validation images",
    ("data", "num_test"): "synthetic test images",
    ("data", "seed"): "seed of the synthetic images (the same seed gives the same pixels everywhere)",
    ("data", "min_size"): "resize: shorter image side in px",
    ("data", "max_size"): "resize: cap on the longer image side in px",
    ("data", "hflip_prob"): "probability of a horizontal flip during training",
    ("data", "vflip_prob"): "probability of a vertical flip during training (only for data with no up and down)",
    ("data", "color_jitter"): "training: brightness, contrast and saturation each scaled by a random factor in "
                              "[1 - this, 1 + this] (0: off)",
    ("data", "classes"): "VOC/COCO class names 'a,b,c' or a file with one per line ('none': the names the "
                         "training annotations use, sorted; COCO: every category). Objects of other classes "
                         "are skipped",
    ("train", "schedule"): "'joint' (approximate joint), 'alternating' (the paper's 4 steps) or 'rpn' (RPN only)",
    ("train", "epochs"): "passes over the training set (all stages together)",
    ("train", "batch_size"): "images per iteration (per process under torchrun)",
    ("train", "lr"): "base learning rate of SGD",
    ("train", "momentum"): "SGD momentum",
    ("train", "weight_decay"): "L2 weight decay",
    ("train", "warmup_iters"): "iterations of linear learning-rate warm-up",
    ("train", "lr_schedule"): "'cosine' decay to 0, or 'step' (divide by 10 at --lr-steps)",
    ("train", "lr_steps"): "epochs at which the 'step' schedule divides the learning rate by 10",
    ("train", "amp"): "mixed precision on CUDA: 'off', 'bf16' or 'fp16'",
    ("train", "device"): "'auto' (cuda, then mps, then cpu), 'cpu', 'cuda', 'cuda:N' or 'mps'",
    ("train", "seed"): "seed of initialisation, data order and sampling",
    ("train", "num_workers"): "DataLoader worker processes (0: load in the main process, exactly reproducible)",
    ("train", "out_dir"): "folder for the checkpoint (checkpoint.pt)",
    ("train", "checkpoint_every"): "write a checkpoint every this many epochs (and at the end)",
    ("train", "max_iters"): "stop after this many iterations in all ('none': run every epoch)",
    ("train", "alternating_init"): "4-step schedule, step 2's backbone: 'fresh' (as built, the paper) or 'step1' "
                                   "(a copy of step 1's trained backbone; the stand-in for ImageNet weights from scratch)",
    ("train", "alternating_split"): "4-step schedule: the epochs of steps 1-4 in this proportion, e.g. '2 1 2 1' "
                                    "(py-faster-rcnn's)",
    ("train", "time_budget_s"): "stop after this many seconds of training ('none': no limit)",
}


def option_name(section: str, field: str) -> str:
    """The command-line option of a config field: ``("rpn", "nms_thresh") -> "--rpn-nms-thresh"``."""
    prefix = {s: p for s, _, p in _SECTIONS}[section]
    return "--" + _RENAMED.get((section, field), prefix + field.replace("_", "-"))


def _dest(section: str, field: str) -> str:
    return f"cfg__{section}__{field}"


def parse_value(text: str) -> Any:
    """A command-line value: JSON when it parses (numbers, lists, true/false, null), else the string."""
    try:
        return json.loads(text)
    except (json.JSONDecodeError, ValueError):
        return text


def _optional(kind):
    def convert(text: str):
        if text.strip().lower() in ("none", "null", ""):
            return None
        return kind(text)

    convert.__name__ = kind.__name__  # argparse names the type in "invalid int value"
    return convert


def _levels(values: list[str], name: str) -> tuple[tuple[float, ...], ...]:
    """``['16', '32']`` -> one level; ``['16,32', '64']`` -> two; ``['[[16], [32, 64]]']`` -> JSON."""
    try:
        if len(values) == 1 and values[0].lstrip().startswith("["):
            data = json.loads(values[0])
            if data and not isinstance(data[0], list):
                data = [data]
            return tuple(tuple(float(v) for v in level) for level in data)
        if any("," in v for v in values):
            return tuple(tuple(float(x) for x in v.split(",") if x.strip()) for v in values)
        return (tuple(float(v) for v in values),)
    except (ValueError, TypeError, json.JSONDecodeError) as err:
        raise ValueError(f"argument {name}: expected numbers per level, got {values!r} ({err})") from None


def _show(value: Any) -> str:
    if isinstance(value, tuple) and value and isinstance(value[0], tuple):
        return " ".join(",".join(f"{x:g}" for x in level) for level in value)
    if isinstance(value, tuple):
        return " ".join(str(v) for v in value) or "(none)"
    return str(value)


def preset_configs(name: str = "synthetic") -> tuple[ModelConfig, DataConfig, TrainConfig]:
    """The ``(model, data, train)`` configs of a preset: ``rpnlab.engine.presets.preset_configs``.

    ``"synthetic"``: the CPU configuration for the embedded shapes; ``"gpu"``: the shapes at 512 px
    for one CUDA GPU (bf16); ``"defaults"``: the dataclass defaults (the paper's values);
    ``"photos"``: a few hundred photos from scratch, no weights at all.
    """
    from rpnlab.engine.presets import preset_configs as configs

    return configs(name)


def _section_defaults(model: ModelConfig, data: DataConfig, train: TrainConfig) -> dict[str, Any]:
    return {"model": model, "anchors": model.anchors, "rpn": model.rpn, "roi": model.roi, "data": data, "train": train}


def add_config_arguments(parser: argparse.ArgumentParser, sections: Sequence[str] | None = None) -> None:
    """One option per config field of ``sections`` (default: all), with help text and choices.

    Options default to ``argparse.SUPPRESS``: only those given appear in the namespace, so a
    preset or a checkpoint supplies the rest (``configs_from_args``). The help shows the
    synthetic preset's value.
    """
    shown = _section_defaults(*preset_configs("synthetic"))
    for section, cls, _ in _SECTIONS:
        if sections is not None and section not in sections:
            continue
        group = parser.add_argument_group(f"{cls.__name__} options")
        for f in dataclasses.fields(cls):
            if section == "model" and f.name in _NESTED:
                continue
            name = option_name(section, f.name)
            names = [name, *_ALIASES.get((section, f.name), ())]
            kwargs: dict[str, Any] = {"dest": _dest(section, f.name), "default": argparse.SUPPRESS}
            help_text = _HELP[(section, f.name)]
            default = getattr(shown[section], f.name)
            kind = str(f.type)
            if kind == "bool":
                kwargs["action"] = argparse.BooleanOptionalAction
            elif kind.startswith("tuple[tuple"):
                kwargs.update(nargs="+", metavar="SIZES" if "sizes" in f.name else "RATIOS")
            elif kind.startswith("tuple[float, float"):
                kwargs.update(nargs=4, type=float, metavar=("WX", "WY", "WW", "WH"))
            elif kind.startswith("tuple[int"):
                kwargs.update(nargs="*", type=int, metavar="N")
            elif kind in ("int", "float", "str"):
                kwargs["type"] = {"int": int, "float": float, "str": str}[kind]
                if (section, f.name) not in _CHOICES:
                    kwargs["metavar"] = kind.upper()
            elif kind.endswith("| None"):
                base = kind.split("|")[0].strip()
                kwargs.update(type=_optional({"int": int, "float": float, "str": str}[base]), metavar=base.upper())
            else:  # a new field type: fail loudly here rather than parse it wrongly
                raise TypeError(f"no command-line form for {cls.__name__}.{f.name}: {kind}")
            if (section, f.name) in _CHOICES:
                kwargs["choices"] = _CHOICES[(section, f.name)]
            kwargs["help"] = f"{help_text} (default: {_show(default)})"
            group.add_argument(*names, **kwargs)


def configs_from_args(
    args: argparse.Namespace, base: tuple[ModelConfig, DataConfig, TrainConfig] | None = None
) -> tuple[ModelConfig, DataConfig, TrainConfig]:
    """Apply the options given on the command line to ``base`` (default: ``args.preset``'s configs,
    or the configs stored in ``args.resume``'s checkpoint) and validate. Raises ``ValueError``."""
    base_is_synthetic_preset = False
    if base is None:
        if getattr(args, "resume", None):
            base = checkpoint_configs(args.resume)
        else:
            base = preset_configs(getattr(args, "preset", "synthetic"))
            base_is_synthetic_preset = getattr(args, "preset", "synthetic") == "synthetic"
    model, data, train = (dataclasses.replace(c) for c in base)
    given = vars(args)
    init = given.get(_dest("model", "init"))
    if init and str(init).startswith("torchvision:"):
        # --init torchvision:<name>: that detector's architecture and settings are the base the
        # other options edit (its resize too, unless --min-size/--max-size are given).
        from rpnlab.config import TORCHVISION_DETECTORS

        name = str(init).split(":", 1)[1]
        if name not in TORCHVISION_DETECTORS:
            raise ValueError(f"--init={init} is invalid: expected torchvision:<name> with one of "
                             + ", ".join(TORCHVISION_DETECTORS))
        from rpnlab.detector.torchvision_models import torchvision_detector, torchvision_parts

        parts = torchvision_parts(torchvision_detector(name, num_classes=model.num_classes + 1))
        model = dataclasses.replace(parts["config"], num_classes=model.num_classes, init=init)
        data.min_size, data.max_size = parts["input_size"]
    model.anchors, model.rpn, model.roi = (dataclasses.replace(c) for c in (model.anchors, model.rpn, model.roi))
    targets = _section_defaults(model, data, train)
    for key, value in vars(args).items():
        if not key.startswith("cfg__"):
            continue
        _, section, name = key.split("__")
        if section == "anchors" and name in ("sizes", "aspect_ratios"):
            value = _levels(value, option_name(section, name))
        elif isinstance(value, list):
            value = tuple(value)
        setattr(targets[section], name, value)
    if (base_is_synthetic_preset and not init and _dest("anchors", "sizes") not in given
            and (_dest("data", "min_size") in given or _dest("data", "max_size") in given)):
        # The synthetic preset's anchors follow its input size; resized otherwise, they follow too.
        from rpnlab.engine.presets import synthetic_detector_config

        model.anchors.sizes = synthetic_detector_config(data).anchors.sizes
    # Re-run AnchorConfig's normalisation (flat tuples -> one level) after the edits, and use a
    # single level of ratios for every level of sizes.
    model.anchors = AnchorConfig(**{f.name: getattr(model.anchors, f.name) for f in dataclasses.fields(AnchorConfig)})
    if len(model.anchors.aspect_ratios) == 1 < len(model.anchors.sizes):
        model.anchors.aspect_ratios = model.anchors.aspect_ratios * len(model.anchors.sizes)
    if model.pretrained is not None and str(model.pretrained).lower() == "none":
        model.pretrained = None
    if model.init is not None and str(model.init).lower() == "none":
        model.init = None
    sections = _section_defaults(model, data, train)
    # The stage configs first, so that their errors are named with their own prefixes; every
    # section is checked, so that all bad options are reported at once.
    problems = []
    for section in ("anchors", "rpn", "roi", "model", "data", "train"):
        cfg = sections[section]
        if section == "model":
            cfg = dataclasses.replace(cfg, anchors=AnchorConfig(), rpn=RPNConfig(), roi=RoIConfig())
        problems += [_with_option_names(section, p) for p in _all_problems(cfg)]
    if problems:
        raise ValueError(problems[0] if len(problems) == 1 else
                         f"{len(problems)} problems:\n  " + "\n  ".join(problems))
    return model, data, train


def _all_problems(cfg) -> list[str]:
    """Every ``validate()`` problem of ``cfg``, not just the first: after each one, the field it
    names is put back to its default on a copy and validation runs again."""
    cfg = dataclasses.replace(cfg)
    default = type(cfg)()
    names = [f.name for f in dataclasses.fields(cfg)]
    problems: list[str] = []
    for _ in range(len(names) + 1):
        try:
            cfg.validate()
            break
        except ValueError as err:
            message = str(err)
            problems.append(message)
            culprits = [n for n in names if re.search(rf"(?<![\w-]){n}(?=[=\[])", message)
                        and getattr(cfg, n) != getattr(default, n)]
            if not culprits:
                break
            for n in culprits:
                setattr(cfg, n, getattr(default, n))
    return problems


def _with_option_names(section: str, message: str) -> str:
    """Name fields in a ``validate()`` message by their options: ``nms_thresh=2`` -> ``--rpn-nms-thresh=2``."""
    cls = {s: c for s, c, _ in _SECTIONS}[section]
    for f in dataclasses.fields(cls):
        if section == "model" and f.name in _NESTED:
            continue
        message = re.sub(rf"(?<![\w-]){f.name}(?=[=\[])", option_name(section, f.name), message)
    return message


def checkpoint_configs(path: str | Path) -> tuple[ModelConfig, DataConfig, TrainConfig]:
    """The ``(model, data, train)`` configs a training checkpoint was written with."""
    from rpnlab.engine.checkpoint import CheckpointError, load_checkpoint

    state = load_checkpoint(path)
    configs = state.get("configs")
    if not isinstance(configs, dict) or not {"model", "data", "train"} <= set(configs):
        raise CheckpointError(f"{str(path)!r} holds no configs: is it an rpnlab training checkpoint?")
    return (from_dict(ModelConfig, configs["model"]), from_dict(DataConfig, configs["data"]),
            from_dict(TrainConfig, configs["train"]))


def checkpoint_classes(path: str | Path) -> list[str] | None:
    """The class names a training checkpoint stores (label ``i + 1`` is ``[i]``), or ``None`` for
    a checkpoint written before they were kept."""
    from rpnlab.engine.checkpoint import load_checkpoint

    names = load_checkpoint(path).get("classes")
    return [str(n) for n in names] if isinstance(names, (list, tuple)) and names else None


# ---------------------------------------------------------------------------------------------
# The parser


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    def _get_help_string(self, action):  # our help already shows the preset's default
        return action.help


def _add_train(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("train", help="train a detector", formatter_class=_Formatter,
                       description="Train Faster R-CNN. Options not given keep the preset's value "
                                   "(or the checkpoint's, with --resume).")
    add_train_arguments(p)
    return p


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """The ``train`` command's own options plus every config option."""
    p.add_argument("--preset", choices=PRESETS, default="synthetic",
                   help="starting configuration: 'synthetic' (CPU-sized, for the embedded shapes), 'gpu' "
                        "(the shapes at 512 px for one CUDA GPU, bf16), 'defaults' (the dataclass defaults, "
                        "the paper's values) or 'photos' (your photos from scratch, no weights: small backbone "
                        "at 320/512 px)")
    p.add_argument("--resume", metavar="CHECKPOINT", default=None,
                   help="continue the run saved in this checkpoint (its configs are the starting point)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--evaluate", action="store_true",
                   help="after training, evaluate on the val split (test if there is no val) and print mAP")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="train on the good images when the data scan finds bad ones (default: stop before "
                        "the first step and list them)")
    p.add_argument("--digest", action="store_true",
                   help="every process writes <out-dir>/digest-rank<R>.txt, a SHA-256 of its parameters "
                        "(to check that DDP replicas agree under torchrun)")
    add_config_arguments(p)


def _add_data_overrides(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, sections=("data",))


def build_parser(prog: str = "rpnlab") -> argparse.ArgumentParser:
    """The ``rpnlab`` parser (also ``python -m rpnlab``, which is what ``torchrun -m rpnlab train`` runs)."""
    parser = argparse.ArgumentParser(prog=prog, formatter_class=_Formatter, description=__doc__.split("::")[0].strip())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_train(sub)

    p = sub.add_parser("evaluate", help="score a checkpoint: VOC mAP, COCO mAP, per-class AP, proposal recall",
                       formatter_class=_Formatter,
                       description="Evaluate a checkpoint on a split of its data (data options override "
                                   "the checkpoint's data config).")
    p.add_argument("--checkpoint", required=True, help="checkpoint written by 'rpnlab train'")
    p.add_argument("--split", default=None,
                   help="split to evaluate: train, val or test (VOC: any list in ImageSets/Main); "
                        "default: val if the data has it, else test")
    p.add_argument("--json", metavar="PATH", default=None, help="also write the metrics as JSON to PATH")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass")
    p.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_data_overrides(p)

    p = sub.add_parser("predict", help="draw a checkpoint's detections on images", formatter_class=_Formatter,
                       description="Detect objects in image files; save each with its boxes drawn as PNG "
                                   "and all detections as detections.json.")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, ...)")
    p.add_argument("--checkpoint", required=True, help="checkpoint written by 'rpnlab train'")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the drawings and detections.json")
    p.add_argument("--score-thresh", type=float, default=0.5, help="draw and list detections scoring at least this")
    p.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")

    p = sub.add_parser("check-data", help="scan a VOC or COCO folder for bad images and annotations",
                       formatter_class=_Formatter,
                       description="The quick scan 'rpnlab train' runs before its first step: annotation files, "
                                   "ids, references and every image's header; lists every problem with its file.")
    p.add_argument("root", metavar="ROOT", help="the VOC or COCO folder")
    p.add_argument("--dataset", choices=("auto", "voc", "coco"), default="auto", help="the folder's layout")
    p.add_argument("--split", nargs="+", default=None,
                   help="splits to scan (default: the ones present among train, val, test, trainval)")
    p.add_argument("--no-images", action="store_true", help="check the annotations only")
    p = sub.add_parser("export-samples", help="write a few dataset images as PNG files (to try 'predict' on)",
                       formatter_class=_Formatter,
                       description="Write images of the embedded synthetic dataset as PNG files, with their "
                                   "ground truth in annotations.json.")
    p.add_argument("--out", default="runs/samples", metavar="DIR", help="folder for the PNGs and annotations.json")
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help="which split")
    p.add_argument("--count", type=int, default=4, help="how many images")
    p.add_argument("--first", type=int, default=0, help="index of the first image")
    p.add_argument("--seed", type=int, default=0, help="the dataset seed (the one training used)")

    p = sub.add_parser("run", help="execute the notebook collection headlessly (papermill)",
                       formatter_class=_Formatter)
    p.add_argument("notebooks", nargs="*", metavar="NOTEBOOK",
                   help="notebooks to run (paths, stems or numbers such as 01); default: all, in order")
    p.add_argument("-p", "--parameter", nargs=2, action="append", metavar=("NAME", "VALUE"), default=[],
                   help="inject a parameter into every notebook that declares it (VALUE read as JSON when "
                        "it parses, else as a string); repeatable")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, as CI runs them")
    p.add_argument("--out", metavar="DIR", default=None, help="run folder (default runs/<timestamp>)")
    p.add_argument("--parallel", type=int, default=1,
                   help="local worker processes at once (1: in order); only for notebooks that do not need "
                        "each other's outputs")
    _add_executor_arguments(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--allow-unknown-parameters", action="store_true",
                   help="skip (with a warning) a -p NAME that no notebook of the run declares, instead of refusing it")

    p = sub.add_parser("sweep", help="execute one notebook over a parameter grid and tabulate its records",
                       formatter_class=_Formatter,
                       epilog="Rerun with the same --out to resume: finished points are kept. "
                              "'rpnlab sweep collect DIR [DIR ...]' merges shards (see its --help). "
                              "Exit status: the number of failed points (0: all ran).")
    p.add_argument("notebook", metavar="NOTEBOOK", help="the notebook (path, stem or number such as 03)")
    p.add_argument("-p", "--parameter", nargs="+", action="append", metavar=("NAME", "VALUE"), default=[],
                   help="sweep NAME over the VALUEs (each read as JSON when it parses); repeat for a "
                        "cartesian grid; a single VALUE fixes the parameter")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, as CI runs them")
    p.add_argument("--out", metavar="DIR", default=None, help="sweep folder (default runs/sweep-<stem>-<timestamp>)")
    p.add_argument("--parallel", type=int, default=1,
                   help="local worker processes (each pinned to a GPU, round-robin, or a share of the CPU threads)")
    _add_executor_arguments(p)
    p.add_argument("--shard", metavar="I/N", default=None,
                   help="run only the I-th of N deterministic slices of the grid (SLURM arrays, Indexed Jobs); "
                        "merge with 'rpnlab sweep collect DIR'")
    p.add_argument("--force", action="store_true", help="rerun points whose results are already stored in --out")
    p.add_argument("--aggregate", metavar="NAME", default=None,
                   help="average over this swept parameter (e.g. seed): sweep_aggregate.csv with mean, std, "
                        "95%% interval and n per setting; the plot shows the intervals")
    p.add_argument("--plot-timings", action="store_true", help="also plot metrics that are durations")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--allow-unknown-parameters", action="store_true",
                   help="skip (with a warning) a -p NAME the notebook does not declare, instead of refusing it")
    return parser


def _add_executor_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--executor", choices=("local", "dask"), default="local",
                   help="local: worker processes on this machine; dask: tasks on the Dask cluster at --scheduler")
    p.add_argument("--scheduler", metavar="tcp://HOST:PORT", default=None,
                   help="the Dask scheduler's address (with --executor dask)")


# ---------------------------------------------------------------------------------------------
# Commands


def _jsonable(value: Any) -> Any:
    from rpnlab.lab.records import to_jsonable

    return to_jsonable(value)


def _fmt(x: float) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def cmd_train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from rpnlab.engine.checkpoint import CheckpointError
    from rpnlab.engine.train import Trainer, TrainingDiverged, evaluate

    # Bad options, paths, data, a missing device or an unreadable checkpoint: every problem found,
    # exit 2, no traceback, before any training step.
    problems = _check_in_file(args.resume, "--resume", "checkpoint file") if args.resume else []
    if args.resume and problems:
        _refuse(parser, problems)
    try:
        model_cfg, data_cfg, train_cfg = configs_from_args(args)
        if data_cfg.dataset != "synthetic" and not args.resume:
            from rpnlab.data.build import resolve_classes

            classes = resolve_classes(data_cfg)
            if _dest("model", "num_classes") not in vars(args):
                model_cfg.num_classes = len(classes)  # the data says how many classes there are
            elif model_cfg.num_classes != len(classes):
                raise ValueError(f"--num-classes {model_cfg.num_classes} but the data has {len(classes)} "
                                 f"classes ({', '.join(classes)}): leave --num-classes out, or pick classes "
                                 "with --classes a,b,c")
            print(f"classes: {', '.join(f'{i + 1}={n}' for i, n in enumerate(classes))}")
        eval_split = None
        if args.evaluate:
            from rpnlab.data.build import evaluation_split

            eval_split = evaluation_split(data_cfg)  # before training: a missing split fails now
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        problems.append(str(err))
        model_cfg = data_cfg = train_cfg = None
        if getattr(args, "cfg__train__out_dir", None):  # still name a bad --out-dir in the same report
            problems += _check_out_dir(args.cfg__train__out_dir, "--out-dir")
    if train_cfg is not None:
        problems += _check_out_dir(train_cfg.out_dir, "--out-dir")
        problems += _check_pretrained(model_cfg.pretrained)
        problems += _check_data_root(data_cfg)
    _refuse(parser, problems)
    try:
        import warnings

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer = Trainer(model_cfg, data_cfg, train_cfg, resume=args.resume, progress=not args.no_progress,
                              skip_bad_images=args.skip_bad_images)
        for w in caught:  # re-planned schedule, skipped images: one line each, no source excerpt
            print(f"rpnlab train: warning: {w.message}", file=sys.stderr)
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as err:
        parser.error(_with_option_names_all(str(err)))
    try:
        result = trainer.run()
        if getattr(args, "digest", False):  # torchrun ... -m rpnlab train --digest
            from rpnlab.engine.train import parameter_digest

            path = Path(train_cfg.out_dir) / f"digest-rank{trainer.rank}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(parameter_digest(result.model) + "\n")
    except (TrainingDiverged, CheckpointError, ValueError, FileNotFoundError) as err:
        # Diverged, a full disk, or a file that went bad after the scan: one message, no traceback.
        print(f"rpnlab train: error: {err}", file=sys.stderr)
        return 1
    finally:
        trainer.close()
    if result.stop_reason == "interrupted":
        import signal

        code = 128 + int(result.extra["signal"])
        if trainer.rank == 0:
            name = signal.Signals(result.extra["signal"]).name
            print(f"rpnlab train: interrupted by {name} at step {trainer.step}; checkpoint saved: "
                  f"{result.checkpoint} (continue with --resume {result.checkpoint})", file=sys.stderr)
        return code
    if trainer.rank != 0:
        return 0
    if result.extra.get("stale_temp_files_removed"):
        print(f"removed {len(result.extra['stale_temp_files_removed'])} temp file(s) of an interrupted save")
    last = result.history[-1] if result.history else {}
    print(f"{result.stop_reason}: {result.iterations} iterations in {result.seconds:.1f} s "
          f"({result.images_per_second:.1f} images/s); final total loss {last.get('total', float('nan')):.4f}")
    print(f"checkpoint: {result.checkpoint}")
    if args.evaluate:
        from rpnlab.data import build_dataset

        print(f"evaluating on split {eval_split!r}")
        dataset = build_dataset(data_cfg, eval_split, train=False, classes=result.model.class_names)
        metrics = evaluate(result.model, dataset, progress=not args.no_progress)
        print(f"{eval_split} mAP@0.5 {_fmt(metrics['map_50'])}  mAP@[.5:.95] {_fmt(metrics['map'])}")
    return 0


def cmd_evaluate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from rpnlab.data import build_dataset
    from rpnlab.data.checks import format_problems, scan_dataset
    from rpnlab.engine.checkpoint import load_model
    from rpnlab.engine.devices import resolve_device
    from rpnlab.engine.evaluation import per_class_ap_table
    from rpnlab.engine.train import evaluate
    from rpnlab.lab.records import write_text_atomic

    problems = _check_in_file(args.checkpoint, "--checkpoint", "checkpoint file")
    if args.json:
        problems += _check_out_file(args.json, "--json")
    if args.batch_size < 1:
        problems.append(f"--batch-size={args.batch_size} is invalid: expected a positive integer")
    try:
        resolve_device(args.device)
    except (ValueError, RuntimeError) as err:
        problems.append(f"--device={args.device!r}: {err}")
    data_cfg = None
    if not problems:
        try:
            model_cfg, data_cfg, _ = checkpoint_configs(args.checkpoint)
            _, data_cfg, _ = configs_from_args(args, base=(model_cfg, data_cfg, TrainConfig()))
        except (ValueError, FileNotFoundError, RuntimeError) as err:
            problems.append(str(err))
    split = args.split
    if data_cfg is not None:
        problems += _check_data_root(data_cfg)
        if not problems and data_cfg.dataset != "synthetic":
            from rpnlab.data.build import check_split, evaluation_split

            try:
                if split is None:
                    split = evaluation_split(data_cfg)  # val, else test; none: the splits found
                    print(f"evaluating on split {split!r} (choose another with --split)")
                else:
                    check_split(data_cfg, split)  # a split the data lacks: the splits found
            except (ValueError, FileNotFoundError) as err:
                problems.append(str(err))
        elif split is None:
            split = "val"
        if data_cfg.dataset == "synthetic" and split is not None and split not in ("train", "val", "test"):
            problems.append(f"--split={split!r} is invalid for the synthetic data: expected train, val or test")
        elif not problems:
            found = scan_dataset(data_cfg, split)
            if found:
                problems.append(f"{len(found)} problem(s) in the {split} data:\n{format_problems(found)}")
    _refuse(parser, problems)
    try:
        device = resolve_device(args.device)
        model = load_model(args.checkpoint, map_location=device)
        classes = checkpoint_classes(args.checkpoint)
        dataset = build_dataset(data_cfg, split, train=False, classes=classes)
        if dataset.num_classes != model.num_classes:  # a checkpoint from before class names were kept
            raise ValueError(f"the checkpoint's model has {model.num_classes} classes but split {split!r} of "
                             f"the data has {dataset.num_classes} ({', '.join(dataset.classes)})")
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        parser.error(str(err))
    args.split = split
    metrics = evaluate(model, dataset, batch_size=args.batch_size, progress=not args.no_progress)
    print(f"{args.split}: {metrics['num_images']} images, {metrics['seconds']:.1f} s")
    print(f"VOC mAP@0.5      {_fmt(metrics['map_50'])}")
    print(f"COCO mAP@[.5:.95] {_fmt(metrics['map'])}")
    print()
    print(per_class_ap_table(metrics["voc"]))
    print()
    recall = metrics["proposal_recall"]
    print("| proposals | recall@0.5 | recall@0.7 | AR@[.5:.95] |")
    print("|---:|---:|---:|---:|")
    for i, n in enumerate(recall["num_proposals"]):
        print(f"| {n} | {_fmt(float(recall['recall_50'][i]))} | {_fmt(float(recall['recall_70'][i]))} | "
              f"{_fmt(float(recall['average_recall'][i]))} |")
    if args.json:
        summary = {
            "checkpoint": str(args.checkpoint),
            "split": args.split,
            "num_images": metrics["num_images"],
            "map_50": metrics["map_50"],
            "map": metrics["map"],
            "ap_per_class": metrics["ap_per_class"],
            "coco": {k: v for k, v in metrics["coco"].items() if k != "summary"},
            "proposal_recall": {k: recall[k] for k in ("num_proposals", "recall_50", "recall_70", "average_recall")},
        }
        write_text_atomic(Path(args.json), json.dumps(_jsonable(summary), indent=2) + "\n")
        print(f"\nmetrics written to {args.json}")
    return 0


def cmd_predict(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import torch

    from rpnlab.data import load_image
    from rpnlab.data.checks import check_image_file
    from rpnlab.data.transforms import ResizeShortestSide
    from rpnlab.engine.checkpoint import load_model
    from rpnlab.engine.devices import resolve_device
    from rpnlab.lab.records import write_text_atomic

    problems = _check_in_file(args.checkpoint, "--checkpoint", "checkpoint file") + _check_out_dir(args.out, "--out")
    if not (math.isfinite(args.score_thresh) and 0 <= args.score_thresh <= 1):
        problems.append(f"--score-thresh={args.score_thresh} is invalid: expected a score in [0, 1]")
    missing = [p for p in args.images if not Path(p).exists()]
    if missing and len(missing) == len(args.images):
        problems.append(f"image file(s) not found: {', '.join(missing)}")
    stems = [Path(p).stem for p in args.images]
    clashes = sorted({s for s in stems if stems.count(s) > 1})
    if clashes:
        problems.append(f"several images share the name(s) {', '.join(clashes)}: their drawings would overwrite "
                        "each other in --out")
    try:
        device = resolve_device(args.device)
    except (ValueError, RuntimeError) as err:
        problems.append(f"--device={args.device!r}: {err}")
    _refuse(parser, problems)
    try:
        model = load_model(args.checkpoint, map_location=device)
        _, data_cfg, _ = checkpoint_configs(args.checkpoint)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        parser.error(str(err))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = checkpoint_classes(args.checkpoint) or _class_names(data_cfg, model.num_classes)
    resize = ResizeShortestSide(data_cfg.min_size, data_cfg.max_size)
    results, failed = [], []
    for path in args.images:
        # A bad image is reported and skipped; the others are still processed and written.
        problem = check_image_file(path)
        image = None
        if problem is None:
            try:
                # (3, h, w) in [0, 1]; a large JPEG is decoded at reduced scale, (H, W) is the file's size
                image, (h, w) = load_image(path, data_cfg.min_size, data_cfg.max_size, with_file_size=True)
            except (ValueError, OSError) as err:
                problem = str(err).replace(f"{path}: ", "")
        if problem is not None:
            failed.append({"image": str(path), "error": problem})
            print(f"{path}: skipped: {problem}", file=sys.stderr)
            continue
        resized, _ = resize(image, {"boxes": torch.zeros(0, 4)})
        det = model.predict([resized.to(device)], score_thresh=args.score_thresh)[0]
        # Back to the file's pixels: the model saw the resized image.
        scale = torch.tensor([w / resized.shape[-1], h / resized.shape[-2]] * 2, device=det["boxes"].device)
        boxes = (det["boxes"] * scale).cpu()
        shown = torch.tensor([image.shape[-1] / w, image.shape[-2] / h] * 2)  # file pixels -> drawn pixels
        entry = {
            "image": str(path),
            "size": [int(h), int(w)],
            "detections": [
                {"box": [round(v, 2) for v in b.tolist()], "score": round(float(s), 4), "label": int(c),
                 "name": names[int(c) - 1]}
                for b, s, c in zip(boxes, det["scores"].cpu(), det["labels"].cpu())
            ],
        }
        results.append(entry)
        target = out / (Path(path).stem + ".png")
        _draw(image, [{**d, "box": (torch.tensor(d["box"]) * shown).tolist()} for d in entry["detections"]], target)
        print(f"{path}: {len(entry['detections'])} detection(s) -> {target}")
    payload = results if not failed else {"images": results, "failed": failed}
    write_text_atomic(out / "detections.json", json.dumps(payload, indent=2) + "\n")
    print(f"detections written to {out / 'detections.json'}")
    if failed:
        print(f"rpnlab predict: error: {len(failed)} of {len(args.images)} image(s) could not be read: "
              + ", ".join(f["image"] for f in failed), file=sys.stderr)
        return 1
    return 0


def cmd_check_data(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from rpnlab.data.build import coco_paths
    from rpnlab.data.checks import detect_format, format_problems, scan_dataset

    root = Path(args.root)
    if not root.is_dir():
        parser.error(f"ROOT={str(root)!r}: {'no such folder' if not root.exists() else 'is a file, expected a folder'}")
    try:
        kind = detect_format(root) if args.dataset == "auto" else args.dataset
    except ValueError as err:
        parser.error(str(err))
    cfg = DataConfig(dataset=kind, root=str(root))
    splits = args.split
    if splits is None:
        splits = []
        for split in ("train", "val", "test", "trainval"):
            if kind == "coco":
                try:
                    coco_paths(root, split)
                    splits.append(split)
                except FileNotFoundError:
                    pass
            elif any((p / "ImageSets" / "Main" / f"{split}.txt").is_file()
                     for p in [root, *root.glob("VOC*"), *root.glob("VOCdevkit/VOC*")]):
                splits.append(split)
        if not splits:
            parser.error(f"ROOT={str(root)!r}: no split found (train, val, test or trainval)")
    total = 0
    for split in splits:
        problems = scan_dataset(cfg, split, images=not args.no_images)
        total += len(problems)
        if problems:
            print(f"{kind} {split}: {len(problems)} problem(s)\n{format_problems(problems, limit=1000)}")
        else:
            print(f"{kind} {split}: ok")
    return 1 if total else 0


def _class_names(data_cfg: DataConfig, num_classes: int) -> list[str]:
    try:
        if data_cfg.dataset == "synthetic":
            from rpnlab.data import SHAPE_CLASSES as names
        elif data_cfg.dataset == "voc":
            from rpnlab.data import VOC_CLASSES as names
        else:
            names = ()
    except ImportError:
        names = ()
    names = list(names)
    return names if len(names) == num_classes else [f"class {i}" for i in range(1, num_classes + 1)]


def _draw(image, detections: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h, w = image.shape[-2:]
    fig, ax = plt.subplots(figsize=(max(3.0, w / 100), max(3.0, h / 100)), dpi=100)
    ax.imshow(image.permute(1, 2, 0).cpu().numpy())
    colours = plt.get_cmap("tab10")
    for d in detections:
        x1, y1, x2, y2 = d["box"]
        colour = colours((d["label"] - 1) % 10)
        ax.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colour, linewidth=2))
        ax.text(x1, y1, f"{d['name']} {d['score']:.2f}", color="white", fontsize=7, va="bottom",
                bbox={"facecolor": colour, "alpha": 0.8, "pad": 1, "edgecolor": "none"})
    ax.set_axis_off()
    fig.tight_layout(pad=0)
    fig.savefig(path)
    plt.close(fig)


def _refuse(parser: argparse.ArgumentParser, problems: Sequence[str]) -> None:
    """Exit 2 with every problem found, one per line, before any work."""
    if problems:
        parser.error(problems[0] if len(problems) == 1 else
                     f"{len(problems)} problems:\n  " + "\n  ".join(p.replace("\n", "\n  ") for p in problems))


def _writable_dir_problem(folder: Path) -> str | None:
    """Why ``folder`` cannot be created or written into, or None."""
    probe = folder
    while not probe.exists():
        if probe.is_symlink():
            return f"{str(probe)!r} is a broken link"
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        return f"{str(probe)!r} is a file, not a folder"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{str(probe)!r} is not writable"
    return None


def _check_out_dir(path: str | os.PathLike, option: str) -> list[str]:
    """Problems with an output folder: a file in its place, or no permission to create/write it."""
    problem = _writable_dir_problem(Path(path))
    return [f"{option}={str(path)!r}: {problem}"] if problem else []


def _check_out_file(path: str | os.PathLike, option: str) -> list[str]:
    """Problems with an output file: a folder in its place, or a folder that cannot hold it."""
    path = Path(path)
    if path.is_dir():
        return [f"{option}={str(path)!r} is a folder, expected a file path"]
    if path.exists() and not os.access(path, os.W_OK):
        return [f"{option}={str(path)!r} is not writable"]
    problem = _writable_dir_problem(path.parent)
    return [f"{option}={str(path)!r}: {problem}"] if problem else []


def _check_in_file(path: str | os.PathLike, option: str, what: str = "file") -> list[str]:
    path = Path(path)
    if not path.exists():
        return [f"{what} not found: {str(path)!r} ({option})"]
    if path.is_dir():
        return [f"{option}={str(path)!r} is a folder, expected a file"]
    if not os.access(path, os.R_OK):
        return [f"{option}={str(path)!r} is not readable"]
    return []


def _with_option_names_all(message: str) -> str:
    """Name config fields in a message by their train options (``out_dir=`` -> ``--out-dir=``)."""
    for section in ("train", "data", "model"):
        message = _with_option_names(section, message)
    return message


def _check_pretrained(pretrained: str | None) -> list[str]:
    if pretrained is None or str(pretrained).lower() in ("none", "cache"):
        return []
    return _check_in_file(pretrained, "--pretrained")


def _check_data_root(data_cfg: DataConfig) -> list[str]:
    if data_cfg.dataset == "synthetic" or not data_cfg.root:
        return []
    root = Path(data_cfg.root)
    if not root.exists():
        return [f"--root={str(root)!r}: no such folder (the {data_cfg.dataset} data)"]
    if not root.is_dir():
        return [f"--root={str(root)!r} is a file, expected the {data_cfg.dataset} folder"]
    return []


def cmd_export_samples(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from rpnlab.data.samples import export_samples

    try:
        paths = export_samples(args.out, split=args.split, count=args.count, seed=args.seed, first=args.first)
    except ValueError as err:
        parser.error(str(err))
    for path in paths:
        print(path)
    print(f"ground truth: {Path(args.out) / 'annotations.json'}")
    return 0


def cmd_run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from rpnlab.lab import runner

    parameters = {name: parse_value(value) for name, value in args.parameter}
    problems = _check_out_dir(args.out, "--out") if args.out else []
    problems += _executor_problems(args)
    try:
        paths = [runner.resolve_notebook(n) for n in args.notebooks] if args.notebooks else runner.list_notebooks()
    except FileNotFoundError as err:
        problems.append(str(err))
        paths = []
    if paths:
        try:
            runner.check_collection_parameters(paths, parameters, args.smoke,
                                               allow_unknown=args.allow_unknown_parameters)
        except runner.ParameterError as err:
            problems.append(str(err).strip())
    _refuse(parser, problems)
    result = runner.run_collection(notebooks=[str(p) for p in paths] or None, parameters=parameters or None,
                                   out_dir=args.out, smoke=args.smoke, progress=not args.no_progress,
                                   executor=args.executor, scheduler=args.scheduler, parallel=args.parallel,
                                   allow_unknown_parameters=args.allow_unknown_parameters)
    failed = sum(r["status"] != "ok" for r in result.rows)
    print(f"{len(result.rows)} notebook(s) run{f', {failed} failed' if failed else ''}; summary: {result.summary_md}")
    return _exit_status(failed, len(result.rows), "notebooks")


def _executor_problems(args: argparse.Namespace) -> list[str]:
    problems = []
    if args.executor == "dask" and not args.scheduler:
        problems.append("--executor dask needs --scheduler tcp://HOST:PORT (the Dask scheduler's address)")
    if args.executor != "dask" and args.scheduler:
        problems.append("--scheduler is for --executor dask")
    if args.parallel < 1:
        problems.append(f"--parallel={args.parallel} is invalid: expected a positive number of workers")
    return problems


def _exit_status(failed: int, total: int, what: str) -> int:
    """0 when all went well, else the number of failed points (at most 100: shells reserve 126+)."""
    if failed:
        print(f"{failed} of {total} {what} failed", file=sys.stderr)
    return min(failed, 100)


def cmd_sweep(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from rpnlab.lab import runner, sweeps

    grid, base = {}, {}
    for entry in args.parameter:
        if len(entry) < 2:
            parser.error(f"argument -p/--parameter: expected NAME VALUE [VALUE ...], got {' '.join(entry)!r}")
        name, values = entry[0], [parse_value(v) for v in entry[1:]]
        if len(values) == 1:
            base[name] = values[0]
        else:
            grid[name] = values
    problems = []
    if not grid:
        problems.append("sweep needs at least one -p NAME VALUE VALUE ... with two or more values to sweep over")
    problems += _executor_problems(args)
    if args.aggregate is not None and args.aggregate not in grid:
        problems.append(f"--aggregate {args.aggregate}: not a swept parameter (swept: {', '.join(grid) or 'none'}); "
                        f"give it two or more values, e.g. -p {args.aggregate} 0 1 2")
    try:
        shard = sweeps.parse_shard(args.shard)
    except ValueError as exc:
        problems.append(f"--shard: {exc}")
        shard = None
    if args.out:
        problems += _check_out_dir(args.out, "--out")
    try:
        path = runner.resolve_notebook(args.notebook)
    except FileNotFoundError as err:
        problems.append(str(err))
        path = None
    if path is not None and grid:
        declared = runner.notebook_parameters(path)
        names = list(base) + list(grid)
        try:
            runner.select_parameters(path, {**base, **{k: v[0] for k, v in grid.items()}}, args.smoke, declared,
                                     warn=False, allow_unknown=args.allow_unknown_parameters)
        except runner.ParameterError as err:
            problems.append(str(err).strip())
        problems += [f"{path.stem}: {problem}" for name in names if name in declared
                     for v in grid.get(name, [base.get(name)])
                     for _, problem in [runner.check_parameter_value(name, v, declared[name])]
                     if problem and problem not in " ".join(problems)]
    _refuse(parser, problems)
    result = sweeps.sweep(path, grid, out_dir=args.out, parallel=args.parallel,
                          base_parameters=base or None, smoke=args.smoke, progress=not args.no_progress,
                          executor=args.executor, scheduler=args.scheduler, shard=shard, force=args.force,
                          aggregate=args.aggregate, plot_timings=args.plot_timings,
                          allow_unknown_parameters=args.allow_unknown_parameters)
    print(f"table: {result.table_path}")
    if result.aggregate_path is not None:
        print(f"aggregate: {result.aggregate_path}")
    if result.plot_path is not None:
        print(f"plot: {result.plot_path}")
    return _exit_status(result.failed, len(result.rows), "points")


def _collect_parser(prog: str = "rpnlab sweep collect") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="merge the points that sweep shards stored into one "
                                "sweep.csv (+ plot, + aggregate); points no shard finished are listed as missing")
    p.add_argument("dirs", nargs="+", metavar="DIR", help="sweep folder(s) the shards wrote into (the first one's "
                   "sweep.json says what the sweep is)")
    p.add_argument("--out", metavar="DIR", default=None, help="where the merged tables go (default: the first DIR)")
    p.add_argument("--aggregate", metavar="NAME", default=None,
                   help="average over this swept parameter (default: the one the sweep was run with)")
    p.add_argument("--plot-timings", action="store_true", help="also plot metrics that are durations")
    return p


def cmd_sweep_collect(argv: Sequence[str]) -> int:
    from rpnlab.lab import sweeps

    parser = _collect_parser()
    args = parser.parse_args(argv)
    for d in args.dirs:
        if not (Path(d) / sweeps.SPEC).is_file():
            parser.error(f"{d} is not a sweep folder (no {sweeps.SPEC} in it)")
    try:
        result = sweeps.collect(args.dirs, out_dir=args.out, aggregate=args.aggregate,
                                plot_timings=args.plot_timings)
    except ValueError as exc:
        parser.error(str(exc))
    print(f"table: {result.table_path}")
    if result.aggregate_path is not None:
        print(f"aggregate: {result.aggregate_path}")
    return _exit_status(result.failed, len(result.rows), "points (failed or missing)")


_COMMANDS = {"train": cmd_train, "evaluate": cmd_evaluate, "predict": cmd_predict, "check-data": cmd_check_data,
             "export-samples": cmd_export_samples, "run": cmd_run, "sweep": cmd_sweep}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``rpnlab`` console script (and ``python -m rpnlab``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["sweep", "collect"]:
        return cmd_sweep_collect(argv[2:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _COMMANDS[args.command](args, parser)
    except KeyboardInterrupt:  # Ctrl-C outside training's own handler (setup, evaluation, notebooks)
        print(f"rpnlab {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
