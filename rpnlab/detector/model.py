"""FasterRCNN: backbone -> Region Proposal Network -> RoI heads, assembled from rpnlab's pieces.

The forward pass, in the order data flows::

    images (ImageBatch or list of (3, H, W) in [0, 1])
      -> normalise with the ImageNet mean/std, zero the padding  (B, 3, H, W)
      -> backbone                                                 list[(B, C, H/s, W/s)]
      -> RPN: anchors, objectness, deltas -> proposals            list[(P_i, 4)]
      -> RoI heads: pool each proposal, classify, refine          list[dict(boxes, scores, labels)]

In training mode with targets, ``forward`` returns the four losses (``loss_objectness``,
``loss_rpn_box_reg``, ``loss_classifier``, ``loss_box_reg``); in eval mode, the detections of each
image in that image's pixel coordinates. ``rpn_only=True`` stops after the RPN (its losses, or its
proposals in eval mode) and ``proposals=`` skips the RPN and runs Fast R-CNN on given boxes: the
two halves that the paper's 4-step alternating training trains in turn.

The model does not resize: images arrive at the size the data transforms chose, and boxes go
out in those same pixels. ``synthetic_model_config()`` is the CPU-sized configuration for the
embedded synthetic shapes; the dataclass defaults in ``rpnlab.config`` stay the paper's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from rpnlab.config import TORCHVISION_DETECTORS, AnchorConfig, ModelConfig, RoIConfig, RPNConfig
from rpnlab.detector.backbones import build_backbone
from rpnlab.detector.images import ImageBatch, pad_images

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "FasterRCNN",
    "gpu_model_config",
    "synthetic_model_config",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def synthetic_model_config(num_classes: int = 3) -> ModelConfig:
    """The default CPU configuration for the synthetic shapes (128 px images, 12-77 px objects).

    Chosen by measurement (benchmarks/bench_detector.py); differences from the paper's defaults:

    - backbone ``"small"`` at stride 8: trains from scratch in minutes on a laptop CPU, and an
      8 px anchor grid covers small objects far better than 16 px (with anchors 16, 32, 64:
      93% of the gt boxes have an anchor at IoU >= 0.5, against 62% at stride 16);
    - anchor sizes 16, 32, 64 centred in their cells (offset 0.5), not 128-512: the objects are
      12-77 px, not VOC's 30-500;
    - fewer proposals (a 16 x 16 map has 2304 anchors, not ~20000: 500 -> NMS -> 300 in training,
      600 -> 100 at test) and 32 RoIs per image, half of them foreground at most (0.25 in the
      paper): more learning signal per image when a run lasts minutes;
    - 128 sampled anchors per image for the RPN (256 in the paper), so the few positives of a
      small image weigh more;
    - a narrower RPN conv and box head (128 ch, 256-d) to match the small backbone, and RoI Align
      to 5 x 5 with one sample per bin: torchvision's CPU RoI Align backward runs on one thread and
      took a fifth of an iteration at 64 RoIs and 7 x 7, and NMS over 1000 boxes per image another
      twelfth (``torch.profiler``, 1 thread).

    Measured for issue 8 (val mAP@0.5 after a full cosine schedule, seeds 0 and 1, one thread;
    CPU seconds of the process): the earlier preset (64 RoIs, 7 x 7, 1000 boxes into NMS) after
    900 iterations: 0.402 and 0.382 in 158 and 154 CPU s; this one after 1200 iterations: 0.504
    and 0.512 in 143 and 134 CPU s (0.66x the CPU per iteration, 1.3x the mAP for less CPU). Earlier, one seed of 600 iterations:
    BatchNorm instead of GroupNorm 0.19 against 0.31, lr 0.1 instead of 0.05 0.23.
    """
    return ModelConfig(
        num_classes=num_classes,
        backbone="small",
        anchors=AnchorConfig(sizes=((16.0, 32.0, 64.0),), aspect_ratios=((0.5, 1.0, 2.0),), strides=(8,),
                             offset=0.5),
        rpn=RPNConfig(
            conv_channels=128,
            batch_size_per_image=128,
            pre_nms_top_n_train=500,
            post_nms_top_n_train=300,
            pre_nms_top_n_test=600,
            post_nms_top_n_test=100,
        ),
        roi=RoIConfig(batch_size_per_image=32, positive_fraction=0.5, output_size=5, sampling_ratio=1,
                      representation_size=256),
    ).validate()


def gpu_model_config(num_classes: int = 3) -> ModelConfig:
    """The CUDA configuration for the synthetic shapes drawn at 512 px (48-307 px objects).

    Meant for one GPU with the data and training of ``rpnlab.engine.presets`` (``--preset gpu``):
    four times the CPU preset's image side, so closer to the paper's working sizes, and the
    paper's values wherever they fit these objects:

    - the paper's anchor scales 128 and 256 (its 512 would be as large as the whole image; the
      objects start at 48 px, so 64 joins them) at its three ratios 0.5, 1, 2: 9 anchors per
      location, as in the paper; stride 8 from the ``"small"`` backbone (GroupNorm, as the CPU
      preset: batch norm learned slower there);
    - the paper's proposal counts (12000 -> 2000 for training, 6000 -> 300 at test), its 256
      sampled anchors per image and a 256-wide RPN conv;
    - 256 RoIs per image, a quarter of them foreground at most (the paper's fraction), RoI Align
      with 2 samples per bin and a 1024-d box head (torchvision's).
    """
    return ModelConfig(
        num_classes=num_classes,
        backbone="small",
        anchors=AnchorConfig(sizes=((64.0, 128.0, 256.0),), aspect_ratios=((0.5, 1.0, 2.0),), strides=(8,),
                             offset=0.5),
        rpn=RPNConfig(conv_channels=256),
        roi=RoIConfig(batch_size_per_image=256, positive_fraction=0.25, sampling_ratio=2,
                      representation_size=1024),
    ).validate()


class FasterRCNN(nn.Module):
    """Faster R-CNN: a backbone shared by a Region Proposal Network and a Fast R-CNN head.

    Args:
        backbone: module mapping normalised images ``(B, 3, H, W)`` to a list of feature maps.
        rpn: ``rpnlab.detector.rpn.RegionProposalNetwork``.
        roi_heads: ``rpnlab.detector.roi_heads.RoIHeads``.
        num_classes: C foreground classes (labels 1..C, 0 is background).
        image_mean, image_std: per-channel normalisation applied inside ``forward``.
        size_divisible: a list of images is padded to a multiple of this.
        config: the ``ModelConfig`` it was built from, kept for checkpoints (optional).
    """

    def __init__(
        self,
        backbone: nn.Module,
        rpn: nn.Module,
        roi_heads: nn.Module,
        num_classes: int,
        image_mean: Sequence[float] = IMAGENET_MEAN,
        image_std: Sequence[float] = IMAGENET_STD,
        size_divisible: int = 16,
        config: ModelConfig | None = None,
    ):
        super().__init__()
        self.backbone = backbone
        self.rpn = rpn
        self.roi_heads = roi_heads
        self.num_classes = int(num_classes)
        self.size_divisible = int(size_divisible)
        self.config = config
        # Names of labels 1..C (set by training or from_torchvision; kept in checkpoints).
        self.class_names = [f"class {i}" for i in range(1, self.num_classes + 1)]
        # Buffers, so they follow .to(device) and land in the state dict.
        self.register_buffer("image_mean", torch.tensor(image_mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("image_std", torch.tensor(image_std, dtype=torch.float32).view(1, 3, 1, 1))

    @classmethod
    def from_config(cls, config: ModelConfig) -> FasterRCNN:
        """Build every piece from a ``ModelConfig`` (validated first).

        The anchor strides must equal the backbone's feature strides, one per level.
        """
        from rpnlab.detector.roi_heads import RoIHeads
        from rpnlab.detector.rpn import RegionProposalNetwork

        if not isinstance(config, ModelConfig):
            raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
        config.validate()
        if config.backbone in TORCHVISION_DETECTORS:
            return cls._from_torchvision_config(config)
        backbone, channels, strides = build_backbone(config.backbone, config.pretrained, config.small_norm)
        if tuple(config.anchors.strides) != tuple(strides):
            raise ValueError(
                f"anchors.strides={tuple(config.anchors.strides)} does not match backbone "
                f"{config.backbone!r}, whose feature strides are {tuple(strides)}: "
                "give one anchor level per feature level with the same stride"
            )
        rpn = RegionProposalNetwork.from_config(config.anchors, config.rpn, channels)
        # One spatial scale per level: with several (an FPN) each RoI is pooled from the level
        # that suits its size (FPN's rule, see rpnlab.detector.roi.fpn_level_of_boxes).
        scales = tuple(1.0 / s for s in strides)
        roi_heads = RoIHeads.from_config(config.roi, channels, config.num_classes,
                                         spatial_scale=scales[0] if len(scales) == 1 else scales)
        return cls(backbone, rpn, roi_heads, config.num_classes, config=config)

    @classmethod
    def _from_torchvision_config(cls, config: ModelConfig) -> FasterRCNN:
        """A torchvision detector's architecture (and ``config.init``'s weights) with the config's
        RPN and RoI settings (thresholds, counts, sampling); its anchors must be torchvision's."""
        from rpnlab.detector.roi_heads import RoIHeads
        from rpnlab.detector.rpn import RegionProposalNetwork
        from rpnlab.detector.torchvision_models import torchvision_model_for, torchvision_parts

        parts = torchvision_parts(torchvision_model_for(config))
        if parts["config"].anchors != config.anchors:
            raise ValueError(f"anchors={config.anchors} differ from those of {config.backbone!r}, whose head "
                             f"was trained for {parts['config'].anchors}; start from "
                             f"rpnlab.detector.torchvision_models.torchvision_model_config({config.backbone!r})")
        rpn = RegionProposalNetwork(parts["rpn"].anchor_generator, parts["rpn"].head, config.rpn)
        roi_heads = RoIHeads(parts["roi_heads"].pooler, parts["roi_heads"].head, config.roi, config.num_classes)
        model = cls(parts["backbone"], rpn, roi_heads, config.num_classes, image_mean=parts["image_mean"],
                    image_std=parts["image_std"], size_divisible=parts["size_divisible"], config=config)
        model.torchvision_name = parts["name"]
        model.input_size = parts["input_size"]
        model.class_names = parts["class_names"]
        return model

    @classmethod
    def from_torchvision(cls, model: nn.Module) -> FasterRCNN:
        """torchvision's ``fasterrcnn_resnet50_fpn`` (v1, v2) or ``fasterrcnn_mobilenet_v3_large(_320)_fpn``
        as an rpnlab model with the same weights and detections (``rpnlab.detector.torchvision_models``)."""
        from rpnlab.detector.torchvision_models import torchvision_parts

        parts = torchvision_parts(model)
        out = cls(parts["backbone"], parts["rpn"], parts["roi_heads"], parts["num_classes"],
                  image_mean=parts["image_mean"], image_std=parts["image_std"],
                  size_divisible=parts["size_divisible"], config=parts["config"])
        out.torchvision_name = parts["name"]  # the torchvision builder it came from
        out.input_size = parts["input_size"]  # torchvision's (min_size, max_size) resize, for DataConfig
        out.class_names = parts["class_names"]
        return out.eval()

    @classmethod
    def from_state(cls, state: dict, map_location: str | torch.device = "cpu") -> FasterRCNN:
        """Rebuild a model from a training checkpoint's contents (``rpnlab.engine.checkpoint``), in eval mode.

        ``state`` holds ``"model"`` (the state dict) and ``"configs"["model"]`` (the ``ModelConfig``
        as a dict). Pretrained backbone weights are not looked for, since ``state`` has every weight.
        Read a file with ``rpnlab.engine.checkpoint.load_model``.
        """
        from rpnlab.config import from_dict

        if "model" not in state or "model" not in state.get("configs", {}):
            raise ValueError("not an rpnlab training checkpoint: it has no model weights or no model config")
        config = from_dict(ModelConfig, state["configs"]["model"])
        config.pretrained = config.init = None  # the state has every weight
        model = cls.from_config(config)
        model.load_state_dict(state["model"])
        model.config.pretrained = state["configs"]["model"].get("pretrained")
        model.config.init = state["configs"]["model"].get("init")
        names = state.get("classes")
        if isinstance(names, (list, tuple)) and len(names) == model.num_classes:
            model.class_names = [str(n) for n in names]
        return model.to(map_location).eval()

    # ------------------------------------------------------------------------------------------

    def prepare_images(self, images) -> tuple[Tensor, list[tuple[int, int]]]:
        """Normalise ``images`` -> ``(tensors (B, 3, H, W), image_sizes [(h, w)])``.

        ``images``: an ``ImageBatch`` (zero-padded, values in [0, 1]) or a list of ``(3, H_i, W_i)``
        tensors. Padding stays 0 after normalisation, so it reads as "mean colour", as torchvision.
        """
        if isinstance(images, (list, tuple)):
            for i, img in enumerate(images):
                if not isinstance(img, Tensor) or img.dim() != 3 or img.shape[0] != 3:
                    shape = tuple(img.shape) if isinstance(img, Tensor) else type(img).__name__
                    raise ValueError(f"images[{i}] must be a (3, H, W) RGB tensor, got {shape}")
            images = pad_images(images, self.size_divisible)
        if not isinstance(images, ImageBatch):
            raise TypeError(
                f"images must be an ImageBatch or a list of (3, H, W) tensors, got {type(images).__name__}"
            )
        x = images.tensors
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"images.tensors must have shape (B, 3, H, W), got {tuple(x.shape)}")
        sizes = [(int(h), int(w)) for h, w in images.image_sizes]
        x = (x - self.image_mean.to(x.dtype)) / self.image_std.to(x.dtype)
        H, W = x.shape[-2:]
        if any(h < H or w < W for h, w in sizes):
            x = x * images.pixel_mask()[:, None].to(x.dtype)
        return x, sizes

    def forward(
        self,
        images,
        targets: list[dict[str, Tensor]] | None = None,
        return_intermediates: bool = False,
        rpn_only: bool = False,
        proposals: list[Tensor] | None = None,
    ):
        """Run the detector.

        Args:
            images: ``ImageBatch`` or list of ``(3, H_i, W_i)`` float tensors in [0, 1].
            targets: per image ``dict(boxes (M, 4), labels (M,) in 1..C)``; required in training.
            return_intermediates: also return a dict of what each stage computed.
            rpn_only: stop after the RPN. Training: ``dict(loss_objectness, loss_rpn_box_reg)``;
                eval: per image ``dict(boxes (P, 4), scores (P,))``, the proposals.
            proposals: per image ``(P_i, 4)`` boxes to use instead of the RPN's (Fast R-CNN on
                fixed proposals); the RPN is then not run and no RPN loss is returned.

        Returns:
            training: dict of scalar losses; eval: list of ``dict(boxes (D, 4), scores (D,),
            labels (D,))``. With ``return_intermediates=True``: ``(that, intermediates)`` where
            intermediates has ``images`` (normalised tensors), ``image_sizes``, ``features``,
            ``anchors`` ((A, 4)), ``rpn`` (the RPN's intermediates), ``proposals`` and ``roi``.
        """
        if rpn_only and proposals is not None:
            raise ValueError("rpn_only=True and proposals= exclude each other: one skips the RoI heads, "
                             "the other the RPN")
        if self.training and targets is None:
            raise ValueError("targets are required in training mode (call model.eval() to predict)")
        if targets is not None:
            targets = [self._check_target(t, i, self.num_classes) for i, t in enumerate(targets)]
        x, image_sizes = self.prepare_images(images)
        if targets is not None and len(targets) != x.shape[0]:
            raise ValueError(f"targets has {len(targets)} entries for a batch of {x.shape[0]} images")
        features = self.backbone(x)
        inter: dict = {"images": x, "image_sizes": image_sizes, "features": features}
        losses: dict[str, Tensor] = {}
        scores = None
        if proposals is None:
            rpn_out = self.rpn(features, image_sizes, targets=targets, return_intermediates=return_intermediates)
            proposals, scores = rpn_out.proposals, rpn_out.scores
            losses.update(rpn_out.losses)
            if return_intermediates:
                inter["rpn"] = rpn_out.intermediates
                anchors = rpn_out.intermediates.get("anchors")
                if anchors is None:
                    sizes = [tuple(f.shape[-2:]) for f in features]
                    anchors = self.rpn.anchor_generator(sizes, x.device, x.dtype)
                inter["anchors"] = anchors
        else:
            if len(proposals) != x.shape[0]:
                raise ValueError(f"proposals has {len(proposals)} entries for a batch of {x.shape[0]} images")
            proposals = [p.detach() for p in proposals]
        inter["proposals"] = proposals
        if rpn_only:
            if self.training:
                output = losses
            else:
                output = [{"boxes": b, "scores": s} for b, s in zip(proposals, scores)]
            return (output, inter) if return_intermediates else output
        # Approximate joint training: proposals are treated as constants (no gradient through
        # box coordinates), as in the paper's "approximate joint training".
        proposals = [p.detach() for p in proposals]
        detections, roi_losses, roi_inter = self.roi_heads(
            features[0] if len(features) == 1 else features, proposals, image_sizes, targets=targets, return_intermediates=return_intermediates
        )
        losses.update(roi_losses)
        if return_intermediates:
            inter["roi"] = roi_inter
        output = losses if self.training else detections
        return (output, inter) if return_intermediates else output

    @staticmethod
    def _check_target(target: dict, index: int, num_classes: int) -> dict:
        from rpnlab.detector.boxes import check_boxes
        from rpnlab.detector.checks import check_finite, check_labels

        if not isinstance(target, dict) or "boxes" not in target or "labels" not in target:
            raise ValueError(f"targets[{index}] must be a dict with 'boxes' (M, 4) and 'labels' (M,)")
        check_boxes(target["boxes"], f"targets[{index}]['boxes']", values=False)
        labels = target["labels"]
        if labels.dim() != 1 or labels.shape[0] != target["boxes"].shape[0]:
            raise ValueError(f"targets[{index}]['labels'] must have shape ({target['boxes'].shape[0]},), "
                             f"got {tuple(labels.shape)}")
        # Values (CPU, or with value checks on; see rpnlab.detector.checks): a label past C fails
        # deep in the loss ("Target 7 is out of bounds"), a NaN box trains on garbage.
        check_finite(target["boxes"], f"targets[{index}]['boxes']")
        check_labels(labels, f"targets[{index}]['labels']", 1, num_classes)
        return target

    @torch.no_grad()
    def predict(self, images, score_thresh: float | None = None) -> list[dict[str, Tensor]]:
        """Detections in eval mode without touching the caller's train/eval state.

        ``score_thresh`` filters the returned detections further (post-processing already drops
        those under ``roi.score_thresh``).
        """
        was_training = self.training
        self.eval()
        try:
            detections = self(images)
        finally:
            self.train(was_training)
        if score_thresh is not None:
            detections = [{k: v[d["scores"] >= score_thresh] for k, v in d.items()} for d in detections]
        return detections
