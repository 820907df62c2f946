"""Short training runs for the stage notebooks (04-07): the RPN alone, then the Fast R-CNN head alone.

``train_rpn`` is ``rpnlab.engine.train.train`` with ``schedule="rpn"`` and the synthetic-shapes defaults,
sized in iterations rather than epochs, so a notebook can say "train for 300 iterations".

``train_fast_rcnn_head`` trains only the RoI head of a model whose backbone and RPN stay frozen
(step 4 of the paper's alternating schedule, without steps 2 and 3). The features are then
constants, so no gradient flows back through RoI pooling into the feature map: on a CPU that
backward pass costs more than everything else of a joint iteration, and skipping it makes a
useful head train in about a minute.

``course_rpn`` is the RPN notebooks 04, 05 and 07 (and ``make prepare``, ahead of a workshop) share:
trained once with ``train_rpn`` into a cache folder keyed by the model preset and the training
settings, then loaded by every later notebook in a second (with its loss records, which notebook
04 draws). ``python -m rpnlab.lab.stage_training`` trains it with notebook 05's default
parameters, and notebook 04's twin trained with the paper's loss normalisation.

``course_head`` does the same for notebook 07's Fast R-CNN head: trained with
``train_fast_rcnn_head`` on a given model's frozen RPN, cached under a key that covers the
model's weights and config (so another RPN, or a retrained one, gets its own head), the sampling
and the training settings; loaded into the model in a second when the cache has it.
``make prepare`` trains it too, with notebook 07's defaults.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from rpnlab.config import DataConfig
from rpnlab.engine.devices import resolve_device
from rpnlab.engine.train import ROI_LOSSES, TrainResult, lr_factor, synthetic_train_config, train

__all__ = ["CourseHead", "CourseRPN", "course_cache_dir", "course_head", "course_rpn", "frozen_rpn_proposals", "model_fingerprint", "train_fast_rcnn_head", "train_rpn"]


def train_rpn(
    iterations: int,
    num_images: int = 600,
    batch_size: int = 8,
    seed: int = 0,
    device: str | torch.device = "auto",
    out_dir: str | None = None,
    lr: float = 0.02,
    objectness: str = "sigmoid",
    loss_normalization: str = "sampled",
    model_config=None,
    progress: bool = False,
) -> TrainResult:
    """Train backbone + RPN on the synthetic shapes for ``iterations`` SGD steps.

    Args:
        iterations: SGD steps (batches of ``batch_size`` images); the learning-rate schedule
            (warm-up, then cosine) spans the whole epochs these steps start.
        num_images: training images (the first ones of the synthetic train split).
        out_dir: folder for ``checkpoint.pt``; default a fresh temporary folder (not deleted:
            the checkpoint is what ``TrainResult.checkpoint`` points to).
        objectness, loss_normalization: ``RPNConfig`` settings (``"sigmoid"`` / ``"softmax"``,
            ``"sampled"`` / ``"paper"``).
        model_config: a ``ModelConfig`` to start from (default ``synthetic_model_config()``).
    Returns:
        ``rpnlab.engine.train.TrainResult``: ``history`` (one dict per step with ``loss_objectness``,
        ``loss_rpn_box_reg``, ``total``, ``lr``), ``model`` (a ``FasterRCNN`` in eval mode whose
        RoI head is untrained), ``checkpoint``, ``seconds``.
    """
    from rpnlab.data import SyntheticShapes
    from rpnlab.detector.model import synthetic_model_config

    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations <= 0:
        raise ValueError(f"iterations must be a positive int, got {iterations!r}")
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images <= 0:
        raise ValueError(f"num_images must be a positive int, got {num_images!r}")
    model_cfg = copy.deepcopy(model_config) if model_config is not None else synthetic_model_config()
    model_cfg.rpn.objectness = objectness
    model_cfg.rpn.loss_normalization = loss_normalization
    model_cfg.validate()
    iters_per_epoch = math.ceil(num_images / batch_size)
    train_cfg = synthetic_train_config(
        schedule="rpn",
        amp="off",  # float32 as when the course's numbers and caches were made; same on every CPU
        epochs=math.ceil(iterations / iters_per_epoch),
        batch_size=batch_size,
        lr=lr,
        warmup_iters=min(50, max(1, iterations // 5)),
        max_iters=iterations,
        seed=seed,
        device=str(device),
        out_dir=out_dir or tempfile.mkdtemp(prefix="rpnlab-rpn-"),
    )
    data_cfg = DataConfig(num_train=num_images, seed=seed)
    dataset = SyntheticShapes("train", num_images=num_images, seed=seed)
    return train(model_cfg, data_cfg, train_cfg, progress=progress, train_dataset=dataset)


def course_cache_dir() -> Path:
    """Where trained course models are kept: ``$RPNLAB_COURSE_CACHE``, else ``data/cache/course``
    of the source checkout (git-ignored), else ``~/.cache/rpnlab/course``."""
    if os.environ.get("RPNLAB_COURSE_CACHE"):
        return Path(os.environ["RPNLAB_COURSE_CACHE"])
    repo = Path(__file__).resolve().parents[2]
    if (repo / "pyproject.toml").is_file() and (repo / "data").is_dir():
        return repo / "data" / "cache" / "course"
    return Path.home() / ".cache" / "rpnlab" / "course"


@dataclasses.dataclass
class CourseRPN:
    """The shared RPN: the model (eval mode), its checkpoint, and where it came from."""

    model: nn.Module
    checkpoint: Path
    trained_here: bool  # False: loaded from the cache
    train_seconds: float  # how long its training took (then or now)
    seconds: float  # how long this call took
    history: list[dict[str, Any]] | None = None  # the training's loss records (None: a cache from before they were kept)

    def describe(self) -> str:
        if self.trained_here:
            return (f"RPN trained here in {self.train_seconds:.0f} s and cached at {self.checkpoint}; "
                    "later notebooks load it in seconds (`make prepare` trains it ahead of time)")
        return (f"RPN loaded from the course cache in {self.seconds:.1f} s ({self.checkpoint}; "
                f"training it took {self.train_seconds:.0f} s)")


def course_rpn(iterations: int, num_images: int = 600, seed: int = 0, device: str | torch.device = "auto",
               batch_size: int = 8, cache_dir: str | os.PathLike | None = None, refresh: bool = False,
               objectness: str = "sigmoid", loss_normalization: str = "sampled",
               need_history: bool = False) -> CourseRPN:
    """The course's RPN for these settings: loaded from the cache, or trained (``train_rpn``) and cached.

    The cache key covers the model preset (``synthetic_model_config()``, with ``objectness`` and
    ``loss_normalization`` applied) and the training settings, so a retuned preset, another loss
    or other iterations train a new RPN instead of reusing a stale one. ``refresh=True`` retrains
    even when the cache has it; ``need_history=True`` retrains a cached RPN whose loss records
    were not kept (notebook 04 draws them).
    """
    from rpnlab.detector.model import synthetic_model_config
    from rpnlab.engine.checkpoint import load_model

    start = time.perf_counter()
    dev = resolve_device(device)
    model_cfg = synthetic_model_config()
    model_cfg.rpn.objectness, model_cfg.rpn.loss_normalization = objectness, loss_normalization
    model_cfg.validate()
    key = {"model": dataclasses.asdict(model_cfg), "iterations": iterations,
           "num_images": num_images, "seed": seed, "batch_size": batch_size}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]
    folder = Path(cache_dir) if cache_dir is not None else course_cache_dir()
    folder = folder / f"rpn-{iterations}it-{num_images}img-seed{seed}-{digest}"
    checkpoint, meta, history_file = folder / "checkpoint.pt", folder / "course.json", folder / "history.json"
    cached = checkpoint.is_file() and meta.is_file() and not refresh
    if cached and (history_file.is_file() or not need_history):
        model = load_model(checkpoint, map_location=dev)
        train_seconds = float(json.loads(meta.read_text(encoding="utf-8"))["train_seconds"])
        history = json.loads(history_file.read_text(encoding="utf-8")) if history_file.is_file() else None
        return CourseRPN(model, checkpoint, False, train_seconds, time.perf_counter() - start, history)
    folder.mkdir(parents=True, exist_ok=True)
    run = train_rpn(iterations, num_images, batch_size=batch_size, seed=seed, device=dev, out_dir=str(folder),
                    objectness=objectness, loss_normalization=loss_normalization)
    history_file.write_text(json.dumps(run.history), encoding="utf-8")
    meta.write_text(json.dumps({**key, "train_seconds": run.seconds, "device": str(dev)}, indent=1, default=str),
                    encoding="utf-8")  # written last: a checkpoint without it is an interrupted run
    return CourseRPN(run.model, Path(run.checkpoint), True, run.seconds, time.perf_counter() - start, run.history)


@torch.no_grad()
def frozen_rpn_proposals(model: nn.Module, images, train_counts: bool = True, with_scores: bool = False):
    """Features and proposals of a model's backbone and RPN, without gradient.

    Args:
        model: an ``rpnlab.detector.model.FasterRCNN``; images: an ``ImageBatch`` or a list of ``(3, H, W)``.
        train_counts: use the proposal layer's training-time counts (``post_nms_top_n_train``, what
            Fast R-CNN trains on, as the paper's step 4) rather than the test-time ones.
        with_scores: also return the proposals' objectness probabilities.
    Returns:
        ``features`` (list of ``(B, C, H, W)``), ``proposals`` (per image ``(P_i, 4)``),
        ``image_sizes``, and with ``with_scores`` the ``scores`` (per image ``(P_i,)``). The model's
        train/eval state is left as it was.
    """
    was_training = model.rpn.training
    x, sizes = model.prepare_images(images)
    features = model.backbone(x)
    model.rpn.eval()
    model.rpn.proposal_layer.train(train_counts)
    try:
        out = model.rpn(features, sizes)
    finally:
        model.rpn.train(was_training)
    if with_scores:
        return features, out.proposals, sizes, out.scores
    return features, out.proposals, sizes


def train_fast_rcnn_head(
    model: nn.Module,
    dataset,
    iterations: int,
    batch_size: int = 8,
    lr: float = 0.02,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    warmup_iters: int = 20,
    seed: int = 0,
    device: str | torch.device | None = None,
    callback: Callable[[dict[str, Any]], Any] | None = None,
) -> list[dict[str, Any]]:
    """Train ``model.roi_heads`` for ``iterations`` SGD steps on the proposals of its frozen RPN.

    Args:
        model: an ``rpnlab.detector.model.FasterRCNN`` (its backbone and RPN are left unchanged).
        dataset: yields ``(image, target)``; batches are drawn in a seeded shuffled order.
        iterations: SGD steps; the learning rate warms up over ``warmup_iters`` then decays as a cosine.
        device: default the model's.
        callback: called with each step's record.
    Returns:
        One dict per step: ``step``, ``lr``, ``loss_classifier``, ``loss_box_reg``, ``total``.
        The model is left in eval mode, every parameter trainable again.
    """
    from rpnlab.data import collate

    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations <= 0:
        raise ValueError(f"iterations must be a positive int, got {iterations!r}")
    if len(dataset) == 0:
        raise ValueError("dataset is empty: nothing to train on")
    dev = next(model.parameters()).device if device is None else resolve_device(device)
    model.to(dev)
    was_trainable = {id(p): p.requires_grad for p in model.parameters()}
    for name, part in model.named_children():
        for p in part.parameters():
            p.requires_grad_(name == "roi_heads" and was_trainable[id(p)])
    params = [p for p in model.roi_heads.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, collate_fn=collate,
                        generator=torch.Generator().manual_seed(seed))
    history: list[dict[str, Any]] = []
    model.eval()
    model.roi_heads.train()
    try:
        step = 0
        while step < iterations:
            for images, targets in loader:
                if step >= iterations:
                    break
                images = images.to(dev)
                targets = [{k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in t.items()}
                           for t in targets]
                features, proposals, sizes = frozen_rpn_proposals(model, images)
                feats = features[0] if len(features) == 1 else features
                _, losses, _ = model.roi_heads(feats, proposals, sizes, targets)
                total = sum(losses[k] for k in ROI_LOSSES)
                factor = lr_factor(step, iterations, warmup_iters, "cosine")
                for group in optimizer.param_groups:
                    group["lr"] = lr * factor
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                optimizer.step()
                values = torch.stack([losses[k].detach() for k in ROI_LOSSES] + [total.detach()]).tolist()
                record = {"step": step, "lr": lr * factor, **dict(zip(ROI_LOSSES, values[:-1])), "total": values[-1]}
                if not all(math.isfinite(v) for v in values):
                    raise RuntimeError(f"non-finite loss at step {step}: {record}; try a lower lr")
                history.append(record)
                if callback is not None:
                    callback(record)
                step += 1
    finally:
        for p in model.parameters():
            p.requires_grad_(was_trainable[id(p)])
        model.eval()
    return history


@dataclasses.dataclass
class CourseHead:
    """The course's Fast R-CNN head, loaded into (or trained on) the model ``course_head`` was given."""

    model: nn.Module  # the model given, its ``roi_heads`` now trained
    checkpoint: Path  # the cache file holding the head's weights and its loss records
    trained_here: bool  # False: loaded from the cache
    train_seconds: float  # how long its training took (then or now)
    seconds: float  # how long this call took
    history: list[dict[str, Any]]  # train_fast_rcnn_head's records, one per step
    note: str = ""  # why a cache entry present was not used (unreadable, another key), else empty

    def describe(self) -> str:
        if self.trained_here:
            why = f" ({self.note})" if self.note else ""
            return (f"Fast R-CNN head trained here in {self.train_seconds:.0f} s{why} and cached at "
                    f"{self.checkpoint}; the next run with these settings loads it in seconds "
                    "(`make prepare` trains it ahead of time)")
        return (f"Fast R-CNN head loaded from the course cache in {self.seconds:.1f} s ({self.checkpoint}; "
                f"training it took {self.train_seconds:.0f} s)")


def model_fingerprint(model: nn.Module) -> str:
    """sha256 (hex) of a model's config and every tensor of its ``state_dict`` (names, dtypes,
    shapes, values): two models with the same fingerprint compute the same thing."""
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None:
        digest.update(json.dumps(dataclasses.asdict(config), sort_keys=True, default=str).encode())
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{t.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _dataset_fingerprint(dataset) -> str:
    """sha256 (hex, 16) of a dataset's first image and boxes: changes when its generator does."""
    image, target = dataset[0]
    digest = hashlib.sha256(image.detach().cpu().contiguous().numpy().tobytes())
    digest.update(target["boxes"].detach().cpu().contiguous().numpy().tobytes())
    digest.update(target["labels"].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def course_head(model: nn.Module, iterations: int, num_images: int = 600, batch_size: int = 8,
                lr: float = 0.02, seed: int = 0, batch_size_per_image: int | None = None,
                positive_fraction: float | None = None, warmup_iters: int = 20, momentum: float = 0.9,
                weight_decay: float = 1e-4, cache_dir: str | os.PathLike | None = None,
                refresh: bool = False, device: str | torch.device | None = None) -> CourseHead:
    """The Fast R-CNN head of ``model`` trained on its frozen RPN: loaded from the cache, or
    trained (``train_fast_rcnn_head``) and cached.

    Args:
        model: an ``rpnlab.detector.model.FasterRCNN`` (the course RPN, or one from a checkpoint);
            its ``roi_heads`` is changed in place (loaded or trained), the rest left as it was.
        iterations, batch_size, lr, warmup_iters, momentum, weight_decay, seed: ``train_fast_rcnn_head``'s.
        num_images: training images, the first ones of the synthetic train split of ``seed``.
        batch_size_per_image, positive_fraction: the RoI sampling of the head's loss (default the
            model's ``config.roi``); the model's ``roi_heads.target_sampler`` becomes this sampler.
        refresh: retrain even when the cache has the head.
    The key covers the model's config and weights (``model_fingerprint``: another RPN, a retrained
    one or another initial head gets its own entry), the sampling, the training settings and the
    data. An entry that cannot be read or was written for another key is retrained and replaced,
    and ``CourseHead.note`` says why.
    """
    from rpnlab.data import SyntheticShapes
    from rpnlab.detector.roi_heads import ProposalTargetSampler
    from rpnlab.engine.checkpoint import (
        CheckpointError,
        first_non_finite,
        load_checkpoint,
        save_checkpoint,
    )

    for name, value in (("iterations", iterations), ("num_images", num_images), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    roi_cfg = model.roi_heads.config
    roi_cfg = dataclasses.replace(
        roi_cfg,
        batch_size_per_image=roi_cfg.batch_size_per_image if batch_size_per_image is None else batch_size_per_image,
        positive_fraction=roi_cfg.positive_fraction if positive_fraction is None else positive_fraction,
    ).validate()
    start = time.perf_counter()
    dataset = SyntheticShapes("train", num_images=num_images, seed=seed)
    key = {"model": model_fingerprint(model), "roi": dataclasses.asdict(roi_cfg), "iterations": iterations,
           "num_images": num_images, "batch_size": batch_size, "lr": lr, "seed": seed,
           "warmup_iters": warmup_iters, "momentum": momentum, "weight_decay": weight_decay,
           "data": _dataset_fingerprint(dataset)}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]
    folder = Path(cache_dir) if cache_dir is not None else course_cache_dir()
    checkpoint = folder / f"head-{iterations}it-{num_images}img-bs{batch_size}-seed{seed}-{digest}" / "head.pt"
    model.roi_heads.target_sampler = ProposalTargetSampler.from_config(
        roi_cfg, generator=torch.Generator().manual_seed(seed))
    dev = next(model.parameters()).device if device is None else resolve_device(device)
    note = ""
    if checkpoint.is_file() and not refresh:
        # load_state_dict copies tensor by tensor: a bad entry could leave the head half loaded,
        # and the head retrained from there would not be the one the key names.
        initial = {k: v.clone() for k, v in model.roi_heads.state_dict().items()}
        try:
            state = load_checkpoint(checkpoint, map_location=dev)
            if state.get("key") != digest:
                raise CheckpointError(f"it was written for key {state.get('key')!r}, not {digest!r}")
            bad = first_non_finite(state["roi_heads"], "roi_heads")
            if bad:
                raise CheckpointError(f"{bad} holds NaN or infinity")
            model.to(dev)
            model.roi_heads.load_state_dict(state["roi_heads"])
            return CourseHead(model, checkpoint, False, float(state["train_seconds"]),
                              time.perf_counter() - start, list(state["history"]))
        except (CheckpointError, KeyError, TypeError, ValueError, RuntimeError) as err:
            model.roi_heads.load_state_dict(initial)
            note = f"the cached {checkpoint.name} was unusable, so retrained: {str(err).splitlines()[0]}"
    train_start = time.perf_counter()
    history = train_fast_rcnn_head(model, dataset, iterations, batch_size, lr=lr, momentum=momentum,
                                   weight_decay=weight_decay, warmup_iters=warmup_iters, seed=seed, device=dev)
    train_seconds = time.perf_counter() - train_start
    state = {"key": digest, "roi_heads": model.roi_heads.state_dict(), "history": history,
             "train_seconds": train_seconds, "device": str(dev)}
    save_checkpoint(checkpoint, state)  # atomic: a killed run leaves no half-written entry
    _write_json(checkpoint.parent / "course.json", {**key, "key": digest, "train_seconds": train_seconds,
                                                    "device": str(dev)})  # for people; never read
    return CourseHead(model, checkpoint, True, train_seconds, time.perf_counter() - start, history, note)


def _write_json(path: Path, value: Any) -> None:
    """Write ``value`` as JSON to ``path`` atomically (a temp file in its folder, then ``os.replace``)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(value, f, indent=1, default=str)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _prepare() -> None:
    """Train (or find) the course models with the notebooks' default parameters: ``make prepare``.

    The RPN notebooks 05 and 07 share (05's defaults), notebook 04's pair (the same RPN and its
    twin trained with the paper's loss normalisation, 04's comparison), and notebook 07's Fast
    R-CNN head on that RPN (07's defaults)."""
    import ast

    import papermill

    repo = Path(__file__).resolve().parents[2]

    def defaults(notebook: str, names: tuple[str, ...]) -> dict[str, Any]:
        declared = papermill.inspect_notebook(str(repo / "notebooks" / notebook))
        return {name: ast.literal_eval(declared[name]["default"]) for name in names}  # Python literals

    shared = defaults("05_proposals.ipynb", ("iterations", "num_images", "seed"))
    print(course_rpn(shared["iterations"], shared["num_images"], seed=shared["seed"], need_history=True).describe())
    nb04 = defaults("04_rpn_head_losses.ipynb", ("iterations", "num_images", "seed", "batch_size", "objectness",
                                                 "loss_normalization", "compare_normalizations"))
    norms = [nb04["loss_normalization"]]
    if nb04["compare_normalizations"]:
        norms.append({"paper": "sampled", "sampled": "paper"}[nb04["loss_normalization"]])
    for norm in norms:
        rpn = course_rpn(nb04["iterations"], nb04["num_images"], seed=nb04["seed"], batch_size=nb04["batch_size"],
                         objectness=nb04["objectness"], loss_normalization=norm, need_history=True)
        print(f"notebook 04, {norm} normalisation: {rpn.describe()}")
    nb07 = defaults("07_fast_rcnn_head.ipynb", ("rpn_iterations", "num_images", "seed", "head_iterations", "head_lr",
                                                "batch_size", "batch_size_per_image", "positive_fraction"))
    rpn = course_rpn(nb07["rpn_iterations"], nb07["num_images"], seed=nb07["seed"])
    head = course_head(rpn.model, nb07["head_iterations"], nb07["num_images"], batch_size=nb07["batch_size"],
                       lr=nb07["head_lr"], seed=nb07["seed"], batch_size_per_image=nb07["batch_size_per_image"],
                       positive_fraction=nb07["positive_fraction"])
    print(f"notebook 07: {head.describe()}")


if __name__ == "__main__":
    _prepare()
