"""Distributed data parallel: two CPU processes (gloo) under torchrun end with identical replicas."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rpnlab.engine.checkpoint import load_model
from rpnlab.engine.train import parameter_digest

TORCHRUN = Path(sys.executable).with_name("torchrun")


@pytest.mark.slow
@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed next to this Python")
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_two_processes_train_identical_replicas(tmp_path):
    out = tmp_path / "run"
    command = [
        str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m", "rpnlab", "train",
        "--root", str(tmp_path / "synthetic"), "--image-size", "64", "--min-size", "64", "--max-size", "64",
        "--num-train", "8", "--batch-size", "2", "--epochs", "2", "--max-iters", "3",
        "--rpn-pre-nms-top-n-train", "100", "--rpn-post-nms-top-n-train", "30", "--roi-batch-size-per-image", "16",
        "--device", "cpu", "--out-dir", str(out), "--no-progress", "--digest",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, check=False, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    digests = [(out / f"digest-rank{r}.txt").read_text().strip() for r in (0, 1)]
    assert digests[0] == digests[1]  # gradients were averaged: both replicas took the same steps
    # Rank 0 alone wrote the checkpoint, and it holds those same parameters.
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["world_size"] == 2 and state["step"] == 3 and len(state["history"]) == 3
    model = load_model(out / "checkpoint.pt")
    assert parameter_digest(model) == digests[0]
    # Each process saw its own half of the data: 2 images per process per step.
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "digest-rank0.txt", "digest-rank1.txt"]
