"""Reading image files into ``(3, H, W)`` float RGB tensors, whatever the file holds.

Real datasets mix greyscale, palette, RGBA and CMYK files, and sometimes a PNG named ``.jpg``.
PIL recognises the format from the file's first bytes, not from its name, so opening by content
is what ``Image.open`` does already; every mode is then converted to 8-bit RGB.

Transparent pixels (RGBA, LA, palette transparency: cut-out product photos) are composited onto
white, as a viewer shows them; dropping the alpha channel would instead reveal whatever colour the
invisible pixels happen to hold, often black.

Phone photos are 3000 x 4000 px and the detector sees them at a few hundred: ``load_image(path,
min_size, max_size)`` asks the JPEG decoder for a reduced image (``Image.draft``: the DCT is
decoded at 1/2, 1/4 or 1/8 scale, several times faster and a fraction of the memory) that is
still at least as large as the resize will make it, so the picture the model sees is the same
up to resampling. Other formats have no reduced decode: a ``ResizedImageCache`` (``imagecache``)
keeps the resized image of a large file on disk, so it is decoded once, not once per epoch.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from rpnlab.data.imagecache import ResizedImageCache, resize_like_transform
from rpnlab.data.transforms import resized_size

__all__ = [
    "decode_size_hint",
    "load_annotated_image",
    "load_image",
    "pil_to_rgb",
    "pil_to_tensor",
    "read_image_size",
]

WHITE = (255, 255, 255)


def pil_to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to ``"RGB"``; transparent pixels are composited onto white."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "La", "RGBa", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (*WHITE, 255)), rgba).convert("RGB")
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


def _reduced_request(width: int, height: int, min_size: int, max_size: int | None) -> tuple[int, int]:
    """The ``(w, h)`` the resize to ``(min_size, max_size)`` will give (the decode must not go below it)."""
    scale = min_size / min(height, width)
    if max_size is not None and max(height, width) * scale > max_size:
        scale = max_size / max(height, width)
    return max(1, math.ceil(width * scale)), max(1, math.ceil(height * scale))


def load_image(
    path: str | os.PathLike,
    min_size: int | None = None,
    max_size: int | None = None,
    *,
    with_file_size: bool = False,
    cache: ResizedImageCache | None = None,
):
    """Read an image file -> ``(3, H, W)`` float32 RGB in ``[0, 1]``.

    With ``min_size`` (and ``max_size``), a JPEG larger than needed for that resize is decoded at
    reduced scale (``Image.draft``; 1/2, 1/4 or 1/8, never below the resized size); other formats
    are decoded in full. With a ``cache`` too (``ResizedImageCache``), a file at least twice the
    resized size on both sides is returned already resized to it, from the cache when it holds
    the file's current version, else decoded, resized and stored there. ``with_file_size=True``
    returns ``(image, (H, W) of the file)``, so boxes in the file's pixels can be scaled to the
    decoded ones.

    Raises ``FileNotFoundError`` naming the path when it is missing and ``ValueError`` naming
    it when the bytes are not an image PIL can decode.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    target = None
    try:
        with Image.open(path) as image:
            width, height = image.size
            if min_size is not None and cache is not None:
                size = resized_size(height, width, min_size, max_size)
                if size[0] * 2 <= height and size[1] * 2 <= width:
                    target = size
                    cached = cache.get(path, target)
                    if cached is not None:
                        return (cached, (height, width)) if with_file_size else cached
            if min_size is not None and image.format == "JPEG":
                request = _reduced_request(width, height, min_size, max_size)
                if request[0] * 2 <= width and request[1] * 2 <= height:
                    image.draft("RGB", request)
            if target is None:
                tensor = pil_to_tensor(image)
            else:  # resized in uint8: no float copy of the full-size image (4 bytes a value)
                pixels = torch.from_numpy(np.array(pil_to_rgb(image), dtype=np.uint8)).permute(2, 0, 1)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable image ({exc})") from exc
    if target is not None:
        del image  # PIL's full-size buffer, before the resize allocates
        pixels = resize_like_transform(pixels, target)
        cache.put(path, target, pixels)
        tensor = pixels.float().div_(255.0)
    return (tensor, (height, width)) if with_file_size else tensor


def decode_size_hint(transforms) -> tuple[int, int | None] | None:
    """``(min_size, max_size)`` of the resize that ``transforms`` starts with, else ``None``.

    A dataset reads its images at reduced scale only when the first transform shrinks them
    anyway (a later random crop or flip does not change what resolution is needed).
    """
    from rpnlab.data.transforms import Compose, ResizeShortestSide

    first = transforms.transforms[0] if isinstance(transforms, Compose) and transforms.transforms else transforms
    if isinstance(first, ResizeShortestSide):
        return first.min_size, first.max_size
    return None


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


def load_annotated_image(path: str | os.PathLike, target: dict, annotation_source: str, transforms=None,
                         cache: ResizedImageCache | None = None):
    """Read the image at ``path`` for ``target`` and apply ``transforms`` -> ``(image, target)``.

    Raises ``ValueError`` naming the file when the image's size differs from the annotated
    ``target["orig_size"]`` (the boxes would be drawn on the wrong pixels); ``annotation_source``
    says where that size came from, for the message. When ``transforms`` starts with a resize,
    a large JPEG is decoded at reduced scale (``load_image``) and the boxes are scaled with it;
    ``orig_size`` stays the file's size. ``cache``: a ``ResizedImageCache`` for large files
    (``load_image``).
    """
    hint = decode_size_hint(transforms)
    image, file_size = load_image(path, *(hint or (None, None)), with_file_size=True, cache=cache)
    if tuple(file_size) != tuple(target["orig_size"]):
        h, w = target["orig_size"]
        raise ValueError(f"{path}: image is {file_size[1]}x{file_size[0]} but {annotation_source} says {w}x{h}")
    if tuple(image.shape[1:]) != tuple(file_size):  # decoded at reduced scale: boxes follow
        sy, sx = image.shape[1] / file_size[0], image.shape[2] / file_size[1]
        target = {**target, "boxes": target["boxes"] * torch.tensor([sx, sy, sx, sy], dtype=target["boxes"].dtype)}
    if transforms is not None:
        image, target = transforms(image, target)
    return image, target
