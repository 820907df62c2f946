"""Transforms keep boxes on their pixels (checked against torchvision.transforms.v2); batching pads."""

import socket

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as TF

from rpnlab.config import DataConfig
from rpnlab.data import (
    CPU_PRESETS,
    PAPER_PRESET,
    Compose,
    ImageBatch,
    RandomHorizontalFlip,
    RandomVerticalFlip,
    ResizeShortestSide,
    SyntheticShapes,
    build_loader,
    build_transforms,
    collate,
    pad_images,
)
from rpnlab.data.transforms import hflip_boxes, resized_size
from tests.conftest import random_boxes

TOL = 1e-5


def _sample(h, w, n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(3, h, w, generator=g)
    boxes = random_boxes(n, size=min(h, w), generator=g)
    target = {
        "boxes": boxes,
        "labels": torch.randint(1, 4, (n,), generator=g),
        "difficult": torch.zeros(n, dtype=torch.bool),
        "image_id": 7,
        "orig_size": (h, w),
    }
    return image, target


def _tv_boxes(boxes, h, w):
    return tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(h, w))


# ---- resize -------------------------------------------------------------------------------


def test_resized_size_rule():
    assert resized_size(375, 500, *PAPER_PRESET) == (600, 800)  # a typical VOC image
    assert resized_size(500, 1500, *PAPER_PRESET) == (333, 1000)  # capped by the long side
    assert resized_size(128, 128, *CPU_PRESETS["tiny"]) == (128, 128)
    assert resized_size(100, 50, 200, None) == (400, 200)


@settings(max_examples=30, deadline=None)
@given(
    h=st.integers(8, 90),
    w=st.integers(8, 90),
    min_size=st.integers(16, 80),
    extra=st.integers(0, 60),
    seed=st.integers(0, 2**16),
)
def test_resize_matches_torchvision(h, w, min_size, extra, seed):
    image, target = _sample(h, w, seed=seed)
    out_image, out_target = ResizeShortestSide(min_size, min_size + extra)(image, target)
    new_h, new_w = resized_size(h, w, min_size, min_size + extra)
    assert out_image.shape == (3, new_h, new_w)
    assert min(new_h, new_w) == min_size or max(new_h, new_w) == min_size + extra
    assert max(new_h, new_w) <= min_size + extra
    expected = TF.resize(image, [new_h, new_w], antialias=new_h < h or new_w < w)
    torch.testing.assert_close(out_image, expected.clamp(0, 1), atol=TOL, rtol=0)
    expected_boxes = TF.resize(_tv_boxes(target["boxes"], h, w), [new_h, new_w])
    torch.testing.assert_close(
        out_target["boxes"], expected_boxes.as_subclass(torch.Tensor), atol=TOL, rtol=0
    )
    # Everything else travels unchanged, and the input target is not modified.
    assert out_target["labels"] is target["labels"] and out_target["orig_size"] == (h, w)
    assert torch.equal(target["boxes"], _sample(h, w, seed=seed)[1]["boxes"])


def test_resize_keeps_border_boxes_on_the_border():
    image = torch.rand(3, 375, 500)
    target = {"boxes": torch.tensor([[0.0, 0.0, 500.0, 375.0]]), "labels": torch.tensor([1])}
    out_image, out = ResizeShortestSide(*PAPER_PRESET)(image, target)
    assert out_image.shape == (3, 600, 800)
    assert torch.allclose(out["boxes"], torch.tensor([[0.0, 0.0, 800.0, 600.0]]))


def test_resize_identity_and_empty_boxes():
    image, target = _sample(128, 128, n=0)
    out_image, out_target = ResizeShortestSide(128, 256)(image, target)
    assert out_image is image and out_target is target  # nothing to do, nothing done
    out_image, out_target = ResizeShortestSide(64, 256)(image, target)
    assert out_image.shape == (3, 64, 64) and out_target["boxes"].shape == (0, 4)


def test_resize_rejects_bad_arguments():
    with pytest.raises(ValueError, match="min_size"):
        ResizeShortestSide(0, 10)
    with pytest.raises(ValueError, match="max_size"):
        ResizeShortestSide(100, 50)
    with pytest.raises(ValueError, match="image"):
        ResizeShortestSide(10, 20)(torch.rand(10, 10), {"boxes": torch.zeros(0, 4)})


# ---- flip ---------------------------------------------------------------------------------


@pytest.mark.parametrize("flip_class, tv_flip", [(RandomHorizontalFlip, TF.horizontal_flip),
                                                 (RandomVerticalFlip, TF.vertical_flip)])
@settings(max_examples=40, deadline=None)
@given(h=st.integers(4, 60), w=st.integers(4, 60), seed=st.integers(0, 2**16))
def test_flip_matches_torchvision_and_twice_is_identity(flip_class, tv_flip, h, w, seed):
    image, target = _sample(h, w, seed=seed)
    flip = flip_class(p=1.0)
    once_image, once = flip(image, target)
    assert torch.equal(once_image, tv_flip(image))
    expected = tv_flip(_tv_boxes(target["boxes"], h, w)).as_subclass(torch.Tensor)
    torch.testing.assert_close(once["boxes"], expected, atol=TOL, rtol=0)
    twice_image, twice = flip(once_image, once)
    assert torch.equal(twice_image, image)
    torch.testing.assert_close(twice["boxes"], target["boxes"], atol=TOL, rtol=0)
    assert (once["boxes"][:, 2:] >= once["boxes"][:, :2]).all()
    assert flip_class(p=0.0)(image, target)[0] is image
    with pytest.raises(ValueError, match="p="):
        flip_class(p=-0.1)
    assert repr(flip_class(p=0.3)) == f"{flip_class.__name__}(p=0.3)"


def test_vertical_flip_only_where_the_data_config_asks():
    names = lambda cfg, train: [type(t).__name__ for t in build_transforms(cfg, train).transforms]
    assert "RandomVerticalFlip" not in names(DataConfig(), True)  # photos: no
    assert "RandomVerticalFlip" in names(DataConfig(vflip_prob=0.5), True)
    assert "RandomVerticalFlip" not in names(DataConfig(vflip_prob=0.5), False)  # never at test time
    with pytest.raises(ValueError, match="vflip_prob=2"):
        DataConfig(vflip_prob=2).validate()


def test_flipped_box_covers_the_flipped_pixels():
    image = torch.zeros(3, 20, 30)
    image[:, 4:9, 3:11] = 1.0  # the object occupies x in [3, 11), y in [4, 9)
    target = {"boxes": torch.tensor([[3.0, 4.0, 11.0, 9.0]])}
    out_image, out = RandomHorizontalFlip(p=1.0)(image, target)
    x1, y1, x2, y2 = (int(v) for v in out["boxes"][0])
    assert (x1, x2) == (19, 27)
    assert out_image[:, y1:y2, x1:x2].min() == 1 and out_image.sum() == image.sum()


def test_flip_probability_and_generator():
    image, target = _sample(10, 12)
    assert RandomHorizontalFlip(p=0.0)(image, target)[0] is image
    flips = []
    for seed in (1, 1, 2):
        flip = RandomHorizontalFlip(p=0.5, generator=torch.Generator().manual_seed(seed))
        flips.append([not torch.equal(flip(image, target)[0], image) for _ in range(200)])
    assert flips[0] == flips[1] and flips[0] != flips[2]
    assert 70 < sum(flips[0]) < 130
    with pytest.raises(ValueError, match="p="):
        RandomHorizontalFlip(p=1.5)


def test_hflip_boxes_formula():
    boxes = torch.tensor([[1.0, 2.0, 5.0, 7.0]])
    assert hflip_boxes(boxes, 10).tolist() == [[5.0, 2.0, 9.0, 7.0]]
    assert hflip_boxes(torch.zeros(0, 4), 10).shape == (0, 4)


def test_compose_and_build_transforms():
    cfg = DataConfig(min_size=64, max_size=100, hflip_prob=0.5)
    train, test = build_transforms(cfg, train=True), build_transforms(cfg, train=False)
    assert isinstance(train, Compose)
    assert [type(t) for t in train.transforms] == [ResizeShortestSide, RandomHorizontalFlip]
    assert [type(t) for t in test.transforms] == [ResizeShortestSide]
    assert [
        type(t) for t in build_transforms(DataConfig(hflip_prob=0.0), train=True).transforms
    ] == [ResizeShortestSide]
    image, target = _sample(50, 200)
    out_image, out_target = test(image, target)
    assert out_image.shape == (3, 25, 100)  # the long side caps at 100
    torch.testing.assert_close(out_target["boxes"], target["boxes"] / 2, atol=TOL, rtol=0)


# ---- batching -----------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(
    sizes=st.lists(st.tuples(st.integers(1, 70), st.integers(1, 70)), min_size=1, max_size=4),
    divisible=st.sampled_from([1, 8, 16, 32]),
)
def test_pad_images(sizes, divisible):
    images = [torch.rand(3, h, w) + 0.5 for h, w in sizes]  # strictly positive: padding shows as 0
    batch = pad_images(images, size_divisible=divisible)
    b, c, hp, wp = batch.tensors.shape
    assert (b, c) == (len(sizes), 3)
    assert hp % divisible == 0 and wp % divisible == 0
    assert hp - divisible < max(h for h, _ in sizes) <= hp
    assert wp - divisible < max(w for _, w in sizes) <= wp
    assert batch.image_sizes == list(sizes)
    mask = batch.pixel_mask()
    for i, (image, (h, w)) in enumerate(zip(images, sizes)):
        assert torch.equal(batch.tensors[i, :, :h, :w], image)
        assert int(mask[i].sum()) == h * w
    assert (batch.tensors[:, :, ~mask.any(0)] == 0).all()
    assert ((batch.tensors != 0).all(1) == mask).all()


def test_pad_images_errors():
    with pytest.raises(ValueError, match="empty"):
        pad_images([])
    with pytest.raises(ValueError, match=r"images\[1\]"):
        pad_images([torch.rand(3, 4, 4), torch.rand(4, 4)])
    with pytest.raises(ValueError, match=r"images\[1\]"):
        pad_images([torch.rand(3, 4, 4), torch.rand(1, 4, 4)])
    with pytest.raises(ValueError, match="size_divisible"):
        pad_images([torch.rand(3, 4, 4)], size_divisible=0)
    with pytest.raises(ValueError, match="image_sizes"):
        ImageBatch(torch.zeros(2, 3, 4, 4), [(4, 4)])


def test_collate_and_image_batch():
    samples = [_sample(30, 20, seed=1), _sample(17, 40, n=0, seed=2)]
    batch, targets = collate(samples)
    assert batch.tensors.shape == (2, 3, 32, 48)
    assert batch.image_sizes == [(30, 20), (17, 40)] and len(batch) == 2
    assert targets[0] is samples[0][1] and targets[1]["boxes"].shape == (0, 4)
    moved = batch.to("cpu")
    assert isinstance(moved, ImageBatch) and torch.equal(moved.tensors, batch.tensors)
    assert moved.device == torch.device("cpu")
    batch32, _ = collate(samples, size_divisible=32)
    assert batch32.tensors.shape == (2, 3, 32, 64)
    with pytest.raises(ValueError, match="samples"):
        collate([])


# ---- loaders ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_dataset():
    return SyntheticShapes("val", num_images=10, image_size=40, cache=False)


def _order(loader):
    return [t["image_id"] for _, targets in loader for t in targets]


def test_build_loader_is_seeded(small_dataset):
    loader = build_loader(small_dataset, batch_size=3, shuffle=True, seed=5)
    batch, targets = next(iter(loader))
    assert isinstance(batch, ImageBatch) and batch.tensors.shape == (3, 3, 48, 48)
    assert len(targets) == 3
    first = _order(build_loader(small_dataset, batch_size=3, shuffle=True, seed=5))
    assert sorted(first) == list(range(10))
    assert _order(build_loader(small_dataset, batch_size=3, shuffle=True, seed=5)) == first
    assert _order(loader) != first  # the generator moves on: the next epoch is shuffled anew
    assert _order(build_loader(small_dataset, batch_size=3, shuffle=True, seed=6)) != first
    assert _order(build_loader(small_dataset, batch_size=4, shuffle=False)) == list(range(10))
    assert len(build_loader(small_dataset, batch_size=4, drop_last=True)) == 2
    with pytest.raises(ValueError, match="batch_size"):
        build_loader(small_dataset, batch_size=0)


def test_build_loader_custom_stride(small_dataset):
    batch, _ = next(iter(build_loader(small_dataset, batch_size=2, size_divisible=32)))
    assert batch.tensors.shape[-2:] == (64, 64) and batch.image_sizes == [(40, 40)] * 2


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_build_loader_distributed(small_dataset, monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        loader = build_loader(small_dataset, batch_size=4, shuffle=True, seed=3, distributed=True)
        assert isinstance(loader.sampler, torch.utils.data.DistributedSampler)
        loader.sampler.set_epoch(0)
        epoch0 = _order(loader)
        loader.sampler.set_epoch(1)
        epoch1 = _order(loader)
        assert sorted(epoch0) == sorted(epoch1) == list(range(10))
        assert epoch0 != epoch1
    finally:
        dist.destroy_process_group()
