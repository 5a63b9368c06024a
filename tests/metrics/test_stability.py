"""ssim, ssim_under_noise, relative_output_stability, aggregate_ros (PROTOCOL §3)."""

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
    ssim,
    ssim_under_noise,
    vanilla_gradient,
)
from salbench.metrics.protocol import SSIM_SIGMAS

skimage_metrics = pytest.importorskip("skimage.metrics")


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
        assert torch.equal(got[s], ssim(a, stack[s]))  # the same numbers as one batch at a time
    assert not torch.equal(got[0], got[2])
    from salbench.metrics import stability

    small = dict(stability._SSIM_CHUNK_ELEMENTS, cpu=3000)  # chunks of 1 image
    old, stability._SSIM_CHUNK_ELEMENTS = stability._SSIM_CHUNK_ELEMENTS, small
    try:
        torch.testing.assert_close(ssim(a, stack), got, atol=1e-12, rtol=0)
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
    out = ssim_under_noise(lenet, x, y, vanilla_gradient, sigmas=sigmas, generator=torch.Generator().manual_seed(3))
    assert isinstance(out, SSIMUnderNoise)
    assert out.scores.shape == (2, 24) and out.kept.shape == (2, 24) and out.kept.dtype == torch.bool

    g = torch.Generator().manual_seed(3)
    maps = vanilla_gradient(lenet, x, y)
    for s, sigma in enumerate(sigmas):
        noisy = (x + sigma * torch.randn(x.shape, generator=g)).clamp(0, 1)
        noisy_maps = vanilla_gradient(lenet, noisy, y)
        with torch.no_grad():
            kept = lenet(noisy).argmax(1) == y
        assert torch.equal(out.kept[s], kept)
        assert (~kept).any() and kept.any()  # both cases occur at these sigmas
        torch.testing.assert_close(
            out.scores[s][kept].double(), _skimage_ssim(maps[kept], noisy_maps[kept]), atol=1e-5, rtol=0
        )
        assert out.scores[s][~kept].isnan().all()  # not attributed: the protocol drops these images
    # more noise -> less similar maps, on average
    assert out.scores[1].nanmean() < out.scores[0].nanmean()


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
    ours = relative_output_stability(lenet, x, y, vanilla_gradient, generator=g, maps=maps)
    ours = ours.double().numpy()
    assert np.array_equal(np.isnan(ours), np.isnan(ref))
    assert 0 < np.isnan(ours).sum() < len(ours)  # the test exercises the NaN rule
    ok = ~np.isnan(ours)
    np.testing.assert_allclose(ours[ok], ref[ok], rtol=1e-4)


def test_ros_paper_agrees_statistically_with_quantus_defaults(lenet, fmnist_test, vg_maps):
    x, y, maps = fmnist_test[0][:300], fmnist_test[1][:300], vg_maps[:300]
    np.random.seed(0)
    ref = _quantus_ros(lenet, x, y, maps)  # quantus draws U(0.02, 0.2) with numpy's global RNG
    ours = relative_output_stability(lenet, x, y, vanilla_gradient, maps=maps)
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


def test_ros_nan_rules_paper_vs_agarwal():
    # x = (0.9, 0.657) in [0, 1]: sum x^2 = 1.24 < 1.6, so the model predicts class 1. Adding
    # U(0.02, 0.2) gives sums between 1.31 and 1.91: some perturbations flip the prediction to class 0.
    model = _Scale(k=1.0, c=1.6)
    x = torch.empty(64, 1, 1, 2, dtype=torch.float64)
    x[..., 0], x[..., 1] = 0.9, math.sqrt(0.5) - 0.05
    y = torch.zeros(64, dtype=torch.long)
    n = 3
    paper = relative_output_stability(
        model, x, y, vanilla_gradient, n_samples=n, generator=torch.Generator().manual_seed(0)
    )
    agarwal = relative_output_stability(
        model, x, y, vanilla_gradient, n_samples=n, variant="agarwal", generator=torch.Generator().manual_seed(0)
    )
    g = torch.Generator().manual_seed(0)
    perturbed = [x + torch.rand(x.shape, generator=g, dtype=torch.float64) * 0.18 + 0.02 for _ in range(n)]
    flips = torch.stack([(p**2).flatten(1).sum(1) > 1.6 for p in perturbed])
    any_flip, all_flip = flips.any(0), flips.all(0)
    assert (~any_flip).any() and (any_flip & ~all_flip).any() and all_flip.any()  # every case occurs
    assert torch.equal(torch.isnan(paper), any_flip)  # paper: one flip poisons the image
    assert torch.equal(torch.isnan(agarwal), all_flip)  # agarwal: flipped samples are left out
    assert (agarwal[~all_flip] > 0).all()


class _Constant(nn.Module):
    def forward(self, x):
        return 0.0 * x.flatten(1).sum(1, keepdim=True) + torch.tensor([1.0, 0.0], dtype=x.dtype)


def test_ros_zero_map_entries_and_zero_logit_change_use_eps():
    # the map is 0 at a pixel where x = 0; the 1e-6 guard keeps the ratio finite (and huge)
    x = torch.tensor([[[[0.0, 1.0]]]], dtype=torch.float64)
    ros = relative_output_stability(_Scale(k=1.0), x, torch.tensor([0]), vanilla_gradient, n_samples=2)
    assert torch.isfinite(ros).all() and float(ros) > 1e4  # (0 - e') / 1e-6 dominates
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
            full = ssim(maps, explainer(lenet, noisy, y))
            k = out.kept[s]
            torch.testing.assert_close(out.scores[s][k], full[k], rtol=0, atol=1e-6)
            assert out.scores[s][~k].isnan().all()


def _ros_by_hand(model, x, y, maps, explainer, n, variant, seed):
    """ROS with every sample of every image attributed (no skipping), PROTOCOL §3."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        h = model(x)
    e = maps.flatten(1)
    e_safe = e + 1e-6 * (e == 0)
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
    nan = flips.any(0) if variant == "paper" else flips.all(0)
    return torch.where(nan, torch.nan, best), flips


@pytest.mark.parametrize("variant", ["paper", "agarwal"])
def test_ros_skips_attributions_it_does_not_need(lenet, fmnist_test, variant):
    # paper: an image is NaN once one sample flips, so its later samples are neither classified nor
    # attributed; both variants skip the attribution of a flipped sample. The values equal attributing all.
    x, y = fmnist_test[0][:80], fmnist_test[1][:80]
    n = 5
    maps = _ig3(lenet, x, y)
    counting = _Counting(lenet)
    with torch.no_grad():
        logits = lenet(x)
    ours = relative_output_stability(counting, x, y, _ig3, n_samples=n, variant=variant, maps=maps, logits=logits,
                                     generator=torch.Generator().manual_seed(9))
    ref, flips = _ros_by_hand(lenet, x, y, maps, _ig3, n, variant, seed=9)
    assert flips.any(0).sum() >= 2 and (~flips.any(0)).any()  # the test exercises skipping
    assert torch.equal(ours.isnan(), ref.isnan())
    ok = ~ref.isnan()
    torch.testing.assert_close(ours[ok], ref[ok], rtol=1e-5, atol=0)
    alive = torch.ones(len(x), dtype=torch.bool)
    expected = 0
    for s in range(n):
        expected += int(alive.sum()) + 3 * int((alive & ~flips[s]).sum())  # forward + IG(3) of the kept
        if variant == "paper":
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
