"""Checkpoint files: written atomically, read back safely.

``save_checkpoint`` writes to a temporary file in the target's folder, flushes it to disk and then
renames it over the target (``os.replace`` is atomic on one file system). A crash mid-write
therefore leaves the previous checkpoint intact, never half a file.

``load_checkpoint`` uses ``torch.load(weights_only=True)``, which unpickles only tensors and plain
containers, so opening a checkpoint someone sent you cannot run code. The price: a checkpoint holds
only tensors, numbers, strings, lists and dicts; configs go in as ``config.to_dict`` output and
RNG states as tensors (see ``rng_state`` / ``set_rng_state``).

No bad state is written or read: a save that fails (a full disk, no permission) is one
``CheckpointError`` naming the file and the system's reason, with the previous checkpoint intact;
``remove_stale_temp_files`` deletes what a killed save left behind; ``first_non_finite`` finds a
NaN/inf tensor in a state (the trainer checks before every save) and ``load_model`` refuses
weights that hold one.
"""

from __future__ import annotations

import errno
import os
import pickle
import random
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "CheckpointError",
    "CheckpointWriteError",
    "first_non_finite",
    "load_checkpoint",
    "load_model",
    "remove_stale_temp_files",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
]


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated or not a checkpoint, holds non-finite weights, or
    cannot be written; the message names the file."""


class CheckpointWriteError(CheckpointError, OSError):
    """A checkpoint could not be written (a full disk, no permission); also an ``OSError``, since
    the cause is the operating system's."""


def _os_error(err: BaseException) -> OSError | None:
    """The ``OSError`` behind ``err`` (torch wraps a failed write in a ``RuntimeError``), or None."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def _write_failure(path: Path, err: BaseException) -> CheckpointWriteError:
    os_err = _os_error(err)
    if os_err is not None and os_err.errno is not None:
        reason = os.strerror(os_err.errno)
    elif "No space left" in str(err):
        reason = os.strerror(errno.ENOSPC)
    else:
        reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    return CheckpointWriteError(f"cannot write checkpoint {str(path)!r}: {reason}; the previous checkpoint "
                                "(if any) is left as it was")


def temp_prefix(path: Path) -> str:
    return f".{path.name}."


def remove_stale_temp_files(path: str | os.PathLike) -> list[Path]:
    """Delete ``.<name>.*.tmp`` files next to checkpoint ``path``: what a killed save left behind.

    Call it when a run starts (one writer per checkpoint path). Returns the files removed.
    """
    path = Path(path)
    removed = []
    if path.parent.is_dir():
        for tmp in path.parent.glob(f"{temp_prefix(path)}*.tmp"):
            try:
                tmp.unlink()
                removed.append(tmp)
            except OSError:
                pass  # another process's, or not ours to remove: leave it
    return removed


def first_non_finite(state: Any, prefix: str = "") -> str | None:
    """The name (``model.rpn.conv.weight``, ``optimizer.state.3.momentum_buffer``) of the first
    floating-point tensor in ``state`` (nested dicts/lists) holding NaN or infinity, or None.

    Reads every tensor: one host sync per tensor on a GPU, so call it at a save, not per step.
    """
    if isinstance(state, torch.Tensor):
        if state.is_floating_point() and state.numel() and not bool(torch.isfinite(state).all()):
            return prefix or "tensor"
        return None
    if isinstance(state, dict):
        items = state.items()
    elif isinstance(state, (list, tuple)):
        items = enumerate(state)
    else:
        return None
    for key, value in items:
        found = first_non_finite(value, f"{prefix}.{key}" if prefix else str(key))
        if found:
            return found
    return None


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically (temp file in the same folder, fsync, ``os.replace``).

    Creates the folder if needed and returns the path. ``state`` must contain only what
    ``torch.load(weights_only=True)`` accepts (tensors, numbers, strings, lists, tuples, dicts).
    """
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict, got {type(state).__name__}")
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise _write_failure(path, err) from err
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        # Leave no stray temp file behind, and leave the old checkpoint as it was.
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(err, (OSError, RuntimeError)):
            raise _write_failure(path, err) from err
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
    truncated, corrupt, unreadable or holds something other than a dict; both name the file.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint file not found: {str(path)!r}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} is a folder, not a file")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError,
            KeyError, IndexError, TypeError, AttributeError, UnicodeDecodeError, MemoryError) as err:
        # torch.load of a file that is no checkpoint can fail almost any way (KeyError: 101 for
        # plain text): every one of them means "not a checkpoint".
        if isinstance(err, pickle.UnpicklingError) and "GLOBAL" in str(err).upper():
            raise CheckpointError(f"cannot read checkpoint {str(path)!r}: it holds Python objects besides "
                                  "tensors; refused, since loading them could run code") from err
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

    Raises ``CheckpointError`` naming ``path`` when the file is not an rpnlab training checkpoint
    or when its weights hold NaN or infinity (naming the first such tensor).
    """
    from rpnlab.detector.model import FasterRCNN

    state = load_checkpoint(path, map_location=map_location)
    bad = first_non_finite(state.get("model"), "model")
    if bad:
        raise CheckpointError(f"checkpoint {str(path)!r} holds non-finite weights ({bad} has NaN or infinity): "
                              "the run that wrote it diverged; use an earlier checkpoint")
    try:
        return FasterRCNN.from_state(state, map_location=map_location)
    except (ValueError, KeyError, TypeError, RuntimeError) as err:
        raise CheckpointError(f"{str(path)!r} is not a usable rpnlab training checkpoint: {err}") from err
