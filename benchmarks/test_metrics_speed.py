"""Speed of the metrics next to their references, on the same inputs (see conftest.py).

The LeNet of PROTOCOL §5 (trained one epoch) on the first 1000 FMNIST test images, except the
224x224 RGB imputation benchmark. Targets (reference time / our time): ROAD >= 20x quantus,
SSIM >= 10x skimage, ROS >= 3x quantus, VG/IG >= 70 % of raw forward+backward throughput,
224x224 imputation >= 10x a per-image scipy spsolve loop.

Issue 13's targets are asserted (:func:`_check_target`): a benchmark below its target fails,
except for the targets in :data:`NOT_REACHED` (the clustered 224x224 imputation; and ROAD, SSIM and
the scattered imputation where the C kernels cannot be built: docs/performance.md says what bounds
each), which are marked xfail with the measured ratio and still fail below their :data:`FLOORS`
entry (a lost vectorisation, a per-image Python loop or a solver that stops converging). The
outputs of our path agree with the reference where the two compute the same thing (VG vs the raw
gradient, SSIM vs skimage, ROS vs quantus's aggregate, imputation vs scipy).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.sparse import csc_matrix
from scipy.sparse.linalg import spsolve

from salbench.metrics import (
    aggregate_ros,
    integrated_gradients,
    noisy_linear_imputation,
    relative_output_stability,
    road_curve,
    ssim,
    vanilla_gradient,
)
from salbench.metrics.protocol import ROAD_NEIGHBOUR_WEIGHTS, ROAD_NOISE, ROAD_PERCENTAGES, SSIM_SIGMAS
from salbench.metrics._imputation_solver import IMPUTATION_NATIVE
from salbench.metrics.stability import SSIM_NATIVE

quantus = pytest.importorskip("quantus")
skimage_metrics = pytest.importorskip("skimage.metrics")

#: The smallest ratio each benchmark must reach (reference time / our time; for VG and IG our
#: throughput / raw forward+backward throughput). Measured on the 2-core machine with a training
#: run on the other core (README "Performance"): ROAD 16.2x, SSIM 7.5x, ROS 4.1x, VG 0.94,
#: IG 0.86, 224x224 imputation 6.3x (scattered) and 1.5x (clustered); with both cores taken by
#: other jobs: 10.8x, 3.9x, 3.9x, 1.0, 0.8, 3.6x and 0.8x. The floors sit at about half of the
#: loaded values, below load noise but above what a lost vectorisation, a per-image Python loop
#: or a solver that stops converging would give.
FLOORS = {
    "road": 5.0,
    "ssim": 2.0,
    "ros": 1.5,
    "vg": 0.5,
    "ig": 0.4,
    "ig_chunked": 1.2,
    "imputation_scattered": 1.5,
    "imputation_clustered": 0.4,
}


#: Targets of issue 13 that this code does not reach on the loaded 2-core CPU machine: below the
#: target the test is marked xfail with the measured ratio (it still fails below its floor).
#: With the C kernels (metrics/imputation_kernel.c, metrics/ssim_kernel.c) only the clustered 224x224
#: imputation stays below its target (6.0x under load ~3, docs/performance.md); their torch paths
#: alone reach none of ROAD, SSIM or the imputation (12.2x, 7.7x, 3.7x / 1.3x under load ~5).
NOT_REACHED = {"imputation_clustered"}
if SSIM_NATIVE.status() != "native":
    NOT_REACHED.add("ssim")
if IMPUTATION_NATIVE.status() == "native":
    # the C solver: ROAD 34.5x, 224x224 imputation 12.3x / 6.0x under load ~3; floors at about half
    FLOORS.update(road=12.0, imputation_scattered=5.0, imputation_clustered=2.5)
else:
    NOT_REACHED |= {"road", "imputation_scattered"}


def _check_floor(ratio: float, key: str) -> None:
    assert ratio >= FLOORS[key], f"{key}: ratio {ratio:.2f} below the floor {FLOORS[key]} (see FLOORS)"


def _check_target(ratio: float, key: str, target: float) -> None:
    """Fail below the floor; below the target, fail too, or xfail for a target in :data:`NOT_REACHED`."""
    _check_floor(ratio, key)
    if ratio < target:
        if key in NOT_REACHED:
            pytest.xfail(f"{key}: measured {ratio:.2f}x, target {target}x not reached (docs/performance.md)")
        raise AssertionError(f"{key}: ratio {ratio:.2f}x below the target {target}x")


def _best(fn: Callable[[], object], rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _timed(benchmark, fn: Callable[[], object], rounds: int) -> float:
    """Run ``fn`` under pytest-benchmark and return the best wall time of its rounds."""
    times: list[float] = []

    def run():
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)

    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=0)
    return min(times)


# ----------------------------------------------------------------------------------------- ROAD


def test_road_vs_quantus(benchmark, record, lenet, fmnist, vg_maps):
    x, y = fmnist
    # v1's stable tie order, as quantus orders pixels (protocol v2's random ties cost one extra permutation)
    ours = _timed(benchmark, lambda: road_curve(lenet, x, y, vg_maps, ties="stable"), rounds=2)
    n_ref = 200  # quantus ROAD costs ~40-55 ms per image: timed on 200 images, scaled to 1000
    metric = quantus.ROAD(
        percentages=list(ROAD_PERCENTAGES), noise=ROAD_NOISE, abs=False, normalise=False, disable_warnings=True
    )

    def reference():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            metric(
                model=lenet,
                x_batch=x[:n_ref].numpy(),
                y_batch=y[:n_ref].numpy(),
                a_batch=vg_maps[:n_ref, None].numpy(),
                device="cpu",
                batch_size=n_ref,  # quantus 0.6.0 only keeps its first internal batch
                channel_first=True,
            )

    ref = _best(reference, rounds=2) * len(x) / n_ref
    ratio = record(
        benchmark, "ROAD, 20 levels, 1000 images vs quantus.ROAD", ours, ref, 20.0,
        reference_note=f"quantus timed on {n_ref} images, scaled x{len(x) // n_ref}",
    )  # fmt: skip
    _check_target(ratio, "road", 20.0)


# ----------------------------------------------------------------------------------------- SSIM


def test_ssim_vs_skimage(benchmark, record, lenet, fmnist, vg_maps):
    x, y = fmnist
    g = torch.Generator().manual_seed(0)
    noisy_maps = [  # attribution passes are not timed
        vanilla_gradient(lenet, (x + s * torch.randn(x.shape, generator=g)).clamp(0, 1), y) for s in SSIM_SIGMAS
    ]
    # as ssim_under_noise calls it: the 8 noisy batches stacked (S, B, H, W), the clean maps' sums shared
    ours = _timed(benchmark, lambda: ssim(vg_maps, torch.stack(noisy_maps)), rounds=5)
    a = vg_maps.numpy()
    bs = [m.numpy() for m in noisy_maps]
    ref_values: list[list[float]] = []

    def reference():
        ref_values[:] = [
            [skimage_metrics.structural_similarity(a[i], b[i], data_range=2, win_size=5) for i in range(len(a))]
            for b in bs
        ]

    ref = _best(reference, rounds=2)
    ratio = record(benchmark, "SSIM, 8 noise levels x 1000 pairs vs skimage loop", ours, ref, 10.0,
                   path=SSIM_NATIVE.status())
    got = ssim(vg_maps, torch.stack(noisy_maps)).double()
    np.testing.assert_allclose(got.numpy(), np.array(ref_values), atol=1e-5)  # PROTOCOL §3: 1e-5
    _check_target(ratio, "ssim", 10.0)


# ------------------------------------------------------------------------------------------ ROS


def _numpy_vg(model, inputs, targets, **kwargs):
    return vanilla_gradient(model, torch.as_tensor(inputs), torch.as_tensor(targets)).numpy()


def test_ros_vs_quantus(benchmark, record, lenet, fmnist, vg_maps):
    x, y = fmnist
    outputs: list[torch.Tensor] = []
    ours = _timed(
        benchmark, lambda: outputs.append(relative_output_stability(lenet, x, y, vanilla_gradient, maps=vg_maps,
                                                                    flips="nan")), 3
    )
    metric = quantus.RelativeOutputStability(nr_samples=5, disable_warnings=True)
    ref_values: list = []

    def reference():
        np.random.seed(0)  # quantus draws its perturbations from numpy's global RNG
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref_values[:] = metric(
                model=lenet,
                x_batch=x.numpy(),
                y_batch=y.numpy(),
                a_batch=vg_maps[:, None].numpy(),
                explain_func=_numpy_vg,  # the same VG on both sides
                softmax=False,
                device="cpu",
                batch_size=len(x),
            )

    ref = _best(reference, rounds=3)
    ratio = record(benchmark, "ROS (VG), 5 samples, 1000 images vs quantus", ours, ref, 3.0)
    # the same quantity under different random draws: the aggregates agree (as in tests/metrics)
    log_mean, nan_fraction = aggregate_ros(outputs[-1])
    ref_arr = np.asarray(ref_values, dtype=np.float64)
    assert log_mean == pytest.approx(np.log10(np.nanmean(ref_arr)), abs=0.08)
    assert nan_fraction == pytest.approx(np.isnan(ref_arr).mean(), abs=0.05)
    _check_target(ratio, "ros", 3.0)


# ------------------------------------------------------------------------ attribution throughput


def _raw_forward_backward(model, x, y):
    xr = x.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(xr).gather(1, y[:, None]).sum(), xr)
    return grad


def test_vanilla_gradient_throughput(benchmark, record, lenet, fmnist):
    x, y = fmnist
    maps: list[torch.Tensor] = []
    ours = _timed(benchmark, lambda: maps.append(vanilla_gradient(lenet, x, y)), rounds=5)
    raw = _best(lambda: _raw_forward_backward(lenet, x, y), rounds=5)
    ratio = record(benchmark, "VG throughput vs raw fwd+bwd (batch 1000)", ours, raw, 0.7)
    benchmark.extra_info["images_per_s"] = len(x) / ours
    benchmark.extra_info["raw_images_per_s"] = len(x) / raw
    _check_target(ratio, "vg", 0.7)  # the ratio is throughput(VG) / throughput(raw)
    # the timed path computes the raw gradient (one channel: VG = |gradient|)
    torch.testing.assert_close(maps[-1], _raw_forward_backward(lenet, x, y).abs().sum(1), rtol=1e-5, atol=1e-7)


def test_integrated_gradients_throughput(benchmark, record, lenet, fmnist):
    x, y = fmnist
    n, steps = 100, 50  # 100 images x 50 steps = 5000 path points per pass
    maps: list[torch.Tensor] = []
    ours = _timed(benchmark, lambda: maps.append(integrated_gradients(lenet, x[:n], y[:n], n_steps=steps)), rounds=3)
    xs, ys = x[:n].repeat_interleave(steps, 0), y[:n].repeat_interleave(steps, 0)  # the same batch size
    raw = _best(lambda: _raw_forward_backward(lenet, xs, ys), rounds=3)
    ratio = record(benchmark, "IG(50) throughput vs raw fwd+bwd (5000 points)", ours, raw, 0.7)
    benchmark.extra_info["path_points_per_s"] = n * steps / ours
    benchmark.extra_info["raw_images_per_s"] = n * steps / raw
    _check_target(ratio, "ig", 0.7)
    # the timed path is a complete IG: the maps sum to the logit gap from the black image (completeness)
    with torch.no_grad():
        gap = (lenet(x[:n]) - lenet(torch.zeros_like(x[:n]))).gather(1, y[:n, None]).squeeze(1)
    assert ((maps[-1].sum((1, 2)) - gap).abs() <= 0.05 * gap.abs() + 1e-3).float().mean() > 0.9


def test_integrated_gradients_vs_captum_one_call(benchmark, record, lenet, fmnist):
    """A scoring batch of IG (250 images x 50 steps = 12 500 path points) vs captum
    ``IntegratedGradients.attribute`` on the same inputs, which evaluates all points in one model
    call; ours computes their gradients in cache-sized chunks (``IG_CPU_CHUNK_ELEMENTS``)."""
    from captum.attr import IntegratedGradients

    x, y = fmnist
    n = 250
    maps: list[torch.Tensor] = []
    ours = _timed(benchmark, lambda: maps.append(integrated_gradients(lenet, x[:n], y[:n])), rounds=3)
    ref_maps: list[torch.Tensor] = []
    ref = _best(lambda: ref_maps.append(IntegratedGradients(lenet).attribute(
        x[:n], baselines=0, target=y[:n], n_steps=50, method="gausslegendre").sum(1)), rounds=3)
    ratio = record(benchmark, "IG(50), 250 images: chunked gradients vs captum's one call", ours, ref, 1.0,
                   identical_maps=bool(torch.equal(maps[-1], ref_maps[-1])))
    assert torch.equal(maps[-1], ref_maps[-1])  # the chunking changes the speed only
    _check_floor(ratio, "ig_chunked")


# ----------------------------------------------------------------------- 224x224 RGB imputation


def _order_masks(scores: torch.Tensor) -> torch.Tensor:
    """(B, H, W) scores -> (B * L, H, W) masks of the 20 ROAD levels (top-k, stable)."""
    b, h, w = scores.shape
    n = h * w
    order = torch.sort(scores.reshape(b, -1), dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(n).expand(b, n))
    k = torch.tensor([int(n * p / 100) for p in ROAD_PERCENTAGES])
    return (rank[:, None, :] < k[None, :, None]).reshape(b * len(k), h, w)


def _scores(kind: str, n_images: int, size: int = 224) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    if kind == "scattered":  # noisy, VG-like maps: removed pixels spread over the image
        return torch.rand(n_images, size, size, generator=g)
    field = torch.randn(n_images, 1, size, size, generator=g)  # smooth maps: large blobs
    kernel = torch.exp(-torch.arange(-15, 16.0) ** 2 / (2 * 6.0**2))
    kernel = kernel / kernel.sum()
    field = F.conv2d(field, kernel.view(1, 1, 1, -1), padding=(0, 15))
    field = F.conv2d(field, kernel.view(1, 1, -1, 1), padding=(15, 0))
    return field[:, 0]


def _scipy_imputation(x: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """One image (C, H, W), one mask: the sparse system built with numpy, solved by spsolve."""
    channels, height, width = x.shape
    idx = np.flatnonzero(removed)
    k = len(idx)
    var = -np.ones(height * width, dtype=np.int64)
    var[idx] = np.arange(k)
    r, c = np.divmod(idx, width)
    flat = x.reshape(channels, -1)
    diag, rhs = np.zeros(k), np.zeros((k, channels))
    rows, cols, vals = [], [], []
    for dy, dx, w in ROAD_NEIGHBOUR_WEIGHTS:
        rr, cc = r + dy, c + dx
        ok = (rr >= 0) & (rr < height) & (cc >= 0) & (cc < width)
        diag[ok] += w
        nb = rr[ok] * width + cc[ok]
        src = np.arange(k)[ok]
        unknown = var[nb] >= 0
        rows.append(src[unknown])
        cols.append(var[nb[unknown]])
        vals.append(np.full(int(unknown.sum()), -w))
        np.add.at(rhs, src[~unknown], w * flat[:, nb[~unknown]].T)
    a = csc_matrix(
        (np.concatenate([diag, *vals]), (np.concatenate([np.arange(k), *rows]), np.concatenate([np.arange(k), *cols]))),
        shape=(k, k),
    )
    out = flat.copy()
    out[:, idx] = spsolve(a, rhs).reshape(k, channels).T
    return out.reshape(channels, height, width)


_PEAK_SNIPPET = """
import json, sys, torch
sys.path[:0] = {path!r}
torch.set_num_threads(1)
import test_metrics_speed as b
def rss_mib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024
x = torch.rand({n}, 3, 224, 224, generator=torch.Generator().manual_seed(0))
masks = b._order_masks(b._scores({kind!r}, {n}))
stack = x.repeat_interleave(20, 0)
stack64, masks_np = stack.double().numpy(), masks.numpy()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the current resident size
before = rss_mib("VmRSS:")
if {ours}:
    b.noisy_linear_imputation(stack, masks)
else:
    for i in range(len(stack64)):
        b._scipy_imputation(stack64[i], masks_np[i])
print(json.dumps(rss_mib("VmHWM:") - before))
"""


def _peak_mib(kind: str, n: int, ours: bool) -> float | str:
    """Peak resident-memory growth (MiB) of one run in a fresh process (Linux only)."""
    code = _PEAK_SNIPPET.format(path=[str(Path(__file__).parent)], n=n, kind=kind, ours=ours)
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
        return round(json.loads(out.stdout.strip().splitlines()[-1]), 1)
    except (OSError, subprocess.SubprocessError, ValueError, StopIteration) as err:
        return f"n/a ({type(err).__name__})"


@pytest.mark.parametrize("kind", ["scattered", "clustered"])
def test_imputation_224_rgb_vs_scipy(benchmark, record, kind):
    n = 2  # images; each at the 20 ROAD levels: 40 (3, 224, 224) imputations
    x = torch.rand(n, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    masks = _order_masks(_scores(kind, n))
    stack = x.repeat_interleave(len(ROAD_PERCENTAGES), 0)
    ours = _timed(benchmark, lambda: noisy_linear_imputation(stack, masks), rounds=2)
    stack64 = stack.double().numpy()
    masks_np = masks.numpy()

    def reference():
        for i in range(len(stack64)):
            _scipy_imputation(stack64[i], masks_np[i])

    ref = _best(reference, rounds=1)
    check = noisy_linear_imputation(stack[:20], masks[:20], noise=0.0)
    err = max(
        float(np.abs(check[i].double().numpy() - _scipy_imputation(stack64[i], masks_np[i])).max()) for i in (0, 10, 19)
    )
    ratio = record(
        benchmark, f"224x224 RGB imputation, 20 levels ({kind})", ours, ref, 10.0,
        images=n, max_abs_err_vs_scipy=f"{err:.1e}",
        peak_rss_mib_ours=_peak_mib(kind, n, True), peak_rss_mib_scipy=_peak_mib(kind, n, False),
    )  # fmt: skip
    assert err < 1e-5, f"imputation differs from scipy spsolve by {err:.1e} (PROTOCOL §3: 1e-5)"
    _check_target(ratio, f"imputation_{kind}", 10.0)
