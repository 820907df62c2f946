"""Faults: a full disk, no permission, kill -9 during a save, SIGINT/SIGTERM, divergence, extending
a finished run. Each asserts the exit status, the one-line message naming the culprit, and that
the last good checkpoint is intact with no temp file left behind.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from rpnlab import cli
from rpnlab.engine import checkpoint as ckpt_module
from rpnlab.engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from rpnlab.engine.train import Trainer

REPO = Path(__file__).resolve().parents[1]
TINY = ["--image-size", "64", "--min-size", "64", "--max-size", "64", "--num-train", "8", "--num-val", "4",
        "--num-test", "4", "--batch-size", "4", "--rpn-post-nms-top-n-train", "30", "--roi-batch-size-per-image",
        "16", "--device", "cpu", "--no-progress", "--warmup-iters", "1"]


def run_cli(argv, capsys) -> tuple[int, str]:
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.err + out.out


def temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob(".*.tmp"))


class _FullDisk:
    """A file object whose writes fail with ENOSPC once ``limit`` bytes are written."""

    def __init__(self, f, limit: int):
        self._f, self._left = f, limit

    def write(self, data):
        if len(data) > self._left:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._left -= len(data)
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def test_full_disk_is_one_line_naming_the_file_and_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"w": torch.arange(10.0)})
    before = path.read_bytes()
    real = os.fdopen
    monkeypatch.setattr(ckpt_module.os, "fdopen", lambda fd, mode="r": _FullDisk(real(fd, mode), 1000))
    with pytest.raises(CheckpointError) as info:
        save_checkpoint(path, {"w": torch.zeros(100_000)})
    message = str(info.value)
    assert "No space left on device" in message and str(path) in message and "\n" not in message
    assert path.read_bytes() == before and temp_files(tmp_path) == []


def test_no_permission_is_one_line_naming_the_file(tmp_path, monkeypatch):
    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(ckpt_module.tempfile, "mkstemp", denied)
    with pytest.raises(CheckpointError, match=r"cannot write checkpoint .*c\.pt.*Permission denied"):
        save_checkpoint(tmp_path / "c.pt", {"a": 1})


def test_training_on_a_full_disk_exits_1_with_the_previous_checkpoint_intact(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    code, _ = run_cli(["train", "--root", tmp_path / "syn", *TINY, "--epochs", "2", "--max-iters", "2",
                       "--out-dir", out], capsys)
    assert code == 0
    before = (out / "checkpoint.pt").read_bytes()
    real = os.fdopen
    monkeypatch.setattr(ckpt_module.os, "fdopen",
                        lambda fd, mode="r", *a, **k: _FullDisk(real(fd, mode, *a, **k), 1000))
    code, message = run_cli(["train", "--resume", out / "checkpoint.pt", "--max-iters", "4", "--out-dir", out,
                             "--no-progress"], capsys)
    assert code == 1 and "No space left on device" in message and "checkpoint.pt" in message
    assert "Traceback" not in message
    assert (out / "checkpoint.pt").read_bytes() == before and temp_files(out) == []


KILLED_SAVE = textwrap.dedent("""
    import os, sys, time, torch
    from rpnlab.engine import checkpoint as c
    path = sys.argv[1]
    c.save_checkpoint(path, {"version": 1, "w": torch.ones(10)})
    real = os.fdopen
    class Slow:
        def __init__(self, f): self.f = f
        def write(self, data):
            print("SAVING", flush=True); time.sleep(0.2); return self.f.write(data)
        def __getattr__(self, name): return getattr(self.f, name)
        def __enter__(self): return self
        def __exit__(self, *exc): self.f.close()
    c.os.fdopen = lambda fd, mode="r": Slow(real(fd, mode))
    c.save_checkpoint(path, {"version": 2, "w": torch.zeros(1_000_000)})
""")


@pytest.mark.xdist_group("subprocess")
def test_kill_9_during_a_save_keeps_the_old_checkpoint_and_the_temp_file_is_removed_later(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_SAVE, str(out / "checkpoint.pt")], stdout=subprocess.PIPE,
                            text=True, env=env)
    assert proc.stdout.readline().strip() == "SAVING"
    proc.kill()  # SIGKILL: no handler, no cleanup
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert load_checkpoint(out / "checkpoint.pt")["version"] == 1  # the old one, whole
    assert len(temp_files(out)) == 1  # what the killed save left
    # The next run in that folder removes it (before any work) and says so.
    code, message = run_cli(["train", "--root", tmp_path / "syn", *TINY, "--epochs", "1", "--max-iters", "1",
                             "--out-dir", out], capsys)
    assert code == 0 and "removed 1 temp file(s) of an interrupted save" in message
    assert temp_files(out) == []


def _signal_at_step(monkeypatch, step: int, signum: int):
    original = Trainer._iteration

    def iteration(self, *args, **kwargs):
        record = original(self, *args, **kwargs)
        if self.step == step:
            # The handler the trainer installed, called as the signal would call it (a real
            # os.kill is delivered asynchronously; the subprocess tests below send real ones).
            signal.getsignal(signum)(signum, None)
        return record

    monkeypatch.setattr(Trainer, "_iteration", iteration)


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_saves_at_the_current_step_and_resume_continues_the_same_run(signum, code, tmp_path, capsys,
                                                                            monkeypatch):
    common = ["--root", tmp_path / "syn", *TINY, "--epochs", "2", "--checkpoint-every", "5"]
    # One torch thread for both runs: the trainer otherwise picks threads from the machine's load
    # (configure_cpu_threads), and 1 or 2 threads round differently (seen under pytest -n 2).
    monkeypatch.setenv("RPNLAB_THREADS", "1")
    # What SIGINT did before (the default handler, or SIG_IGN when a shell started the tests in the
    # background): the trainer must put exactly that back.
    before = signal.getsignal(signal.SIGINT)
    assert run_cli(["train", *common, "--out-dir", tmp_path / "straight"], capsys)[0] == 0
    with monkeypatch.context() as m:
        _signal_at_step(m, 1, signum)
        status, message = run_cli(["train", *common, "--out-dir", tmp_path / "stopped"], capsys)
    assert status == code
    name = signal.Signals(signum).name
    lines = [line for line in message.splitlines() if line.strip()]
    saved = tmp_path / "stopped" / "checkpoint.pt"
    expected = f"rpnlab train: interrupted by {name} at step 2; checkpoint saved: {saved} (continue with --resume {saved})"
    assert lines == [expected]
    state = load_checkpoint(saved)
    assert state["step"] == 2
    assert temp_files(tmp_path / "stopped") == []
    assert signal.getsignal(signal.SIGINT) is before  # handlers put back
    status, _ = run_cli(["train", "--resume", tmp_path / "stopped" / "checkpoint.pt", "--out-dir",
                         tmp_path / "stopped", "--no-progress"], capsys)
    assert status == 0
    resumed = load_checkpoint(tmp_path / "stopped" / "checkpoint.pt")["history"]
    straight = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")["history"]
    assert [h["total"] for h in resumed] == pytest.approx([h["total"] for h in straight], rel=1e-5)


@pytest.mark.xdist_group("subprocess")
def test_sigterm_to_a_real_process(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "rpnlab", "train", "--root", str(tmp_path / "syn"), *TINY,
                             "--epochs", "500", "--out-dir", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while not (out / "checkpoint.pt").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "interrupted by SIGTERM at step" in err and "Traceback" not in err
    step = load_checkpoint(out / "checkpoint.pt")["step"]
    assert f"at step {step};" in err and temp_files(out) == []


@pytest.mark.xdist_group("subprocess")
def test_ctrl_c_to_the_process_group_with_loader_workers(tmp_path):
    """Ctrl-C in a terminal signals the whole group, DataLoader workers included: the main process
    still saves at the current step and exits 130."""
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "rpnlab", "train", "--root", str(tmp_path / "syn"), *TINY,
                             "--epochs", "500", "--num-workers", "1", "--out-dir", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while not (out / "checkpoint.pt").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted by SIGINT at step" in err and "Traceback" not in err
    assert f"at step {load_checkpoint(out / 'checkpoint.pt')['step']};" in err and temp_files(out) == []


def test_divergence_stops_naming_step_loss_and_tensor_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(["train", "--root", tmp_path / "syn", *TINY, "--epochs", "1", "--out-dir", out], capsys)[0] == 0
    before = (out / "checkpoint.pt").read_bytes()
    code, message = run_cli(["train", "--resume", out / "checkpoint.pt", "--epochs", "4", "--lr", "1e6",
                             "--out-dir", out, "--no-progress"], capsys)
    assert code == 1 and "Traceback" not in message
    assert "at step" in message and "loss total=" in message and "model." in message
    assert (out / "checkpoint.pt").read_bytes() == before and temp_files(out) == []


def test_a_huge_learning_rate_for_one_step_is_not_saved(tmp_path, capsys):
    out = tmp_path / "run"
    code, message = run_cli(["train", "--root", tmp_path / "syn", *TINY, "--lr", "1e12", "--max-iters", "1",
                             "--out-dir", out], capsys)
    assert code == 1 and "exploded weights at step 1" in message
    assert not (out / "checkpoint.pt").exists()


def test_a_non_finite_gradient_is_never_applied(tmp_path, capsys, monkeypatch):
    original = Trainer._losses

    def poisoned(self, stage, wrapped, images, targets):
        losses = original(self, stage, wrapped, images, targets)
        if self.step == 1:  # value 0, gradient NaN: the loss looks fine, the gradient is not
            weight = next(wrapped.parameters())
            losses["loss_objectness"] = losses["loss_objectness"] + torch.sqrt((weight * 0).sum())
        return losses

    monkeypatch.setattr(Trainer, "_losses", poisoned)
    code, message = run_cli(["train", "--root", tmp_path / "syn", *TINY, "--epochs", "1", "--out-dir",
                             tmp_path / "run"], capsys)
    assert code == 1
    assert "non-finite gradient at step 1" in message and "gradient of backbone." in message


def test_a_finished_run_can_be_extended_and_says_the_schedule_is_replanned(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(["train", "--root", tmp_path / "syn", *TINY, "--epochs", "1", "--out-dir", out], capsys)[0] == 0
    code, message = run_cli(["train", "--resume", out / "checkpoint.pt", "--epochs", "2", "--out-dir", out,
                             "--no-progress"], capsys)
    assert code == 0 and "re-planned over 2 epochs" in message
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["step"] == 4 and state["configs"]["train"]["epochs"] == 2
    code, message = run_cli(["train", "--resume", out / "checkpoint.pt", "--epochs", "1", "--out-dir", out,
                             "--no-progress"], capsys)
    assert code == 2 and "epochs=2" in message and "epochs=1" in message


def test_an_alternating_run_cannot_be_extended(tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--root", tmp_path / "syn", *TINY, "--schedule", "alternating", "--max-iters", "1"]
    assert run_cli(["train", *common, "--epochs", "4", "--out-dir", out], capsys)[0] == 0
    code, message = run_cli(["train", "--resume", out / "checkpoint.pt", "--epochs", "8", "--out-dir", out,
                             "--no-progress"], capsys)
    assert code == 2 and "joint or rpn schedule only" in message
