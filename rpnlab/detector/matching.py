"""Which anchor learns from which ground-truth box: IoU matching, anchor labels, balanced sampling.

The paper's rule (Ren et al. 2015, sec. 3.1.2): an anchor is positive if its IoU with some
ground-truth box is >= 0.7, or if it is a ground-truth box's best anchor (so every object gets one
even when no anchor reaches 0.7); negative if its IoU with every box is < 0.3; ignored otherwise.
Training then samples 256 anchors per image, up to half of them positive.

Codes follow torchvision's ``Matcher``: a match index ``>= 0`` names a gt box,
``-1`` (``BELOW_LOW_THRESHOLD``) is background and ``-2`` (``BETWEEN_THRESHOLDS``) is ignored.
Anchor labels follow torchvision's RPN: ``1`` positive, ``0`` negative, ``-1`` ignored.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from rpnlab.detector.boxes import box_iou_chunks, box_iou_reduce, check_boxes

__all__ = [
    "BalancedSampler",
    "Matcher",
    "inside_image_mask",
    "label_anchors",
    "label_anchors_batch",
]

# Default match_boxes chunk: about 4M IoU values (16 MB in float32) per chunk, whatever M is.
_IOU_VALUES_PER_CHUNK = 1 << 22


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def _number(name: str, value) -> float:
    if not _is_number(value):
        raise ValueError(f"{name} must be a number, got {value!r}")
    return float(value)


class Matcher:
    """Assign each anchor (column) the ground-truth box (row) it overlaps best, by thresholds.

    Results are identical to ``torchvision.models.detection._utils.Matcher``:

    - best quality ``>= high_threshold``: the index of that gt box;
    - ``< low_threshold``: ``BELOW_LOW_THRESHOLD`` (-1, background);
    - in between: ``BETWEEN_THRESHOLDS`` (-2, ignored).

    With ``allow_low_quality_matches`` every gt box also claims the anchors whose quality with it
    equals its own best quality (ties included, so one gt can claim several anchors). Such an
    anchor gets the index of *its* best gt box, which is not always the gt that claimed it.

    A quirk kept from torchvision (and detectron2): a gt box whose best quality is 0 (it overlaps
    no anchor, e.g. it lies outside every anchor, or has zero area) "ties" with every anchor it
    does not overlap, so all those anchors become positives. Pass ``low_quality_min_iou`` > 0
    (e.g. ``1e-6``; mmdetection uses 0.3 for its RPN) to skip gt boxes whose best quality is below
    it; the default ``0.0`` reproduces torchvision exactly.

    Unlike torchvision, an image without gt boxes is fine: a ``(0, A)`` matrix gives all -1
    (every anchor background), and ``(M, 0)`` gives an empty result.

    Args:
        high_threshold: quality at or above which an anchor is matched (the paper's 0.7).
        low_threshold: quality below which an anchor is background (the paper's 0.3).
        allow_low_quality_matches: the paper's rule (i), each gt box's best anchors are positive.
        low_quality_min_iou: a gt box makes low-quality matches only if its best quality is at
            least this.
    """

    BELOW_LOW_THRESHOLD = -1
    BETWEEN_THRESHOLDS = -2

    def __init__(
        self,
        high_threshold: float = 0.7,
        low_threshold: float = 0.3,
        allow_low_quality_matches: bool = True,
        low_quality_min_iou: float = 0.0,
    ):
        self.high_threshold = _number("high_threshold", high_threshold)
        self.low_threshold = _number("low_threshold", low_threshold)
        if self.low_threshold > self.high_threshold:
            raise ValueError(
                f"low_threshold={low_threshold} must not exceed high_threshold={high_threshold}"
            )
        self.allow_low_quality_matches = bool(allow_low_quality_matches)
        self.low_quality_min_iou = _number("low_quality_min_iou", low_quality_min_iou)

    def _threshold(self, best_quality: Tensor, best_gt: Tensor) -> Tensor:
        """``(A,)`` best quality and its gt index -> ``(A,)`` match codes (no low-quality rule)."""
        matches = torch.where(best_quality >= self.high_threshold, best_gt, self.BETWEEN_THRESHOLDS)
        return matches.masked_fill_(best_quality < self.low_threshold, self.BELOW_LOW_THRESHOLD)

    def __call__(self, match_quality_matrix: Tensor) -> Tensor:
        """``match_quality_matrix: (M, A)`` (gt x anchors, e.g. IoU) -> ``matched_idxs: (A,)`` int64."""
        q = match_quality_matrix
        if not isinstance(q, Tensor) or q.dim() != 2:
            raise ValueError(
                "match_quality_matrix must be a 2-D tensor (M gt boxes, A anchors), got "
                f"{tuple(q.shape) if isinstance(q, Tensor) else type(q).__name__}"
            )
        m, a = q.shape
        if m == 0 or a == 0:
            return torch.full((a,), self.BELOW_LOW_THRESHOLD, dtype=torch.int64, device=q.device)
        best_quality, best_gt = q.max(dim=0)  # (A,): each anchor's best gt (first one on ties)
        matches = self._threshold(best_quality, best_gt)
        if self.allow_low_quality_matches:
            best_for_gt = q.max(dim=1).values  # (M,): each gt's best anchor quality
            eligible = best_for_gt >= self.low_quality_min_iou
            claimed = ((q == best_for_gt[:, None]) & eligible[:, None]).any(dim=0)  # (A,)
            matches = torch.where(claimed, best_gt, matches)
        return matches

    def match_boxes(
        self, gt_boxes: Tensor, anchors: Tensor, chunk_size: int | None = None
    ) -> Tensor:
        """``self(box_iou(gt_boxes, anchors))`` without ever holding the ``(M, A)`` IoU matrix.

        Args:
            gt_boxes: ``(M, 4)``; anchors: ``(A, 4)``.
            chunk_size: anchors per IoU chunk; ``None`` picks one so that a chunk holds about 4M
                IoU values. Peak memory is then ``chunk_size x M`` instead of ``A x M``.
        Returns:
            ``matched_idxs: (A,)`` int64, bit for bit what ``__call__`` gives on the full matrix.
        """
        check_boxes(gt_boxes, "gt_boxes", values=False)
        check_boxes(anchors, "anchors", values=False)
        if gt_boxes.dim() != 2 or anchors.dim() != 2:
            raise ValueError(
                f"gt_boxes must be (M, 4) and anchors (A, 4), got {tuple(gt_boxes.shape)} and {tuple(anchors.shape)}"
            )
        m, a = gt_boxes.shape[0], anchors.shape[0]
        if m == 0 or a == 0:
            return torch.full(
                (a,), self.BELOW_LOW_THRESHOLD, dtype=torch.int64, device=anchors.device
            )
        if chunk_size is None:
            chunk_size = max(1, _IOU_VALUES_PER_CHUNK // m)
        # Pass 1: each anchor's best gt, and each gt's best anchor quality.
        best_quality, best_gt, best_for_gt = box_iou_reduce(anchors, gt_boxes, chunk_size)
        matches = self._threshold(best_quality, best_gt)
        if not self.allow_low_quality_matches:
            return matches
        # Pass 2: the anchors that equal some gt's best quality. The chunks recompute the very
        # same IoU values as pass 1, so the equality test is exact, as on the full matrix.
        eligible = best_for_gt >= self.low_quality_min_iou
        claimed = torch.zeros(a, dtype=torch.bool, device=anchors.device)
        for start, iou in box_iou_chunks(anchors, gt_boxes, chunk_size):  # iou: (chunk, M)
            claimed[start : start + iou.shape[0]] = ((iou == best_for_gt) & eligible).any(dim=1)
        return torch.where(claimed, best_gt, matches)

    def __repr__(self) -> str:
        return (
            f"Matcher(high_threshold={self.high_threshold}, low_threshold={self.low_threshold}, "
            f"allow_low_quality_matches={self.allow_low_quality_matches}, "
            f"low_quality_min_iou={self.low_quality_min_iou})"
        )


class BalancedSampler:
    """Pick up to ``batch_size_per_image`` anchors per image, at most ``positive_fraction`` positive.

    Counts are torchvision's ``BalancedPositiveNegativeSampler``'s:
    ``num_pos = min(#positives, int(batch_size_per_image * positive_fraction))`` and
    ``num_neg = min(#negatives, batch_size_per_image - num_pos)``, so negatives fill in when an
    image has few positives. Which ones are taken is uniform at random (``torch.randperm``).

    Args:
        batch_size_per_image: anchors sampled per image (the paper's 256).
        positive_fraction: the largest share of positives (the paper's 0.5).
        generator: a ``torch.Generator`` for reproducible draws. A CPU generator with labels on
            another device draws on the CPU and moves the result (randperm needs a generator of
            its own device). Without one the global RNG of the labels' device is used, which draws
            the same as torchvision's sampler after the same ``torch.manual_seed`` (``"randperm"``).
        draw: how ``__call__`` picks, image by image: ``"randperm"`` (torchvision's: shuffle the
            index lists, take the first ones) or ``"keys"`` (one uniform random key per anchor,
            take the positives and the negatives with the largest keys). ``"keys"`` picks exactly
            what ``sample_batch`` picks for the whole batch with the same generator state.

    ``__call__`` counts the positives on the host (as torchvision does): one sync per image.
    ``sample_batch`` is the fixed-size form of the same draw for a ``(B, A)`` batch, without syncs.
    """

    DRAWS = ("randperm", "keys")

    def __init__(
        self,
        batch_size_per_image: int = 256,
        positive_fraction: float = 0.5,
        generator: torch.Generator | None = None,
        draw: str = "randperm",
    ):
        if draw not in self.DRAWS:
            raise ValueError(f"draw must be one of {self.DRAWS}, got {draw!r}")
        self.draw = draw
        if not (
            isinstance(batch_size_per_image, int)
            and not isinstance(batch_size_per_image, bool)
            and batch_size_per_image > 0
        ):
            raise ValueError(
                f"batch_size_per_image must be a positive int, got {batch_size_per_image!r}"
            )
        if not (_is_number(positive_fraction) and 0 < positive_fraction <= 1):
            raise ValueError(
                f"positive_fraction must be a fraction in (0, 1], got {positive_fraction!r}"
            )
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(
                f"generator must be a torch.Generator or None, got {type(generator).__name__}"
            )
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = float(positive_fraction)
        self.generator = generator

    def _randperm(self, n: int, device: torch.device) -> Tensor:
        if self.generator is None:
            return torch.randperm(n, device=device)
        return torch.randperm(n, generator=self.generator, device=self.generator.device).to(device)

    def _keys(self, shape: tuple[int, ...], device: torch.device) -> Tensor:
        """Uniform keys in [0, 1), one per anchor."""
        if self.generator is None:
            return torch.rand(shape, device=device)
        return torch.rand(shape, generator=self.generator, device=self.generator.device).to(device)

    def _pick(self, candidates: Tensor, count: int, keys: Tensor | None, device, k: int) -> Tensor:
        """``count`` of the indices ``candidates: (N,)``, by ``draw``."""
        if keys is None:
            return candidates[self._randperm(candidates.numel(), device)[:count]]
        # The candidates with the largest keys: a top-k over the masked keys with the k that
        # sample_batch uses, so that equal keys (float32 draws can tie) resolve the same way.
        masked = torch.full_like(keys, -1.0).index_put_((candidates,), keys[candidates])
        return masked.topk(min(k, keys.numel())).indices[:count]

    def __call__(self, labels: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """``labels``: per image ``(A_i,)`` with 1 (or any value >= 1) positive, 0 negative,
        -1 ignored -> ``(pos_masks, neg_masks)``, lists of bool ``(A_i,)``."""
        if isinstance(labels, Tensor):
            raise TypeError(
                "labels must be a list of per-image (A_i,) tensors; for a (B, A) tensor pass list(labels)"
            )
        pos_masks, neg_masks = [], []
        for i, lab in enumerate(labels):
            if not isinstance(lab, Tensor) or lab.dim() != 1:
                raise ValueError(
                    f"labels[{i}] must be a 1-D tensor (A_i,), got {getattr(lab, 'shape', type(lab))}"
                )
            positive = torch.where(lab >= 1)[0]
            negative = torch.where(lab == 0)[0]
            num_pos = min(positive.numel(), int(self.batch_size_per_image * self.positive_fraction))
            num_neg = min(negative.numel(), self.batch_size_per_image - num_pos)
            # Same draw order as torchvision (positives, then negatives) so seeds agree.
            keys = self._keys(lab.shape, lab.device) if self.draw == "keys" else None
            max_pos = int(self.batch_size_per_image * self.positive_fraction)
            pos_pick = self._pick(positive, num_pos, keys, lab.device, max_pos)
            neg_pick = self._pick(negative, num_neg, keys, lab.device, self.batch_size_per_image)
            pos_mask = torch.zeros(lab.shape, dtype=torch.bool, device=lab.device)
            neg_mask = torch.zeros(lab.shape, dtype=torch.bool, device=lab.device)
            pos_mask[pos_pick] = True
            neg_mask[neg_pick] = True
            pos_masks.append(pos_mask)
            neg_masks.append(neg_mask)
        return pos_masks, neg_masks

    def sample_batch(self, labels: Tensor) -> tuple[Tensor, Tensor]:
        """``labels: (B, A)`` 1 (or >= 1) / 0 / -1 -> ``(pos_mask, neg_mask)``, bool ``(B, A)``.

        The same counts as ``__call__``, drawn in a fixed-size form: one key per anchor
        (``torch.rand((B, A))``), then per image the ``P = int(batch_size_per_image *
        positive_fraction)`` positives with the largest keys (a top-k over keys masked to the
        positives) and the ``batch_size_per_image - num_pos`` negatives likewise. Every shape is
        known in advance, so nothing is read back to the host on a GPU (on the CPU, where that is
        free, images with at most ``P`` positives skip their top-k: they keep them all). Picks exactly what ``__call__``
        picks with ``draw="keys"`` and the same generator state.
        """
        if not isinstance(labels, Tensor) or labels.dim() != 2:
            raise ValueError(
                f"labels must be a (B, A) tensor, got {getattr(labels, 'shape', type(labels).__name__)}"
            )
        b, a = labels.shape
        keys = self._keys((b, a), labels.device)
        positive, negative = labels >= 1, labels == 0
        max_pos = int(self.batch_size_per_image * self.positive_fraction)
        if labels.device.type == "cpu":
            # On the CPU reading counts back costs nothing: an image with at most max_pos positives
            # keeps them all (what its top-k would pick), so only the others need a top-k.
            pos_mask = positive
            over = positive.sum(dim=1) > max_pos  # (B,)
            if bool(over.any()):
                pos_mask = positive.clone()
                pos_mask[over] = self._top_keys(keys[over], positive[over], min(max_pos, a), None)
        else:
            pos_mask = self._top_keys(keys, positive, min(max_pos, a), None)
        num_pos = pos_mask.sum(dim=1)  # (B,) = min(#positives, max_pos), stays on the device
        neg_mask = self._top_keys(keys, negative, min(self.batch_size_per_image, a),
                                  self.batch_size_per_image - num_pos)
        return pos_mask, neg_mask

    @staticmethod
    def _top_keys(keys: Tensor, candidates: Tensor, k: int, limit: Tensor | None) -> Tensor:
        """Mask of the (at most ``limit`` per row, at most ``k``) candidates with the largest keys."""
        mask = torch.zeros_like(candidates)
        if k == 0:
            return mask
        values, idx = keys.masked_fill(~candidates, -1.0).topk(k, dim=1)  # (B, k), largest first
        keep = values >= 0  # non-candidates have key -1
        if limit is not None:
            keep &= torch.arange(k, device=keys.device)[None, :] < limit[:, None]
        return mask.scatter_(1, idx, keep)

    def __repr__(self) -> str:
        return (
            f"BalancedSampler(batch_size_per_image={self.batch_size_per_image}, "
            f"positive_fraction={self.positive_fraction})"
        )


def _image_size(image_size, name: str = "image_size") -> tuple[float, float]:
    try:
        h, w = (float(v) for v in image_size)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (height, width), got {image_size!r}") from None
    if not (h > 0 and w > 0):
        raise ValueError(f"{name} must be a positive (height, width), got {image_size!r}")
    return h, w


def inside_image_mask(anchors: Tensor, image_size, allowed_border: float = 0) -> Tensor:
    """Which ``anchors: (A, 4)`` lie inside an image of ``image_size = (h, w)`` -> ``(A,)`` bool.

    Inside means ``x1, y1 >= -allowed_border`` and ``x2 <= w + allowed_border``,
    ``y2 <= h + allowed_border``. (py-faster-rcnn writes ``x2 < w``: its x2 is the last pixel's
    index, ours the right edge, as torchvision's.)
    """
    check_boxes(anchors, "anchors", values=False)
    h, w = _image_size(image_size)
    b = float(allowed_border)
    return (
        (anchors[..., 0] >= -b)
        & (anchors[..., 1] >= -b)
        & (anchors[..., 2] <= w + b)
        & (anchors[..., 3] <= h + b)
    )


def label_anchors(
    anchors: Tensor,
    gt_boxes: Tensor,
    matcher: Matcher,
    image_size=None,
    ignore_cross_boundary: bool = False,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """RPN training labels of one image's anchors.

    Args:
        anchors: ``(A, 4)``; gt_boxes: ``(M, 4)``, ``M`` may be 0.
        matcher: a ``Matcher`` (thresholds, low-quality rule).
        image_size: ``(h, w)``, needed for ``ignore_cross_boundary``.
        ignore_cross_boundary: the paper's training rule: anchors that cross the image border
            take no part. As py-faster-rcnn, they are left out of the matching itself (a gt box's
            best anchor is then its best *inside* anchor) and labelled -1.
        chunk_size: passed to ``Matcher.match_boxes`` (IoU computed in chunks of anchors).
    Returns:
        ``labels: (A,)`` in the anchors' dtype, 1 positive, 0 negative, -1 ignored, and
        ``matched_gt_boxes: (A, 4)``: each positive's gt box. Like torchvision, other rows hold
        gt box 0 (any finite box would do: only positives are regressed), zeros when ``M == 0``.
    """
    check_boxes(anchors, "anchors", values=False)
    check_boxes(gt_boxes, "gt_boxes", values=False)
    if not isinstance(matcher, Matcher):
        raise TypeError(f"matcher must be an rpnlab.detector.matching.Matcher, got {type(matcher).__name__}")
    if ignore_cross_boundary and image_size is None:
        raise ValueError("ignore_cross_boundary=True needs image_size=(h, w)")

    inside = None
    match_anchors = anchors
    if ignore_cross_boundary:
        inside = inside_image_mask(anchors, image_size)
        # Shrink outside anchors to a point: IoU exactly 0 with every box, so they can neither
        # match nor be any gt's best anchor, with no boolean indexing (no host sync).
        point = anchors[:, :2].repeat(1, 2)
        match_anchors = torch.where(inside[:, None], anchors, point)

    matched = matcher.match_boxes(gt_boxes, match_anchors, chunk_size)  # (A,)
    labels = (matched >= 0).to(anchors.dtype)  # 1 matched, 0 background
    ignored = matched == Matcher.BETWEEN_THRESHOLDS
    if inside is not None:
        ignored = ignored | ~inside
    labels = labels.masked_fill(ignored, -1.0)

    if gt_boxes.shape[0] == 0:
        matched_gt_boxes = torch.zeros_like(anchors, dtype=gt_boxes.dtype)
    else:
        matched_gt_boxes = gt_boxes[matched.clamp(min=0)]
    return labels, matched_gt_boxes


def label_anchors_batch(
    anchors: Tensor,
    gt_boxes_list: Sequence[Tensor],
    matcher: Matcher,
    image_sizes=None,
    ignore_cross_boundary: bool = False,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """``label_anchors`` for a padded batch sharing one set of ``anchors: (A, 4)``.

    Args:
        gt_boxes_list: per image ``(M_i, 4)``.
        image_sizes: per image its real ``(h, w)`` before padding, needed for
            ``ignore_cross_boundary`` (anchors reaching into the padding count as outside).
    Returns:
        ``labels: (B, A)`` and ``matched_gt_boxes: (B, A, 4)``.
    """
    if isinstance(gt_boxes_list, Tensor) or not isinstance(gt_boxes_list, Sequence):
        raise TypeError("gt_boxes_list must be a list of per-image (M_i, 4) tensors")
    if image_sizes is not None and len(image_sizes) != len(gt_boxes_list):
        raise ValueError(
            f"image_sizes has {len(image_sizes)} entries but gt_boxes_list has {len(gt_boxes_list)}"
        )
    if ignore_cross_boundary and image_sizes is None:
        raise ValueError("ignore_cross_boundary=True needs image_sizes, one (h, w) per image")
    if len(gt_boxes_list) == 0:
        return anchors.new_zeros((0, anchors.shape[0])), anchors.new_zeros((0, anchors.shape[0], 4))
    labels, matched = [], []
    for i, gt in enumerate(gt_boxes_list):
        size = None if image_sizes is None else image_sizes[i]
        lab, box = label_anchors(anchors, gt, matcher, size, ignore_cross_boundary, chunk_size)
        labels.append(lab)
        matched.append(box.to(anchors.dtype))
    return torch.stack(labels), torch.stack(matched)
