"""Checkpoint files: atomic writes, safe loads, clear errors, RNG state round trips."""

import os
import random

import numpy as np
import pytest
import torch

from rpnlab.engine.checkpoint import (
    CheckpointError,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)


def _state(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "model": {"w": torch.randn(3, 4, generator=g), "b": torch.zeros(4)},
        "step": 7,
        "configs": {"model": {"sizes": [[16.0, 32.0]], "pretrained": None}, "train": {"lr": 0.02}},
        "history": [{"step": 0, "total": 1.5, "stage": "joint"}],
    }


def test_round_trip_keeps_tensors_and_plain_data(tmp_path):
    path = tmp_path / "sub" / "ckpt.pt"
    state = _state()
    assert save_checkpoint(path, state) == path
    loaded = load_checkpoint(path)
    assert torch.equal(loaded["model"]["w"], state["model"]["w"])
    assert loaded["step"] == 7
    assert loaded["configs"] == state["configs"]
    assert loaded["history"] == state["history"]
    # No temporary file is left next to the checkpoint.
    assert sorted(os.listdir(path.parent)) == ["ckpt.pt"]


def test_save_replaces_the_old_file(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, _state(0))
    save_checkpoint(path, _state(1))
    assert torch.equal(load_checkpoint(path)["model"]["w"], _state(1)["model"]["w"])


def test_failed_write_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, _state(0))
    before = path.read_bytes()

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, _state(1))
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt"]


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_checkpoint(path)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"PK\x03\x04garbage"])
def test_corrupt_file_names_the_path(tmp_path, content):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="bad.pt.*corrupt"):
        load_checkpoint(path)


def test_truncated_checkpoint_is_reported(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, _state())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="ckpt.pt"):
        load_checkpoint(path)


class _Payload:
    pass


def test_arbitrary_objects_are_refused(tmp_path):
    # weights_only loading: a pickled class instance must not be unpickled.
    path = tmp_path / "evil.pt"
    torch.save({"obj": _Payload()}, path)
    with pytest.raises(CheckpointError, match="evil.pt"):
        load_checkpoint(path)


def test_non_dict_checkpoint_is_refused(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(CheckpointError, match="list"):
        load_checkpoint(path)
    with pytest.raises(TypeError, match="state must be a dict"):
        save_checkpoint(path, [1, 2])


def _draws():
    return random.random(), float(np.random.rand()), float(np.random.randn()), torch.rand(3).tolist()


def test_rng_state_round_trip_through_a_file(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.randn()  # leaves a cached Gaussian in NumPy's state
    save_checkpoint(tmp_path / "rng.pt", {"rng": rng_state()})
    expected = _draws()
    # Move every generator on, then restore.
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    set_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    assert _draws() == expected
