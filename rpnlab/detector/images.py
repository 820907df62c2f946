"""Batching images of different sizes: zero-pad them into one tensor and remember the true sizes.

The backbone needs one ``(B, 3, Hp, Wp)`` tensor; anchors and proposals need each image's real
``(h, w)`` (to clip boxes and to ignore padding). Padding goes to the bottom and right, so pixel
coordinates are unchanged, and up to a multiple of ``size_divisible`` (the backbone's total
stride), so feature-map cells line up with the same image pixels in every image of the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["ImageBatch", "pad_images"]


@dataclass
class ImageBatch:
    """Padded images and their true sizes.

    tensors: ``(B, 3, Hp, Wp)``, zeros outside each image; image_sizes: ``[(h_i, w_i)]``, the
    part of ``tensors[i]`` that is image (top-left corner).
    """

    tensors: Tensor
    image_sizes: list[tuple[int, int]]

    def __post_init__(self) -> None:
        if self.tensors.dim() != 4 or self.tensors.shape[0] != len(self.image_sizes):
            raise ValueError(
                f"tensors must be (B, C, H, W) with B = len(image_sizes) = {len(self.image_sizes)}, "
                f"got {tuple(self.tensors.shape)}"
            )

    def __len__(self) -> int:
        return len(self.image_sizes)

    @property
    def device(self) -> torch.device:
        return self.tensors.device

    def to(self, device: torch.device | str, non_blocking: bool = False) -> ImageBatch:
        """The same batch on ``device`` (sizes are plain Python ints and stay on the host)."""
        return ImageBatch(
            self.tensors.to(device, non_blocking=non_blocking), list(self.image_sizes)
        )

    def pin_memory(self) -> ImageBatch:
        """Called by DataLoader(pin_memory=True) for faster host-to-GPU copies."""
        return ImageBatch(self.tensors.pin_memory(), list(self.image_sizes))

    def pixel_mask(self) -> Tensor:
        """``(B, Hp, Wp)`` bool, True on real image pixels and False on padding."""
        b, _, hp, wp = self.tensors.shape
        rows = torch.arange(hp, device=self.device)
        cols = torch.arange(wp, device=self.device)
        sizes = torch.tensor(self.image_sizes, device=self.device).reshape(b, 2)
        return (rows[None, :, None] < sizes[:, 0, None, None]) & (
            cols[None, None, :] < sizes[:, 1, None, None]
        )


def pad_images(images: Sequence[Tensor], size_divisible: int = 16) -> ImageBatch:
    """Stack ``images: [(3, H_i, W_i)]`` into ``(B, 3, Hp, Wp)`` with zero padding.

    ``Hp`` and ``Wp`` are the largest height and width rounded up to a multiple of
    ``size_divisible``. All images must share dtype, device and channel count.
    """
    if not isinstance(size_divisible, int) or size_divisible <= 0:
        raise ValueError(
            f"size_divisible={size_divisible!r} is invalid: expected a positive integer"
        )
    if len(images) == 0:
        raise ValueError("images is empty: expected at least one (3, H, W) tensor")
    for i, image in enumerate(images):
        if not isinstance(image, Tensor) or image.dim() != 3:
            shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
            raise ValueError(f"images[{i}] must be a (C, H, W) tensor, got {shape}")
        if image.shape[0] != images[0].shape[0] or image.dtype != images[0].dtype:
            raise ValueError(
                f"images[{i}] has {image.shape[0]} channels and dtype {image.dtype}; "
                f"images[0] has {images[0].shape[0]} and {images[0].dtype}"
            )
    max_h = max(image.shape[1] for image in images)
    max_w = max(image.shape[2] for image in images)
    hp = -(-max_h // size_divisible) * size_divisible  # ceiling division
    wp = -(-max_w // size_divisible) * size_divisible
    batch = images[0].new_zeros((len(images), images[0].shape[0], hp, wp))
    for slot, image in zip(batch, images):
        slot[:, : image.shape[1], : image.shape[2]].copy_(image)
    return ImageBatch(batch, [(int(image.shape[1]), int(image.shape[2])) for image in images])
