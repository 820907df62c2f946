"""Training: approximate joint, the paper's 4-step alternating schedule, or the RPN alone.

``train(model_cfg, data_cfg, train_cfg)`` builds the model and data, runs SGD with momentum under a
warm-up + cosine (or step) learning-rate schedule, writes atomic checkpoints and returns a
``TrainResult``. The same code runs on a laptop CPU, on one GPU with mixed precision, and on
several GPUs (or CPU processes) under ``torchrun``::

    torchrun --nproc_per_node 2 -m rpnlab train --epochs 2 --out-dir runs/ddp

Schedules (``TrainConfig.schedule``):

- ``"joint"``: one network, the four losses summed; proposals are treated as constants
  (the paper's *approximate joint training*).
- ``"alternating"``: the paper's 4 steps. 1: train backbone A + RPN. 2: train a fresh backbone B +
  the Fast R-CNN head on step 1's proposals. 3: freeze B, train B's RPN layers (now the convs are
  shared). 4: keep B frozen, train the Fast R-CNN head layers on step 3's proposals. The epochs
  are split 2 : 1 : 2 : 1, as py-faster-rcnn's iteration counts. The paper starts steps 1 and 2
  from the same ImageNet weights; from scratch, ``alternating_init="step1"`` starts step 2 from
  step 1's trained backbone instead of a random one (its stand-in for that pre-training), and
  step 3's RPN layers from step 1's trained ones instead of random ones.
- ``"rpn"``: backbone + RPN only (for studying proposals).

Resuming restores the model, optimiser, scheduler, AMP scaler, step, epoch and every RNG, and the
data order of each epoch is a function of ``(seed, epoch)`` alone, so a run interrupted and resumed
gives the same loss curve as one that never stopped (exactly, on the CPU with ``num_workers=0``).
A finished run resumed with a larger ``epochs`` (joint or RPN-only schedule) continues: its
learning-rate schedule is re-planned over the new length, and a warning says so.

Reliability: no bad state is saved and no work is lost.

- Each iteration checks the losses and the gradient norm in the one host sync it already had;
  a non-finite value stops the run (``TrainingDiverged``) before the optimiser step, naming the
  step, the loss and the first non-finite tensor. Before every checkpoint save the parameters
  and optimiser state must be finite and every parameter below ``PARAMETER_LIMIT`` in magnitude;
  otherwise the run stops the same way and the last checkpoint (finite) stays as it was.
- SIGINT / SIGTERM (Ctrl-C, ``kill``) finish the current iteration, save a checkpoint at that
  step and return with ``stop_reason="interrupted"`` (``result.extra["signal"]``); a second
  signal interrupts at once. Temp files of a save that was killed are removed at the next start.

Longer than 500 lines because the three schedules (joint, 4-step, RPN-only) share one loop, one
optimiser plan and one checkpoint format; splitting them would hide what they share.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler

from rpnlab.config import DataConfig, ModelConfig, TrainConfig, from_dict, to_dict
from rpnlab.engine.checkpoint import (
    first_non_finite,
    load_checkpoint,
    remove_stale_temp_files,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from rpnlab.engine.devices import (
    configure_cpu_threads,
    resolve_amp,
    resolve_device,
    seed_everything,
)

__all__ = [
    "PARAMETER_LIMIT",
    "ROI_LOSSES",
    "RPN_LOSSES",
    "EpochSampler",
    "LRSchedule",
    "Stage",
    "TrainResult",
    "Trainer",
    "TrainingDiverged",
    "evaluate",
    "gpu_train_config",
    "lr_factor",
    "parameter_digest",
    "stages_for",
    "synthetic_train_config",
    "train",
]

RPN_LOSSES = ("loss_objectness", "loss_rpn_box_reg")
ROI_LOSSES = ("loss_classifier", "loss_box_reg")
CHECKPOINT_NAME = "checkpoint.pt"
#: A parameter larger than this in magnitude means the run has diverged (weight decay keeps a
#: healthy detector's weights near 1; lr 1e6 gave 1e21): such weights are never saved.
PARAMETER_LIMIT = 1e6


def synthetic_train_config(**overrides: Any) -> TrainConfig:
    """The default CPU schedule for the synthetic shapes (see ``rpnlab.detector.model.synthetic_model_config``).

    24 epochs of 600 images in batches of 4 (3600 iterations). With the earlier model preset
    (64 RoIs pooled to 7 x 7) that took about 6 minutes on two quiet CPU cores and reached
    val mAP@0.5 0.72 after 1800 iterations, 0.75 after 2200, 0.80 after 7200
    (benchmarks/bench_detector.py); the current one costs 0.66x the CPU per iteration and learns
    more per CPU second (see ``synthetic_model_config``).

    ``amp="auto"``: bf16 autocast where the CPU computes bfloat16 natively (AMX, AVX512-BF16).
    Measured with ``benchmarks/bench_recipe.py`` (1200 iterations, seeds 0 and 1, one thread):
    val mAP@0.5 0.478 / 0.523 under bf16 against 0.504 / 0.512 in float32, at 78 against 114 CPU
    ms per iteration. Elsewhere it stays float32, where emulated bf16 would be slower.
    """
    # Small batches, many steps and a high rate: in a CPU budget of minutes the number of updates
    # counts more than the precision of each gradient (lr 0.05 beat 0.02; batch 4 beat 8).
    # From scratch, the 4-step schedule's step 2 starts from step 1's backbone (see TrainConfig),
    # and gets half the epochs: it trains the features and the head, while steps 3 and 4 only
    # fine-tune a few layers on a frozen backbone (py-faster-rcnn's 2:1:2:1 gave step 2 a sixth).
    cfg = TrainConfig(epochs=24, batch_size=4, lr=0.05, warmup_iters=50, lr_schedule="cosine", amp="auto",
                      alternating_init="step1", alternating_split=(1, 3, 1, 1))
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg.validate()


def gpu_train_config(**overrides: Any) -> TrainConfig:
    """The CUDA schedule for the 512 px shapes (see ``rpnlab.engine.presets``, ``--preset gpu``).

    40 epochs of 600 images in batches of 8 (3000 iterations) with bf16 autocast; the learning
    rate follows the batch (the CPU preset's rate per image), with a longer warm-up for the
    larger model. Not yet timed on a GPU: ``rpnlab train --preset gpu --epochs 1`` gives the
    seconds per epoch of a given card.
    """
    cfg = TrainConfig(epochs=40, batch_size=8, lr=0.08, warmup_iters=200, lr_schedule="cosine", amp="bf16",
                      device="cuda", out_dir="runs/gpu", alternating_init="step1", alternating_split=(1, 3, 1, 1))
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg.validate()


# ---------------------------------------------------------------------------------------------
# Stages of a schedule


@dataclass(frozen=True)
class Stage:
    """One phase of training: which parts learn and what the forward pass computes.

    ``mode``: ``"joint"`` (everything), ``"rpn"`` (stop after the RPN), ``"fast_rcnn_fixed"``
    (Fast R-CNN on proposals of a separate, frozen RPN model) or ``"fast_rcnn"`` (the model's own,
    frozen RPN feeds its Fast R-CNN head). ``trainable``: top-level parts of the model that learn.
    """

    name: str
    epochs: int
    mode: str
    trainable: tuple[str, ...]
    loss_keys: tuple[str, ...]


def _split_epochs(epochs: int, weights: Sequence[int]) -> list[int]:
    """Split ``epochs`` in proportion to ``weights`` (largest remainders), at least 1 each."""
    total = sum(weights)
    exact = [epochs * w / total for w in weights]
    parts = [max(1, int(e)) for e in exact]
    order = sorted(range(len(weights)), key=lambda i: exact[i] - int(exact[i]), reverse=True)
    for i in order:
        if sum(parts) >= epochs:
            break
        parts[i] += 1
    while sum(parts) > max(epochs, len(weights)):  # the "at least 1" of small weights overshot: the
        # most over-served part (beyond its exact share) gives one back
        i = max((i for i in range(len(parts)) if parts[i] > 1), key=lambda i: parts[i] - exact[i])
        parts[i] -= 1
    return parts


def stages_for(schedule: str, epochs: int, split: Sequence[int] = (2, 1, 2, 1)) -> list[Stage]:
    """The stages of ``schedule`` (``"joint"``, ``"alternating"``, ``"rpn"``) over ``epochs`` epochs.

    ``"alternating"`` needs at least 4 epochs to give each step one; with fewer it takes 4.
    ``split``: its steps' epochs in this proportion (``TrainConfig.alternating_split``;
    py-faster-rcnn's 2 : 1 : 2 : 1 by default).
    """
    everything = ("backbone", "rpn", "roi_heads")
    if schedule == "joint":
        return [Stage("joint", epochs, "joint", everything, RPN_LOSSES + ROI_LOSSES)]
    if schedule == "rpn":
        return [Stage("rpn", epochs, "rpn", ("backbone", "rpn"), RPN_LOSSES)]
    if schedule == "alternating":
        if len(split) != 4 or any(int(w) != w or w < 1 for w in split):
            raise ValueError(f"split={tuple(split)!r} is invalid: expected 4 positive ints, one weight per step")
        e1, e2, e3, e4 = _split_epochs(epochs, tuple(int(w) for w in split))
        return [
            Stage("step1_rpn", e1, "rpn", ("backbone", "rpn"), RPN_LOSSES),
            Stage("step2_fast_rcnn", e2, "fast_rcnn_fixed", ("backbone", "roi_heads"), ROI_LOSSES),
            Stage("step3_rpn", e3, "rpn", ("rpn",), RPN_LOSSES),
            Stage("step4_fast_rcnn", e4, "fast_rcnn", ("roi_heads",), ROI_LOSSES),
        ]
    raise ValueError(f"schedule={schedule!r} is invalid: expected 'joint', 'alternating' or 'rpn'")


# ---------------------------------------------------------------------------------------------
# Learning rate


def lr_factor(
    step: int,
    total_steps: int,
    warmup_iters: int = 0,
    schedule: str = "cosine",
    milestones: Sequence[int] = (),
    warmup_factor: float = 1e-3,
    gamma: float = 0.1,
    time_fraction: float = 0.0,
) -> float:
    """Multiplier of the base learning rate at iteration ``step`` (0-based) of ``total_steps``.

    Linear warm-up from ``warmup_factor`` to 1 over ``warmup_iters``, multiplied by a cosine decay
    to 0 at ``total_steps`` or by ``gamma`` for every milestone (an iteration) already passed.

    ``time_fraction``: the share of a time budget already used (0 without one). The schedule then
    runs at whichever is further along, iterations or time, so that a run stopped by its budget
    has decayed its rate to the end (cosine at 0) instead of stopping at half its peak.
    """
    progress = max(min(step, total_steps) / max(total_steps, 1), min(max(time_fraction, 0.0), 1.0))
    if schedule == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif schedule == "step":
        factor = gamma ** sum(step >= m or progress * total_steps >= m for m in milestones)
    else:
        raise ValueError(f"schedule={schedule!r} is invalid: expected 'cosine' or 'step'")
    if step < warmup_iters:
        alpha = step / warmup_iters
        factor *= warmup_factor * (1 - alpha) + alpha
    return factor


class LRSchedule:
    """``lr_factor`` as a picklable callable for ``torch.optim.lr_scheduler.LambdaLR``.

    Its attributes are plain numbers, so the scheduler's state dict loads with ``weights_only``.
    Under a time budget the trainer sets ``time_fraction`` (share of the budget used) before
    each step (see ``lr_factor``).
    """

    def __init__(self, total_steps: int, warmup_iters: int, schedule: str, milestones: Sequence[int] = ()):
        self.total_steps = int(total_steps)
        self.warmup_iters = int(warmup_iters)
        self.schedule = schedule
        self.milestones = [int(m) for m in milestones]
        self.time_fraction = 0.0

    def __call__(self, step: int) -> float:
        return lr_factor(step, self.total_steps, self.warmup_iters, self.schedule, self.milestones,
                         time_fraction=self.time_fraction)


# ---------------------------------------------------------------------------------------------
# Data order


class EpochSampler(DistributedSampler):
    """``DistributedSampler`` whose epoch order depends on ``(seed, epoch)`` only, and can skip.

    With one process it is a seeded shuffle. ``set_epoch(epoch, skip_batches)`` drops the first
    ``skip_batches * batch_size`` indices of this rank's order: the batches a resumed run has
    already trained on.
    """

    def __init__(self, dataset, num_replicas: int = 1, rank: int = 0, seed: int = 0, batch_size: int = 1):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self.batch_size = int(batch_size)
        self.skip_batches = 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        super().set_epoch(epoch)
        self.skip_batches = int(skip_batches)

    def __iter__(self):
        indices = list(super().__iter__())
        return iter(indices[self.skip_batches * self.batch_size:])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.skip_batches * self.batch_size)

    def batches_per_epoch(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)


# ---------------------------------------------------------------------------------------------
# Distributed helpers


def _dist_env() -> tuple[int, int, int]:
    """``(rank, local_rank, world_size)`` from torchrun's environment (0, 0, 1 without it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return rank, local, world


def _init_distributed(device: torch.device) -> bool:
    """Join the process group torchrun set up; ``True`` if this call created it."""
    _, _, world = _dist_env()
    if world <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return True


def _is_main() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


# ---------------------------------------------------------------------------------------------
# Results


@dataclass
class TrainResult:
    """What ``train`` returns.

    ``history``: one dict per iteration (``step``, ``epoch``, ``stage``, ``lr``, each loss, ``total``),
    the resumed run's earlier iterations included; ``checkpoint``: the last checkpoint written;
    ``model``: the trained ``FasterRCNN`` (not DDP-wrapped, in eval mode); ``stop_reason``:
    ``"completed"``, ``"max_iters"``, ``"time_budget"``, ``"callback"`` or ``"interrupted"`` (SIGINT /
    SIGTERM: ``extra["signal"]`` holds its number; a checkpoint at that step was saved); ``iterations``, ``seconds``,
    ``images``: this run's own iterations, wall time and images seen (all processes).
    """

    history: list[dict[str, Any]]
    checkpoint: Path | None
    model: nn.Module
    stop_reason: str = "completed"
    iterations: int = 0
    seconds: float = 0.0
    images: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("nan")


class TrainingDiverged(RuntimeError):
    """A loss, a gradient or a parameter became NaN/infinite (or exploded); the message names the
    step, the loss and the first bad tensor, and the last checkpoint written stays untouched."""


_NonFiniteLoss = TrainingDiverged  # the name earlier versions raised


def _collate(samples):
    from rpnlab.data import collate

    return collate(samples)


def _move_batch(images, targets: list[dict], device: torch.device):
    from rpnlab.data.batching import ImageBatch

    images = ImageBatch(images.tensors.to(device, non_blocking=True), images.image_sizes)
    targets = [{k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in t.items()}
               for t in targets]
    return images, targets


def _set_trainable(model: nn.Module, parts: Sequence[str], fixed: set[int]) -> None:
    """Only the named top-level parts learn; the rest is frozen, and so are ``fixed`` parameters
    (ids of those frozen from the start, such as a pretrained backbone's first blocks)."""
    for name, child in model.named_children():
        for p in child.parameters():
            p.requires_grad_(name in parts and id(p) not in fixed)


def _train_mode(model: nn.Module) -> None:
    """``model.train()``, but batch norms whose parameters are all frozen stay in eval mode."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            params = list(m.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                m.eval()


# ---------------------------------------------------------------------------------------------
# The trainer


class Trainer:
    """The training loop behind ``train``; see the module docstring for the schedules.

    Args:
        model_cfg, data_cfg, train_cfg: the configs (validated here).
        resume: a checkpoint written by an earlier run to continue from.
        progress: a tqdm bar with running losses (rank 0 only).
        callback: called with each iteration's history record; returning ``False`` stops the run
            (a checkpoint is written first).
        train_dataset: use this dataset instead of ``build_dataset(data_cfg, "train")``.
        skip_bad_images: VOC/COCO data is scanned first (``rpnlab.data.checks``); bad image files
            stop the run before its first step (a ``DataError`` listing them) unless this is set,
            which trains on the others (``self.skipped_images`` counts them). Annotation problems
            always stop it.
    """

    def __init__(
        self,
        model_cfg: ModelConfig,
        data_cfg: DataConfig,
        train_cfg: TrainConfig,
        resume: str | os.PathLike | None = None,
        progress: bool = True,
        callback: Callable[[dict], Any] | None = None,
        train_dataset=None,
        skip_bad_images: bool = False,
    ):
        for name, cfg, cls in (("model_cfg", model_cfg, ModelConfig), ("data_cfg", data_cfg, DataConfig),
                               ("train_cfg", train_cfg, TrainConfig)):
            if not isinstance(cfg, cls):
                raise TypeError(f"{name} must be a {cls.__name__}, got {type(cfg).__name__}")
            cfg.validate()
        self.model_cfg, self.data_cfg, self.cfg = model_cfg, data_cfg, train_cfg
        self.progress = progress
        self.callback = callback
        self.device = resolve_device(train_cfg.device)
        # On a shared CPU, more torch threads than free cores makes every step wait (issue 11).
        self.cpu_threads = configure_cpu_threads() if self.device.type == "cpu" else None
        # "auto": bf16 where the device computes it natively (AMX CPUs, recent GPUs), else off.
        self.amp = resolve_amp(train_cfg.amp, self.device)
        self._owns_process_group = _init_distributed(self.device)
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world_size = dist.get_world_size() if self.distributed else 1
        if self.device.type == "cuda" and self.distributed:
            _, local, _ = _dist_env()
            self.device = torch.device("cuda", local)
            torch.cuda.set_device(self.device)
        self.out_dir = Path(train_cfg.out_dir)
        self.checkpoint_path = self.out_dir / CHECKPOINT_NAME
        self._check_out_dir()
        # A save killed mid-write (kill -9, power loss) leaves its temp file: ours to remove.
        self.stale_removed = remove_stale_temp_files(self.checkpoint_path) if self.rank == 0 else []
        self.replanned: str | None = None
        self.resume_path = resume
        self.resume_state = load_checkpoint(resume, map_location="cpu") if resume is not None else None
        if self.resume_state is not None:
            self._check_resume_configs(self.resume_state, resume)
            bad = first_non_finite(self.resume_state.get("model"), "model")
            if bad:
                raise ValueError(f"cannot resume from {str(resume)!r}: its weights are not finite ({bad} holds NaN "
                                 "or infinity); use an earlier checkpoint")

        seed_everything(train_cfg.seed)
        from rpnlab.detector.model import FasterRCNN

        self.model = FasterRCNN.from_config(model_cfg).to(self.device)
        self.stages = stages_for(train_cfg.schedule, train_cfg.epochs, train_cfg.alternating_split)
        # Step 1 of the alternating schedule trains its own network (backbone A + RPN), whose
        # proposals then feed step 2.
        self.rpn_model = (FasterRCNN.from_config(model_cfg).to(self.device)
                          if train_cfg.schedule == "alternating" else None)

        # Parameters frozen by construction stay frozen whatever the stage.
        self._fixed = {id(p) for m in (self.model, self.rpn_model) if m is not None
                       for p in m.parameters() if not p.requires_grad}

        self.skipped_images = 0
        self.dataset = train_dataset if train_dataset is not None else self._build_dataset(skip_bad_images)
        if len(self.dataset) == 0:
            where = "num_train=0" if data_cfg.dataset == "synthetic" and train_dataset is None else "no samples"
            raise ValueError(f"the training set is empty ({where})")
        num_classes = getattr(self.dataset, "num_classes", None)
        if num_classes is not None and num_classes != model_cfg.num_classes:
            names = ", ".join(getattr(self.dataset, "classes", ()))
            raise ValueError(f"num_classes={model_cfg.num_classes} but the {data_cfg.dataset} training set has "
                             f"{num_classes} classes ({names}): set num_classes={num_classes}")
        # The class names travel with the model and its checkpoints (evaluate and predict use them).
        self.class_names = [str(n) for n in getattr(self.dataset, "classes", ())]
        for m in (self.model, self.rpn_model):
            if m is not None:
                m.class_names = list(self.class_names)
        self.sampler = EpochSampler(self.dataset, self.world_size, self.rank, seed=train_cfg.seed,
                                    batch_size=train_cfg.batch_size)
        self.iters_per_epoch = self.sampler.batches_per_epoch()

        self.history: list[dict[str, Any]] = []
        self.step = 0  # iterations done, all stages
        self.epoch = 0  # epoch in progress (counted over all stages)
        self.epoch_step = 0  # iterations done inside it
        self.last_checkpoint: Path | None = None

    # -- setup ------------------------------------------------------------------------------

    def _check_out_dir(self) -> None:
        """Fail before any work when the checkpoint cannot be written where ``out_dir`` says."""
        folder = self.out_dir
        probe = folder
        while not probe.exists() and probe.parent != probe:
            probe = probe.parent
        if not probe.is_dir():
            raise ValueError(f"out_dir={str(folder)!r} is invalid: {str(probe)!r} is a file, not a folder")
        if not os.access(probe, os.W_OK | os.X_OK):
            raise ValueError(f"out_dir={str(folder)!r} is invalid: {str(probe)!r} is not writable")
        if self.checkpoint_path.is_dir():
            raise ValueError(f"out_dir={str(folder)!r} is invalid: {str(self.checkpoint_path)!r} is a folder")

    def _build_dataset(self, skip_bad_images: bool = False):
        from rpnlab.data import build_dataset
        from rpnlab.data.checks import DataError, GoodSubset, format_problems, scan_dataset

        problems = scan_dataset(self.data_cfg, "train")
        bad_images = {p.path for p in problems if p.kind == "image"}
        if problems and not (skip_bad_images and len(bad_images) == len(problems)):
            hint = (" (--skip-bad-images / skip_bad_images=True trains on the other images)"
                    if len(bad_images) == len(problems) else "")
            raise DataError(f"{len(problems)} problem(s) in the {self.data_cfg.dataset} training data at "
                            f"{self.data_cfg.root}; nothing was trained{hint}:\n{format_problems(problems)}")
        dataset = build_dataset(self.data_cfg, "train")
        if bad_images:
            dataset = GoodSubset(dataset, bad_images)
            self.skipped_images = dataset.skipped
            warnings.warn(f"skipping {dataset.skipped} bad image(s) of the training data "
                          f"({len(dataset)} left): {', '.join(sorted(bad_images)[:5])}"
                          + (" ..." if len(bad_images) > 5 else ""), stacklevel=3)
        return dataset

    def _check_targets(self, targets: list[dict]) -> None:
        """Labels in ``1..num_classes`` and finite boxes, on the CPU tensors the loader made (no
        device sync): a wrong label would fail deep in the loss, or silently train on garbage."""
        num_classes = self.model_cfg.num_classes
        for t in targets:
            labels, boxes = t.get("labels"), t.get("boxes")
            if labels is not None and labels.numel() and labels.device.type == "cpu":
                lo, hi = int(labels.min()), int(labels.max())
                if lo < 1 or hi > num_classes:
                    bad = lo if lo < 1 else hi
                    raise ValueError(f"training image id={t.get('image_id')} has label {bad}, outside 1..{num_classes} "
                                     f"(num_classes={num_classes})")
            if boxes is not None and boxes.numel() and boxes.device.type == "cpu" and not bool(torch.isfinite(boxes).all()):
                raise ValueError(f"training image id={t.get('image_id')} has non-finite box coordinates")

    def _check_resume_configs(self, state: dict, path) -> None:
        saved = state.get("configs", {})
        for key, cfg in (("model", self.model_cfg), ("data", self.data_cfg)):
            if key in saved and from_dict(type(cfg), saved[key]) != cfg:
                raise ValueError(f"cannot resume from {str(path)!r}: its {key} config differs from this run's "
                                 f"(saved {saved[key]}, given {to_dict(cfg)})")
        for name in ("schedule", "batch_size", "seed", "epochs"):
            before = saved.get("train", {}).get(name)
            now = getattr(self.cfg, name)
            if before is None or before == now:
                continue
            if name == "epochs" and now > before and self.cfg.schedule in ("joint", "rpn"):
                # Extending a run: the learning-rate schedule is re-planned over the new length.
                self.replanned = (f"resuming {str(path)!r} with epochs={now} (it was planned for {before}): "
                                  f"the {self.cfg.lr_schedule} learning-rate schedule is re-planned over {now} epochs")
                warnings.warn(self.replanned, stacklevel=3)
                continue
            hint = (f"; a run can be extended (epochs > {before}) with the joint or rpn schedule only"
                    if name == "epochs" and now > before else "")
            raise ValueError(f"cannot resume from {str(path)!r}: it was trained with {name}={before!r}, "
                             f"this run has {name}={now!r}{hint}")

    def _stage_bounds(self) -> list[tuple[int, int]]:
        """``(first epoch, end epoch)`` of each stage."""
        bounds, start = [], 0
        for stage in self.stages:
            bounds.append((start, start + stage.epochs))
            start += stage.epochs
        return bounds

    def _stage_index(self, epoch: int) -> int:
        for i, (start, end) in enumerate(self._stage_bounds()):
            if start <= epoch < end:
                return i
        return len(self.stages)

    def _prepare_stage(self, index: int):
        """Freeze per the stage, wrap for DDP, build optimiser + scheduler (+ AMP scaler)."""
        stage = self.stages[index]
        net = self.rpn_model if (self.rpn_model is not None and index == 0) else self.model
        _set_trainable(net, stage.trainable, self._fixed)
        params = [p for p in net.parameters() if p.requires_grad]
        cfg = self.cfg
        optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        total = stage.epochs * self.iters_per_epoch
        milestones = [e * self.iters_per_epoch for e in cfg.lr_steps]
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, LRSchedule(total, cfg.warmup_iters, cfg.lr_schedule, milestones)
        )
        scaler = torch.amp.GradScaler("cuda") if self.amp == "fp16" else None
        wrapped = net
        if self.distributed:
            from torch.nn.parallel import DistributedDataParallel

            # Each stage freezes what it does not train, so every trainable parameter gets a
            # gradient and DDP needs no find_unused_parameters.
            ids = [self.device.index] if self.device.type == "cuda" else None
            wrapped = DistributedDataParallel(net, device_ids=ids)
        return stage, net, wrapped, optimizer, scheduler, scaler

    # -- one iteration -----------------------------------------------------------------------

    def _autocast(self):
        if self.amp == "off":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.amp == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def _losses(self, stage: Stage, wrapped: nn.Module, images, targets) -> dict[str, Tensor]:
        if stage.mode == "rpn":
            return wrapped(images, targets, rpn_only=True)
        if stage.mode == "fast_rcnn_fixed":
            # Step 2: proposals of step 1's network, fixed. Its proposal layer is put in training
            # mode for the training-time counts (the paper fed Fast R-CNN 2000 per image).
            net = self.rpn_model
            net.eval()
            net.rpn.proposal_layer.train()
            with torch.no_grad():
                x, sizes = net.prepare_images(images)
                proposals = net.rpn(net.backbone(x), sizes).proposals
            return wrapped(images, targets, proposals=proposals)
        return wrapped(images, targets)

    def _diverged(self, what: str, stage: Stage, detail: str = "") -> TrainingDiverged:
        kept = str(self.last_checkpoint) if self.last_checkpoint else "none written yet"
        return TrainingDiverged(
            f"{what} at step {self.step} (epoch {self.epoch}, stage {stage.name}){detail}; training stopped, "
            f"the last good checkpoint is left untouched ({kept}). Try a lower lr or a longer warm-up."
        )

    def _iteration(self, stage, wrapped, optimizer, scheduler, scaler, images, targets) -> dict[str, Any]:
        lr = optimizer.param_groups[0]["lr"]
        with self._autocast():
            losses = self._losses(stage, wrapped, images, targets)
        names = sorted(losses)
        total = sum(losses[k].float() for k in stage.loss_keys)
        optimizer.zero_grad(set_to_none=True)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if scaler is not None:
            scaler.scale(total).backward()
            grad_norm = total.new_zeros(())  # the scaler skips steps with inf/NaN gradients itself
        else:
            total.backward()
            grads = [p.grad for p in params if p.grad is not None]
            grad_norm = torch.nn.utils.get_total_norm(grads).float() if grads else total.new_zeros(())
        # One host sync per iteration: every loss value and the gradient norm at once (averaged
        # over processes), read before the optimiser step so that a bad gradient is never applied.
        values = torch.stack([losses[k].detach().float() for k in names] + [total.detach(), grad_norm.detach()])
        if self.distributed:
            dist.all_reduce(values)
            values = values / self.world_size
        numbers = values.tolist()
        record = {"step": self.step, "epoch": self.epoch, "stage": stage.name, "lr": lr}
        record.update(zip(names, numbers[:-2]))
        record["total"] = numbers[-2]
        bad = [k for k in [*names, "total"] if not math.isfinite(record[k])]
        if bad:
            raise self._diverged("non-finite loss", stage, ": " + ", ".join(f"{k}={record[k]}" for k in bad))
        if not math.isfinite(numbers[-1]):
            names_by_param = {id(p): n for n, p in self._net_for(stage).named_parameters()}
            first = next((names_by_param.get(id(p), "?") for p in params
                          if p.grad is not None and not bool(torch.isfinite(p.grad).all())), "?")
            raise self._diverged("non-finite gradient", stage,
                                 f": loss total={record['total']:.4g}, gradient norm={numbers[-1]}, "
                                 f"first non-finite tensor: gradient of {first}")
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        return record

    def _net_for(self, stage: Stage) -> nn.Module:
        return self.rpn_model if (self.rpn_model is not None and stage is self.stages[0]) else self.model

    # -- checkpoints ---------------------------------------------------------------------------

    def _state(self, stage_index, optimizer, scheduler, scaler, elapsed: float) -> dict[str, Any]:
        return {
            "format": "rpnlab-train-1",
            "model": self.model.state_dict(),
            "rpn_model": self.rpn_model.state_dict() if self.rpn_model is not None and stage_index <= 2 else None,
            "stage": stage_index,
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "step": self.step,
            "epoch": self.epoch,
            "epoch_step": self.epoch_step,
            "rng": rng_state(),
            "configs": {"model": to_dict(self.model_cfg), "data": to_dict(self.data_cfg), "train": to_dict(self.cfg)},
            "classes": list(self.class_names),
            "history": self.history,
            "world_size": self.world_size,
            "elapsed_s": elapsed,
        }

    def _check_state(self, stage_index: int, optimizer) -> None:
        """Refuse to save a diverged state: non-finite parameters, buffers or optimiser state, or
        parameters past ``PARAMETER_LIMIT``."""
        stage = self.stages[min(stage_index, len(self.stages) - 1)]
        last = self.history[-1] if self.history else {}
        loss = f"loss total={last.get('total', float('nan')):.4g}"
        for prefix, module in (("model", self.model), ("rpn_model", self.rpn_model)):
            if module is None:
                continue
            bad = first_non_finite(module.state_dict(), prefix)
            if bad:
                raise self._diverged("non-finite weights", stage, f": {loss}, first non-finite tensor: {bad}")
            for name, p in module.named_parameters():
                biggest = float(p.detach().abs().max()) if p.numel() else 0.0
                if biggest > PARAMETER_LIMIT:
                    raise self._diverged("exploded weights", stage,
                                         f": {loss}, {prefix}.{name} reaches {biggest:.3g} (limit {PARAMETER_LIMIT:g})")
        if optimizer is not None:
            bad = first_non_finite(optimizer.state_dict().get("state", {}), "optimizer.state")
            if bad:
                raise self._diverged("non-finite optimiser state", stage, f": {loss}, first non-finite tensor: {bad}")

    def _save(self, *args) -> None:
        if _is_main():
            self._check_state(args[0], args[1])
            self.last_checkpoint = save_checkpoint(self.checkpoint_path, self._state(*args))
        if self.distributed:
            dist.barrier()

    def _restore(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        if self.rpn_model is not None and state.get("rpn_model") is not None:
            self.rpn_model.load_state_dict(state["rpn_model"])
        self.step, self.epoch, self.epoch_step = state["step"], state["epoch"], state["epoch_step"]
        self.history = list(state.get("history", []))
        if state.get("world_size", 1) != self.world_size:
            warnings.warn(f"resuming a run of {state.get('world_size')} processes with {self.world_size}: "
                          "the data order differs from an uninterrupted run", stacklevel=3)

    # -- the loop ------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        cfg = self.cfg
        state, resume_path = self.resume_state, self.resume_path
        if state is not None:
            self._restore(state)
        bounds = self._stage_bounds()
        total_epochs = bounds[-1][1]
        planned = total_epochs * self.iters_per_epoch
        if cfg.max_iters is not None:
            planned = min(planned, cfg.max_iters)
        bar = None
        if self.progress and self.rank == 0:
            from tqdm.auto import tqdm

            bar = tqdm(total=planned, initial=min(self.step, planned), desc="train", unit="it", dynamic_ncols=True)

        start_time, start_step = time.perf_counter(), self.step
        elapsed_before = float(state.get("elapsed_s", 0.0)) if state is not None else 0.0
        stop_reason = "completed"
        running: dict[str, float] = {}
        stage_index, optimizer, scheduler, scaler = self._stage_index(self.epoch), None, None, None
        current_stage, saved_step = -1, None
        self._signal = None
        previous_handlers = self._install_signal_handlers()
        try:
            while self.epoch < total_epochs and stop_reason == "completed":
                stage_index = self._stage_index(self.epoch)
                if optimizer is None or stage_index != current_stage:
                    stage, net, wrapped, optimizer, scheduler, scaler = self._prepare_stage(stage_index)
                    current_stage = stage_index
                    resumed_mid_stage = state is not None and state.get("stage") == stage_index and (
                        self.epoch > bounds[stage_index][0] or self.epoch_step > 0)
                    if resumed_mid_stage:
                        optimizer.load_state_dict(state["optimizer"])
                        scheduler.load_state_dict(state["scheduler"])
                        # LambdaLR restores its schedule object's numbers too: re-plan them for
                        # this run's length (the same numbers unless the run is being extended).
                        for schedule in scheduler.lr_lambdas:
                            schedule.total_steps = stage.epochs * self.iters_per_epoch
                            schedule.milestones = [e * self.iters_per_epoch for e in cfg.lr_steps]
                        # The optimiser's state dict carries the saved lr, momentum and weight decay:
                        # this run's options win (equal unless changed on the command line).
                        scheduler.base_lrs = [cfg.lr for _ in optimizer.param_groups]
                        for group, schedule in zip(optimizer.param_groups, scheduler.lr_lambdas):
                            group.update(initial_lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                                         lr=cfg.lr * schedule(scheduler.last_epoch))
                        if scaler is not None and state.get("scaler"):
                            scaler.load_state_dict(state["scaler"])
                    if (stage.mode == "fast_rcnn_fixed" and cfg.alternating_init == "step1"
                            and not resumed_mid_stage):
                        # Step 2 starts from step 1's backbone rather than a fresh one (see TrainConfig).
                        self.model.backbone.load_state_dict(self.rpn_model.backbone.state_dict())
                    if (stage.name == "step3_rpn" and cfg.alternating_init == "step1"
                            and not resumed_mid_stage):
                        # Step 3 likewise starts its RPN layers from step 1's trained ones: they only
                        # have to adapt to step 2's features, not learn from nothing in a short step.
                        self.model.rpn.load_state_dict(self.rpn_model.rpn.state_dict())
                    if state is not None:
                        set_rng_state(state["rng"])  # after building the stage, which may draw numbers
                        state = None
                _train_mode(net)
                self.sampler.set_epoch(self.epoch, skip_batches=self.epoch_step)
                for images, targets in self._loader():
                    self._check_targets(targets)
                    images, targets = _move_batch(images, targets, self.device)
                    if cfg.time_budget_s is not None:
                        used = (time.perf_counter() - start_time) / cfg.time_budget_s
                        scheduler.lr_lambdas[0].time_fraction = self._stage_time_fraction(stage_index, used)
                    record = self._iteration(stage, wrapped, optimizer, scheduler, scaler, images, targets)
                    self.history.append(record)
                    self.step += 1
                    self.epoch_step += 1
                    if bar is not None:
                        for k, v in record.items():
                            if k.startswith("loss") or k == "total":
                                running[k] = v if k not in running else 0.9 * running[k] + 0.1 * v
                        postfix = {k.replace("loss_", ""): f"{v:.3f}" for k, v in running.items()}
                        postfix["lr"] = f"{record['lr']:.2g}"
                        if cfg.time_budget_s is not None:
                            # The bar's end is what the budget allows at the speed so far, so its ETA is
                            # the budget's; the postfix shows the seconds used of the budget.
                            spent = time.perf_counter() - start_time
                            reachable = self.step + (self.step - start_step) * (cfg.time_budget_s - spent) / spent
                            bar.total = max(self.step, min(planned, math.ceil(reachable)))
                            postfix["budget"] = f"{spent:.0f}/{cfg.time_budget_s:g}s"
                        bar.set_postfix(postfix, refresh=False)
                        bar.update(1)
                    if self._interrupted():
                        stop_reason = "interrupted"
                    elif self.callback is not None and self.callback(record) is False:
                        stop_reason = "callback"
                    elif cfg.max_iters is not None and self.step >= cfg.max_iters:
                        stop_reason = "max_iters"
                    elif cfg.time_budget_s is not None and self._over_budget(start_time):
                        stop_reason = "time_budget"
                    if stop_reason != "completed":
                        break
                if stop_reason == "completed":  # the epoch ran to its end
                    self.epoch += 1
                    self.epoch_step = 0
                    if self.epoch % cfg.checkpoint_every == 0 or self.epoch == total_epochs:
                        elapsed = elapsed_before + time.perf_counter() - start_time
                        self._save(stage_index, optimizer, scheduler, scaler, elapsed)
                        saved_step = self.step
                    if self.epoch < total_epochs and self._stage_index(self.epoch) != stage_index:
                        optimizer = None  # next stage: fresh optimiser and schedule
            if saved_step != self.step and self.step != start_step:  # stopped early: save where we are
                elapsed = elapsed_before + time.perf_counter() - start_time
                self._save(stage_index, optimizer, scheduler, scaler, elapsed)
        finally:
            for signum, handler in previous_handlers.items():
                signal.signal(signum, handler)
            if bar is not None:
                bar.close()
        seconds = time.perf_counter() - start_time
        iterations = self.step - start_step
        if self.last_checkpoint is None and resume_path is not None:  # resumed a finished run
            self.last_checkpoint = Path(resume_path)
        for m in (self.model, self.rpn_model):  # hand back a model whose parameters are all trainable again
            if m is not None:
                _set_trainable(m, [name for name, _ in m.named_children()], self._fixed)
        self.model.eval()
        return TrainResult(
            history=self.history,
            checkpoint=self.last_checkpoint if _is_main() else self.checkpoint_path,
            model=self.model,
            stop_reason=stop_reason,
            iterations=iterations,
            seconds=seconds,
            images=iterations * cfg.batch_size * self.world_size,
            extra={"signal": self._signal, "replanned": self.replanned,
                   "stale_temp_files_removed": [str(p) for p in self.stale_removed]},
        )

    def _install_signal_handlers(self) -> dict:
        """SIGINT/SIGTERM set a flag that the loop reads after the current iteration (then it saves
        and stops); a second signal raises ``KeyboardInterrupt`` at once. Main thread only."""
        if threading.current_thread() is not threading.main_thread():
            return {}

        def handler(signum, frame):
            if self._signal is not None:  # asked twice: stop now
                raise KeyboardInterrupt
            self._signal = signum

        previous = {}
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                previous[signum] = signal.signal(signum, handler)
            except (ValueError, OSError):  # not settable here (embedded interpreters)
                pass
        return previous

    def _interrupted(self) -> bool:
        flag = self._signal is not None
        if self.distributed:  # every process must stop at the same iteration
            t = torch.tensor([float(self._signal or 0)], device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            if t.item() and self._signal is None:
                self._signal = int(t.item())
            flag = bool(t.item())
        return flag

    def _loader(self) -> DataLoader:
        """This epoch's loader. Its own generator (from seed and epoch) seeds the workers, so
        creating it draws nothing from the global RNG that the model and transforms use."""
        generator = torch.Generator().manual_seed(self.cfg.seed * 100_003 + self.epoch)
        return DataLoader(self.dataset, batch_size=self.cfg.batch_size, sampler=self.sampler,
                          num_workers=self.cfg.num_workers, collate_fn=_collate, generator=generator,
                          pin_memory=self.device.type == "cuda")

    def _stage_time_fraction(self, stage_index: int, used: float) -> float:
        """The share of stage ``stage_index``'s part of the time budget used, when ``used`` of the
        whole budget is gone; the budget is shared between stages as their epochs are."""
        bounds = self._stage_bounds()
        total = bounds[-1][1]
        start, end = (b / total for b in bounds[stage_index])
        return min(max((used - start) / max(end - start, 1e-9), 0.0), 1.0)

    def _over_budget(self, start_time: float) -> bool:
        over = time.perf_counter() - start_time >= self.cfg.time_budget_s
        if self.distributed:  # every process must stop at the same iteration
            flag = torch.tensor([float(over)], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            over = bool(flag.item())
        return over

    def close(self) -> None:
        """Leave the process group if this trainer created it."""
        if self._owns_process_group and dist.is_initialized():
            dist.destroy_process_group()
            self._owns_process_group = False


def train(
    model_cfg: ModelConfig,
    data_cfg: DataConfig,
    train_cfg: TrainConfig,
    resume: str | os.PathLike | None = None,
    progress: bool = True,
    callback: Callable[[dict], Any] | None = None,
    train_dataset=None,
    skip_bad_images: bool = False,
) -> TrainResult:
    """Train a ``FasterRCNN`` per the three configs; see ``Trainer`` for the arguments.

    Raises ``RuntimeError`` naming the step and the loss if a loss becomes NaN or infinite; the
    last checkpoint written stays as it was.
    """
    trainer = Trainer(model_cfg, data_cfg, train_cfg, resume=resume, progress=progress,
                      callback=callback, train_dataset=train_dataset, skip_bad_images=skip_bad_images)
    return trainer.run()


# ---------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    progress: bool = False,
    num_proposals: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Detect on every image of ``dataset`` and score it: VOC mAP@0.5, COCO mAP, proposal recall.

    Returns a dict with ``map_50`` (VOC all-point AP at IoU 0.5), ``map`` (COCO AP@[.5:.95]),
    ``ap_per_class`` (``{name: AP@0.5}``), ``recall_50`` / ``recall_70`` (gt recall by all the
    proposals at IoU 0.5 / 0.7), ``voc``, ``coco``, ``proposal_recall`` (the full results of
    ``rpnlab.engine.evaluation``), ``num_images`` and ``seconds``. The model is left in eval mode.
    """
    from rpnlab.engine.evaluation import (
        DEFAULT_NUM_PROPOSALS,
        evaluate_coco,
        evaluate_voc,
        proposal_recall,
    )

    start = time.perf_counter()
    device = next(model.parameters()).device if device is None else resolve_device(device)
    model.to(device).eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=_collate)
    if progress:
        from tqdm.auto import tqdm

        loader = tqdm(loader, desc="evaluate", unit="batch", dynamic_ncols=True)
    detections, ground_truth, proposals = [], [], []
    for images, targets in loader:
        images, _ = _move_batch(images, [], device)
        dets, inter = model(images, return_intermediates=True)
        detections += [{k: v.cpu() for k, v in d.items()} for d in dets]
        proposals += [p.cpu() for p in inter["proposals"]]
        ground_truth += [{k: t[k] for k in ("boxes", "labels", "difficult") if k in t} for t in targets]
    num_classes = model.num_classes
    names = list(getattr(dataset, "classes", [])) or None
    voc = evaluate_voc(detections, ground_truth, num_classes, class_names=names)
    coco = evaluate_coco(detections, ground_truth, num_classes)
    counts = num_proposals or [n for n in DEFAULT_NUM_PROPOSALS if n <= max([len(p) for p in proposals] + [1])] or [1]
    recall = proposal_recall(proposals, [g["boxes"] for g in ground_truth], num_proposals=counts)
    return {
        "map_50": voc["map"],
        "map": coco["map"],
        "ap_per_class": {row["name"]: row["ap"] for row in voc["per_class"]},
        "recall_50": float(recall["recall_50"][-1]),
        "recall_70": float(recall["recall_70"][-1]),
        "voc": voc,
        "coco": coco,
        "proposal_recall": recall,
        "num_images": len(detections),
        "seconds": time.perf_counter() - start,
    }


def parameter_digest(model: nn.Module) -> str:
    """SHA-256 of a model's state dict (names and exact bytes): equal digests, equal models."""
    import hashlib

    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
