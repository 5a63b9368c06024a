"""Control explainers: maps that ignore the model, scored beside VG and IG so a reader can see
whether a metric rewards explaining the model or something a model-free map has too.

- :func:`random_map`: a uniform [0, 1) map per image from a generator seeded by ``seed`` and the
  image's bytes (OpenXAI's random control explainer). It is a function of the image alone, so the
  same image gets the same map in every batch and on every call, and a noisy copy gets another one.
- :func:`edge_map`: the Sobel gradient magnitude of the input, summed over channels (Adebayo et al.
  2018 compared saliency maps with an edge detector), as kornia's ``filters.sobel`` with its defaults
  computes it (3x3 Sobel kernels divided by 8, replicate padding, ``sqrt(gx² + gy² + 1e-6)``), here in
  plain torch (the metrics library depends on torch and captum only; the tests compare with kornia).

Both follow the :data:`~salbench.metrics.attributions.Explainer` contract ``(model, x, y) -> (B, H, W)``
and never call the model. A metric on which one of them beats VG or IG measures something a map can
have without looking at the model.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from salbench.metrics._validation import check_images
from salbench.metrics.protocol import EDGE_EPS

__all__ = ["random_map", "edge_map", "random_explainer"]


def _image_seed(image: Tensor, seed: int) -> int:
    h = hashlib.blake2b(image.detach().to("cpu", torch.float32).contiguous().numpy().tobytes(), digest_size=8,
                        key=int(seed).to_bytes(8, "little", signed=True))
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)


def random_map(x: Tensor, seed: int = 0) -> Tensor:
    """One uniform [0, 1) map (B, H, W) per image of ``x`` (B, C, H, W), drawn from a CPU generator
    seeded by ``seed`` and the image's float32 bytes; returned on ``x``'s device in ``x``'s dtype."""
    check_images(x)
    b, _, h, w = x.shape
    out = torch.empty(b, h, w, dtype=torch.float32)
    g = torch.Generator()
    for i in range(b):
        g.manual_seed(_image_seed(x[i], seed))
        out[i] = torch.rand(h, w, generator=g)
    return out.to(device=x.device, dtype=x.dtype)


def random_explainer(seed: int = 0):
    """The :func:`random_map` control as an explainer ``(model, x, y) -> (B, H, W)``."""

    def explain(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return random_map(x, seed)

    return explain


def edge_map(model: nn.Module | None, x: Tensor, y: Tensor | None = None) -> Tensor:
    """Sobel gradient magnitude of ``x`` (B, C, H, W) summed over channels: (B, H, W). ``model`` and
    ``y`` are accepted for the explainer contract and ignored."""
    check_images(x)
    gx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=x.dtype, device=x.device) / 8
    kernels = torch.stack([gx, gx.T]).unsqueeze(1)  # (2, 1, 3, 3): d/dx, d/dy
    with torch.no_grad():
        b, c, h, w = x.shape
        padded = F.pad(x.detach().reshape(b * c, 1, h, w), (1, 1, 1, 1), mode="replicate")
        g = F.conv2d(padded, kernels)  # (B*C, 2, H, W)
        return torch.sqrt(g.pow(2).sum(dim=1) + EDGE_EPS).reshape(b, c, h, w).sum(dim=1)
