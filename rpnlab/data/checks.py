"""A quick scan of a VOC or COCO folder for everything that would fail (or silently mislead) later.

``scan_dataset(cfg, split)`` (and ``rpnlab check-data <root>``) reads the annotation files and the
head and tail of every image, without decoding pixels, and returns every problem found, each
naming its file (and image or annotation id):

- COCO: malformed JSON, no ``images`` list or an empty one, an image entry without an integer
  ``id`` or a ``file_name``, duplicate image ids (pycocotools would silently keep the last one and
  mix their annotations), duplicate annotation ids, an annotation pointing to an unknown image id
  (it would be dropped without a word) or category id, a bbox that is not four finite numbers
  with positive width and height;
- VOC: a missing or empty image list (``ImageSets/Main/<split>.txt``), a missing or malformed
  annotation XML;
- both: an image file that is missing, unreadable, not an image, of size 0 x 0, or a JPEG cut
  short (no end-of-image marker), and an annotated size that differs from the file's.

``problems_by_kind`` separates image-file problems (which training may skip with
``--skip-bad-images``) from annotation problems (which it may not: the labels would be wrong).
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, Subset

from rpnlab.config import DataConfig

__all__ = [
    "DataError",
    "DataProblem",
    "GoodSubset",
    "check_image_file",
    "detect_format",
    "format_problems",
    "scan_coco",
    "scan_dataset",
    "scan_voc",
]


class DataError(ValueError):
    """The data has problems; the message lists each with its file (and id)."""


@dataclass(frozen=True)
class DataProblem:
    """One problem: ``path`` is the file at fault, ``kind`` is ``"image"`` (a bad image file,
    skippable) or ``"annotation"`` (wrong or inconsistent labels, not skippable)."""

    path: str
    message: str
    kind: str = "annotation"

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


def format_problems(problems: Sequence[DataProblem], limit: int = 20) -> str:
    """Problems one per line (the first ``limit``, then a count of the rest)."""
    lines = [f"  {p}" for p in problems[:limit]]
    if len(problems) > limit:
        lines.append(f"  ... and {len(problems) - limit} more")
    return "\n".join(lines)


def check_image_file(path: str | os.PathLike, size: tuple[int, int] | None = None) -> str | None:
    """Why the image at ``path`` is unusable, or None. Reads the header and the last bytes only.

    ``size``: the annotated ``(height, width)``, compared with the header's.
    """
    path = Path(path)
    if not path.exists():
        return "image file not found"
    if not path.is_file():
        return "is not a file"
    if not os.access(path, os.R_OK):
        return "image file not readable"
    try:
        with Image.open(path) as image:
            width, height = image.size
            fmt = image.format
            image.verify()  # structure checks (PNG chunk CRCs) without decoding
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        return f"not a readable image ({type(err).__name__}: {err})"
    if width == 0 or height == 0:
        return f"image is {width}x{height} pixels"
    if fmt == "JPEG":
        with path.open("rb") as f:
            f.seek(max(0, path.stat().st_size - 64))
            if b"\xff\xd9" not in f.read():
                return "JPEG is truncated (no end-of-image marker)"
    if size is not None and tuple(size) != (height, width):
        return f"image is {width}x{height} but annotated as {size[1]}x{size[0]}"
    return None


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def scan_coco(image_dir: str | os.PathLike, ann_file: str | os.PathLike, images: bool = True) -> list[DataProblem]:
    """Problems of a COCO annotation file and (``images=True``) its image files."""
    image_dir, ann_file = Path(image_dir), Path(ann_file)
    where = str(ann_file)
    if not ann_file.is_file():
        return [DataProblem(where, "annotation file not found")]
    try:
        data = json.loads(ann_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as err:
        return [DataProblem(where, f"not valid JSON ({err})")]
    if not isinstance(data, dict):
        return [DataProblem(where, f"holds a {type(data).__name__}, expected a COCO object with 'images'")]
    problems: list[DataProblem] = []
    entries = data.get("images")
    if not isinstance(entries, list):
        return [DataProblem(where, "has no 'images' list")]
    if not entries:
        problems.append(DataProblem(where, "the 'images' list is empty"))
    ids = [e.get("id") if isinstance(e, dict) else None for e in entries]
    for i, (entry, image_id) in enumerate(zip(entries, ids)):
        if not _is_int(image_id):
            problems.append(DataProblem(where, f"images[{i}] has id={image_id!r}, expected an integer"))
        elif not isinstance(entry.get("file_name"), str) or not entry["file_name"]:
            problems.append(DataProblem(where, f"image id={image_id} has no file_name"))
    for image_id, count in sorted(Counter(i for i in ids if _is_int(i)).items()):
        if count > 1:
            problems.append(DataProblem(where, f"image id={image_id} appears {count} times (ids must be unique)"))
    categories = data.get("categories")
    cat_ids = {c.get("id") for c in categories if isinstance(c, dict)} if isinstance(categories, list) else set()
    if not cat_ids:
        problems.append(DataProblem(where, "has no 'categories'"))
    known_images = {i for i in ids if _is_int(i)}
    annotations = data.get("annotations", [])
    if not isinstance(annotations, list):
        problems.append(DataProblem(where, "'annotations' is not a list"))
        annotations = []
    ann_ids = Counter()
    for i, ann in enumerate(annotations):
        if not isinstance(ann, dict):
            problems.append(DataProblem(where, f"annotations[{i}] is not an object"))
            continue
        aid = ann.get("id", f"#{i}")
        ann_ids[aid] += 1
        if ann.get("image_id") not in known_images:
            problems.append(DataProblem(where, f"annotation id={aid} points to unknown image_id={ann.get('image_id')!r}"))
        if cat_ids and ann.get("category_id") not in cat_ids:
            problems.append(DataProblem(where, f"annotation id={aid} has unknown category_id={ann.get('category_id')!r}"))
        bbox = ann.get("bbox")
        good = (isinstance(bbox, list) and len(bbox) == 4
                and all((_is_int(v) or isinstance(v, float)) and math.isfinite(v) for v in bbox))
        if not good:
            problems.append(DataProblem(where, f"annotation id={aid} has bbox={bbox!r}, expected four finite numbers"))
        elif bbox[2] <= 0 or bbox[3] <= 0:
            problems.append(DataProblem(where, f"annotation id={aid} has bbox={bbox!r} with zero or negative size"))
    for aid, count in ann_ids.items():
        if count > 1:
            problems.append(DataProblem(where, f"annotation id={aid} appears {count} times (ids must be unique)"))
    if images:
        for entry in entries:
            if isinstance(entry, dict) and isinstance(entry.get("file_name"), str) and entry["file_name"]:
                size = (entry["height"], entry["width"]) if _is_int(entry.get("height")) and _is_int(entry.get("width")) else None
                path = image_dir / entry["file_name"]
                problem = check_image_file(path, size)
                if problem:
                    problems.append(DataProblem(str(path), f"{problem} (image id={entry.get('id')})", "image"))
    return problems


def scan_voc(root: str | os.PathLike, image_set: str, images: bool = True) -> list[DataProblem]:
    """Problems of a VOC folder's image list ``image_set``, its annotation XMLs and images."""
    from rpnlab.data.voc import _IMAGE_EXTENSIONS, parse_voc_xml, resolve_voc_root

    try:
        folder = resolve_voc_root(root)
    except (FileNotFoundError, ValueError) as err:
        return [DataProblem(str(root), str(err))]
    listing = folder / "ImageSets" / "Main" / f"{image_set}.txt"
    if not listing.is_file():
        return [DataProblem(str(listing), "image list not found")]
    names = [line.split()[0] for line in listing.read_text(errors="replace").splitlines() if line.strip()]
    if not names:
        return [DataProblem(str(listing), "the image list is empty")]
    problems = []
    for name, count in Counter(names).items():
        if count > 1:
            problems.append(DataProblem(str(listing), f"image {name!r} is listed {count} times"))
    for name in dict.fromkeys(names):
        xml = folder / "Annotations" / f"{name}.xml"
        if not xml.is_file():
            problems.append(DataProblem(str(xml), "annotation file not found"))
            continue
        try:
            parsed = parse_voc_xml(xml)
        except (ValueError, OSError) as err:
            problems.append(DataProblem(str(xml), str(err).replace(f"{xml}: ", "")))
            continue
        if not images:
            continue
        candidates = ([folder / "JPEGImages" / parsed["filename"]] if parsed.get("filename") else []) + [
            folder / "JPEGImages" / f"{name}{ext}" for ext in _IMAGE_EXTENSIONS]
        path = next((c for c in candidates if c.exists()), candidates[0])
        problem = check_image_file(path, parsed.get("size"))
        if problem:
            problems.append(DataProblem(str(path), f"{problem} (VOC id {name})", "image"))
    return problems


def detect_format(root: str | os.PathLike) -> str:
    """``"coco"`` when ``root/annotations`` exists, ``"voc"`` when a VOC folder is found; else ``ValueError``."""
    root = Path(root)
    if (root / "annotations").is_dir():
        return "coco"
    from rpnlab.data.voc import resolve_voc_root

    try:
        resolve_voc_root(root)
        return "voc"
    except (FileNotFoundError, ValueError):
        raise ValueError(f"{root}: neither a COCO folder (annotations/) nor a Pascal VOC folder (Annotations/)") from None


def scan_dataset(cfg: DataConfig, split: str, images: bool = True) -> list[DataProblem]:
    """Every problem of ``split`` of the data ``cfg`` names (none for the generated synthetic set)."""
    if cfg.dataset == "synthetic":
        return []
    if cfg.dataset == "voc":
        return scan_voc(cfg.root, split, images=images)
    from rpnlab.data.build import coco_paths

    try:
        image_dir, ann_file = coco_paths(cfg.root, split)
    except FileNotFoundError as err:
        return [DataProblem(str(cfg.root), str(err))]
    return scan_coco(image_dir, ann_file, images=images)


class GoodSubset(Subset):
    """The samples of ``dataset`` whose image is not among ``bad_paths``; other attributes
    (``classes``, ``num_classes``, ...) are the dataset's."""

    def __init__(self, dataset: Dataset, bad_paths: set[str]):
        keep = [i for i in range(len(dataset)) if str(dataset.image_path(i)) not in bad_paths]
        super().__init__(dataset, keep)
        self.skipped = len(dataset) - len(keep)

    def __getattr__(self, name):
        if name in ("dataset", "indices", "skipped"):
            raise AttributeError(name)
        return getattr(self.dataset, name)
