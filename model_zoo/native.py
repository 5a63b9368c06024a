"""Optional native kernels of the SmoothBlock, built on first use with the system C compiler.

The G / M1 block (``smooth_mix_forward`` / ``smooth_mix_backward``) is one C call each way for
``x + W F(x) + b``, where the torch path makes ~10 operator calls whose dispatch dominates at
LeNet's feature-map size; equal to the torch path to float rounding.

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
    "median3x3_forward": ([P, P, P, P, I64, I64, I64], ctypes.c_int),
    "median3x3_backward": ([P, P, P, P, I64, I64, I64], None),
    "smooth_mix_forward": ([P, P, P, P, P, P, P, P, I64, I64, I64, I64], None),
    "smooth_mix_backward": ([P, P, P, P, P, P, P, P, P, P, P, I64, I64, I64, I64], None),
    "median_mix_forward": ([P, P, P, P, P, P, P, P, I64, I64, I64, I64], ctypes.c_int),
    "median_mix_backward": ([P, P, P, P, P, P, P, P, P, I64, I64, I64, I64], None),
})


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def library() -> ctypes.CDLL | None:
    """The loaded native library, or ``None`` (disabled, no compiler, build failed)."""
    return LIBRARY.library()


def status() -> str:
    """``"native"`` when the C kernel is in use, else why not."""
    return LIBRARY.status()


def usable(x: Tensor) -> bool:
    """Whether the native median can take this padded map: float32 on CPU, compiler available."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() >= 2 and library() is not None


def _median_scratch(h: int, w: int, dtype: torch.dtype, padded_plane: bool = False) -> Tensor:
    """The median's per-plane scratch (values / gradients and the routing at the padded width),
    after one reflect-padded plane if ``padded_plane`` (the fused M2 block's ``pad`` buffer)."""
    return torch.empty(((h + 2) * (w + 2) if padded_plane else 0) + 2 * h * (w + 2), dtype=dtype)


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
    scratch = _median_scratch(h, w, xp.dtype)
    if lib.median3x3_forward(xp.data_ptr(), med.data_ptr(), _ptr(which), scratch.data_ptr(), planes, h, w):
        return None
    return med, which


def median3x3_backward(grad: Tensor, which: Tensor) -> Tensor:
    """Gradient with respect to the padded map: each output gradient routed to its ``which``."""
    lib = library()
    grad = grad.contiguous()
    h, w = which.shape[-2:]
    planes = which.numel() // (h * w)
    gp = torch.empty(*which.shape[:-2], h + 2, w + 2, dtype=grad.dtype)
    scratch = _median_scratch(h, w, grad.dtype)
    lib.median3x3_backward(grad.data_ptr(), which.data_ptr(), gp.data_ptr(), scratch.data_ptr(), planes, h, w)
    return gp


def _work(c: int, h: int, w: int, dtype: torch.dtype, backward: bool) -> Tensor:
    """The C block's zeroed scratch: band coefficients, padded rows, one image's F(x) (see the C)."""
    return torch.zeros(((15 if backward else 8) + c) * h * w + 2 * w + 2, dtype=dtype)


def smooth_mix_forward(x: Tensor, weight: Tensor, bias: Tensor, taps_h: Tensor | None, taps_w: Tensor | None,
                       z: Tensor | None = None) -> Tensor:
    """``x + W F(x) + b`` of a contiguous float32 CPU map (B, C, H, W); ``weight`` (C, C), ``bias``
    (C,), ``taps_h`` (3, H) / ``taps_w`` (3, W) the band matrices' three diagonals. F(x) is not kept
    (:func:`smooth_mix_backward` recomputes it from x). With ``taps_h=None``, ``z`` (contiguous, the
    map's F(x)) is given and only the mixing runs."""
    b, c, h, w = x.shape
    out, work = torch.empty_like(x), _work(c, h, w, x.dtype, False)  # held: the C call writes into them
    library().smooth_mix_forward(x.data_ptr(), weight.data_ptr(), bias.data_ptr(), _ptr(taps_h), _ptr(taps_w),
                                 _ptr(z), out.data_ptr(), work.data_ptr(), b, c, h, w)
    return out


def smooth_mix_backward(grad: Tensor, src: Tensor, weight: Tensor, taps: tuple[Tensor, ...] | None,
                        need_weight: bool, need_bias: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Gradients of :func:`smooth_mix_forward` for the input and, when asked, weight and bias. ``taps``:
    the diagonals of B_h, B_w, B_h^T, B_w^T, with ``src`` the forward's input x; or ``None`` with
    ``src`` = z given to the forward, and the first gradient is then the one for z."""
    grad = grad.contiguous()
    b, c, h, w = grad.shape
    grad_x = torch.empty_like(grad)
    gw = torch.zeros(c, c, dtype=grad.dtype) if need_weight else None
    gb = torch.zeros(c, dtype=grad.dtype) if need_bias else None
    work = _work(c, h, w, grad.dtype, True)
    th, tw, tht, twt = (_ptr(t) for t in taps) if taps else (None,) * 4
    library().smooth_mix_backward(grad.data_ptr(), src.data_ptr(), weight.data_ptr(), th, tw, tht, twt,
                                  grad_x.data_ptr(), _ptr(gw), _ptr(gb), work.data_ptr(), b, c, h, w)
    return grad_x, gw, gb


def median_mix_forward(x: Tensor, weight: Tensor, bias: Tensor, with_which: bool
                       ) -> tuple[Tensor, Tensor, Tensor | None] | None:
    """``(x + W median3x3(x) + b, median3x3(x), routing index)`` of a contiguous float32 CPU map
    (B, C, H, W) with kornia's reflect border, in one C call; ``None`` if the map holds a NaN."""
    b, c, h, w = x.shape
    z, out = torch.empty_like(x), torch.empty_like(x)
    which = torch.empty(x.shape, dtype=torch.uint8) if with_which else None
    pad, work = _median_scratch(h, w, x.dtype, padded_plane=True), _work(c, h, w, x.dtype, False)
    if library().median_mix_forward(x.data_ptr(), weight.data_ptr(), bias.data_ptr(), z.data_ptr(), _ptr(which),
                                    out.data_ptr(), pad.data_ptr(), work.data_ptr(), b, c, h, w):
        return None
    return out, z, which


def median_mix_backward(grad: Tensor, z: Tensor, which: Tensor, weight: Tensor, need_weight: bool,
                        need_bias: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Gradients of :func:`median_mix_forward` for the input and, when asked, weight and bias."""
    grad = grad.contiguous()
    b, c, h, w = grad.shape
    grad_x = torch.empty_like(grad)
    gw = torch.zeros(c, c, dtype=grad.dtype) if need_weight else None
    gb = torch.zeros(c, dtype=grad.dtype) if need_bias else None
    pad, work = _median_scratch(h, w, grad.dtype, padded_plane=True), _work(c, h, w, grad.dtype, True)
    library().median_mix_backward(grad.data_ptr(), z.data_ptr(), which.data_ptr(), weight.data_ptr(),
                                  grad_x.data_ptr(), _ptr(gw), _ptr(gb), pad.data_ptr(), work.data_ptr(), b, c, h, w)
    return grad_x, gw, gb
