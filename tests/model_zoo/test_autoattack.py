"""AutoAttack: the standard L∞ settings, and a scaled-down run that must beat no attack."""

import pytest
import torch

from salbench.model_zoo.architectures import build
from salbench.model_zoo.attacks import natural_accuracy, robust_accuracy
from salbench.model_zoo.autoattack import STANDARD, autoattack_accuracy, standard_autoattack


def test_standard_settings_are_the_references():
    """The reference (fra31/auto-attack, version='standard'): APGD-CE and APGD-T 100 iterations,
    FAB-T 100 iterations, 9 target classes, Square 5000 queries, 1 restart each."""
    model = build("lenet", num_classes=10, dataset="fmnist").eval()
    apgd, apgdt, fab, square = standard_autoattack(model, eps=0.1, n_classes=10).attacks
    assert (apgd.steps, apgd.loss, apgd.n_restarts) == (100, "ce", 1)
    assert (apgdt.steps, apgdt.n_target_classes, apgdt.n_restarts) == (100, 9, 1)
    assert (fab.steps, fab.n_target_classes, fab.multi_targeted, fab.n_restarts) == (100, 9, True, 1)
    assert (square.n_queries, square.n_restarts) == (5000, 1)
    assert all(a.eps == 0.1 and a.norm == "Linf" for a in (apgd, apgdt, fab, square))
    assert STANDARD["apgd_ce_steps"] == 100


def test_autoattack_is_at_least_as_strong_as_pgd_and_stays_in_the_ball():
    torch.manual_seed(0)
    model = build("lenet", num_classes=10, dataset="fmnist").eval()
    x = torch.rand(24, 1, 28, 28)
    with torch.no_grad():
        y = model(x).argmax(1)  # every image correct at eps 0
    assert natural_accuracy(model, x, y) == 1.0
    eps = 0.05
    aa = autoattack_accuracy(model, x, y, eps=eps, n_classes=10, steps=10, queries=50)
    pgd = robust_accuracy(model, x, y, eps=eps, alpha=0.01, steps=10)
    assert aa <= pgd and aa < 1.0
    assert autoattack_accuracy(model, x, y, eps=0.0, n_classes=10, steps=2, queries=5) == 1.0


def test_bad_input_is_refused():
    model = build("lenet", num_classes=10, dataset="fmnist").eval()
    with pytest.raises(ValueError, match="expected images"):
        autoattack_accuracy(model, torch.rand(3, 28, 28), torch.zeros(3, dtype=torch.long), eps=0.1, n_classes=10)
    with pytest.raises(ValueError, match="eps"):
        autoattack_accuracy(model, torch.rand(2, 1, 28, 28), torch.zeros(2, dtype=torch.long), eps=-1, n_classes=10)
