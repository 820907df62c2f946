"""Your own photos through the CLI: custom class names, a train/test-only folder, VOC and COCO.

The folders are written here (small JPEGs with drawn objects); nothing is downloaded.
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from rpnlab import cli
from rpnlab.config import DataConfig
from rpnlab.data import AnnotationWarning
from rpnlab.data.build import (
    available_splits,
    build_dataset,
    evaluation_split,
    parse_classes,
    resolve_classes,
)

CLASSES = ("mug", "stapler")  # not Pascal VOC names: they must come from the annotations
COLOURS = {"mug": (200, 30, 30), "stapler": (30, 30, 200)}


def _photo(rng: np.random.Generator, w: int = 96, h: int = 72) -> tuple[np.ndarray, list[tuple[str, list[int]]]]:
    pixels = np.full((h, w, 3), 235, dtype=np.uint8)
    objects = []
    for name in CLASSES:
        bw, bh = rng.integers(16, 32, size=2)
        x, y = rng.integers(0, w - bw), rng.integers(0, h - bh)
        pixels[y:y + bh, x:x + bw] = COLOURS[name]
        objects.append((name, [int(x), int(y), int(x + bw), int(y + bh)]))
    return pixels, objects


def make_voc(root, n_train: int = 6, n_test: int = 3, splits=("train", "test")):
    """A LabelImg-style folder: Annotations/*.xml, JPEGImages/*.jpg, ImageSets/Main/{train,test}.txt."""
    rng = np.random.default_rng(0)
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    ids = {"train": [f"tr{i}" for i in range(n_train)], "test": [f"te{i}" for i in range(n_test)]}
    for split in splits:
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids[split]) + "\n")
        for name in ids[split]:
            pixels, objects = _photo(rng)
            Image.fromarray(pixels).save(root / "JPEGImages" / f"{name}.jpg", quality=95)
            xml = "".join(
                f"<object><name>{c}</name><difficult>0</difficult><bndbox><xmin>{b[0] + 1}</xmin>"
                f"<ymin>{b[1] + 1}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
                for c, b in objects
            )
            (root / "Annotations" / f"{name}.xml").write_text(
                f"<annotation><filename>{name}.jpg</filename><size><width>96</width><height>72</height>"
                f"<depth>3</depth></size>{xml}</annotation>"
            )
    return root


def make_coco(root, n_train: int = 6, n_test: int = 3):
    """``train/`` + ``annotations/train.json`` and ``test/`` + ``annotations/test.json``; category ids 3 and 7."""
    rng = np.random.default_rng(1)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    ids = {"mug": 7, "stapler": 3}
    for split, n in (("train", n_train), ("test", n_test)):
        (root / split).mkdir(exist_ok=True)
        images, anns = [], []
        for i in range(n):
            pixels, objects = _photo(rng)
            Image.fromarray(pixels).save(root / split / f"{i}.jpg", quality=95)
            images.append({"id": i + 1, "file_name": f"{i}.jpg", "width": 96, "height": 72})
            for c, (x1, y1, x2, y2) in objects:
                anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": ids[c], "iscrowd": 0,
                             "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1)})
        categories = [{"id": 3, "name": "stapler"}, {"id": 7, "name": "mug"}]
        (root / "annotations" / f"{split}.json").write_text(
            json.dumps({"images": images, "annotations": anns, "categories": categories}))
    return root


SMALL = ["--min-size", "64", "--max-size", "96", "--batch-size", "2", "--epochs", "1", "--max-iters", "2",
         "--rpn-post-nms-top-n-train", "30", "--roi-batch-size-per-image", "16", "--device", "cpu", "--no-progress"]


def _error(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as info:
        cli.main(list(argv))
    assert info.value.code == 2
    return capsys.readouterr().err


def test_classes_and_splits_come_from_the_folder(tmp_path):
    root = make_voc(tmp_path / "voc")
    cfg = DataConfig(dataset="voc", root=str(root))
    assert resolve_classes(cfg) == ("mug", "stapler")  # sorted names used in train.txt's annotations
    assert available_splits(cfg) == ["test", "train"]
    assert evaluation_split(cfg) == "test"  # no val split
    with pytest.raises(ValueError, match=r"split 'val' not found .* splits found: test, train"):
        build_dataset(cfg, "val")
    (tmp_path / "names.txt").write_text("stapler\nmug\n")
    assert parse_classes(str(tmp_path / "names.txt")) == ("stapler", "mug")
    with pytest.raises(ValueError, match="repeats 'mug'"):
        parse_classes("mug,mug")
    with pytest.raises(FileNotFoundError, match="classes file not found"):
        parse_classes(str(tmp_path / "missing.txt"))
    # Names that match no object: an error listing the names the annotations use, not 0 boxes.
    with pytest.raises(ValueError, match="mug, stapler .*no object would be kept"):
        build_dataset(DataConfig(dataset="voc", root=str(root), classes="cat,dog"), "train")
    # A subset on purpose: the other class is skipped.
    with pytest.warns(AnnotationWarning, match="skipped objects of classes not in `classes`: 'mug' x6"):
        subset = build_dataset(DataConfig(dataset="voc", root=str(root), classes="stapler"), "train")
    assert subset.classes == ("stapler",) and all(set(subset.get_target(i)["labels"].tolist()) == {1}
                                                  for i in range(len(subset)))
    # Data with classes a model does not know: an error before any inference.
    with pytest.raises(ValueError, match="not in classes=\\['mug'\\]: stapler"):
        build_dataset(cfg, "test", classes=["mug"])


def test_voc_folder_train_evaluate_predict(tmp_path, capsys):
    root = make_voc(tmp_path / "voc")
    run = tmp_path / "run"
    code = cli.main(["train", "--dataset", "voc", "--root", str(root), *SMALL, "--out-dir", str(run), "--evaluate"])
    assert code == 0
    out = capsys.readouterr().out
    assert "classes: 1=mug, 2=stapler" in out
    assert "evaluating on split 'test'" in out and "test mAP@0.5" in out
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert state["classes"] == ["mug", "stapler"] and state["configs"]["model"]["num_classes"] == 2

    metrics = tmp_path / "metrics.json"
    assert cli.main(["evaluate", "--checkpoint", str(run / "checkpoint.pt"), "--device", "cpu", "--no-progress",
                     "--json", str(metrics)]) == 0
    out = capsys.readouterr().out
    assert "evaluating on split 'test'" in out and "| mug |" in out and "| stapler |" in out
    assert set(json.loads(metrics.read_text())["ap_per_class"]) == {"mug", "stapler"}

    pred = tmp_path / "pred"
    image = root / "JPEGImages" / "te0.jpg"
    assert cli.main(["predict", str(image), "--checkpoint", str(run / "checkpoint.pt"), "--out", str(pred),
                     "--score-thresh", "0", "--device", "cpu"]) == 0
    for d in json.loads((pred / "detections.json").read_text())[0]["detections"]:
        assert d["name"] == CLASSES[d["label"] - 1]

    # Errors before any work: a missing split lists those found; --num-classes against the data.
    err = _error(capsys, "evaluate", "--checkpoint", str(run / "checkpoint.pt"), "--split", "val", "--device", "cpu")
    assert "split 'val' not found" in err and "splits found: test, train" in err
    err = _error(capsys, "train", "--dataset", "voc", "--root", str(root), "--num-classes", "20", *SMALL,
                 "--out-dir", str(tmp_path / "bad"))
    assert "--num-classes 20 but the data has 2 classes (mug, stapler)" in err
    # The same checkpoint on data with a class it never learnt.
    other = make_voc(tmp_path / "other")
    xml = other / "Annotations" / "te0.xml"
    xml.write_text(xml.read_text().replace("<name>mug</name>", "<name>cup</name>"))
    err = _error(capsys, "evaluate", "--checkpoint", str(run / "checkpoint.pt"), "--root", str(other),
                 "--device", "cpu")
    assert "cup" in err and "not in classes=['mug', 'stapler']" in err


def test_coco_folder_train_evaluate_predict(tmp_path, capsys):
    root = make_coco(tmp_path / "coco")
    run = tmp_path / "run"
    assert cli.main(["train", "--dataset", "coco", "--root", str(root), *SMALL, "--out-dir", str(run)]) == 0
    assert "classes: 1=stapler, 2=mug" in capsys.readouterr().out  # category id order (3, 7)
    assert torch.load(run / "checkpoint.pt", weights_only=True)["classes"] == ["stapler", "mug"]
    assert cli.main(["evaluate", "--checkpoint", str(run / "checkpoint.pt"), "--device", "cpu",
                     "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "evaluating on split 'test'" in out and "| stapler |" in out
    pred = tmp_path / "pred"
    assert cli.main(["predict", str(root / "test" / "0.jpg"), "--checkpoint", str(run / "checkpoint.pt"),
                     "--out", str(pred), "--score-thresh", "0", "--device", "cpu"]) == 0
    for d in json.loads((pred / "detections.json").read_text())[0]["detections"]:
        assert d["name"] in ("stapler", "mug") and not d["name"].startswith("class")


def test_large_jpegs_are_decoded_at_reduced_scale_with_their_boxes(tmp_path):
    from rpnlab.data.imageio import load_image

    root = make_voc(tmp_path / "voc", n_train=2, n_test=1)
    big = Image.open(root / "JPEGImages" / "tr0.jpg").resize((96 * 8, 72 * 8), Image.NEAREST)
    big.save(root / "JPEGImages" / "tr0.jpg", quality=95)
    xml = root / "Annotations" / "tr0.xml"
    text = xml.read_text().replace("<width>96</width><height>72</height>", "<width>768</width><height>576</height>")
    for tag in ("xmin", "ymin", "xmax", "ymax"):  # the boxes of the 8x larger file
        parts = text.split(f"<{tag}>")
        text = parts[0] + "".join(f"<{tag}>" + str(int(p.split("<")[0]) * 8 - (7 if tag[1:] == "min" else 0))
                                  + p[len(p.split("<")[0]):] for p in parts[1:])
    xml.write_text(text)
    cfg = DataConfig(dataset="voc", root=str(root), min_size=72, max_size=96, hflip_prob=0.0)
    image, target = build_dataset(cfg, "train")[0]
    assert image.shape == (3, 72, 96) and target["orig_size"] == (576, 768)
    full = load_image(root / "JPEGImages" / "tr0.jpg")
    reduced, size = load_image(root / "JPEGImages" / "tr0.jpg", 72, 96, with_file_size=True)
    assert full.shape == (3, 576, 768) and size == (576, 768)
    assert reduced.shape == (3, 72, 96)  # the 1/8 DCT scale: just what the resize needs
    # The boxes land on the drawn objects: their mean colour is the class colour.
    for box, label in zip(target["boxes"].round().int().tolist(), target["labels"].tolist()):
        x1, y1, x2, y2 = box
        colour = image[:, y1 + 1:y2 - 1, x1 + 1:x2 - 1].mean(dim=(1, 2)) * 255
        assert torch.allclose(colour, torch.tensor(COLOURS[CLASSES[label - 1]], dtype=torch.float32), atol=25)


def test_photos_preset_trains_from_scratch(tmp_path, capsys):
    root = make_voc(tmp_path / "voc", n_train=2, n_test=2)
    model, data, _ = cli.preset_configs("photos")
    assert (data.min_size, data.max_size, model.backbone, model.pretrained) == (320, 512, "small", None)
    argv = ["train", "--preset", "photos", "--dataset", "voc", "--root", str(root), "--max-iters", "1",
            "--min-size", "64", "--max-size", "96", "--device", "cpu", "--no-progress", "--out-dir", str(tmp_path / "r")]
    assert cli.main(argv) == 0
    state = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)
    assert state["configs"]["train"]["epochs"] == 60 and state["classes"] == ["mug", "stapler"]


def test_readme_section_commands_parse():
    import re
    import shlex
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "data" / "README.md").read_text()
    section = text.split("## Your own photos in 5 minutes", 1)[1].split("\n## ", 1)[0]
    commands = [line.strip() for line in section.splitlines() if line.strip().startswith("rpnlab ")]
    assert len(commands) == 3
    parser = cli.build_parser()
    for command in commands:
        parser.parse_args(shlex.split(command)[1:])  # every option the section uses exists
    commands_parser = next(a for a in parser._actions if a.dest == "command")
    known = "".join(p.format_help() for p in commands_parser.choices.values())
    for option in re.findall(r"`(--[a-z-]+)", section):  # and so does every option it names
        assert option in known, option


def test_read_photos_and_roi_levels(tmp_path):
    from rpnlab.detector.roi import RoIPooler
    from rpnlab.lab.inside import read_photos, roi_levels

    root = make_voc(tmp_path / "voc", n_train=2, n_test=1)
    images, names = read_photos(root / "JPEGImages", 48, 64, limit=2)
    assert names == ["te0.jpg", "tr0.jpg"] and [tuple(i.shape) for i in images] == [(3, 48, 64)] * 2
    with pytest.raises(FileNotFoundError, match="no photos"):
        read_photos(root / "Annotations", 48, 64, limit=2)
    pooler = RoIPooler(spatial_scale=(1 / 4, 1 / 8, 1 / 16, 1 / 32))
    boxes = torch.tensor([[0.0, 0, 20, 20], [0, 0, 224, 224], [0, 0, 900, 900]])
    assert roi_levels(boxes, pooler) == {"stride 4": 1, "stride 8": 0, "stride 16": 1, "stride 32": 1}


def test_color_jitter_changes_lighting_not_boxes():
    from rpnlab.data.transforms import RandomColorJitter, build_transforms

    image = torch.rand(3, 16, 20, generator=torch.Generator().manual_seed(0)) * 0.8 + 0.1
    target = {"boxes": torch.tensor([[1.0, 2, 10, 12]])}
    jitter = RandomColorJitter(0.3, generator=torch.Generator().manual_seed(1))
    out, out_target = jitter(image.clone(), target)
    assert out.shape == image.shape and 0 <= out.min() and out.max() <= 1
    assert not torch.allclose(out, image) and torch.equal(out_target["boxes"], target["boxes"])
    assert torch.allclose(RandomColorJitter(0.0)(image.clone(), target)[0], image)
    with pytest.raises(ValueError, match="strength=1.5"):
        RandomColorJitter(1.5)
    _, data, _ = cli.preset_configs("photos")
    assert "RandomColorJitter(strength=0.3)" in repr(build_transforms(data, train=True))
    assert "Jitter" not in repr(build_transforms(data, train=False))
    with pytest.raises(ValueError, match="color_jitter=2"):
        DataConfig(color_jitter=2).validate()
