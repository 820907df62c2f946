"""Reading image files into ``(3, H, W)`` float RGB tensors, whatever the file holds.

Real datasets mix greyscale, palette, RGBA and CMYK files, and sometimes a PNG named ``.jpg``.
PIL recognises the format from the file's first bytes, not from its name, so opening by content
is what ``Image.open`` does already; every mode is then converted to 8-bit RGB.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

__all__ = ["load_annotated_image", "load_image", "pil_to_rgb", "pil_to_tensor", "read_image_size"]


def pil_to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to ``"RGB"``; alpha is dropped (as torchvision's datasets do)."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16"):
        # 16-bit greyscale: PIL's own conversion would clip at 255, so rescale the full range.
        grey = (np.asarray(image, dtype=np.float64) / 257.0).round().clip(0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")  # uint8 2-D -> mode "L"
    if image.mode in ("P", "PA"):
        # Palette transparency is only understood through RGBA; going straight to RGB warns.
        image = image.convert("RGBA")
    return image.convert("RGB")


def pil_to_tensor(image: Image.Image) -> Tensor:
    """An RGB PIL image -> ``(3, H, W)`` float32 in ``[0, 1]``."""
    array = np.array(pil_to_rgb(image), dtype=np.uint8)  # (H, W, 3), a copy torch may own
    return torch.from_numpy(array).permute(2, 0, 1).float().div_(255.0)


def load_image(path: str | os.PathLike) -> Tensor:
    """Read an image file -> ``(3, H, W)`` float32 RGB in ``[0, 1]``.

    Raises ``FileNotFoundError`` naming the path when it is missing and ``ValueError`` naming
    it when the bytes are not an image PIL can decode.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as image:
            return pil_to_tensor(image)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable image ({exc})") from exc


def read_image_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(height, width)`` of an image file, read from its header without decoding the pixels."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as image:
            width, height = image.size
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"{path}: not a readable image ({exc})") from exc
    return height, width


def load_annotated_image(path: str | os.PathLike, target: dict, annotation_source: str, transforms=None):
    """Read the image at ``path`` for ``target`` and apply ``transforms`` -> ``(image, target)``.

    Raises ``ValueError`` naming the file when the image's size differs from the annotated
    ``target["orig_size"]`` (the boxes would be drawn on the wrong pixels); ``annotation_source``
    says where that size came from, for the message.
    """
    image = load_image(path)
    if tuple(image.shape[1:]) != tuple(target["orig_size"]):
        h, w = target["orig_size"]
        raise ValueError(f"{path}: image is {image.shape[2]}x{image.shape[1]} but {annotation_source} says {w}x{h}")
    if transforms is not None:
        image, target = transforms(image, target)
    return image, target
