"""Where RoI Align's matrix form beats torchvision's CPU kernel: forward + backward, one thread.

    python benchmarks/bench_roi_crossover.py

For square maps of 8 to 64 cells a side, the median of 5 runs of ``torchvision.ops.roi_align``
and ``rpnlab.detector.roi.roi_align`` (the matrix form, ``out = Wy @ map @ Wx^T``), in two
settings: a detector head (256 channels, 1024 RoIs, 7 x 7 bins, 2 x 2 points per bin) and the CPU
preset's (128 channels, 128 RoIs, 5 x 5 bins, one point). ``RoIPooler(implementation="auto")``
takes the matrix form up to ``matrix_align_max_cells(out_w, sampling_ratio)`` cells, set from
this table.
"""

from __future__ import annotations

import time

import torch
import torchvision

from rpnlab.detector.roi import matrix_align_max_cells, roi_align

SETTINGS = ((256, 1024, 7, 2), (128, 128, 5, 1))  # channels, RoIs, bins per side, points per bin side
SIDES = (8, 12, 16, 24, 32, 48, 64)


def _median_ms(fn, x, rois, out, scale, points, repeats=5) -> float:
    times = []
    for _ in range(repeats):
        leaf = x.detach().requires_grad_()
        start = time.perf_counter()
        fn(leaf, rois, out, scale, points, False).sum().backward()
        times.append(time.perf_counter() - start)
    return 1000 * sorted(times)[repeats // 2]


def main() -> int:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, 1 thread; "
          "auto limit: matrix_align_max_cells(bins per side, points per side)")
    print("| channels | RoIs | bins | points | map | torchvision ms | matrix ms | speed-up | auto picks |")
    print("|---:|---:|---:|---:|---|---:|---:|---:|---|")
    for channels, num_rois, out, points in SETTINGS:
        for side in SIDES:
            x = torch.randn(2, channels, side, side, generator=g)
            image = 16 * side
            xy = torch.rand(num_rois, 2, generator=g) * image * 0.8
            wh = torch.rand(num_rois, 2, generator=g) * image * 0.5 + 8
            rois = torch.cat([torch.randint(0, 2, (num_rois, 1), generator=g).float(), xy,
                              (xy + wh).clamp(max=image)], dim=1)
            torch.testing.assert_close(roi_align(x, rois, out, 1 / 16, points),
                                       torchvision.ops.roi_align(x, rois, out, 1 / 16, points), atol=1e-4, rtol=0)
            tv = _median_ms(torchvision.ops.roi_align, x, rois, out, 1 / 16, points)
            mx = _median_ms(roi_align, x, rois, out, 1 / 16, points)
            picks = "matrix" if side * side <= matrix_align_max_cells(out, points) else "kernel"
            print(f"| {channels} | {num_rois} | {out}x{out} | {points}x{points} | {side}x{side} | {tv:.1f} | "
                  f"{mx:.1f} | {tv / mx:.2f} | {picks} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
