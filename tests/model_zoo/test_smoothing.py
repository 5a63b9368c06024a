"""SmoothBlock: y = x + Conv1x1(F(x)), F a fixed 3x3 kornia filter (PROTOCOL §5)."""

from __future__ import annotations

import math

import kornia.filters as KF
import pytest
import torch

from salbench.model_zoo import native, smoothing
from salbench.model_zoo.smoothing import FILTERS, SmoothBlock, gaussian_sigma

needs_native = pytest.mark.skipif(native.status() != "native",
                                  reason=f"native median kernel not available: {native.status()}")


@pytest.fixture(params=["native", "torch"])
def median_path(request, monkeypatch):
    """Run a median test once through the C kernel and once through the pure-torch path."""
    if request.param == "native":
        if native.status() != "native":
            pytest.skip(f"native median kernel not available: {native.status()}")
    else:
        monkeypatch.setattr(native, "usable", lambda x: False)
    return request.param


def _rand(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("width, sigma", [(12, 2.15), (24, 3.95), (28, 4.55), (8, 1.55), (3, 0.8), (1, 0.5)])
def test_sigma_rule(width, sigma):
    # σ = 0.3·((W - 1)·0.5 - 1) + 0.8, the authors' rule (OpenCV's default for ksize = W)
    assert gaussian_sigma(width) == pytest.approx(sigma)
    assert SmoothBlock(4, width=width).sigma == pytest.approx(sigma)


def test_sigma_rule_rejects_empty_width():
    with pytest.raises(ValueError):
        gaussian_sigma(0)


@pytest.mark.parametrize("filter", FILTERS)
def test_shape_kept(filter):
    block = SmoothBlock(5, width=9, filter=filter)
    x = _rand(2, 5, 7, 9)
    assert block.smooth(x).shape == x.shape
    assert block(x).shape == x.shape


def test_invalid_filter():
    with pytest.raises(ValueError, match="gaussian"):
        SmoothBlock(3, width=8, filter="bilateral")


@pytest.mark.parametrize("width", [6, 12])
def test_gaussian_impulse_response(width):
    """An impulse in the middle of a map is spread to its 3x3 neighbourhood with the
    normalised Gaussian weights exp(-d²/2σ²) of the σ rule, computed here by hand."""
    block = SmoothBlock(2, width=width, filter="gaussian")
    x = torch.zeros(1, 2, 7, 7)
    x[0, 0, 3, 3] = 1.0
    x[0, 1, 3, 3] = -2.0  # per channel (depthwise)
    s = gaussian_sigma(width)
    g = torch.tensor([math.exp(-(d * d) / (2 * s * s)) for d in (-1, 0, 1)])
    g = g / g.sum()
    kernel = torch.outer(g, g)
    out = block.smooth(x)
    expected = torch.zeros(1, 2, 7, 7)
    expected[0, 0, 2:5, 2:5] = kernel
    expected[0, 1, 2:5, 2:5] = -2 * kernel
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-7)
    assert out[0, 0, 3, 3] < 1.0 and out[0, 0, 2, 2] > 0  # really smoothed


def test_mean_impulse_response():
    block = SmoothBlock(1, width=7, filter="mean")
    x = torch.zeros(1, 1, 7, 7)
    x[0, 0, 3, 3] = 9.0
    expected = torch.zeros(1, 1, 7, 7)
    expected[0, 0, 2:5, 2:5] = 1.0
    torch.testing.assert_close(block.smooth(x), expected)


def test_median_removes_an_impulse_and_keeps_an_edge():
    block = SmoothBlock(1, width=7, filter="median")
    x = torch.zeros(1, 1, 7, 7)
    x[0, 0, 3, 3] = 5.0
    assert torch.equal(block.smooth(x), torch.zeros_like(x))
    edge = torch.zeros(1, 1, 7, 7)
    edge[..., 4:] = 1.0  # a step edge is a fixed point of the median
    assert torch.equal(block.smooth(edge), edge)


@pytest.mark.parametrize("width", [5, 12, 24])
def test_gaussian_equals_kornia(width):
    block = SmoothBlock(4, width=width, filter="gaussian")
    x = _rand(2, 4, 9, 11)
    s = gaussian_sigma(width)
    ref = KF.gaussian_blur2d(x, (3, 3), (s, s))  # default border: reflect
    torch.testing.assert_close(block.smooth(x), ref, rtol=1e-5, atol=1e-6)


def test_mean_equals_kornia_box_blur():
    block = SmoothBlock(4, width=12, filter="mean")
    x = _rand(2, 4, 9, 11, seed=1)
    torch.testing.assert_close(block.smooth(x), KF.box_blur(x, (3, 3)), rtol=1e-5, atol=1e-6)


def test_median_equals_kornia_median_blur(median_path):
    block = SmoothBlock(4, width=12, filter="median")
    x = _rand(2, 4, 9, 11, seed=2)
    torch.testing.assert_close(block.smooth(x), KF.median_blur(x, (3, 3)), rtol=0, atol=0)


@pytest.mark.parametrize("filter", FILTERS)
def test_forward_is_residual_plus_mixed_filter(filter):
    torch.manual_seed(0)
    block = SmoothBlock(3, width=10, filter=filter)
    x = _rand(2, 3, 6, 10, seed=3)
    w, b = block.mix.weight[:, :, 0, 0], block.mix.bias
    expected = x + torch.einsum("oc,bchw->bohw", w, block.smooth(x)) + b.view(1, -1, 1, 1)
    torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("filter", ["gaussian", "mean"])
def test_gradcheck(filter):
    block = SmoothBlock(2, width=8, filter=filter).double()
    x = _rand(1, 2, 5, 6, seed=4, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(block, (x,))


@pytest.mark.parametrize("filter", FILTERS)
def test_gradients_reach_input_and_mixing(filter):
    block = SmoothBlock(3, width=8, filter=filter)
    x = _rand(2, 3, 6, 6, seed=5).requires_grad_(True)
    (block(x) ** 2).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert block.mix.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("filter", FILTERS)
def test_filter_is_fixed_and_not_saved(filter):
    block = SmoothBlock(3, width=8, filter=filter)
    assert [n for n, _ in block.named_parameters()] == ["mix.weight", "mix.bias"]
    assert set(block.state_dict()) == {"mix.weight", "mix.bias"}


def test_median_gradient_on_plateaus_routes_like_a_stable_sort(median_path):
    """Exact ties (plateaus of equal positive values, as a constant image background gives)
    send the gradient to the same neighbour as ``unfold`` + ``sort`` (rank 4, stable): the
    committed M2 checkpoints' saliency maps depend on that choice."""
    block = SmoothBlock(3, width=8, filter="median")
    g = torch.Generator().manual_seed(7)
    x = (torch.randint(0, 3, (4, 3, 8, 8), generator=g).float() * 0.5 + 0.25).requires_grad_(True)
    up = torch.randn(4, 3, 8, 8, generator=g)
    (new,) = torch.autograd.grad(block.smooth(x), x, up)
    (ref,) = torch.autograd.grad(block.smooth_reference(x), x, up)
    torch.testing.assert_close(new, ref, rtol=0, atol=1e-6)


def _plateau_map(shape, seed):
    """ReLU-like maps with many exact ties: zeros and values on a coarse grid."""
    g = torch.Generator().manual_seed(seed)
    return torch.relu(torch.randn(*shape, generator=g)).mul(4).round().div(4)


@needs_native
@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (4, 6, 12, 12), (1, 1, 3, 3), (2, 5, 7, 13), (3, 9, 4),
                                   (2, 4, 32, 32), (1, 2, 9, 70)])  # the last two: full vector loops
def test_native_median_is_bit_identical_to_the_torch_path(shape):
    """Value, routing index and gradient of the C kernel equal the torch path exactly."""
    x = _plateau_map(shape, seed=sum(shape))
    xp = torch.nn.functional.pad(x if x.dim() == 4 else x[None], (1, 1, 1, 1), mode="reflect")
    med_t, which_t = smoothing._median_which_torch(xp, True)
    med_n, which_n = native.median3x3_forward(xp, True)
    assert torch.equal(med_n, med_t) and torch.equal(which_n, which_t)
    assert (which_t != 4).any()  # the ties really exercise the routing
    up = torch.randn(med_t.shape, generator=torch.Generator().manual_seed(1))
    assert torch.equal(native.median3x3_backward(up, which_n), smoothing._median_backward_torch(up, which_t))


@needs_native
def test_native_median_through_the_block_matches_the_torch_path(monkeypatch):
    block = SmoothBlock(6, width=12, filter="median")
    x = _plateau_map((8, 6, 12, 12), seed=3).requires_grad_(True)
    up = torch.randn(8, 6, 12, 12, generator=torch.Generator().manual_seed(2))
    (g_native,) = torch.autograd.grad(block(x), x, up)
    monkeypatch.setattr(native, "usable", lambda t: False)
    (g_torch,) = torch.autograd.grad(block(x), x, up)
    # the fused C median block (_MedianMix: its own reflect-border fold and residual add) vs the torch
    # median + pad backward: two paths, documented equal to float rounding, not bit for bit (PROTOCOL
    # §8.7); the median's own value, routing and backward stay bit-identical (tested above). Grads are O(1).
    torch.testing.assert_close(g_native, g_torch, rtol=1e-5, atol=1e-6)


@needs_native
def test_native_median_hands_a_nan_map_to_the_torch_path():
    x = _plateau_map((2, 3, 6, 6), seed=4)
    x[1, 2, 3, 3] = float("nan")
    xp = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
    assert native.median3x3_forward(xp, True) is None
    out = SmoothBlock(3, width=6, filter="median").smooth(x)
    ref, _ = smoothing._median_which_torch(xp, False)
    assert torch.equal(out.isnan(), ref.isnan()) and out.isnan().any()


@pytest.fixture
def fresh_native(monkeypatch, tmp_path):
    """The median library forgotten, built anew under this test's settings, and restored after."""
    native.LIBRARY.reset()
    monkeypatch.setenv("SALBENCH_NATIVE_CACHE", str(tmp_path))
    yield tmp_path
    monkeypatch.undo()
    native.LIBRARY.reset()


def test_native_can_be_disabled_and_reports_why(monkeypatch, fresh_native):
    monkeypatch.setenv("SALBENCH_NATIVE", "0")
    assert native.status() == "disabled by SALBENCH_NATIVE=0"
    assert not native.usable(torch.zeros(3, 3))
    x = _plateau_map((2, 2, 5, 5), seed=5)
    torch.testing.assert_close(SmoothBlock(2, width=5, filter="median").smooth(x), KF.median_blur(x, (3, 3)),
                               rtol=0, atol=0)


def test_native_without_a_compiler_falls_back(monkeypatch, fresh_native):
    from salbench.metrics import _native

    monkeypatch.delenv("SALBENCH_NATIVE", raising=False)  # the suite may run with native kernels off
    monkeypatch.setattr(_native, "compiler", lambda: None)
    assert native.status().startswith("torch path: no C compiler found")
    assert native.library() is None


@needs_native
def test_native_build_goes_to_the_cache_atomically(fresh_native):
    assert native.status() == "native"
    built = list(fresh_native.iterdir())
    assert len(built) == 1 and built[0].name.startswith("smoothing_kernels-")  # no temporary left behind


@needs_native
def test_native_build_falls_back_to_untuned_flags(monkeypatch, fresh_native):
    """A compiler that refuses -march=native still gets an (untuned) library."""
    from salbench.metrics import _native

    real = _native.NativeLibrary._compile

    def refuse_native(self, cc, flags, target):
        return "unknown option -march=native" if "-march=native" in flags else real(self, cc, flags, target)

    monkeypatch.setattr(_native.NativeLibrary, "_compile", refuse_native)
    assert native.status() == "native"
    assert len(list(fresh_native.iterdir())) == 1


# ------------------------------------------------------------------ the C block of G and M1


def _block_grads(block, x, up):
    out = block(x)
    return (out, *torch.autograd.grad(out, (x, block.mix.weight, block.mix.bias), up))


@needs_native
@pytest.mark.parametrize("filter", FILTERS)
@pytest.mark.parametrize("shape", [(32, 6, 12, 12), (4, 16, 32, 32), (3, 5, 7, 9), (2, 3, 2, 5), (1, 2, 9, 2)])
def test_native_linear_block_matches_the_torch_path(filter, shape, monkeypatch):
    # one C call each way for x + W F(x) + b: the same values and gradients (input, weight, bias) as
    # the torch path to float rounding (the sums run in another order)
    torch.manual_seed(sum(shape))
    block = SmoothBlock(shape[1], width=shape[3], filter=filter)
    x = _rand(*shape, seed=7).requires_grad_(True)
    up = torch.randn(shape, generator=torch.Generator().manual_seed(8))
    assert block._native_ok(x)
    native_out = _block_grads(block, x, up)
    monkeypatch.setattr(SmoothBlock, "_native_ok", lambda self, x: False)
    torch_out = _block_grads(block, x, up)
    for a, b, name in zip(native_out, torch_out, ("output", "input grad", "weight grad", "bias grad")):
        a, b = a.detach(), b.detach()
        scale = float(b.abs().max()) + 1.0
        assert float((a - b).abs().max()) <= 2e-6 * scale, name
    # channels-last (non-contiguous) input takes the same path
    xc = x.detach().to(memory_format=torch.channels_last)
    monkeypatch.undo()
    torch.testing.assert_close(block(xc), torch_out[0], rtol=1e-5, atol=1e-5)


@needs_native
def test_native_linear_block_input_gradients_only(monkeypatch):
    block = SmoothBlock(6, width=12)
    x = _rand(8, 6, 12, 12, seed=9).requires_grad_(True)
    (full,) = torch.autograd.grad(block(x).square().sum(), x)
    with smoothing.input_gradients_only():
        out = block(x).square().sum()
        (only,) = torch.autograd.grad(out, x)
        out2 = block(x).square().sum()
        out2.backward()  # parameters' gradients are skipped (None) inside the context
    assert torch.equal(full, only)
    assert block.mix.weight.grad is None and block.mix.bias.grad is None
    block(x).square().sum().backward()  # outside: computed again
    assert block.mix.weight.grad is not None and block.mix.weight.grad.abs().sum() > 0


@needs_native
@pytest.mark.parametrize("filter", ["gaussian", "mean"])
def test_native_linear_block_keeps_no_filtered_map(filter):
    # the C G/M1 block saves its input (an alias of x, which the previous layer keeps anyway) and
    # recomputes F(x) in the backward for the weight gradient: no new map of x's size per forward
    block = SmoothBlock(6, width=12, filter=filter)
    x = _rand(8, 6, 12, 12, seed=13).requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = block(x)
    maps = [t for t in saved if t.shape == x.shape]
    assert maps and all(t.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() for t in maps)
    # and the weight gradient from the recomputed F(x) is sum_b,p grad_o F(x)_i
    g = _rand(*x.shape, seed=14)
    y.backward(g)
    z = block.smooth(x.detach())
    expected = torch.einsum("bohw,bihw->oi", g.double(), z.double()).float()
    torch.testing.assert_close(block.mix.weight.grad[:, :, 0, 0], expected, rtol=1e-5, atol=1e-5)


@needs_native
def test_native_linear_block_is_not_twice_differentiable():
    block = SmoothBlock(3, width=8)
    x = _rand(2, 3, 8, 8, seed=10).requires_grad_(True)
    (g,) = torch.autograd.grad(block(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):  # an error, never a silently wrong second derivative
        torch.autograd.grad(g.sum(), x)


def test_linear_block_takes_the_torch_path_where_the_c_one_does_not_apply():
    block = SmoothBlock(3, width=8)
    assert not block._native_ok(torch.zeros(2, 3, 8, 8, dtype=torch.float64))
    assert not block._native_ok(torch.zeros(2, 3, 1, 8))


@needs_native
def test_pgd_with_the_native_block_matches_the_torch_path(monkeypatch):
    # pgd_linf differentiates with respect to the input only (input_gradients_only): the adversarial
    # examples of a G LeNet are those of the torch path, up to the sign of a gradient entry at float
    # rounding (none here)
    from salbench.model_zoo.attacks import pgd_linf

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 6, 5), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                                SmoothBlock(6, width=12), torch.nn.Flatten(), torch.nn.Linear(6 * 12 * 12, 10))
    x = _rand(16, 1, 28, 28, seed=11).clamp(0, 1)
    y = torch.arange(16) % 10
    adv = pgd_linf(model, x, y, eps=0.1, alpha=0.01, steps=5, generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(SmoothBlock, "_native_ok", lambda self, x: False)
    ref = pgd_linf(model, x, y, eps=0.1, alpha=0.01, steps=5, generator=torch.Generator().manual_seed(1))
    assert float((adv - ref).abs().max()) <= 1e-6


@needs_native
def test_median_block_with_a_nan_takes_the_fallback(monkeypatch):
    # the fused C median block refuses a map with a NaN (its min/max would drop it); the block then
    # runs the torch median, whose NaN propagates as on the torch path
    block = SmoothBlock(3, width=8, filter="median")
    x = _rand(2, 3, 8, 8, seed=12)
    x[0, 1, 3, 4] = float("nan")
    out = block(x)
    monkeypatch.setattr(SmoothBlock, "_native_ok", lambda self, x: False)
    ref = block(x)
    assert torch.equal(torch.isnan(out), torch.isnan(ref)) and bool(torch.isnan(out).any())
    torch.testing.assert_close(out.nan_to_num(), ref.nan_to_num(), rtol=1e-5, atol=1e-6)
