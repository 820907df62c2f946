"""SyntheticShapes: determinism, cache, sample format and the statistics the course relies on."""

import hashlib
import math

import numpy as np
import pytest
import torch

from rpnlab.config import DataConfig
from rpnlab.data import synthetic
from rpnlab.data.synthetic import SHAPE_CLASSES, SyntheticShapes, default_cache_root, render_image

# sha256 over images, boxes and labels of images 0..2 of each split, seed 0, 128 px.
# If this changes, every cached dataset and every number in the notebooks changes with it:
# bump GENERATOR_VERSION and update the constant on purpose, never to make the test pass.
PINNED_SHA256 = "8266663d5490f0c803599374050ac4bd2aba6a97f50b824bb51fe81a50687b1b"


def _all_samples(ds):
    return [ds[i] for i in range(len(ds))]


def _assert_same(ds_a, ds_b):
    assert len(ds_a) == len(ds_b)
    for (img_a, t_a), (img_b, t_b) in zip(_all_samples(ds_a), _all_samples(ds_b)):
        assert torch.equal(img_a, img_b)
        assert torch.equal(t_a["boxes"], t_b["boxes"])
        assert torch.equal(t_a["labels"], t_b["labels"])


@pytest.fixture(scope="module")
def train_split():
    """The full default train split (600 images), generated in memory once for this module."""
    cfg = DataConfig()
    return SyntheticShapes(
        "train", num_images=cfg.num_train, image_size=cfg.image_size, seed=cfg.seed, cache=False
    )


def test_defaults_match_data_config():
    cfg = DataConfig()
    assert synthetic.DEFAULT_NUM_IMAGES == {
        "train": cfg.num_train,
        "val": cfg.num_val,
        "test": cfg.num_test,
    }
    assert SyntheticShapes.classes == SHAPE_CLASSES and len(SHAPE_CLASSES) >= 3


def test_same_seed_is_bitwise_equal():
    a = SyntheticShapes("train", num_images=12, seed=3, cache=False)
    b = SyntheticShapes("train", num_images=12, seed=3, cache=False)
    _assert_same(a, b)


def test_pinned_pixels():
    digest = hashlib.sha256()
    for split in ("train", "val", "test"):
        for i in range(3):
            r = render_image(0, split, i)
            digest.update(r.image.tobytes())
            digest.update(r.boxes.tobytes())
            digest.update(r.labels.tobytes())
    assert digest.hexdigest() == PINNED_SHA256


def test_image_depends_only_on_seed_split_index():
    short = SyntheticShapes("val", num_images=4, seed=1, cache=False)
    long = SyntheticShapes("val", num_images=9, seed=1, cache=False)
    for i in range(4):
        assert torch.equal(short[i][0], long[i][0])
        assert torch.equal(short[i][1]["boxes"], long[i][1]["boxes"])


def test_different_seeds_and_splits_differ():
    images = {}
    for seed in (0, 1):
        for split in ("train", "val", "test"):
            ds = SyntheticShapes(split, num_images=6, seed=seed, cache=False)
            images[seed, split] = [ds[i][0] for i in range(len(ds))]
    keys = list(images)
    for k, key_a in enumerate(keys):
        for key_b in keys[k + 1 :]:
            for img_a in images[key_a]:
                for img_b in images[key_b]:
                    assert not torch.equal(img_a, img_b), (key_a, key_b)


def test_cache_round_trip(tmp_path, monkeypatch):
    memory = SyntheticShapes("test", num_images=7, seed=2, cache=False)
    first = SyntheticShapes("test", num_images=7, seed=2, root=tmp_path)
    assert first.cache_path is not None and first.cache_path.parent == tmp_path
    assert first.cache_path.is_file()
    assert [p.name for p in tmp_path.iterdir()] == [first.cache_path.name]  # no temp file left
    assert first.cache_path.stat().st_mode & 0o777 == 0o644

    def no_generation(params):
        raise AssertionError("the cache should have been read")

    monkeypatch.setattr(synthetic, "_generate", no_generation)
    second = SyntheticShapes("test", num_images=7, seed=2, root=tmp_path)
    _assert_same(memory, second)
    _assert_same(memory, first)
    stored = torch.load(first.cache_path, weights_only=True)
    assert stored["images"].dtype == torch.uint8 and stored["images"].shape == (7, 3, 128, 128)


def test_cache_name_depends_on_every_parameter(tmp_path):
    base = {"split": "val", "num_images": 2, "image_size": 64, "seed": 0}
    names = {SyntheticShapes(**base, root=tmp_path).cache_path.name}
    for key, value in (("split", "test"), ("num_images", 3), ("image_size", 48), ("seed", 5)):
        names.add(SyntheticShapes(**{**base, key: value}, root=tmp_path).cache_path.name)
    assert len(names) == 5


def test_corrupt_cache_is_regenerated(tmp_path):
    ds = SyntheticShapes("val", num_images=3, root=tmp_path)
    ds.cache_path.write_bytes(b"not a torch file")
    with pytest.warns(UserWarning, match="regenerating"):
        again = SyntheticShapes("val", num_images=3, root=tmp_path)
    _assert_same(SyntheticShapes("val", num_images=3, cache=False), again)
    SyntheticShapes("val", num_images=3, root=tmp_path)  # the rewritten cache reads cleanly


def test_default_cache_root_is_in_the_repo():
    root = default_cache_root()
    assert root.parts[-2:] == ("data", "synthetic")


def test_sample_format():
    ds = SyntheticShapes("train", num_images=10, image_size=96, cache=False)
    assert ds.num_classes == len(ds.classes) == 3
    for i in range(len(ds)):
        image, target = ds[i]
        assert image.dtype == torch.float32 and image.shape == (3, 96, 96)
        assert 0.0 <= image.min() and image.max() <= 1.0
        m = target["boxes"].shape[0]
        assert target["boxes"].dtype == torch.float32 and target["boxes"].shape == (m, 4)
        assert target["labels"].dtype == torch.int64 and target["labels"].shape == (m,)
        assert target["difficult"].dtype == torch.bool and not target["difficult"].any()
        assert target["image_id"] == i and isinstance(target["image_id"], int)
        assert target["orig_size"] == (96, 96)


def test_getitem_returns_copies():
    ds = SyntheticShapes("train", num_images=6, cache=False)
    index = next(i for i in range(len(ds)) if len(ds.get_target(i)["boxes"]) > 0)
    image, target = ds[index]
    original_boxes = target["boxes"].clone()
    image.zero_()
    target["boxes"].zero_()
    again_image, again = ds[index]
    assert again_image.abs().sum() > 0
    assert torch.equal(again["boxes"], original_boxes)


def test_indexing():
    ds = SyntheticShapes("val", num_images=4, cache=False)
    assert torch.equal(ds[-1][0], ds[3][0])
    assert ds[-1][1]["image_id"] == 3
    with pytest.raises(IndexError):
        ds[4]
    with pytest.raises(TypeError, match="index"):
        ds[1.0]


def test_transforms_are_applied():
    def blank(image, target):
        return image * 0, {**target, "seen": True}

    image, target = SyntheticShapes("val", num_images=2, cache=False, transforms=blank)[0]
    assert image.abs().sum() == 0 and target["seen"]


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"split": "trainval"}, "split"),
        ({"image_size": 16}, "image_size"),
        ({"num_images": -1}, "num_images"),
        ({"seed": -2}, "seed"),
        ({"num_images": 2.5}, "num_images"),
    ],
)
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SyntheticShapes(**kwargs, cache=False)


def test_empty_split():
    ds = SyntheticShapes("test", num_images=0, cache=False)
    assert len(ds) == 0
    assert ds.describe()["num_objects"] == 0


def test_other_image_sizes_scale_objects():
    ds = SyntheticShapes("train", num_images=40, image_size=64, cache=False)
    stats = ds.describe()
    assert stats["size_px"]["max"] <= 0.6 * 64 + 2
    for i in range(len(ds)):
        boxes = ds.get_target(i)["boxes"]
        assert (boxes >= 0).all() and (boxes <= 64).all()


# ---- statistics over the default train split ---------------------------------------------


def _stacked(ds):
    targets = [ds.get_target(i) for i in range(len(ds))]
    boxes = torch.cat([t["boxes"] for t in targets])
    labels = torch.cat([t["labels"] for t in targets])
    counts = torch.tensor([len(t["labels"]) for t in targets])
    return boxes, labels, counts


def test_statistics_sizes_and_ratios(train_split):
    boxes, _, _ = _stacked(train_split)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    sizes, ratios = (w * h).sqrt(), h / w
    assert sizes.min() <= 14 and sizes.max() >= 64  # small and large anchors both needed
    assert ratios.min() <= 1 / 2.5 and ratios.max() >= 2.5  # wide and tall objects both present
    assert (w >= synthetic._MIN_SIDE).all() and (h >= synthetic._MIN_SIDE).all()
    # Not all of one kind: at least a fifth each of small (<24 px), medium and large (>48 px).
    assert (sizes < 24).float().mean() > 0.2 and (sizes > 48).float().mean() > 0.1


def test_statistics_boxes_and_labels(train_split):
    boxes, labels, counts = _stacked(train_split)
    size = train_split.image_size
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= size).all()
    assert (boxes[:, 2:] > boxes[:, :2]).all()
    assert labels.min() >= 1 and labels.max() <= train_split.num_classes
    per_class = torch.bincount(labels, minlength=train_split.num_classes + 1)[1:]
    assert (per_class > 0.2 * len(labels)).all()  # every class well represented
    empty = (counts == 0).float().mean().item()
    assert 0.03 <= empty <= 0.12
    assert counts.max() >= 5
    assert (counts >= 2).float().mean() > 0.5  # overlap and occlusion need company


def test_statistics_occlusion(train_split):
    visible = torch.cat([train_split.visible_fractions(i) for i in range(len(train_split))])
    assert visible.min() >= synthetic._MIN_VISIBLE  # nothing more than 70% hidden
    assert (visible < 0.9).any()  # yet some objects really are occluded
    # Some boxes overlap each other.
    overlapping = 0
    for i in range(len(train_split)):
        b = train_split.get_target(i)["boxes"]
        if len(b) > 1:
            lt = torch.max(b[:, None, :2], b[None, :, :2])
            rb = torch.min(b[:, None, 2:], b[None, :, 2:])
            inter = (rb - lt).clamp(min=0).prod(-1)
            overlapping += int((inter.triu(1) > 0).sum())
    assert overlapping > 50


def test_object_colours_vary(train_split):
    """The centres of unoccluded objects take diverse colours (random, not a small palette)."""
    centres = []
    for i in range(60):
        image, target = train_split[i]
        vis = train_split.visible_fractions(i)
        for box, v in zip(target["boxes"], vis):
            x1, y1, x2, y2 = (int(c) for c in box.tolist())
            if v < 1 or x2 - x1 < 10 or y2 - y1 < 10:
                continue
            cx, cy = (x1 + x2) // 2, (y1 + y2) // 2
            inside = image[:, cy - 2 : cy + 3, cx - 2 : cx + 3].mean((1, 2))
            centres.append(inside)
    assert len(centres) > 20
    colours = torch.stack(centres)
    assert colours.std(0).min() > 0.15


def test_describe_matches_the_data(train_split):
    stats = train_split.describe()
    boxes, labels, counts = _stacked(train_split)
    assert stats["num_images"] == 600 and stats["num_objects"] == len(labels)
    assert sum(stats["per_class"].values()) == len(labels)
    assert list(stats["per_class"]) == list(SHAPE_CLASSES)
    assert stats["empty_images"] == int((counts == 0).sum())
    assert stats["objects_per_image"]["max"] == int(counts.max())
    w = boxes[:, 2] - boxes[:, 0]
    assert math.isclose(stats["width_px"]["min"], w.min().item())
    assert stats["ratio_hw"]["min"] < 1 < stats["ratio_hw"]["max"]


def test_render_image_matches_dataset(train_split):
    r = render_image(0, "train", 5)
    image, target = train_split[5]
    assert np.array_equal((image * 255).round().to(torch.uint8).numpy(), r.image)
    assert np.array_equal(target["boxes"].numpy(), r.boxes)
