"""Value checks of the public tensor API, and the switch that decides when they run.

Shape, dtype and threshold checks read only Python numbers and tensor metadata: they always run.
Checks of tensor *values* (NaN/inf boxes and scores, labels out of range, a RoI's batch index)
must read the tensor, which on a GPU waits for it (a host sync). So they run

- always for tensors on the CPU (no sync; the cost is one pass over the values), and
- for tensors on an accelerator only when value checks are switched on: the environment variable
  ``RPNLAB_CHECK_VALUES=1``, ``set_value_checks(True)``, or ``with value_checks():``.

Functions that use this say so in their docstring ("values checked: CPU, or with value checks on").
Internal hot paths (matching, proposal selection in the model) do not call these; the trainer
validates targets once per batch on the CPU, before they move to the device.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator

import torch
from torch import Tensor

__all__ = ["check_finite", "check_labels", "check_threshold", "set_value_checks", "value_checks", "values_checked"]

_enabled = os.environ.get("RPNLAB_CHECK_VALUES", "").strip().lower() not in ("", "0", "false", "no")


def set_value_checks(enabled: bool) -> bool:
    """Switch value checks on accelerator tensors on or off; returns the previous setting."""
    global _enabled
    previous, _enabled = _enabled, bool(enabled)
    return previous


@contextlib.contextmanager
def value_checks(enabled: bool = True) -> Iterator[None]:
    """``with value_checks():`` checks values of accelerator tensors too inside the block."""
    previous = set_value_checks(enabled)
    try:
        yield
    finally:
        set_value_checks(previous)


def values_checked(t: Tensor) -> bool:
    """Whether value checks run for ``t``: on the CPU always, elsewhere when switched on."""
    return t.device.type == "cpu" or _enabled


def check_finite(t: Tensor, name: str) -> None:
    """``ValueError`` naming ``name`` and the first index when ``t`` holds NaN or infinity."""
    if t.numel() and t.is_floating_point() and values_checked(t):
        finite = torch.isfinite(t)
        if not bool(finite.all()):
            idx = (~finite).nonzero()[0].tolist()
            raise ValueError(f"{name} holds a non-finite value ({t[tuple(idx)].item()}) at index {idx}")


def check_labels(labels: Tensor, name: str, low: int, high: int) -> None:
    """``ValueError`` naming ``name`` unless every label is in ``low..high``."""
    if labels.numel() and values_checked(labels):
        lo, hi = int(labels.min()), int(labels.max())
        if lo < low or hi > high:
            bad = lo if lo < low else hi
            raise ValueError(f"{name} holds label {bad}, outside {low}..{high}")


def check_threshold(value, name: str, low: float = 0.0, high: float = 1.0) -> float:
    """A finite number in ``[low, high]`` (read on the host: always checked), else ``ValueError``."""
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not low <= value <= high:
        raise ValueError(f"{name}={value!r} is invalid: expected a number in [{low:g}, {high:g}]")
    return float(value)
