"""Where computation runs: picking a device, seeding every random generator, describing the setup.

``resolve_device("auto")`` prefers CUDA, then Apple's MPS, then the CPU, so the same notebook runs
on a laptop and on a GPU server. Asking for a device that is not there is an error, not a silent
fallback: a run that you believe is on the GPU but is not wastes hours.
"""

from __future__ import annotations

import os
import platform
import random
import sys

import numpy as np
import torch

__all__ = ["describe_environment", "resolve_device", "seed_everything"]


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """Turn ``"auto" | "cpu" | "cuda" | "cuda:N" | "mps"`` into a ``torch.device`` that exists here.

    ``"auto"`` picks CUDA if available, then MPS, then the CPU. An explicit device that this
    machine lacks raises a ``RuntimeError`` that says what is available instead.
    """
    if isinstance(name, torch.device):
        name = str(name)
    if not isinstance(name, str):
        raise TypeError(f"device must be a string such as 'auto', 'cpu' or 'cuda:0', got {type(name).__name__}")
    name = name.strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        if not _mps_available():
            raise RuntimeError("device='mps' was requested but Apple's MPS backend is not available here; "
                               "use device='cpu' or 'auto'")
        return torch.device("mps")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise RuntimeError(
                f"device={name!r} was requested but CUDA is not available "
                f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}); "
                "use device='cpu' or 'auto'"
            )
        if name == "cuda":
            return torch.device("cuda")
        index_text = name.split(":", 1)[1]
        if not index_text.isdigit():
            raise ValueError(f"device={name!r} is invalid: expected 'cuda:N' with an integer N")
        count = torch.cuda.device_count()
        if int(index_text) >= count:
            raise RuntimeError(f"device={name!r} was requested but only {count} CUDA device(s) exist "
                               f"(cuda:0 .. cuda:{count - 1})")
        return torch.device(name)
    raise ValueError(f"device={name!r} is invalid: expected 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy and torch (CPU and every CUDA device) with ``seed``.

    This makes CPU runs repeatable; GPU kernels may still differ in the last bits between runs.
    """
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def describe_environment(device: str | torch.device = "auto") -> dict:
    """Versions and hardware as a plain dict (notebook 00 prints it; reports keep it for later).

    Keys: python, platform, torch, torchvision, numpy, cuda (version or None), cudnn, device,
    device_name, gpu_count, cpu_threads, cpu_count, mps.
    """
    import torchvision

    dev = resolve_device(device)
    if dev.type == "cuda":
        device_name = torch.cuda.get_device_name(dev)
    elif dev.type == "mps":
        device_name = "Apple MPS"
    else:
        device_name = platform.processor() or platform.machine()
    cudnn = torch.backends.cudnn.version() if torch.cuda.is_available() else None
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": np.__version__,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "cudnn": cudnn,
        "device": str(dev),
        "device_name": device_name,
        "gpu_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "mps": _mps_available(),
    }
