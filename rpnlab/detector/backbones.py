"""Backbones: the convolutional trunk whose feature maps the RPN and the RoI head share.

``build_backbone(name, pretrained)`` returns ``(module, out_channels, strides)``. The module maps
images ``(B, 3, H, W)`` (already normalised) to a list of feature maps, one per level,
``[(B, out_channels, H / s, W / s) for s in strides]``. Single-level backbones return a list of one.

- ``"small"``: a few conv-GroupNorm-ReLU blocks that train from scratch on a laptop CPU
  (the synthetic shapes data); no published weights.
- ``"vgg16"``: VGG-16 up to conv5_3, stride 16, 512 channels (the paper's network).
- ``"resnet50_c4"``: ResNet-50 up to layer3 ("C4"), stride 16, 1024 channels.
- ``"mobilenet_v3"``: MobileNetV3-Large with its last stage dilated instead of strided
  (torchvision's ``dilated=True``), stride 16, 960 channels.
- ``"mobilenet_v3_fpn"``: MobileNetV3-Large at strides 8, 16, 32 with a feature pyramid
  (``torchvision.ops.FeaturePyramidNetwork``), 256 channels per level.

``pretrained`` is ``None`` (random init), a path to a weights file, ``"cache"``: look for
torchvision's file name (e.g. ``vgg16-397923af.pth``) in torch hub's cache
(``torch.hub.get_dir()/checkpoints``) and in the project's ``data/weights``, never downloading; or
``"imagenet"``: torchvision's weights API (``torchvision.models.get_weight``), which reads the hub
cache and, when the file is not there, downloads it into the cache (offline: a
``FileNotFoundError`` naming the file and the folder to put it in).
A weights file may be a torchvision classifier state dict, a state dict of the backbone module
itself, or an rpnlab checkpoint (its ``backbone.*`` weights are used). With pretrained weights,
batch norm layers are frozen (statistics from ImageNet are better than those of batches of 2-4
images) and the first blocks are frozen, as in the paper and torchvision.
"""

from __future__ import annotations

import os
import pickle
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = [
    "BACKBONES",
    "Backbone",
    "SmallBackbone",
    "build_backbone",
    "imagenet_weights",
    "pretrained_weight_candidates",
    "torchvision_weights_file",
    "torchvision_weights_filename",
]

# Which torchvision weights (enum name in torchvision.models, member) each backbone starts from.
_TORCHVISION_WEIGHTS = {
    "vgg16": ("VGG16_Weights", "IMAGENET1K_V1"),
    "resnet50_c4": ("ResNet50_Weights", "IMAGENET1K_V1"),
    "mobilenet_v3": ("MobileNet_V3_Large_Weights", "IMAGENET1K_V1"),
    "mobilenet_v3_fpn": ("MobileNet_V3_Large_Weights", "IMAGENET1K_V1"),
}

_PROJECT_WEIGHTS_DIR = Path(__file__).resolve().parents[2] / "data" / "weights"


class Backbone(nn.Module):
    """A trunk ``body`` plus the bookkeeping the detector needs.

    Attributes: ``out_channels`` (int, the same for every level), ``strides`` (tuple of ints, one
    per level, image pixels per feature cell). ``forward(images (B, 3, H, W)) -> list[(B, C, H/s, W/s)]``.
    """

    out_channels: int
    strides: tuple[int, ...]

    def __init__(self, body: nn.Module, out_channels: int, strides: Sequence[int]):
        super().__init__()
        self.body = body
        self.out_channels = int(out_channels)
        self.strides = tuple(int(s) for s in strides)

    def forward(self, images: Tensor) -> list[Tensor]:
        return [self.body(images)]

    def map_torchvision_key(self, key: str) -> str | None:
        """Name in this module of a torchvision classifier weight, or None if it is not used here."""
        return None


def _conv_norm_relu(cin: int, cout: int, stride: int, dilation: int = 1, norm: str = "group") -> nn.Sequential:
    # GroupNorm behaves the same in train and eval mode and does not depend on the batch size,
    # so frozen layers stay frozen and batches of 2 train like batches of 16; BatchNorm is the
    # classic choice and often learns faster from scratch when batches hold 4 or more images.
    norm_layer = nn.GroupNorm(min(32, cout // 4), cout) if norm == "group" else nn.BatchNorm2d(cout)
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
        norm_layer,
        nn.ReLU(inplace=True),
    )


class SmallBackbone(Backbone):
    """A small from-scratch CNN: per stage one strided conv then ``depth - 1`` plain convs.

    Args:
        widths: channels of each stage; the last is ``out_channels``.
        stride: total stride, a power of two; stages after it are reached keep the resolution
            and use dilation 2 instead, so the receptive field still grows.
        depth: convolutions per stage.
        norm: ``"group"`` (GroupNorm) or ``"batch"`` (BatchNorm) after each convolution.
    """

    def __init__(self, widths: Sequence[int] = (32, 64, 128, 128), stride: int = 8, depth: int = 2,
                 norm: str = "group"):
        if norm not in ("group", "batch"):
            raise ValueError(f"norm={norm!r} is invalid: expected 'group' or 'batch'")
        num_down = int(stride).bit_length() - 1
        if stride < 2 or 2**num_down != stride or num_down > len(widths):
            raise ValueError(f"stride={stride!r} is invalid: expected a power of two in [2, {2 ** len(widths)}]")
        stages, cin = [], 3
        for i, w in enumerate(widths):
            downsample = i < num_down
            blocks = [_conv_norm_relu(cin, w, 2 if downsample else 1, 1 if downsample else 2, norm)]
            blocks += [_conv_norm_relu(w, w, 1, 1, norm) for _ in range(depth - 1)]
            stages.append(nn.Sequential(*blocks))
            cin = w
        super().__init__(nn.Sequential(*stages), widths[-1], (stride,))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


class _VGG16(Backbone):
    """VGG-16 ``features`` up to conv5_3 + ReLU (the last max-pool dropped): stride 16, 512 ch."""

    def __init__(self) -> None:
        from torchvision.models import vgg

        # make_layers builds only the conv trunk: no 120M-parameter classifier to allocate.
        features = vgg.make_layers(vgg.cfgs["D"], batch_norm=False)
        super().__init__(features[:30], 512, (16,))

    def map_torchvision_key(self, key: str) -> str | None:
        if key.startswith("features."):
            index = int(key.split(".")[1])
            if index < 30:
                return "body." + key[len("features."):]
        return None

    def freeze_stem(self) -> None:
        # py-faster-rcnn fine-tunes from conv3_1 on: conv1_x and conv2_x (the first 4 convs) stay fixed.
        for p in self.body[:10].parameters():
            p.requires_grad_(False)


class _ResNet50C4(Backbone):
    """ResNet-50 stem + layer1..layer3: stride 16, 1024 channels (the paper's ResNet variant)."""

    def __init__(self, norm_layer: Callable[..., nn.Module]):
        from torchvision.models import resnet50

        net = resnet50(weights=None, norm_layer=norm_layer)
        names = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3")
        super().__init__(nn.Sequential(OrderedDict((n, getattr(net, n)) for n in names)), 1024, (16,))

    def map_torchvision_key(self, key: str) -> str | None:
        if key.split(".")[0] in ("conv1", "bn1", "layer1", "layer2", "layer3"):
            return "body." + key
        return None

    def freeze_stem(self) -> None:
        # Like detectron2's FREEZE_AT=2: the stem and layer1 keep their ImageNet weights.
        for name in ("conv1", "bn1", "layer1"):
            for p in getattr(self.body, name).parameters():
                p.requires_grad_(False)


class _MobileNetV3(Backbone):
    """MobileNetV3-Large features with the stride-32 stage dilated: stride 16, 960 channels."""

    def __init__(self, norm_layer: Callable[..., nn.Module]):
        from torchvision.models import mobilenet_v3_large

        net = mobilenet_v3_large(weights=None, dilated=True, norm_layer=norm_layer)
        super().__init__(net.features, 960, (16,))

    def map_torchvision_key(self, key: str) -> str | None:
        return "body." + key[len("features."):] if key.startswith("features.") else None

    def freeze_stem(self) -> None:
        # The stem and the stride-4 blocks: generic edges that ImageNet taught well.
        for p in self.body[:4].parameters():
            p.requires_grad_(False)


class _MobileNetV3FPN(_MobileNetV3):
    """MobileNetV3-Large taps at strides 8, 16, 32 merged by a feature pyramid, 256 ch per level."""

    # Outputs of these feature blocks: 40 ch at stride 8, 112 at 16, 960 at 32.
    taps = (6, 12, 16)

    def __init__(self, norm_layer: Callable[..., nn.Module], out_channels: int = 256):
        from torchvision.models import mobilenet_v3_large
        from torchvision.ops import FeaturePyramidNetwork

        net = mobilenet_v3_large(weights=None, norm_layer=norm_layer)
        Backbone.__init__(self, net.features, out_channels, (8, 16, 32))
        self.fpn = FeaturePyramidNetwork([40, 112, 960], out_channels)

    def forward(self, images: Tensor) -> list[Tensor]:
        taps, x = OrderedDict(), images
        for i, block in enumerate(self.body):
            x = block(x)
            if i in self.taps:
                taps[str(i)] = x
        return list(self.fpn(taps).values())


#: Backbone names accepted by ``build_backbone`` (and ``ModelConfig.backbone``).
BACKBONES = ("small", "vgg16", "resnet50_c4", "mobilenet_v3", "mobilenet_v3_fpn")


def torchvision_weights_filename(name: str) -> str:
    """File name torchvision caches the ImageNet weights of backbone ``name`` under."""
    if name not in _TORCHVISION_WEIGHTS:
        raise ValueError(f"backbone {name!r} has no torchvision ImageNet weights; "
                         f"backbones with weights: {', '.join(_TORCHVISION_WEIGHTS)}")
    import torchvision.models

    enum_name, member = _TORCHVISION_WEIGHTS[name]
    weights = getattr(getattr(torchvision.models, enum_name), member)
    return os.path.basename(weights.url)


def torchvision_weights_file(weights) -> Path:
    """The local file of a torchvision ``WeightsEnum`` member, fetched through the weights API.

    Reads ``torch.hub.get_dir()/checkpoints/<file>``; when it is missing, ``weights.get_state_dict``
    downloads it there (hash checked). Without a network connection: ``FileNotFoundError`` saying
    where to put the file (downloaded elsewhere from ``weights.url``).
    """
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
    if path.is_file():
        return path
    try:
        weights.get_state_dict(progress=True, check_hash=True)
    except Exception as err:  # noqa: BLE001 - URLError, HTTPError, socket and hash errors all mean "not here"
        raise FileNotFoundError(
            f"weights {weights} are not in the torch hub cache and could not be downloaded "
            f"({type(err).__name__}: {err}); download {weights.url} on a machine with internet and "
            f"copy it to {path} (or pass the file's path)"
        ) from None
    if not path.is_file():
        raise FileNotFoundError(f"weights {weights}: torchvision reported success but {path} is missing")
    return path


def imagenet_weights(name: str):
    """The torchvision ``WeightsEnum`` member backbone ``name`` starts from."""
    if name not in _TORCHVISION_WEIGHTS:
        raise ValueError(f"backbone {name!r} has no torchvision ImageNet weights; "
                         f"backbones with weights: {', '.join(_TORCHVISION_WEIGHTS)}")
    from torchvision.models import get_weight

    enum_name, member = _TORCHVISION_WEIGHTS[name]
    return get_weight(f"{enum_name}.{member}")


def pretrained_weight_candidates(name: str, pretrained: str | os.PathLike) -> list[Path]:
    """The files, in order, where ``build_backbone`` looks for the weights of ``name``."""
    if str(pretrained) != "cache":
        return [Path(pretrained).expanduser()]
    filename = torchvision_weights_filename(name)
    return [
        Path(torch.hub.get_dir()) / "checkpoints" / filename,
        Path.cwd() / "data" / "weights" / filename,
        _PROJECT_WEIGHTS_DIR / filename,
    ]


def _find_weights(name: str, pretrained: str | os.PathLike) -> Path:
    if str(pretrained) == "imagenet":
        return torchvision_weights_file(imagenet_weights(name))
    candidates = pretrained_weight_candidates(name, pretrained)
    for path in candidates:
        if path.is_file():
            return path
    looked = "\n  ".join(dict.fromkeys(str(p) for p in candidates))
    hint = ""
    if str(pretrained) == "cache":
        hint = (f"\nrpnlab never downloads weights: copy {candidates[0].name} (from "
                "torchvision's download URL) into one of these places, or pass its path")
    raise FileNotFoundError(f"pretrained weights for backbone {name!r} not found; looked at:\n  {looked}{hint}")


def _backbone_state_dict(backbone: Backbone, loaded: dict) -> dict[str, Tensor]:
    """Translate a loaded file (torchvision classifier, our module, or an rpnlab checkpoint)."""
    if "model" in loaded and isinstance(loaded["model"], dict):  # an rpnlab checkpoint
        loaded = {k[len("backbone."):]: v for k, v in loaded["model"].items() if k.startswith("backbone.")}
    own = backbone.state_dict()
    if any(k in own for k in loaded):  # already in this module's names
        return dict(loaded)
    mapped = {}
    for key, value in loaded.items():
        new_key = backbone.map_torchvision_key(key)
        if new_key is not None:
            mapped[new_key] = value
    return mapped


def _load_pretrained(backbone: Backbone, name: str, path: Path) -> None:
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        if isinstance(err, pickle.UnpicklingError) and "GLOBAL" in str(err).upper():
            why = "it holds Python objects besides tensors; refused, since loading them could run code"
        else:
            why = f"corrupt or not a weights file ({type(err).__name__}: {str(err).strip()[:200]})"
        raise ValueError(f"weights file {str(path)!r} cannot be read: {why}") from err
    if not isinstance(loaded, dict):
        raise TypeError(f"weights file {str(path)!r} holds a {type(loaded).__name__}, expected a state dict")
    state = _backbone_state_dict(backbone, loaded)
    own = backbone.state_dict()
    # Frozen batch norm keeps no batch counter: drop the counters a file may carry.
    state = {k: v for k, v in state.items() if k in own or not k.endswith("num_batches_tracked")}
    # Layers that only exist in the detector (the FPN) start fresh; the trunk must be complete.
    required = [k for k in own if k.startswith("body.") and not k.endswith("num_batches_tracked")]
    missing = [k for k in required if k not in state]
    if missing:
        raise ValueError(
            f"weights file {str(path)!r} does not fit backbone {name!r}: {len(missing)} of its "
            f"{len(required)} weights are missing (first: {missing[0]!r})"
        )
    unexpected = [k for k in state if k not in own]
    if unexpected:
        raise ValueError(f"weights file {str(path)!r} has weights backbone {name!r} lacks (first: {unexpected[0]!r})")
    for key, value in state.items():
        if own[key].shape != value.shape:
            raise ValueError(f"weights file {str(path)!r}: {key!r} has shape {tuple(value.shape)}, "
                             f"backbone {name!r} expects {tuple(own[key].shape)}")
    backbone.load_state_dict(state, strict=False)


def build_backbone(name: str, pretrained: str | os.PathLike | None = None,
                   small_norm: str = "group") -> tuple[Backbone, int, tuple[int, ...]]:
    """Build backbone ``name`` -> ``(module, out_channels, strides)``.

    ``small_norm``: ``"group"`` or ``"batch"``, the normalisation of the ``"small"`` backbone
    (ignored by the others, which use batch norm, frozen when pretrained).

    ``pretrained``: ``None`` (random init), a weights file path, ``"cache"`` (torchvision's file
    in the local torch hub cache or ``data/weights``; never downloaded) or ``"imagenet"``
    (torchvision's weights API: the hub cache, downloading into it when online). Missing weights
    raise ``FileNotFoundError`` naming the paths looked at.
    """
    if name not in BACKBONES:
        raise ValueError(f"backbone={name!r} is invalid: expected one of {', '.join(map(repr, BACKBONES))}")
    if name == "small" and pretrained is not None and str(pretrained) in ("cache", "imagenet"):
        raise ValueError("backbone 'small' has no published weights: pretrained must be None or a file path")
    from torchvision.ops.misc import FrozenBatchNorm2d

    weights = _find_weights(name, pretrained) if pretrained is not None else None  # fail before building

    # Frozen batch norm with ImageNet statistics when fine-tuning; ordinary BN from scratch.
    norm = FrozenBatchNorm2d if pretrained is not None else nn.BatchNorm2d
    if name == "small":
        backbone: Backbone = SmallBackbone(norm=small_norm)
    elif name == "vgg16":
        backbone = _VGG16()
    elif name == "resnet50_c4":
        backbone = _ResNet50C4(norm)
    elif name == "mobilenet_v3":
        backbone = _MobileNetV3(norm)
    else:
        backbone = _MobileNetV3FPN(norm)
    if pretrained is not None:
        _load_pretrained(backbone, name, weights)
        if hasattr(backbone, "freeze_stem"):
            backbone.freeze_stem()
    return backbone, backbone.out_channels, backbone.strides
