"""VOC and COCO readers on tiny folders written here: image modes, boxes, flags, broken files."""

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from rpnlab.config import DataConfig
from rpnlab.data import (
    VOC_CLASSES,
    AnnotationWarning,
    COCODataset,
    VOCDataset,
    build_dataset,
    coco_paths,
    load_image,
)
from rpnlab.data.annotations import BoxPolicy
from rpnlab.data.imageio import read_image_size
from rpnlab.data.voc import parse_voc_xml

RED = (200, 30, 60)
GREEN = (20, 180, 90)


# ---- writing tiny datasets ------------------------------------------------------------------


def _grey(h, w):
    array = (np.arange(h * w).reshape(h, w) * 7 % 256).astype(np.uint8)
    return Image.fromarray(array)  # mode "L"


HALF_RED_ON_WHITE = (torch.tensor(RED) * 128 + 255 * 127) / 255 / 255


def _rgba(h, w):
    array = np.zeros((h, w, 4), dtype=np.uint8)
    array[..., :3] = RED
    array[..., 3] = 128  # half transparent: composited onto white (HALF_RED_ON_WHITE)
    return Image.fromarray(array)  # mode "RGBA"


def _palette(h, w):
    image = Image.new("P", (w, h), 0)
    image.putpalette(list(GREEN) + list(RED) + [0] * (256 - 2) * 3)
    image.paste(1, (0, 0, w // 2, h))  # left half RED (index 1), right half GREEN (index 0)
    return image


def _rgb(h, w, colour=(10, 120, 240)):
    return Image.new("RGB", (w, h), colour)


def _voc_xml(filename, size, objects):
    """``size = (w, h)`` or None; ``objects = [(name, (xmin, ymin, xmax, ymax), difficult)]``."""
    parts = ["<annotation>", "<folder>VOC2007</folder>"]
    if filename:
        parts.append(f"<filename>{filename}</filename>")
    if size:
        parts.append(
            f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>"
        )
    for name, box, difficult in objects:
        coords = "".join(f"<{k}>{v}</{k}>" for k, v in zip(("xmin", "ymin", "xmax", "ymax"), box))
        parts.append(
            f"<object><name>{name}</name><pose>Left</pose><truncated>0</truncated>"
            f"<difficult>{int(difficult)}</difficult><bndbox>{coords}</bndbox></object>"
        )
    parts.append("</annotation>")
    return "\n".join(parts)


def make_voc(folder):
    """A VOC2007-style folder; image set "trainval" holds the five good images."""
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    ann, jpg = folder / "Annotations", folder / "JPEGImages"

    def add(name, image, file, size, objects):
        fmt = "PNG" if file.endswith(".png") or image.mode == "P" else "JPEG"
        image.save(jpg / file, format=fmt)
        (ann / f"{name}.xml").write_text(_voc_xml(file, size, objects))

    add("000001", _grey(60, 80), "000001.jpg", (80, 60),
        [("dog", (10, 5, 40, 30), False), ("person", (50, 20, 70, 55), True)])  # fmt: skip
    add("000002", _rgba(50, 40), "000002.png", (40, 50), [("cat", (5, 5, 30, 40), False)])
    add("000003", _palette(40, 40), "000003.jpg", (40, 40), [("car", (1, 1, 40, 40), False)])
    add("000004", _rgb(32, 48), "000004.jpg", (48, 32), [])
    add("000005", _rgb(40, 50), "000005.jpg", (50, 40),
        [("bird", (30, 20, 70, 45), False),  # reaches outside: clipped to (29, 19, 50, 40)
         ("bird", (60, 10, 80, 30), False),  # entirely right of the image: empty once clipped
         ("boat", (11, 10, 10, 20), False)])  # fmt: skip  # xmax < xmin: zero width
    (folder / "ImageSets/Main/trainval.txt").write_text("000001\n000002\n000003\n000004\n000005\n")

    broken = {
        "bad_xml": "<annotation><object><name>dog</name></annotation",
        "bad_number": _voc_xml("x.jpg", (10, 10), [("dog", (1, "abc", 5, 5), False)]),
        "missing_field": _voc_xml("x.jpg", (10, 10), [("dog", (1, 1, 5, 5), False)]).replace(
            "<ymax>5</ymax>", ""
        ),
        "no_bndbox": "<annotation><size><width>9</width><height>9</height></size>"
        "<object><name>dog</name></object></annotation>",
    }
    for name, text in broken.items():
        (ann / f"{name}.xml").write_text(text)
        (folder / f"ImageSets/Main/{name}.txt").write_text(f"000001\n{name}\n")
    return folder


@pytest.fixture
def voc_root(tmp_path):
    return make_voc(tmp_path / "VOC2007")


def _load_voc(root, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = VOCDataset(root, **kwargs)
    return ds, [w for w in caught if issubclass(w.category, AnnotationWarning)]


# ---- VOC ----------------------------------------------------------------------------------


def test_voc_samples(voc_root):
    ds, caught = _load_voc(voc_root)
    assert len(ds) == 5 and ds.classes == VOC_CLASSES and ds.num_classes == 20
    assert ds.image_ids == ["000001", "000002", "000003", "000004", "000005"]

    image, target = ds[0]  # greyscale JPEG
    assert image.shape == (3, 60, 80) and image.dtype == torch.float32
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])
    assert 0 <= image.min() and image.max() <= 1
    # VOC's 1-based inclusive pixels: subtract 1 from xmin and ymin only.
    assert torch.equal(target["boxes"], torch.tensor([[9.0, 4, 40, 30], [49, 19, 70, 55]]))
    assert target["labels"].tolist() == [
        VOC_CLASSES.index("dog") + 1,
        VOC_CLASSES.index("person") + 1,
    ]
    assert target["labels"].dtype == torch.int64
    assert target["difficult"].tolist() == [False, True]
    assert target["image_id"] == 0 and target["orig_size"] == (60, 80)

    image, target = ds[1]  # RGBA PNG, found through <filename>
    assert image.shape == (3, 50, 40)
    assert torch.allclose(image[:, 10, 10], HALF_RED_ON_WHITE, atol=1 / 255)

    image, target = ds[2]  # palette PNG saved under a .jpg name
    assert image.shape == (3, 40, 40)
    assert torch.allclose(image[:, 5, 5], torch.tensor(RED) / 255.0)
    assert torch.allclose(image[:, 5, 35], torch.tensor(GREEN) / 255.0)
    assert torch.equal(target["boxes"], torch.tensor([[0.0, 0, 40, 40]]))

    image, target = ds[3]  # no objects
    assert target["boxes"].shape == (0, 4) and target["boxes"].dtype == torch.float32
    assert target["labels"].shape == (0,) and target["difficult"].shape == (0,)

    _, target = ds[4]  # one clipped, two dropped
    assert torch.equal(target["boxes"], torch.tensor([[29.0, 19, 50, 40]]))
    assert target["labels"].tolist() == [VOC_CLASSES.index("bird") + 1]

    assert len(caught) == 1
    assert str(caught[0].message) == f"clipped 1 boxes, dropped 2 zero-size boxes in {voc_root}"


def test_voc_on_invalid_drop_and_raise(voc_root):
    ds, caught = _load_voc(voc_root, on_invalid="drop")
    assert ds.get_target(4)["boxes"].shape == (0, 4)
    assert ds.get_target(0)["boxes"].shape == (2, 4)  # valid boxes untouched
    assert len(caught) == 1
    assert "dropped 2 boxes outside the image and 1 zero-size boxes" in str(caught[0].message)

    with pytest.raises(ValueError, match=r"000005\.xml: box 0 .*outside the 50x40 image"):
        VOCDataset(voc_root, on_invalid="raise")
    with pytest.raises(ValueError, match="on_invalid"):
        VOCDataset(voc_root, on_invalid="ignore")


def test_voc_no_warning_when_nothing_changes(voc_root):
    (voc_root / "ImageSets/Main/clean.txt").write_text("000001\n000004\n")
    _, caught = _load_voc(voc_root, image_set="clean")
    assert caught == []


@pytest.mark.parametrize(
    ("image_set", "message"),
    [
        ("bad_xml", r"bad_xml\.xml: malformed XML"),
        ("bad_number", r"bad_number\.xml: object 0 <ymin> is 'abc', expected a number"),
        ("missing_field", r"missing_field\.xml: object 0 \(dog\) has no <bndbox><ymax>"),
        ("no_bndbox", r"no_bndbox\.xml: object 0 \(dog\) has no <bndbox>"),
    ],
)
def test_voc_malformed_annotation_names_the_file(voc_root, image_set, message):
    with pytest.raises(ValueError, match=message):
        VOCDataset(voc_root, image_set=image_set)


def test_voc_missing_paths(voc_root, tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        VOCDataset(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="Annotations"):
        VOCDataset(empty)
    with pytest.raises(FileNotFoundError, match=r"ImageSets/Main/test\.txt"):
        VOCDataset(voc_root, image_set="test")
    (voc_root / "ImageSets/Main/ghost.txt").write_text("000404\n")
    with pytest.raises(FileNotFoundError, match=r"Annotations/000404\.xml"):
        VOCDataset(voc_root, image_set="ghost")
    (voc_root / "JPEGImages/000004.jpg").unlink()
    ds, _ = _load_voc(voc_root)
    with pytest.raises(FileNotFoundError, match=r"JPEGImages/000004\.jpg"):
        ds[3]


def test_voc_size_from_image_when_xml_has_none(voc_root):
    (voc_root / "Annotations/000004.xml").write_text(
        _voc_xml(None, None, [("cow", (1, 1, 10, 10), False)])
    )
    (voc_root / "ImageSets/Main/nosize.txt").write_text("000004\n")
    ds, _ = _load_voc(voc_root, image_set="nosize")
    assert ds.get_target(0)["orig_size"] == (32, 48)
    assert ds[0][0].shape == (3, 32, 48)


def test_voc_image_size_mismatch_is_reported(voc_root):
    (voc_root / "Annotations/000004.xml").write_text(_voc_xml("000004.jpg", (30, 30), []))
    ds, _ = _load_voc(voc_root)
    with pytest.raises(
        ValueError, match=r"000004\.jpg: image is 48x32 but its annotation says 30x30"
    ):
        ds[3]


def test_voc_devkit_layouts(tmp_path):
    make_voc(tmp_path / "VOCdevkit" / "VOC2007")
    for root, year in ((tmp_path, 2007), (tmp_path / "VOCdevkit", "2007"), (tmp_path, None)):
        ds, _ = _load_voc(root, year=year)
        assert ds.root == tmp_path / "VOCdevkit" / "VOC2007" and len(ds) == 5
    with pytest.raises(FileNotFoundError, match="VOC2012"):
        VOCDataset(tmp_path, year=2012)


def test_voc_class_subset(voc_root):
    ds, caught = _load_voc(voc_root, classes=("dog", "cat"))
    assert ds.num_classes == 2
    assert ds.get_target(0)["labels"].tolist() == [1]  # the person is not a class here
    assert ds.get_target(1)["labels"].tolist() == [2]
    assert len(caught) == 1 and "'person' x1" in str(caught[0].message)
    with pytest.raises(ValueError, match="classes"):
        VOCDataset(voc_root, classes=("dog", "dog"))


def test_voc_transforms_and_targets_are_copies(voc_root):
    def shift(image, target):
        target["boxes"] += 1  # a careless in-place transform must not corrupt the dataset
        return image, target

    ds, _ = _load_voc(voc_root, transforms=shift)
    before = ds.get_target(0)["boxes"].clone()
    assert torch.equal(ds[0][1]["boxes"], before + 1)
    assert torch.equal(ds[0][1]["boxes"], before + 1)


def test_parse_voc_xml_reads_fields(voc_root):
    parsed = parse_voc_xml(voc_root / "Annotations/000001.xml")
    assert parsed["filename"] == "000001.jpg" and parsed["size"] == (60, 80)
    assert parsed["objects"][1] == {
        "name": "person",
        "box": (50.0, 20.0, 70.0, 55.0),
        "difficult": True,
    }


# ---- COCO ---------------------------------------------------------------------------------

COCO_CATEGORIES = [{"id": 3, "name": "car"}, {"id": 1, "name": "person"}, {"id": 18, "name": "dog"}]


def make_coco(image_dir, ann_file, annotations=None, categories=None):
    image_dir.mkdir(parents=True, exist_ok=True)
    ann_file.parent.mkdir(parents=True, exist_ok=True)
    files = [
        (10, "grey.jpg", _grey(40, 60), "JPEG"),
        (11, "rgba.png", _rgba(30, 30), "PNG"),
        (12, "palette.jpg", _palette(20, 24), "PNG"),  # PNG bytes behind a .jpg name
        (13, "empty.jpg", _rgb(16, 16), "JPEG"),
        (14, "outside.jpg", _rgb(40, 40), "JPEG"),
    ]
    images = []
    for image_id, name, image, fmt in files:
        image.save(image_dir / name, format=fmt)
        images.append(
            {"id": image_id, "file_name": name, "width": image.width, "height": image.height}
        )
    if annotations is None:
        annotations = [
            {"id": 1, "image_id": 10, "category_id": 18, "bbox": [5, 6, 20, 10], "iscrowd": 0},
            {"id": 2, "image_id": 10, "category_id": 1, "bbox": [0, 0, 60, 40], "iscrowd": 1},
            {"id": 3, "image_id": 11, "category_id": 3, "bbox": [1.5, 2.5, 10, 12], "iscrowd": 0},
            {"id": 4, "image_id": 12, "category_id": 1, "bbox": [0, 0, 24, 20], "iscrowd": 0},
            {"id": 5, "image_id": 14, "category_id": 3, "bbox": [30, 30, 20, 20], "iscrowd": 0},
            {"id": 6, "image_id": 14, "category_id": 1, "bbox": [10, 10, 0, 5], "iscrowd": 0},
        ]
    for ann in annotations:
        ann.setdefault("area", 1.0)
    data = {
        "images": images,
        "annotations": annotations,
        "categories": categories or COCO_CATEGORIES,
    }
    ann_file.write_text(json.dumps(data))
    return image_dir, ann_file


@pytest.fixture
def coco(tmp_path):
    return make_coco(
        tmp_path / "coco" / "val2017", tmp_path / "coco" / "annotations" / "instances_val2017.json"
    )


def _load_coco(image_dir, ann_file, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = COCODataset(image_dir, ann_file, **kwargs)
    return ds, [w for w in caught if issubclass(w.category, AnnotationWarning)]


def test_coco_samples(coco, capsys):
    ds, caught = _load_coco(*coco)
    assert capsys.readouterr().out == ""  # pycocotools' progress prints are kept quiet
    assert ds.classes == ("person", "car", "dog") and ds.category_ids == (1, 3, 18)
    assert ds.image_ids == [10, 11, 12, 13, 14] and len(ds) == 5

    image, target = ds[0]  # greyscale; the crowd box is skipped
    assert image.shape == (3, 40, 60) and torch.equal(image[0], image[2])
    assert torch.equal(target["boxes"], torch.tensor([[5.0, 6, 25, 16]]))
    assert target["labels"].tolist() == [3] and target["labels"].dtype == torch.int64
    assert target["image_id"] == 10 and target["orig_size"] == (40, 60)
    assert target["difficult"].tolist() == [False]

    image, target = ds[1]  # RGBA, fractional xywh
    assert torch.allclose(image[:, 3, 3], HALF_RED_ON_WHITE, atol=1 / 255)
    assert torch.allclose(target["boxes"], torch.tensor([[1.5, 2.5, 11.5, 14.5]]))
    assert target["labels"].tolist() == [2]

    image, target = ds[2]  # PNG named .jpg
    assert image.shape == (3, 20, 24)
    assert torch.allclose(image[:, 2, 2], torch.tensor(RED) / 255.0)
    assert torch.allclose(image[:, 2, 20], torch.tensor(GREEN) / 255.0)

    _, target = ds[3]
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)

    _, target = ds[4]
    assert torch.equal(target["boxes"], torch.tensor([[30.0, 30, 40, 40]]))
    assert len(caught) == 1
    assert str(caught[0].message) == f"clipped 1 boxes, dropped 1 zero-size boxes in {coco[1]}"


def test_coco_crowd_as_difficult(coco):
    ds, _ = _load_coco(*coco, crowd="difficult")
    target = ds.get_target(0)
    assert target["difficult"].tolist() == [False, True]
    assert target["labels"].tolist() == [3, 1]
    with pytest.raises(ValueError, match="crowd"):
        COCODataset(*coco, crowd="keep")


def test_coco_on_invalid(coco):
    ds, caught = _load_coco(*coco, on_invalid="drop")
    assert ds.get_target(4)["boxes"].shape == (0, 4)
    assert "dropped 1 boxes outside the image and 1 zero-size boxes" in str(caught[0].message)
    with pytest.raises(
        ValueError, match=r"instances_val2017\.json \(image id=14, outside\.jpg\): box 0"
    ):
        COCODataset(*coco, on_invalid="raise")


def test_coco_category_subset(coco):
    ds, _ = _load_coco(*coco, category_ids=[18, 3])
    assert ds.classes == ("dog", "car")
    assert ds.get_target(0)["labels"].tolist() == [1]
    assert ds.get_target(1)["labels"].tolist() == [2]
    assert ds.get_target(2)["labels"].shape == (0,)  # the person is not a class here
    with pytest.raises(ValueError, match="category_ids"):
        COCODataset(*coco, category_ids=[2])


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"bbox": [1, 2, 3]}, "bbox"),
        ({"bbox": ["a", 1, 2, 3]}, "bbox"),
        ({"bbox": None}, "bbox"),
        ({"category_id": 99}, "category_id=99"),
    ],
)
def test_coco_malformed_annotation(tmp_path, bad, message):
    ann = {"id": 7, "image_id": 10, "category_id": 1, "bbox": [1, 1, 2, 2], "iscrowd": 0, **bad}
    image_dir, ann_file = make_coco(tmp_path / "img", tmp_path / "ann.json", annotations=[ann])
    with pytest.raises(ValueError, match=rf"ann\.json.*{message}"):
        COCODataset(image_dir, ann_file)


def test_coco_malformed_json_and_missing_paths(coco, tmp_path):
    image_dir, ann_file = coco
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [')
    with pytest.raises(ValueError, match=r"broken\.json: malformed JSON"):
        COCODataset(image_dir, broken)
    no_ids = tmp_path / "no_ids.json"
    no_ids.write_text(
        json.dumps({"images": [{"file_name": "x.jpg"}], "annotations": [], "categories": []})
    )
    with pytest.raises(ValueError, match=r"no_ids\.json"):
        COCODataset(image_dir, no_ids)
    with pytest.raises(FileNotFoundError, match=r"missing\.json"):
        COCODataset(image_dir, tmp_path / "missing.json")
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        COCODataset(tmp_path / "no_such_dir", ann_file)
    (image_dir / "empty.jpg").unlink()
    ds, _ = _load_coco(image_dir, ann_file)
    with pytest.raises(FileNotFoundError, match=r"empty\.jpg"):
        ds[3]


# ---- build_dataset over real-data folders --------------------------------------------------


def test_build_dataset_voc_and_coco(voc_root, coco, tmp_path):
    cfg = DataConfig(dataset="voc", root=str(voc_root), min_size=64, max_size=128, hflip_prob=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AnnotationWarning)
        voc = build_dataset(cfg, "trainval")
    image, target = voc[0]  # 60x80 -> shorter side 64
    assert image.shape == (3, 64, 85)
    assert torch.allclose(
        target["boxes"][0], torch.tensor([9 * 85 / 80, 4 * 64 / 60, 40 * 85 / 80, 30 * 64 / 60])
    )
    assert target["orig_size"] == (60, 80)

    coco_root = coco[0].parent
    assert coco_paths(coco_root, "val") == coco
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AnnotationWarning)
        ds = build_dataset(DataConfig(dataset="coco", root=str(coco_root)), "val")
    assert isinstance(ds, COCODataset) and len(ds) == 5
    with pytest.raises(ValueError, match=r"split 'train' not found .*splits found: val .*instances_train2017\.json"):
        build_dataset(DataConfig(dataset="coco", root=str(coco_root)), "train")


# ---- image reading ------------------------------------------------------------------------


def test_load_image_modes(tmp_path):
    sixteen = tmp_path / "depth16.png"
    Image.fromarray(np.full((4, 5), 65535, dtype=np.uint16)).save(sixteen)
    assert torch.allclose(load_image(sixteen), torch.ones(3, 4, 5))

    cmyk = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (6, 4), (0, 0, 0, 0)).save(cmyk)
    image = load_image(cmyk)
    assert image.shape == (3, 4, 6) and image.min() > 0.9  # no ink is white

    transparent = tmp_path / "palette_alpha.png"
    palette = _palette(4, 4)
    palette.info["transparency"] = 0
    palette.save(transparent, transparency=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL's palette-transparency warning must not appear
        image = load_image(transparent)
    assert torch.allclose(image[:, 0, 0], torch.tensor(RED) / 255.0)
    assert torch.allclose(image[:, 0, -1], torch.ones(3))  # the transparent half is white, not its colour

    cutout = tmp_path / "rgba.png"
    rgba = np.zeros((4, 6, 4), dtype=np.uint8)  # black, and transparent on the right half
    rgba[:, :3, 3] = 255
    Image.fromarray(rgba, "RGBA").save(cutout)
    image = load_image(cutout)
    assert torch.allclose(image[:, :, :3], torch.zeros(3, 4, 3)) and torch.allclose(image[:, :, 3:], torch.ones(3, 4, 3))

    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"this is not an image")
    with pytest.raises(ValueError, match=r"garbage\.jpg"):
        load_image(garbage)
    with pytest.raises(ValueError, match=r"garbage\.jpg"):
        read_image_size(garbage)
    with pytest.raises(FileNotFoundError, match=r"absent\.png"):
        load_image(tmp_path / "absent.png")
    assert read_image_size(cmyk) == (4, 6)


def test_box_policy_counts():
    boxes = torch.tensor([[0.0, 0, 5, 5], [-2, 0, 5, 5], [3, 3, 3, 8], [20, 0, 30, 5]])
    policy = BoxPolicy("clip")
    keep, clipped = policy(boxes, (10, 10), "f.xml")
    assert keep.tolist() == [True, True, False, False]
    assert torch.equal(clipped[1], torch.tensor([0.0, 0, 5, 5]))
    assert (policy.clipped, policy.dropped_empty) == (1, 2)
    policy = BoxPolicy("drop")
    keep, same = policy(boxes, (10, 10), "f.xml")
    assert keep.tolist() == [True, False, False, False] and same is boxes
    assert (policy.dropped_outside, policy.dropped_empty) == (2, 1)
    assert BoxPolicy("clip").message("x") is None
    empty_keep, _ = BoxPolicy("raise")(torch.zeros(0, 4), (10, 10), "f.xml")
    assert empty_keep.shape == (0,)
