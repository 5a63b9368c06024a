"""Walk every zoo card (torchvision-style weights-as-data test).

For each ``cards/*.json`` of the zoo (``$SALBENCH_ZOO_DIR`` or the bundled ``model_zoo/``):
the schema, the weights file's sha256, the parameter count recomputed from the rebuilt model,
and the card's accuracies re-measured on the local test split.

Accuracy check, and why it is not "500 images within 1.5 points": the card's natural accuracy
is measured on the whole 10k test split. On a 500-image subset the binomial standard error is
sqrt(p(1-p)/500), ~1.3 points at p = 0.9 and ~2.2 at p = 0.5, so a fixed 1.5-point band would
fail a correct card often. Instead:
  * for archs cheap enough to run the whole split (LeNet: < 1 s for 10k on one core) we
    recompute the full-split accuracy, which must match the card up to a handful of borderline
    images (0.2 points) that another device/BLAS may flip;
  * for every card, the first 500 test images must lie within a 3-sigma binomial band of the
    card's accuracy (plus one image for discreteness): a cheap check that the weights, the
    architecture and the data pipeline (normalisation, channel order, resizing) fit together;
  * for the cheap archs also the robust accuracy: PGD with the card's protocol on the first
    100 of the card's 1000 images, within a 3-sigma band.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from salbench.model_zoo import zoo
from salbench.model_zoo.architectures import arch_spec, build, list_archs
from salbench.model_zoo.attacks import natural_accuracy, robust_accuracy
from salbench.model_zoo.data import DATASETS, NUM_CLASSES, DatasetNotFoundError, Split, load_split
from salbench.model_zoo.recipes import PRESETS, VARIANT_FILTER, VARIANTS, Recipe, get_recipe
from salbench.model_zoo.training import model_id_for

CARDS_DIR = zoo.default_cards_dir()
CARD_PATHS = sorted(CARDS_DIR.glob("*.json"))
FULL_SPLIT_ARCHS = {"lenet"}  # archs whose whole-test-split pass costs < ~1 s on one core
SUBSET = 500
ROBUST_SUBSET = 100
FULL_SPLIT_TOLERANCE = 0.002

# PROTOCOL §3 "Accuracy": (eps, alpha, steps) of the robust accuracy, typed here independently
ROBUST_PROTOCOL = {"fmnist": (0.1, 0.01, 40), "cifar10": (8 / 255, 2 / 255, 10), "imagenette": (1 / 255, 2 / 255, 20)}

FIELD_TYPES = {
    "id": str, "dataset": str, "arch": str, "variant": str, "preset": str, "recipe": dict,
    "smoothing": (dict, type(None)), "num_classes": int, "weights": str, "sha256": str,
    "natural_accuracy": (float, int), "robust_accuracy": (float, int), "robust_protocol": dict,
    "num_params": int, "torch_version": str, "trainer_commit": str, "created": str, "source": str,
    "card_schema": int,
}

_SPLITS: dict[str, Split | None] = {}


def local_test_split(dataset: str) -> Split:
    if dataset not in _SPLITS:
        try:
            _SPLITS[dataset] = load_split(dataset, "test", download=False)
        except DatasetNotFoundError:
            _SPLITS[dataset] = None
    if _SPLITS[dataset] is None:
        pytest.skip(f"{dataset} test split not available locally (see model_zoo/data.py for how to get it)")
    return _SPLITS[dataset]


def binomial_band(p: float, n: int) -> float:
    return 3 * math.sqrt(max(p * (1 - p), 0.0) / n) + 1 / n


def check_schema(card: dict, path: Path) -> None:
    assert set(zoo.CARD_FIELDS) <= set(card), f"missing fields {set(zoo.CARD_FIELDS) - set(card)}"
    for k, t in FIELD_TYPES.items():
        assert isinstance(card[k], t) and not isinstance(card[k], bool), f"{k}: {type(card[k]).__name__}"
    assert card["card_schema"] == zoo.CARD_SCHEMA_VERSION
    assert card["id"] == path.stem
    assert card["source"] == "zoo"
    assert card["dataset"] in DATASETS
    assert card["arch"] in list_archs() and card["dataset"] in arch_spec(card["arch"]).datasets
    assert card["variant"] in VARIANTS
    base = card["preset"].removesuffix("-randlabels") if card["recipe"].get("permute_labels") else card["preset"]
    assert f"{card['dataset']}/{base}" in PRESETS  # a data-randomisation control names its preset's
    assert card["num_classes"] == NUM_CLASSES[card["dataset"]]
    assert re.fullmatch(r"[0-9a-f]{64}", card["sha256"])
    assert card["weights"] == f"{card['id']}-{card['sha256'][:8]}.safetensors"
    recipe = Recipe.from_dict(card["recipe"])
    assert (recipe.dataset, recipe.arch, recipe.variant, recipe.preset) == (
        card["dataset"], card["arch"], card["variant"], card["preset"])
    assert card["smoothing"] == recipe.smoothing
    assert recipe.smoothing_filter == VARIANT_FILTER[card["variant"]]
    for k in ("natural_accuracy", "robust_accuracy"):
        assert 0.0 <= card[k] <= 1.0
    proto = card["robust_protocol"]
    eps, alpha, steps = ROBUST_PROTOCOL[card["dataset"]]
    assert proto["eps"] == pytest.approx(eps) and proto["alpha"] == pytest.approx(alpha)
    assert proto["steps"] == steps and proto["random_start"] is True
    assert (recipe.eval_eps, recipe.eval_alpha, recipe.eval_steps) == (proto["eps"], proto["alpha"], proto["steps"])
    created = dt.datetime.fromisoformat(card["created"])
    assert created.tzinfo is not None
    assert card["num_params"] > 0


def walk_card(path: Path) -> None:
    """Every check of one card; raises AssertionError (or CheckpointError) when the card is wrong."""
    card = json.loads(path.read_text())
    check_schema(card, path)
    cards_dir = path.parent
    weights = zoo.weights_path(card, cards_dir)
    assert weights.is_file(), f"{weights} missing"
    assert zoo.sha256_file(weights) == card["sha256"]
    model = zoo.load(card["id"], cards_dir=cards_dir)
    assert sum(p.numel() for p in model.parameters()) == card["num_params"]

    test = local_test_split(card["dataset"])
    p = card["natural_accuracy"]
    sub = natural_accuracy(model, test.images[:SUBSET], test.labels[:SUBSET])
    assert abs(sub - p) <= binomial_band(p, SUBSET), (
        f"{card['id']}: accuracy {sub:.4f} on the first {SUBSET} test images vs {p:.4f} on the card")
    if card["arch"] in FULL_SPLIT_ARCHS:
        full = natural_accuracy(model, test.images, test.labels)
        assert abs(full - p) <= FULL_SPLIT_TOLERANCE, f"{card['id']}: full-split accuracy {full:.4f} vs card {p:.4f}"
        proto = card["robust_protocol"]
        rob = robust_accuracy(model, test.images[:ROBUST_SUBSET], test.labels[:ROBUST_SUBSET], eps=proto["eps"],
                              alpha=proto["alpha"], steps=proto["steps"], seed=proto.get("seed", 0))
        r = card["robust_accuracy"]
        assert abs(rob - r) <= binomial_band(r, ROBUST_SUBSET), (
            f"{card['id']}: robust accuracy {rob:.3f} on the first {ROBUST_SUBSET} images vs card {r:.3f}")


_NO_CARDS = pytest.param(
    None, id="no-cards",
    marks=pytest.mark.skip(reason=f"no zoo cards in {CARDS_DIR} yet (`salbench train` writes them)"),
)


@pytest.mark.parametrize("path", [pytest.param(p, id=p.stem) for p in CARD_PATHS] or [_NO_CARDS])
def test_zoo_card(path):
    walk_card(path)


# ----------------------------------------------------------------------------- the walk itself
@pytest.fixture(scope="module")
def fake_zoo(tmp_path_factory, tiny_fmnist):
    """A zoo with one honest LeNet card (accuracies measured the way publish() does, but robust
    accuracy on the first 100 images only, to stay cheap)."""
    test = local_test_split("fmnist")
    tr, _ = tiny_fmnist
    recipe = get_recipe("fmnist", "tiny", "N")
    torch.manual_seed(0)
    model = build("lenet")
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    x = tr.float_images()
    for _ in range(40):
        loss = F.cross_entropy(model(x), tr.labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    root = tmp_path_factory.mktemp("zoo")
    mid = model_id_for(recipe)
    payload = zoo.state_dict_bytes(model)
    digest = hashlib.sha256(payload).hexdigest()
    fname = f"{mid}-{digest[:8]}.safetensors"
    zoo.atomic_write_bytes(root / "checkpoints" / fname, payload)
    rob = robust_accuracy(model, test.images[:ROBUST_SUBSET], test.labels[:ROBUST_SUBSET], eps=0.1, alpha=0.01,
                          steps=40)
    card = zoo.make_card(
        model_id=mid, model=model, weights_file=fname, sha256=digest, dataset="fmnist", arch="lenet", variant="N",
        preset="tiny", recipe=recipe.to_dict(), smoothing=None,
        natural_accuracy=natural_accuracy(model, test.images, test.labels), robust_accuracy=rob,
        robust_protocol={"attack": "pgd_linf", "eps": 0.1, "alpha": 0.01, "steps": 40, "random_start": True,
                         "images": "first 100 test images", "seed": 0},
    )
    zoo.atomic_write_json(root / "cards" / f"{mid}.json", card)
    return root / "cards" / f"{mid}.json"


def test_walk_accepts_an_honest_card(fake_zoo):
    walk_card(fake_zoo)


WRONG = {
    "natural_accuracy": lambda c: c["natural_accuracy"] + 0.05,  # 5 points off
    "num_params": lambda c: c["num_params"] + 1,
    "sha256": lambda c: "0" * 64,
    "arch": lambda c: "resnet8",
    "card_schema": lambda c: 99,
    "robust_protocol": lambda c: {**c["robust_protocol"], "eps": 0.3},
    "smoothing": lambda c: {"filter": "gaussian", "placement": 1},
}


@pytest.mark.parametrize("field", WRONG)
def test_walk_rejects_a_wrong_card(fake_zoo, tmp_path, field):
    shutil.copytree(fake_zoo.parent.parent, tmp_path / "zoo")
    path = tmp_path / "zoo" / "cards" / fake_zoo.name
    card = json.loads(path.read_text())
    card[field] = WRONG[field](card)
    path.write_text(json.dumps(card))
    with pytest.raises((AssertionError, zoo.CheckpointError)):
        walk_card(path)
