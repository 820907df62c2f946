"""From the RPN's dense predictions to a short list of proposals: decode, top-k, clip, NMS, top-n.

The steps, in torchvision's order (``RegionProposalNetwork.filter_proposals``):

1. decode the predicted offsets against the anchors (``BoxCoder.decode``);
2. keep the ``pre_nms_top_n`` highest objectness logits *of each feature level* (FPN: so a level
   with many small anchors cannot crowd out the others); one level is the paper's single top-k;
3. clip to the image, drop boxes narrower or shorter than ``min_size``, drop scores below
   ``score_thresh`` (scores are probabilities, ``sigmoid(logit)``);
4. non-maximum suppression at ``nms_thresh``, separately per level;
5. keep the ``post_nms_top_n`` best survivors.

py-faster-rcnn clips and drops small boxes before its top-k; here the top-k comes first, as in
torchvision, which changes which boxes enter NMS only when small boxes rank high.

Proposals are treated as constants (the "approximate joint training" of the paper): objectness and
offsets are detached, so no gradient flows back through the choice or the coordinates of a box.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torchvision
from torch import Tensor, nn

from rpnlab.config import RPNConfig
from rpnlab.detector import checks as _checks
from rpnlab.detector.boxes import BoxCoder, box_iou, check_boxes, clip_boxes, remove_small_boxes
from rpnlab.detector.checks import check_finite, check_threshold

__all__ = ["ProposalLayer", "batched_nms", "batched_nms_first", "nms"]

_IMPLEMENTATIONS = ("torchvision", "python")
# Per-image intermediates of ProposalLayer, in the order the loop produces them.
_STEP_KEYS = (
    "pre_nms_boxes",
    "pre_nms_scores",
    "pre_nms_levels",
    "post_nms_boxes",
    "post_nms_scores",
)


def _check_nms_inputs(boxes: Tensor, scores: Tensor) -> None:
    check_boxes(boxes, "boxes", values=False)
    if boxes.dim() != 2:
        raise ValueError(f"boxes must have shape (N, 4), got {tuple(boxes.shape)}")
    if not isinstance(scores, Tensor) or scores.shape != boxes.shape[:1]:
        raise ValueError(
            f"scores must have shape ({boxes.shape[0]},) to match boxes, got {getattr(scores, 'shape', scores)}"
        )


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float, chunk_size: int = 1024) -> Tensor:
    """Greedy non-maximum suppression in plain PyTorch (for teaching; the same as ``torchvision.ops.nms``).

    Go through the boxes from the highest score down; keep a box unless an already kept box
    overlaps it with IoU ``> iou_threshold``.

    Args:
        boxes: ``(N, 4)``; scores: ``(N,)``.
        iou_threshold: a box is suppressed when its IoU with a kept box is strictly above this;
            ``1`` keeps everything, ``0`` suppresses any overlap; outside [0, 1] is a ``ValueError``.
        chunk_size: rows of the IoU matrix computed at a time (bounds the float memory).

    Values checked (CPU, or with ``rpnlab.detector.checks`` value checks on): NaN/inf ``boxes`` or
    ``scores`` are a ``ValueError`` naming the argument (a NaN score would sort anywhere).
    Returns:
        ``keep: (K,)`` int64 indices into ``boxes``, by decreasing score.

    Equal scores keep their input order (a stable sort), as torchvision's CPU kernel does; its CUDA
    kernel may order ties differently. Zero-area boxes have IoU 0 with everything, so they are
    never suppressed (torchvision's 0/0 gives NaN, which is not ``>`` the threshold either).
    IoUs are computed a block of ``chunk_size`` rows at a time and only against lower-scoring
    boxes (the upper triangle), so memory stays at ``chunk_size x N`` floats.
    """
    _check_nms_inputs(boxes, scores)
    check_threshold(iou_threshold, "iou_threshold")
    check_finite(boxes, "boxes")
    check_finite(scores, "scores")
    n = boxes.shape[0]
    if n == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    order = torch.sort(scores, descending=True, stable=True).indices
    boxes = boxes[order]
    suppressed = torch.zeros(n, dtype=torch.bool, device=boxes.device)
    kept = torch.zeros(n, dtype=torch.bool, device=boxes.device)
    for start in range(0, n, chunk_size):
        end = min(start + chunk_size, n)
        # overlaps[i, j]: keeping box start+i (in score order) rules out box start+j
        overlaps = box_iou(boxes[start:end], boxes[start:]) > iou_threshold
        # The greedy pass is sequential: whether a box survives depends on the boxes kept before it.
        for i in range(end - start):
            if suppressed[start + i]:
                continue
            kept[start + i] = True
            suppressed[start:] |= overlaps[i]
    return order[kept]


def batched_nms(
    boxes: Tensor,
    scores: Tensor,
    idxs: Tensor,
    iou_threshold: float,
    implementation: str = "torchvision",
) -> Tensor:
    """NMS within each group (class, or feature level), never across groups.

    ``boxes: (N, 4)``, ``scores: (N,)``, ``idxs: (N,)`` group of each box -> ``keep: (K,)``.

    The coordinate-offset trick: move each group's boxes by ``group * span`` so that boxes of
    different groups cannot overlap, then run one ordinary NMS.

    Args:
        implementation: ``"torchvision"`` (``torchvision.ops.batched_nms``, compiled) or ``"python"``
            (the trick with ``nms`` above). The python offset uses the full coordinate span, so it
            also separates groups whose boxes have negative coordinates.
    Returns:
        int64 indices by decreasing score.

    ``iou_threshold`` outside [0, 1] is a ``ValueError``. This runs in the model's hot path, so
    values (NaN/inf boxes or scores) are checked only with value checks on (``rpnlab.detector.checks``).
    """
    if implementation not in _IMPLEMENTATIONS:
        raise ValueError(
            f"implementation must be 'torchvision' or 'python', got {implementation!r}"
        )
    _check_nms_inputs(boxes, scores)
    check_threshold(iou_threshold, "iou_threshold")
    if _checks._enabled:
        check_finite(boxes, "boxes")
        check_finite(scores, "scores")
    if idxs.shape != scores.shape:
        raise ValueError(
            f"idxs must have shape {tuple(scores.shape)} to match scores, got {tuple(idxs.shape)}"
        )
    if implementation == "torchvision":
        return torchvision.ops.batched_nms(boxes, scores, idxs, iou_threshold)
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    span = boxes.max() - boxes.min() + 1
    offsets = idxs.to(boxes.dtype) * span
    return nms(boxes + offsets[:, None], scores, iou_threshold)


def batched_nms_first(
    boxes: Tensor,
    scores: Tensor,
    idxs: Tensor,
    iou_threshold: float,
    max_kept: int,
    implementation: str = "torchvision",
) -> Tensor:
    """``batched_nms(...)[:max_kept]``, running the NMS only on as many top boxes as it needs.

    Greedy NMS decides each box from the boxes that score above it, so running it on the ``L``
    best boxes gives the same decisions for those ``L``; once that prefix keeps ``max_kept``
    boxes, the rest cannot enter the first ``max_kept``. The prefix starts at ``4 * max_kept``
    boxes and grows fourfold until it keeps enough or holds every box. At test time (300 kept out
    of 6000 per level) this does a fraction of the work of the full NMS, whose cost grows with
    (boxes x kept). Reading the count kept is a host sync per round, so the CPU uses it; on other
    devices the full ``batched_nms`` runs, without syncs.
    """
    n = scores.shape[0]
    if boxes.device.type != "cpu" or n <= 4 * max_kept:
        return batched_nms(boxes, scores, idxs, iou_threshold, implementation)[:max_kept]
    order = torch.sort(scores, descending=True, stable=True).indices
    length = 4 * max_kept
    while True:
        top = order[:length]
        keep = batched_nms(boxes[top], scores[top], idxs[top], iou_threshold, implementation)
        if keep.numel() >= max_kept or length >= n:
            return top[keep[:max_kept]]
        length *= 4


def _train_test(name: str, value) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in pair):
        raise ValueError(
            f"{name} must be a positive int or a pair (train, test) of them, got {value!r}"
        )
    return pair


class ProposalLayer(nn.Module):
    """Turn objectness logits and offsets at every anchor into per-image proposals.

    Args:
        pre_nms_top_n: ``(train, test)`` boxes kept per feature level before NMS (or one int for both).
        post_nms_top_n: ``(train, test)`` proposals kept per image after NMS.
        nms_thresh: IoU above which a lower-scoring box is suppressed.
        min_size: boxes with width or height below this (pixels, after clipping) are dropped.
        score_thresh: boxes with ``sigmoid(logit) < score_thresh`` are dropped.
        mode: ``"nms"`` (above) or ``"top"``: the ``post_nms_top_n`` best boxes with no NMS
            (tf-faster-rcnn's ``proposal_top_layer``).
        box_coder: decodes offsets; default ``BoxCoder()`` with weights (1, 1, 1, 1).
        nms_implementation: ``"torchvision"`` or ``"python"`` (see ``batched_nms``).

    ``self.training`` picks the train or test counts, so ``model.eval()`` switches them.
    """

    def __init__(
        self,
        pre_nms_top_n: int | tuple[int, int] = (12000, 6000),
        post_nms_top_n: int | tuple[int, int] = (2000, 300),
        nms_thresh: float = 0.7,
        min_size: float = 0.0,
        score_thresh: float = 0.0,
        mode: str = "nms",
        box_coder: BoxCoder | None = None,
        nms_implementation: str = "torchvision",
    ):
        super().__init__()
        self.pre_nms_top_n = _train_test("pre_nms_top_n", pre_nms_top_n)
        self.post_nms_top_n = _train_test("post_nms_top_n", post_nms_top_n)
        if not 0 <= nms_thresh <= 1:
            raise ValueError(f"nms_thresh must be an IoU in [0, 1], got {nms_thresh!r}")
        if not min_size >= 0:
            raise ValueError(f"min_size must be >= 0, got {min_size!r}")
        if not 0 <= score_thresh <= 1:
            raise ValueError(f"score_thresh must be a probability in [0, 1], got {score_thresh!r}")
        if mode not in ("nms", "top"):
            raise ValueError(f"mode must be 'nms' or 'top', got {mode!r}")
        if nms_implementation not in _IMPLEMENTATIONS:
            raise ValueError(
                f"nms_implementation must be 'torchvision' or 'python', got {nms_implementation!r}"
            )
        if box_coder is not None and not isinstance(box_coder, BoxCoder):
            raise TypeError(
                f"box_coder must be an rpnlab.detector.boxes.BoxCoder or None, got {type(box_coder).__name__}"
            )
        self.nms_thresh = float(nms_thresh)
        self.min_size = float(min_size)
        self.score_thresh = float(score_thresh)
        self.mode = mode
        self.box_coder = box_coder if box_coder is not None else BoxCoder()
        self.nms_implementation = nms_implementation

    @classmethod
    def from_config(cls, config: RPNConfig, **kwargs) -> ProposalLayer:
        """Build from an ``RPNConfig``; ``kwargs`` (e.g. ``nms_implementation``) pass through."""
        if not isinstance(config, RPNConfig):
            raise TypeError(f"config must be an RPNConfig, got {type(config).__name__}")
        config.validate()
        return cls(
            pre_nms_top_n=(config.pre_nms_top_n_train, config.pre_nms_top_n_test),
            post_nms_top_n=(config.post_nms_top_n_train, config.post_nms_top_n_test),
            nms_thresh=config.nms_thresh,
            min_size=config.min_size,
            score_thresh=config.score_thresh,
            mode=config.proposal_mode,
            box_coder=BoxCoder(config.box_weights),
            **kwargs,
        )

    def _counts(self) -> tuple[int, int]:
        phase = 0 if self.training else 1
        return self.pre_nms_top_n[phase], self.post_nms_top_n[phase]

    def _top_k_per_level(
        self, objectness: Tensor, num_anchors_per_level: Sequence[int], k: int
    ) -> Tensor:
        """Indices ``(B, K)`` of the ``k`` best logits of each level, levels one after another."""
        picked, offset = [], 0
        for level_scores in objectness.split(list(num_anchors_per_level), dim=1):
            n = level_scores.shape[1]
            picked.append(level_scores.topk(min(k, n), dim=1).indices + offset)
            offset += n
        return torch.cat(picked, dim=1)

    def _check_inputs(
        self, anchors, objectness, deltas, image_sizes, num_anchors_per_level
    ) -> list[int]:
        check_boxes(anchors, "anchors", values=False)
        if anchors.dim() != 2:
            raise ValueError(f"anchors must have shape (A, 4), got {tuple(anchors.shape)}")
        a = anchors.shape[0]
        if not isinstance(objectness, Tensor) or objectness.dim() != 2 or objectness.shape[1] != a:
            raise ValueError(
                f"objectness must be logits of shape (B, {a}), got {getattr(objectness, 'shape', objectness)}"
            )
        b = objectness.shape[0]
        if not isinstance(deltas, Tensor) or deltas.shape != (b, a, 4):
            raise ValueError(
                f"deltas must have shape {(b, a, 4)}, got {getattr(deltas, 'shape', deltas)}"
            )
        if len(image_sizes) != b:
            raise ValueError(
                f"image_sizes must have one (h, w) per image ({b}), got {len(image_sizes)}"
            )
        levels = [a] if num_anchors_per_level is None else [int(n) for n in num_anchors_per_level]
        if sum(levels) != a or any(n < 0 for n in levels):
            raise ValueError(
                f"num_anchors_per_level must be non-negative and sum to A={a}, got {levels}"
            )
        return levels

    def forward(
        self,
        anchors: Tensor,
        objectness: Tensor,
        deltas: Tensor,
        image_sizes: Sequence[tuple[int, int]],
        num_anchors_per_level: Sequence[int] | None = None,
        return_intermediates: bool = False,
    ):
        """Proposals for a batch of images sharing one set of anchors.

        Args:
            anchors: ``(A, 4)``, all levels concatenated.
            objectness: ``(B, A)`` logits. With a 2-class softmax head pass ``fg - bg``: its
                sigmoid is the softmax's foreground probability.
            deltas: ``(B, A, 4)`` predicted offsets.
            image_sizes: one ``(h, w)`` per image (before padding) to clip to.
            num_anchors_per_level: ``A_l`` per level (default: one level of ``A``).
            return_intermediates: also return a dict of the steps, for drawing (see below).
        Returns:
            ``boxes: list[(P_i, 4)]``, ``scores: list[(P_i,)]`` (probabilities, decreasing), and with
            ``return_intermediates`` a dict: ``decoded_boxes (B, A, 4)`` (before clipping),
            ``topk_idxs (B, K)`` (anchors chosen by the per-level top-k), per image lists
            ``pre_nms_boxes``, ``pre_nms_scores``, ``pre_nms_levels`` (the NMS input: clipped, small
            and low-scoring boxes dropped) and ``post_nms_boxes``, ``post_nms_scores`` (the NMS
            survivors before the top-n cut; in ``"top"`` mode all boxes, sorted).
        """
        levels_sizes = self._check_inputs(
            anchors, objectness, deltas, image_sizes, num_anchors_per_level
        )
        pre_n, post_n = self._counts()
        objectness, deltas = objectness.detach(), deltas.detach()  # no gradient through proposals

        decoded = self.box_coder.decode(deltas, anchors)  # (B, A, 4)
        level_of_anchor = torch.cat(
            [
                torch.full((n,), lvl, dtype=torch.int64, device=anchors.device)
                for lvl, n in enumerate(levels_sizes)
            ]
        )
        top_idx = self._top_k_per_level(objectness, levels_sizes, pre_n)  # (B, K)
        batch_idx = torch.arange(objectness.shape[0], device=objectness.device)[:, None]
        top_boxes = decoded[batch_idx, top_idx]  # (B, K, 4)
        top_scores = torch.sigmoid(objectness[batch_idx, top_idx])  # (B, K)
        top_levels = level_of_anchor[top_idx]  # (B, K)

        out_boxes, out_scores = [], []
        steps = {key: [] for key in _STEP_KEYS}
        for boxes, scores, lvl, size in zip(top_boxes, top_scores, top_levels, image_sizes):
            boxes = clip_boxes(boxes, (size[0], size[1]))
            keep = remove_small_boxes(boxes, self.min_size)
            boxes, scores, lvl = boxes[keep], scores[keep], lvl[keep]
            keep = torch.where(scores >= self.score_thresh)[0]  # >= as torchvision
            boxes, scores, lvl = boxes[keep], scores[keep], lvl[keep]

            if self.mode == "nms" and not return_intermediates:
                keep = batched_nms_first(
                    boxes, scores, lvl, self.nms_thresh, post_n, self.nms_implementation
                )
            elif self.mode == "nms":  # every NMS survivor is drawn, not only the first post_n
                keep = batched_nms(boxes, scores, lvl, self.nms_thresh, self.nms_implementation)
            else:
                keep = torch.sort(scores, descending=True, stable=True).indices
            if return_intermediates:
                for key, value in zip(steps, (boxes, scores, lvl, boxes[keep], scores[keep])):
                    steps[key].append(value)
            keep = keep[:post_n]
            out_boxes.append(boxes[keep])
            out_scores.append(scores[keep])

        if return_intermediates:
            return out_boxes, out_scores, {"decoded_boxes": decoded, "topk_idxs": top_idx, **steps}
        return out_boxes, out_scores

    def extra_repr(self) -> str:
        return (
            f"pre_nms_top_n={self.pre_nms_top_n}, post_nms_top_n={self.post_nms_top_n}, nms_thresh={self.nms_thresh}, "
            f"min_size={self.min_size}, score_thresh={self.score_thresh}, mode={self.mode!r}, "
            f"nms_implementation={self.nms_implementation!r}"
        )
