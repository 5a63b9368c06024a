"""The ImageNette path end to end at 224x224 on a generated image folder in torchvision's layout:
train one step (N, A with PGD, G with a SmoothBlock after layer1), build a 20-image set, score,
leaderboard row. No copy of ImageNette is needed (or downloaded)."""

from dataclasses import replace

import numpy as np
import pandas as pd
import torch
from PIL import Image

from salbench.benchmark import harness
from salbench.benchmark.imagesets import build_imageset, load_imageset
from salbench.benchmark.scoring import ScoreConfig
from salbench.model_zoo import zoo
from salbench.model_zoo.data import load_split
from salbench.model_zoo.recipes import get_recipe
from salbench.model_zoo.training import train

WNIDS = [f"n0{i}000000" for i in range(10)]


def _make_folder(root, per_class: dict[str, int]):
    rng = np.random.default_rng(0)
    for split, k in per_class.items():
        for c, wnid in enumerate(WNIDS):
            d = root / "imagenette2-320" / split / wnid
            d.mkdir(parents=True)
            base = np.array([(c * 25) % 256, (c * 70) % 256, 255 - c * 25], dtype=np.float64)
            for j in range(k):
                h, w = int(rng.integers(240, 330)), int(rng.integers(260, 400))
                img = np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"img_{j}.JPEG", quality=90)


def _linear_probe(model, x, y):
    """Fit the last layer by ridge regression on the (1-step-trained) features: test scaffolding that
    makes the generated classes separable so a 20-image commonly-correct set exists."""
    captured = {}
    hook = model.head[2].register_forward_pre_hook(lambda m, inp: captured.update(f=inp[0]))
    with torch.no_grad():
        model(x)
        hook.remove()
        feats = captured["f"]
        f1 = torch.cat([feats, torch.ones(len(feats), 1)], 1).double()
        target = torch.nn.functional.one_hot(y, 10).double() * 10 - 5
        w = torch.linalg.solve(f1.T @ f1 + 1e-3 * torch.eye(f1.shape[1], dtype=torch.float64), f1.T @ target)
        model.head[2].weight.copy_(w[:-1].T.float())
        model.head[2].bias.copy_(w[-1].float())


def test_imagenette_end_to_end(tmp_path, monkeypatch):
    _make_folder(tmp_path / "data", {"train": 2, "val": 3})
    monkeypatch.setenv("SALBENCH_IMAGENETTE_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("SALBENCH_ZOO_DIR", str(tmp_path / "zoo"))
    monkeypatch.setenv("SALBENCH_IMAGESETS_DIR", str(tmp_path / "sets"))
    monkeypatch.setenv("SALBENCH_LEADERBOARDS_DIR", str(tmp_path / "lb"))
    tr, te = load_split("imagenette", "train", download=False), load_split("imagenette", "test", download=False)
    assert tr.images.shape == (20, 3, 224, 224) and te.images.shape == (30, 3, 224, 224)
    assert te.labels.tolist() == sorted(te.labels.tolist())

    refs = {}
    for v in ("N", "A", "G"):
        r = replace(get_recipe("imagenette", "paper", v), epochs=1, batch_size=20, attack_steps=min(
            get_recipe("imagenette", "paper", v).attack_steps, 1), eval_steps=1)
        card = train(r, work_dir=tmp_path / "runs", out_dir=tmp_path / "zoo", progress=False, train_split=tr,
                     test_split=te)
        assert card["arch"] == "resnet18" and (card["smoothing"] or {}).get("placement", 1) == 1
        model = zoo.load(card["id"])
        _linear_probe(model, te.float_images(), te.labels)
        # re-publish the probed weights under the same id (the card's sha256 follows the weights)
        payload = zoo.state_dict_bytes(model)
        import hashlib

        card["sha256"] = hashlib.sha256(payload).hexdigest()
        zoo.atomic_write_bytes(tmp_path / "zoo" / "checkpoints" / card["weights"], payload)
        zoo.atomic_write_json(tmp_path / "zoo" / "cards" / f"{card['id']}.json", card)
        refs[v] = card["id"]
    assert zoo.load(refs["G"]).smooth is not None

    build_imageset("imagenette", refs, n=20, test_split=te)
    s = load_imageset("imagenette", test_split=te)
    assert len(s) == 20 and s.images.shape[-2:] == (224, 224)
    cfg = ScoreConfig(batch_size=10, ig_steps=2, sigmas=(0.05,), ros_samples=2, road_percentages=(1, 51, 96),
                      accuracy=False)
    # band=False: the one-ulp and float64 re-scores of a ResNet-18 at 224x224 would triple this test's time;
    # bands are tested on FMNIST (test_bands.py), the same code for every dataset
    harness.score_zoo("imagenette", config=cfg, progress=False, imageset=s, test_split=te, only=[refs["G"]],
                      band=False)
    df = pd.read_csv(tmp_path / "lb" / "imagenette.csv")
    assert len(df) == 2 and set(df["method"]) == {"VG", "IG"} and (df["id"] == refs["G"]).all()
    assert df["acc_on_set"].tolist() == [1.0, 1.0]
    assert df["gini"].between(0, 1).all() and df["aopc"].notna().all()
