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
"""

from __future__ import annotations

import torch
from torch import Tensor

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


def _solve_chunk(planes: Tensor, removed: Tensor, tol: float, work_dtype: torch.dtype) -> Tensor:
    """Exact fill of (n, H, W) float64 planes whose ``removed`` (n, H, W) pixels are unknown."""
    n, height, width = planes.shape
    layout = _Layout(height, width)
    mask = layout.body(layout.embed(removed.to(planes.dtype)), n)
    known = planes * ~removed
    rhs = layout.stencil(layout.embed(known), n).mul_(mask)
    diag = layout.stencil(layout.embed(torch.ones_like(planes[:1])), 1) * mask
    scaled_tol = tol * _SCALE
    maxiter = 20 * (height + width) + 100
    mask_w, diag_w = mask.to(work_dtype), diag.to(work_dtype)
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
    # Planes with similar numbers of unknowns need similar numbers of iterations: solving them
    # in the same chunk wastes fewer iterations on planes that are already done.
    order = torch.argsort(plane_mask.flatten(1).sum(1), stable=True)
    per_chunk = max(1, chunk_elements // ((height + 1) * (width + 1)))
    out = torch.empty_like(planes)
    for start in range(0, planes.shape[0], per_chunk):
        idx = order[start : start + per_chunk]
        out[idx] = _solve_chunk(planes[idx].to(torch.float64), plane_mask[idx], tol, work_dtype).to(x.dtype)
    return out.view(batch, channels, height, width)
