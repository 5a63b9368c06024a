"""ssim, ssim_under_noise, relative_output_stability, ros_variants, aggregate_ros (PROTOCOL §3, §8)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from salbench.metrics import (
    SSIMUnderNoise,
    aggregate_ros,
    integrated_gradients,
    relative_output_stability,
    ros_variants,
    ssim,
    ssim_under_noise,
    vanilla_gradient,
)
from salbench import metrics as metrics_pkg
from salbench.metrics.protocol import ROS_FLOOR_FRACTION, SSIM_SIGMAS

skimage_metrics = pytest.importorskip("skimage.metrics")


def _scale_free(m: torch.Tensor) -> torch.Tensor:
    """Each (H, W) map divided by its own max|map| (PROTOCOL §8.2), computed independently here."""
    return m / m.abs().amax(dim=(-2, -1), keepdim=True)


def _skimage_ssim(a: torch.Tensor, b: torch.Tensor, data_range=2.0, win_size=5) -> torch.Tensor:
    return torch.tensor(
        [
            skimage_metrics.structural_similarity(ai.numpy(), bi.numpy(), data_range=data_range, win_size=win_size)
            for ai, bi in zip(a, b)
        ],
        dtype=torch.float64,
    )


# --------------------------------------------------------------------------------------- ssim


@pytest.fixture(params=["native", "torch"])
def ssim_path(request, monkeypatch):
    """float32 CPU maps through the C kernel, and (forced) through the torch path."""
    from salbench.metrics import stability

    if request.param == "native":
        if stability.SSIM_NATIVE.status() != "native":
            pytest.skip(f"SSIM C kernel not available: {stability.SSIM_NATIVE.status()}")
    else:
        monkeypatch.setattr(stability, "_native_ssim_ok", lambda a, bs: False)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(6, 28, 28), (3, 17, 23), (2, 5, 5), (2, 64, 40)])
def test_ssim_matches_skimage_on_random_maps(dtype, shape, ssim_path):
    g = torch.Generator().manual_seed(sum(shape))
    a = torch.randn(shape, generator=g, dtype=dtype)
    b = a + 0.5 * torch.randn(shape, generator=g, dtype=dtype)
    ours = ssim(a, b)
    assert ours.dtype == dtype and ours.shape == (shape[0],)
    torch.testing.assert_close(ours.double(), _skimage_ssim(a, b), atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ssim_matches_skimage_on_real_saliency_maps(dtype, lenet, fmnist_test, vg_maps, ig_maps, ssim_path):
    x, y = fmnist_test[0][:40], fmnist_test[1][:40]
    noisy = (x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    pairs = [
        (vg_maps[:40], vanilla_gradient(lenet, noisy, y)),
        (ig_maps[:40], ig_maps[40:80]),  # different images: low similarity
        (vg_maps[:40], vg_maps[:40] * 3 + 0.01),
    ]
    for a, b in pairs:
        a, b = a.to(dtype), b.to(dtype)
        torch.testing.assert_close(ssim(a, b).double(), _skimage_ssim(a, b), atol=1e-5, rtol=0)


@pytest.mark.parametrize("win_size, data_range", [(3, 2.0), (7, 1.0), (5, 0.5), (11, 2.0)])
def test_ssim_matches_skimage_for_other_settings(win_size, data_range):
    g = torch.Generator().manual_seed(win_size)
    a = torch.rand(4, 20, 20, generator=g, dtype=torch.float64)
    b = (a + 0.2 * torch.rand(4, 20, 20, generator=g, dtype=torch.float64)) ** 2
    torch.testing.assert_close(
        ssim(a, b, data_range=data_range, win_size=win_size),
        _skimage_ssim(a, b, data_range=data_range, win_size=win_size),
        atol=1e-10,
        rtol=0,
    )


def test_ssim_identical_and_constant_maps():
    a = torch.randn(3, 9, 9, dtype=torch.float64)
    torch.testing.assert_close(ssim(a, a), torch.ones(3, dtype=torch.float64))
    c = torch.zeros(2, 9, 9, dtype=torch.float64)
    torch.testing.assert_close(ssim(c, c), _skimage_ssim(c, c))
    torch.testing.assert_close(ssim(c, c + 1), _skimage_ssim(c, c + 1))
    torch.testing.assert_close(ssim(a, -a), _skimage_ssim(a, -a))
    assert float(ssim(a[:1] + 10, 10 - a[:1])) < 0  # same means, anti-correlated structure


def test_ssim_is_per_pair():
    a = torch.randn(5, 12, 12, dtype=torch.float64)
    b = torch.randn(5, 12, 12, dtype=torch.float64)
    torch.testing.assert_close(ssim(a, b)[2:3], ssim(a[2:3], b[2:3]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ssim_of_a_stack_matches_skimage_pair_by_pair(dtype, lenet, fmnist_test, vg_maps, ssim_path):
    # b (S, B, H, W): each batch compared with a, a's window sums shared; the chunking must not matter
    x, y = fmnist_test[0][:30], fmnist_test[1][:30]
    g = torch.Generator().manual_seed(2)
    stack = torch.stack([vanilla_gradient(lenet, (x + s * torch.randn(x.shape, generator=g)).clamp(0, 1), y)
                         for s in (0.05, 0.2, 0.5)]).to(dtype)
    a = vg_maps[:30].to(dtype)
    got = ssim(a, stack)
    assert got.shape == (3, 30) and got.dtype == dtype
    for s in range(3):
        torch.testing.assert_close(got[s].double(), _skimage_ssim(a, stack[s]), atol=1e-5, rtol=0)
        # the same numbers as one batch at a time, to rounding: the torch path sizes its chunks by the
        # number of stacked batches, so its reductions may run over other shapes (PROTOCOL §8.7)
        torch.testing.assert_close(got[s], ssim(a, stack[s]), atol=2.5e-7, rtol=0)
    assert not torch.equal(got[0], got[2])
    from salbench.metrics import stability

    small = dict(stability._SSIM_CHUNK_ELEMENTS, cpu=3000)  # chunks of 1 image
    old, stability._SSIM_CHUNK_ELEMENTS = stability._SSIM_CHUNK_ELEMENTS, small
    try:
        torch.testing.assert_close(ssim(a, stack), got, atol=2.5e-7, rtol=0)  # one float32 ulp near 1
    finally:
        stability._SSIM_CHUNK_ELEMENTS = old


@pytest.mark.parametrize("shape, win_size, data_range", [
    ((7, 28, 28), 5, 2.0), ((3, 17, 23), 3, 1.0), ((2, 64, 40), 11, 0.5), ((4, 7, 7), 7, 2.0), ((1, 5, 9), 5, 3.0)])
def test_ssim_c_kernel_equals_the_torch_path(shape, win_size, data_range):
    """The C kernel and the torch path compute the same float64 sums up to rounding (1e-12), on
    smooth, noisy, constant and anti-correlated pairs, S = 3 stacked."""
    from salbench.metrics import stability

    if stability.SSIM_NATIVE.status() != "native":
        pytest.skip(f"SSIM C kernel not available: {stability.SSIM_NATIVE.status()}")
    g = torch.Generator().manual_seed(sum(shape) + win_size)
    a = torch.randn(shape, generator=g)
    a[0] = 0.25  # a constant map
    bs = torch.stack([a + 0.3 * torch.randn(shape, generator=g), -a, torch.rand(shape, generator=g)])
    native = stability._ssim_native(a, bs, data_range, win_size)
    reference = stability._ssim_torch(a, bs, data_range, win_size)
    assert native.dtype == reference.dtype == torch.float64 and native.shape == (3, shape[0])
    torch.testing.assert_close(native, reference, atol=1e-12, rtol=0)
    # non-contiguous inputs are copied, not misread
    torch.testing.assert_close(stability._ssim_native(a.transpose(1, 2), bs.transpose(2, 3), data_range, win_size),
                               stability._ssim_torch(a.transpose(1, 2), bs.transpose(2, 3), data_range, win_size),
                               atol=1e-12, rtol=0)


@pytest.mark.parametrize(
    "a, b, kwargs, match",
    [
        (torch.rand(2, 8, 8), torch.rand(3, 8, 8), {}, r"same shape.*\(2, 8, 8\) and \(3, 8, 8\)"),
        (torch.rand(8, 8), torch.rand(8, 8), {}, r"a must have shape \(B, H, W\).*\(8, 8\)"),
        (torch.rand(2, 8, 8), torch.rand(2, 1, 8, 8), {}, r"b must have shape \(B, H, W\).*\(2, 1, 8, 8\)"),
        (torch.rand(2, 8, 8), torch.rand(3, 2, 8, 9), {}, r"or \(S, B, H, W\) = \(S, 2, 8, 8\).*\(3, 2, 8, 9\)"),
        (torch.rand(2, 8, 8), torch.full((3, 2, 8, 8), math.inf), {}, r"b contains non-finite"),
        (torch.rand(0, 8, 8), torch.rand(0, 8, 8), {}, r"a is empty"),
        (torch.rand(1, 8, 8), torch.full((1, 8, 8), math.nan), {}, r"b contains non-finite"),
        (torch.rand(1, 8, 8), torch.rand(1, 8, 8), {"win_size": 4}, r"odd integer.*4"),
        (torch.rand(1, 4, 8), torch.rand(1, 4, 8), {"win_size": 5}, r"win_size 5 exceeds.*\(4, 8\)"),
        (torch.rand(1, 8, 8), torch.rand(1, 8, 8), {"data_range": 0.0}, r"data_range.*0.0"),
    ],
)
def test_ssim_bad_input(a, b, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ssim(a, b, **kwargs)


# ---------------------------------------------------------------------------- ssim under noise


def test_ssim_under_noise_replays_the_protocol_by_hand(lenet, fmnist_test):
    x, y = fmnist_test[0][:24], fmnist_test[1][:24]
    sigmas = (0.05, 0.2)
    out = ssim_under_noise(lenet, x, y, vanilla_gradient, sigmas=sigmas, generator=torch.Generator().manual_seed(3),
                           with_raw=True)
    assert isinstance(out, SSIMUnderNoise)
    assert out.scores.shape == (2, 24) and out.kept.shape == (2, 24) and out.kept.dtype == torch.bool
    assert out.scores_raw.shape == (2, 24) and out.scores_raw.dtype == out.scores.dtype

    g = torch.Generator().manual_seed(3)
    maps = vanilla_gradient(lenet, x, y)
    for s, sigma in enumerate(sigmas):
        noisy = (x + sigma * torch.randn(x.shape, generator=g)).clamp(0, 1)
        noisy_maps = vanilla_gradient(lenet, noisy, y)
        with torch.no_grad():
            kept = lenet(noisy).argmax(1) == y
        assert torch.equal(out.kept[s], kept)
        assert (~kept).any() and kept.any()  # both cases occur at these sigmas
        # v2 headline: skimage on the maps divided by their own max|map|; v1 (scores_raw): on the raw maps
        torch.testing.assert_close(
            out.scores[s][kept].double(),
            _skimage_ssim(_scale_free(maps[kept]), _scale_free(noisy_maps[kept])),
            atol=1e-5,
            rtol=0,
        )
        torch.testing.assert_close(
            out.scores_raw[s][kept].double(), _skimage_ssim(maps[kept], noisy_maps[kept]), atol=1e-5, rtol=0
        )
        assert out.scores[s][~kept].isnan().all()  # not attributed: the protocol drops these images
        assert out.scores_raw[s][~kept].isnan().all()
    # more noise -> less similar maps, on average
    assert out.scores[1].nanmean() < out.scores[0].nanmean()
    # the raw scores are v1's, and normalize=False returns them as the scores, without scores_raw
    v1 = ssim_under_noise(lenet, x, y, vanilla_gradient, sigmas=sigmas, generator=torch.Generator().manual_seed(3),
                          normalize=False)
    assert v1.scores_raw is None and torch.equal(v1.kept, out.kept)
    assert torch.equal(v1.scores.nan_to_num(-9), out.scores_raw.nan_to_num(-9))  # same path, same draws
    assert not torch.equal(v1.scores.nan_to_num(-9), out.scores.nan_to_num(-9))
    scores, kept = out  # still a named tuple (scores, kept)
    assert scores is out.scores and kept is out.kept


def test_ssim_under_noise_defaults_maps_reuse_and_determinism(lenet, fmnist_test):
    x, y = fmnist_test[0][:16], fmnist_test[1][:16]
    a = ssim_under_noise(lenet, x, y, vanilla_gradient)
    assert a.scores.shape == (len(SSIM_SIGMAS), 16)
    b = ssim_under_noise(lenet, x, y, vanilla_gradient, generator=torch.Generator().manual_seed(0))
    c = ssim_under_noise(lenet, x, y, vanilla_gradient, maps=vanilla_gradient(lenet, x, y))
    for other in (b, c):  # None means a fresh generator seeded 0; passing maps changes nothing
        assert torch.equal(a.scores.nan_to_num(-1), other.scores.nan_to_num(-1)) and torch.equal(a.kept, other.kept)
    d = ssim_under_noise(lenet, x, y, vanilla_gradient, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(a.scores.nan_to_num(-1), d.scores.nan_to_num(-1))


def test_ssim_under_noise_bad_input(lenet, fmnist_test):
    x, y = fmnist_test[0][:4], fmnist_test[1][:4]
    with pytest.raises(ValueError, match=r"maps must have shape \(B, H, W\) = \(4, 28, 28\).*\(3, 28, 28\)"):
        ssim_under_noise(lenet, x, y, vanilla_gradient, maps=torch.rand(3, 28, 28))
    with pytest.raises(ValueError, match=r"batch size mismatch"):
        ssim_under_noise(lenet, x, y[:3], vanilla_gradient)
    with pytest.raises(ValueError, match=r"sigma.*-0.1"):
        ssim_under_noise(lenet, x, y, vanilla_gradient, sigmas=(0.1, -0.1))
    with pytest.raises(ValueError, match=r"sigmas is empty"):
        ssim_under_noise(lenet, x, y, vanilla_gradient, sigmas=())
    with pytest.raises(ValueError, match=r"explainer must return maps of shape"):
        ssim_under_noise(lenet, x, y, lambda m, xx, yy: torch.zeros(4, 28), sigmas=(0.1,))
    with pytest.raises(ValueError, match=r"x contains non-finite"):
        ssim_under_noise(lenet, x.clone().fill_(math.inf), y, vanilla_gradient)


# ------------------------------------------------------------------------------------------ ROS


class _Times(nn.Module):
    """``factor * inner(x)``: the same predictions, gradients ``factor`` times larger."""

    def __init__(self, inner: nn.Module, factor: float):
        super().__init__()
        self.inner = inner
        self.factor = factor

    def forward(self, x):
        return self.factor * self.inner(x)


def test_scale_free_ssim_does_not_depend_on_the_gradient_scale(lenet, fmnist_test):
    # PROTOCOL §8 (c), §8.2: logits x 10 change no prediction; raw SSIM (data_range 2) moves, scale-free does not
    x, y = fmnist_test[0][:24], fmnist_test[1][:24]
    sigmas = (0.05, 0.2)
    runs = [ssim_under_noise(model, x, y, vanilla_gradient, sigmas=sigmas, with_raw=True,
                             generator=torch.Generator().manual_seed(8)) for model in (lenet, _Times(lenet, 10.0))]
    (a, b) = runs
    assert torch.equal(a.kept, b.kept) and a.kept.any()
    torch.testing.assert_close(a.scores, b.scores, rtol=0, atol=1e-5, equal_nan=True)
    k = a.kept
    assert float((a.scores_raw[k] - b.scores_raw[k]).abs().max()) > 0.01  # the raw maps' SSIM moves


def test_scale_free_ssim_of_an_all_zero_map_is_nan():
    # an explainer whose map of some images is all zero: no scale-free map, NaN although kept
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(36, 2))
    x = torch.rand(4, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = model(x).argmax(1)

    def half_zero(m, t, c):
        return vanilla_gradient(m, t, c) * (torch.arange(t.shape[0]) % 2 == 0).view(-1, 1, 1)

    out = ssim_under_noise(model, x, y, half_zero, sigmas=(0.01,), with_raw=True)
    kept = out.kept[0]
    assert kept.all()
    assert torch.equal(out.scores[0].isnan(), torch.tensor([False, True, False, True]))
    assert not out.scores_raw.isnan().any()  # raw SSIM of two zero maps is defined (1)
    torch.testing.assert_close(out.scores[0, ::2], torch.ones(2))


def test_ssim_under_noise_flags_are_checked(lenet, fmnist_test):
    x, y = fmnist_test[0][:2], fmnist_test[1][:2]
    for kwargs in ({"normalize": 1}, {"with_raw": "yes"}, {"normalize": None}):
        with pytest.raises(ValueError, match=r"(normalize|with_raw) must be True or False"):
            ssim_under_noise(lenet, x, y, vanilla_gradient, sigmas=(0.1,), **kwargs)


def test_ssim_under_noise_result_pickles_and_replaces_with_scores_raw():
    import copy
    import pickle

    out = SSIMUnderNoise(torch.ones(1, 2), torch.ones(1, 2, dtype=torch.bool), torch.zeros(1, 2))
    for again in (pickle.loads(pickle.dumps(out)), copy.deepcopy(out), out._replace(kept=out.kept)):
        assert torch.equal(again.scores_raw, out.scores_raw) and torch.equal(again.scores, out.scores)
    assert SSIMUnderNoise(out.scores, out.kept).scores_raw is None
    assert len(out) == 2 and "scores_raw" in repr(out)


def _quantus_explainer(model, inputs, targets, **kwargs):
    return vanilla_gradient(model, torch.as_tensor(inputs), torch.as_tensor(targets)).numpy()


def _quantus_ros(model, x, y, maps, **kwargs) -> np.ndarray:
    quantus = pytest.importorskip("quantus")
    metric = quantus.RelativeOutputStability(nr_samples=5, disable_warnings=True, **kwargs)  # abs/normalise off
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scores = metric(
            model=model,
            x_batch=x.numpy(),
            y_batch=y.numpy(),
            a_batch=maps[:, None].numpy(),
            explain_func=_quantus_explainer,
            softmax=False,  # the protocol uses logits
            device="cpu",
            batch_size=len(x),
        )
    return np.asarray(scores, dtype=np.float64)


def test_ros_paper_equals_quantus_when_fed_the_same_perturbations(lenet, fmnist_test, vg_maps):
    x, y, maps = fmnist_test[0][:120], fmnist_test[1][:120], vg_maps[:120]
    replay = torch.Generator().manual_seed(7)

    def same_noise_as_ours(arr, indices, **kwargs):  # quantus calls this once per sample, in order
        noise = torch.rand(x.shape, generator=replay) * (0.2 - 0.02) + 0.02
        return arr + noise.reshape(arr.shape).numpy()

    ref = _quantus_ros(lenet, x, y, maps, perturb_func=same_noise_as_ours)
    g = torch.Generator().manual_seed(7)
    ours = relative_output_stability(lenet, x, y, vanilla_gradient, generator=g, maps=maps, flips="nan")
    ours = ours.double().numpy()
    assert np.array_equal(np.isnan(ours), np.isnan(ref))
    assert 0 < np.isnan(ours).sum() < len(ours)  # the test exercises the NaN rule
    ok = ~np.isnan(ours)
    np.testing.assert_allclose(ours[ok], ref[ok], rtol=1e-4)


def test_ros_paper_agrees_statistically_with_quantus_defaults(lenet, fmnist_test, vg_maps):
    x, y, maps = fmnist_test[0][:300], fmnist_test[1][:300], vg_maps[:300]
    np.random.seed(0)
    ref = _quantus_ros(lenet, x, y, maps)  # quantus draws U(0.02, 0.2) with numpy's global RNG
    ours = relative_output_stability(lenet, x, y, vanilla_gradient, maps=maps, flips="nan")  # v1 = quantus
    log_mean, nan_fraction = aggregate_ros(ours)
    assert log_mean == pytest.approx(np.log10(np.nanmean(ref)), abs=0.08)
    assert nan_fraction == pytest.approx(np.isnan(ref).mean(), abs=0.05)


class _Scale(nn.Module):
    """logits = (k * sum x^2, c): the gradient map of class 0, 2k|x|, depends on x."""

    def __init__(self, k: float = 1.0, c: float = 2.0):
        super().__init__()
        self.k = k
        self.c = c

    def forward(self, x):
        s = (x**2).flatten(1).sum(1, keepdim=True)
        return torch.cat([self.k * s, torch.full_like(s, self.c)], dim=1)


def test_ros_formula_on_a_hand_checkable_model():
    # logit_0 = k * sum x^2, logit_1 = 2: the gradient map of class 0 is 2k|x| (one channel).
    model = _Scale(k=1.0)
    x = torch.full((1, 1, 2, 2), 0.5, dtype=torch.float64)
    y = torch.tensor([0])
    g = torch.Generator().manual_seed(0)
    ros = relative_output_stability(model, x, y, vanilla_gradient, n_samples=3, generator=g)
    g = torch.Generator().manual_seed(0)
    expected = []
    for _ in range(3):
        xp = x + torch.rand(x.shape, generator=g, dtype=torch.float64) * 0.18 + 0.02
        e, ep = 2 * x.flatten(), 2 * xp.flatten()
        num = torch.linalg.vector_norm((e - ep) / e)
        den = abs(float((x**2).sum() - (xp**2).sum()))  # logit_1 does not move
        expected.append(float(num) / den)
    assert float(ros) == pytest.approx(max(expected), rel=1e-12)
    # agarwal: relative logit change in the denominator
    g = torch.Generator().manual_seed(0)
    ros_a = relative_output_stability(model, x, y, vanilla_gradient, n_samples=3, variant="agarwal", generator=g)
    g = torch.Generator().manual_seed(0)
    expected_a = []
    for _ in range(3):
        xp = x + torch.rand(x.shape, generator=g, dtype=torch.float64) * 0.18 + 0.02
        e, ep = 2 * x.flatten(), 2 * xp.flatten()
        num = torch.linalg.vector_norm((e - ep) / e)
        h0, h1 = float((x**2).sum()), float((xp**2).sum())
        expected_a.append(float(num) / max(abs(h0 - h1) / h0, 1e-6))
    assert float(ros_a) == pytest.approx(max(expected_a), rel=1e-12)


def test_ros_nan_rules_of_flips_and_variants():
    # x = (0.9, 0.657) in [0, 1]: sum x^2 = 1.24 < 1.6, so the model predicts class 1. Adding
    # U(0.02, 0.2) gives sums between 1.31 and 1.91: some perturbations flip the prediction to class 0.
    model = _Scale(k=1.0, c=1.6)
    x = torch.empty(64, 1, 1, 2, dtype=torch.float64)
    x[..., 0], x[..., 1] = 0.9, math.sqrt(0.5) - 0.05
    y = torch.zeros(64, dtype=torch.long)
    n = 3
    paper = relative_output_stability(
        model, x, y, vanilla_gradient, n_samples=n, generator=torch.Generator().manual_seed(0), flips="nan"
    )
    exclude = relative_output_stability(  # the default: flips="exclude"
        model, x, y, vanilla_gradient, n_samples=n, generator=torch.Generator().manual_seed(0)
    )
    agarwal_nan = relative_output_stability(
        model, x, y, vanilla_gradient, n_samples=n, variant="agarwal", generator=torch.Generator().manual_seed(0),
        flips="nan",
    )
    agarwal = relative_output_stability(
        model, x, y, vanilla_gradient, n_samples=n, variant="agarwal", generator=torch.Generator().manual_seed(0)
    )
    g = torch.Generator().manual_seed(0)
    perturbed = [x + torch.rand(x.shape, generator=g, dtype=torch.float64) * 0.18 + 0.02 for _ in range(n)]
    flips = torch.stack([(p**2).flatten(1).sum(1) > 1.6 for p in perturbed])
    any_flip, all_flip = flips.any(0), flips.all(0)
    assert (~any_flip).any() and (any_flip & ~all_flip).any() and all_flip.any()  # every case occurs
    assert torch.equal(torch.isnan(paper), any_flip)  # flips="nan" (v1): one flip poisons the image
    assert torch.equal(torch.isnan(agarwal_nan), any_flip)  # ... whatever the variant
    assert torch.equal(torch.isnan(exclude), all_flip)  # flips="exclude" (v2): flipped samples are left out
    assert torch.equal(torch.isnan(agarwal), all_flip)  # agarwal's default: the same
    assert (agarwal[~all_flip] > 0).all() and (exclude[~all_flip] > 0).all()
    # where nothing flips the two rules agree; elsewhere "exclude" is the max over the kept samples
    # separate calls attribute other batch compositions (v1 drops poisoned images): float rounding (PROTOCOL §8.7)
    torch.testing.assert_close(exclude[~any_flip], paper[~any_flip], rtol=1e-5, atol=0)
    torch.testing.assert_close(agarwal[~any_flip], agarwal_nan[~any_flip], rtol=1e-5, atol=0)
    e = 2 * x.flatten(1)
    h = torch.cat([(x**2).flatten(1).sum(1, keepdim=True), torch.full((64, 1), 1.6, dtype=torch.float64)], 1)
    by_hand = []
    for p in perturbed:
        hp = torch.cat([(p**2).flatten(1).sum(1, keepdim=True), torch.full((64, 1), 1.6, dtype=torch.float64)], 1)
        num = torch.linalg.vector_norm((e - 2 * p.flatten(1)) / e, dim=1)
        by_hand.append(num / torch.linalg.vector_norm(h - hp, dim=1))
    by_hand = torch.stack(by_hand).masked_fill(flips, -math.inf).amax(0)
    some = any_flip & ~all_flip
    torch.testing.assert_close(exclude[some], by_hand[some], rtol=1e-12, atol=0)


class _Constant(nn.Module):
    def forward(self, x):
        return 0.0 * x.flatten(1).sum(1, keepdim=True) + torch.tensor([1.0, 0.0], dtype=x.dtype)


def test_ros_zero_map_entries_and_zero_logit_change_use_eps():
    # the map is 0 at a pixel where x = 0; the 1e-6 guard keeps the ratio finite (and huge)
    x = torch.tensor([[[[0.0, 1.0]]]], dtype=torch.float64)
    ros = relative_output_stability(_Scale(k=1.0), x, torch.tensor([0]), vanilla_gradient, n_samples=2)
    assert torch.isfinite(ros).all() and float(ros) > 1e4  # (0 - e') / 1e-6 dominates
    assert torch.equal(ros, relative_output_stability(_Scale(k=1.0), x, torch.tensor([0]), vanilla_gradient,
                                                      n_samples=2, flips="nan"))  # nothing flips here
    # logits that never move: 0 / (0 + 1e-6) = 0 instead of 0 / 0
    ros = relative_output_stability(_Constant(), x, torch.tensor([0]), vanilla_gradient, n_samples=2)
    assert torch.equal(ros, torch.zeros(1, dtype=torch.float64))


def test_ros_reuses_maps_and_logits_and_is_deterministic(lenet, fmnist_test):
    x, y = fmnist_test[0][:16], fmnist_test[1][:16]
    with torch.no_grad():
        logits = lenet(x)
    a = relative_output_stability(lenet, x, y, vanilla_gradient)
    b = relative_output_stability(lenet, x, y, vanilla_gradient, maps=vanilla_gradient(lenet, x, y), logits=logits)
    c = relative_output_stability(lenet, x, y, vanilla_gradient, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a.nan_to_num(-1), b.nan_to_num(-1)) and torch.equal(a.nan_to_num(-1), c.nan_to_num(-1))
    d = relative_output_stability(lenet, x, y, vanilla_gradient, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(a.nan_to_num(-1), d.nan_to_num(-1))


def test_logits_reused_from_the_explainer_pass_equal_a_separate_forward(lenet, fmnist_test):
    # an nn.Module gets its x' logits from a forward hook on the explainer's own pass; a plain
    # callable (no hooks) and an explainer that never evaluates x' itself (IG) get a forward.
    x, y = fmnist_test[0][:12], fmnist_test[1][:12]
    plain = lambda t: lenet(t)  # noqa: E731
    for explainer in (vanilla_gradient, lambda m, t, c: integrated_gradients(m, t, c, n_steps=4)):
        hooked = relative_output_stability(lenet, x, y, explainer, n_samples=2)
        separate = relative_output_stability(plain, x, y, explainer, n_samples=2)
        torch.testing.assert_close(hooked, separate, equal_nan=True, rtol=1e-5, atol=0)
        a = ssim_under_noise(lenet, x, y, explainer, sigmas=(0.2, 0.5))
        b = ssim_under_noise(plain, x, y, explainer, sigmas=(0.2, 0.5))
        assert torch.equal(a.kept, b.kept)
        torch.testing.assert_close(a.scores, b.scores, equal_nan=True)
    assert not lenet._forward_hooks and not lenet._forward_pre_hooks  # the hooks are removed


class _Counting(nn.Module):
    """Counts the images that go through the wrapped model (forward passes, any batch size)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.images = 0

    def forward(self, x):
        self.images += x.shape[0]
        return self.inner(x)


def _ig3(model, x, y):
    return integrated_gradients(model, x, y, n_steps=3)


def test_ssim_under_noise_attributes_only_the_kept_images(lenet, fmnist_test):
    # PROTOCOL §3 drops a noisy image whose prediction flipped. IG (first model call not on x~): one
    # forward of every noisy image, then IG of the kept ones only; VG: one pass, its own logits.
    x, y = fmnist_test[0][:40], fmnist_test[1][:40]
    sigmas = (0.1, 0.3)
    for explainer, per_image in ((_ig3, 3), (vanilla_gradient, None)):
        counting = _Counting(lenet)
        maps = explainer(lenet, x, y)
        out = ssim_under_noise(counting, x, y, explainer, sigmas=sigmas, maps=maps,
                               generator=torch.Generator().manual_seed(5))
        kept = out.kept.sum(1)
        assert (kept < len(x)).all() and (kept > 0).all()  # both cases occur at both sigmas
        expected = sum(len(x) + per_image * int(k) for k in kept) if per_image else len(sigmas) * len(x)
        assert counting.images == expected
        g = torch.Generator().manual_seed(5)
        for s, sigma in enumerate(sigmas):  # the kept scores equal attributing every noisy image
            noisy = (x + sigma * torch.randn(x.shape, generator=g)).clamp(0, 1)
            full = ssim(_scale_free(maps), _scale_free(explainer(lenet, noisy, y)))
            k = out.kept[s]
            torch.testing.assert_close(out.scores[s][k], full[k], rtol=0, atol=1e-6)
            assert out.scores[s][~k].isnan().all()


def _ros_by_hand(model, x, y, maps, explainer, n, variant, seed, flips="nan", floor=None):
    """ROS with every sample of every image attributed (no skipping), PROTOCOL §3."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        h = model(x)
    e = maps.flatten(1)
    if floor is None:
        e_safe = e + 1e-6 * (e == 0)
    else:  # sign(e) max(|e|, floor max|e|), sign(0) = +
        mag = torch.maximum(e.abs(), floor * e.abs().amax(1, keepdim=True))
        e_safe = torch.where(e < 0, -mag, mag)
    nan_rule = flips
    ratios, flips = [], []
    for _ in range(n):
        xp = x + torch.rand(x.shape, generator=g) * 0.18 + 0.02
        ep = explainer(model, xp, y).flatten(1)
        with torch.no_grad():
            hp = model(xp)
        num = torch.linalg.vector_norm((e - ep) / e_safe, dim=1)
        if variant == "paper":
            den = torch.linalg.vector_norm(h - hp, dim=1)
            den = den + 1e-6 * (den == 0)
        else:
            den = torch.linalg.vector_norm((h - hp) / (h + 1e-6 * (h == 0)), dim=1).clamp(min=1e-6)
        flipped = hp.argmax(1) != h.argmax(1)
        ratios.append(torch.where(flipped, torch.nan, num / den))
        flips.append(flipped)
    r, flips = torch.stack(ratios), torch.stack(flips)
    best = r.nan_to_num(-math.inf).amax(0)
    nan = flips.any(0) if nan_rule == "nan" else flips.all(0)
    return torch.where(nan, torch.nan, best), flips


@pytest.mark.parametrize("variant, flips", [("paper", "nan"), ("paper", "exclude"), ("agarwal", "exclude")])
def test_ros_skips_attributions_it_does_not_need(lenet, fmnist_test, variant, flips):
    # flips="nan" (v1): an image is NaN once one sample flips, so its later samples are neither classified
    # nor attributed; both rules skip the attribution of a flipped sample. The values equal attributing all.
    x, y = fmnist_test[0][:80], fmnist_test[1][:80]
    n = 5
    maps = _ig3(lenet, x, y)
    counting = _Counting(lenet)
    with torch.no_grad():
        logits = lenet(x)
    ours = relative_output_stability(counting, x, y, _ig3, n_samples=n, variant=variant, maps=maps, logits=logits,
                                     generator=torch.Generator().manual_seed(9), flips=flips)
    ref, flipped = _ros_by_hand(lenet, x, y, maps, _ig3, n, variant, seed=9, flips=flips)
    rule, flips = flips, flipped
    assert flips.any(0).sum() >= 2 and (~flips.any(0)).any()  # the test exercises skipping
    assert torch.equal(ours.isnan(), ref.isnan())
    ok = ~ref.isnan()
    torch.testing.assert_close(ours[ok], ref[ok], rtol=1e-5, atol=0)
    alive = torch.ones(len(x), dtype=torch.bool)
    expected = 0
    for s in range(n):
        expected += int(alive.sum()) + 3 * int((alive & ~flips[s]).sum())  # forward + IG(3) of the kept
        if rule == "nan":
            alive &= ~flips[s]
    assert counting.images == expected


def test_explainer_that_swallows_the_probe_still_gives_the_right_maps(lenet, fmnist_test):
    # the probe stops an explainer whose first model call is not on x by raising; an explainer that
    # catches it must not leave interrupted maps behind
    x, y = fmnist_test[0][:20], fmnist_test[1][:20]

    def swallowing(model, t, c):
        try:
            model(t * 0.5)
        except Exception:
            pass
        return vanilla_gradient(model, t, c)

    a = ssim_under_noise(lenet, x, y, swallowing, sigmas=(0.3,))
    b = ssim_under_noise(lenet, x, y, vanilla_gradient, sigmas=(0.3,))
    assert torch.equal(a.kept, b.kept)
    torch.testing.assert_close(a.scores, b.scores, equal_nan=True, rtol=0, atol=1e-6)
    assert not lenet._forward_hooks and not lenet._forward_pre_hooks


def test_ros_bad_input(lenet, fmnist_test):
    x, y = fmnist_test[0][:4], fmnist_test[1][:4]
    cases = [
        ({"n_samples": 0}, r"n_samples.*0"),
        ({"variant": "max"}, r"variant.*'max'"),
        ({"flips": "drop"}, r"flips must be 'exclude' or 'nan'.*'drop'"),
        ({"floor": 0.0}, r"floor must be None or a number in \(0, 1\].*0.0"),
        ({"floor": 2.0}, r"floor.*2.0"),
        ({"floor": math.nan}, r"floor.*nan"),
        ({"floor": True}, r"floor.*True"),
        ({"maps": torch.rand(4, 27, 28)}, r"maps must have shape \(B, H, W\) = \(4, 28, 28\)"),
        ({"logits": torch.rand(3, 10)}, r"batch size mismatch.*\(3, 10\)"),
        ({"logits": torch.rand(4)}, r"logits must have shape \(B, K\)"),
        ({"logits": torch.full((4, 10), math.nan)}, r"logits contains non-finite"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            relative_output_stability(lenet, x, y, vanilla_gradient, **kwargs)
    with pytest.raises(ValueError, match=r"x is empty"):
        relative_output_stability(lenet, x[:0], y[:0], vanilla_gradient)
    with pytest.raises(ValueError, match=r"explainer must be callable"):
        relative_output_stability(lenet, x, y, "vg")


def test_ros_floor_bounds_an_exact_zero_of_the_clean_map():
    # PROTOCOL §8 (a), §8.5: the map 2k|x| is 0 at the pixel where x = 0. v1's guard divides its change by
    # 1e-6 (ROS ~1e5 here, ~1e6-scale on real maps); the floor divides it by 1e-3 max|e| instead.
    model = _Scale(k=1.0)
    x = torch.tensor([[[[0.0, 1.0, 0.5]]]], dtype=torch.float64)
    y = torch.tensor([0])
    n = 3
    v1 = relative_output_stability(model, x, y, vanilla_gradient, n_samples=n,
                                   generator=torch.Generator().manual_seed(2))
    floored = relative_output_stability(model, x, y, vanilla_gradient, n_samples=n, floor=ROS_FLOOR_FRACTION,
                                        generator=torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(2)
    expected = []
    e = 2 * x.flatten()
    denominator = torch.maximum(e, ROS_FLOOR_FRACTION * e.max())  # e >= 0 here: sign +
    for _ in range(n):
        xp = x + torch.rand(x.shape, generator=g, dtype=torch.float64) * 0.18 + 0.02
        num = torch.linalg.vector_norm((e - 2 * xp.flatten()) / denominator)
        expected.append(float(num) / abs(float((x**2).sum() - (xp**2).sum())))
    assert float(floored) == pytest.approx(max(expected), rel=1e-12)
    # bounds: |e - e'| = 2u <= 0.4 per element and |h - h'| = sum(2 x u + u^2) >= 0.04 (from x = 1), so the
    # floored ROS is at most 0.4 sqrt(3) / (1e-3 * max|e| = 2e-3) / 0.04 = 8660; v1 divides the zero
    # pixel's change (>= 0.04) by 1e-6 and |h - h'| <= 0.72: at least 5.5e4
    assert float(floored) <= 0.4 * math.sqrt(3) / (ROS_FLOOR_FRACTION * 2) / 0.04
    assert float(v1) >= 0.04 / 1e-6 / 0.72
    assert float(v1) > 100 * float(floored)


def test_ros_floor_keeps_the_sign_and_leaves_large_entries_alone():
    # a signed map (x - 0.5, independent of the model): entries 0 (floored, +), -1e-4 (floored to
    # -floor max|e|), -0.3 and 0.5 (kept); ROS uses |.|, so the by-hand value is sign-blind: the
    # sign rule is checked on the denominator itself
    from salbench.metrics.stability import _map_denominator

    def signed(m, t, c):
        return t[:, 0] - 0.5

    x = torch.tensor([[[[0.5, 0.2, 0.4999, 1.0]]]], dtype=torch.float64)
    e = (x[:, 0] - 0.5).flatten(1)
    d = _map_denominator(e, 0.01)
    torch.testing.assert_close(d, torch.tensor([[0.005, -0.3, -0.005, 0.5]], dtype=torch.float64), rtol=1e-12, atol=0)
    assert torch.equal(_map_denominator(torch.zeros(1, 3), 0.01), torch.full((1, 3), 1e-6))  # all zero: v1's guard
    ros = relative_output_stability(_Scale(k=1.0, c=10.0), x, torch.tensor([0]), signed, n_samples=2, floor=0.01,
                                    generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    expected = []
    for _ in range(2):
        xp = x + torch.rand(x.shape, generator=g, dtype=torch.float64) * 0.18 + 0.02
        num = torch.linalg.vector_norm((e - (xp[:, 0] - 0.5).flatten(1)) / d)
        expected.append(float(num) / abs(float((x**2).sum() - (xp**2).sum())))
    assert float(ros) == pytest.approx(max(expected), rel=1e-12)


def test_ros_variants_equal_three_separate_calls(lenet, fmnist_test, vg_maps):
    # one pass over the same draws and attributions: "exclude" and "floor" run the very same batches as
    # the separate calls (exact); the separate flips="nan" call attributes only the images still alive,
    # in smaller batches, whose kernels may round differently: equal NaNs, values to 1e-5 relative
    x, y, maps = fmnist_test[0][:60], fmnist_test[1][:60], vg_maps[:60]
    out = ros_variants(lenet, x, y, vanilla_gradient, maps=maps, generator=torch.Generator().manual_seed(7))
    assert list(out) == ["exclude", "nan", "floor"]
    separate = {
        "exclude": relative_output_stability(lenet, x, y, vanilla_gradient, maps=maps, flips="exclude",
                                             generator=torch.Generator().manual_seed(7)),
        "nan": relative_output_stability(lenet, x, y, vanilla_gradient, maps=maps, flips="nan",
                                         generator=torch.Generator().manual_seed(7)),
        "floor": relative_output_stability(lenet, x, y, vanilla_gradient, maps=maps, floor=ROS_FLOOR_FRACTION,
                                           generator=torch.Generator().manual_seed(7)),
    }
    # one pass vs separate calls: other batch compositions, float rounding only (PROTOCOL §8.7)
    torch.testing.assert_close(out["exclude"], separate["exclude"], rtol=1e-5, atol=0, equal_nan=True)
    torch.testing.assert_close(out["floor"], separate["floor"], rtol=1e-5, atol=0, equal_nan=True)
    torch.testing.assert_close(out["nan"], separate["nan"], rtol=1e-5, atol=0, equal_nan=True)
    # the test exercises flips: some images are NaN under "nan" but not under "exclude"
    nan_v1, nan_v2 = out["nan"].isnan(), out["exclude"].isnan()
    assert (nan_v1 & ~nan_v2).any() and not (nan_v2 & ~nan_v1).any()
    ok = ~nan_v1
    assert torch.equal(out["exclude"][ok], out["nan"][ok])  # nothing flipped: the same maximum
    assert torch.equal(out["floor"].isnan(), nan_v2)
    # flooring only ever shrinks the map-side factor here (1e-3 max|e| > 1e-6 on these maps)
    assert (out["floor"][~nan_v2] <= out["exclude"][~nan_v2]).all()
    assert (out["floor"][~nan_v2] < out["exclude"][~nan_v2]).any()
    # IG (no logits from its own pass) and the agarwal variant go through the same pass
    ig = ros_variants(lenet, x[:10], y[:10], _ig3, n_samples=2, variant="agarwal", floor=0.01,
                      generator=torch.Generator().manual_seed(1))
    ref = relative_output_stability(lenet, x[:10], y[:10], _ig3, n_samples=2, variant="agarwal", floor=0.01,
                                    generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(ig["floor"], ref, rtol=1e-5, atol=0, equal_nan=True)  # two paths: rounding only


def test_ros_variants_bad_input(lenet, fmnist_test):
    x, y = fmnist_test[0][:4], fmnist_test[1][:4]
    for kwargs, match in [({"floor": None}, r"floor must be a number in \(0, 1\]"), ({"floor": -1.0}, r"floor.*-1.0"),
                          ({"n_samples": 0}, r"n_samples"), ({"variant": "quantus"}, r"variant.*'quantus'"),
                          ({"maps": torch.rand(4, 28, 27)}, r"maps must have shape")]:
        with pytest.raises(ValueError, match=match):
            ros_variants(lenet, x, y, vanilla_gradient, **kwargs)


def test_aggregate_ros():
    assert aggregate_ros(torch.tensor([10.0, 1000.0])) == (pytest.approx(math.log10(505.0)), 0.0)
    log_mean, frac = aggregate_ros(torch.tensor([math.nan, 100.0, math.nan, math.nan]))
    assert log_mean == pytest.approx(2.0) and frac == 0.75
    log_mean, frac = aggregate_ros(torch.tensor([math.nan, math.nan]))
    assert math.isnan(log_mean) and frac == 1.0
    with pytest.raises(ValueError, match=r"ros must have shape \(B\)"):
        aggregate_ros(torch.ones(2, 2))
    with pytest.raises(ValueError, match=r"ros is empty"):
        aggregate_ros(torch.ones(0))
    with pytest.raises(ValueError, match=r"infinity"):
        aggregate_ros(torch.tensor([1.0, math.inf]))


@pytest.mark.parametrize("values", [[10.0, 1000.0, float("nan"), 1.0], [3.0, 1e-9, 7.5, 2e12], [5.0]])
def test_median_log10_ros_is_numpys_median_of_the_finite_log10_values(values):
    t = torch.tensor(values, dtype=torch.float64)
    med, nan_fraction = metrics_pkg.median_log10_ros(t)
    finite = np.array([v for v in values if v == v])
    assert med == pytest.approx(float(np.median(np.log10(finite))), abs=1e-12)
    assert nan_fraction == pytest.approx(sum(v != v for v in values) / len(values))


def test_median_log10_ros_of_all_nan_is_nan_and_of_nothing_an_error():
    med, frac = metrics_pkg.median_log10_ros(torch.tensor([float("nan")] * 3))
    assert math.isnan(med) and frac == 1.0
    with pytest.raises(ValueError, match="empty"):
        metrics_pkg.median_log10_ros(torch.tensor([]))
