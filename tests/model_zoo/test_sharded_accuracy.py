"""Accuracy over a subset of the evaluation batches (distributed scoring, issue 12): shards summed
give the single-process count, and PGD's random starts do not depend on the sharding."""

from __future__ import annotations

import torch

from salbench.model_zoo import attacks
from salbench.model_zoo.attacks import natural_accuracy, natural_correct, robust_accuracy, robust_correct


def _data(n=230):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
    x = (torch.rand(n, 1, 28, 28, generator=g) * 255).to(torch.uint8)
    return model, x, torch.randint(0, 10, (n,), generator=g)


def test_random_starts_of_a_batch_do_not_depend_on_the_other_batches(monkeypatch):
    model, x, y = _data()
    seen = {}
    real = attacks.pgd_linf

    def spy(model, xb, yb, **kw):  # the random start this batch gets: the generator's state before it
        seen.setdefault(key, []).append(kw["generator"].get_state().clone())
        return real(model, xb, yb, **kw)

    monkeypatch.setattr(attacks, "pgd_linf", spy)
    kw = dict(eps=0.1, alpha=0.01, steps=1, batch_size=50)  # 5 batches (50, 50, 50, 50, 30)
    key = "all"
    robust_correct(model, x, y, **kw)
    for r in range(2):
        key = r
        robust_correct(model, x, y, **kw, batches=range(r, 5, 2))
    assert [torch.equal(a, b) for a, b in zip(seen["all"], [seen[0][0], seen[1][0], seen[0][1], seen[1][1],
                                                              seen[0][2]])] == [True] * 5


def test_shards_sum_to_the_single_process_counts():
    model, x, y = _data()
    kw = dict(eps=0.004, alpha=0.002, steps=2, batch_size=50)
    total = robust_accuracy(model, x, y, **kw) * len(x)
    assert sum(robust_correct(model, x, y, **kw, batches=range(r, 5, 3)) for r in range(3)) == round(total)
    assert sum(natural_correct(model, x, y, batch_size=100, batches=[b]) for b in range(3)) == round(
        natural_accuracy(model, x, y, batch_size=100) * len(x))
