"""Joint image + target transforms: each takes and returns ``(image, target)``.

``image`` is ``(3, H, W)`` float in ``[0, 1]``; ``target["boxes"]`` is ``(M, 4)`` xyxy pixels and
moves with the image. A transform never changes the target it is given (the dataset may hold
it): it returns a new dict. ``orig_size`` is left as it was, the size of the file on disk, so
predictions can be mapped back to it.

Mean/std normalisation is not done here: the model normalises its input itself, so every
dataset, figure and notebook deals in plain ``[0, 1]`` pixels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "CPU_PRESETS",
    "PAPER_PRESET",
    "Compose",
    "RandomColorJitter",
    "RandomHorizontalFlip",
    "RandomVerticalFlip",
    "ResizeShortestSide",
    "build_transforms",
    "hflip_boxes",
    "resized_size",
    "vflip_boxes",
]

#: Ren et al. 2015: shorter side 600 px, longer side at most 1000 px.
PAPER_PRESET = (600, 1000)
#: Smaller (min_size, max_size) pairs that keep CPU training in minutes.
CPU_PRESETS = {"tiny": (128, 256), "small": (320, 512), "medium": (480, 800)}

Sample = tuple[Tensor, dict[str, Any]]


def _check_image(image: Tensor) -> None:
    if not isinstance(image, Tensor) or image.dim() != 3 or image.shape[0] != 3:
        shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise ValueError(f"image must be a (3, H, W) tensor, got {shape}")


class Compose:
    """Apply ``transforms`` in order."""

    def __init__(self, transforms: Sequence[Callable[[Tensor, dict], Sample]]):
        self.transforms = list(transforms)

    def __call__(self, image: Tensor, target: dict[str, Any]) -> Sample:
        for t in self.transforms:
            image, target = t(image, target)
        return image, target

    def __repr__(self) -> str:
        inner = ", ".join(repr(t) for t in self.transforms)
        return f"Compose([{inner}])"


def resized_size(height: int, width: int, min_size: int, max_size: int | None) -> tuple[int, int]:
    """The ``(h, w)`` after scaling the shorter side to ``min_size``, capped so the longer side
    stays <= ``max_size`` (the paper's rule)."""
    scale = min_size / min(height, width)
    if max_size is not None and max(height, width) * scale > max_size:
        scale = max_size / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


class ResizeShortestSide:
    """Scale the image so its shorter side is ``min_size``, unless the longer would exceed
    ``max_size``; then the longer side is ``max_size``. Boxes are scaled by the same factors.

    ``PAPER_PRESET = (600, 1000)`` is the paper's setting; ``CPU_PRESETS`` holds smaller ones.
    Bilinear interpolation, antialiased when shrinking. An image already at the target size is
    returned untouched.
    """

    def __init__(self, min_size: int, max_size: int | None = None):
        if not isinstance(min_size, int) or isinstance(min_size, bool) or min_size <= 0:
            raise ValueError(f"min_size={min_size!r} is invalid: expected a positive integer")
        if max_size is not None and (not isinstance(max_size, int) or max_size < min_size):
            raise ValueError(
                f"max_size={max_size!r} is invalid: expected an integer >= min_size={min_size}"
            )
        self.min_size, self.max_size = min_size, max_size

    def __call__(self, image: Tensor, target: dict[str, Any]) -> Sample:
        _check_image(image)
        h, w = image.shape[-2:]
        new_h, new_w = resized_size(h, w, self.min_size, self.max_size)
        if (new_h, new_w) == (h, w):
            return image, target
        shrinking = new_h < h or new_w < w
        resized = F.interpolate(
            image[None],
            size=(new_h, new_w),
            mode="bilinear",
            align_corners=False,
            antialias=shrinking,
        )[0].clamp_(0.0, 1.0)
        # Per-axis factors from the integer sizes, so a box on the border stays on the border.
        scale = torch.tensor(
            [new_w / w, new_h / h, new_w / w, new_h / h], dtype=target["boxes"].dtype
        )
        boxes = target["boxes"] * scale.to(target["boxes"].device)
        return resized, {**target, "boxes": boxes}

    def __repr__(self) -> str:
        return f"ResizeShortestSide(min_size={self.min_size}, max_size={self.max_size})"


def hflip_boxes(boxes: Tensor, width: int) -> Tensor:
    """Mirror ``boxes: (M, 4)`` in an image ``width`` pixels wide: ``x1' = W - x2, x2' = W - x1``."""
    return torch.stack((width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]), dim=1)


class RandomHorizontalFlip:
    """Mirror the image left-right with probability ``p``; boxes follow (``x1' = W - x2``).

    ``generator`` (a CPU ``torch.Generator``) makes the coin flips reproducible; without it the
    global RNG is used, which DataLoader seeds differently in each worker.
    """

    def __init__(self, p: float = 0.5, generator: torch.Generator | None = None):
        if not isinstance(p, (int, float)) or not 0 <= p <= 1:
            raise ValueError(f"p={p!r} is invalid: expected a probability in [0, 1]")
        self.p, self.generator = float(p), generator

    dim = -1  # the image axis mirrored: width
    flip_boxes = staticmethod(hflip_boxes)

    def __call__(self, image: Tensor, target: dict[str, Any]) -> Sample:
        _check_image(image)
        # The coin is drawn even for p in {0, 1}, so the RNG stream does not depend on p.
        if torch.rand(1, generator=self.generator).item() >= self.p:
            return image, target
        return image.flip(self.dim), {**target, "boxes": self.flip_boxes(target["boxes"], image.shape[self.dim])}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p})"


def vflip_boxes(boxes: Tensor, height: int) -> Tensor:
    """Mirror ``boxes: (M, 4)`` in an image ``height`` pixels high: ``y1' = H - y2, y2' = H - y1``."""
    return torch.stack((boxes[:, 0], height - boxes[:, 3], boxes[:, 2], height - boxes[:, 1]), dim=1)


class RandomVerticalFlip(RandomHorizontalFlip):
    """Mirror the image top-bottom with probability ``p``; boxes follow (``y1' = H - y2``).

    Only for data whose objects have no up and down: the synthetic shapes (triangles point all
    four ways), aerial or microscope images; not for photos of a world with gravity.
    ``generator`` as ``RandomHorizontalFlip``'s.
    """

    dim = -2  # height
    flip_boxes = staticmethod(vflip_boxes)


class RandomColorJitter:
    """Scale brightness, contrast and saturation each by a factor drawn from ``[1 - s, 1 + s]``.

    Photos of a few hundred scenes share their lighting; jittering it is the cheapest way to
    keep a detector trained from scratch on them from learning the lighting instead of the
    objects. Boxes do not move. ``generator`` as ``RandomHorizontalFlip``'s.
    """

    def __init__(self, strength: float = 0.2, generator: torch.Generator | None = None):
        if not isinstance(strength, (int, float)) or not 0 <= strength < 1:
            raise ValueError(f"strength={strength!r} is invalid: expected a number in [0, 1)")
        self.strength, self.generator = float(strength), generator

    def __call__(self, image: Tensor, target: dict[str, Any]) -> Sample:
        from torchvision.transforms.v2 import functional as TF

        _check_image(image)
        b, c, s = (1 + self.strength * (2 * torch.rand(3, generator=self.generator) - 1)).tolist()
        image = TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(image, b), c), s)
        return image.clamp_(0.0, 1.0), target

    def __repr__(self) -> str:
        return f"RandomColorJitter(strength={self.strength})"


def build_transforms(cfg: Any, train: bool) -> Compose:
    """The transforms for a ``DataConfig``: resize to ``(min_size, max_size)``, plus when
    ``train`` random horizontal and vertical flips with ``hflip_prob`` and ``vflip_prob`` and a
    colour jitter of ``color_jitter``."""
    steps: list[Callable] = [ResizeShortestSide(cfg.min_size, cfg.max_size)]
    if train and cfg.hflip_prob > 0:
        steps.append(RandomHorizontalFlip(cfg.hflip_prob))
    if train and getattr(cfg, "vflip_prob", 0.0) > 0:
        steps.append(RandomVerticalFlip(cfg.vflip_prob))
    if train and getattr(cfg, "color_jitter", 0.0) > 0:
        steps.append(RandomColorJitter(cfg.color_jitter))
    return Compose(steps)
