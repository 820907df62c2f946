"""Checkpoint files: written atomically, read back safely.

``save_checkpoint`` writes to a temporary file in the target's folder, flushes it to disk and then
renames it over the target (``os.replace`` is atomic on one file system). A crash mid-write
therefore leaves the previous checkpoint intact, never half a file.

``load_checkpoint`` uses ``torch.load(weights_only=True)``, which unpickles only tensors and plain
containers, so opening a checkpoint someone sent you cannot run code. The price: a checkpoint holds
only tensors, numbers, strings, lists and dicts; configs go in as ``config.to_dict`` output and
RNG states as tensors (see ``rng_state`` / ``set_rng_state``).
"""

from __future__ import annotations

import os
import pickle
import random
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["CheckpointError", "load_checkpoint", "load_model", "rng_state", "save_checkpoint", "set_rng_state"]


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated or not a checkpoint; the message names the file."""


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically (temp file in the same folder, fsync, ``os.replace``).

    Creates the folder if needed and returns the path. ``state`` must contain only what
    ``torch.load(weights_only=True)`` accepts (tensors, numbers, strings, lists, tuples, dicts).
    """
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict, got {type(state).__name__}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # Leave no stray temp file behind, and leave the old checkpoint as it was.
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    # Make the rename itself durable (best effort: not every OS lets us fsync a directory).
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return path
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device | None = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by ``save_checkpoint``; tensors land on ``map_location``.

    Raises ``FileNotFoundError`` for a missing file and ``CheckpointError`` for a file that is
    truncated, corrupt or holds something other than a dict; both name the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {str(path)!r}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError) as err:
        raise CheckpointError(
            f"cannot read checkpoint {str(path)!r}: the file is corrupt, truncated or not a "
            f"checkpoint ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
        ) from err
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {str(path)!r} holds a {type(state).__name__}, expected a dict")
    return state


def rng_state() -> dict[str, Any]:
    """Every random generator's state as tensors and plain data (``weights_only``-loadable).

    Keys: ``torch`` (ByteTensor), ``cuda`` (list of ByteTensors, empty without CUDA), ``python``
    (``random.getstate()`` as nested lists), ``numpy`` (the MT19937 key as a uint32 tensor plus
    its position and Gaussian cache).
    """
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": [version, list(internal), gauss],
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` captured (CUDA states only when CUDA is present)."""
    torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state((
        np_state["kind"],
        np_state["keys"].numpy().astype(np.uint32),
        np_state["pos"],
        np_state["has_gauss"],
        np_state["cached_gaussian"],
    ))


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu"):
    """The ``FasterRCNN`` a training checkpoint file holds, on ``map_location``, in eval mode.

    Raises ``CheckpointError`` naming ``path`` when the file is not an rpnlab training checkpoint.
    """
    from rpnlab.detector.model import FasterRCNN

    state = load_checkpoint(path, map_location=map_location)
    try:
        return FasterRCNN.from_state(state, map_location=map_location)
    except ValueError as err:
        raise CheckpointError(f"{str(path)!r}: {err}") from err
