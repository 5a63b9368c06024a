"""noisy_linear_imputation, road_curve, road_curves, tied_fraction, road_aopc (PROTOCOL §3 "ROAD-AOPC", §8.1)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.sparse import csr_matrix
from scipy.sparse.linalg import spsolve
from torch import nn

from salbench.metrics import noisy_linear_imputation, road_aopc, road_curve, road_curves, tied_fraction
from salbench.metrics import _imputation_solver
from salbench.metrics.protocol import ROAD_PERCENTAGES, ROAD_TIE_SEED_OFFSET

# ----------------------------------------------------------------- independent scipy reference


def _reference_imputation(x: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """Build the imputation system pixel by pixel and solve it with scipy's sparse LU.

    For a removed pixel i with in-image 8-neighbours N(i) (weight 1/6 edge, 1/12 diagonal):
    ``sum_{j in N(i)} w_ij * v_i - sum_{j in N(i), removed} w_ij v_j = sum_{j in N(i), known} w_ij x_j``.
    x: (C, H, W) float64, removed: (H, W) bool. Returns (C, H, W).
    """
    channels, height, width = x.shape
    unknown = list(zip(*np.nonzero(removed)))
    index = {pix: k for k, pix in enumerate(unknown)}
    rows, cols, vals = [], [], []
    rhs = np.zeros((len(unknown), channels))
    for k, (r, c) in enumerate(unknown):
        total = 0.0
        for dr in (-1, 0, 1):
            for dc in (-1, 0, 1):
                if dr == dc == 0:
                    continue
                rr, cc = r + dr, c + dc
                if not (0 <= rr < height and 0 <= cc < width):
                    continue
                w = 1 / 12 if dr and dc else 1 / 6
                total += w
                if removed[rr, cc]:
                    rows.append(k)
                    cols.append(index[(rr, cc)])
                    vals.append(-w)
                else:
                    rhs[k] += w * x[:, rr, cc]
        rows.append(k)
        cols.append(k)
        vals.append(total)
    out = x.copy()
    if unknown:
        a = csr_matrix((vals, (rows, cols)), shape=(len(unknown),) * 2)
        sol = spsolve(a.tocsc(), rhs).reshape(len(unknown), channels)
        rr, cc = np.nonzero(removed)
        out[:, rr, cc] = sol.T
    return out


def _top_k_mask(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """(B, H, W) bool: the int(H*W*fraction) highest scores of each map (stable, ties by index)."""
    b, h, w = scores.shape
    k = int(h * w * fraction)
    order = torch.sort(scores.reshape(b, -1), dim=1, descending=True, stable=True).indices[:, :k]
    mask = torch.zeros(b, h * w, dtype=torch.bool)
    mask.scatter_(1, order, True)
    return mask.view(b, h, w)


def _smooth_field(shape: tuple[int, int, int], seed: int) -> torch.Tensor:
    """Spatially smooth random maps (B, H, W): their top-k masks are large clustered blobs."""
    g = torch.Generator().manual_seed(seed)
    field = torch.randn(shape[0], 1, *shape[1:], generator=g, dtype=torch.float64)
    kernel = torch.exp(-torch.arange(-12, 13, dtype=torch.float64) ** 2 / (2 * 5.0**2))
    kernel = kernel / kernel.sum()
    field = F.conv2d(field, kernel.view(1, 1, 1, -1), padding=(0, 12))
    field = F.conv2d(field, kernel.view(1, 1, -1, 1), padding=(12, 0))
    return field[:, 0]


def _assert_matches_reference(x: torch.Tensor, mask: torch.Tensor, atol: float = 1e-5) -> None:
    ours = noisy_linear_imputation(x, mask, noise=0.0)
    assert ours.dtype == x.dtype and ours.shape == x.shape
    for i in range(x.shape[0]):
        ref = _reference_imputation(x[i].double().numpy(), mask[i].numpy())
        np.testing.assert_allclose(ours[i].double().numpy(), ref, atol=atol, rtol=0)


# ------------------------------------------------------------------- noisy_linear_imputation


@pytest.fixture(params=["native", "torch"])
def solver_path(request, monkeypatch):
    """CPU solves through the C solver (imputation_kernel.c), and (forced) through the torch path."""
    if request.param == "native":
        if _imputation_solver.IMPUTATION_NATIVE.status() != "native":
            pytest.skip(f"imputation C solver not available: {_imputation_solver.IMPUTATION_NATIVE.status()}")
    else:
        monkeypatch.setattr(_imputation_solver, "native_usable", lambda x, work_dtype=None: False)
    return request.param


@pytest.mark.parametrize("fraction", [0.01, 0.5, 0.96])
def test_imputation_matches_scipy_on_fmnist_with_saliency_masks(fmnist_test, vg_maps, fraction, solver_path):
    x, maps = fmnist_test[0][:6], vg_maps[:6]
    _assert_matches_reference(x, _top_k_mask(maps, fraction))


@pytest.mark.parametrize("fraction", [0.01, 0.3, 0.96])
def test_imputation_matches_scipy_per_channel_on_rgb(fraction, solver_path):
    g = torch.Generator().manual_seed(int(fraction * 100))
    x = torch.rand(3, 3, 32, 32, generator=g, dtype=torch.float64)
    scores = torch.cat([torch.rand(2, 32, 32, generator=g, dtype=torch.float64), _smooth_field((1, 32, 32), 1)])
    _assert_matches_reference(x, _top_k_mask(scores, fraction))


@pytest.mark.parametrize(
    "fraction, clustered",
    [(0.01, False), (0.96, False), (0.6, True), (0.96, True)],
    ids=["1%-scattered", "96%-scattered", "60%-clustered", "96%-clustered"],
)
def test_imputation_matches_scipy_on_224_rgb(fraction, clustered, solver_path):
    g = torch.Generator().manual_seed(5)
    x = torch.rand(1, 3, 224, 224, generator=g)  # float32, as a real image batch
    scores = _smooth_field((1, 224, 224), 2) if clustered else torch.rand(1, 224, 224, generator=g)
    mask = _top_k_mask(scores, fraction)
    # clustered masks hold large holes: these cases run the multigrid-preconditioned solver
    assert bool(_imputation_solver._has_deep_hole(mask, _imputation_solver._MG_MIN_DEPTH)) == clustered
    _assert_matches_reference(x, mask)


def test_multigrid_restriction_is_the_transpose_of_the_interpolation():
    # the V-cycle is a symmetric preconditioner (CG needs one) only if R = P^T
    g = torch.Generator().manual_seed(0)
    u = torch.randn(2, 7, 5, generator=g, dtype=torch.float64)
    v = torch.randn(2, 14, 10, generator=g, dtype=torch.float64)
    lhs = (_imputation_solver._prolong(u) * v).sum()
    rhs = (u * _imputation_solver._restrict(v)).sum()
    assert float(abs(lhs - rhs)) < 1e-12
    # constants are interpolated exactly (replicate border), and R sums to 4 per coarse cell
    assert torch.equal(_imputation_solver._prolong(torch.ones(1, 3, 4)), torch.ones(1, 6, 8))
    torch.testing.assert_close(_imputation_solver._restrict(torch.ones(1, 6, 8)), torch.full((1, 3, 4), 4.0))


def test_multigrid_and_plain_cg_give_the_same_fill(monkeypatch):
    # the solver choice is a speed decision only: both reach the same residual bound
    x = torch.rand(2, 3, 96, 96, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    mask = _top_k_mask(_smooth_field((2, 96, 96), 4), 0.8)
    monkeypatch.setattr(_imputation_solver, "_MG_MIN_SIDE", 64)
    assert _imputation_solver._has_deep_hole(mask, _imputation_solver._MG_MIN_DEPTH).all()
    with_mg = noisy_linear_imputation(x, mask, noise=0.0)
    monkeypatch.setattr(_imputation_solver, "_MG_MIN_SIDE", 10**6)  # plain CG everywhere
    plain = noisy_linear_imputation(x, mask, noise=0.0)
    torch.testing.assert_close(with_mg, plain, atol=1e-6, rtol=0)  # both: residual <= 1e-9


def test_imputation_matches_quantus_function_on_one_channel(fmnist_test, vg_maps):
    perturb = pytest.importorskip("quantus.functions.perturb_func")
    x = fmnist_test[0][:4].double()
    for fraction in (0.01, 0.5, 0.96):
        mask = _top_k_mask(vg_maps[:4], fraction)
        ours = noisy_linear_imputation(x, mask, noise=0.0)
        for i in range(4):
            indices = np.flatnonzero(mask[i].numpy())
            ref = perturb.noisy_linear_imputation(arr=x[i].numpy(), indices=indices, noise=0.0)
            np.testing.assert_allclose(ours[i].numpy(), ref, atol=1e-5, rtol=0)


def test_imputation_hand_cases(solver_path):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 2, 5, 7, generator=g, dtype=torch.float64)
    # nothing removed: unchanged
    none = torch.zeros(2, 5, 7, dtype=torch.bool)
    assert torch.equal(noisy_linear_imputation(x, none, noise=0.0), x)
    assert torch.equal(noisy_linear_imputation(x, none), x)  # noise only touches removed pixels
    # one known pixel: the harmonic fill is constant
    one = torch.ones(2, 5, 7, dtype=torch.bool)
    one[0, 4, 6] = one[1, 0, 3] = False
    # (the solve bounds the residual by 1e-9; with one known pixel the inverse of this 34-unknown
    # system has inf-norm 85, so the fill is constant to a few 1e-8, not to 1e-9)
    out = noisy_linear_imputation(x, one, noise=0.0)
    torch.testing.assert_close(out[0], x[0, :, 4, 6, None, None].expand(2, 5, 7), atol=5e-8, rtol=0)
    torch.testing.assert_close(out[1], x[1, :, 0, 3, None, None].expand(2, 5, 7), atol=5e-8, rtol=0)
    # a single row and a single column image
    for shape in ((1, 1, 1, 9), (1, 1, 9, 1)):
        xs = torch.rand(shape, generator=g, dtype=torch.float64)
        mask = torch.zeros(shape[0], *shape[2:], dtype=torch.bool).flatten(1)
        mask[:, 2:7] = True
        _assert_matches_reference(xs, mask.view(shape[0], *shape[2:]))


@pytest.mark.parametrize(
    "shape, clustered",
    [((40, 1, 28, 28), False), ((12, 3, 32, 32), False), ((6, 2, 17, 23), False), ((4, 1, 1, 9), False),
     ((4, 3, 9, 1), False), ((4, 3, 128, 96), True)],
)
def test_native_solver_agrees_with_the_torch_path(shape, clustered, monkeypatch):
    # the same refinement + CG to the same float64 residual bound (1e-9), in another order: both are
    # within ||A^-1|| * 1e-9 of the exact fill (||A^-1|| up to ~100 on these masks), so they agree
    # to 1e-7 in float64, and in float32 to a couple of ulps
    if _imputation_solver.IMPUTATION_NATIVE.status() != "native":
        pytest.skip(f"imputation C solver not available: {_imputation_solver.IMPUTATION_NATIVE.status()}")
    g = torch.Generator().manual_seed(sum(shape))
    b, c, h, w = shape
    x = torch.rand(shape, generator=g, dtype=torch.float64)
    fractions = torch.linspace(0.0, 0.97, b)
    if clustered:  # large holes: the multigrid-preconditioned solver, in C and in torch
        fractions = torch.linspace(0.5, 0.97, b)
        scores = _smooth_field((b, h, w), 6)
        mask = torch.stack([_top_k_mask(scores[i : i + 1], float(f))[0] for i, f in enumerate(fractions)])
        assert _imputation_solver._has_deep_hole(mask, _imputation_solver._MG_MIN_DEPTH).any()
    else:
        mask = torch.stack([_top_k_mask(torch.rand(1, h, w, generator=g), float(f))[0] for f in fractions])
    assert _imputation_solver.native_usable(x)
    native = noisy_linear_imputation(x, mask, noise=0.0)
    monkeypatch.setattr(_imputation_solver, "native_usable", lambda x, work_dtype=None: False)
    reference = noisy_linear_imputation(x, mask, noise=0.0)
    torch.testing.assert_close(native, reference, atol=1e-7, rtol=0)
    keep = ~mask.unsqueeze(1).expand_as(x)
    assert torch.equal(native[keep], x[keep])  # known pixels untouched
    x32 = x.float()
    monkeypatch.undo()
    diff = (noisy_linear_imputation(x32, mask, noise=0.0) - reference.float()).abs()
    assert float(diff.max()) <= 1.2e-7  # two float32 ulps below 1


def test_native_solver_reports_non_convergence(monkeypatch):
    if _imputation_solver.IMPUTATION_NATIVE.status() != "native":
        pytest.skip(f"imputation C solver not available: {_imputation_solver.IMPUTATION_NATIVE.status()}")
    x = torch.rand(2, 1, 12, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    mask = _top_k_mask(torch.rand(2, 12, 12, generator=torch.Generator().manual_seed(2)), 0.8)
    monkeypatch.setattr(_imputation_solver, "_MAX_ROUNDS", 0)  # no refinement round: nothing converges
    with pytest.raises(RuntimeError, match="did not converge: residual .* after 0 refinement rounds"):
        noisy_linear_imputation(x, mask, noise=0.0)


def test_native_solver_off_switch(monkeypatch):
    # SALBENCH_NATIVE=0 and a float64 working precision take the torch path
    lib = _imputation_solver.IMPUTATION_NATIVE
    monkeypatch.setenv("SALBENCH_NATIVE", "0")
    lib.reset()
    try:
        assert not _imputation_solver.native_usable(torch.zeros(1))
        assert lib.status() == "disabled by SALBENCH_NATIVE=0"
    finally:
        monkeypatch.delenv("SALBENCH_NATIVE")
        lib.reset()
    assert not _imputation_solver.native_usable(torch.zeros(1), torch.float64)


def test_imputation_noise_is_seeded_and_only_on_removed_pixels(fmnist_test, vg_maps):
    x = fmnist_test[0][:50]
    mask = _top_k_mask(vg_maps[:50], 0.5)
    clean = noisy_linear_imputation(x, mask, noise=0.0)
    noisy = noisy_linear_imputation(x, mask, noise=0.01, generator=torch.Generator().manual_seed(4))
    keep = ~mask.unsqueeze(1)
    assert torch.equal(noisy[keep], x[keep])  # known pixels bit-identical
    z = ((noisy - clean) / 0.01)[~keep].double()
    assert z.numel() == 50 * 392
    assert abs(float(z.mean())) < 0.05 and abs(float(z.std()) - 1) < 0.05  # N(0, 1) draws
    again = noisy_linear_imputation(x, mask, noise=0.01, generator=torch.Generator().manual_seed(4))
    assert torch.equal(noisy, again)
    other = noisy_linear_imputation(x, mask, noise=0.01, generator=torch.Generator().manual_seed(5))
    assert not torch.equal(noisy, other)
    default = noisy_linear_imputation(x, mask)  # generator None = fresh generator seeded 0
    assert torch.equal(default, noisy_linear_imputation(x, mask, generator=torch.Generator().manual_seed(0)))


def test_solver_working_precision_does_not_change_the_solution(fmnist_test, vg_maps):
    from salbench.metrics._imputation_solver import solve_imputation

    x = fmnist_test[0][:8]
    mask = _top_k_mask(vg_maps[:8], 0.9)
    torch.testing.assert_close(
        solve_imputation(x.double(), mask, work_dtype=torch.float32),
        solve_imputation(x.double(), mask, work_dtype=torch.float64),
        atol=1e-8,
        rtol=0,
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_imputation_on_cuda_matches_cpu():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 40, 40, generator=g)
    mask = torch.rand(4, 40, 40, generator=g) < 0.8
    out = noisy_linear_imputation(x.cuda(), mask.cuda(), noise=0.0)
    assert out.is_cuda
    torch.testing.assert_close(out.cpu(), noisy_linear_imputation(x, mask, noise=0.0), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "x, mask, kwargs, match",
    [
        (
            torch.rand(2, 1, 8, 8),
            torch.zeros(2, 8, 7, dtype=torch.bool),
            {},
            r"mask must have shape.*\(2, 8, 8\).*\(2, 8, 7\)",
        ),
        (torch.rand(2, 1, 8, 8), torch.zeros(3, 8, 8, dtype=torch.bool), {}, r"mask must have shape.*\(3, 8, 8\)"),
        (torch.rand(2, 1, 8, 8), torch.zeros(2, 1, 8, 8, dtype=torch.bool), {}, r"mask must have shape \(B, H, W\)"),
        (torch.rand(2, 1, 8, 8), torch.zeros(2, 8, 8), {}, r"bool.*float32"),
        (torch.rand(1, 8, 8), torch.zeros(1, 8, 8, dtype=torch.bool), {}, r"x must have shape \(B, C, H, W\)"),
        (torch.rand(0, 1, 8, 8), torch.zeros(0, 8, 8, dtype=torch.bool), {}, r"x is empty"),
        (torch.full((1, 1, 8, 8), math.nan), torch.zeros(1, 8, 8, dtype=torch.bool), {}, r"x contains non-finite"),
        (
            torch.rand(2, 1, 8, 8),
            torch.ones(2, 8, 8, dtype=torch.bool),
            {},
            r"removes every pixel of image\(s\) \[0, 1\]",
        ),
        (torch.rand(1, 1, 8, 8), torch.zeros(1, 8, 8, dtype=torch.bool), {"noise": -0.1}, r"noise.*-0.1"),
    ],
)
def test_imputation_bad_input(x, mask, kwargs, match):
    with pytest.raises(ValueError, match=match):
        noisy_linear_imputation(x, mask, **kwargs)


# ---------------------------------------------------------------------------------- road_curve


class _Spy(nn.Module):
    """Records its inputs; predicts class 0 when the image mean is above a threshold."""

    def __init__(self, threshold: float = 0.5):
        super().__init__()
        self.threshold = threshold
        self.seen: list[torch.Tensor] = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        m = x.flatten(1).mean(1, keepdim=True)
        return torch.cat([m - self.threshold, self.threshold - m], dim=1)


def test_road_curve_removes_the_top_k_pixels_with_stable_ties():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 2, 10, 10, generator=g, dtype=torch.float64)
    maps = torch.randint(0, 4, (3, 10, 10), generator=g).double()  # many ties
    maps[2] = 1.0  # all tied: pixels go in raster order
    percentages = (1, 5, 33, 99)
    spy = _Spy()
    y = torch.tensor([0, 1, 0])
    curve = road_curve(spy, x, y, maps, percentages=percentages, noise=0.0, batch_size=2, ties="stable")
    assert curve.shape == (3, 4) and curve.dtype == torch.bool
    seen = torch.cat(spy.seen).view(3, 4, 2, 10, 10)
    for j, p in enumerate(percentages):
        k = int(100 * p / 100)
        flat = maps.flatten(1)
        expected = torch.zeros(3, 100, dtype=torch.bool)
        for i in range(3):  # by hand: highest value first, then lower pixel index
            ranked = sorted(range(100), key=lambda q: (-float(flat[i, q]), q))[:k]
            expected[i, ranked] = True
        expected = expected.view(3, 10, 10)
        assert torch.equal(seen[:, j], noisy_linear_imputation(x, expected, noise=0.0))
        if p == 33:
            assert torch.equal(expected[2].flatten()[:33], torch.ones(33, dtype=torch.bool))
        means = seen[:, j].flatten(1).mean(1)
        assert torch.equal(curve[:, j], torch.where(means > 0.5, 0, 1) == y)


def test_road_curve_default_levels_and_noise_are_seeded_per_image(fmnist_test, vg_maps):
    # v1's order (ties="stable") so that the masks can be rebuilt by _top_k_mask; the noise does not
    # depend on the tie mode (test_random_ties_use_the_same_noise_draws_as_stable_ties)
    x, maps = fmnist_test[0][:5], vg_maps[:5]
    y = torch.zeros(5, dtype=torch.long)
    runs = {}
    for name, kwargs in {
        "default": {},
        "seed0_chunk2": {"generator": torch.Generator().manual_seed(0), "batch_size": 2},
        "seed0_chunk1": {"generator": torch.Generator().manual_seed(0), "batch_size": 1},
        "seed1": {"generator": torch.Generator().manual_seed(1)},
    }.items():
        spy = _Spy()
        road_curve(spy, x, y, maps, ties="stable", **kwargs)
        runs[name] = torch.cat(spy.seen)
    assert runs["default"].shape == (5 * len(ROAD_PERCENTAGES), 1, 28, 28)
    assert torch.equal(runs["default"], runs["seed0_chunk2"])  # None = seed 0, any chunking
    assert torch.equal(runs["default"], runs["seed0_chunk1"])
    assert not torch.equal(runs["default"], runs["seed1"])
    masks = torch.stack([_top_k_mask(maps, p / 100) for p in ROAD_PERCENTAGES], dim=1).view(-1, 1, 28, 28)
    clean = torch.cat([noisy_linear_imputation(x, _top_k_mask(maps, p / 100), noise=0.0) for p in ROAD_PERCENTAGES])
    clean = clean.view(len(ROAD_PERCENTAGES), 5, 1, 28, 28).transpose(0, 1).reshape(-1, 1, 28, 28)
    diff = (runs["default"] - clean) / 0.01
    assert torch.equal(diff != 0, masks)  # noise on the removed pixels only ...
    assert 0.9 < float(diff[masks].std()) < 1.1  # ... 0.01 N(0, 1)


def test_road_curve_classifies_in_cpu_sized_calls_with_the_same_result(lenet, fmnist_test, vg_maps, monkeypatch):
    import salbench.metrics.faithfulness as faithfulness

    x, y, maps = fmnist_test[0][:6], fmnist_test[1][:6], vg_maps[:6]
    whole = road_curve(lenet, x, y, maps, batch_size=6)
    calls = []
    handle = lenet.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    try:
        monkeypatch.setattr(faithfulness, "_CPU_FORWARD_ELEMENTS", 7 * 28 * 28)
        split = road_curve(lenet, x, y, maps, batch_size=6)
    finally:
        handle.remove()
    assert calls == [7] * 17 + [120 - 17 * 7]  # 6 images x 20 levels, 7 per call
    assert torch.equal(split, whole)


def test_road_curve_is_the_same_with_the_native_solver(lenet, fmnist_test, vg_maps, monkeypatch):
    # the stored ROAD values were computed with the torch solver: the C solver keeps every one
    # (benchmarks/road_native_equivalence.py checks the whole set of zoo models)
    if _imputation_solver.IMPUTATION_NATIVE.status() != "native":
        pytest.skip(f"imputation C solver not available: {_imputation_solver.IMPUTATION_NATIVE.status()}")
    x, y, maps = fmnist_test[0][:100], fmnist_test[1][:100], vg_maps[:100]
    native = road_curve(lenet, x, y, maps)
    monkeypatch.setattr(_imputation_solver, "native_usable", lambda x, work_dtype=None: False)
    assert torch.equal(native, road_curve(lenet, x, y, maps))


# ------------------------------------------------------------------- tie order (PROTOCOL §8.1)


def test_tied_fraction_hand_cases():
    maps = torch.tensor(
        [
            [[0.0, 0.0, 1.0], [2.0, 3.0, 4.0]],  # two tied zeros of six pixels
            [[5.0, 5.0, 5.0], [5.0, 5.0, 5.0]],  # constant: every pixel tied
            [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]],  # distinct: none
            [[-0.0, 0.0, 7.0], [7.0, 7.0, -1.0]],  # -0.0 == 0.0, and three 7s: five of six
        ]
    )
    out = tied_fraction(maps)
    assert out.dtype == torch.float64 and out.shape == (4,)
    torch.testing.assert_close(out, torch.tensor([2 / 6, 1.0, 0.0, 5 / 6], dtype=torch.float64), rtol=0, atol=0)
    assert float(tied_fraction(torch.ones(1, 1, 1))) == 0.0  # one pixel: no other pixel to share with
    g = torch.Generator().manual_seed(0)
    assert float(tied_fraction(torch.rand(3, 16, 16, generator=g, dtype=torch.float64)).max()) == 0.0
    assert torch.equal(tied_fraction(torch.zeros(2, 5, 7)), torch.ones(2, dtype=torch.float64))


def test_tied_fraction_matches_counting_on_real_maps(vg_maps, ig_maps):
    # IG is exactly 0 wherever the image is 0 (FMNIST backgrounds): many ties; VG far fewer
    for maps in (vg_maps[:20], ig_maps[:20]):
        flat = maps.flatten(1)
        by_count = torch.tensor(
            [float(sum(int((row == v).sum()) > 1 for v in row)) / row.numel() for row in flat], dtype=torch.float64
        )
        torch.testing.assert_close(tied_fraction(maps), by_count, rtol=0, atol=0)
    assert float(tied_fraction(ig_maps[:20]).mean()) > 0.2


@pytest.mark.parametrize(
    "maps, match",
    [
        (torch.zeros(2, 1, 4, 4), r"maps must have shape \(B, H, W\)"),
        (torch.zeros(0, 4, 4), r"maps is empty"),
        (torch.zeros(2, 4, 4, dtype=torch.long), r"floating-point.*int64"),
        (torch.full((1, 4, 4), math.nan), r"maps contains non-finite"),
    ],
)
def test_tied_fraction_bad_input(maps, match):
    with pytest.raises(ValueError, match=match):
        tied_fraction(maps)


def _removed_by_spy(spy: _Spy, x: torch.Tensor, levels: int) -> torch.Tensor:
    """(B, L, H, W) removed pixels, read off the images a noise-free ROAD run classified: a removed
    pixel of these test images never keeps its exact value after imputation."""
    seen = torch.cat(spy.seen).view(x.shape[0], levels, *x.shape[1:])
    return (seen != x.unsqueeze(1)).any(dim=2)


def _tied_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    x = torch.rand(4, 1, 8, 8, generator=g, dtype=torch.float64) * 0.8 + 0.1
    maps = torch.randint(0, 3, (4, 8, 8), generator=g).double()  # three values: many ties
    maps[3] = torch.arange(64.0).view(8, 8)  # image 3 has no ties
    y = torch.tensor([0, 1, 0, 1])
    return x, y, maps


def test_random_ties_replay_the_protocol_by_hand():
    # PROTOCOL §8.1: per image, seed_i = the i-th of B draws of randint(0, 2^62) from the generator (the
    # noise seeds); its permutation = randperm(H W) of a generator seeded seed_i + ROAD_TIE_SEED_OFFSET;
    # pixels by decreasing value, equal values in the permutation's order
    x, y, maps = _tied_case()
    percentages = (10, 30, 50, 90)
    spy = _Spy()
    road_curve(spy, x, y, maps, percentages=percentages, noise=0.0, generator=torch.Generator().manual_seed(5))
    got = _removed_by_spy(spy, x, len(percentages))
    seeds = torch.randint(0, 2**62, (4,), generator=torch.Generator().manual_seed(5)).tolist()
    for i, seed in enumerate(seeds):
        perm = torch.randperm(64, generator=torch.Generator().manual_seed(seed + ROAD_TIE_SEED_OFFSET)).tolist()
        position = {p: j for j, p in enumerate(perm)}
        ranked = sorted(range(64), key=lambda q: (-float(maps[i].flatten()[q]), position[q]))
        for j, p in enumerate(percentages):
            expected = torch.zeros(64, dtype=torch.bool)
            expected[ranked[: int(64 * p / 100)]] = True
            assert torch.equal(got[i, j].flatten(), expected), (i, p)


def test_random_ties_are_seeded_reproducible_and_differ_from_stable_only_on_ties():
    x, y, maps = _tied_case()
    percentages = (10, 30, 50, 90)
    removed = {}
    for name, kwargs in {
        "random": {},
        "random_again": {"batch_size": 1},
        "random_seed1": {"generator": torch.Generator().manual_seed(1)},
        "stable": {"ties": "stable"},
    }.items():
        spy = _Spy()
        kwargs.setdefault("generator", torch.Generator().manual_seed(0))
        road_curve(spy, x, y, maps, percentages=percentages, noise=0.0, **kwargs)
        removed[name] = _removed_by_spy(spy, x, len(percentages))
    assert torch.equal(removed["random"], removed["random_again"])  # seeded, and batch_size does not matter
    assert not torch.equal(removed["random"][:3], removed["random_seed1"][:3])  # another seed, another order
    assert not torch.equal(removed["random"][:3], removed["stable"][:3])  # tied maps: another order than v1's
    for r in ("random", "random_seed1"):
        assert torch.equal(removed[r][3], removed["stable"][3])  # the tie-free map: v1's order
        # the order only breaks ties: every removed pixel is worth at least every kept one
        for i in range(4):
            for j in range(len(percentages)):
                gone, kept = maps[i][removed[r][i, j]], maps[i][~removed[r][i, j]]
                assert float(gone.min()) >= float(kept.max())
                assert int(removed[r][i, j].sum()) == int(64 * percentages[j] / 100)


def test_random_ties_equal_stable_ties_on_a_map_without_ties(lenet, fmnist_test):
    x, y = fmnist_test[0][:8], fmnist_test[1][:8]
    maps = torch.rand(8, 28, 28, generator=torch.Generator().manual_seed(2), dtype=torch.float64).float()
    assert float(tied_fraction(maps).max()) == 0.0
    a = road_curve(lenet, x, y, maps, generator=torch.Generator().manual_seed(3))
    b = road_curve(lenet, x, y, maps, generator=torch.Generator().manual_seed(3), ties="stable")
    assert torch.equal(a, b)


def test_random_ties_use_the_same_noise_draws_as_stable_ties():
    # the tie permutation comes from its own generator: the imputation noise of every image and level
    # is the same draw in both modes (only the removed pixels differ)
    x, y, maps = _tied_case()
    percentages = (30, 60)
    noise = 0.01
    eps = {}
    for ties in ("random", "stable"):
        spy, clean_spy = _Spy(), _Spy()
        road_curve(spy, x, y, maps, percentages=percentages, noise=noise, generator=torch.Generator().manual_seed(4),
                   ties=ties)
        road_curve(clean_spy, x, y, maps, percentages=percentages, noise=0.0,
                   generator=torch.Generator().manual_seed(4), ties=ties)
        mask = _removed_by_spy(clean_spy, x, len(percentages))
        diff = (torch.cat(spy.seen) - torch.cat(clean_spy.seen)).view(4, len(percentages), 1, 8, 8) / noise
        eps[ties] = (diff, mask)
    (d_r, m_r), (d_s, m_s) = eps["random"], eps["stable"]
    both = (m_r & m_s).unsqueeze(2)
    assert int(both.sum()) > 50 and not torch.equal(m_r, m_s)
    torch.testing.assert_close(d_r[both], d_s[both], rtol=0, atol=1e-9)  # float64: rounding of the division only


class _CountingSpy(_Spy):
    def __init__(self):
        super().__init__()
        self.images = 0

    def forward(self, x):
        self.images += x.shape[0]
        return super().forward(x)


@pytest.mark.parametrize("which", ["vg", "ig"])
def test_road_curves_equal_separate_road_curve_calls(which, lenet, fmnist_test, vg_maps, ig_maps):
    # same generator seed, same platform, same solver and model: exact equality is the designed
    # property (the pairs computed once are the same problems, with the same noise draw)
    n = 12
    x, y = fmnist_test[0][:n], fmnist_test[1][:n]
    maps = (vg_maps if which == "vg" else ig_maps)[:n]
    both = road_curves(lenet, x, y, maps, generator=torch.Generator().manual_seed(6), batch_size=5)
    assert list(both) == ["random", "stable"]
    for ties in ("random", "stable"):
        alone = road_curve(lenet, x, y, maps, generator=torch.Generator().manual_seed(6), ties=ties)
        assert both[ties].shape == (n, len(ROAD_PERCENTAGES)) and both[ties].dtype == torch.bool
        assert torch.equal(both[ties], alone), ties
    swapped = road_curves(lenet, x, y, maps, generator=torch.Generator().manual_seed(6), ties=("stable", "random"))
    assert list(swapped) == ["stable", "random"]
    assert all(torch.equal(swapped[k], both[k]) for k in both)
    one = road_curves(lenet, x, y, maps, generator=torch.Generator().manual_seed(6), ties=("stable",))
    assert list(one) == ["stable"] and torch.equal(one["stable"], both["stable"])


def test_road_curves_compute_shared_pairs_once(fmnist_test, ig_maps):
    # every (image, level) once, plus the pairs whose removed pixels differ between the two orders
    x, maps = fmnist_test[0][:6], ig_maps[:6]
    y = torch.zeros(6, dtype=torch.long)
    levels = len(ROAD_PERCENTAGES)
    masks = {}
    for ties in ("random", "stable"):
        spy = _Spy()
        road_curve(spy, x, y, maps, noise=0.0, ties=ties)
        masks[ties] = _removed_by_spy(spy, x, levels)
    differ = int((masks["random"] != masks["stable"]).flatten(2).any(2).sum())
    assert 0 < differ < 6 * levels  # IG ties: the high levels differ, the low ones do not
    spy = _CountingSpy()
    road_curves(spy, x, y, maps)
    assert spy.images == 6 * levels + differ
    spy = _CountingSpy()
    distinct = torch.rand(6, 28, 28, generator=torch.Generator().manual_seed(0))
    road_curves(spy, x, y, distinct)
    assert spy.images == 6 * levels  # no ties: nothing is computed twice


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_road_curves_on_cuda_with_a_cuda_generator():
    # the tie permutations are drawn on the generator's device; results stay on the inputs' device
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 3)).cuda()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(5, 1, 8, 8, generator=g).cuda()
    y = torch.tensor([0, 1, 2, 0, 1]).cuda()
    maps = torch.randint(0, 3, (5, 8, 8), generator=g).float().cuda()
    both = road_curves(model, x, y, maps, generator=torch.Generator(device="cuda").manual_seed(2))
    for ties, curve in both.items():
        assert curve.is_cuda and curve.dtype == torch.bool
        alone = road_curve(model, x, y, maps, generator=torch.Generator(device="cuda").manual_seed(2), ties=ties)
        assert torch.equal(curve, alone)
    assert tied_fraction(maps).is_cuda


def _quantus_road_accuracy(model, x, y, maps, noise: float) -> np.ndarray:
    quantus = pytest.importorskip("quantus")
    metric = quantus.ROAD(
        percentages=list(ROAD_PERCENTAGES), noise=noise, abs=False, normalise=False, disable_warnings=True
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # quantus 0.6.0 keeps only its first internal batch: one batch covering every image
        scores = metric(
            model=model,
            x_batch=x.numpy(),
            y_batch=y.numpy(),
            a_batch=maps[:, None].numpy(),
            device="cpu",
            batch_size=len(x),
            channel_first=True,
        )
    return np.array([scores[p] for p in ROAD_PERCENTAGES], dtype=np.float64)


def _aopc(acc: np.ndarray) -> float:
    return float(np.sum(acc[0] - acc) / (len(acc) + 1))


def test_road_matches_quantus_without_noise(lenet, fmnist_test, vg_maps):
    x, y, maps = fmnist_test[0][:100], fmnist_test[1][:100], vg_maps[:100]
    ref = _quantus_road_accuracy(lenet, x, y, maps, noise=0.0)
    curve = road_curve(lenet, x, y, maps, noise=0.0, ties="stable")  # v1's order, as quantus
    acc = curve.double().mean(0).numpy()
    # same system, same order (VG ties are zeros at the end of the order): the same curve,
    # up to an image whose prediction sits on a knife edge
    np.testing.assert_allclose(acc, ref, atol=1.5 / len(x), rtol=0)
    assert road_aopc(curve) == pytest.approx(_aopc(ref), abs=0.005)
    assert ref[0] - ref[-1] > 0.1  # the curve is not flat: the test has teeth


def test_road_aopc_agrees_statistically_with_quantus(lenet, fmnist_test, vg_maps):
    x, y, maps = fmnist_test[0][:200], fmnist_test[1][:200], vg_maps[:200]
    np.random.seed(0)  # quantus draws its imputation noise from numpy's global RNG
    ref = _aopc(_quantus_road_accuracy(lenet, x, y, maps, noise=0.01))
    ours = road_aopc(road_curve(lenet, x, y, maps))
    assert ours == pytest.approx(ref, abs=0.02)


def test_road_curve_bad_input(lenet, fmnist_test, vg_maps):
    x, y, maps = fmnist_test[0][:3], fmnist_test[1][:3], vg_maps[:3]
    cases = [
        ((x, y, maps[:2]), {}, r"maps must have shape \(B, H, W\) = \(3, 28, 28\).*\(2, 28, 28\)"),
        ((x, y[:2], maps), {}, r"batch size mismatch"),
        ((x, y, maps.unsqueeze(1)), {}, r"maps must have shape \(B, H, W\)"),
        ((x, y, maps), {"percentages": ()}, r"percentages is empty"),
        ((x, y, maps), {"percentages": (1, 100)}, r"percentage.*\[1, 100\).*got 100; 100% removes all 784 pixels"),
        ((x, y, maps), {"percentages": (-1,)}, r"percentage.*-1"),
        ((x, y, maps), {"batch_size": 0}, r"batch_size.*0"),
        ((x, y, maps), {"noise": math.nan}, r"noise.*nan"),
        ((x, y, maps.clone().fill_(math.inf)), {}, r"maps contains non-finite"),
        ((x[:0], y[:0], maps[:0]), {}, r"x is empty"),
        ((x, y, maps), {"ties": "sorted"}, r"ties must be one of \('random', 'stable'\), got 'sorted'"),
        ((x, y, maps), {"ties": None}, r"ties must be one of.*None"),
    ]
    for args, kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            road_curve(lenet, *args, **kwargs)
    for ties, match in [((), r"non-empty sequence"), ("random", r"non-empty sequence.*'random'"),
                        (("random", "lexical"), r"ties must be one of.*'lexical'")]:
        with pytest.raises(ValueError, match=match):
            road_curves(lenet, x, y, maps, ties=ties)
    with pytest.raises(ValueError, match=r"maps must have shape \(B, H, W\)"):
        road_curves(lenet, x, y, maps[:2])


# ---------------------------------------------------------------------------------- road_aopc


def test_road_aopc_hand_computed():
    curve = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    # acc = (0.75, 0.5, 0.5, 0.25): (0 + 0.25 + 0.25 + 0.5) / 5
    assert road_aopc(curve) == pytest.approx(0.2)
    assert road_aopc(curve.double()) == pytest.approx(0.2)
    # the reference is the first level: a curve that rises gives a negative score
    assert road_aopc(torch.tensor([[False, True]])) == pytest.approx(-1 / 3)


@pytest.mark.parametrize(
    "curve, match",
    [
        (torch.ones(4, dtype=torch.bool), r"curve must have shape \(B, L\)"),
        (torch.ones(0, 20, dtype=torch.bool), r"curve is empty"),
        (torch.tensor([[1.0, math.nan]]), r"NaN or inf"),
    ],
)
def test_road_aopc_bad_input(curve, match):
    with pytest.raises(ValueError, match=match):
        road_aopc(curve)
