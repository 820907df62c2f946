"""The ``rpnlab`` command: train, evaluate, predict, and run or sweep the notebooks.

::

    rpnlab train --epochs 12 --out-dir runs/shapes          # the synthetic preset on the CPU
    rpnlab evaluate --checkpoint runs/shapes/checkpoint.pt --split val --json metrics.json
    rpnlab export-samples --out runs/samples                  # a few dataset images as PNG files
    rpnlab predict runs/samples/test_000.png --checkpoint runs/shapes/checkpoint.pt --out runs/predictions
    rpnlab run --smoke --out runs/smoke -p device cpu
    rpnlab sweep 03 -p anchor_stride 8 16 --parallel 2

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
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rpnlab.config import (
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

PRESETS = ("synthetic", "defaults")

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
_NESTED = ("anchors", "rpn", "roi")  # ModelConfig fields that are sections of their own

_CHOICES = {
    ("model", "backbone"): ("small", "vgg16", "resnet50_c4", "mobilenet_v3", "mobilenet_v3_fpn"),
    ("anchors", "ratio_convention"): ("h/w", "w/h"),
    ("rpn", "objectness"): ("sigmoid", "softmax"),
    ("rpn", "loss_normalization"): ("sampled", "paper"),
    ("rpn", "proposal_mode"): ("nms", "top"),
    ("roi", "pooler"): ("align", "pool", "crop"),
    ("roi", "implementation"): ("torchvision", "python"),
    ("data", "dataset"): ("synthetic", "voc", "coco"),
    ("train", "schedule"): ("joint", "alternating", "rpn"),
    ("train", "lr_schedule"): ("cosine", "step"),
    ("train", "amp"): ("off", "bf16", "fp16"),
}

_HELP = {
    ("model", "num_classes"): "foreground classes C (background excluded); 3 for the synthetic shapes, 20 for VOC",
    ("model", "backbone"): "feature extractor shared by the RPN and the RoI head",
    ("model", "pretrained"): "backbone weights: a file path, 'cache' (torchvision's file in the local torch hub "
                             "cache or data/weights; never downloaded) or 'none' (random init)",
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
    ("roi", "implementation"): "'torchvision' (compiled kernels) or 'python' (the readable teaching code)",
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
    """The ``(model, data, train)`` configs of a preset.

    ``"synthetic"``: the CPU configuration for the embedded shapes (``synthetic_model_config``,
    ``synthetic_train_config``); ``"defaults"``: the dataclass defaults (the paper's values).
    """
    if name == "synthetic":
        from rpnlab.detector.model import synthetic_model_config
        from rpnlab.engine.train import synthetic_train_config

        return synthetic_model_config(), DataConfig(), synthetic_train_config()
    if name == "defaults":
        return ModelConfig(), DataConfig(), TrainConfig()
    raise ValueError(f"preset={name!r} is invalid: expected one of {', '.join(map(repr, PRESETS))}")


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
            group.add_argument(name, **kwargs)


def configs_from_args(
    args: argparse.Namespace, base: tuple[ModelConfig, DataConfig, TrainConfig] | None = None
) -> tuple[ModelConfig, DataConfig, TrainConfig]:
    """Apply the options given on the command line to ``base`` (default: ``args.preset``'s configs,
    or the configs stored in ``args.resume``'s checkpoint) and validate. Raises ``ValueError``."""
    if base is None:
        if getattr(args, "resume", None):
            base = checkpoint_configs(args.resume)
        else:
            base = preset_configs(getattr(args, "preset", "synthetic"))
    model, data, train = (dataclasses.replace(c) for c in base)
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
    # Re-run AnchorConfig's normalisation (flat tuples -> one level) after the edits, and use a
    # single level of ratios for every level of sizes.
    model.anchors = AnchorConfig(**{f.name: getattr(model.anchors, f.name) for f in dataclasses.fields(AnchorConfig)})
    if len(model.anchors.aspect_ratios) == 1 < len(model.anchors.sizes):
        model.anchors.aspect_ratios = model.anchors.aspect_ratios * len(model.anchors.sizes)
    if model.pretrained is not None and str(model.pretrained).lower() == "none":
        model.pretrained = None
    sections = _section_defaults(model, data, train)
    # The stage configs first, so that their errors are named with their own prefixes.
    for section in ("anchors", "rpn", "roi", "model", "data", "train"):
        cfg = sections[section]
        try:
            cfg.validate()
        except ValueError as err:
            raise ValueError(_with_option_names(section, str(err))) from None
    return model, data, train


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
                   help="starting configuration: 'synthetic' (CPU-sized, for the embedded shapes) or "
                        "'defaults' (the dataclass defaults, the paper's values)")
    p.add_argument("--resume", metavar="CHECKPOINT", default=None,
                   help="continue the run saved in this checkpoint (its configs are the starting point)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--evaluate", action="store_true",
                   help="after training, evaluate on the validation split and print mAP")
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
    p.add_argument("--split", default="val", help="split to evaluate: train, val or test (VOC: also trainval)")
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
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("sweep", help="execute one notebook over a parameter grid and tabulate its records",
                       formatter_class=_Formatter)
    p.add_argument("notebook", metavar="NOTEBOOK", help="the notebook (path, stem or number such as 03)")
    p.add_argument("-p", "--parameter", nargs="+", action="append", metavar=("NAME", "VALUE"), default=[],
                   help="sweep NAME over the VALUEs (each read as JSON when it parses); repeat for a "
                        "cartesian grid; a single VALUE fixes the parameter")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, as CI runs them")
    p.add_argument("--out", metavar="DIR", default=None, help="sweep folder (default runs/sweep-<stem>-<timestamp>)")
    p.add_argument("--parallel", type=int, default=1, help="notebooks executed at once")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


# ---------------------------------------------------------------------------------------------
# Commands


def _jsonable(value: Any) -> Any:
    from rpnlab.lab.records import to_jsonable

    return to_jsonable(value)


def _fmt(x: float) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def cmd_train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from rpnlab.engine.train import Trainer, evaluate

    # Bad options, a missing device or an unreadable checkpoint: one line, exit 2, no traceback.
    try:
        model_cfg, data_cfg, train_cfg = configs_from_args(args)
        trainer = Trainer(model_cfg, data_cfg, train_cfg, resume=args.resume, progress=not args.no_progress)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        parser.error(str(err))
    try:
        result = trainer.run()
        if getattr(args, "digest", False):  # torchrun ... -m rpnlab train --digest
            from rpnlab.engine.train import parameter_digest

            path = Path(train_cfg.out_dir) / f"digest-rank{trainer.rank}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(parameter_digest(result.model) + "\n")
    finally:
        trainer.close()
    if trainer.rank != 0:
        return 0
    last = result.history[-1] if result.history else {}
    print(f"{result.stop_reason}: {result.iterations} iterations in {result.seconds:.1f} s "
          f"({result.images_per_second:.1f} images/s); final total loss {last.get('total', float('nan')):.4f}")
    print(f"checkpoint: {result.checkpoint}")
    if args.evaluate:
        from rpnlab.data import build_dataset

        metrics = evaluate(result.model, build_dataset(data_cfg, "val"), progress=not args.no_progress)
        print(f"val mAP@0.5 {_fmt(metrics['map_50'])}  mAP@[.5:.95] {_fmt(metrics['map'])}")
    return 0


def cmd_evaluate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from rpnlab.data import build_dataset
    from rpnlab.engine.checkpoint import load_model
    from rpnlab.engine.evaluation import per_class_ap_table
    from rpnlab.engine.train import evaluate

    try:
        model_cfg, data_cfg, _ = checkpoint_configs(args.checkpoint)
        _, data_cfg, _ = configs_from_args(args, base=(model_cfg, data_cfg, TrainConfig()))
        from rpnlab.engine.devices import resolve_device

        device = resolve_device(args.device)
        model = load_model(args.checkpoint, map_location=device)
        dataset = build_dataset(data_cfg, args.split, train=False)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        parser.error(str(err))
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
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(_jsonable(summary), indent=2) + "\n")
        print(f"\nmetrics written to {args.json}")
    return 0


def cmd_predict(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import torch

    from rpnlab.data import load_image
    from rpnlab.data.transforms import ResizeShortestSide
    from rpnlab.engine.checkpoint import load_model
    from rpnlab.engine.devices import resolve_device

    try:
        device = resolve_device(args.device)
        model = load_model(args.checkpoint, map_location=device)
        _, data_cfg, _ = checkpoint_configs(args.checkpoint)
        missing = [p for p in args.images if not Path(p).is_file()]
        if missing:
            raise FileNotFoundError(f"image file(s) not found: {', '.join(missing)}")
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        parser.error(str(err))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = _class_names(data_cfg, model.num_classes)
    resize = ResizeShortestSide(data_cfg.min_size, data_cfg.max_size)
    results = []
    for path in args.images:
        image = load_image(path)  # (3, H, W) in [0, 1]
        h, w = image.shape[-2:]
        resized, _ = resize(image, {"boxes": torch.zeros(0, 4)})
        det = model.predict([resized.to(device)], score_thresh=args.score_thresh)[0]
        # Back to the file's pixels: the model saw the resized image.
        scale = torch.tensor([w / resized.shape[-1], h / resized.shape[-2]] * 2, device=det["boxes"].device)
        boxes = (det["boxes"] * scale).cpu()
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
        _draw(image, entry["detections"], target)
        print(f"{path}: {len(entry['detections'])} detection(s) -> {target}")
    (out / "detections.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"detections written to {out / 'detections.json'}")
    return 0


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
    result = runner.run_collection(notebooks=args.notebooks or None, parameters=parameters or None,
                                   out_dir=args.out, smoke=args.smoke, progress=not args.no_progress)
    failed = f", {len(result.failed)} failed" if result.failed else ""
    print(f"{len(result.rows)} notebook(s) run{failed}; summary: {result.summary_md}")
    return 0 if result.ok else 1


def cmd_sweep(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from rpnlab.lab import runner

    grid, base = {}, {}
    for entry in args.parameter:
        if len(entry) < 2:
            parser.error(f"argument -p/--parameter: expected NAME VALUE [VALUE ...], got {' '.join(entry)!r}")
        name, values = entry[0], [parse_value(v) for v in entry[1:]]
        if len(values) == 1:
            base[name] = values[0]
        else:
            grid[name] = values
    if not grid:
        parser.error("sweep needs at least one -p NAME VALUE VALUE ... with two or more values to sweep over")
    result = runner.sweep(args.notebook, grid, out_dir=args.out, parallel=args.parallel,
                          base_parameters=base or None, smoke=args.smoke, progress=not args.no_progress)
    print(f"table: {result.table_path}")
    if result.plot_path is not None:
        print(f"plot: {result.plot_path}")
    return 0 if result.ok else 1


_COMMANDS = {"train": cmd_train, "evaluate": cmd_evaluate, "predict": cmd_predict,
             "export-samples": cmd_export_samples, "run": cmd_run, "sweep": cmd_sweep}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``rpnlab`` console script (and ``python -m rpnlab``)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    return _COMMANDS[args.command](args, parser)


if __name__ == "__main__":
    sys.exit(main())
