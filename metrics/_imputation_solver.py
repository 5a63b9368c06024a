"""Batched exact solver for the linear system of noisy linear imputation (PROTOCOL §3, ROAD).

For every removed pixel i the system says ``W_i v_i - sum_{j removed} w_ij v_j =
sum_{j known} w_ij x_j``, where j runs over the in-image 8-neighbours of i, ``w_ij`` is 1/6 for
edge and 1/12 for diagonal neighbours (``ROAD_NEIGHBOUR_WEIGHTS``) and ``W_i`` is the sum of the
in-image weights (quantus ``noisy_linear_imputation``). Multiplied by 12 the stencil is integer:
``12 A v = m * (T(1) v - T(v))`` with ``T`` the separable ``[1, 2, 1] x [1, 2, 1]`` filter with
zero padding and ``m`` the removed-pixel mask. ``A`` is a Dirichlet graph Laplacian: symmetric
positive definite whenever the image has at least one known pixel.

Solver: conjugate gradient, matrix-free, on all planes of a batch at once, with the planes laid
out in one flat buffer separated by zero rows and columns so that the 3x3 stencil is a handful
of contiguous shifted additions. Accuracy comes from iterative refinement: residuals and the
solution are kept in float64, corrections are solved in a working precision (float32 by
default: half the memory traffic, and fast on GPUs), until the float64 residual of every
plane is below ``tol``. Planes that have converged are dropped from the working set.

Large holes (a removed pixel far from every known one, at 224x224 with clustered masks) make plain
CG slow: it needs about as many iterations as the hole is wide (~500 at 224x224). Planes of at
least ``_MG_MIN_SIDE`` pixels with such a hole are solved by CG preconditioned with a geometric
multigrid V-cycle instead (:func:`_pcg_mg`; 10-20 iterations per refinement round): the same
operator rediscretised on coarser grids (a coarse cell is unknown when its four children are),
cell-centred bilinear interpolation and its transpose, one damped Jacobi sweep before and after
the coarse correction. Which solver runs is a speed decision only: both stop at the same float64
residual bound, and 28x28 / 32x32 planes (FMNIST, CIFAR-10) always take plain CG.

On CPU both solvers run in C when a compiler is at hand (``imputation_kernel.c``, built by
:mod:`salbench.metrics._native`): the same refinement, CG and V-cycle with the same settings, one
plane at a time so that its vectors stay in cache, with fused passes. The C and torch paths stop at
the same residual bound, so they agree to the solve's tolerance, not bit for bit; ROAD's
predictions on the zoo's images were identical on both (``benchmarks/road_native_equivalence.py``).
The torch path serves GPUs, a float64 working precision, ``SALBENCH_NATIVE=0`` and machines
without a compiler.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from salbench.metrics._native import F64, I64, P, NativeLibrary
from salbench.metrics.protocol import ROAD_NEIGHBOUR_WEIGHTS

#: The stencil is scaled by this factor so that its weights are the integers of ``[1, 2, 1]^2``.
_SCALE = 12.0
#: Working-set size (elements per vector) of one chunk of planes; a few MiB stays in cache.
_CHUNK_ELEMENTS = 1 << 18
#: How often (in CG iterations) converged planes are checked for and dropped.
_CHECK_EVERY = 8
#: Inner CG solves reduce the residual of a refinement round by this factor.
_INNER_REDUCTION = 1e-4
_MAX_ROUNDS = 12

#: The same refinement + (multigrid-preconditioned) CG solve in C, one plane at a time in cache
#: (``imputation_kernel.c``); used on CPU, with the torch path as the fallback (metrics/_native.py).
IMPUTATION_NATIVE = NativeLibrary(
    Path(__file__).with_name("imputation_kernel.c"),
    {"impute_planes": ([P, P, I64, I64, I64, F64, I64, I64, F64, I64, F64, I64, I64, I64, P], I64)},
)


def _maxiter(height: int, width: int) -> int:
    return 20 * (height + width) + 100


def _check_weights() -> None:
    # The solver hard-codes 12 * weight = (2 - |dy|) * (2 - |dx|), the [1, 2, 1] x [1, 2, 1]
    # filter without its centre; fail loudly if the protocol's weights ever differ.
    got = {(dy, dx): w for dy, dx, w in ROAD_NEIGHBOUR_WEIGHTS}
    offsets = {(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx}
    integer = all(abs(_SCALE * w - (2 - abs(dy)) * (2 - abs(dx))) < 1e-12 for (dy, dx), w in got.items())
    if got.keys() != offsets or not integer:
        raise RuntimeError("ROAD_NEIGHBOUR_WEIGHTS changed; metrics/_imputation_solver.py must follow")


_check_weights()


class _Layout:
    """n planes of H x W stored as one flat buffer: each plane padded by a zero column on the
    right and a zero row at the bottom, plus a zero margin at both ends of the buffer. In this
    layout every 8-neighbour of an in-image pixel that lies outside the image reads a zero."""

    def __init__(self, height: int, width: int) -> None:
        self.h, self.w = height, width
        self.row = width + 1  # row stride
        self.plane = (height + 1) * (width + 1)
        self.margin = width + 2

    def buffer(self, n: int, like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        return torch.zeros(n * self.plane + 2 * self.margin, dtype=dtype or like.dtype, device=like.device)

    def body(self, buf: Tensor, n: int) -> Tensor:
        """The (n, P) view of the planes inside ``buf``."""
        return buf[self.margin : self.margin + n * self.plane].view(n, self.plane)

    def embed(self, planes: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """(n, H, W) -> padded flat buffer."""
        n = planes.shape[0]
        buf = self.buffer(n, planes, dtype)
        self.body(buf, n).view(n, self.h + 1, self.row)[:, : self.h, : self.w] = planes
        return buf

    def extract(self, flat: Tensor) -> Tensor:
        """(n, P) -> (n, H, W)."""
        return flat.view(-1, self.h + 1, self.row)[:, : self.h, : self.w]

    def stencil(self, buf: Tensor, n: int) -> Tensor:
        """``T(v)``: the ``[1, 2, 1] x [1, 2, 1]`` filter of the planes in ``buf``, as (n, P).

        Values on the padding positions are garbage; callers mask them."""
        length = n * self.plane
        lo, hi = self.margin - 1, self.margin + length + 1
        r = self.row
        t = torch.add(buf[lo - r : hi - r], buf[lo + r : hi + r]).add_(buf[lo:hi], alpha=2.0)
        u = torch.add(t[0:length], t[2 : length + 2]).add_(t[1 : length + 1], alpha=2.0)
        return u.view(n, self.plane)


def _cg(layout: _Layout, rhs: Tensor, mask: Tensor, diag: Tensor, tol: Tensor, maxiter: int) -> Tensor:
    """Conjugate gradient for ``(diag * v - mask * T(v)) = rhs`` on every plane.

    All arguments are (n, P) in the working dtype except ``tol`` (n,) (max-abs residual at which
    a plane stops). Returns the (n, P) solution (zero off the mask). Planes still running after
    ``maxiter`` iterations return their current iterate; the caller's refinement loop checks.
    A plane is frozen as soon as a check finds it converged, so its result does not depend on
    the other planes of the chunk.
    """
    n = rhs.shape[0]
    out = torch.zeros_like(rhs)
    active = torch.arange(n, device=rhs.device)
    sol = torch.zeros_like(rhs)
    r = rhs.clone()
    buf = layout.buffer(n, rhs)
    p = layout.body(buf, n)
    p.copy_(r)
    rr = torch.linalg.vector_norm(r, dim=1).square()
    live = rr > 0
    zero = torch.zeros_like(rr)
    k = n
    for it in range(maxiter):
        # q = -(A p); p is zero off the mask, so diag * p needs no masking.
        q = layout.stencil(buf, k).mul_(mask).addcmul_(diag, p, value=-1.0)
        pap = -torch.linalg.vecdot(p, q)
        alpha = torch.where(live & (pap > 0), rr / pap, zero).unsqueeze(1)
        sol.addcmul_(p, alpha)
        r.addcmul_(q, alpha)
        rr_new = torch.linalg.vector_norm(r, dim=1).square()
        beta = torch.where(live & (rr > 0), rr_new / rr, zero).unsqueeze(1)
        rr = rr_new
        torch.addcmul(r, p, beta, out=p)
        if (it + 1) % _CHECK_EVERY == 0 or it + 1 == maxiter:
            done = r.abs().amax(dim=1) <= tol
            live = ~done
            n_done = int(done.sum())
            if n_done == k:
                out[active] = sol
                return out
            # Dropping planes costs a copy of every vector: only worth it once enough are done.
            if n_done * 4 >= k:
                out[active[done]] = sol[done]
                keep = (~done).nonzero().squeeze(1)
                active, sol, r, rr, mask, diag, tol, live, zero = (
                    t[keep] for t in (active, sol, r, rr, mask, diag, tol, live, zero)
                )
                new_buf = layout.buffer(len(keep), rhs)
                layout.body(new_buf, len(keep)).copy_(p[keep])
                buf, k = new_buf, len(keep)
                p = layout.body(buf, k)
    out[active] = sol
    return out


# ------------------------------------------------------------------------------------- multigrid
#: A plane is solved by multigrid-preconditioned CG (:func:`_pcg_mg`) when some removed pixel lies
#: at least this many pixels (Chebyshev distance) from every known pixel: plain CG (:func:`_cg`) needs
#: about as many iterations as the widest hole is wide, an MG-PCG iteration costs about six CG
#: iterations and needs 10-20 per refinement round (measured at 224x224, docs/performance.md).
#: Scattered masks (ROAD on noisy maps) stay on plain CG.
_MG_MIN_DEPTH = 16
#: ... and only on planes at least this large on their shorter side (even sides, for the coarsening).
_MG_MIN_SIDE = 64
#: Coarsening stops at a level whose sides are odd or below this.
_MG_COARSEST = 8
_MG_OMEGA = 0.85  # damped Jacobi; D^-1 A has eigenvalues up to 4/3 inside the image, below 2 at its border
_MG_SWEEPS = 1  # pre- and post-smoothing sweeps per level (equal: the V-cycle stays symmetric)
_MG_COARSE_SWEEPS = 8
_MG_MAXITER = 300


def _filter2d(v: Tensor) -> Tensor:
    """``T(v)``: the ``[1, 2, 1] x [1, 2, 1]`` filter with zero padding of (n, H, W) planes."""
    p = F.pad(v, (1, 1, 1, 1))
    u = torch.add(p[:, :-2], p[:, 2:]).add_(p[:, 1:-1], alpha=2.0)
    return torch.add(u[:, :, :-2], u[:, :, 2:]).add_(u[:, :, 1:-1], alpha=2.0)


def _prolong(u: Tensor) -> Tensor:
    """Cell-centred bilinear interpolation (n, h, w) -> (n, 2h, 2w), replicate at the image border."""
    n, h, w = u.shape
    p = F.pad(u.unsqueeze(1), (1, 1, 0, 0), mode="replicate").squeeze(1)  # along W
    row = torch.stack((torch.add(p[..., :-2], u, alpha=3.0), torch.add(p[..., 2:], u, alpha=3.0)), dim=-1)
    row = row.view(n, h, 2 * w).mul_(0.25)
    p = F.pad(row.unsqueeze(1), (0, 0, 1, 1), mode="replicate").squeeze(1)  # along H
    out = torch.stack((torch.add(p[:, :-2], row, alpha=3.0), torch.add(p[:, 2:], row, alpha=3.0)), dim=2)
    return out.view(n, 2 * h, 2 * w).mul_(0.25)


def _restrict(v: Tensor) -> Tensor:
    """The transpose of :func:`_prolong`: (n, 2h, 2w) -> (n, h, w) (weights 1/4, 3/4, 3/4, 1/4 per axis)."""
    n, hh, ww = v.shape
    p = F.pad(v.unsqueeze(1), (1, 1, 0, 0), mode="replicate").squeeze(1)
    col = torch.add(p[..., 1:-1:2], p[..., 2:-1:2]).mul_(3.0).add_(p[..., 0:-2:2]).add_(p[..., 3::2])
    p = F.pad(col.unsqueeze(1), (0, 0, 1, 1), mode="replicate").squeeze(1)
    out = torch.add(p[:, 1:-1:2], p[:, 2:-1:2]).mul_(3.0).add_(p[:, 0:-2:2]).add_(p[:, 3::2])
    return out.mul_(1.0 / 16.0)


class _Level:
    """One grid of the multigrid hierarchy: the masked operator ``A v = m (d v - T(v))`` with
    ``d = T(1)`` (the protocol's system times 12, PROTOCOL §3 "ROAD-AOPC"), rediscretised on every level
    with the mask of the coarse cells whose four children are all unknown (measured: far fewer
    iterations than "any child unknown" where the known pixels are scattered)."""

    def __init__(self, mask: Tensor) -> None:
        self.mask = mask  # (n, H, W), 1 = unknown
        self.d = _filter2d(torch.ones_like(mask[:1]))  # (1, H, W)
        self.inv_diag = mask / (self.d - 4.0)  # the centre weight is 4: D = d - 4, zero off the mask

    def apply(self, v: Tensor) -> Tensor:
        return torch.mul(self.d, v).sub_(_filter2d(v)).mul_(self.mask)

    def take(self, keep: Tensor) -> "_Level":
        out = _Level.__new__(_Level)
        out.mask, out.d, out.inv_diag = self.mask[keep], self.d, self.inv_diag[keep]
        return out


def _hierarchy(mask: Tensor) -> list[_Level]:
    levels = [_Level(mask)]
    while True:
        h, w = levels[-1].mask.shape[1:]
        if h % 2 or w % 2 or min(h, w) // 2 < _MG_COARSEST:
            return levels
        m = levels[-1].mask
        coarse = -F.max_pool2d(-m.unsqueeze(1), 2).squeeze(1)  # a coarse cell is unknown if all its children are
        levels.append(_Level(coarse))


def _vcycle(levels: list[_Level], r: Tensor, depth: int = 0) -> Tensor:
    """One symmetric V-cycle for ``A e = r`` from ``e = 0`` (damped Jacobi smoothing)."""
    lv = levels[depth]
    e = torch.mul(r, lv.inv_diag).mul_(_MG_OMEGA)
    sweeps = _MG_COARSE_SWEEPS if depth == len(levels) - 1 else _MG_SWEEPS
    for _ in range(sweeps - 1):
        e.addcmul_(torch.sub(r, lv.apply(e)), lv.inv_diag, value=_MG_OMEGA)
    if depth == len(levels) - 1:
        return e
    coarse_r = _restrict(torch.sub(r, lv.apply(e))).mul_(levels[depth + 1].mask)
    e.addcmul_(_prolong(_vcycle(levels, coarse_r, depth + 1)), lv.mask)
    for _ in range(sweeps):
        e.addcmul_(torch.sub(r, lv.apply(e)), lv.inv_diag, value=_MG_OMEGA)
    return e


def _pcg_mg(rhs: Tensor, mask: Tensor, tol: Tensor, maxiter: int) -> Tensor:
    """Multigrid-preconditioned conjugate gradient for ``A v = rhs`` on (n, H, W) planes (see :class:`_Level`).

    ``rhs`` and ``mask`` are (n, H, W) in the working dtype, ``tol`` (n,) the max-abs residual at
    which a plane stops. Converged planes are frozen (their result does not depend on the other
    planes) and dropped from the working set once a quarter of them are done.
    """
    n = rhs.shape[0]
    out = torch.zeros_like(rhs)
    active = torch.arange(n, device=rhs.device)
    levels = _hierarchy(mask)
    sol = torch.zeros_like(rhs)
    r = rhs.clone()
    z = _vcycle(levels, r)
    p = z.clone()
    rz = torch.linalg.vecdot(r.flatten(1), z.flatten(1))
    zero = torch.zeros_like(rz)
    for _ in range(maxiter):
        done = r.flatten(1).abs().amax(dim=1) <= tol
        n_done = int(done.sum())
        if n_done == active.numel():
            break
        if n_done * 4 >= active.numel():
            out[active[done]] = sol[done]
            keep = (~done).nonzero().squeeze(1)
            active, sol, r, p, rz, tol, zero = (t[keep] for t in (active, sol, r, p, rz, tol, zero))
            levels = [lv.take(keep) for lv in levels]
            done = done[keep]
        q = levels[0].apply(p)
        pq = torch.linalg.vecdot(p.flatten(1), q.flatten(1))
        alpha = torch.where(~done & (pq > 0), rz / pq, zero).view(-1, 1, 1)
        sol.addcmul_(p, alpha)
        r.addcmul_(q, alpha, value=-1.0)
        z = _vcycle(levels, r)
        rz_new = torch.linalg.vecdot(r.flatten(1), z.flatten(1))
        beta = torch.where(~done & (rz > 0), rz_new / rz, zero).view(-1, 1, 1)
        rz = rz_new
        p.mul_(beta).add_(z)
    out[active] = sol
    return out


def _has_deep_hole(removed: Tensor, depth: int) -> Tensor:
    """Per (H, W) mask of ``removed`` (n, H, W): does it hold a removed square of 3 x 3 blocks of
    ``depth // 2`` pixels (aligned to the blocks) without a known pixel? Every hole whose centre is
    ``depth`` or more pixels (Chebyshev) from the nearest known pixel holds one; holes from about
    ``depth // 2`` on may. One pooling pass: a cheap proxy for the CG iteration count."""
    block = max(1, depth // 2)
    known = (~removed).to(torch.float32).unsqueeze(1)
    if min(known.shape[2:]) < 3 * block:
        return torch.zeros(removed.shape[0], dtype=torch.bool, device=removed.device)
    blocks = F.max_pool2d(known, block)  # 1 where the block has a known pixel
    near = F.max_pool2d(blocks, 3, stride=1)  # over 3 x 3 blocks
    return near.flatten(1).amin(dim=1) < 1


def _multigrid_fits(height: int, width: int) -> bool:
    """Large planes only (ROAD at 28x28 / 32x32 keeps plain CG), with at least one coarse level."""
    return min(height, width) >= _MG_MIN_SIDE and height % 2 == 0 and width % 2 == 0


def _solve_chunk(
    planes: Tensor, removed: Tensor, tol: float, work_dtype: torch.dtype, multigrid: bool = False
) -> Tensor:
    """Exact fill of (n, H, W) float64 planes whose ``removed`` (n, H, W) pixels are unknown."""
    n, height, width = planes.shape
    layout = _Layout(height, width)
    mask = layout.body(layout.embed(removed.to(planes.dtype)), n)
    known = planes * ~removed
    rhs = layout.stencil(layout.embed(known), n).mul_(mask)
    diag = layout.stencil(layout.embed(torch.ones_like(planes[:1])), 1) * mask
    scaled_tol = tol * _SCALE
    maxiter = _maxiter(height, width)
    mask_w, diag_w = mask.to(work_dtype), diag.to(work_dtype)
    removed_w = removed.to(work_dtype) if multigrid else None
    out = torch.zeros_like(rhs)
    which = torch.arange(n, device=planes.device)  # planes still being refined
    sol_buf = layout.buffer(n, rhs)
    sol = layout.body(sol_buf, n)
    res = rhs.clone()
    for _ in range(_MAX_ROUNDS):
        err = res.abs().amax(dim=1)
        pending = err > scaled_tol
        n_pending = int(pending.sum())
        if n_pending < which.numel():  # store the finished planes, keep refining the rest
            done = ~pending
            out[which[done]] = sol[done]
            if n_pending == 0:
                break
            keep = pending.nonzero().squeeze(1)
            which, rhs, res, err, mask, diag, mask_w, diag_w = (
                t[keep] for t in (which, rhs, res, err, mask, diag, mask_w, diag_w)
            )
            new_buf = layout.buffer(n_pending, rhs)
            layout.body(new_buf, n_pending).copy_(sol[keep])
            sol_buf, sol = new_buf, layout.body(new_buf, n_pending)
        inner_tol = torch.clamp(err * _INNER_REDUCTION, min=0.5 * scaled_tol).to(work_dtype)
        if multigrid:
            r2d = layout.extract(res).to(work_dtype).contiguous()
            delta2d = _pcg_mg(r2d, removed_w[which], inner_tol, _MG_MAXITER)
            sol += layout.body(layout.embed(delta2d.to(sol.dtype)), which.numel())
        else:
            delta = _cg(layout, res.to(work_dtype), mask_w, diag_w, inner_tol, maxiter)
            sol += delta.to(sol.dtype)
        # res = rhs - A sol = rhs + (mask * T(sol) - diag * sol)
        res = layout.stencil(sol_buf, which.numel()).mul_(mask).addcmul_(diag, sol, value=-1.0).add_(rhs)
    else:
        worst = float(res.abs().amax()) / _SCALE
        raise RuntimeError(
            f"noisy linear imputation did not converge: residual {worst:.3g} > tol {tol:.3g} after "
            f"{_MAX_ROUNDS} refinement rounds"
        )
    return torch.where(removed, layout.extract(out), planes)


def _solve_native(planes: Tensor, removed: Tensor, tol: float, multigrid: bool) -> Tensor:
    """:func:`_solve_chunk` (float32 corrections by plain or multigrid-preconditioned CG) in C, one
    plane at a time: (n, H, W) CPU planes, returned in float64."""
    out = planes.to(torch.float64, copy=True).contiguous()
    mask = removed.to(torch.uint8).contiguous()  # held: the C call reads its memory
    n, height, width = out.shape
    worst = ctypes.c_double(0.0)
    failed = IMPUTATION_NATIVE.library().impute_planes(
        out.data_ptr(), mask.data_ptr(), n, height, width, tol, _MAX_ROUNDS,
        _MG_MAXITER if multigrid else _maxiter(height, width), _INNER_REDUCTION, int(multigrid),
        _MG_OMEGA, _MG_SWEEPS, _MG_COARSE_SWEEPS, _MG_COARSEST, ctypes.byref(worst),
    )
    if failed < 0:
        raise MemoryError("noisy linear imputation: the C solver could not allocate its work buffers")
    if failed:
        raise RuntimeError(
            f"noisy linear imputation did not converge: residual {worst.value:.3g} > tol {tol:.3g} after "
            f"{_MAX_ROUNDS} refinement rounds"
        )
    return out


def native_usable(x: Tensor, work_dtype: torch.dtype = torch.float32) -> bool:
    """Does :func:`solve_imputation` take the C path for ``x``? (CPU, float32 corrections, library built.)"""
    return x.device.type == "cpu" and work_dtype == torch.float32 and IMPUTATION_NATIVE.library() is not None


def solve_imputation(
    x: Tensor,
    removed: Tensor,
    tol: float = 1e-9,
    work_dtype: torch.dtype = torch.float32,
    chunk_elements: int = _CHUNK_ELEMENTS,
) -> Tensor:
    """Noise-free linear imputation of ``x`` (B, C, H, W) at ``removed`` (B, H, W) pixels.

    Returns (B, C, H, W) in the dtype of ``x`` (the solve runs in float64 with ``work_dtype``
    corrections, one chunk of planes at a time); inputs are assumed validated. ``tol`` bounds
    the max-abs residual of the (unscaled) system per plane.
    """
    batch, channels, height, width = x.shape
    planes = x.reshape(batch * channels, height, width)
    plane_mask = removed.repeat_interleave(channels, dim=0)
    # Large holes (far from every known pixel) go to multigrid-preconditioned CG, the rest to plain CG.
    if _multigrid_fits(height, width):
        deep = _has_deep_hole(removed, _MG_MIN_DEPTH).repeat_interleave(channels)
    else:
        deep = torch.zeros(planes.shape[0], dtype=torch.bool, device=x.device)
    # Planes with similar numbers of unknowns need similar numbers of iterations: solving them
    # in the same chunk wastes fewer iterations on planes that are already done.
    order = torch.argsort(plane_mask.flatten(1).sum(1), stable=True)
    per_chunk = max(1, chunk_elements // ((height + 1) * (width + 1)))
    out = torch.empty_like(planes)
    native = native_usable(x, work_dtype)
    for multigrid in (False, True):
        group = order[deep[order] == multigrid]
        if native and group.numel():
            out[group] = _solve_native(planes[group], plane_mask[group], tol, multigrid).to(x.dtype)
            continue
        for start in range(0, group.numel(), per_chunk):
            idx = group[start : start + per_chunk]
            out[idx] = _solve_chunk(planes[idx].to(torch.float64), plane_mask[idx], tol, work_dtype, multigrid).to(
                x.dtype
            )
    return out.view(batch, channels, height, width)
