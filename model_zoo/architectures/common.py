"""Pieces shared by every architecture: the normalisation first layer and the staged model.

Every model takes images in [0, 1] pixel space (PROTOCOL §1); its per-dataset normalisation
is its first layer. Models are a sequence of *stages* followed by a head, so that a
SmoothBlock can be placed after stage 1, 2 or 3 as recipe data (PROTOCOL §5).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from salbench.model_zoo.datasets import SpecView
from salbench.model_zoo.smoothing import SmoothBlock

# per-dataset channel statistics in [0, 1] pixel space: (mean, std) from the dataset specs
NORMALIZATION = SpecView("normalization")


class Normalize(nn.Module):
    """(x - mean) / std per channel, as a fixed first layer."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


class StagedNet(nn.Module):
    """``normalize -> stages[0] -> [smooth] -> stages[1] -> ... -> head``.

    Args:
        normalize: the first layer.
        stages: the convolutional/residual blocks, in order.
        head: pooling + classifier producing logits (B, K).
        input_shape: (C, H, W) of one input, used to size a SmoothBlock.
        smoothing: None, or ``{"filter": "gaussian"|"mean"|"median", "placement": 1|2|3}``.
    """

    def __init__(
        self,
        normalize: nn.Module,
        stages: Sequence[nn.Module],
        head: nn.Module,
        input_shape: tuple[int, int, int],
        smoothing: dict | None = None,
    ) -> None:
        super().__init__()
        self.normalize = normalize
        self.stages = nn.ModuleList(stages)
        self.head = head
        self.smooth: SmoothBlock | None = None
        self.placement = 0
        if smoothing:
            placement = int(smoothing.get("placement", 1))
            if not 1 <= placement <= len(self.stages):
                raise ValueError(
                    f"SmoothBlock placement {placement} out of range: this model has "
                    f"{len(self.stages)} stages (placements 1..{len(self.stages)})"
                )
            with torch.no_grad():
                h = self.normalize(torch.zeros(1, *input_shape))
                for stage in self.stages[:placement]:
                    h = stage(h)
            self.smooth = SmoothBlock(h.shape[1], width=h.shape[-1], filter=smoothing.get("filter", "gaussian"))
            self.placement = placement

    def forward(self, x: Tensor) -> Tensor:
        h = self.normalize(x)
        for i, stage in enumerate(self.stages, start=1):
            h = stage(h)
            if i == self.placement:
                h = self.smooth(h)
        return self.head(h)
