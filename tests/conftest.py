"""Shared fixtures: seeded random boxes and a fixed torch thread count for reproducible tests."""

import os

import matplotlib
import pytest
import torch

matplotlib.use("Agg")
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))


def random_boxes(n: int, size: float = 100.0, generator: torch.Generator | None = None, min_wh: float = 1.0) -> torch.Tensor:
    """``(n, 4)`` valid xyxy boxes inside ``[0, size]``, widths and heights >= ``min_wh``."""
    xy = torch.rand(n, 2, generator=generator) * size * 0.8
    wh = torch.rand(n, 2, generator=generator) * size * 0.5 + min_wh
    return torch.cat([xy, xy + wh], dim=1)


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


@pytest.fixture
def device() -> torch.device:
    """Where device-taking tests run: ``RPNLAB_TEST_DEVICE`` (``make gpu-check`` sets ``cuda``), else CPU."""
    name = os.environ.get("RPNLAB_TEST_DEVICE", "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip(f"RPNLAB_TEST_DEVICE={name} but CUDA is not available")
    return torch.device(name)
