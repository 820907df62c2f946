"""SyntheticShapes: the embedded detection dataset, generated the same way on every machine.

Each image is drawn from its own random stream, seeded by ``(seed, split, index)`` alone, so an
image does not depend on how many images come before it, splits never share an image, and the
first 10 images of a 600-image split are the 10 images of a 10-image split.

How one image is drawn (``render_image``):

1. **Background.** A smooth colour field (random colours on a coarse 3x3..5x5 grid, bilinearly
   interpolated), sometimes with faint stripes, then 1-6 thin straight lines of random colour:
   clutter that is *not* an object class, so "has an edge" is not enough to be an object.
2. **Objects.** 0-6 objects (about 7% of images have none). Each has a class (rectangle,
   ellipse, triangle), a size ``sqrt(w * h)`` log-uniform in ``[0.094, 0.6] x image_size``
   (12-77 px at 128), an aspect ratio ``h / w`` log-uniform in ``[1/3, 3]``, a position inside
   the image and a colour that contrasts with the background under it and with the objects it
   overlaps, lightly shaded.
3. **Occlusion.** Objects are painted in order, later ones over earlier ones. Walking from the
   top-most object down, an object whose visible part is under 30% of its own area (more than
   70% occluded) is removed before anything is painted, so no unannotated fragment is left.
   A kept object's box is its *full* extent, occluded parts included (as in VOC and COCO).
4. **Finish.** Sometimes a line or two over the objects, then uniform pixel noise; quantised
   to ``uint8``.

Why the pixels are identical everywhere: the only random draws are ``Generator.random()`` on a
PCG64 stream seeded through ``SeedSequence`` (both fixed by NumPy's stability policy), shapes
are rasterised here with plain comparisons at pixel centres (no anti-aliasing library), and
pixel values use only ``+ - * /`` on float64, which IEEE 754 rounds the same on every CPU. The few
``exp``/``sqrt`` calls decide integer box sizes, far from any rounding boundary.

The dataset caches its images (``uint8``) and annotations in ``<root>/<split>-<hash>.pt``,
where the hash covers every parameter and the generator version.

Longer than 500 lines because the shape renderer, the scene sampler and the on-disk cache of the
embedded dataset belong together.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

__all__ = [
    "DEFAULT_NUM_IMAGES",
    "GENERATOR_VERSION",
    "SHAPE_CLASSES",
    "SPLITS",
    "SyntheticImage",
    "SyntheticShapes",
    "default_cache_root",
    "render_image",
]

#: Foreground classes; label ``i + 1`` is ``SHAPE_CLASSES[i]`` (0 is background).
SHAPE_CLASSES = ("rectangle", "ellipse", "triangle")
SPLITS = ("train", "val", "test")
DEFAULT_NUM_IMAGES = {"train": 600, "val": 150, "test": 150}
#: Bumped whenever a change to the drawing code changes any pixel, so old caches are not reused.
GENERATOR_VERSION = 1

_SALT = 0x52504E4C  # "RPNL": keeps these streams apart from other users of the same small seeds
_SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
_COUNT_WEIGHTS = (0.07, 0.18, 0.22, 0.20, 0.15, 0.10, 0.08)  # P(0..6 objects)
_MIN_SIZE, _MAX_SIZE = 12 / 128, 0.6  # object size sqrt(w*h) as a fraction of the image side
_MAX_RATIO = 3.0  # h / w in [1/3, 3]
_MIN_SIDE = 4  # px: a shape thinner than this is no longer recognisable
_MIN_VISIBLE = 0.3  # drop an object more than 70% occluded
_MIN_CONTRAST = 0.4  # max channel difference to the background under the object
_MIN_OBJECT_CONTRAST = 0.25  # ... and to any earlier object it overlaps


@dataclass
class SyntheticImage:
    """One rendered image and its annotation (NumPy, before any tensor conversion).

    image: ``(3, S, S)`` uint8 RGB; boxes: ``(M, 4)`` float32 xyxy pixels (full extent);
    labels: ``(M,)`` int64 in ``1..C``; visible: ``(M,)`` float32, fraction of each object's
    pixels left visible by the objects drawn over it.
    """

    image: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    visible: np.ndarray


def _check_split(split: str) -> None:
    if split not in _SPLIT_IDS:
        raise ValueError(
            f"split={split!r} is invalid: expected one of {', '.join(map(repr, SPLITS))}"
        )


def _check_int(name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name}={value!r} is invalid: expected an integer >= {minimum}")


def _image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    entropy = [_SALT, int(seed), _SPLIT_IDS[split], int(index)]
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy)))


class _Draws:
    """Uniform draws only: ``Generator.random`` is the one sampler whose stream NumPy never changes."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng

    def uniform(self, low: float = 0.0, high: float = 1.0, size: Any = None) -> Any:
        return low + (high - low) * self.rng.random(size)

    def integer(self, low: int, high: int) -> int:
        """An integer in ``[low, high]``, both ends included."""
        return low + min(int(self.rng.random() * (high - low + 1)), high - low)

    def log_uniform(self, low: float, high: float) -> float:
        return math.exp(math.log(low) + self.rng.random() * (math.log(high) - math.log(low)))

    def choice(self, weights: tuple[float, ...]) -> int:
        u, total = self.rng.random() * sum(weights), 0.0
        for i, w in enumerate(weights):
            total += w
            if u < total:
                return i
        return len(weights) - 1


# ---------------------------------------------------------------------------------------------
# Background and clutter. Arrays are (H, W, 3) float64 in [0, 1] until the final quantisation.


def _smooth_background(draw: _Draws, size: int) -> np.ndarray:
    """Random colours on a coarse ``(g+1) x (g+1)`` grid, bilinearly interpolated -> ``(S, S, 3)``."""
    g = draw.integer(2, 4)
    base = draw.uniform(0.1, 0.9, 3)
    grid = np.clip(base + draw.uniform(-0.3, 0.3, (g + 1, g + 1, 3)), 0.0, 1.0)
    t = (np.arange(size) + 0.5) * (g / size)  # pixel centres in grid units
    i0 = np.minimum(t.astype(np.int64), g - 1)
    f = t - i0
    fy, fx = f[:, None, None], f[None, :, None]
    top = grid[i0][:, i0] * (1 - fx) + grid[i0][:, i0 + 1] * fx
    bottom = grid[i0 + 1][:, i0] * (1 - fx) + grid[i0 + 1][:, i0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def _add_stripes(draw: _Draws, canvas: np.ndarray) -> None:
    """Faint stripes (integer arithmetic, so exact): a texture the detector must learn to ignore."""
    size = canvas.shape[0]
    period = draw.integer(3, 8)
    slope = draw.integer(-1, 1)
    amplitude = draw.uniform(0.03, 0.08)
    y, x = np.mgrid[0:size, 0:size]
    along = x + slope * y if draw.uniform() < 0.5 else y + slope * x
    canvas += (((along // period) % 2) - 0.5)[..., None] * amplitude


def _draw_line(draw: _Draws, canvas: np.ndarray) -> None:
    """A straight segment 1-2 px wide: pixels whose centre lies within half the width of it."""
    size = canvas.shape[0]
    ax, ay, bx, by = draw.uniform(-0.1 * size, 1.1 * size, 4)
    half_width = (0.5, 0.75, 1.0)[draw.integer(0, 2)]
    colour = draw.uniform(0.0, 1.0, 3)
    y, x = np.mgrid[0:size, 0:size] + 0.5
    dx, dy = bx - ax, by - ay
    t = np.clip(((x - ax) * dx + (y - ay) * dy) / max(dx * dx + dy * dy, 1e-12), 0.0, 1.0)
    ex, ey = x - (ax + t * dx), y - (ay + t * dy)
    canvas[ex * ex + ey * ey <= half_width * half_width] = colour


# ---------------------------------------------------------------------------------------------
# Objects: each is a boolean mask over its own box window (h, w), drawn at pixel centres.


def _rectangle_mask(h: int, w: int, draw: _Draws) -> np.ndarray:
    return np.ones((h, w), dtype=bool)


def _ellipse_mask(h: int, w: int, draw: _Draws) -> np.ndarray:
    y = (np.arange(h)[:, None] + 0.5 - h / 2) / (h / 2)
    x = (np.arange(w)[None, :] + 0.5 - w / 2) / (w / 2)
    return x * x + y * y <= 1.0


def _triangle_mask(h: int, w: int, draw: _Draws) -> np.ndarray:
    """Apex on one side of the box (at a random point along it), base on the opposite side."""
    side, t = draw.integer(0, 3), draw.uniform(0.0, 1.0)
    if side == 0:  # apex on top
        pts = [(t * w, 0.0), (0.0, h), (w, h)]
    elif side == 1:  # apex at the bottom
        pts = [(t * w, h), (0.0, 0.0), (w, 0.0)]
    elif side == 2:  # apex on the left
        pts = [(0.0, t * h), (w, 0.0), (w, h)]
    else:  # apex on the right
        pts = [(w, t * h), (0.0, 0.0), (0.0, h)]
    y, x = np.mgrid[0:h, 0:w] + 0.5
    # Signs of the three edge functions: all equal <=> inside (either winding order).
    edges = [
        (bx - ax) * (y - ay) - (by - ay) * (x - ax)
        for (ax, ay), (bx, by) in zip(pts, pts[1:] + pts[:1])
    ]
    return ((edges[0] >= 0) & (edges[1] >= 0) & (edges[2] >= 0)) | (
        (edges[0] <= 0) & (edges[1] <= 0) & (edges[2] <= 0)
    )


_MASKS: tuple[Callable[[int, int, _Draws], np.ndarray], ...] = (
    _rectangle_mask,
    _ellipse_mask,
    _triangle_mask,
)


@dataclass
class _Object:
    label: int  # 1..C
    y1: int
    x1: int
    mask: np.ndarray  # (h, w) bool over the box window
    base: np.ndarray  # (3,) colour before shading
    colour: np.ndarray  # (h, w, 3) shaded colour


def _contrasting_colour(draw: _Draws, under: np.ndarray, others: list[np.ndarray]) -> np.ndarray:
    """A random colour far enough from ``under`` (3,) and from each colour in ``others``."""
    for _ in range(8):
        colour = draw.uniform(0.0, 1.0, 3)
        if np.abs(colour - under).max() >= _MIN_CONTRAST and all(
            np.abs(colour - o).max() >= _MIN_OBJECT_CONTRAST for o in others
        ):
            return colour
    # Rare fallback: the channel-wise opposite extreme is at least 0.5 away from the background.
    return np.where(under > 0.5, 0.05, 0.95)


def _sample_object(
    draw: _Draws, size: int, background: np.ndarray, placed: list[_Object]
) -> _Object | None:
    label = draw.integer(1, len(SHAPE_CLASSES))
    s = draw.log_uniform(_MIN_SIZE * size, _MAX_SIZE * size)
    ratio = draw.log_uniform(1 / _MAX_RATIO, _MAX_RATIO)  # h / w
    max_side = size - 2
    w = min(max(round(s / math.sqrt(ratio)), _MIN_SIDE), max_side)
    h = min(max(round(s * math.sqrt(ratio)), _MIN_SIDE), max_side)
    x1, y1 = draw.integer(0, size - w), draw.integer(0, size - h)
    mask = _MASKS[label - 1](h, w, draw)
    if not mask.any():
        return None
    overlapping = [
        o.base
        for o in placed
        if o.x1 < x1 + w
        and x1 < o.x1 + o.mask.shape[1]
        and o.y1 < y1 + h
        and y1 < o.y1 + o.mask.shape[0]
    ]
    colour = _contrasting_colour(draw, background[y1 + h // 2, x1 + w // 2], overlapping)
    # A gentle linear shading across the object, so it is not a flat colour patch.
    gy, gx = draw.uniform(-0.08, 0.08, 2)
    yy = (np.arange(h)[:, None, None] + 0.5) / h - 0.5
    xx = (np.arange(w)[None, :, None] + 0.5) / w - 0.5
    shaded = colour + gy * yy + gx * xx
    return _Object(label, y1, x1, mask, colour, shaded)


def _tight_box(obj: _Object) -> tuple[float, float, float, float]:
    """The extent of the drawn mask (x1, y1, x2, y2), x2/y2 one past the last pixel."""
    rows = np.flatnonzero(obj.mask.any(axis=1))
    cols = np.flatnonzero(obj.mask.any(axis=0))
    return (obj.x1 + cols[0], obj.y1 + rows[0], obj.x1 + cols[-1] + 1, obj.y1 + rows[-1] + 1)


def _drop_occluded(objects: list[_Object], size: int) -> tuple[list[_Object], list[float]]:
    """Keep objects at least ``_MIN_VISIBLE`` visible, walking from the top-most object down.

    Visibility of an object depends only on the kept objects above it, so one pass is exact.
    """
    covered = np.zeros((size, size), dtype=bool)
    kept, visible = [], []
    for obj in reversed(objects):
        h, w = obj.mask.shape
        window = covered[obj.y1 : obj.y1 + h, obj.x1 : obj.x1 + w]
        fraction = int((obj.mask & ~window).sum()) / int(obj.mask.sum())
        if fraction >= _MIN_VISIBLE:
            kept.append(obj)
            visible.append(fraction)
            window |= obj.mask
    return kept[::-1], visible[::-1]


def render_image(seed: int, split: str, index: int, image_size: int = 128) -> SyntheticImage:
    """Draw image ``index`` of ``split`` for ``seed``; see the module docstring for the recipe."""
    _check_split(split)
    _check_int("image_size", image_size, 32)
    _check_int("index", index, 0)
    draw = _Draws(_image_rng(seed, split, index))
    size = image_size

    background = _smooth_background(draw, size)
    canvas = background.copy()
    if draw.uniform() < 0.3:
        _add_stripes(draw, canvas)
    for _ in range(draw.integer(1, 6)):
        _draw_line(draw, canvas)

    objects: list[_Object] = []
    for _ in range(draw.choice(_COUNT_WEIGHTS)):
        obj = _sample_object(draw, size, background, objects)
        if obj is not None:
            objects.append(obj)
    objects, visible = _drop_occluded(objects, size)
    for obj in objects:
        h, w = obj.mask.shape
        window = canvas[obj.y1 : obj.y1 + h, obj.x1 : obj.x1 + w]
        window[obj.mask] = obj.colour[obj.mask]

    if draw.uniform() < 0.3:
        for _ in range(draw.integer(1, 2)):
            _draw_line(draw, canvas)
    amplitude = draw.uniform(0.02, 0.08)
    canvas += draw.uniform(-amplitude, amplitude, canvas.shape)
    pixels = np.floor(np.clip(canvas, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)

    boxes = np.array([_tight_box(o) for o in objects], dtype=np.float32).reshape(-1, 4)
    labels = np.array([o.label for o in objects], dtype=np.int64)
    return SyntheticImage(
        image=np.ascontiguousarray(pixels.transpose(2, 0, 1)),
        boxes=boxes,
        labels=labels,
        visible=np.array(visible, dtype=np.float32),
    )


# ---------------------------------------------------------------------------------------------
# The dataset: generation, cache, samples.


def default_cache_root() -> Path:
    """``<repo>/data/synthetic`` inside a source checkout, else ``~/.cache/rpnlab/synthetic``."""
    repo = Path(__file__).resolve().parents[2]
    if (repo / "pyproject.toml").is_file() and (repo / "data").is_dir():
        return repo / "data" / "synthetic"
    return Path.home() / ".cache" / "rpnlab" / "synthetic"


def _generate(params: dict) -> dict[str, Tensor]:
    """All images and annotations of one split, packed as the cache stores them."""
    rendered = [
        render_image(params["seed"], params["split"], i, params["image_size"])
        for i in range(params["num_images"])
    ]
    size = params["image_size"]
    images = (
        np.stack([r.image for r in rendered])
        if rendered
        else np.zeros((0, 3, size, size), np.uint8)
    )
    return {
        "images": torch.from_numpy(images),
        "boxes": torch.from_numpy(
            np.concatenate([r.boxes for r in rendered] + [np.zeros((0, 4), np.float32)])
        ),
        "labels": torch.from_numpy(
            np.concatenate([r.labels for r in rendered] + [np.zeros(0, np.int64)])
        ),
        "visible": torch.from_numpy(
            np.concatenate([r.visible for r in rendered] + [np.zeros(0, np.float32)])
        ),
        "counts": torch.tensor([len(r.labels) for r in rendered], dtype=torch.int64),
    }


def _save_atomic(data: dict, path: Path) -> None:
    """Write to a temporary file next to ``path``, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(data, f)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a cache is fine to share
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class SyntheticShapes(Dataset):
    """The embedded detection dataset: rectangles, ellipses and triangles on cluttered backgrounds.

    Args:
        split: ``"train"``, ``"val"`` or ``"test"``; each split has its own random streams.
        num_images: images in the split (default 600 / 150 / 150, as ``DataConfig``).
        image_size: side of the square images in pixels (>= 32).
        seed: the dataset seed; the same seed gives the same pixels on every machine.
        root: cache folder (default ``default_cache_root()``).
        cache: load from / save to ``<root>/<split>-<hash>.pt``; ``False`` keeps it in memory only.
        transforms: callable ``(image, target) -> (image, target)``, e.g. ``build_transforms``.

    A sample is ``(image, target)``: image ``(3, S, S)`` float32 RGB in ``[0, 1]``; target a dict
    with ``boxes (M, 4)`` float32 xyxy, ``labels (M,)`` int64 in ``1..3``, ``difficult (M,)``
    bool (all False), ``image_id`` (the index) and ``orig_size`` ``(S, S)``.
    """

    classes = SHAPE_CLASSES

    def __init__(
        self,
        split: str = "train",
        num_images: int | None = None,
        image_size: int = 128,
        seed: int = 0,
        root: str | os.PathLike | None = None,
        cache: bool = True,
        transforms: Callable | None = None,
    ):
        _check_split(split)
        num_images = DEFAULT_NUM_IMAGES[split] if num_images is None else num_images
        _check_int("num_images", num_images, 0)
        _check_int("image_size", image_size, 32)
        _check_int("seed", seed, 0)
        self.split = split
        self.image_size = int(image_size)
        self.seed = int(seed)
        self.transforms = transforms
        self.params = {
            "generator": GENERATOR_VERSION,
            "split": split,
            "num_images": int(num_images),
            "image_size": self.image_size,
            "seed": self.seed,
        }
        self.root = Path(root) if root is not None else default_cache_root()
        self.cache_path = self.root / f"{split}-{self._params_hash()}.pt" if cache else None
        data = self._load_or_generate()
        self._images: Tensor = data["images"]  # (N, 3, S, S) uint8
        self._counts: Tensor = data["counts"]
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), self._counts.cumsum(0)])
        self._offsets = offsets.tolist()
        self._boxes: Tensor = data["boxes"]  # (sum M, 4), all images' boxes one after another
        self._labels: Tensor = data["labels"]
        self._visible: Tensor = data["visible"]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def _params_hash(self) -> str:
        text = json.dumps(self.params, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def _load_or_generate(self) -> dict:
        path = self.cache_path
        if path is not None and path.is_file():
            try:
                data = torch.load(path, map_location="cpu", weights_only=True)
                if data.get("params") == self.params:
                    return data
                warnings.warn(
                    f"{path} holds other parameters than {self.params}; regenerating", stacklevel=3
                )
            except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, AttributeError) as exc:
                # A truncated or foreign file: regenerate rather than fail.
                warnings.warn(f"could not read cache {path} ({exc}); regenerating", stacklevel=3)
        data = _generate(self.params)
        if path is not None:
            try:
                _save_atomic({**data, "params": self.params}, path)
            except OSError as exc:  # read-only checkout, full disk: still usable from memory
                warnings.warn(
                    f"could not write cache {path} ({exc}); keeping the data in memory",
                    stacklevel=3,
                )
        return data

    def __len__(self) -> int:
        return self._images.shape[0]

    def _index(self, index: int) -> int:
        n = len(self)
        if not isinstance(index, (int, np.integer)) or isinstance(index, bool):
            raise TypeError(f"index must be an int, got {type(index).__name__}")
        if not -n <= index < n:
            raise IndexError(f"index {index} is out of range for {n} images")
        return int(index) % n

    def get_target(self, index: int) -> dict[str, Any]:
        """The annotation of image ``index`` without loading the image or applying transforms."""
        i = self._index(index)
        start, stop = self._offsets[i], self._offsets[i + 1]
        return {
            "boxes": self._boxes[start:stop].clone(),
            "labels": self._labels[start:stop].clone(),
            "difficult": torch.zeros(stop - start, dtype=torch.bool),
            "image_id": i,
            "orig_size": (self.image_size, self.image_size),
        }

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Any]]:
        target = self.get_target(index)
        image = self._images[target["image_id"]].float().div_(255.0)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def visible_fractions(self, index: int) -> Tensor:
        """``(M,)`` the visible fraction of each object of image ``index`` (1 = not occluded)."""
        i = self._index(index)
        return self._visible[self._offsets[i] : self._offsets[i + 1]].clone()

    def describe(self) -> dict[str, Any]:
        """Summary statistics for a first look (notebook 00): counts, sizes, aspect ratios.

        Sizes are ``sqrt(w * h)`` of the full boxes in pixels, ratios ``h / w``.
        """
        boxes, labels, counts = self._boxes, self._labels, self._counts
        w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        sizes, ratios = (w * h).sqrt(), h / w

        def span(x: Tensor) -> dict[str, float]:
            if x.numel() == 0:
                return {"min": float("nan"), "median": float("nan"), "max": float("nan")}
            return {"min": x.min().item(), "median": x.median().item(), "max": x.max().item()}

        return {
            "split": self.split,
            "num_images": len(self),
            "image_size": self.image_size,
            "seed": self.seed,
            "num_objects": int(labels.numel()),
            "objects_per_image": {
                "min": int(counts.min()) if len(self) else 0,
                "mean": counts.float().mean().item() if len(self) else float("nan"),
                "max": int(counts.max()) if len(self) else 0,
            },
            "empty_images": int((counts == 0).sum()),
            "per_class": {
                name: int((labels == i + 1).sum()) for i, name in enumerate(self.classes)
            },
            "size_px": span(sizes),
            "width_px": span(w),
            "height_px": span(h),
            "ratio_hw": span(ratios),
            "visible_fraction": span(self._visible),
        }

    def __repr__(self) -> str:
        # The file name only: a repr printed in a notebook should not depend on where the repo lives.
        where = self.cache_path.name if self.cache_path is not None else "memory"
        return (
            f"SyntheticShapes(split={self.split!r}, num_images={len(self)}, "
            f"image_size={self.image_size}, seed={self.seed}, cache={str(where)!r})"
        )
