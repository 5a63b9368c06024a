"""SmoothBlock: fixed feature-map smoothing with a learned 1x1 mixing (PROTOCOL §5).

``y = x + Conv1x1(F(x))`` where ``F`` is a fixed depthwise 3x3 filter applied per channel
with kornia: ``gaussian_blur2d`` (variant G), ``box_blur`` (ablation M1, "mean") or
``median_blur`` (ablation M2, "median").
"""

from __future__ import annotations

import contextlib
import threading

import kornia.filters as KF
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from . import native

FILTERS = ("gaussian", "mean", "median")
# below this many pixels per map the 1x1 mixing runs as a matmul (measured: benchmarks/test_smoothing_speed.py)
_MATMUL_MIX_MAX_PIXELS = 256


def _sort2(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    return torch.minimum(a, b), torch.maximum(a, b)


def _median9(p: list[Tensor]) -> Tensor:
    """Median of 9 same-shape tensors by the classic 19-exchange selection network (Paeth;
    Devillard's ``opt_med9``), pruned to the exchanges the median needs."""
    p = list(p)
    for i, j in ((1, 2), (4, 5), (7, 8), (0, 1), (3, 4), (6, 7), (1, 2), (4, 5), (7, 8)):
        p[i], p[j] = _sort2(p[i], p[j])
    p[3] = torch.maximum(p[0], p[3])
    p[5] = torch.minimum(p[5], p[8])
    p[4], p[7] = _sort2(p[4], p[7])
    p[6] = torch.maximum(p[3], p[6])
    p[4] = torch.maximum(p[1], p[4])
    p[2] = torch.minimum(p[2], p[5])
    p[4] = torch.minimum(p[4], p[7])
    p[4], p[2] = _sort2(p[4], p[2])
    p[4] = torch.maximum(p[6], p[4])
    return torch.minimum(p[4], p[2])


def _median_which_torch(xp: Tensor, with_which: bool) -> tuple[Tensor, Tensor | None]:
    """The torch path of :class:`_Median3x3`'s forward: the median of each 3x3 window of the padded
    map and (when asked) the neighbour (uint8, 0..8 in raster order) its gradient goes to."""
    h, w = xp.shape[-2] - 2, xp.shape[-1] - 2
    views = [xp[..., i : i + h, j : j + w] for i in range(3) for j in range(3)]
    med = _median9(views)
    if not with_which:
        return med, None
    n_less = torch.zeros(med.shape, dtype=torch.int16, device=med.device)
    for v in views:
        n_less += v < med
    target = 4 - n_less  # which of the equal neighbours (0-based, raster order) has rank 4
    seen = torch.zeros_like(n_less)
    which = torch.zeros(med.shape, dtype=torch.uint8, device=med.device)
    for k, v in enumerate(views):
        eq = v == med
        which = torch.where(eq & (seen == target), k, which)
        seen += eq
    return med, which


def _median_backward_torch(grad: Tensor, which: Tensor) -> Tensor:
    """The torch path of :class:`_Median3x3`'s backward: nine masked shifted additions."""
    h, w = which.shape[-2:]
    gp = grad.new_zeros(*which.shape[:-2], h + 2, w + 2)
    for k in range(9):
        i, j = divmod(k, 3)
        gp[..., i : i + h, j : j + w] += torch.where(which == k, grad, 0.0)
    return gp


class _Median3x3(torch.autograd.Function):
    """3x3 median of an already padded map: the value from the selection network (no autograd
    graph), the gradient routed to the neighbour a stable sort puts at rank 4 (of 0..8) —
    among neighbours equal to the median, the (4 - #smaller)-th in raster order — exactly as
    ``unfold`` + ``sort`` on CPU does. Ties are common on real inputs (a constant background
    gives exact plateaus), so the choice matters for the gradient, not for the value.

    On CPU float32 maps both directions run as one fused C loop (``model_zoo/smoothing_kernels.c``, built
    on first use by :mod:`native`), bit-identical to the torch path used everywhere else.
    """

    @staticmethod
    def forward(ctx, xp: Tensor) -> Tensor:
        with_which = ctx.needs_input_grad[0]
        result = native.median3x3_forward(xp, with_which) if native.usable(xp) else None
        use_native = result is not None  # None: no native library, or a NaN in the map
        med, which = result if use_native else _median_which_torch(xp, with_which)
        if with_which:
            ctx.save_for_backward(which)
            ctx.use_native = use_native
        return med

    @staticmethod
    def backward(ctx, grad: Tensor):
        (which,) = ctx.saved_tensors
        if ctx.use_native and grad.dtype == torch.float32 and grad.device.type == "cpu":
            return native.median3x3_backward(grad, which)
        return _median_backward_torch(grad, which)


_INPUT_GRADIENTS_ONLY = threading.local()


@contextlib.contextmanager
def input_gradients_only():
    """Inside, the C SmoothBlock's backward computes the input gradient only, not the 1x1 mixing's
    weight and bias gradients (they come back as ``None``). For code that differentiates with
    respect to the input alone, as ``torch.autograd.grad(loss, x)`` in a PGD attack does: a custom
    autograd function cannot tell which gradients the caller asked for, while torch's own operators
    skip the unneeded ones. Do not call ``.backward()`` for the parameters inside."""
    previous = getattr(_INPUT_GRADIENTS_ONLY, "on", False)
    _INPUT_GRADIENTS_ONLY.on = True
    try:
        yield
    finally:
        _INPUT_GRADIENTS_ONLY.on = previous


def _param_grads_needed(ctx, weight_index: int, bias_index: int) -> tuple[bool, bool]:
    """Whether the C block's backward computes the mixing's weight / bias gradients."""
    params = not getattr(_INPUT_GRADIENTS_ONLY, "on", False)
    return params and ctx.needs_input_grad[weight_index], params and ctx.needs_input_grad[bias_index]


class _SmoothMix(torch.autograd.Function):
    """``x + W F(x) + b`` as one C call each way (:mod:`native`), equal to :meth:`SmoothBlock.forward`'s
    torch path to float rounding. The linear filters (G, M1) are applied in the same call from their
    band diagonals ``taps``; F(x) is not stored: the backward recomputes it from x (which the
    previous layer keeps anyway) for the weight gradient, and skips it in attacks
    (:func:`input_gradients_only`). For the median (M2) ``z = F(x)`` comes in from :func:`_median3x3`
    (``taps`` None) and the call does the mixing and the residual. Not twice differentiable."""

    @staticmethod
    def forward(ctx, x: Tensor, z: Tensor | None, weight: Tensor, bias: Tensor, taps: tuple[Tensor, ...] | None):
        c = x.shape[1]
        w2 = weight.detach().reshape(c, c).contiguous()
        xc, b = x.detach().contiguous(), bias.detach().contiguous()
        if z is None:  # G / M1: the backward recomputes F(x) from x
            src = xc
            out = native.smooth_mix_forward(xc, w2, b, *taps[:2])
        else:  # M2: z = F(x) given
            src = z.detach().contiguous()
            out = native.smooth_mix_forward(xc, w2, b, None, None, z=src)
        ctx.save_for_backward(src, w2)
        ctx.taps = taps
        ctx.given_z = z is not None
        ctx.weight_shape = weight.shape
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        src, w2 = ctx.saved_tensors
        need_w, need_b = _param_grads_needed(ctx, 2, 3)
        grad_in, gw, gb = native.smooth_mix_backward(grad, src, w2, ctx.taps, need_w, need_b)
        gw = gw.view(ctx.weight_shape) if gw is not None else None
        if ctx.given_z:  # grad_in is the gradient for z; x gets the residual's
            return grad, grad_in, gw, gb, None
        return grad_in, None, gw, gb, None


class _NaNInMap(Exception):
    """The C median met a NaN (its min/max would not propagate it): take the torch path."""


class _MedianMix(torch.autograd.Function):
    """The M2 block ``x + W median3x3(x) + b`` as one C call each way (:mod:`native`): the median and
    its routing are the C median's (bit-identical to the torch path's), the mixing, residual and
    reflect-border gradient fold run in the same call. Equal to the torch path to float rounding.
    Raises :class:`_NaNInMap` for a map with a NaN. Not twice differentiable."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        c = x.shape[1]
        w2 = weight.detach().reshape(c, c).contiguous()
        result = native.median_mix_forward(x.detach().contiguous(), w2, bias.detach().contiguous(),
                                           with_which=x.requires_grad)
        if result is None:
            raise _NaNInMap
        out, z, which = result
        ctx.save_for_backward(z, which, w2)
        ctx.weight_shape = weight.shape
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        z, which, w2 = ctx.saved_tensors
        need_w, need_b = _param_grads_needed(ctx, 1, 2)
        if which is None:  # the input did not require grad; only the parameters' gradients
            _, gw, gb = native.smooth_mix_backward(grad, z, w2, None, need_w, need_b)
            grad_x = None
        else:
            grad_x, gw, gb = native.median_mix_backward(grad, z, which, w2, need_w, need_b)
        return grad_x, gw.view(ctx.weight_shape) if gw is not None else None, gb


def _median3x3(x: Tensor) -> Tensor:
    """Median of each 3x3 neighbourhood with kornia's reflect border."""
    return _Median3x3.apply(F.pad(x, (1, 1, 1, 1), mode="reflect"))


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
        if kernel_size != 3 and filter == "median":
            raise ValueError(f"the median SmoothBlock supports kernel_size 3 only, got {kernel_size}")
        self.filter = filter
        self.kernel_size = kernel_size
        self.sigma = gaussian_sigma(width)
        self.mix = nn.Conv2d(channels, channels, kernel_size=1)
        k = (kernel_size, kernel_size)
        if filter == "gaussian":
            kernel1d = KF.get_gaussian_kernel1d(kernel_size, self.sigma)[0]
            kernel = KF.get_gaussian_kernel2d(k, torch.tensor([[self.sigma, self.sigma]]))[0]
        else:
            kernel1d = torch.full((kernel_size,), 1.0 / kernel_size)
            kernel = torch.full(k, 1.0 / (kernel_size * kernel_size))
        # fixed (not learned, not saved) kernels, built once by kornia: the 2D depthwise kernel
        # (reference path) and its separable 1D factor (fast path)
        self.register_buffer("kernel", kernel.expand(channels, 1, *k).clone(), persistent=False)
        self.register_buffer("kernel1d", kernel1d.clone(), persistent=False)
        self._bands: dict = {}

    def _band(self, n: int, like: Tensor) -> Tensor:
        """(n, n) matrix B with ``B @ v`` = the 1D filter of v with kornia's reflect border."""
        key = (n, like.dtype, like.device)
        band = self._bands.get(key)
        if band is None:
            k1 = self.kernel1d.double().cpu()
            r = self.kernel_size // 2
            if n <= r:
                raise ValueError(f"SmoothBlock needs feature maps larger than {r} pixels per side "
                                 f"(reflect border), got {n}")
            band = torch.zeros(n, n, dtype=torch.float64)
            for i in range(n):
                for j in range(self.kernel_size):
                    src = i + j - r
                    src = -src if src < 0 else (2 * (n - 1) - src if src >= n else src)
                    band[i, src] += k1[j]
            band = band.to(like.dtype).to(like.device)
            self._bands[key] = band
        return band

    def _taps(self, h: int, w: int, like: Tensor) -> tuple[Tensor, ...]:
        """The three diagonals (3, n) of B_h, B_w, B_h^T and B_w^T (the bands are tridiagonal for a
        3-tap filter: the reflect border stays within one pixel), for the C block."""
        key = ("taps", h, w, like.dtype, like.device)
        taps = self._bands.get(key)
        if taps is None:
            def diagonals(band: Tensor) -> Tensor:
                n = band.shape[0]
                out = torch.zeros(3, n, dtype=band.dtype)
                out[0, 1:] = torch.diagonal(band, -1)
                out[1] = torch.diagonal(band)
                out[2, :-1] = torch.diagonal(band, 1)
                return out.contiguous()

            bh, bw = self._band(h, like).cpu(), self._band(w, like).cpu()
            taps = tuple(diagonals(b) for b in (bh, bw, bh.T, bw.T))
            self._bands[key] = taps
        return taps

    def _native_ok(self, x: Tensor) -> bool:
        mix = self.mix
        return (self.kernel_size == 3 and x.device.type == "cpu"
                and x.dtype == torch.float32 and x.dim() == 4 and mix.weight.dtype == torch.float32
                and mix.bias is not None and min(x.shape[-2:]) >= 2 and native.library() is not None)

    def smooth(self, x: Tensor) -> Tensor:
        """The fixed filter F(x), per channel.

        Equal to kornia's ``gaussian_blur2d`` / ``box_blur`` / ``median_blur`` (reflect border,
        kornia's default) to float tolerance (bit for bit for the median; tested). The linear
        filters are separable, so F(x) = B_h @ x @ B_w^T with banded (H, H), (W, W) matrices
        that include the reflect border: two small matmuls instead of a padded copy and a
        depthwise convolution. The median is a 19-comparator min/max selection network over
        the 9 shifted views (exact: it selects, never computes, a value).
        """
        if self.filter == "median":
            return _median3x3(x)
        return self._band(x.shape[-2], x) @ x @ self._band(x.shape[-1], x).T

    def smooth_reference(self, x: Tensor) -> Tensor:
        """F(x) computed the direct way (reflect pad + depthwise conv / unfold + sort); for tests."""
        p = self.kernel_size // 2
        xp = F.pad(x, (p, p, p, p), mode="reflect")
        if self.filter == "median":
            patches = xp.unfold(2, self.kernel_size, 1).unfold(3, self.kernel_size, 1)
            return patches.flatten(-2).sort(dim=-1).values[..., self.kernel_size * self.kernel_size // 2]
        return F.conv2d(xp, self.kernel.to(x.dtype), groups=x.shape[1])

    def forward(self, x: Tensor) -> Tensor:
        if self._native_ok(x):
            weight, bias = self.mix.weight, self.mix.bias
            if self.filter != "median":
                return _SmoothMix.apply(x, None, weight, bias, self._taps(x.shape[-2], x.shape[-1], x))
            if native.usable(x):
                try:
                    return _MedianMix.apply(x, weight, bias)
                except _NaNInMap:
                    pass
            return _SmoothMix.apply(x, _median3x3(x), weight, bias, None)
        z = self.smooth(x)
        b, c, h, w = z.shape
        if h * w <= _MATMUL_MIX_MAX_PIXELS:
            # small maps (LeNet 12x12): one batched matmul beats the 1x1 convolution's dispatch
            mixed = torch.matmul(self.mix.weight[:, :, 0, 0], z.reshape(b, c, h * w)).reshape(b, c, h, w)
            return x + mixed + self.mix.bias[:, None, None]
        return x + self.mix(z)

    def extra_repr(self) -> str:
        return f"filter={self.filter!r}, kernel_size={self.kernel_size}, sigma={self.sigma:.4f}"
