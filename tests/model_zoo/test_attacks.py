"""PGD L∞ with random start and the accuracies built on it (PROTOCOL §3 "Accuracy", §5)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from salbench.model_zoo.attacks import natural_accuracy, pgd_linf, robust_accuracy


def _separable(n: int = 200, seed: int = 0):
    """Two classes of 1x4x4 images: pixels in [0.2, 0.4] (class 0) or [0.6, 0.8] (class 1)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = 0.2 + 0.2 * torch.rand(n, 1, 4, 4, generator=g) + 0.4 * y.view(-1, 1, 1, 1)
    return x, y


@pytest.fixture(scope="module")
def linear_model():
    """A naturally trained linear classifier on the separable data (~0.1 s)."""
    torch.manual_seed(0)
    x, y = _separable()
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(150):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _small_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()


def _images(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 8, 8, generator=g)
    x[0] = 0.0  # on the box's faces: clipping matters
    x[1] = 1.0
    return x, torch.randint(0, 3, (n,), generator=g)


def test_linear_model_is_accurate(linear_model):
    x, y = _separable(seed=1)
    assert natural_accuracy(linear_model, x, y) >= 0.98


def test_adversarial_loss_exceeds_clean_and_random_loss(linear_model):
    x, y = _separable(50, seed=2)
    eps = 0.1
    adv = pgd_linf(linear_model, x, y, eps=eps, alpha=0.02, steps=10)
    noise = (torch.rand(x.shape, generator=torch.Generator().manual_seed(3)) * 2 - 1).sign() * eps
    with torch.no_grad():
        clean = F.cross_entropy(linear_model(x), y, reduction="none")
        rand = F.cross_entropy(linear_model((x + noise).clamp(0, 1)), y, reduction="none")
        attacked = F.cross_entropy(linear_model(adv), y, reduction="none")
    assert (attacked > clean).all()
    assert (attacked > rand).all()


def test_pgd_reaches_the_optimal_corner_of_a_linear_model(linear_model):
    """For a 2-class linear model the input gradient of the CE has the constant sign
    sign(w_other - w_y), so the L∞ optimum is clip(x + eps·sign(w_other - w_y), 0, 1);
    PGD with steps·alpha >= 2·eps must reach it exactly from any random start."""
    x, y = _separable(40, seed=4)
    eps = 0.15
    w = linear_model[1].weight.detach()  # (2, 16)
    direction = (w[1 - y] - w[y]).sign().view_as(x)
    assert (direction != 0).all()
    expected = (x + eps * direction).clamp(0, 1)
    adv = pgd_linf(linear_model, x, y, eps=eps, alpha=0.05, steps=8)
    torch.testing.assert_close(adv, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("random_start", [True, False])
def test_adversarial_images_stay_in_ball_and_box(random_start):
    model = _small_cnn()
    x, y = _images()
    eps = 0.2
    adv = pgd_linf(model, x, y, eps=eps, alpha=0.15, steps=4, random_start=random_start)
    assert adv.shape == x.shape and not adv.requires_grad
    assert (adv - x).abs().max() <= eps + 1e-6
    assert adv.min() >= 0 and adv.max() <= 1
    assert (adv != x).any()


def test_random_start_only_is_uniform_in_the_ball():
    model = _small_cnn()
    x = torch.full((4, 1, 8, 8), 0.5)
    y = torch.zeros(4, dtype=torch.long)
    start = pgd_linf(model, x, y, eps=0.1, alpha=0.01, steps=0, generator=torch.Generator().manual_seed(5))
    d = start - x
    assert d.abs().max() <= 0.1 + 1e-6
    assert d.min() < -0.09 and d.max() > 0.09 and abs(d.mean()) < 0.02
    assert torch.equal(pgd_linf(model, x, y, eps=0.1, alpha=0.01, steps=0, random_start=False), x)


def test_same_seed_same_output_other_seed_other_output():
    model = _small_cnn()
    x, y = _images()
    run = lambda seed: pgd_linf(model, x, y, eps=0.1, alpha=0.02, steps=3,  # noqa: E731
                                generator=torch.Generator().manual_seed(seed))
    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))
    # no generator: seeded 0, so still reproducible
    a = pgd_linf(model, x, y, eps=0.1, alpha=0.02, steps=3)
    assert torch.equal(a, pgd_linf(model, x, y, eps=0.1, alpha=0.02, steps=3))
    assert torch.equal(a, run(0))


@pytest.mark.parametrize("train_mode", [True, False])
def test_model_mode_and_parameter_grads_untouched(train_mode):
    model = _small_cnn()
    model.train(train_mode)
    x, y = _images()
    pgd_linf(model, x, y, eps=0.1, alpha=0.02, steps=2)
    assert model.training == train_mode
    assert all(p.grad is None for p in model.parameters())


def test_input_validation():
    model = _small_cnn()
    x, y = _images()
    with pytest.raises(ValueError, match="B, C, H, W"):
        pgd_linf(model, x[:, 0], y, eps=0.1, alpha=0.01, steps=1)
    with pytest.raises(ValueError, match="labels"):
        pgd_linf(model, x, y[:-1], eps=0.1, alpha=0.01, steps=1)
    with pytest.raises(ValueError):
        pgd_linf(model, x, y, eps=-0.1, alpha=0.01, steps=1)


def test_robust_accuracy_far_below_clean_for_a_natural_model(linear_model):
    x, y = _separable(200, seed=6)
    clean = natural_accuracy(linear_model, x, y)
    robust = robust_accuracy(linear_model, x, y, eps=0.3, alpha=0.05, steps=10, batch_size=64)
    assert clean >= 0.98
    assert robust <= 0.1
    # with a radius far below the class gap, nothing flips
    assert robust_accuracy(linear_model, x, y, eps=0.01, alpha=0.005, steps=5) == pytest.approx(clean)


def test_accuracies_accept_uint8_like_float():
    model = _small_cnn()
    g = torch.Generator().manual_seed(9)
    xu = torch.randint(0, 256, (20, 1, 8, 8), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 3, (20,), generator=g)
    xf = xu.float() / 255
    with torch.no_grad():
        expected = (model(xf).argmax(1) == y).float().mean().item()
    assert natural_accuracy(model, xu, y, batch_size=7) == pytest.approx(expected)
    assert natural_accuracy(model, xf, y) == pytest.approx(expected)
    kw = dict(eps=0.05, alpha=0.02, steps=3, batch_size=8, seed=1)
    assert robust_accuracy(model, xu, y, **kw) == robust_accuracy(model, xf, y, **kw)
    assert robust_accuracy(model, xu, y, **kw) <= expected
