"""Named starting configurations: ``(ModelConfig, DataConfig, TrainConfig)`` for a kind of machine.

- ``"synthetic"``: the CPU preset for the embedded 128 px shapes (``synthetic_data_config``:
  upsampled to 192 px, flips both ways, colour jitter; ``synthetic_detector_config``: the course's
  ``synthetic_model_config`` with anchors scaled with the images; ``synthetic_train_config``: bf16
  where the CPU has it): what ``rpnlab train``, notebook 08 and ``benchmarks/bench_detector.py`` use.
- ``"gpu"``: the same shapes drawn at 512 px for one CUDA GPU (``gpu_model_config``,
  ``gpu_train_config``): the paper's anchor scales where they fit, its proposal and RoI counts,
  more epochs, bf16 mixed precision. Selected by ``rpnlab train --preset gpu`` and by the
  ``preset`` parameter of notebooks 08 and 09. It builds and validates anywhere; training it
  needs CUDA (``amp="bf16"``), and an option such as ``--amp off --device cpu`` overrides that.
- ``"defaults"``: the dataclass defaults, the paper's values (VGG-16-sized, for VOC or COCO).
- ``"photos"``: a few hundred of your photos from scratch, when no pretrained weights are available
  (``photos_configs``).
"""

from __future__ import annotations

import dataclasses

from rpnlab.config import AnchorConfig, DataConfig, ModelConfig, TrainConfig

__all__ = ["PRESETS", "gpu_data_config", "photos_configs", "preset_configs", "synthetic_data_config",
           "synthetic_detector_config"]

PRESETS = ("synthetic", "gpu", "defaults", "photos")
# The side of the images the course's model (``synthetic_model_config``) and its anchors were made for.
COURSE_INPUT_SIZE = 128


def synthetic_data_config(**overrides) -> DataConfig:
    """The CPU preset's data: the 128 px shapes upsampled to 192 px, flipped both ways and
    colour-jittered in training.

    Chosen by measurement for issue 8 (``benchmarks/bench_recipe.py``, val mAP@0.5 after 2400
    iterations, seed 0, one thread): 128 px with horizontal flips only 0.723; adding vertical flips
    (the shapes have no up and down: triangles point all four ways) and a colour jitter of 0.2,
    0.747; then upsampling to 160 px 0.803, to 192 px 0.821 (0.847 with the anchors scaled to
    match, which ``synthetic_detector_config`` does). An iteration at 192 px costs ~1.2x one at
    128 px on 2 CPU cores (143 against 120 CPU ms), and the gain per iteration outweighs it in the
    wall-clock benchmark (``benchmarks/bench_detector.py``, 2 threads, bf16): 0.874 after 5 minutes
    (4012 iterations) against 0.837 at 128 px (4831); 0.915-0.916 after 15 minutes (9705 and 11613
    iterations, two runs) against 0.891. ``min_size=128, max_size=256`` gives the course's 128 px
    images back (``preset_configs("synthetic", input_size=128)``).
    """
    cfg = DataConfig(min_size=192, max_size=384, vflip_prob=0.5, color_jitter=0.2)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg.validate()


def synthetic_detector_config(data: DataConfig | None = None) -> ModelConfig:
    """The CPU preset's model for ``data`` (default ``synthetic_data_config()``): the course's model
    (``synthetic_model_config``) with its anchor sizes scaled by the network's input side over the
    course's 128 px (the shapes are fractions of the image, whatever size they are drawn at).

    At the course's 128 px they are its 16, 32, 64; upsampled to the preset's 192 px the shapes
    are 18-115 px and the anchors become 24, 48, 96: measured with ``benchmarks/bench_recipe.py``
    (2400 iterations, seed 0), 0.821 with the course's anchors at 192 px, 0.847 with the scaled
    ones. RoI Align is ``implementation="auto"``.
    """
    from rpnlab.detector.model import synthetic_model_config

    data = data if data is not None else synthetic_data_config()
    model = synthetic_model_config()
    # The shapes' sizes are fractions of the image, so they follow the side the network sees
    # (the square images are resized to min(min_size, max_size)), whatever size they were drawn at;
    # the course's anchors were chosen for a 128 px input.
    factor = min(data.min_size, data.max_size) / COURSE_INPUT_SIZE
    model.anchors = dataclasses.replace(
        model.anchors, sizes=tuple(tuple(size * factor for size in level) for level in model.anchors.sizes))
    # RoI Align from the small stride-8 map (16 x 16 at 128 px, 24 x 24 at 192) in matrix form on
    # the CPU, torchvision's kernel on a GPU: at 128 px 54 against 63 ms per training iteration
    # (2 threads, bf16; benchmarks/bench_roi_crossover.py).
    model.roi.implementation = "auto"
    return model.validate()


def gpu_data_config(**overrides) -> DataConfig:
    """The synthetic shapes at 512 px, not resized (objects 48-307 px: ``[0.094, 0.6] x 512``)."""
    cfg = DataConfig(image_size=512, min_size=512, max_size=1024)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg.validate()


def preset_configs(name: str = "synthetic", input_size: int = 0) -> tuple[ModelConfig, DataConfig, TrainConfig]:
    """The ``(model, data, train)`` configs of preset ``name`` (one of ``PRESETS``), validated.

    ``input_size`` (``"synthetic"`` only; 0: the preset's 192): the side the 128 px shapes are
    resized to, the anchors scaled to match (``synthetic_detector_config``); 128 gives the course's
    images and anchors (notebooks 01-07).
    """
    from rpnlab.detector.model import gpu_model_config
    from rpnlab.engine.train import gpu_train_config, synthetic_train_config

    if isinstance(input_size, bool) or not isinstance(input_size, int) or (input_size and input_size < 32):
        raise ValueError(f"input_size={input_size!r} is invalid: expected a whole number of pixels >= 32, or 0 "
                         "for the preset's")
    if input_size and name != "synthetic":
        raise ValueError(f"input_size={input_size!r} applies to the 'synthetic' preset only, not to {name!r}")
    if name == "synthetic":
        data = synthetic_data_config(**({"min_size": input_size, "max_size": 2 * input_size} if input_size else {}))
        return synthetic_detector_config(data), data, synthetic_train_config()
    if name == "gpu":
        return gpu_model_config(), gpu_data_config(), gpu_train_config()
    if name == "defaults":
        return ModelConfig().validate(), DataConfig().validate(), TrainConfig().validate()
    if name == "photos":
        return photos_configs()
    raise ValueError(f"preset={name!r} is invalid: expected one of {', '.join(map(repr, PRESETS))}")


def photos_configs() -> tuple[ModelConfig, DataConfig, TrainConfig]:
    """From scratch on a few hundred photos, when no pretrained weights are available.

    The small backbone (GroupNorm: a batch of 2 normalises like a larger one; inputs normalised
    with the ImageNet mean and std inside the model, as always) at 320/512 px, stride 8; anchors
    of 32-256 px for objects that fill a good part of a photo; horizontal flips and a colour
    jitter of +-30% (brightness, contrast, saturation: the lighting of a few hundred photos is
    not to be learnt as a feature of the objects); a long cosine schedule (60 epochs of ~200
    images: about 6000 iterations) that ``--time-budget-s`` shortens to fit.

    Batches of 2 at lr 0.01 (the rate per image of batch 4 at 0.02) keep the process under 1 GB:
    measured with benchmarks/bench_decode.py (4000x3000 JPEGs, 6 iterations), peak resident
    memory 952 MB at batch 2 against 1086 MB at batch 4; about 730 MB of either is importing
    torch and torchvision (data/README.md, "Memory").

    Expect much less than from ``--init torchvision:<name>``: 200 photos are few to learn features
    from (benchmarks/bench_photos.py measures the presets and fine-tuning on a stand-in folder).
    """
    from rpnlab.detector.model import synthetic_model_config

    model = synthetic_model_config()
    model.anchors = AnchorConfig(sizes=((32.0, 64.0, 128.0, 256.0),), aspect_ratios=((0.5, 1.0, 2.0),),
                                 strides=(8,), offset=0.5)
    model.rpn.pre_nms_top_n_train, model.rpn.post_nms_top_n_train = 2000, 500
    model.rpn.pre_nms_top_n_test, model.rpn.post_nms_top_n_test = 1000, 300
    data = DataConfig(min_size=320, max_size=512, hflip_prob=0.5, color_jitter=0.3)
    train = TrainConfig(epochs=60, batch_size=2, lr=0.01, warmup_iters=100, lr_schedule="cosine")
    return model.validate(), data.validate(), train.validate()
