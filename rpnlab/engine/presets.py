"""Named starting configurations: ``(ModelConfig, DataConfig, TrainConfig)`` for a kind of machine.

- ``"synthetic"``: the CPU preset for the embedded 128 px shapes (``synthetic_model_config``,
  ``synthetic_train_config``): what ``rpnlab train`` and notebook 08 use by default.
- ``"gpu"``: the same shapes drawn at 512 px for one CUDA GPU (``gpu_model_config``,
  ``gpu_train_config``): the paper's anchor scales where they fit, its proposal and RoI counts,
  more epochs, bf16 mixed precision. Selected by ``rpnlab train --preset gpu`` and by the
  ``preset`` parameter of notebooks 08 and 09. It builds and validates anywhere; training it
  needs CUDA (``amp="bf16"``), and an option such as ``--amp off --device cpu`` overrides that.
- ``"defaults"``: the dataclass defaults, the paper's values (VGG-16-sized, for VOC or COCO).
"""

from __future__ import annotations

from rpnlab.config import DataConfig, ModelConfig, TrainConfig

__all__ = ["PRESETS", "gpu_data_config", "preset_configs"]

PRESETS = ("synthetic", "gpu", "defaults")


def gpu_data_config(**overrides) -> DataConfig:
    """The synthetic shapes at 512 px, not resized (objects 48-307 px: ``[0.094, 0.6] x 512``)."""
    cfg = DataConfig(image_size=512, min_size=512, max_size=1024)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg.validate()


def preset_configs(name: str = "synthetic") -> tuple[ModelConfig, DataConfig, TrainConfig]:
    """The ``(model, data, train)`` configs of preset ``name`` (one of ``PRESETS``), validated."""
    from rpnlab.detector.model import gpu_model_config, synthetic_model_config
    from rpnlab.engine.train import gpu_train_config, synthetic_train_config

    if name == "synthetic":
        return synthetic_model_config(), DataConfig().validate(), synthetic_train_config()
    if name == "gpu":
        return gpu_model_config(), gpu_data_config(), gpu_train_config()
    if name == "defaults":
        return ModelConfig().validate(), DataConfig().validate(), TrainConfig().validate()
    raise ValueError(f"preset={name!r} is invalid: expected one of {', '.join(map(repr, PRESETS))}")
