"""Looking inside a trained torchvision detector converted to rpnlab (notebook 11).

``open_torchvision_detector`` gives the converted model (COCO weights when torch hub's cache has
them, else random weights, and says which); ``read_photos`` reads a folder of photos at the
model's input size; ``firing_anchors`` and ``plot_firing_anchors`` show which anchors the RPN
scores highest and on which pyramid level they sit; ``roi_levels`` counts the level each RoI is
pooled from.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor

from rpnlab.lab.figures import add_box, new_figure, show_image

__all__ = ["firing_anchors", "open_torchvision_detector", "plot_firing_anchors", "read_photos", "roi_levels"]

_PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


def cached_weights_file(name: str) -> Path:
    """Where torch hub's cache keeps the COCO weights of torchvision detector ``name``."""
    from torchvision.models import get_model_weights

    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(get_model_weights(name).DEFAULT.url)


def open_torchvision_detector(name: str, weights: str = "auto") -> tuple[Any, Any, str]:
    """``(rpnlab model, torchvision model, what weights)`` for torchvision detector ``name``, eval mode.

    ``weights``: ``"auto"`` (COCO weights if the hub cache has the file, else random), ``"coco"``
    (the cache's file, an error naming it when missing; never downloaded here) or ``"random"``.
    """
    from rpnlab.detector.model import FasterRCNN
    from rpnlab.detector.torchvision_models import torchvision_detector

    if weights not in ("auto", "coco", "random"):
        raise ValueError(f"weights={weights!r} is invalid: expected 'auto', 'coco' or 'random'")
    path = cached_weights_file(name)
    use_coco = weights == "coco" or (weights == "auto" and path.is_file())
    if use_coco and not path.is_file():
        raise FileNotFoundError(f"no COCO weights for {name} at {path}: download them there (online, "
                                f"`rpnlab train --init torchvision:{name}` does) or use weights='random'")
    tv = torchvision_detector(name, num_classes=91)
    if use_coco:
        from torchvision.models import get_model_weights

        tv.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        tv.rpnlab_categories = list(get_model_weights(name).DEFAULT.meta["categories"])
        what = f"COCO weights from {path}"
    else:
        what = "random weights (no COCO weights in the torch hub cache): the boxes below show the machinery, not objects"
    return FasterRCNN.from_torchvision(tv.eval()), tv.eval(), what


def read_photos(folder: str | os.PathLike, min_size: int, max_size: int, limit: int) -> tuple[list[Tensor], list[str]]:
    """Up to ``limit`` images of ``folder`` (sorted by name), resized as the model expects:
    ``(images [(3, H, W)] in [0, 1], names)``. Large JPEGs are decoded at reduced scale."""
    from rpnlab.data.imageio import load_image
    from rpnlab.data.transforms import ResizeShortestSide

    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"photo folder not found: {folder}")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in _PHOTO_SUFFIXES)[:limit]
    if not paths:
        raise FileNotFoundError(f"no photos ({', '.join(sorted(_PHOTO_SUFFIXES))}) in {folder}")
    resize = ResizeShortestSide(min_size, max_size)
    images = [resize(load_image(p, min_size, max_size), {"boxes": torch.zeros(0, 4)})[0] for p in paths]
    return images, [p.name for p in paths]


def firing_anchors(anchors: Tensor, objectness: Tensor, num_anchors_per_level: list[int], top: int = 20,
                   threshold: float = 0.5) -> dict[str, Any]:
    """The ``top`` anchors of one image by objectness, and how many fire per pyramid level.

    ``anchors: (A, 4)``, ``objectness: (A,)`` logits. Returns ``boxes (top, 4)``, ``scores (top,)``
    (probabilities), ``levels (top,)`` and ``firing_per_level`` (anchors with probability >=
    ``threshold``, one count per level).
    """
    probs = torch.sigmoid(objectness.detach().float())
    level = torch.repeat_interleave(torch.arange(len(num_anchors_per_level)),
                                    torch.tensor(num_anchors_per_level)).to(probs.device)
    idx = probs.topk(min(top, probs.numel())).indices
    firing = [int((probs[level == i] >= threshold).sum()) for i in range(len(num_anchors_per_level))]
    return {"boxes": anchors[idx].cpu(), "scores": probs[idx].cpu(), "levels": level[idx].cpu(),
            "firing_per_level": firing}


def plot_firing_anchors(image: Tensor, fired: dict[str, Any], strides: list[int], title: str | None = None) -> Figure:
    """The highest-scoring anchors over the image, one colour per pyramid level."""
    fig, axes = new_figure(1, 1, (6.0, 5.0))
    ax = axes[0, 0]
    show_image(ax, image)
    colours = ["tab:red", "tab:orange", "tab:green", "tab:blue", "tab:purple", "tab:brown"]
    seen = set()
    for box, level in zip(fired["boxes"].numpy(), fired["levels"].tolist()):
        label = None if level in seen else f"level {level} (stride {strides[level]})"
        seen.add(level)
        add_box(ax, box, colours[level % len(colours)], linewidth=1.2, label=label)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title(title or f"the {len(fired['boxes'])} anchors the RPN scores highest")
    return fig


def roi_levels(rois: Tensor, pooler) -> dict[str, int]:
    """How many RoIs the pooler takes from each level (FPN's rule), ``{"stride S": count}``."""
    from rpnlab.detector.roi import fpn_level_of_boxes

    inner = getattr(pooler, "pooler", pooler)  # the converted model may wrap it to pick levels
    scales = inner.spatial_scales
    if len(scales) == 1:
        return {f"stride {round(1 / scales[0])}": int(rois.shape[0])}
    level = fpn_level_of_boxes(rois, inner.k_min, inner.k_max, inner.canonical_scale, inner.canonical_level)
    counts = np.bincount(level.cpu().numpy(), minlength=len(scales))
    return {f"stride {round(1 / s)}": int(c) for s, c in zip(scales, counts)}
