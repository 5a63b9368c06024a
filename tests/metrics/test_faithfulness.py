"""noisy_linear_imputation, road_curve, road_aopc (PROTOCOL §3 "ROAD-AOPC")."""

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

from salbench.metrics import noisy_linear_imputation, road_aopc, road_curve
from salbench.metrics import _imputation_solver
from salbench.metrics.protocol import ROAD_PERCENTAGES

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
    curve = road_curve(spy, x, y, maps, percentages=percentages, noise=0.0, batch_size=2)
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
        road_curve(spy, x, y, maps, **kwargs)
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
    curve = road_curve(lenet, x, y, maps, noise=0.0)
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
        ((x, y, maps), {"percentages": (1, 100)}, r"percentage 100 removes all 784 pixels"),
        ((x, y, maps), {"percentages": (-1,)}, r"percentage.*-1"),
        ((x, y, maps), {"batch_size": 0}, r"batch_size.*0"),
        ((x, y, maps), {"noise": math.nan}, r"noise.*nan"),
        ((x, y, maps.clone().fill_(math.inf)), {}, r"maps contains non-finite"),
        ((x[:0], y[:0], maps[:0]), {}, r"x is empty"),
    ]
    for args, kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            road_curve(lenet, *args, **kwargs)


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
