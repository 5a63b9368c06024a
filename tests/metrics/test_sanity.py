"""Model-parameter randomisation sanity checks (metrics.sanity) against quantus 0.6.0 and on properties.

The quantus comparisons use tiny CNNs whose registration order is their execution order, so quantus's
layer walk (every module with ``reset_parameters``, registration order) is ours. Both sides explain
the same float32 maps of bit-identical re-initialised weights (the same ``torch.manual_seed(seed + 1)``
before each ``reset_parameters()``, checked bit for bit below) and rank them identically: what is
left is float64 arithmetic, scipy's ``np.corrcoef`` of the ranks vs our centred dot products, and for
the entropy numpy's pairwise sum vs torch's. Hence ``TOL`` = 1e-12; measured at most 6e-17 for the
(s)MPRT Spearman values, 1.3e-16 for eMPRT and 2.7e-15 for entropies of 28x28 maps. The properties do
not need quantus; the comparisons skip without it.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import scipy.stats
import torch
from torch import nn

from salbench import metrics
from salbench.metrics import sanity as MS

TOL = 1e-12
SEED = 42  # quantus's default seed


def _tiny(seed: int = 0, side: int = 8) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                             nn.Flatten(), nn.Linear(4 * side * side, 10)).eval()


@pytest.fixture(scope="module")
def quantus():
    return pytest.importorskip("quantus")


@pytest.fixture(scope="module")
def batch():
    model = _tiny()
    x = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model, x, model(x).argmax(1)


def _plain_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """|d logit_y / dx| summed over channels, without the pixel-range check of metrics.vanilla_gradient
    (quantus feeds unclipped noisy inputs to sMPRT's explainer)."""
    x = x.detach().clone().requires_grad_(True)
    return torch.autograd.grad(model(x).gather(1, y[:, None]).sum(), x)[0].abs().sum(1)


def _q_explain(model, inputs, targets, **kwargs):
    """quantus's ``explain_func(model=, inputs=, targets=, **explain_func_kwargs)``: numpy (B, C, H, W) in,
    (B, 1, H, W) numpy maps out; our vanilla gradient inside."""
    x = torch.as_tensor(inputs, dtype=torch.float32)
    return metrics.vanilla_gradient(model, x, torch.as_tensor(targets)).unsqueeze(1).numpy()


def _q(metric, model, x, y):
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():  # quantus seeds the global RNG
        warnings.simplefilter("ignore")
        return metric(model=model, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=None, explain_func=_q_explain,
                      device="cpu")


def test_spearman_matches_scipy_with_ties():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 6, size=(5, 60)).astype(np.float32)  # many ties
    b = np.where(rng.random((5, 60)) < 0.5, a, rng.integers(0, 6, size=(5, 60))).astype(np.float32)
    b[4] = 3.0  # a constant row: NaN, as scipy
    ours = MS.spearman(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns on the constant row
        ref = np.array([scipy.stats.spearmanr(a[i], b[i])[0] for i in range(5)])
    assert np.isnan(ours[4]) and np.isnan(ref[4])
    np.testing.assert_allclose(ours[:4], ref[:4], atol=TOL, rtol=0)
    c = rng.standard_normal((3, 2, 7, 7))  # any trailing shape is flattened per row
    np.testing.assert_allclose(MS.spearman(torch.from_numpy(c), torch.from_numpy(c ** 3)).numpy(), 1.0,
                               atol=TOL, rtol=0)
    with pytest.raises(ValueError, match="one shape"):
        MS.spearman(torch.zeros(2, 5), torch.tensor([[0.0, 1, 2, 3, float("nan")]] * 2))


def test_scale_free_ssim_ignores_each_maps_scale():
    a = torch.rand(3, 9, 9, generator=torch.Generator().manual_seed(4))
    b = a.flip(-1)
    # 7 b / max|7 b| and b / max|b| differ by float rounding only
    np.testing.assert_allclose(MS.scale_free_ssim(a, 7 * b).numpy(), MS.scale_free_ssim(a, b).numpy(), atol=1e-6)
    np.testing.assert_allclose(MS.scale_free_ssim(a, 3 * a).numpy(), 1.0, atol=TOL, rtol=0)
    assert MS.scale_free_ssim(a, b).dtype == torch.float64 and bool((MS.scale_free_ssim(a, b) < 1).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_discrete_entropy_matches_numpy_histogram_and_scipy_entropy(dtype):
    """Our torch histogram against quantus's ``scipy.stats.entropy(np.histogram(a, bins=n)[0])``, with
    values on the bin edges (multiples of 1/100 and 1/7), a constant map and skewed maps."""
    gen = torch.Generator().manual_seed(2)
    maps = torch.cat([
        torch.randint(0, 101, (3, 12, 12), generator=gen) / 100,
        torch.randint(-7, 8, (3, 12, 12), generator=gen) / 7,
        torch.rand(3, 12, 12, generator=gen) ** 4 * 1e-3,
        torch.randn(2, 12, 12, generator=gen),
        torch.full((1, 12, 12), 0.3),
    ]).to(dtype)
    for n_bins in (7, 100):
        ours = MS.discrete_entropy(maps, n_bins).numpy()
        ref = [scipy.stats.entropy(np.histogram(m, bins=n_bins)[0]) for m in maps.reshape(len(maps), -1).numpy()]
        assert ours[-1] == 0.0
        np.testing.assert_allclose(ours, ref, atol=TOL, rtol=0)


def test_reinitialised_weights_are_quantus_bit_for_bit(quantus, batch):
    """Our re-initialisation against the models ``PyTorchModel.get_random_layer_generator`` yields
    (quantus/helpers/model/pytorch_model.py:322-331: every module with ``reset_parameters``, reversed for
    top_down, ``torch.manual_seed(seed + 1)`` before each)."""
    from quantus.helpers.model.pytorch_model import PyTorchModel

    model, x, _ = batch
    ours = copy.deepcopy(model)
    modules = dict(ours.named_modules())
    rng = torch.get_rng_state()
    with torch.random.fork_rng(devices=[]):
        steps = [(name, {k: v.clone() for k, v in m.state_dict().items()})
                 for name, m in PyTorchModel(model, device="cpu").get_random_layer_generator("top_down", SEED)]
    assert [name for name, _ in steps] == MS.randomisation_layers(model, x)[::-1]
    for name, theirs in steps:
        MS._reset(modules[name], SEED)
        assert all(torch.equal(theirs[k], v) for k, v in ours.state_dict().items()), name
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.mark.parametrize("order", ["top_down", "bottom_up", "independent"])
def test_mprt_matches_quantus_layer_by_layer(quantus, batch, order):
    """quantus ``MPRT`` defaults (abs=True; normalise=True: ``normalise_by_max``, metrics/base.py:139, over
    *all* axes including the batch, functions/normalise_func.py:43, so one positive scalar that cannot
    change a rank) and its per-layer dict of per-image scores."""
    model, x, y = batch
    q = _q(quantus.MPRT(layer_order=order, seed=SEED, disable_warnings=True), model, x, y)
    ours = MS.cascading_randomisation(model, x, y, metrics.vanilla_gradient, seed=SEED, order=order)
    assert ours.layers == (["5", "2", "0"] if order == "top_down" else ["0", "2", "5"])
    assert list(q) == ["original", *ours.layers]
    np.testing.assert_allclose(np.asarray(q["original"]), 1.0, atol=TOL, rtol=0)
    for i, layer in enumerate(ours.layers):
        np.testing.assert_allclose(ours.spearman[i].numpy(), np.asarray(q[layer]), atol=TOL, rtol=0)


def test_smprt_matches_quantus_with_its_noise_reproduced(quantus, batch, monkeypatch):
    """quantus ``SmoothMPRT`` (metrics/randomisation/smooth_mprt.py:586 and 641-647) draws each noisy copy
    as ``np.random.randn(*x.shape) * std`` from numpy's global RNG, ``std = noise_magnitude * (max - min)``
    per image, the last copy noise-free, and does not clip. Two things are patched for the comparison:
    ``np.random.randn`` returns our generator's float32 draws (re-seeded every ``n - 1`` draws, as ours
    is for every map), and ``quantus.explain``, because quantus 0.6.0's smoothing loop calls
    ``quantus.explain(model, x + eps, y, **explain_func_kwargs)`` rather than the ``explain_func`` passed
    in. The explainer takes unclipped inputs and ours runs with ``smooth_clip=False``."""
    model, x, y = batch
    n, noise, gseed = 4, 0.2, 7
    draws = []

    def randn(*shape):
        if len(draws) % (n - 1) == 0:
            randn.gen = torch.Generator().manual_seed(gseed)
        draws.append(shape)
        return torch.randn(shape, generator=randn.gen, dtype=torch.float32).double().numpy()

    def explain(model, inputs, targets, **kwargs):
        return _plain_gradient(model, torch.as_tensor(inputs).float(), torch.as_tensor(targets)).unsqueeze(1).numpy()

    monkeypatch.setattr(np.random, "randn", randn)
    monkeypatch.setattr(quantus, "explain", explain)
    q = _q(quantus.SmoothMPRT(layer_order="top_down", seed=SEED, nr_samples=n, noise_magnitude=noise,
                              disable_warnings=True), model, x, y)
    monkeypatch.undo()
    # the maps quantus smooths: a_batch, the "original" entry, one per layer
    assert draws == [x.shape] * ((n - 1) * (len(q) + 1))
    ours = MS.cascading_randomisation(model, x, y, _plain_gradient, seed=SEED, smooth_samples=n, smooth_noise=noise,
                                      generator_seed=gseed, smooth_clip=False)
    for i, layer in enumerate(ours.layers):
        np.testing.assert_allclose(ours.spearman[i].numpy(), np.asarray(q[layer]), atol=TOL, rtol=0)


def test_smprt_one_sample_is_mprt(batch):
    """quantus: "the last epsilon is defined as zero", so one sample is the plain map."""
    model, x, y = batch
    plain = MS.cascading_randomisation(model, x, y, metrics.vanilla_gradient)
    one = MS.cascading_randomisation(model, x, y, metrics.vanilla_gradient, smooth_samples=1)
    assert torch.equal(plain.spearman, one.spearman) and torch.equal(plain.final, one.final)


def test_emprt_matches_quantus(quantus, batch):
    """quantus ``EfficientMPRT`` defaults (efficient_mprt.py:88-93, 161, 353: bottom_up, skip_layers, no
    abs/normalise, discrete_entropy with 100 bins; score ``(b - a) / a`` at :443); its top_down run gives
    the same model, as every layer is seeded afresh."""
    model, x, y = batch
    ours = MS.efficient_mprt(model, x, y, metrics.vanilla_gradient, seed=SEED).numpy()
    for order in ("bottom_up", "top_down"):
        q = _q(quantus.EfficientMPRT(layer_order=order, seed=SEED, disable_warnings=True), model, x, y)
        np.testing.assert_allclose(ours, np.asarray(q), atol=TOL, rtol=0)


@pytest.mark.parametrize("smooth_samples", [0, 3])
def test_model_independent_explainer_scores_one(batch, smooth_samples):
    """An explainer that ignores the model (it returns the image) must fail the check: 1 at every step."""
    model, x, y = batch
    r = MS.cascading_randomisation(model, x, y, lambda m, xi, yi: xi[:, 0], smooth_samples=smooth_samples)
    assert r.spearman.shape == r.ssim.shape == (3, 6)
    np.testing.assert_allclose(r.spearman.numpy(), 1.0, atol=TOL, rtol=0)
    np.testing.assert_allclose(r.ssim.numpy(), 1.0, atol=TOL, rtol=0)


def test_constant_maps():
    """All-zero maps: Spearman NaN (undefined), SSIM 1 (C1, C2 of metrics.ssim), eMPRT NaN (entropy 0)."""
    model, x = _tiny(), torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    y = torch.zeros(2, dtype=torch.long)
    zeros = lambda m, xi, yi: torch.zeros(xi.shape[0], *xi.shape[2:])  # noqa: E731
    r = MS.cascading_randomisation(model, x, y, zeros)
    assert bool(r.spearman.isnan().all()) and torch.equal(r.ssim, torch.ones(3, 2, dtype=torch.float64))
    assert bool(MS.efficient_mprt(model, x, y, zeros).isnan().all())


def test_vanilla_gradient_changes_after_the_output_layer():
    """A briefly trained tiny model (label = brightest quadrant): randomising the Linear layer alone
    already moves the gradient map."""
    gen = torch.Generator().manual_seed(5)
    x = torch.rand(64, 1, 8, 8, generator=gen) * 0.5
    y = torch.randint(0, 4, (64,), generator=gen)
    for i, (r, c) in enumerate([(0, 0), (0, 4), (4, 0), (4, 4)]):
        x[y == i, :, r:r + 4, c:c + 4] += 0.5
    model = _tiny(seed=1).train()
    with torch.random.fork_rng(devices=[]):
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(30):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    model.eval()
    assert float((model(x).argmax(1) == y).float().mean()) > 0.9
    r = MS.cascading_randomisation(model, x[:8], y[:8], metrics.vanilla_gradient, seed=SEED)
    assert r.layers[0] == "5"
    assert bool((r.spearman[0] < 0.95).all()) and float(r.spearman[-1].mean()) < 0.5
    assert bool((r.ssim[0] < 0.95).all())


def test_caller_state_unchanged_and_same_seed_bit_identical(batch):
    model, x, y = batch
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    rng = torch.get_rng_state()
    runs = [MS.cascading_randomisation(model, x, y, metrics.vanilla_gradient, seed=3, smooth_samples=2,
                                       generator_seed=0) for _ in range(2)]
    other = MS.cascading_randomisation(model, x, y, metrics.vanilla_gradient, seed=4, smooth_samples=2,
                                       generator_seed=0)
    MS.efficient_mprt(model, x, y, metrics.vanilla_gradient, seed=3)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training and [p.requires_grad for p in model.parameters()] == flags
    model.eval()
    # Same seed, same process, same code path: bit equality is the designed property (all randomness
    # comes from the seeds), so torch.equal and not a tolerance.
    for field in ("spearman", "ssim", "original", "final"):
        assert torch.equal(getattr(runs[0], field), getattr(runs[1], field)), field
    assert torch.equal(runs[0].original, other.original) and not torch.equal(runs[0].final, other.final)


def test_independent_order_is_one_layer_at_a_time(batch):
    model, x, y = batch
    ind = MS.cascading_randomisation(model, x, y, metrics.vanilla_gradient, order="independent")
    alone = MS.cascading_randomisation(model, x, y, metrics.vanilla_gradient, layers=["2"])
    assert alone.layers == ["2"] and torch.equal(ind.spearman[1], alone.spearman[0])
    explicit = MS.cascading_randomisation(model, x, y, metrics.vanilla_gradient, layers=["5", "2", "0"])
    top_down = MS.cascading_randomisation(model, x, y, metrics.vanilla_gradient)
    assert torch.equal(explicit.spearman, top_down.spearman)
    last = MS.cascading_randomisation(model, x, y, metrics.vanilla_gradient, last_only=True)
    assert last.layers == ["0"] and torch.equal(last.spearman, top_down.spearman[-1:])
    assert torch.equal(last.ssim, top_down.ssim[-1:]) and torch.equal(last.final, top_down.final)


class _Mixer(nn.Module):
    """Uses its child's weights directly (like the zoo's SmoothBlock): ``mix`` itself is never called."""

    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Conv2d(2, 2, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + nn.functional.conv2d(h, self.mix.weight, self.mix.bias)


class _LateRegistered(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Conv2d(2, 2, 3, padding=1)
        self.block = _Mixer()
        self.head = nn.Linear(2 * 8 * 8, 3)
        self.unused = nn.Linear(3, 3)
        self.stem = nn.Conv2d(1, 2, 3, padding=1)  # registered last, runs first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.body(self.stem(x))).flatten(1))


def test_randomisation_layers_follow_execution_order():
    model = _LateRegistered()
    x = torch.rand(2, 1, 8, 8)
    assert [n for n, m in model.named_modules() if hasattr(m, "reset_parameters")][0] == "body"
    assert MS.randomisation_layers(model, x) == ["stem", "body", "block.mix", "head"]
    r = MS.cascading_randomisation(model, x, torch.tensor([0, 2]), metrics.vanilla_gradient)
    assert r.layers == ["head", "block.mix", "body", "stem"]


def test_clear_errors(batch):
    model, x, y = batch
    vg = metrics.vanilla_gradient
    with pytest.raises(ValueError, match=r"layer 'conv9' is not a module.*\['0', '2', '5'\]"):
        MS.cascading_randomisation(model, x, y, vg, layers=["conv9"])
    with pytest.raises(ValueError, match=r"layer '1' owns no parameters"):
        MS.cascading_randomisation(model, x, y, vg, layers=["1"])
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        MS.cascading_randomisation(model, x[:, 0], y, vg)
    with pytest.raises(ValueError, match="y"):
        MS.cascading_randomisation(model, x, y[:3], vg)
    with pytest.raises(ValueError, match=r"explainer must return maps of shape \(B, H, W\)"):
        MS.cascading_randomisation(model, x, y, lambda m, xi, yi: xi)
    with pytest.raises(ValueError, match="order must be one of"):
        MS.cascading_randomisation(model, x, y, vg, order="random")
    with pytest.raises(ValueError, match="smooth_samples"):
        MS.cascading_randomisation(model, x, y, vg, smooth_samples=-1)
    with pytest.raises(TypeError, match="nn.Module"):
        MS.efficient_mprt(lambda t: t, x, y, vg)
    with pytest.raises(ValueError, match="n_bins"):
        MS.efficient_mprt(model, x, y, vg, n_bins=0)


def test_entropy_rise_of_a_cascade_is_efficient_mprt(batch):
    """The gates take eMPRT from the cascade's original and fully randomised maps instead of explaining
    both models again: with per-layer seeding the fully randomised weights are the same either way."""
    model, x, y = batch
    c = MS.cascading_randomisation(model, x, y, metrics.vanilla_gradient, seed=42)
    np.testing.assert_allclose(MS.entropy_rise(c.original, c.final).numpy(),
                               MS.efficient_mprt(model, x, y, metrics.vanilla_gradient, seed=42).numpy(), atol=1e-12)
