"""A few images of a dataset written out as PNG files, with their boxes as JSON.

What a learner needs to try ``rpnlab predict`` (or any other tool) on real files without bringing
photos: ``export_samples("runs/samples", split="test", count=4)`` writes
``runs/samples/test_000.png ...`` and ``runs/samples/annotations.json`` (per image: file, size
``[H, W]``, ``boxes`` as x1, y1, x2, y2 pixels, ``labels`` 1..C and class ``names``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from PIL import Image

__all__ = ["export_samples"]


def export_samples(out_dir: str | os.PathLike, split: str = "test", count: int = 4, seed: int = 0,
                   first: int = 0) -> list[Path]:
    """Write images ``first .. first + count - 1`` of the synthetic ``split`` to ``out_dir``.

    Returns the PNG paths. ``annotations.json`` in ``out_dir`` lists their ground truth.
    """
    from rpnlab.data.synthetic import SyntheticShapes

    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise ValueError(f"count must be a positive int, got {count!r}")
    if not isinstance(first, int) or isinstance(first, bool) or first < 0:
        raise ValueError(f"first must be an int >= 0, got {first!r}")
    dataset = SyntheticShapes(split, seed=seed)
    if first + count > len(dataset):
        raise ValueError(f"first + count = {first + count} exceeds the {len(dataset)} images of split {split!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths, entries = [], []
    for index in range(first, first + count):
        image, target = dataset[index]  # (3, S, S) in [0, 1]
        pixels = (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        path = out / f"{split}_{index:03d}.png"
        Image.fromarray(pixels).save(path)
        labels = [int(v) for v in target["labels"]]
        entries.append({
            "file": path.name,
            "size": [int(image.shape[-2]), int(image.shape[-1])],
            "boxes": [[round(float(v), 2) for v in box] for box in target["boxes"]],
            "labels": labels,
            "names": [dataset.classes[v - 1] for v in labels],
        })
        paths.append(path)
    (out / "annotations.json").write_text(json.dumps(entries, indent=2) + "\n", encoding="utf-8")
    return paths
