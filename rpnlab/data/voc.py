"""Pascal VOC detection data: the folder layout, the XML annotations, and the dataset.

Layout (``root`` is the ``VOC2007`` folder itself, or a parent with ``year``)::

    root/Annotations/<id>.xml
    root/JPEGImages/<id>.jpg
    root/ImageSets/Main/<image_set>.txt     one image id per line

VOC boxes count pixels from 1 and include both end pixels (``xmin=1, xmax=10`` covers the
first ten columns). In rpnlab's continuous coordinates that box is ``x1=0, x2=10``: we subtract
1 from ``xmin`` and ``ymin`` only, as detectron2 does, so that ``x2 - x1`` is the width in pixels.
"""

from __future__ import annotations

import math
import os
import re
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.datasets import VOCDetection

from rpnlab.data.annotations import AnnotationWarning, BoxPolicy, make_target
from rpnlab.data.imagecache import ResizedImageCache, resolve_image_cache
from rpnlab.data.imageio import load_annotated_image, read_image_size

__all__ = ["VOC_CLASSES", "VOCDataset", "parse_voc_xml", "resolve_voc_root", "voc_class_names", "voc_splits"]

#: The 20 Pascal VOC classes; label ``i + 1`` is ``VOC_CLASSES[i]``.
VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip

_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".JPG", ".JPEG", ".PNG")


def _is_voc_folder(path: Path) -> bool:
    return (path / "Annotations").is_dir()


def resolve_voc_root(root: str | os.PathLike, year: str | int | None = None) -> Path:
    """The folder holding ``Annotations/``: ``root`` itself, ``root/VOC<year>`` or ``root/VOCdevkit/VOC<year>``.

    Without ``year``, a single ``VOC*`` folder under ``root`` or ``root/VOCdevkit`` is found on
    its own. Raises ``FileNotFoundError`` naming the paths it expected.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"VOC root not found: {root}")
    if _is_voc_folder(root):
        return root
    if year is not None:
        candidates = [root / f"VOC{year}", root / "VOCdevkit" / f"VOC{year}"]
    else:
        candidates = sorted(root.glob("VOC*")) + sorted((root / "VOCdevkit").glob("VOC*"))
    found = [c for c in candidates if _is_voc_folder(c)]
    if len(found) == 1 or (year is not None and found):
        return found[0]
    if len(found) > 1:
        raise ValueError(
            f"several VOC folders under {root}: {', '.join(map(str, found))}; pass year= to pick one"
        )
    expected = [root / "Annotations"] + [c / "Annotations" for c in candidates]
    raise FileNotFoundError(
        f"no Pascal VOC folder at {root}: expected {' or '.join(map(str, expected))}"
    )


def _number(value: Any, path: Path, what: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{path}: {what} is {value!r}, expected a number") from None
    if not math.isfinite(number):
        raise ValueError(f"{path}: {what} is {value!r}, expected a finite number")
    return number


def parse_voc_xml(path: str | os.PathLike) -> dict[str, Any]:
    """Read one VOC annotation file.

    Returns ``dict(filename=str | None, size=(h, w) | None, objects=[dict(name, box, difficult)])``
    with ``box`` the four numbers ``(xmin, ymin, xmax, ymax)`` as written in the file. Raises
    ``ValueError`` naming the file when the XML is malformed, a field is missing or a coordinate
    is not a number.
    """
    path = Path(path)
    try:
        tree = ET.parse(path)
    except ET.ParseError as exc:
        raise ValueError(f"{path}: malformed XML ({exc})") from exc
    # torchvision's parser turns the element tree into nested dicts; "object" is always a list.
    parsed = VOCDetection.parse_voc_xml(tree.getroot())
    annotation = parsed.get("annotation")
    if not isinstance(annotation, dict):
        raise ValueError(  # noqa: TRY004 - a malformed file is a bad value, not a caller's type error
            f"{path}: expected an <annotation> root element, found <{tree.getroot().tag}>"
        )

    size = None
    size_node = annotation.get("size")
    if isinstance(size_node, dict) and "width" in size_node and "height" in size_node:
        w = _number(size_node["width"], path, "<size><width>")
        h = _number(size_node["height"], path, "<size><height>")
        if w > 0 and h > 0:  # some converters write 0 when they did not know; read the image then
            size = (int(h), int(w))

    objects = []
    for i, obj in enumerate(annotation.get("object", [])):
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            raise ValueError(f"{path}: object {i} has no <name>")  # noqa: TRY004 (malformed file)
        box_node = obj.get("bndbox")
        if not isinstance(box_node, dict):
            raise ValueError(f"{path}: object {i} ({obj['name']}) has no <bndbox>")  # noqa: TRY004
        box = []
        for key in ("xmin", "ymin", "xmax", "ymax"):
            if key not in box_node:
                raise ValueError(f"{path}: object {i} ({obj['name']}) has no <bndbox><{key}>")
            box.append(_number(box_node[key], path, f"object {i} <{key}>"))
        difficult = obj.get("difficult", "0")
        objects.append(
            {
                "name": obj["name"].strip(),
                "box": tuple(box),
                "difficult": _number(difficult, path, f"object {i} <difficult>") != 0,
            }
        )
    filename = annotation.get("filename")
    return {
        "filename": filename if isinstance(filename, str) else None,
        "size": size,
        "objects": objects,
    }


def voc_splits(root: str | os.PathLike, year: str | int | None = None) -> list[str]:
    """The image lists in ``ImageSets/Main`` (``["test", "train"]`` for a train/test folder), sorted.

    Pascal VOC's per-class lists (``cat_train.txt``) are left out.
    """
    folder = resolve_voc_root(root, year) / "ImageSets" / "Main"
    stems = sorted(p.stem for p in folder.glob("*.txt")) if folder.is_dir() else []
    per_class = re.compile(r".+_(train|val|trainval|test)$")
    return [s for s in stems if not per_class.match(s)]


def voc_class_names(
    root: str | os.PathLike, image_set: str = "train", year: str | int | None = None
) -> tuple[str, ...]:
    """The object names the annotations of ``image_set`` use, sorted: a folder's own classes.

    For Pascal VOC's ``train`` list these are ``VOC_CLASSES`` (which are in alphabetical order),
    so a model trained on them labels classes as one trained with the fixed list. Raises
    ``ValueError`` naming the list when it holds no object at all.
    """
    voc_root = resolve_voc_root(root, year)
    ids = _read_image_set(voc_root / "ImageSets" / "Main" / f"{image_set}.txt")
    names: set[str] = set()
    for name in ids:
        xml_path = voc_root / "Annotations" / f"{name}.xml"
        if not xml_path.is_file():
            raise FileNotFoundError(f"VOC annotation not found: {xml_path}")
        names.update(obj["name"] for obj in parse_voc_xml(xml_path)["objects"])
    if not names:
        raise ValueError(f"no annotated object in the {len(ids)} images of {voc_root}/ImageSets/Main/{image_set}.txt: "
                         "cannot tell the classes (pass them with --classes a,b,c)")
    return tuple(sorted(names))


def _read_image_set(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"VOC image set not found: {path}")
    # Per-class lists ("000005 -1") carry a second column; the id is the first token.
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


@dataclass
class _Record:
    name: str  # the VOC id, e.g. "000005"
    filename: str | None
    size: tuple[int, int]  # (h, w) as annotated
    boxes: Tensor  # (M, 4) float32, rpnlab coordinates
    labels: Tensor  # (M,) int64
    difficult: Tensor  # (M,) bool


class VOCDataset(Dataset):
    """Pascal VOC (or any folder in its layout) as ``(image, target)`` samples.

    Args:
        root: the ``VOC2007``-style folder, or a parent of it (see ``resolve_voc_root``).
        image_set: the list in ``ImageSets/Main`` (``"train"``, ``"val"``, ``"trainval"``, ``"test"``).
        classes: foreground class names; label ``i + 1`` is ``classes[i]``. Objects of other
            classes are skipped (and counted in the summary warning).
        transforms: callable ``(image, target) -> (image, target)``.
        on_invalid: ``"clip"``, ``"drop"`` or ``"raise"`` for boxes outside the image or of zero
            size (see ``rpnlab.data.annotations``).
        year: picks ``VOC<year>`` when ``root`` is a parent folder.
        unknown_classes: ``"skip"`` objects whose name is not in ``classes`` (one summary
            warning) or ``"raise"`` a ``ValueError`` listing them (a model's classes must cover
            the data it is evaluated on).
        image_cache: ``"default"`` (``default_image_cache()``: on, in ``data/cache/resized``
            unless ``RPNLAB_IMAGE_CACHE`` says otherwise), a ``ResizedImageCache`` or a folder
            for one, or ``None``: where large images are kept resized after their first decode
            (``rpnlab.data.imagecache``).

    When ``classes`` matches none of the annotated objects, a ``ValueError`` says so and lists
    the names the annotations use: training on no boxes at all is never what was meant.

    All annotations are read when the dataset is built, so a malformed file fails at once (a
    ``ValueError`` naming it) and the box summary covers the whole set. Images are read per
    sample. ``target["image_id"]`` is the sample index; ``image_ids[i]`` is the VOC id.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        image_set: str = "trainval",
        classes: Sequence[str] = VOC_CLASSES,
        transforms: Callable | None = None,
        on_invalid: str = "clip",
        year: str | int | None = None,
        unknown_classes: str = "skip",
        image_cache: ResizedImageCache | None | str = "default",
    ):
        if unknown_classes not in ("skip", "raise"):
            raise ValueError(f"unknown_classes={unknown_classes!r} is invalid: expected 'skip' or 'raise'")
        self.classes = tuple(classes) if not isinstance(classes, str) else ()
        if not self.classes or len(set(self.classes)) != len(self.classes):
            raise ValueError(f"classes={classes!r} is invalid: expected distinct class names")
        policy = BoxPolicy(on_invalid)
        self.root = resolve_voc_root(root, year)
        self.image_set = image_set
        self.transforms = transforms
        self.image_cache = resolve_image_cache(image_cache)
        self.on_invalid = on_invalid
        self.image_ids = _read_image_set(self.root / "ImageSets" / "Main" / f"{image_set}.txt")
        self._label_of = {name: i + 1 for i, name in enumerate(self.classes)}
        self._unknown: dict[str, int] = {}
        self._records = [self._read_record(name, policy) for name in self.image_ids]
        found = sorted(self._unknown)
        kept = sum(len(r.labels) for r in self._records)
        if found and (unknown_classes == "raise" or kept == 0):
            raise ValueError(
                f"{self.root}/ImageSets/Main/{image_set}.txt: its annotations name classes that are not in "
                f"classes={list(self.classes)}: {', '.join(found)}"
                + ("" if kept else " (no object would be kept)")
                + "; the classes come from the training annotations, --classes or the checkpoint"
            )
        self._warn_summary(policy)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def _read_record(self, name: str, policy: BoxPolicy) -> _Record:
        xml_path = self.root / "Annotations" / f"{name}.xml"
        if not xml_path.is_file():
            raise FileNotFoundError(f"VOC annotation not found: {xml_path}")
        parsed = parse_voc_xml(xml_path)
        size = parsed["size"] or read_image_size(self._find_image(name, parsed["filename"]))
        objects = []
        for obj in parsed["objects"]:
            if obj["name"] in self._label_of:
                objects.append(obj)
            else:
                self._unknown[obj["name"]] = self._unknown.get(obj["name"], 0) + 1
        boxes = torch.tensor([o["box"] for o in objects], dtype=torch.float32).reshape(-1, 4)
        boxes[:, :2] -= 1.0  # 1-based inclusive pixels -> continuous coordinates (module docstring)
        labels = torch.tensor([self._label_of[o["name"]] for o in objects], dtype=torch.int64)
        difficult = torch.tensor([o["difficult"] for o in objects], dtype=torch.bool)
        keep, boxes = policy(boxes, size, str(xml_path))
        return _Record(name, parsed["filename"], size, boxes[keep], labels[keep], difficult[keep])

    def _warn_summary(self, policy: BoxPolicy) -> None:
        message = policy.message(str(self.root))
        if self._unknown:
            names = ", ".join(f"{k!r} x{v}" for k, v in sorted(self._unknown.items()))
            skipped = f"skipped objects of classes not in `classes`: {names} in {self.root}"
            message = skipped if message is None else f"{message}; {skipped}"
        if message is not None:
            warnings.warn(message, AnnotationWarning, stacklevel=3)

    def _find_image(self, name: str, filename: str | None) -> Path:
        """``JPEGImages/<filename from the XML>``, else ``JPEGImages/<id>.jpg`` (or .png, ...)."""
        folder = self.root / "JPEGImages"
        candidates = ([folder / filename] if filename else []) + [
            folder / f"{name}{ext}" for ext in _IMAGE_EXTENSIONS
        ]
        for path in candidates:
            if path.is_file():
                return path
        raise FileNotFoundError(f"VOC image not found: {folder / (name + '.jpg')}")

    def image_path(self, index: int) -> Path:
        """The image file of sample ``index``."""
        record = self._records[index]
        return self._find_image(record.name, record.filename)

    def __len__(self) -> int:
        return len(self._records)

    def get_target(self, index: int) -> dict[str, Any]:
        """The annotation of sample ``index`` (no image read, no transforms)."""
        record = self._records[index]
        index = index % len(self)
        return make_target(
            record.boxes.clone(),
            record.labels.clone(),
            record.difficult.clone(),
            index,
            record.size,
        )

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Any]]:
        return load_annotated_image(self.image_path(index), self.get_target(index), "its annotation", self.transforms,
                                    self.image_cache)

    def __repr__(self) -> str:
        return f"VOCDataset(root={str(self.root)!r}, image_set={self.image_set!r}, images={len(self)}, classes={self.num_classes})"
