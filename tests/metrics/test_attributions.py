"""vanilla_gradient and integrated_gradients (PROTOCOL §2)."""

from __future__ import annotations

import math

import pytest
import torch
from captum.attr import IntegratedGradients, Saliency
from torch import nn

from salbench.metrics import Explainer, integrated_gradients, vanilla_gradient

# Our attributions vs captum's, and chunked vs unchunked IG, run the model on batches of other sizes
# or sum the same terms in another order: CPU kernels (oneDNN / ATen's vectorised paths, chosen per
# ISA and batch shape) may then round differently. Measured: 1.5e-11 absolute on maps whose largest
# value is 1.4e-3, i.e. a few float32 ulps (relative 1.1e-6 on the smallest entries), on CPUs
# without AVX-512 and on some with it. PROTOCOL §8.7: across computation paths, stated tolerances;
# a wrong target, chunk slice or path sum would be off by orders of magnitude more.
CROSS_PATH = dict(rtol=1e-5, atol=1e-9)


def _rgb_model() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)).eval()


def test_vanilla_gradient_is_abs_gradient_of_target_logit_summed_over_channels(lenet, fmnist_test):
    x, y = fmnist_test[0][:16], fmnist_test[1][:16]
    maps = vanilla_gradient(lenet, x, y)
    xr = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(lenet(xr).gather(1, y[:, None]).sum(), xr)
    assert maps.shape == (16, 28, 28)
    torch.testing.assert_close(maps, grad.abs().sum(1), rtol=1e-5, atol=1e-7)
    assert (maps >= 0).all() and maps.abs().sum() > 0


def test_vanilla_gradient_rgb_sums_abs_over_channels():
    model = _rgb_model()
    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 4, 2])
    ref = Saliency(model).attribute(x.clone().requires_grad_(True), target=y, abs=True).sum(1)
    torch.testing.assert_close(vanilla_gradient(model, x, y), ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_integrated_gradients_matches_captum_with_protocol_settings(dtype):
    model = _rgb_model().to(dtype)
    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=dtype)
    y = torch.tensor([1, 3, 0])
    ref = IntegratedGradients(model).attribute(x, baselines=0, target=y, n_steps=50, method="gausslegendre")
    maps = integrated_gradients(model, x, y)
    assert maps.dtype == dtype and maps.shape == (3, 8, 8)
    torch.testing.assert_close(maps, ref.sum(1))  # signed channel sum


def test_integrated_gradients_completeness_within_captum_delta(lenet, fmnist_test):
    x, y = fmnist_test[0][:32], fmnist_test[1][:32]
    maps, delta = integrated_gradients(lenet, x, y, return_convergence_delta=True)
    with torch.no_grad():
        gap = lenet(x).gather(1, y[:, None]).squeeze(1) - lenet(torch.zeros_like(x)).gather(1, y[:, None]).squeeze(1)
    # captum's delta is exactly the completeness error of the un-summed attribution; the
    # channel sum is signed, so the map sums to the same total.
    torch.testing.assert_close(maps.sum((1, 2)), gap + delta, atol=1e-4, rtol=1e-5)
    # ... and with 50 Gauss-Legendre steps that error is small next to the logit gap.
    assert delta.abs().max() < 0.05 * gap.abs().max()
    assert (delta.abs() < 0.05 * gap.abs() + 1e-3).float().mean() > 0.9


def test_internal_batch_size_does_not_change_the_result(lenet, fmnist_test):
    x, y = fmnist_test[0][:6], fmnist_test[1][:6]
    torch.testing.assert_close(
        integrated_gradients(lenet, x, y, internal_batch_size=64),
        integrated_gradients(lenet, x, y),
        rtol=1e-5,
        atol=1e-6,
    )


def test_cpu_chunking_of_the_path_points_leaves_the_maps_equal_to_captums(lenet, fmnist_test, monkeypatch):
    # 7 images x 50 steps = 350 path points in chunks of 37 (the last one shorter): every chunk
    # must get its own slice of the per-point targets, and captum's path sum must see the same
    # gradients as from one call (to float32 rounding: the chunks are other batch sizes, CROSS_PATH).
    import salbench.metrics.attributions as attributions

    x, y = fmnist_test[0][:7], fmnist_test[1][:7]
    ref = IntegratedGradients(lenet).attribute(x, baselines=0, target=y, n_steps=50, method="gausslegendre")
    calls = []
    handle = lenet.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    try:
        monkeypatch.setattr(attributions, "IG_CPU_CHUNK_ELEMENTS", 37 * 28 * 28)
        maps, delta = integrated_gradients(lenet, x, y, return_convergence_delta=True)
    finally:
        handle.remove()
    assert calls[:10] == [37] * 9 + [350 - 9 * 37]  # the path in chunks (then captum's delta forwards)
    torch.testing.assert_close(maps, ref.sum(1), **CROSS_PATH)
    ref_delta = IntegratedGradients(lenet).attribute(
        x, baselines=0, target=y, n_steps=50, method="gausslegendre", return_convergence_delta=True
    )[1]
    # delta = map sum - logit gap: a difference of O(1) numbers, so an absolute float32 tolerance
    torch.testing.assert_close(delta, ref_delta, rtol=0, atol=1e-5)


def test_cpu_chunking_with_one_image_and_a_scalar_target(lenet, fmnist_test, monkeypatch):
    import salbench.metrics.attributions as attributions

    x, y = fmnist_test[0][:1], fmnist_test[1][:1]  # captum keeps a one-element target unexpanded
    ref = IntegratedGradients(lenet).attribute(x, baselines=0, target=y, n_steps=50, method="gausslegendre")
    monkeypatch.setattr(attributions, "IG_CPU_CHUNK_ELEMENTS", 8 * 28 * 28)
    # chunks of 8 path points vs captum's one batch of 50: equal to float32 rounding (CROSS_PATH),
    # not bit for bit (the forward of 8 images rounds differently from that of 50 on many CPUs)
    torch.testing.assert_close(integrated_gradients(lenet, x, y), ref.sum(1), **CROSS_PATH)


def _bn_model() -> nn.Module:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
    model.train()
    model(torch.rand(16, 3, 8, 8))  # non-trivial running statistics
    return model.eval()


@pytest.mark.parametrize("which", ["lenet", "batchnorm"])
def test_one_backward_root_gives_captums_gradients(which, lenet, fmnist_test):
    # summed_gradients sums the target logits where captum unbinds them into B roots: the same
    # seeds of 1, so the same gradients, maps and deltas for VG and IG (scoring's internal batch,
    # and the CPU chunks). Ours vs captum is compared to float32 rounding (CROSS_PATH): the default
    # IG call chunks the path on CPU where captum runs one batch, so kernels may round differently.
    if which == "lenet":
        model, x, y = lenet, fmnist_test[0][:9], fmnist_test[1][:9]
    else:
        model = _bn_model()
        x = torch.rand(9, 3, 8, 8, generator=torch.Generator().manual_seed(3))
        y = torch.arange(9) % 10
    ig = IntegratedGradients(model)
    ref_ig, ref_delta = ig.attribute(x, baselines=0, target=y, n_steps=50, method="gausslegendre",
                                     internal_batch_size=9, return_convergence_delta=True)
    maps, delta = integrated_gradients(model, x, y, internal_batch_size=9, return_convergence_delta=True)
    torch.testing.assert_close(maps, ref_ig.sum(1), **CROSS_PATH)
    torch.testing.assert_close(delta, ref_delta, rtol=0, atol=1e-5)
    ref_all = ig.attribute(x, baselines=0, target=y, n_steps=50, method="gausslegendre")
    torch.testing.assert_close(integrated_gradients(model, x, y), ref_all.sum(1), **CROSS_PATH)
    ref_vg = Saliency(model).attribute(x.clone().requires_grad_(True), target=y, abs=True).sum(1)
    torch.testing.assert_close(vanilla_gradient(model, x, y), ref_vg, **CROSS_PATH)


def test_summed_gradients_leaves_a_missing_target_to_captum(lenet, fmnist_test):
    from salbench.metrics.attributions import summed_gradients

    with pytest.raises(AssertionError, match="Target not provided"):
        summed_gradients(lenet, (fmnist_test[0][:2].clone().requires_grad_(True),))


def test_caller_tensors_and_model_are_left_alone(lenet, fmnist_test):
    x, y = fmnist_test[0][:4].clone(), fmnist_test[1][:4]
    before = x.clone()
    for explainer in (vanilla_gradient, integrated_gradients):
        maps = explainer(lenet, x, y)
        assert not maps.requires_grad
        assert not x.requires_grad and x.grad is None
        assert torch.equal(x, before)
    assert all(p.grad is None for p in lenet.parameters())
    assert not lenet.training


def test_explainer_type_accepts_both_functions():
    explainers: list[Explainer] = [vanilla_gradient, integrated_gradients]
    model = _rgb_model()
    x, y = torch.rand(2, 3, 8, 8), torch.tensor([0, 1])
    for e in explainers:
        assert e(model, x, y).shape == (2, 8, 8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_the_inputs_device():
    model = _rgb_model()
    x, y = torch.rand(2, 3, 8, 8), torch.tensor([0, 1])
    for e in (vanilla_gradient, integrated_gradients):
        out = e(model.cuda(), x.cuda(), y.cuda())
        assert out.is_cuda
        torch.testing.assert_close(out.cpu(), e(model.cpu(), x, y), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("explainer", [vanilla_gradient, integrated_gradients])
@pytest.mark.parametrize(
    "x, y, match",
    [
        (torch.rand(3, 8, 8), torch.tensor([0, 1, 2]), r"x must have shape \(B, C, H, W\).*\(3, 8, 8\)"),
        (torch.rand(2, 3, 8, 8), torch.tensor([0, 1, 2]), r"batch size mismatch.*2 image.*\(3,\)"),
        (torch.rand(2, 3, 8, 8), torch.tensor([[0, 1]]), r"y must have shape \(B\).*\(1, 2\)"),
        (torch.rand(0, 3, 8, 8), torch.zeros(0, dtype=torch.long), r"x is empty.*\(0, 3, 8, 8\)"),
        (torch.full((1, 3, 8, 8), math.nan), torch.tensor([0]), r"x contains non-finite values \(192 NaN"),
        (torch.rand(1, 3, 8, 8), torch.tensor([0.0]), r"integer class labels.*float32"),
        (torch.rand(1, 3, 8, 8), torch.tensor([-1]), r"non-negative.*-1"),
    ],
)
def test_bad_input_raises_value_error(explainer, x, y, match):
    with pytest.raises(ValueError, match=match):
        explainer(_rgb_model(), x, y)


@pytest.mark.parametrize(
    "kwargs, match", [({"n_steps": 0}, "n_steps"), ({"internal_batch_size": 0}, "internal_batch_size")]
)
def test_integrated_gradients_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        integrated_gradients(_rgb_model(), torch.rand(1, 3, 8, 8), torch.tensor([0]), **kwargs)
