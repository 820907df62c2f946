"""Every tunable of the detector as a dataclass, shared by notebooks, the CLI and sweeps.

Each dataclass has ``validate()``, which raises ``ValueError`` naming the parameter and the bad
value, and returns ``self`` so that ``AnchorConfig(...).validate()`` reads as one step. The
defaults are the paper's (Ren et al. 2015) unless a comment says otherwise.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "BACKBONE_NAMES",
    "TORCHVISION_DETECTORS",
    "AnchorConfig",
    "DataConfig",
    "ModelConfig",
    "RPNConfig",
    "RoIConfig",
    "TrainConfig",
    "from_dict",
    "to_dict",
]


def _fail(name: str, value: Any, expected: str) -> None:
    raise ValueError(f"{name}={value!r} is invalid: expected {expected}")


def _positive_numbers(name: str, values: Any) -> None:
    if len(values) == 0:
        _fail(name, values, "a non-empty sequence of positive numbers")
    for v in values:
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
            _fail(name, values, "a non-empty sequence of positive numbers")


def _all_finite(cfg: Any) -> None:
    """Every number field of ``cfg`` is finite; else one
    ``ValueError`` naming every field holding NaN or infinity (``--weight-decay inf`` must not train)."""
    bad = []
    for f in dataclasses.fields(cfg):  # numbers; tuples of numbers are checked by each validate()
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            bad.append(f"{f.name}={value!r}")
    if bad:
        verb = "is" if len(bad) == 1 else "are"
        raise ValueError(f"{', '.join(bad)} {verb} invalid: expected finite numbers (not NaN or infinity)")


def _fraction(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and 0 < value <= 1):
        _fail(name, value, "a fraction in (0, 1]")


def _iou(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and 0 <= value <= 1):
        _fail(name, value, "an IoU in [0, 1]")


def _positive_int(name: str, value: int, allow_zero: bool = False) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        _fail(name, value, "an integer >= 0" if allow_zero else "a positive integer")


def _choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        _fail(name, value, "one of " + ", ".join(repr(c) for c in choices))


def anchors_per_location(sizes: Sequence[Sequence[float]], aspect_ratios: Sequence[Sequence[float]]) -> list[int]:
    """``k`` for each level: ``len(sizes[l]) * len(aspect_ratios[l])``, every size at every ratio."""
    return [len(s) * len(r) for s, r in zip(sizes, aspect_ratios)]


@dataclass
class AnchorConfig:
    """Anchors: one tuple of sizes and one of aspect ratios per feature level.

    A size is the square root of the anchor's area in pixels; a ratio is height / width by default
    (torchvision, py-faster-rcnn) or width / height with ``ratio_convention="w/h"`` (d2l).
    """

    sizes: tuple[tuple[float, ...], ...] = ((128.0, 256.0, 512.0),)
    aspect_ratios: tuple[tuple[float, ...], ...] = ((0.5, 1.0, 2.0),)
    strides: tuple[int, ...] = (16,)
    offset: float = 0.0  # anchor centres at (i + offset) * stride; torchvision 0.0, detectron2 0.0, d2l 0.5
    ratio_convention: str = "h/w"

    def __post_init__(self) -> None:
        # Accept a flat tuple for one level: sizes=(32, 64) means ((32, 64),).
        if self.sizes and not isinstance(self.sizes[0], (tuple, list)):
            self.sizes = (tuple(self.sizes),)
        if self.aspect_ratios and not isinstance(self.aspect_ratios[0], (tuple, list)):
            self.aspect_ratios = (tuple(self.aspect_ratios),) * len(self.sizes)
        self.sizes = tuple(tuple(s) for s in self.sizes)
        self.aspect_ratios = tuple(tuple(r) for r in self.aspect_ratios)
        if isinstance(self.strides, (int, float)):
            self.strides = (int(self.strides),)
        self.strides = tuple(self.strides)

    @property
    def num_anchors_per_location(self) -> list[int]:
        """``k`` for each level (see ``anchors_per_location``)."""
        return anchors_per_location(self.sizes, self.aspect_ratios)

    def validate(self) -> AnchorConfig:
        _all_finite(self)
        if len(self.sizes) == 0:
            _fail("sizes", self.sizes, "at least one level of sizes")
        for level, s in enumerate(self.sizes):
            _positive_numbers(f"sizes[{level}]", s)
        if len(self.aspect_ratios) != len(self.sizes):
            _fail("aspect_ratios", self.aspect_ratios, f"one tuple per level ({len(self.sizes)} levels in sizes)")
        for level, r in enumerate(self.aspect_ratios):
            _positive_numbers(f"aspect_ratios[{level}]", r)
        if len(self.strides) != len(self.sizes):
            _fail("strides", self.strides, f"one stride per level ({len(self.sizes)} levels in sizes)")
        _positive_numbers("strides", self.strides)
        if not (isinstance(self.offset, (int, float)) and 0 <= self.offset < 1):
            _fail("offset", self.offset, "a number in [0, 1)")
        _choice("ratio_convention", self.ratio_convention, ("h/w", "w/h"))
        return self


@dataclass
class RPNConfig:
    """Region Proposal Network: head, anchor matching and sampling, loss, proposal selection."""

    conv_channels: int = 512  # 3x3 conv width (the paper's VGG-16 RPN)
    objectness: str = "sigmoid"  # "sigmoid": k scores with BCE (torchvision); "softmax": 2k scores (paper)
    fg_iou_thresh: float = 0.7
    bg_iou_thresh: float = 0.3
    allow_low_quality_matches: bool = True  # each gt box also takes its best anchors (paper's rule (i))
    ignore_cross_boundary: bool = False  # paper's training rule: anchors crossing the border are ignored
    batch_size_per_image: int = 256
    positive_fraction: float = 0.5
    loss_normalization: str = "sampled"  # "sampled" (detectron2/torchvision) or "paper" (1/N_cls + lambda/N_reg)
    reg_loss_weight: float = 10.0  # lambda, used with loss_normalization="paper"
    smooth_l1_beta: float = 1.0 / 9  # torchvision's RPN beta; the paper uses sigma=3, i.e. beta=1/9
    box_weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)
    pre_nms_top_n_train: int = 12000
    post_nms_top_n_train: int = 2000
    pre_nms_top_n_test: int = 6000
    post_nms_top_n_test: int = 300
    nms_thresh: float = 0.7
    min_size: float = 0.0  # py-faster-rcnn drops proposals under 16 px at scale; torchvision uses 1e-3
    score_thresh: float = 0.0
    proposal_mode: str = "nms"  # "nms" or "top" (tf-faster-rcnn's top-k without NMS)

    def validate(self) -> RPNConfig:
        _all_finite(self)
        _positive_int("conv_channels", self.conv_channels)
        _choice("objectness", self.objectness, ("sigmoid", "softmax"))
        _iou("fg_iou_thresh", self.fg_iou_thresh)
        _iou("bg_iou_thresh", self.bg_iou_thresh)
        if self.bg_iou_thresh > self.fg_iou_thresh:
            raise ValueError(
                f"bg_iou_thresh={self.bg_iou_thresh} must not exceed fg_iou_thresh={self.fg_iou_thresh}"
            )
        _positive_int("batch_size_per_image", self.batch_size_per_image)
        _fraction("positive_fraction", self.positive_fraction)
        _choice("loss_normalization", self.loss_normalization, ("sampled", "paper"))
        if not (isinstance(self.reg_loss_weight, (int, float)) and self.reg_loss_weight >= 0):
            _fail("reg_loss_weight", self.reg_loss_weight, "a number >= 0")
        if not (isinstance(self.smooth_l1_beta, (int, float)) and self.smooth_l1_beta >= 0):
            _fail("smooth_l1_beta", self.smooth_l1_beta, "a number >= 0")
        _positive_numbers("box_weights", self.box_weights)
        for phase in ("train", "test"):
            pre, post = getattr(self, f"pre_nms_top_n_{phase}"), getattr(self, f"post_nms_top_n_{phase}")
            _positive_int(f"pre_nms_top_n_{phase}", pre)
            _positive_int(f"post_nms_top_n_{phase}", post)
            if post > pre:
                raise ValueError(
                    f"post_nms_top_n_{phase}={post} must not exceed pre_nms_top_n_{phase}={pre}"
                )
        _iou("nms_thresh", self.nms_thresh)
        if not (isinstance(self.min_size, (int, float)) and self.min_size >= 0):
            _fail("min_size", self.min_size, "a number >= 0")
        if not (isinstance(self.score_thresh, (int, float)) and 0 <= self.score_thresh <= 1):
            _fail("score_thresh", self.score_thresh, "a probability in [0, 1]")
        _choice("proposal_mode", self.proposal_mode, ("nms", "top"))
        return self


@dataclass
class RoIConfig:
    """Fast R-CNN stage: proposal targets, RoI pooling, the head and post-processing."""

    fg_iou_thresh: float = 0.5
    bg_iou_thresh_high: float = 0.5
    bg_iou_thresh_low: float = 0.0  # the paper's Fast R-CNN uses 0.1 (hard-example heuristic); torchvision 0.0
    batch_size_per_image: int = 512
    positive_fraction: float = 0.25
    box_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)
    pooler: str = "align"  # "align" (RoI Align), "pool" (RoI Pool, the paper's) or "crop" (crop-and-resize + max-pool, tf-faster-rcnn)
    output_size: int = 7
    sampling_ratio: int = 2
    aligned: bool = False  # RoI Align's half-pixel correction (detectron2 default True, torchvision False)
    implementation: str = "auto"  # "auto" (the fastest RoI Align on this device: on a CPU rpnlab's matrix or sparse form, else the kernels), "torchvision" (compiled kernels) or "python" (the teaching versions)
    representation_size: int = 1024
    smooth_l1_beta: float = 1.0
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_img: int = 100

    def validate(self) -> RoIConfig:
        _all_finite(self)
        _iou("fg_iou_thresh", self.fg_iou_thresh)
        _iou("bg_iou_thresh_high", self.bg_iou_thresh_high)
        _iou("bg_iou_thresh_low", self.bg_iou_thresh_low)
        if self.bg_iou_thresh_low > self.bg_iou_thresh_high:
            raise ValueError(
                f"bg_iou_thresh_low={self.bg_iou_thresh_low} must not exceed bg_iou_thresh_high={self.bg_iou_thresh_high}"
            )
        if self.bg_iou_thresh_high > self.fg_iou_thresh:
            raise ValueError(
                f"bg_iou_thresh_high={self.bg_iou_thresh_high} must not exceed fg_iou_thresh={self.fg_iou_thresh}"
            )
        _positive_int("batch_size_per_image", self.batch_size_per_image)
        _fraction("positive_fraction", self.positive_fraction)
        _positive_numbers("box_weights", self.box_weights)
        _choice("pooler", self.pooler, ("align", "pool", "crop"))
        _positive_int("output_size", self.output_size)
        _positive_int("sampling_ratio", self.sampling_ratio, allow_zero=True)
        _choice("implementation", self.implementation, ("torchvision", "python", "auto"))
        _positive_int("representation_size", self.representation_size)
        if not (isinstance(self.smooth_l1_beta, (int, float)) and self.smooth_l1_beta >= 0):
            _fail("smooth_l1_beta", self.smooth_l1_beta, "a number >= 0")
        if not (isinstance(self.score_thresh, (int, float)) and 0 <= self.score_thresh <= 1):
            _fail("score_thresh", self.score_thresh, "a probability in [0, 1]")
        _iou("nms_thresh", self.nms_thresh)
        _positive_int("detections_per_img", self.detections_per_img)
        return self


#: torchvision detectors rpnlab can rebuild whole (``ModelConfig.backbone``; ``--init torchvision:<name>``).
TORCHVISION_DETECTORS = (
    "fasterrcnn_resnet50_fpn",
    "fasterrcnn_resnet50_fpn_v2",
    "fasterrcnn_mobilenet_v3_large_fpn",
    "fasterrcnn_mobilenet_v3_large_320_fpn",
)
BACKBONE_NAMES = ("small", "vgg16", "resnet50_c4", "mobilenet_v3", "mobilenet_v3_fpn", *TORCHVISION_DETECTORS)


@dataclass
class ModelConfig:
    """The assembled detector: backbone choice plus the three stage configs.

    ``backbone`` may also name a whole torchvision detector (``TORCHVISION_DETECTORS``): its
    backbone, FPN, RPN head and box head, converted (``rpnlab.detector.torchvision_models``).
    """

    num_classes: int = 3  # foreground classes, background excluded
    backbone: str = "small"  # "small", "vgg16", "resnet50_c4", "mobilenet_v3", "mobilenet_v3_fpn", or a torchvision detector
    pretrained: str | None = None  # backbone weights: a file, "imagenet" (weights API), "cache" (local only), or None
    # Whole-detector weights: "torchvision:<name>" (COCO weights through the weights API, a new box
    # predictor for num_classes) or the path of such a torchvision state dict; None: no init.
    init: str | None = None
    small_norm: str = "group"  # normalisation after each conv of the "small" backbone: "group" or "batch"
    anchors: AnchorConfig = field(default_factory=AnchorConfig)
    rpn: RPNConfig = field(default_factory=RPNConfig)
    roi: RoIConfig = field(default_factory=RoIConfig)

    def validate(self) -> ModelConfig:
        _all_finite(self)
        _positive_int("num_classes", self.num_classes)
        _choice("backbone", self.backbone, BACKBONE_NAMES)
        if self.init is not None:
            if self.backbone not in TORCHVISION_DETECTORS:
                _fail("init", self.init, f"None with backbone {self.backbone!r} (--init needs a torchvision "
                      "detector: 'torchvision:<name>' with one of " + ", ".join(TORCHVISION_DETECTORS) + ")")
            if str(self.init).startswith("torchvision:") and self.init.split(":", 1)[1] != self.backbone:
                _fail("init", self.init, f"'torchvision:{self.backbone}', the backbone's own weights")
        if self.backbone in TORCHVISION_DETECTORS and self.pretrained is not None:
            _fail("pretrained", self.pretrained, "None for a torchvision detector (use init)")
        _choice("small_norm", self.small_norm, ("group", "batch"))
        self.anchors.validate()
        self.rpn.validate()
        self.roi.validate()
        return self


@dataclass
class DataConfig:
    """Where images come from and how they are resized."""

    dataset: str = "synthetic"  # "synthetic", "voc" or "coco"
    root: str | None = None  # VOC / COCO folder; the synthetic cache folder (default: data/synthetic)
    image_size: int = 128  # synthetic images are square, this many pixels
    num_train: int = 600
    num_val: int = 150
    num_test: int = 150
    seed: int = 0
    min_size: int = 128  # resize: shorter side (paper preset 600)
    max_size: int = 256  # resize: longer side cap (paper preset 1000)
    hflip_prob: float = 0.5
    vflip_prob: float = 0.0  # training: top-bottom flips, for data with no up and down (the synthetic preset: 0.5)
    color_jitter: float = 0.0  # training: brightness, contrast, saturation each scaled by 1 +- this
    # VOC/COCO class names: "a,b,c" or a text file with one name per line; None: all the classes
    # the training annotations use (VOC, sorted) or the categories of the JSON (COCO, by id).
    classes: str | None = None

    def validate(self) -> DataConfig:
        _all_finite(self)
        _choice("dataset", self.dataset, ("synthetic", "voc", "coco"))
        if self.dataset != "synthetic" and not self.root:
            _fail("root", self.root, f"the path of the {self.dataset} folder")
        _positive_int("image_size", self.image_size)
        for name in ("num_train", "num_val", "num_test"):
            _positive_int(name, getattr(self, name), allow_zero=True)
        _positive_int("min_size", self.min_size)
        _positive_int("max_size", self.max_size)
        if self.max_size < self.min_size:
            raise ValueError(f"max_size={self.max_size} must be >= min_size={self.min_size}")
        if not (isinstance(self.hflip_prob, (int, float)) and 0 <= self.hflip_prob <= 1):
            _fail("hflip_prob", self.hflip_prob, "a probability in [0, 1]")
        if not (isinstance(self.vflip_prob, (int, float)) and 0 <= self.vflip_prob <= 1):
            _fail("vflip_prob", self.vflip_prob, "a probability in [0, 1]")
        if not (isinstance(self.color_jitter, (int, float)) and 0 <= self.color_jitter < 1):
            _fail("color_jitter", self.color_jitter, "a number in [0, 1)")
        if self.classes is not None:
            if not isinstance(self.classes, str) or not self.classes.strip():
                _fail("classes", self.classes, "class names 'a,b,c' or the path of a file with one name per line")
            if self.dataset == "synthetic":
                _fail("classes", self.classes, "None for the synthetic shapes (their classes are fixed)")
        return self


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping."""

    schedule: str = "joint"  # "joint" (approximate joint), "alternating" (the paper's 4 steps), "rpn"
    epochs: int = 10
    batch_size: int = 4
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 100
    lr_schedule: str = "cosine"  # "cosine" or "step"
    lr_steps: tuple[int, ...] = ()  # epochs at which "step" divides lr by 10
    amp: str = "off"  # "off", "auto" (bf16 where the device has it natively: AMX CPUs, recent GPUs), "bf16", "fp16" (CUDA only)
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", "mps"
    seed: int = 0
    num_workers: int = 0
    out_dir: str = "runs/default"
    checkpoint_every: int = 1  # epochs
    max_iters: int | None = None  # stop after this many iterations (smoke runs), None = all epochs
    time_budget_s: float | None = None  # stop after this many seconds of training
    # 4-step schedule, step 2's backbone and step 3's RPN layers: "fresh" (as built: random, or the
    # pretrained weights, as the paper) or "step1" (copies of step 1's trained ones: from scratch,
    # the stand-in for ImageNet)
    alternating_init: str = "fresh"
    # 4-step schedule: the epochs of steps 1-4 in this proportion (py-faster-rcnn's iteration
    # counts: 2 : 1 : 2 : 1). From scratch, the detector steps need more of a short budget.
    alternating_split: tuple[int, ...] = (2, 1, 2, 1)

    def validate(self) -> TrainConfig:
        _all_finite(self)
        _choice("schedule", self.schedule, ("joint", "alternating", "rpn"))
        _positive_int("epochs", self.epochs)
        _positive_int("batch_size", self.batch_size)
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            _fail("lr", self.lr, "a positive number")
        if not (isinstance(self.momentum, (int, float)) and 0 <= self.momentum < 1):
            _fail("momentum", self.momentum, "a number in [0, 1)")
        if not (isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0):
            _fail("weight_decay", self.weight_decay, "a number >= 0")
        _positive_int("warmup_iters", self.warmup_iters, allow_zero=True)
        _choice("lr_schedule", self.lr_schedule, ("cosine", "step"))
        if not all(isinstance(e, int) and not isinstance(e, bool) and 0 < e for e in self.lr_steps):
            _fail("lr_steps", self.lr_steps, "epochs >= 1 (when the step schedule divides the learning rate)")
        if list(self.lr_steps) != sorted(set(self.lr_steps)):
            _fail("lr_steps", self.lr_steps, "increasing epochs, each once")
        _choice("amp", self.amp, ("off", "auto", "bf16", "fp16"))
        _choice("alternating_init", self.alternating_init, ("fresh", "step1"))
        split = self.alternating_split
        if not (isinstance(split, (tuple, list)) and len(split) == 4
                and all(isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in split)):
            _fail("alternating_split", split, "4 positive ints: the weights of steps 1-4's epochs, e.g. (2, 1, 2, 1)")
        if not (self.device in ("auto", "cpu", "cuda", "mps") or str(self.device).startswith("cuda:")):
            _fail("device", self.device, "'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
        _positive_int("num_workers", self.num_workers, allow_zero=True)
        _positive_int("checkpoint_every", self.checkpoint_every)
        if self.max_iters is not None:
            _positive_int("max_iters", self.max_iters)
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            _fail("time_budget_s", self.time_budget_s, "a positive number of seconds or None")
        return self


def to_dict(cfg: Any) -> dict:
    """A config dataclass (nested ones included) as plain JSON-ready data."""
    return dataclasses.asdict(cfg)


def _tupleize(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_tupleize(v) for v in value)
    return value


def from_dict(cls: type, data: dict) -> Any:
    """Rebuild a config dataclass from ``to_dict`` output; unknown keys raise a ``ValueError`` naming them."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}; known: {', '.join(names)}")
    kwargs = {}
    nested = {"anchors": AnchorConfig, "rpn": RPNConfig, "roi": RoIConfig}
    for key, value in data.items():
        if cls is ModelConfig and key in nested and isinstance(value, dict):
            kwargs[key] = from_dict(nested[key], value)
        else:
            kwargs[key] = _tupleize(value)
    return cls(**kwargs)
