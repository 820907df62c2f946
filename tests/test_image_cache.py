"""The resized-image cache: same pixels as decoding, a changed file is never served stale, atomic and bounded writes."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from rpnlab.config import DataConfig
from rpnlab.data import imagecache
from rpnlab.data.build import build_dataset
from rpnlab.data.imagecache import ResizedImageCache, default_image_cache_dir, resolve_image_cache
from rpnlab.data.imageio import load_image
from rpnlab.data.transforms import ResizeShortestSide


def _png(path, seed=0, w=400, h=300):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    pixels = np.stack([xx * 255 // w, yy * 255 // h, np.full_like(xx, 40 * seed % 256)], -1)
    pixels = (pixels + rng.integers(0, 30, pixels.shape)).clip(0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def test_cached_image_matches_the_decoded_and_resized_one(tmp_path):
    path = _png(tmp_path / "a.png")
    cache = ResizedImageCache(tmp_path / "cache")
    reference, _ = ResizeShortestSide(64, 80)(load_image(path), {"boxes": torch.zeros(0, 4)})
    first = load_image(path, 64, 80, cache=cache)
    second, size = load_image(path, 64, 80, cache=cache, with_file_size=True)
    assert (cache.misses, cache.writes, cache.hits) == (1, 1, 1)
    assert size == (300, 400) and first.shape == second.shape == reference.shape == (3, 60, 80)
    assert torch.equal(first, second)  # what epoch 1 and the later epochs see
    assert (second - reference).abs().max() <= 1 / 255  # the uint8 resize, within a grey level
    # The transform then leaves it as it is: nothing is resized twice.
    again, _ = ResizeShortestSide(64, 80)(second, {"boxes": torch.zeros(0, 4)})
    assert again is second


def test_small_files_and_no_resize_bypass_the_cache(tmp_path):
    path = _png(tmp_path / "a.png", w=100, h=75)
    cache = ResizedImageCache(tmp_path / "cache")
    load_image(path, 64, 80, cache=cache)  # 75 -> 60: less than 2x, not worth a file
    load_image(path, cache=cache)
    assert (cache.hits, cache.misses, cache.writes) == (0, 0, 0) and not (tmp_path / "cache").exists()


def test_a_changed_file_gets_a_new_entry(tmp_path):
    path = _png(tmp_path / "a.png", seed=0)
    cache = ResizedImageCache(tmp_path / "cache")
    old = load_image(path, 64, 80, cache=cache)
    old_entry = cache.entry(path, (60, 80))
    _png(path, seed=3)  # the photo is edited in place
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(old_entry).st_mtime_ns + 10**9))
    assert cache.entry(path, (60, 80)) != old_entry
    new = load_image(path, 64, 80, cache=cache)
    assert cache.hits == 0 and cache.writes == 2
    assert (new - old).abs().max() > 0.1  # the new picture, not the cached old one
    assert not torch.equal(new, old)
    # Another target size is another entry too.
    assert cache.entry(path, (30, 40)) != cache.entry(path, (60, 80))


def test_writes_are_atomic_and_bad_entries_are_rewritten(tmp_path, monkeypatch):
    path = _png(tmp_path / "a.png")
    cache = ResizedImageCache(tmp_path / "cache")
    good = load_image(path, 64, 80, cache=cache)
    entry = cache.entry(path, (60, 80))
    before = entry.read_bytes()

    def failing_save(handle, array, allow_pickle):
        handle.write(b"\x93NUMPY half a file")
        raise OSError("disk full")

    monkeypatch.setattr(imagecache.np, "save", failing_save)
    assert cache.put(path, (60, 80), good) is None  # skipped, not an error
    assert entry.read_bytes() == before  # the old entry untouched, no temporary file left
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [entry.name]
    monkeypatch.undo()

    entry.write_bytes(before[: len(before) // 2])  # truncated (e.g. a crash of an old version)
    again = load_image(path, 64, 80, cache=cache)
    assert cache.misses == 2 and torch.equal(again, good)
    assert cache.get(path, (60, 80)) is not None


def test_the_cache_stays_under_its_bound(tmp_path):
    cache = ResizedImageCache(tmp_path / "cache", max_bytes=3 * (60 * 80 * 3 + 128) + 10)
    paths = [_png(tmp_path / f"{i}.png", seed=i) for i in range(5)]
    for i, path in enumerate(paths):
        load_image(path, 64, 80, cache=cache)
        os.utime(cache.entry(path, (60, 80)), (1000 + i, 1000 + i))  # distinct ages
    assert cache.size_bytes() <= cache.max_bytes
    kept = {p.name for p in (tmp_path / "cache").glob("*.npy")}
    assert cache.entry(paths[-1], (60, 80)).name in kept  # the newest stays
    assert cache.entry(paths[0], (60, 80)).name not in kept  # the oldest went


def test_default_folder_and_switch(tmp_path, monkeypatch):
    monkeypatch.setenv("RPNLAB_IMAGE_CACHE", "off")
    assert default_image_cache_dir() is None and resolve_image_cache("default") is None
    monkeypatch.setenv("RPNLAB_IMAGE_CACHE", str(tmp_path / "c"))
    assert resolve_image_cache("default").folder == tmp_path / "c"
    with pytest.raises(ValueError, match="image_cache="):
        resolve_image_cache(3)
    with pytest.raises(ValueError, match="max_bytes="):
        ResizedImageCache(tmp_path, max_bytes=0)


def test_voc_png_folder_uses_the_cache_with_its_boxes(tmp_path, monkeypatch):
    monkeypatch.setenv("RPNLAB_IMAGE_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "voc"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True)
    _png(root / "JPEGImages" / "p0.png")
    (root / "Annotations" / "p0.xml").write_text(
        "<annotation><filename>p0.png</filename><size><width>400</width><height>300</height></size>"
        "<object><name>mug</name><bndbox><xmin>101</xmin><ymin>51</ymin><xmax>300</xmax><ymax>250</ymax>"
        "</bndbox></object></annotation>")
    (root / "ImageSets" / "Main" / "train.txt").write_text("p0\n")
    cfg = DataConfig(dataset="voc", root=str(root), min_size=64, max_size=80, hflip_prob=0.0)
    dataset = build_dataset(cfg, "train")
    first, target = dataset[0]
    second, target2 = dataset[0]
    assert dataset.image_cache.hits == 1 and first.shape == (3, 60, 80)
    assert torch.allclose(target["boxes"], torch.tensor([[20.0, 10.0, 60.0, 50.0]]))
    assert torch.equal(target["boxes"], target2["boxes"]) and torch.equal(first, second)
