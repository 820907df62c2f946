"""torchvision's Faster R-CNN detectors as rpnlab models: same weights, same detections.

``FasterRCNN.from_torchvision(model)`` (assembled from ``torchvision_parts(model)``) takes one of

- ``fasterrcnn_resnet50_fpn`` (v1) and ``fasterrcnn_resnet50_fpn_v2``,
- ``fasterrcnn_mobilenet_v3_large_fpn`` and ``fasterrcnn_mobilenet_v3_large_320_fpn``

and returns an rpnlab ``FasterRCNN`` whose RPN, proposal layer, RoI pooler and post-processing
are rpnlab's own, so every intermediate the course shows (anchors, objectness, proposals before
and after NMS, RoIs, class scores) exists for a COCO-trained detector too. What is carried over:

- the backbone with its FPN, as torchvision built it (``TorchvisionBackbone``: same module, same
  weights; its levels in torchvision's order, the max-pooled ``pool`` level last);
- the RPN head: into rpnlab's ``RPNHead`` when it is torchvision's one-conv head (v1, MobileNet);
  v2's two-conv head is kept as torchvision's module (it has the same output contract);
- the box head: into rpnlab's ``FastRCNNHead`` for ``TwoMLPHead``; v2's conv head is wrapped
  (``TorchvisionBoxHead``);
- every setting: anchor sizes and ratios, proposal counts, thresholds, box-coder weights, the
  RoI Align grid, score/NMS thresholds, normalisation, and padding to a multiple of 32.

What is not: torchvision resizes inside the model (``GeneralizedRCNNTransform``: shorter side
800, or 320 for the ``_320_`` model); rpnlab's model takes images at the size the data transforms
chose. ``model.input_size`` holds torchvision's ``(min_size, max_size)`` to give to
``DataConfig`` (``min_size``, ``max_size``). torchvision derives each level's anchor stride from
the padded batch (``image size // feature size``), which is not the level's true stride when the
padded side is not a multiple of 64 (the max-pooled level rounds up); rpnlab uses the true
strides. On batches whose padded sides are multiples of 64 the two agree to float rounding
(``tests/test_torchvision_models.py``).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from rpnlab.config import TORCHVISION_DETECTORS, AnchorConfig, ModelConfig, RoIConfig, RPNConfig
from rpnlab.detector.backbones import Backbone

__all__ = [
    "TORCHVISION_DETECTORS",
    "TorchvisionBackbone",
    "TorchvisionBoxHead",
    "torchvision_detector",
    "torchvision_model_config",
    "torchvision_model_for",
    "torchvision_parts",
]

class TorchvisionBackbone(Backbone):
    """A torchvision detection backbone (``BackboneWithFPN``) as an rpnlab ``Backbone``.

    ``forward(images (B, 3, H, W)) -> [(B, C, H / s, W / s) for s in strides]``, in the order of
    torchvision's ``OrderedDict`` (``names``).
    """

    def __init__(self, body: nn.Module, out_channels: int, strides: Sequence[int], names: Sequence[str]):
        super().__init__(body, out_channels, strides)
        self.names = tuple(names)

    def forward(self, images: Tensor) -> list[Tensor]:
        return list(self.body(images).values())


class TorchvisionBoxHead(nn.Module):
    """torchvision's ``box_head`` + ``box_predictor`` with the contract of rpnlab's ``FastRCNNHead``:
    ``pooled (R, C, out, out) -> (class_logits (R, C+1), box_regression (R, 4(C+1)))``."""

    def __init__(self, box_head: nn.Module, box_predictor: nn.Module, num_classes: int):
        super().__init__()
        self.box_head = box_head
        self.box_predictor = box_predictor
        self.num_classes = int(num_classes)

    def forward(self, pooled: Tensor) -> tuple[Tensor, Tensor]:
        return self.box_predictor(self.box_head(pooled))


class _PoolLevels(nn.Module):
    """RoI pooling from some of the backbone's levels: torchvision pools from ``'0'..'3'`` and
    leaves out the max-pooled level the RPN alone uses."""

    def __init__(self, pooler: nn.Module, levels: Sequence[int]):
        super().__init__()
        self.pooler = pooler
        self.levels = tuple(int(i) for i in levels)

    def forward(self, features, proposals):
        return self.pooler([features[i] for i in self.levels], proposals)

    def extra_repr(self) -> str:
        return f"levels={self.levels}"


def _which(model: nn.Module) -> str:
    """The builder name of a torchvision Faster R-CNN, from its parts."""
    from torchvision.models.detection import FasterRCNN as TVFasterRCNN
    from torchvision.models.detection.faster_rcnn import TwoMLPHead
    from torchvision.models.mobilenetv3 import MobileNetV3

    if not isinstance(model, TVFasterRCNN):
        raise TypeError(f"model must be a torchvision FasterRCNN ({', '.join(TORCHVISION_DETECTORS)}), "
                        f"got {type(model).__name__}")
    body = model.backbone.body
    is_mobilenet = any(isinstance(m, MobileNetV3) for m in body.modules()) or hasattr(body, "0") and not hasattr(
        body, "layer1")
    if is_mobilenet:
        return ("fasterrcnn_mobilenet_v3_large_320_fpn" if min(model.transform.min_size) <= 320
                else "fasterrcnn_mobilenet_v3_large_fpn")
    if not hasattr(body, "layer1"):
        raise ValueError("model has a backbone from_torchvision does not know: supported are "
                         + ", ".join(TORCHVISION_DETECTORS))
    return "fasterrcnn_resnet50_fpn" if isinstance(model.roi_heads.box_head, TwoMLPHead) else "fasterrcnn_resnet50_fpn_v2"


def _strides_and_names(backbone: nn.Module) -> tuple[list[int], list[str]]:
    """Each level's stride, measured on a 256 x 256 input (every stride up to 64 divides it)."""
    was_training = backbone.training
    backbone.eval()
    with torch.no_grad():
        param = next(backbone.parameters())
        out = backbone(torch.zeros(1, 3, 256, 256, dtype=param.dtype, device=param.device))
    backbone.train(was_training)
    return [256 // f.shape[-1] for f in out.values()], list(out.keys())


def _matcher_thresholds(matcher) -> tuple[float, float]:
    return float(matcher.high_threshold), float(matcher.low_threshold)


def torchvision_parts(model: nn.Module) -> dict:
    """The pieces of an rpnlab ``FasterRCNN`` with ``model``'s weights and settings (module docstring).

    Returns ``dict(backbone, rpn, roi_heads, num_classes, image_mean, image_std, size_divisible,
    config, name, input_size, class_names)``; ``FasterRCNN.from_torchvision`` assembles them.
    ``model`` is not changed: its modules are deep-copied. ``class_names`` are the categories of
    the weights when ``model.rpnlab_categories`` holds them (set by the weights loader), else
    ``class 1..C``.
    """
    from torchvision.models.detection.faster_rcnn import TwoMLPHead

    from rpnlab.detector.roi_heads import FastRCNNHead, RoIHeads
    from rpnlab.detector.rpn import RegionProposalNetwork, RPNHead

    name = _which(model)
    model = copy.deepcopy(model).cpu()
    tv_rpn, tv_roi = model.rpn, model.roi_heads
    strides, names = _strides_and_names(model.backbone)
    channels = int(model.backbone.out_channels)
    backbone = TorchvisionBackbone(model.backbone, channels, strides, names)

    generator = tv_rpn.anchor_generator
    anchors = AnchorConfig(sizes=tuple(tuple(float(s) for s in level) for level in generator.sizes),
                           aspect_ratios=tuple(tuple(float(r) for r in level) for level in generator.aspect_ratios),
                           strides=tuple(strides), offset=0.0, ratio_convention="h/w")
    fg, bg = _matcher_thresholds(tv_rpn.proposal_matcher)
    rpn_cfg = RPNConfig(
        conv_channels=channels, objectness="sigmoid", fg_iou_thresh=fg, bg_iou_thresh=bg,
        allow_low_quality_matches=True, batch_size_per_image=tv_rpn.fg_bg_sampler.batch_size_per_image,
        positive_fraction=tv_rpn.fg_bg_sampler.positive_fraction, box_weights=tuple(tv_rpn.box_coder.weights),
        pre_nms_top_n_train=tv_rpn._pre_nms_top_n["training"], post_nms_top_n_train=tv_rpn._post_nms_top_n["training"],
        pre_nms_top_n_test=tv_rpn._pre_nms_top_n["testing"], post_nms_top_n_test=tv_rpn._post_nms_top_n["testing"],
        nms_thresh=float(tv_rpn.nms_thresh), min_size=float(tv_rpn.min_size), score_thresh=float(tv_rpn.score_thresh),
    ).validate()
    rpn = RegionProposalNetwork.from_config(anchors, rpn_cfg, channels)
    convs = list(tv_rpn.head.conv)
    if len(convs) == 1 and len(convs[0]) == 2 and isinstance(convs[0][0], nn.Conv2d):
        head: nn.Module = rpn.head
        assert isinstance(head, RPNHead)
        head.conv.load_state_dict(convs[0][0].state_dict())
        head.cls_logits.load_state_dict(tv_rpn.head.cls_logits.state_dict())
        head.bbox_pred.load_state_dict(tv_rpn.head.bbox_pred.state_dict())
    else:  # v2: two convs; torchvision's head has rpnlab's head contract already
        rpn.head = tv_rpn.head

    pool = tv_roi.box_roi_pool
    levels = [i for i, n in enumerate(names) if n in pool.featmap_names]
    if len({strides[i] for i in levels}) == 1:
        # MobileNet's two FPN levels share stride 32: torchvision's level mapper (k_min = k_max)
        # then sends every box to the first of them.
        levels = levels[:1]
    num_classes = int(tv_roi.box_predictor.cls_score.out_features) - 1
    fg, bg = _matcher_thresholds(tv_roi.proposal_matcher)
    output_size = pool.output_size[0] if isinstance(pool.output_size, (tuple, list)) else pool.output_size
    tv_head = tv_roi.box_head
    representation = (int(tv_head.fc7.out_features) if isinstance(tv_head, TwoMLPHead)
                      else int(tv_roi.box_predictor.cls_score.in_features))
    roi_cfg = RoIConfig(
        fg_iou_thresh=fg, bg_iou_thresh_high=bg, bg_iou_thresh_low=0.0,
        batch_size_per_image=tv_roi.fg_bg_sampler.batch_size_per_image,
        positive_fraction=tv_roi.fg_bg_sampler.positive_fraction, box_weights=tuple(tv_roi.box_coder.weights),
        pooler="align", output_size=int(output_size), sampling_ratio=int(pool.sampling_ratio), aligned=False,
        representation_size=representation, score_thresh=float(tv_roi.score_thresh),
        nms_thresh=float(tv_roi.nms_thresh), detections_per_img=int(tv_roi.detections_per_img),
    ).validate()
    scales = [1.0 / strides[i] for i in levels]
    roi_heads = RoIHeads.from_config(roi_cfg, channels, num_classes,
                                     spatial_scale=scales[0] if len(scales) == 1 else scales)
    if isinstance(tv_head, TwoMLPHead):
        box_head = roi_heads.head
        assert isinstance(box_head, FastRCNNHead)
        box_head.fc6.load_state_dict(tv_head.fc6.state_dict())
        box_head.fc7.load_state_dict(tv_head.fc7.state_dict())
        box_head.cls_score.load_state_dict(tv_roi.box_predictor.cls_score.state_dict())
        box_head.bbox_pred.load_state_dict(tv_roi.box_predictor.bbox_pred.state_dict())
    else:
        roi_heads.head = TorchvisionBoxHead(tv_head, tv_roi.box_predictor, num_classes)
    if len(levels) != len(strides):
        roi_heads.pooler = _PoolLevels(roi_heads.pooler, levels)

    transform = model.transform
    config = ModelConfig(num_classes=num_classes, backbone=name, anchors=anchors, rpn=rpn_cfg, roi=roi_cfg)
    return {
        "backbone": backbone, "rpn": rpn, "roi_heads": roi_heads, "num_classes": num_classes,
        "image_mean": tuple(transform.image_mean), "image_std": tuple(transform.image_std),
        "size_divisible": int(transform.size_divisible), "config": config, "name": name,
        "input_size": (int(min(transform.min_size)), int(transform.max_size)),
        "class_names": _class_names(model, num_classes),
    }


def _class_names(model: nn.Module, num_classes: int) -> list[str]:
    categories = getattr(model, "rpnlab_categories", None)
    if categories is not None and len(categories) == num_classes + 1:
        return [str(c) for c in categories[1:]]
    return [f"class {i}" for i in range(1, num_classes + 1)]


def torchvision_detector(name: str, num_classes: int = 91, **kwargs) -> nn.Module:
    """torchvision's builder ``name`` with random weights (``weights=None, weights_backbone=None``)."""
    from torchvision.models import detection

    if name not in TORCHVISION_DETECTORS:
        raise ValueError(f"name={name!r} is invalid: expected one of {', '.join(TORCHVISION_DETECTORS)}")
    return getattr(detection, name)(weights=None, weights_backbone=None, num_classes=num_classes, **kwargs)


def _init_state(spec: str, name: str) -> tuple[dict, list[str] | None]:
    """``(state dict, categories or None)`` of ``ModelConfig.init``: ``"torchvision:<name>"`` (the
    weights API: hub cache, downloaded there when online) or a file holding such a state dict."""
    from pathlib import Path

    from rpnlab.detector.backbones import torchvision_weights_file

    if spec.startswith("torchvision:"):
        from torchvision.models import get_model_weights

        weights = get_model_weights(name).DEFAULT
        path, categories = torchvision_weights_file(weights), list(weights.meta["categories"])
    else:
        path, categories = Path(spec).expanduser(), None
        if not path.is_file():
            raise FileNotFoundError(f"init={spec!r}: no such file (expected 'torchvision:{name}' or the path of a "
                                    f"{name} state dict)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not any(k.startswith("roi_heads.") for k in state):
        raise ValueError(f"init={spec!r}: {path} does not hold the state dict of a torchvision Faster R-CNN")
    return state, categories


def _freeze_like_torchvision(model: nn.Module, name: str, trainable_layers: int = 3) -> None:
    """What torchvision's builders do for a pretrained detector: frozen batch norm in the trunk
    (v1 and MobileNet; v2 keeps ordinary batch norm) and only the last ``trainable_layers`` stages learn."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    body = model.backbone.body
    if not name.endswith("_v2"):
        for parent in list(body.modules()):
            for child_name, child in list(parent.named_children()):
                if isinstance(child, nn.BatchNorm2d):
                    frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
                    for key in ("weight", "bias", "running_mean", "running_var"):
                        getattr(frozen, key).copy_(getattr(child, key).detach())
                    setattr(parent, child_name, frozen)
    if hasattr(body, "layer1"):  # ResNet-50: layer4, layer3, layer2 learn
        train = ("layer4", "layer3", "layer2", "layer1", "conv1")[:trainable_layers]
        for key, p in body.named_parameters():
            p.requires_grad_(key.startswith(train))
    else:  # MobileNetV3: the stages after torchvision's freeze point learn
        blocks = list(body.children())
        stages = [0] + [i for i, b in enumerate(blocks) if getattr(b, "_is_cn", False)] + [len(blocks) - 1]
        freeze_before = stages[len(stages) - trainable_layers]
        for block in blocks[:freeze_before]:
            for p in block.parameters():
                p.requires_grad_(False)


def torchvision_model_for(config: ModelConfig) -> nn.Module:
    """The torchvision detector ``config.backbone`` for ``config.num_classes`` classes.

    With ``config.init``, its weights (COCO's for ``"torchvision:<name>"``) are loaded, the first
    stages and the trunk's batch norm frozen as torchvision does for fine-tuning, and, unless
    ``num_classes`` is the weights' own (90 for COCO), the box predictor replaced by a fresh one
    for ``num_classes + 1`` outputs: torchvision's fine-tuning tutorial. ``model.rpnlab_categories``
    then holds the weights' category names when the predictor is theirs.
    """
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor

    name = config.backbone
    if config.init is None:
        return torchvision_detector(name, num_classes=config.num_classes + 1)
    state, categories = _init_state(str(config.init), name)
    own_classes = int(state["roi_heads.box_predictor.cls_score.weight"].shape[0])
    model = torchvision_detector(name, num_classes=own_classes)
    model.load_state_dict(state)
    _freeze_like_torchvision(model, name)
    if own_classes != config.num_classes + 1:
        in_features = model.roi_heads.box_predictor.cls_score.in_features
        model.roi_heads.box_predictor = FastRCNNPredictor(in_features, config.num_classes + 1)
    elif categories is not None:
        model.rpnlab_categories = categories
    return model


def torchvision_model_config(name: str, num_classes: int = 90) -> ModelConfig:
    """The ``ModelConfig`` of torchvision's ``name`` (its anchors, counts and thresholds)."""
    return torchvision_parts(torchvision_detector(name, num_classes=num_classes + 1))["config"]
