"""RoI Align on the CPU as a sparse matrix product: the form ``RoIPooler(implementation="auto")``
takes for feature maps too large for ``roi_align``'s dense matrices.

Every bin of RoI Align is a weighted sum of a few map cells: ``sampling_ratio**2`` points, each a
bilinear blend of 4 cells, each weighted ``1 / sampling_ratio**2`` for the bin's mean. Written for
all bins of one image at once, that is one sparse matrix ``S: (K * out_h * out_w, H * W)`` with
``4 * sampling_ratio**2`` entries per row, and

    pooled = S @ map^T          map: (C, H * W), so map^T is (H * W, C)
    d map  = d pooled^T @ S     the gradient, (C, H * W): the map's own layout

Why this and not torchvision's kernel: on the CPU the kernel walks RoI by RoI, channel by channel
and point by point on one thread, and its backward adds the 4 bilinear shares of every point into
the map one value at a time. The sparse products run in MKL's sparse BLAS, which reads each row of
``S`` once and streams all ``C`` channels. What they cost beyond the arithmetic is layout: each
direction transposes the image's map (or its gradient) once between ``(C, H * W)`` and
``(H * W, C)``. Measured (``benchmarks/bench_ops.py``, the FPN RoI Align row): 2.6-3.6x faster
than the kernel forward + backward over ResNet-50 FPN's levels with 1024 RoIs.

The weights are those of ``rpnlab.detector.roi.roi_align`` (same point positions, same border
rule), so values and gradients equal torchvision's up to float rounding. Only a fixed sampling
ratio (``> 0``) is supported: with adaptive sampling the rows would differ in length and a big box
would get hundreds of entries per bin. Needs PyTorch built with MKL (``sparse_align_available``);
elsewhere, and for levels with too few RoIs to pay for the transposes
(``sparse_align_min_rois``), ``RoIPooler`` keeps torchvision's kernel.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from rpnlab.detector.roi_points import align_axis, align_points

__all__ = ["align_matrices", "roi_align_sparse", "sparse_align_available", "sparse_align_min_rois"]


def _csr(build, *args, **kwargs) -> Tensor:
    """``build(*args, **kwargs)`` (a CSR constructor or conversion) without PyTorch's one-time
    "sparse CSR support is in beta" notice."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)
        return build(*args, **kwargs)


def sparse_align_available(device: torch.device) -> bool:
    """Whether ``roi_align_sparse`` can be the fast choice here: a CPU tensor and MKL's sparse BLAS."""
    return device.type == "cpu" and torch.backends.mkl.is_available()


def sparse_align_min_rois(batch: int, height: int, width: int, bins: int, sampling_ratio: int) -> int:
    """The fewest RoIs for which the sparse form beats torchvision's CPU kernel on a level.

    The sparse form pays a fixed price per level, the transposes of the whole map and of its
    gradient (``batch * H * W`` cells), while the kernel's cost grows with the RoIs, their bins and
    points. Measured forward + backward, 256 channels, 7 x 7 bins, 2 x 2 points, two images, one
    thread (``docs/results/bench_ops_cpu.md``, fifth session): at 144 x 256 the sparse form
    lost with 64 RoIs (0.76x) and won with 256 (2.0x); at 72 x 128 it lost with 16 (0.73x) and won
    with 64 (2.0x); at 36 x 64 it won from 16 (1.5x). ``batch * H * W / (4 * bins * points)``
    asks for 94, 24 and 6 RoIs there: at or past each crossover.
    """
    return math.ceil(batch * height * width / (4 * bins * sampling_ratio**2))


def _axis_entries(start: Tensor, size: Tensor, bins: int, points: int, cells: int) -> tuple[Tensor, Tensor]:
    """One axis: ``start, size: (K,)`` in cells -> the cells each sample point blends and their
    weights (including the point's share ``1 / points`` of the bin's mean), both
    ``(K, bins, points, 2)`` (low and high neighbour)."""
    grid = torch.full_like(start, points, dtype=torch.long)
    coord, share = align_points(start, size / bins, grid, bins)  # (K, bins, points), (K, 1, points)
    low, high, w_low, w_high = align_axis(coord, cells)
    return torch.stack((low, high), dim=-1), torch.stack((w_low, w_high), dim=-1) * share[..., None]


def _bin_entries(rois: Tensor, output_size: tuple[int, int], spatial_scale: float, sampling_ratio: int,
                 aligned: bool, height: int, width: int) -> tuple[Tensor, Tensor]:
    """Column indices (cells of the map, ``y * W + x``) and weights of every bin's entries, both
    ``(K * out_h * out_w * 4 * sampling_ratio**2,)``, bin after bin in row-major order."""
    out_h, out_w = output_size
    offset = 0.5 if aligned else 0.0
    starts = rois[:, 1:3] * spatial_scale - offset  # (K, 2): x1, y1 in cells
    sizes = rois[:, 3:5] * spatial_scale - offset - starts
    if not aligned:
        sizes = sizes.clamp(min=1.0)
    ys, wy = _axis_entries(starts[:, 1], sizes[:, 1], out_h, sampling_ratio, height)  # (K, out_h, G, 2)
    xs, wx = _axis_entries(starts[:, 0], sizes[:, 0], out_w, sampling_ratio, width)  # (K, out_w, G, 2)

    # (K, out_h, out_w, [G_y, 2, G_x, 2]): a bin's entries, every y pick with every x pick
    def y_part(t: Tensor) -> Tensor:
        return t[:, :, None, :, :, None, None]

    def x_part(t: Tensor) -> Tensor:
        return t[:, None, :, None, None, :, :]

    columns = y_part(ys * width) + x_part(xs)
    weights = y_part(wy) * x_part(wx)
    return columns.reshape(-1), weights.reshape(-1)


class _SparseRoIAlign(torch.autograd.Function):
    """``pooled = S_n @ map_n^T`` image by image; the gradient ``d map_n = d pooled_n^T @ S_n``."""

    @staticmethod
    def forward(ctx, feature: Tensor, matrices: list, output_size: tuple[int, int]) -> Tensor:
        _, channels, height, width = feature.shape
        rows = sum(matrix.shape[0] for matrix in matrices if matrix is not None)
        pooled = feature.new_empty((rows, channels))  # (K * bins, C), each image's product written in place
        start = 0
        for n, matrix in enumerate(matrices):
            if matrix is not None:
                stop = start + matrix.shape[0]
                # map^T made row-major first: PyTorch's own conversion for the sparse product
                # costs more than this explicit transpose (measured at 144 x 256: 83 against 63 ms)
                rows_major = feature[n].reshape(channels, height * width).t().contiguous()  # (H * W, C)
                torch.mm(matrix, rows_major, out=pooled[start:stop])
                start = stop
        ctx.matrices, ctx.feature_shape = matrices, feature.shape
        return pooled.view(-1, *output_size, channels).permute(0, 3, 1, 2)  # (K, C, out_h, out_w)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        _, channels, height, width = ctx.feature_shape
        rows = grad.permute(0, 2, 3, 1).reshape(-1, channels)  # (K * bins, C), as S's rows
        grad_feature = grad.new_empty(ctx.feature_shape)  # every image is written below (no zero fill)
        start = 0
        for n, matrix in enumerate(ctx.matrices):
            if matrix is None:
                grad_feature[n].zero_()
            else:
                stop = start + matrix.shape[0]
                # S^T @ d pooled in CSR, then one transpose into the map's layout: measured 1.4x
                # faster than MKL's d pooled^T @ S at a 144 x 256 level (its transposed product)
                transposed = _csr(matrix.t().to_sparse_csr)  # (H * W, k * bins)
                grad_feature[n].view(channels, height * width).copy_((transposed @ rows[start:stop]).t())
                start = stop
        return grad_feature, None, None


def align_matrices(rois: Tensor, batch: int, map_size: tuple[int, int], output_size: tuple[int, int],
                   spatial_scale: float, sampling_ratio: int, aligned: bool = False) -> list[Tensor | None]:
    """RoI Align's weights as one sparse CSR matrix per image.

    Args:
        rois: ``(K, 5)`` rows ``[batch_index, x1, y1, x2, y2]``, sorted by image.
        batch: images in the batch (``N``); map_size: ``(H, W)``.
    Returns:
        per image ``S_n: (k_n * out_h * out_w, H * W)`` (``None`` for an image without RoIs): row
        ``(roi, bin_y, bin_x)`` holds the ``4 * sampling_ratio**2`` weights of the cells that bin
        averages, so that ``pooled = S_n @ map_n^T``.
    """
    height, width = map_size
    out_h, out_w = output_size
    image = rois[:, 0].long()
    columns, weights = _bin_entries(rois, output_size, spatial_scale, sampling_ratio, aligned, height, width)
    per_row = 4 * sampling_ratio**2
    per_roi = out_h * out_w * per_row
    matrices, first = [], 0
    for count in torch.bincount(image, minlength=batch).tolist():
        if count == 0:
            matrices.append(None)
            continue
        entries = slice(first * per_roi, (first + count) * per_roi)
        row_starts = torch.arange(0, count * per_roi + 1, per_row)  # every row has per_row entries
        # The rows are built sorted and in range: no invariant check needed (it costs a pass).
        matrices.append(_csr(torch.sparse_csr_tensor, row_starts, columns[entries], weights[entries],
                             (count * out_h * out_w, height * width), check_invariants=False))
        first += count
    return matrices


def roi_align_sparse(
    input: Tensor,
    rois: Tensor,
    output_size: tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool = False,
) -> Tensor:
    """RoI Align as ``torchvision.ops.roi_align``, computed as sparse matrix products (CPU).

    Args:
        input: ``(N, C, H, W)`` float32 or float64 feature maps on the CPU.
        rois: ``(K, 5)`` rows ``[batch_index, x1, y1, x2, y2]`` in image pixels (checked by the
            caller, ``RoIPooler``).
        output_size: ``(out_h, out_w)``.
        spatial_scale: feature cells per image pixel.
        sampling_ratio: points per bin along each axis, ``> 0``.
        aligned: RoI Align's half-cell correction.
    Returns:
        ``(K, C, out_h, out_w)``, gradient into ``input`` (none into ``rois``).
    """
    if sampling_ratio <= 0:
        raise ValueError(f"roi_align_sparse needs a fixed sampling_ratio > 0, got {sampling_ratio}")
    if input.dtype not in (torch.float32, torch.float64) or input.device.type != "cpu":
        raise ValueError(f"roi_align_sparse takes float32/float64 CPU maps, got {input.dtype} on {input.device}")
    batch, _, height, width = input.shape
    out_h, out_w = output_size
    rois = rois.detach().to(input.dtype)
    image = rois[:, 0].long()
    order = None
    if len(image) > 1 and bool((image[1:] < image[:-1]).any()):
        order = torch.argsort(image, stable=True)  # S is built image by image
        rois, image = rois[order], image[order]
    matrices = align_matrices(rois, batch, (height, width), (out_h, out_w), spatial_scale, sampling_ratio, aligned)
    out = _SparseRoIAlign.apply(input, matrices, (out_h, out_w))
    if order is not None:
        out = out[torch.argsort(order)]
    return out
