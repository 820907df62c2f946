"""A disk cache of images already resized for training: each large file is decoded once, not once per epoch.

JPEG can be decoded at 1/2, 1/4 or 1/8 scale (``Image.draft``, used by ``imageio.load_image``);
PNG, WebP, TIFF and BMP cannot: a 4000 x 3000 PNG costs its full decode every time a sample is
drawn, only for the resize to throw away 98% of the pixels. ``ResizedImageCache`` keeps the
resized image (``uint8``, ``(H, W, 3)``, a ``.npy`` file) the first time it is made, and later
epochs read a few hundred KB instead of decoding megapixels.

- **Key**: the file's resolved path, its modification time (ns) and byte size, and the target
  ``(h, w)``, hashed with the cache format's version. Editing or replacing a photo changes its
  mtime or size, so the stale entry is never read again (it ages out).
- **Same picture**: the cached image is resized as ``ResizeShortestSide`` would resize the decoded
  one (bilinear, antialiased, to ``resized_size``), so that transform then leaves it untouched.
  The resize runs on the ``uint8`` pixels (no float copy of a 12-megapixel image: a quarter of
  the memory), which differs from the float resize by less than 1/255 per value; the first
  epoch (which writes the entry) and later ones (which read it) see identical values.
- **Atomic**: written to a temporary file in the cache folder and renamed over the entry, so a
  reader (another DataLoader worker, another run) sees a whole file or none; a file that cannot
  be read is treated as missing and rewritten.
- **Bounded**: when the folder holds more than ``max_bytes``, the least recently used entries
  (reads refresh an entry's mtime) are deleted down to 90% of it. Each process keeps its own
  running total, so several writers can overshoot the bound by what they write between scans.

Where: ``RPNLAB_IMAGE_CACHE`` names the folder (``off`` switches the cache off); by default
``<repo>/data/cache/resized`` in a source checkout, else ``~/.cache/rpnlab/resized``.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ResizedImageCache", "default_image_cache", "default_image_cache_dir", "resize_like_transform",
           "resolve_image_cache"]

#: Bumped when the way entries are made changes, so old entries are not reused.
CACHE_VERSION = 1
ENV = "RPNLAB_IMAGE_CACHE"
DEFAULT_MAX_BYTES = 1 << 30  # 1 GiB: ~1800 photos at 512 x 384


def default_image_cache_dir() -> Path | None:
    """The folder ``RPNLAB_IMAGE_CACHE`` names (``None`` for ``off``), else ``<repo>/data/cache/resized``
    in a source checkout, else ``~/.cache/rpnlab/resized``."""
    value = os.environ.get(ENV)
    if value is not None:
        return None if value.strip().lower() in ("", "off", "0", "none", "false") else Path(value).expanduser()
    repo = Path(__file__).resolve().parents[2]
    if (repo / "pyproject.toml").is_file() and (repo / "data").is_dir():
        return repo / "data" / "cache" / "resized"
    return Path.home() / ".cache" / "rpnlab" / "resized"


def default_image_cache() -> ResizedImageCache | None:
    """A ``ResizedImageCache`` in ``default_image_cache_dir()``, or ``None`` when it is switched off."""
    folder = default_image_cache_dir()
    return None if folder is None else ResizedImageCache(folder)


def resolve_image_cache(value) -> ResizedImageCache | None:
    """A dataset's ``image_cache`` argument -> a cache or ``None``: ``"default"``
    (``default_image_cache()``), a ``ResizedImageCache``, a folder (``str`` or path), or ``None``."""
    if value is None or isinstance(value, ResizedImageCache):
        return value
    if isinstance(value, str) and value == "default":
        return default_image_cache()
    if isinstance(value, (str, os.PathLike)):
        return ResizedImageCache(value)
    raise ValueError(f"image_cache={value!r} is invalid: expected 'default', a folder, a ResizedImageCache or None")


def resize_like_transform(image: Tensor, size: tuple[int, int]) -> Tensor:
    """``image: (3, H, W)`` -> ``(3, h, w)`` of the same dtype, as ``ResizeShortestSide`` resizes
    (bilinear, antialiased when shrinking). ``uint8`` is resized as it is (torch's fixed-point
    kernel: within 1/255 of the float result, a quarter of the memory); float is clamped to ``[0, 1]``."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    shrinking = size[0] < image.shape[-2] or size[1] < image.shape[-1]
    resized = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False, antialias=shrinking)[0]
    return resized if image.dtype == torch.uint8 else resized.clamp_(0.0, 1.0)


class ResizedImageCache:
    """Resized images on disk, keyed by ``(file path, mtime, byte size, target size)`` (module docstring).

    ``get(path, size)`` returns the ``(3, h, w)`` float image or ``None``; ``put(path, size,
    image)`` stores one. ``hits``, ``misses`` and ``writes`` count what this object did.
    """

    def __init__(self, folder: str | os.PathLike, max_bytes: int = DEFAULT_MAX_BYTES):
        if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes <= 0:
            raise ValueError(f"max_bytes={max_bytes!r} is invalid: expected a positive integer")
        self.folder, self.max_bytes = Path(folder).expanduser(), max_bytes
        if self.folder.exists() and not self.folder.is_dir():
            raise ValueError(f"image cache folder {self.folder} is a file, not a folder ({ENV})")
        self.hits = self.misses = self.writes = 0
        self._total: int | None = None  # bytes in the folder, scanned on the first write

    def __repr__(self) -> str:
        return f"ResizedImageCache({str(self.folder)!r}, max_bytes={self.max_bytes})"

    def entry(self, path: str | os.PathLike, size: tuple[int, int]) -> Path:
        """The cache file for image ``path`` resized to ``size = (h, w)``; raises ``FileNotFoundError``."""
        path = Path(path).resolve()
        stat = path.stat()
        key = f"v{CACHE_VERSION}\0{path}\0{stat.st_mtime_ns}\0{stat.st_size}\0{size[0]}x{size[1]}"
        return self.folder / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.npy"

    def get(self, path: str | os.PathLike, size: tuple[int, int]) -> Tensor | None:
        """The cached ``(3, h, w)`` float32 image in ``[0, 1]``, or ``None`` (missing or unreadable)."""
        entry = self.entry(path, size)
        try:
            array = np.load(entry, allow_pickle=False)
        except (OSError, ValueError, EOFError):
            self.misses += 1
            return None
        if array.dtype != np.uint8 or array.shape != (size[0], size[1], 3):
            self.misses += 1
            return None
        self.hits += 1
        try:
            os.utime(entry)  # recently used: the last to be evicted
        except OSError:
            pass
        return torch.from_numpy(array).permute(2, 0, 1).float().div_(255.0)

    def put(self, path: str | os.PathLike, size: tuple[int, int], image: Tensor) -> Path | None:
        """Store ``image: (3, h, w)`` (``uint8``, or float in ``[0, 1]``: rounded to ``uint8``) for
        ``path`` at ``size``; the entry's path, or ``None`` when the folder cannot be written (the
        cache is then skipped, not an error)."""
        if tuple(image.shape) != (3, size[0], size[1]):
            raise ValueError(f"image of shape {tuple(image.shape)} does not match size={size}")
        entry = self.entry(path, size)
        if image.dtype != torch.uint8:
            image = image.mul(255.0).round_().clamp_(0, 255).to(torch.uint8)
        array = image.permute(1, 2, 0).contiguous().numpy()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".tmp-", suffix=".part")
            try:
                with os.fdopen(fd, "wb") as handle:
                    np.save(handle, array, allow_pickle=False)
                os.chmod(tmp, 0o644)
                os.replace(tmp, entry)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError:
            return None
        self.writes += 1
        self._account(entry.stat().st_size)
        return entry

    def _entries(self) -> list[tuple[float, int, Path]]:
        found = []
        for item in self.folder.glob("*.npy"):
            try:
                stat = item.stat()
            except OSError:
                continue  # removed by another process meanwhile
            found.append((stat.st_mtime, stat.st_size, item))
        return found

    def _account(self, written: int) -> None:
        if self._total is None:
            self._total = sum(size for _, size, _ in self._entries())
        else:
            self._total += written
        if self._total <= self.max_bytes:
            return
        entries = sorted(self._entries(), key=lambda e: e[0])  # oldest first
        total = sum(size for _, size, _ in entries)
        for _, size, item in entries:
            if total <= 0.9 * self.max_bytes:
                break
            item.unlink(missing_ok=True)
            total -= size
        self._total = total

    def size_bytes(self) -> int:
        """Bytes the entries in the folder take now."""
        return sum(size for _, size, _ in self._entries()) if self.folder.is_dir() else 0
