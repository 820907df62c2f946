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


def cpu_threads_for_load(cpu_count: int | None = None, load: float | None = None) -> int:
    """Torch threads for CPU work given the machine's load: the cores other processes leave free.

    Torch's intra-op threads wait for each other at the end of every parallel operation, so when
    other processes hold the cores, each operation waits for the slowest thread to be scheduled
    again: on a 2-core machine at load ~20, a training step of the synthetic detector took 4.9 s
    on 1 thread and 24.9 s on 2 (``benchmarks``-style interleaved measurement, see the issue-11
    note). Hence ``cores - round(load)``, at least 1, at most the cores. ``load``: the cores
    other processes keep busy now (``busy_cores``: measured over a quarter second where
    ``/proc/stat`` exists), else the 1-minute load average, which lags: just after a busy spell
    it still says the machine is full.
    """
    cores = cpu_count or os.cpu_count() or 1
    if load is None:
        load = busy_cores()
    if load is None:
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, min(cores, cores - round(load)))


def busy_cores(window_s: float = 0.25, stat_path: str = "/proc/stat") -> float | None:
    """How many cores other processes keep busy, measured over ``window_s`` from ``/proc/stat``
    (the caller sleeps meanwhile); ``None`` where that file does not exist (macOS, Windows)."""
    import time

    def sample() -> tuple[int, int] | None:
        try:
            with open(stat_path) as f:
                fields = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError, IndexError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields), idle

    first = sample()
    if first is None:
        return None
    time.sleep(window_s)
    second = sample()
    if second is None or second[0] <= first[0]:
        return None
    total, idle = second[0] - first[0], second[1] - first[1]
    return (os.cpu_count() or 1) * (total - idle) / total


def configure_cpu_threads() -> int | None:
    """Set torch's thread count for a training run on the CPU from the load (``cpu_threads_for_load``).

    An explicit choice wins: ``RPNLAB_THREADS`` (a positive int) or ``OMP_NUM_THREADS`` in the
    environment. Returns the count set, or ``None`` when an explicit ``OMP_NUM_THREADS`` is left alone.
    """
    chosen = os.environ.get("RPNLAB_THREADS")
    if chosen is not None:
        if not chosen.isdigit() or int(chosen) < 1:
            raise ValueError(f"RPNLAB_THREADS must be a positive int, got {chosen!r}")
        threads = int(chosen)
    elif os.environ.get("OMP_NUM_THREADS"):
        return None
    else:
        threads = cpu_threads_for_load()
    torch.set_num_threads(threads)
    return threads


def native_bf16(device: str | torch.device) -> bool:
    """Whether ``device`` computes in bfloat16 natively, so that bf16 autocast makes training faster.

    CUDA: ``torch.cuda.is_bf16_supported()`` (Ampere and later). CPU: AMX tiles or AVX512-BF16
    (Intel Sapphire Rapids and later, AMD Zen 4 and later); without them oneDNN emulates bf16 and
    a step gets slower, not faster. MPS: no.
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if dev.type == "cpu":
        checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
        return any(getattr(torch.cpu, name, lambda: False)() for name in checks)
    return False


def resolve_amp(amp: str, device: str | torch.device) -> str:
    """The mixed precision a run on ``device`` uses for ``TrainConfig.amp``: ``"off"``, ``"bf16"`` or ``"fp16"``.

    ``"auto"`` is ``"bf16"`` where the device has native bfloat16 (``native_bf16``), else ``"off"``.
    An explicit choice the device cannot honour is an error naming it: ``"fp16"`` needs CUDA (its
    loss scaling is CUDA's), ``"bf16"`` needs CUDA or a CPU with native bfloat16.
    """
    dev = torch.device(device)
    if amp == "auto":
        return "bf16" if native_bf16(dev) else "off"
    if amp == "fp16" and dev.type != "cuda":
        raise ValueError(f"amp='fp16' needs a CUDA device, but training runs on {dev}; use amp='auto' or 'off'")
    if amp == "bf16" and not (dev.type == "cuda" or (dev.type == "cpu" and native_bf16(dev))):
        where = "this CPU has no native bfloat16 (AMX or AVX512-BF16)" if dev.type == "cpu" else f"on {dev}"
        raise ValueError(f"amp='bf16' needs CUDA or a CPU with native bfloat16, but {where}; use amp='auto' or 'off'")
    return amp


def describe_environment(device: str | torch.device = "auto") -> dict:
    """Versions and hardware as a plain dict (notebook 00 prints it; reports keep it for later).

    Keys: python, platform, torch, torchvision, numpy, cuda (version or None), cudnn, device,
    device_name, gpu_count, cpu_threads, cpu_count, cpu_native_bf16, mps.
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
        "cpu_native_bf16": native_bf16("cpu"),
        "mps": _mps_available(),
    }
