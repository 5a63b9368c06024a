"""Fixtures and the speed-ratio summary of the metrics benchmarks.

Run: ``.venv/bin/python -m pytest benchmarks -p no:cacheprovider --benchmark-only`` (the default
test command does not collect this directory). Every benchmark times a SalBench metric and the
reference implementation on the same inputs and records ``ours_s``, ``reference_s`` and
``ratio = reference / ours`` (per image where the two sides ran on different numbers of
images) in ``benchmark.extra_info``; a table of all ratios is printed at the end.

Both sides run with ``torch.set_num_threads(1)``: the references (quantus, scipy, skimage) are
single-threaded numpy code, and on a machine whose cores are busy torch's OpenMP threads
spin-wait and make a chain of small ops up to 100x slower.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

FMNIST_DIR = Path(os.environ.get("SALBENCH_FMNIST_DIR", "/usr/share/datasets/fashion-mnist"))
N_IMAGES = 1000
_RESULTS: list[dict] = []


def _read_idx(split: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    prefix = "t10k" if split == "test" else "train"
    images_path = FMNIST_DIR / f"{prefix}-images-idx3-ubyte.gz"
    labels_path = FMNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz"
    if not images_path.exists() or not labels_path.exists():
        pytest.skip(f"FMNIST idx files not found under {FMNIST_DIR} (set SALBENCH_FMNIST_DIR)")
    with gzip.open(images_path) as f:
        images = np.frombuffer(f.read(16 + n * 784), np.uint8, offset=16).reshape(-1, 1, 28, 28)
    with gzip.open(labels_path) as f:
        labels = np.frombuffer(f.read(8 + n), np.uint8, offset=8)
    return torch.from_numpy(images.astype(np.float32) / 255.0), torch.from_numpy(labels.astype(np.int64))


def _lenet() -> nn.Module:
    try:  # the zoo's LeNet (PROTOCOL §5), normalisation included
        from salbench.model_zoo.architectures import build

        return build("lenet", num_classes=10)
    except Exception:  # the same layers, if the zoo is not importable
        return nn.Sequential(
            nn.Conv2d(1, 6, 5), nn.MaxPool2d(2), nn.ReLU(), nn.Conv2d(6, 16, 5), nn.MaxPool2d(2), nn.ReLU(),
            nn.Flatten(), nn.Linear(256, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10),
        )  # fmt: skip


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def fmnist() -> tuple[torch.Tensor, torch.Tensor]:
    """The first 1000 FMNIST test images (1000, 1, 28, 28) and labels."""
    return _read_idx("test", N_IMAGES)


@pytest.fixture(scope="session")
def lenet(one_thread) -> nn.Module:
    """The LeNet trained one epoch (Adam 2e-3, batch 32) on 6000 FMNIST training images."""
    x, y = _read_idx("train", 6000)
    torch.manual_seed(0)
    model = _lenet()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    for i in range(0, len(x), 32):
        idx = perm[i : i + 32]
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    return model.eval()


@pytest.fixture(scope="session")
def vg_maps(lenet, fmnist) -> torch.Tensor:
    from salbench.metrics import vanilla_gradient

    return vanilla_gradient(lenet, *fmnist)


@pytest.fixture
def record():
    """``record(benchmark, name, ours_s, reference_s, target, **info)``: store and attach a ratio."""

    def _record(benchmark, name: str, ours_s: float, reference_s: float, target: float, **info) -> float:
        ratio = reference_s / ours_s
        benchmark.extra_info.update(
            {"ours_s": ours_s, "reference_s": reference_s, "ratio": ratio, "target": target, **info}
        )
        _RESULTS.append(
            {"name": name, "ours_s": ours_s, "reference_s": reference_s, "ratio": ratio, "target": target, **info}
        )
        return ratio

    return _record


def pytest_terminal_summary(terminalreporter):
    if not _RESULTS:
        return
    tr = terminalreporter
    tr.section("SalBench metrics: speed ratios (reference time / our time, same inputs)")
    tr.write_line(f"{'benchmark':<46} {'ours [s]':>10} {'reference [s]':>14} {'ratio':>8} {'target':>7}  met")
    for r in _RESULTS:
        met = "yes" if r["ratio"] >= r["target"] else "NO"
        tr.write_line(
            f"{r['name']:<46} {r['ours_s']:>10.4f} {r['reference_s']:>14.4f} "
            f"{r['ratio']:>7.1f}x {r['target']:>6.1f}x  {met}"
        )
        notes = {k: v for k, v in r.items() if k not in ("name", "ours_s", "reference_s", "ratio", "target")}
        if notes:
            tr.write_line("    " + ", ".join(f"{k}={v}" for k, v in notes.items()))
