"""Shared fixtures of the model_zoo tests: one torch thread, small FMNIST (or synthetic) splits.

Everything here is sized for a busy 2-core machine: small subsets, few PGD steps, tiny images.
"""

from __future__ import annotations

import pytest
import torch

from salbench.model_zoo.data import DatasetNotFoundError, Split, load_split

N_TRAIN = 64  # training images of the tiny trainer runs
N_TEST = 100  # test images the tiny trainer evaluates on


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: several threads on a 2-core machine that is already training
    thrash (10x slower), and CPU results depend on the thread count, which the crash/resume
    test must keep equal between the parent and the child process. Module-scoped so that it
    is in force before the module-scoped fixtures that train."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def real_fmnist(split: str) -> Split | None:
    try:
        return load_split("fmnist", split, download=False)
    except DatasetNotFoundError:
        return None


def synthetic_split(split: str, n: int, seed: int, shape=(1, 28, 28)) -> Split:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 10, (n,), generator=g)
    return Split("fmnist", split, images, labels, "synthetic")


@pytest.fixture(scope="session")
def tiny_fmnist() -> tuple[Split, Split]:
    """(train, test): the first N_TRAIN / N_TEST images of the real FMNIST when it is installed,
    else random synthetic splits of the same shape (the trainer tests only need *some* data)."""
    tr, te = real_fmnist("train"), real_fmnist("test")
    if tr is None or te is None:
        return synthetic_split("train", N_TRAIN, 0), synthetic_split("test", N_TEST, 1)
    return (
        Split("fmnist", "train", tr.images[:N_TRAIN].clone(), tr.labels[:N_TRAIN].clone(), tr.source),
        Split("fmnist", "test", te.images[:N_TEST].clone(), te.labels[:N_TEST].clone(), te.source),
    )
