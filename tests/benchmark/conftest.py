"""A small, self-contained zoo + image set for harness tests (real FMNIST images, tiny models)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from salbench.benchmark.imagesets import build_imageset, load_imageset
from salbench.benchmark.scoring import ScoreConfig
from salbench.model_zoo import zoo
from salbench.model_zoo.architectures import build
from salbench.model_zoo.data import DatasetNotFoundError, Split, load_split

N_TEST = 300  # test images the tiny environment uses
SET_N = 40  # image-set size in these tests
FAST = ScoreConfig(batch_size=20, ig_steps=4)


def _fmnist(split):
    try:
        return load_split("fmnist", split, download=False)
    except DatasetNotFoundError as e:
        pytest.skip(f"FMNIST not available ({e}); `make data` fetches it")


@pytest.fixture(scope="session")
def fmnist_small():
    tr, te = _fmnist("train"), _fmnist("test")
    train = Split("fmnist", "train", tr.images[:3000], tr.labels[:3000], tr.source)
    test = Split("fmnist", "test", te.images[:N_TEST], te.labels[:N_TEST], te.source)
    return train, test


def quick_train(train: Split, smoothing=None, seed=0, steps=150) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build("lenet", smoothing=smoothing)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(train), (64,), generator=g)
        loss = F.cross_entropy(model(train.float_images(idx)), train.labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def write_zoo_entry(zdir: Path, model, *, mid: str, variant: str, smoothing=None) -> dict:
    payload = zoo.state_dict_bytes(model)
    digest = hashlib.sha256(payload).hexdigest()
    fname = f"{mid}-{digest[:8]}.safetensors"
    zoo.atomic_write_bytes(zdir / "checkpoints" / fname, payload)
    card = zoo.make_card(model_id=mid, model=model, weights_file=fname, sha256=digest, dataset="fmnist", arch="lenet",
                         variant=variant, preset="test", recipe=None, smoothing=smoothing, natural_accuracy=0.0,
                         robust_accuracy=0.0, robust_protocol={})
    zoo.atomic_write_json(zdir / "cards" / f"{mid}.json", card)
    return card


@pytest.fixture(scope="session")
def trained_models(fmnist_small):
    train, _ = fmnist_small
    sm = {"filter": "gaussian", "placement": 1}
    return {"N": (quick_train(train, seed=0), None), "A": (quick_train(train, seed=1), None),
            "G": (quick_train(train, smoothing=sm, seed=2), sm)}


@pytest.fixture
def env(tmp_path, fmnist_small, trained_models, monkeypatch):
    """A private zoo, image set and leaderboards folder (via the SALBENCH_* variables)."""
    _, test = fmnist_small
    zdir, sets, lb = tmp_path / "zoo", tmp_path / "imagesets", tmp_path / "leaderboards"
    monkeypatch.setenv("SALBENCH_ZOO_DIR", str(zdir))
    monkeypatch.setenv("SALBENCH_IMAGESETS_DIR", str(sets))
    monkeypatch.setenv("SALBENCH_LEADERBOARDS_DIR", str(lb))
    refs = {}
    for v, (model, sm) in trained_models.items():
        refs[v] = write_zoo_entry(zdir, model, mid=f"fmnist-lenet-{v}-test", variant=v, smoothing=sm)["id"]
    build_imageset("fmnist", refs, n=SET_N, test_split=test)
    imageset = load_imageset("fmnist", test_split=test)
    return {"zoo": zdir, "sets": sets, "lb": lb, "test": test, "imageset": imageset, "refs": refs, "tmp": tmp_path}
