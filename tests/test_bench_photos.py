"""benchmarks/bench_photos.py's parts: the stand-in photo folder and fine-tuning from an rpnlab checkpoint."""

import importlib.util
from pathlib import Path

import torch

from rpnlab.config import DataConfig
from rpnlab.data.build import build_dataset
from rpnlab.detector.model import FasterRCNN, synthetic_model_config
from rpnlab.engine.checkpoint import save_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_photos", ROOT / "benchmarks" / "bench_photos.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_photo_folder_has_its_own_classes_and_splits(tmp_path):
    bench = _bench()
    root = bench.make_photo_folder(tmp_path / "photos", 10, 128)
    cfg = DataConfig(dataset="voc", root=str(root), min_size=96, max_size=128, hflip_prob=0.0)
    train, test = build_dataset(cfg, "train"), build_dataset(cfg, "test")
    assert train.classes == ("plate", "sign") and (len(train), len(test)) == (8, 2)
    image, _ = train[0]
    assert image.shape == (3, 96, 128)
    boxes = torch.cat([train.get_target(i)["boxes"] for i in range(len(train))])
    assert len(boxes) > 0 and boxes[:, 3].max() <= 96 and boxes[:, 2].max() <= 128  # cropped to 4:3


def test_load_init_keeps_every_fitting_weight_and_refreshes_the_predictor(tmp_path):
    bench = _bench()
    torch.manual_seed(0)
    source = FasterRCNN.from_config(synthetic_model_config(num_classes=3))
    path = tmp_path / "synthetic.pt"
    save_checkpoint(path, {"model": source.state_dict()})
    target = FasterRCNN.from_config(synthetic_model_config(num_classes=2))
    fresh = {k: v.clone() for k, v in target.state_dict().items()}
    loaded, skipped = bench.load_init(target, path)
    assert skipped and all(k.startswith("roi_heads.head.") for k in skipped)
    for key, value in target.state_dict().items():
        if key in loaded:
            assert torch.equal(value, source.state_dict()[key]), key
        else:
            assert torch.equal(value, fresh[key]), key
    assert any(k.startswith("backbone.") for k in loaded) and any(k.startswith("rpn.") for k in loaded)
