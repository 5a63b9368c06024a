"""SmoothBlock: fixed feature-map smoothing with a learned 1x1 mixing (PROTOCOL §5).

``y = x + Conv1x1(F(x))`` where ``F`` is a fixed depthwise 3x3 filter applied per channel
with kornia: ``gaussian_blur2d`` (variant G), ``box_blur`` (ablation M1, "mean") or
``median_blur`` (ablation M2, "median").
"""

from __future__ import annotations

import kornia.filters as KF
import torch
import torch.nn.functional as F
from torch import Tensor, nn

FILTERS = ("gaussian", "mean", "median")


def gaussian_sigma(width: int) -> float:
    """Gaussian σ from the feature-map width W: ``0.3·((W - 1)·0.5 - 1) + 0.8`` (PROTOCOL §5).

    >>> round(gaussian_sigma(12), 4)
    2.15
    """
    if width < 1:
        raise ValueError(f"feature-map width must be >= 1, got {width}")
    return 0.3 * ((width - 1) * 0.5 - 1) + 0.8


class SmoothBlock(nn.Module):
    """``y = x + Conv1x1(F(x))`` with a fixed 3x3 filter ``F`` (PROTOCOL §5).

    Args:
        channels: number of feature-map channels C (kept).
        width: feature-map width W, used for the Gaussian σ rule.
        filter: ``"gaussian"`` (G), ``"mean"`` (M1, kornia ``box_blur``) or ``"median"``
            (M2, kornia ``median_blur``).
        kernel_size: filter size (3 in every recipe).

    Shape:
        (B, C, H, W) -> (B, C, H, W)

    Example:
        >>> block = SmoothBlock(6, width=12)
        >>> block(torch.zeros(2, 6, 12, 12)).shape
        torch.Size([2, 6, 12, 12])
    """

    def __init__(self, channels: int, width: int, filter: str = "gaussian", kernel_size: int = 3) -> None:
        super().__init__()
        if filter not in FILTERS:
            raise ValueError(f"unknown SmoothBlock filter {filter!r}; expected one of {FILTERS}")
        self.filter = filter
        self.kernel_size = kernel_size
        self.sigma = gaussian_sigma(width)
        self.mix = nn.Conv2d(channels, channels, kernel_size=1)
        k = (kernel_size, kernel_size)
        if filter == "gaussian":
            kernel = KF.get_gaussian_kernel2d(k, torch.tensor([[self.sigma, self.sigma]]))[0]
        else:
            kernel = torch.full(k, 1.0 / (kernel_size * kernel_size))
        # fixed (not learned, not saved) depthwise kernel, built once by kornia
        self.register_buffer("kernel", kernel.expand(channels, 1, *k).clone(), persistent=False)

    def smooth(self, x: Tensor) -> Tensor:
        """The fixed filter F(x), per channel.

        Numerically the same as kornia's ``gaussian_blur2d`` / ``box_blur`` (reflect border)
        and ``median_blur`` (all with kornia's default reflect border) with this kernel size (tested), computed with a
        precomputed depthwise kernel so the per-call cost is one convolution.
        """
        p = self.kernel_size // 2
        xp = F.pad(x, (p, p, p, p), mode="reflect")
        if self.filter == "median":
            patches = xp.unfold(2, self.kernel_size, 1).unfold(3, self.kernel_size, 1)
            return patches.flatten(-2).sort(dim=-1).values[..., self.kernel_size * self.kernel_size // 2]
        return F.conv2d(xp, self.kernel.to(x.dtype), groups=x.shape[1])

    def forward(self, x: Tensor) -> Tensor:
        return x + self.mix(self.smooth(x))

    def extra_repr(self) -> str:
        return f"filter={self.filter!r}, kernel_size={self.kernel_size}, sigma={self.sigma:.4f}"
