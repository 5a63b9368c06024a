"""Sparsity of saliency maps: the Gini index (PROTOCOL §3 "Gini")."""

from __future__ import annotations

import torch
from torch import Tensor

from salbench.metrics._validation import check_maps
from salbench.metrics.protocol import GINI_EPS

__all__ = ["gini_index"]


def gini_index(maps: Tensor) -> Tensor:
    r"""Gini index of each saliency map, higher = sparser (PROTOCOL §3 "Gini").

    The protocol's formula, with the normalisation by the maximum taken per image: equal to
    quantus ``Sparseness`` called on one image at a time, and independent of the other images
    of the batch (quantus normalises by the batch maximum). Computed in float64, returned in
    the dtype of ``maps``.

    An all-zero map scores exactly 0.0 (no division by zero; the protocol's small offset makes
    the formula give about 0 as well). A one-hot map of n pixels scores about ``(n - 1) / n``.

    Args:
        maps: saliency maps (B, H, W); signs are ignored.

    Returns:
        Gini index per map (B,), in [0, 1).

    Raises:
        ValueError: if ``maps`` is not a non-empty, finite, floating (B, H, W) tensor.

    Example:
        >>> maps = torch.tensor([[[0., 0.], [0., 5.]], [[1., 1.], [1., 1.]], [[1., -1.], [0., 0.]]])
        >>> gini_index(maps)
        tensor([0.7500, 0.0000, 0.5000])
    """
    check_maps(maps)
    flat = maps.flatten(1).to(torch.float64).abs()
    n = flat.shape[1]
    peak = flat.amax(dim=1, keepdim=True)
    all_zero = peak.squeeze(1) == 0
    a = torch.where(peak > 0, flat / torch.where(peak > 0, peak, torch.ones_like(peak)), torch.zeros_like(flat))
    a = torch.sort(a + GINI_EPS, dim=1).values
    i = torch.arange(1, n + 1, dtype=torch.float64, device=maps.device)
    gini = ((2 * i - n - 1) * a).sum(dim=1) / (n * a.sum(dim=1))
    gini = torch.where(all_zero, torch.zeros_like(gini), gini)
    return gini.to(maps.dtype)
