"""Fixtures for the metrics tests: real FMNIST images and a quickly trained LeNet.

The metrics library must not depend on the model zoo, so the LeNet of PROTOCOL §5 is defined
here (conv 1->6 k5, maxpool 2, ReLU, conv 6->16 k5, maxpool 2, ReLU, fc 256-120-84-10).
FMNIST is read from the raw idx files (Debian's ``dataset-fashion-mnist`` layout); the tests
that need it are skipped, with the reason, when the files are absent. Point
``SALBENCH_FMNIST_DIR`` elsewhere to use another copy.
"""

from __future__ import annotations

import contextlib
import gzip
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

FMNIST_DIR = Path(os.environ.get("SALBENCH_FMNIST_DIR", "/usr/share/datasets/fashion-mnist"))
N_TEST_IMAGES = 400
N_TRAIN_IMAGES = 6000
N_IG_IMAGES = 100


def _read_idx(split: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    prefix = "t10k" if split == "test" else "train"
    images_path = FMNIST_DIR / f"{prefix}-images-idx3-ubyte.gz"
    labels_path = FMNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz"
    if not images_path.exists() or not labels_path.exists():
        pytest.skip(
            f"FMNIST idx files not found under {FMNIST_DIR} (install Debian's dataset-fashion-mnist "
            "or set SALBENCH_FMNIST_DIR)"
        )
    with gzip.open(images_path) as f:  # only decompress the first n images
        images = np.frombuffer(f.read(16 + n * 28 * 28), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(labels_path) as f:
        labels = np.frombuffer(f.read(8 + n), np.uint8, offset=8)
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    return x, torch.from_numpy(labels.astype(np.int64))


def make_lenet(num_classes: int = 10) -> nn.Module:
    """The authors' FMNIST LeNet (PROTOCOL §5) on [0, 1] inputs."""
    return nn.Sequential(
        nn.Conv2d(1, 6, 5),
        nn.MaxPool2d(2),
        nn.ReLU(),
        nn.Conv2d(6, 16, 5),
        nn.MaxPool2d(2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(256, 120),
        nn.ReLU(),
        nn.Linear(120, 84),
        nn.ReLU(),
        nn.Linear(84, num_classes),
    )


@contextlib.contextmanager
def one_torch_thread():
    """One intra-op thread inside the block, the previous setting restored afterwards.

    On a machine whose cores are busy (model training in the background), torch's OpenMP
    threads spin-wait for each other and a chain of small ops gets up to 100x slower. The
    results do not depend on the thread count.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread_per_module():
    with one_torch_thread():
        yield


@pytest.fixture(scope="session")
def fmnist_test() -> tuple[torch.Tensor, torch.Tensor]:
    """The first 400 FMNIST test images (400, 1, 28, 28) in [0, 1] and their labels."""
    return _read_idx("test", N_TEST_IMAGES)


@pytest.fixture(scope="session")
def lenet() -> nn.Module:
    """A LeNet trained for one epoch (Adam 2e-3, batch 32) on 6000 FMNIST training images.

    Takes a few seconds; about 75 % test accuracy, enough for non-trivial saliency maps.
    """
    x, y = _read_idx("train", N_TRAIN_IMAGES)
    torch.manual_seed(0)
    model = make_lenet()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    with one_torch_thread():
        for i in range(0, len(x), 32):
            idx = perm[i : i + 32]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.zero_grad(set_to_none=True)
    return model.eval()


@pytest.fixture(scope="session")
def vg_maps(lenet, fmnist_test) -> torch.Tensor:
    """Vanilla-gradient maps (400, 28, 28) of the trained LeNet on the test images."""
    from salbench.metrics import vanilla_gradient

    x, y = fmnist_test
    with one_torch_thread():
        return vanilla_gradient(lenet, x, y)


@pytest.fixture(scope="session")
def ig_maps(lenet, fmnist_test) -> torch.Tensor:
    """Integrated-gradients maps (100, 28, 28) of the trained LeNet on the first 100 test images."""
    from salbench.metrics import integrated_gradients

    x, y = fmnist_test
    with one_torch_thread():
        return integrated_gradients(lenet, x[:N_IG_IMAGES], y[:N_IG_IMAGES])
