import json

import numpy as np
import pytest
import torch

from salbench.benchmark.imagesets import ImageSetError, load_imageset, select_indices
from salbench.model_zoo import zoo
from salbench.model_zoo.data import Split


def test_selection_follows_protocol():
    correct = torch.rand(5000, generator=torch.Generator().manual_seed(1)) < 0.7
    idx = select_indices(correct, n=1000)
    pool = np.flatnonzero(correct.numpy())
    expected = np.sort(np.random.default_rng(0).choice(pool, 1000, replace=False))
    assert idx.tolist() == expected.tolist()
    assert correct[torch.as_tensor(idx)].all() and len(set(idx.tolist())) == 1000


def test_selection_too_small_pool():
    with pytest.raises(ImageSetError, match="need 10"):
        select_indices(torch.tensor([True] * 5 + [False] * 20), n=10)


def test_set_is_commonly_correct_and_verified(env):
    s = env["imageset"]
    doc = json.loads((env["sets"] / "fmnist.json").read_text())
    assert len(s) == len(doc["indices"]) == 40 and doc["indices"] == sorted(doc["indices"])
    for v, mid in env["refs"].items():
        model = zoo.load(mid)
        with torch.no_grad():
            assert (model(s.images.float() / 255).argmax(1) == s.labels).all(), v
    assert set(doc["reference_models"]) == {"N", "A", "G"}


def test_changed_image_bytes_is_an_error(env):
    test = env["test"]
    imgs = test.images.clone()
    first = json.loads((env["sets"] / "fmnist.json").read_text())["indices"][0]
    imgs[first, 0, 0, 0] ^= 1
    with pytest.raises(ImageSetError, match="dataset files"):
        load_imageset("fmnist", test_split=Split("fmnist", "test", imgs, test.labels, "altered"))


def test_changed_reference_checkpoint_is_an_error(env):
    p = env["zoo"] / "cards" / "fmnist-lenet-A-test.json"
    card = json.loads(p.read_text())
    card["sha256"] = "0" * 64
    p.write_text(json.dumps(card))
    with pytest.raises(ImageSetError, match="fmnist-lenet-A-test"):
        load_imageset("fmnist", test_split=env["test"])


def test_missing_set_says_how_to_build(tmp_path, monkeypatch):
    monkeypatch.setenv("SALBENCH_IMAGESETS_DIR", str(tmp_path))
    with pytest.raises(ImageSetError, match="salbench imageset build"):
        load_imageset("fmnist", test_split=Split("fmnist", "test", torch.zeros(1, 1, 28, 28, dtype=torch.uint8),
                                                 torch.zeros(1, dtype=torch.int64), "x"))
