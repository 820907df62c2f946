"""The RPN head and its losses (notebook 04): the softmax reshape, objectness forms and smooth L1 drawn."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from matplotlib.figure import Figure

from rpnlab.lab.figures import (
    COLORS,
    new_figure,
)

__all__ = ["plot_objectness_forms", "plot_smooth_l1", "plot_softmax_reshape"]


def plot_softmax_reshape(k: int = 3, height: int = 2, width: int = 3, title: str | None = None) -> Figure:
    """Where each logit goes in py-faster-rcnn's reshape ``(B, 2k, H, W) -> (B, 2, k*H, W)``.

    Every cell of a ``(1, 2k, H, W)`` tensor holds its channel number; the real
    ``rpnlab.detector.losses.softmax_objectness_reshape`` moves them, and the three panels show the ``2k``
    input channels stacked, then the two output channels: background logits of all ``k`` anchors
    in channel 0, foreground logits in channel 1, so a softmax over the 2 channels pairs them.
    """
    from rpnlab.detector.losses import softmax_objectness_reshape

    for name, v in (("k", k), ("height", height), ("width", width)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    codes = torch.arange(2 * k, dtype=torch.float32).view(1, 2 * k, 1, 1).expand(1, 2 * k, height, width)
    reshaped = softmax_objectness_reshape(codes)[0]  # (2, k*H, W)
    panels = [("input (B, 2k, H, W): the 2k channels stacked", codes[0].reshape(2 * k * height, width)),
              ("output channel 0 (background)", reshaped[0]), ("output channel 1 (foreground)", reshaped[1])]
    fig, axes = new_figure(1, 3, (2.2 + 0.5 * width, 1.0 + 0.45 * 2 * k * height))
    cmap = "tab20" if 2 * k <= 20 else "viridis"
    for ax, (name, grid) in zip(axes[0], panels):
        g = grid.numpy()
        ax.imshow(g, cmap=cmap, vmin=-0.5, vmax=max(2 * k, 20) - 0.5 if cmap == "tab20" else 2 * k - 1,
                  aspect="auto")
        for (r, c), ch in np.ndenumerate(g):
            kind, anchor = ("bg", int(ch)) if ch < k else ("fg", int(ch) - k)
            ax.text(c, r, f"{kind} a{anchor}\nch {int(ch)}", ha="center", va="center", fontsize=6)
        for r in range(height, g.shape[0], height):
            ax.axhline(r - 0.5, color="black", lw=1.2)
        ax.set_xlabel("x (feature column)")
        ax.set_ylabel("rows: H per channel / per anchor")
        ax.set_title(name, fontsize=9)
    fig.suptitle(title or f"softmax objectness reshape, k = {k}, H = {height}, W = {width}")
    return fig


def plot_objectness_forms(logit_range: float = 6.0, backgrounds: Sequence[float] = (-2.0, 0.0, 2.0),
                          title: str | None = None) -> Figure:
    """Sigmoid over one logit against a 2-class softmax over ``(bg, fg)`` logits.

    Left: the object probability against ``z = fg - bg``: ``sigmoid(z)`` and the softmax's
    foreground probability for several ``bg`` values (dots) fall on one curve. Right: the two
    losses for a positive and a negative anchor (binary cross-entropy on ``z``, cross-entropy on
    the pair) coincide the same way.
    """
    import torch.nn.functional as F

    z = torch.linspace(-logit_range, logit_range, 121, dtype=torch.float64)
    fig, axes = new_figure(1, 2, (4.6, 3.6))
    ax = axes[0, 0]
    ax.plot(z, torch.sigmoid(z), color="black", lw=2, label="sigmoid(z): k scores")
    zs = z[::8]
    for i, bg in enumerate(backgrounds):
        pair = torch.stack((torch.full_like(zs, bg), zs + bg), dim=1)  # (bg, fg) with fg - bg = z
        ax.plot(zs, F.softmax(pair, dim=1)[:, 1], "o", ms=4 + 2 * i, mfc="none",
                label=f"softmax(bg={bg:g}, fg=bg+z)[fg]: 2k scores")
    ax.set_xlabel("z = fg logit - bg logit")
    ax.set_ylabel("P(object)")
    ax.set_title("probabilities")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    ax = axes[0, 1]
    for label, color in ((1.0, COLORS["positive"]), (0.0, COLORS["negative"])):
        target = torch.full_like(z, label)
        ax.plot(z, F.binary_cross_entropy_with_logits(z, target, reduction="none"), color=color, lw=2,
                label=f"BCE(z), label {int(label)}")
        pair = torch.stack((torch.zeros_like(zs), zs), dim=1)
        ax.plot(zs, F.cross_entropy(pair, torch.full((zs.shape[0],), int(label)), reduction="none"), "o",
                color=color, mfc="none", label=f"CE(bg, fg), label {int(label)}")
    ax.set_xlabel("z = fg logit - bg logit")
    ax.set_ylabel("loss")
    ax.set_title("losses")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.suptitle(title or "sigmoid over z = 2-class softmax over (bg, fg), when z = fg - bg")
    return fig


def plot_smooth_l1(betas: Sequence[float] = (1 / 9, 0.5, 1.0), limit: float = 2.0,
                   title: str | None = None) -> Figure:
    """Smooth L1 (``rpnlab.detector.losses.smooth_l1``) for several ``beta`` against L1 and L2, with gradients.

    Left: the loss of an error ``d``. Right: its gradient: L2's grows with the error (an outlier
    dominates), L1's jumps at 0; smooth L1 is L2 inside ``|d| < beta`` and L1 outside, so its
    gradient is bounded by 1 and continuous.
    """
    from rpnlab.detector.losses import smooth_l1

    d = torch.linspace(-limit, limit, 401, dtype=torch.float64, requires_grad=True)
    curves = {"L1 |d|": lambda x: x.abs(), "L2 d^2 / 2": lambda x: 0.5 * x * x}
    for beta in betas:
        curves[f"smooth L1, beta = {beta:.3g}"] = lambda x, b=beta: smooth_l1(x, torch.zeros_like(x), b, "none")
    fig, axes = new_figure(1, 2, (4.6, 3.6))
    for name, fn in curves.items():
        loss = fn(d)
        (grad,) = torch.autograd.grad(loss.sum(), d)
        style = "--" if name.startswith(("L1", "L2")) else "-"
        axes[0, 0].plot(d.detach(), loss.detach(), style, label=name)
        axes[0, 1].plot(d.detach(), grad, style, label=name)
    axes[0, 0].set_ylim(0, limit * 1.2)
    axes[0, 1].set_ylim(-1.6, 1.6)
    for ax, what in zip(axes[0], ("loss", "gradient d loss / d d")):
        ax.set_xlabel("error d = prediction - target")
        ax.set_ylabel(what)
        ax.set_title(what)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(title or "smooth L1 against L1 and L2")
    return fig
