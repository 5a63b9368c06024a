"""Optional native kernel of the M2 SmoothBlock, built on first use with the system C compiler.

The 3x3 median (``smoothing_kernels.c``) is a fused C loop: one pass reads the nine neighbours once
and writes the median and the neighbour its gradient goes to, where the pure-torch path makes ~110
element-wise passes over the map (docs/performance/smoothblock.md). Its results are bit-identical
to the torch path (tests/model_zoo/test_smoothing.py), so a machine without a compiler gets the
same numbers, only slower. Building, caching and the fallback rules: ``salbench.metrics._native``
(``SALBENCH_NATIVE=0`` forces the torch path; :func:`status` says which path runs and why).
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch
from torch import Tensor

from salbench.metrics._native import I64, P, NativeLibrary

LIBRARY = NativeLibrary(Path(__file__).with_name("smoothing_kernels.c"), {
    "median3x3_forward": ([P, P, P, I64, I64, I64], ctypes.c_int),
    "median3x3_backward": ([P, P, P, I64, I64, I64], None),
})


def library() -> ctypes.CDLL | None:
    """The loaded native library, or ``None`` (disabled, no compiler, build failed)."""
    return LIBRARY.library()


def status() -> str:
    """``"native"`` when the C kernel is in use, else why not."""
    return LIBRARY.status()


def usable(x: Tensor) -> bool:
    """Whether the native median can take this padded map: float32 on CPU, compiler available."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() >= 2 and library() is not None


def median3x3_forward(xp: Tensor, with_which: bool) -> tuple[Tensor, Tensor | None] | None:
    """Median of each 3x3 window of a padded float32 CPU map ``(..., H + 2, W + 2)`` and, when
    asked, the uint8 index (0..8, raster order) of the neighbour a stable sort puts at rank 4.
    ``None`` if the map holds a NaN (the C min/max do not propagate it as torch's do)."""
    lib = library()
    xp = xp.contiguous()
    h, w = xp.shape[-2] - 2, xp.shape[-1] - 2
    planes = xp.numel() // ((h + 2) * (w + 2))
    med = torch.empty(*xp.shape[:-2], h, w, dtype=xp.dtype)
    which = torch.empty(med.shape, dtype=torch.uint8) if with_which else None
    if lib.median3x3_forward(xp.data_ptr(), med.data_ptr(), which.data_ptr() if with_which else None,
                             planes, h, w):
        return None
    return med, which


def median3x3_backward(grad: Tensor, which: Tensor) -> Tensor:
    """Gradient with respect to the padded map: each output gradient routed to its ``which``."""
    lib = library()
    grad = grad.contiguous()
    h, w = which.shape[-2:]
    planes = which.numel() // (h * w)
    gp = torch.empty(*which.shape[:-2], h + 2, w + 2, dtype=grad.dtype)
    lib.median3x3_backward(grad.data_ptr(), which.data_ptr(), gp.data_ptr(), planes, h, w)
    return gp
