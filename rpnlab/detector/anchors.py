"""Anchors: k reference boxes (sizes x aspect ratios) repeated at every feature-map location.

An anchor is described by a *size* (the square root of its area, in pixels) and an *aspect
ratio*. By default the ratio is height / width (``ratio_convention="h/w"``, as torchvision and
py-faster-rcnn), so ratio 0.5 is a wide box; ``"w/h"`` (d2l) reads it the other way round.

For each feature level with stride ``s`` the anchor centres are ``((j + offset) * s,
(i + offset) * s)`` for row ``i`` and column ``j``. ``offset=0`` is torchvision's and
detectron2's choice (centres on the top-left pixel of each cell), ``0.5`` d2l's (cell centres).

Anchor order, the same as torchvision's: locations row by row (``i`` outer, ``j`` inner), and
within one location the ``k = len(ratios) * len(sizes)`` anchors with ratios outer, sizes inner.
The RPN head's outputs are flattened in this order, so it matters.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from rpnlab.config import AnchorConfig, anchors_per_location

__all__ = ["AnchorGenerator", "paper_base_anchors"]

# How many (feature sizes, device, dtype) entries forward() remembers; training with a few image
# shapes hits the cache, and the bound stops a stream of odd shapes from growing it forever.
_CACHE_ENTRIES = 16


class AnchorGenerator(nn.Module):
    """Anchors for one or several feature levels (FPN-style), the same for every image of a batch.

    Args:
        sizes: per level, the anchor sizes (sqrt of area, pixels); a flat tuple means one level.
        aspect_ratios: per level, the ratios; a flat tuple is used for every level.
        strides: per level, the feature stride in pixels (image pixels per feature cell).
        offset: anchor centres at ``(index + offset) * stride``; in ``[0, 1)``.
        ratio_convention: ``"h/w"`` (default: height / width) or ``"w/h"``.
        round_base: round the zero-centred base anchors to whole pixels, as torchvision does
            (with round-half-to-even, ``torch.round``). Then a 128 x 128 anchor with ratio 0.5 is
            ``[-91, -45, 91, 45]`` (182 x 90) rather than 181.02 x 90.51.
        cache: remember the anchors of recent ``(feature sizes, device, dtype)`` keys. The cached
            tensor is returned as is: do not modify it in place.

    The defaults are the paper's: sizes 128, 256, 512, ratios 0.5, 1, 2, stride 16 (VGG-16 conv5).
    """

    def __init__(
        self,
        sizes: Sequence = ((128.0, 256.0, 512.0),),
        aspect_ratios: Sequence = ((0.5, 1.0, 2.0),),
        strides: Sequence | int = (16,),
        offset: float = 0.0,
        ratio_convention: str = "h/w",
        round_base: bool = True,
        cache: bool = True,
    ):
        super().__init__()
        # AnchorConfig normalises flat tuples and validates with messages naming the argument.
        cfg = AnchorConfig(
            sizes=sizes,
            aspect_ratios=aspect_ratios,
            strides=strides,
            offset=offset,
            ratio_convention=ratio_convention,
        ).validate()
        self.sizes = cfg.sizes
        self.aspect_ratios = cfg.aspect_ratios
        self.strides = cfg.strides
        self.offset = float(cfg.offset)
        self.ratio_convention = cfg.ratio_convention
        self.round_base = bool(round_base)
        self.cache = bool(cache)
        self._base = [self._make_base_anchors(s, r) for s, r in zip(self.sizes, self.aspect_ratios)]
        self._cache: dict[tuple, Tensor] = {}

    @classmethod
    def from_config(cls, config: AnchorConfig, **kwargs) -> AnchorGenerator:
        """Build from an ``AnchorConfig``; ``kwargs`` (``round_base``, ``cache``) pass through."""
        if not isinstance(config, AnchorConfig):
            raise TypeError(f"config must be an AnchorConfig, got {type(config).__name__}")
        config.validate()
        return cls(
            sizes=config.sizes,
            aspect_ratios=config.aspect_ratios,
            strides=config.strides,
            offset=config.offset,
            ratio_convention=config.ratio_convention,
            **kwargs,
        )

    @property
    def num_levels(self) -> int:
        return len(self.sizes)

    def _make_base_anchors(self, sizes: tuple[float, ...], ratios: tuple[float, ...]) -> Tensor:
        # float32 and the same operations as torchvision, so that rounding lands on the same
        # integers even for values that sit close to .5.
        scales = torch.tensor(sizes, dtype=torch.float32)
        ratios_t = torch.tensor(ratios, dtype=torch.float32)
        # Keep area = size^2: the side along the ratio grows by sqrt(ratio), the other shrinks.
        long_side = torch.sqrt(ratios_t)
        short_side = 1 / long_side
        h_factor, w_factor = (
            (long_side, short_side) if self.ratio_convention == "h/w" else (short_side, long_side)
        )
        # (ratios, sizes) -> flattened with ratios outer, sizes inner: torchvision's order.
        ws = (w_factor[:, None] * scales[None, :]).reshape(-1)
        hs = (h_factor[:, None] * scales[None, :]).reshape(-1)
        base = torch.stack([-ws, -hs, ws, hs], dim=1) / 2
        return base.round() if self.round_base else base

    def num_anchors_per_location(self) -> list[int]:
        """``k`` for each level: ``len(sizes[l]) * len(aspect_ratios[l])``."""
        return anchors_per_location(self.sizes, self.aspect_ratios)

    def base_anchors(self, level: int = 0) -> Tensor:
        """The ``(k, 4)`` float32 anchors of ``level`` centred on (0, 0), ratios outer, sizes inner."""
        if not isinstance(level, int) or not 0 <= level < self.num_levels:
            raise ValueError(f"level must be an int in [0, {self.num_levels}), got {level!r}")
        return self._base[level].clone()

    def _check_feature_sizes(self, feature_sizes) -> tuple[tuple[int, int], ...]:
        try:
            sizes = tuple((int(h), int(w)) for h, w in feature_sizes)
        except (TypeError, ValueError):
            raise TypeError(
                f"feature_sizes must be a sequence of (H, W) pairs, one per level, got {feature_sizes!r}"
            ) from None
        if len(sizes) != self.num_levels:
            raise ValueError(
                f"feature_sizes has {len(sizes)} level(s) but the generator has {self.num_levels}: {sizes}"
            )
        if any(h <= 0 or w <= 0 for h, w in sizes):
            raise ValueError(f"feature_sizes must be positive (H, W) pairs, got {sizes}")
        return sizes

    def num_anchors_per_level(self, feature_sizes) -> list[int]:
        """``H_l * W_l * k_l`` for each level."""
        sizes = self._check_feature_sizes(feature_sizes)
        return [h * w * k for (h, w), k in zip(sizes, self.num_anchors_per_location())]

    def grid_anchors(
        self, feature_sizes, device=None, dtype: torch.dtype = torch.float32
    ) -> list[Tensor]:
        """Anchors of each level: a list of ``(H_l * W_l * k_l, 4)``, locations row-major, then k."""
        sizes = self._check_feature_sizes(feature_sizes)
        out = []
        for (h, w), stride, base in zip(sizes, self.strides, self._base):
            base = base.to(device=device, dtype=dtype)
            xs = (torch.arange(w, device=base.device, dtype=dtype) + self.offset) * stride
            ys = (torch.arange(h, device=base.device, dtype=dtype) + self.offset) * stride
            cy, cx = torch.meshgrid(ys, xs, indexing="ij")  # (H, W) each, row-major
            centres = torch.stack([cx, cy, cx, cy], dim=-1).reshape(-1, 1, 4)
            out.append((centres + base[None]).reshape(-1, 4))  # (H*W, k, 4) -> (H*W*k, 4)
        return out

    def forward(self, feature_sizes, device=None, dtype: torch.dtype = torch.float32) -> Tensor:
        """All levels' anchors concatenated: ``(A, 4)`` with ``A = sum_l H_l * W_l * k_l``.

        Args:
            feature_sizes: one ``(H_l, W_l)`` per level, e.g. ``[f.shape[-2:] for f in features]``.
            device, dtype: of the returned anchors (default CPU, float32).
        """
        sizes = self._check_feature_sizes(feature_sizes)
        key = (sizes, torch.device(device) if device is not None else torch.device("cpu"), dtype)
        if self.cache and key in self._cache:
            return self._cache[key]
        anchors = torch.cat(self.grid_anchors(sizes, device, dtype), dim=0)
        if self.cache:
            if len(self._cache) >= _CACHE_ENTRIES:
                self._cache.pop(next(iter(self._cache)))  # drop the oldest entry
            self._cache[key] = anchors
        return anchors

    def extra_repr(self) -> str:
        return (
            f"sizes={self.sizes}, aspect_ratios={self.aspect_ratios}, strides={self.strides}, "
            f"offset={self.offset}, ratio_convention={self.ratio_convention!r}, "
            f"round_base={self.round_base}"
        )


def paper_base_anchors() -> Tensor:
    """The paper's 9 anchors centred on 0: areas 128^2, 256^2, 512^2 x ratios 0.5, 1, 2 -> ``(9, 4)``.

    Made by ``AnchorGenerator()`` with its defaults, so they are rounded like torchvision's.
    py-faster-rcnn's ``generate_anchors`` gives slightly different numbers (its boxes start from a
    16 x 16 cell centred on 7.5 and use inclusive ``+ 1`` widths), e.g. ``[-84, -40, 99, 55]``.
    """
    return AnchorGenerator().base_anchors(0)
