"""Checkpoint safety and zoo cards (zoo.py): loading never unpickles code, strict keys/shapes,
sha256-verified loading by card id."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file

from salbench.model_zoo import zoo
from salbench.model_zoo.architectures import build
from salbench.model_zoo.data import Split
from salbench.model_zoo.recipes import get_recipe
from salbench.model_zoo.training import model_id_for, publish
from salbench.model_zoo.zoo import CheckpointError, load_checkpoint, read_state_dict


class _Exploit:
    """Pickles to `os.system("touch <marker>")`, run by any unpickler that trusts the file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _lenet(seed=0, **kw):
    torch.manual_seed(seed)
    return build("lenet", **kw).eval()


def _x(n=3, seed=0):
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- malicious / corrupt
@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin"])
def test_malicious_pickle_is_refused_and_not_run(tmp_path, suffix):
    marker = tmp_path / "pwned"
    path = tmp_path / f"evil{suffix}"
    torch.save({"conv.weight": torch.zeros(1), "payload": _Exploit(marker)}, path)
    with pytest.raises(CheckpointError, match="weights_only"):
        read_state_dict(path)
    with pytest.raises(CheckpointError):
        load_checkpoint(path, "lenet")
    assert not marker.exists(), "loading a checkpoint executed pickled code"


def test_the_exploit_is_live(tmp_path):
    """Control: the same payload does run under a trusting unpickler, so the test above means
    something."""
    marker = tmp_path / "pwned_control"
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump(_Exploit(marker), f)
    with open(tmp_path / "evil.pkl", "rb") as f:
        pickle.load(f)  # noqa: S301  (deliberately unsafe, on our own file)
    assert marker.exists()


def test_pickle_disguised_as_safetensors(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.safetensors"
    torch.save({"payload": _Exploit(marker)}, path)
    with pytest.raises(CheckpointError, match="safetensors"):
        read_state_dict(path)
    assert not marker.exists()


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize("keep", [0.5, 0.02])
def test_truncated_file(tmp_path, suffix, keep):
    model = _lenet()
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        save_file(model.state_dict(), path)
    else:
        torch.save(model.state_dict(), path)
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * keep)])
    with pytest.raises(CheckpointError):
        read_state_dict(path)
    with pytest.raises(CheckpointError):
        load_checkpoint(path, "lenet")


def test_missing_and_unsupported_files(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        read_state_dict(tmp_path / "nope.safetensors")
    (tmp_path / "w.ckpt").write_bytes(b"\x00")
    with pytest.raises(CheckpointError, match="unsupported"):
        read_state_dict(tmp_path / "w.ckpt")


def test_not_a_flat_tensor_dict(tmp_path):
    torch.save({"weights": {"a": torch.zeros(1)}}, tmp_path / "nested.pt")
    with pytest.raises(CheckpointError, match="flat"):
        read_state_dict(tmp_path / "nested.pt")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="flat"):
        read_state_dict(tmp_path / "list.pt")


# ----------------------------------------------------------------------------- architecture fit
def test_wrong_architecture_names_missing_and_unexpected_keys(tmp_path):
    torch.manual_seed(0)
    theirs = build("resnet8").state_dict()
    save_file(theirs, tmp_path / "resnet8.safetensors")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path / "resnet8.safetensors", "lenet")
    msg = str(info.value)
    assert "lenet" in msg and "missing" in msg and "unexpected" in msg
    ours = _lenet().state_dict()
    assert sorted(set(ours) - set(theirs))[0] in msg  # a lenet key the file lacks
    assert sorted(set(theirs) - set(ours))[0] in msg  # a resnet8 key lenet does not have


def test_smoothblock_weights_without_smoothing_get_a_hint(tmp_path):
    save_file(_lenet(smoothing={"filter": "gaussian"}).state_dict(), tmp_path / "g.safetensors")
    with pytest.raises(CheckpointError, match="SmoothBlock"):
        load_checkpoint(tmp_path / "g.safetensors", "lenet")
    m = load_checkpoint(tmp_path / "g.safetensors", "lenet", smoothing={"filter": "gaussian", "placement": 1})
    assert m.smooth is not None
    # the same weights with the SmoothBlock elsewhere do not fit (other channel count)
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_checkpoint(tmp_path / "g.safetensors", "lenet", smoothing={"filter": "gaussian", "placement": 2})


def test_missing_key_is_not_silently_ignored(tmp_path):
    sd = _lenet().state_dict()
    del sd["head.5.bias"]
    save_file(sd, tmp_path / "w.safetensors")
    with pytest.raises(CheckpointError, match=r"missing \['head.5.bias'\]"):
        load_checkpoint(tmp_path / "w.safetensors", "lenet")


def test_shape_mismatch(tmp_path):
    save_file(_lenet(num_classes=10).state_dict(), tmp_path / "w.safetensors")
    with pytest.raises(CheckpointError, match="shape mismatch") as info:
        load_checkpoint(tmp_path / "w.safetensors", "lenet", num_classes=7)
    assert "head.5.weight" in str(info.value)


# ----------------------------------------------------------------------------- valid files
@pytest.mark.parametrize("fmt", ["pt", "pt_wrapped", "safetensors", "state_dict_bytes"])
def test_valid_checkpoint_gives_identical_logits(tmp_path, fmt):
    model = _lenet(seed=3, smoothing={"filter": "median", "placement": 2})
    sd = model.state_dict()
    if fmt == "pt":
        path = tmp_path / "w.pt"
        torch.save(sd, path)
    elif fmt == "pt_wrapped":  # the common {"state_dict": ...} wrapper
        path = tmp_path / "w.pth"
        torch.save({"state_dict": sd}, path)
    elif fmt == "safetensors":
        path = tmp_path / "w.safetensors"
        save_file(sd, path)
    else:
        path = tmp_path / "w.safetensors"
        path.write_bytes(zoo.state_dict_bytes(model))
    loaded = load_checkpoint(path, "lenet", smoothing={"filter": "median", "placement": 2})
    assert not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(_x()), model(_x()))
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), sd.values()))


def test_bn_statistics_round_trip(tmp_path):
    """A checkpoint restores BatchNorm running statistics, not only parameters."""
    torch.manual_seed(0)
    model = build("resnet8").train()
    with torch.no_grad():
        model(torch.rand(4, 3, 32, 32))  # moves the running stats away from their init
    model.eval()
    path = tmp_path / "r8.safetensors"
    path.write_bytes(zoo.state_dict_bytes(model))
    loaded = load_checkpoint(path, "resnet8")
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


# ----------------------------------------------------------------------------- cards
def _published(tmp_path, recipe=None, seed=0):
    """Publish an untrained LeNet with a cheap robust eval (no training needed for card tests)."""
    recipe = recipe or get_recipe("fmnist", "tiny", "G")
    recipe = replace(recipe, eval_steps=2)
    g = torch.Generator().manual_seed(seed)
    test = Split("fmnist", "test", torch.randint(0, 256, (20, 1, 28, 28), generator=g, dtype=torch.uint8),
                 torch.randint(0, 10, (20,), generator=g), "synthetic")
    model = _lenet(seed=seed, smoothing=recipe.smoothing)
    card = publish(model, recipe, [], out_dir=tmp_path, test_split=test, progress=False)
    return model, card, test


def test_publish_measures_natural_on_all_and_robust_on_the_first_1000(tmp_path):
    """PROTOCOL §3 "Accuracy" with a model that always answers 3 (so no attack can change it):
    of 1200 test images the first 1000 are half 3s, the last 200 are 0s, hence natural accuracy
    500/1200 and robust accuracy 500/1000."""
    model = _lenet()
    with torch.no_grad():
        model.head[-1].weight.zero_()
        model.head[-1].bias.copy_(torch.arange(10) == 3)
    labels = torch.zeros(1200, dtype=torch.long)
    labels[:1000:2] = 3
    test = Split("fmnist", "test", torch.zeros(1200, 1, 28, 28, dtype=torch.uint8), labels, "synthetic")
    recipe = replace(get_recipe("fmnist", "tiny", "N"), eval_steps=1)
    card = publish(model, recipe, [], out_dir=tmp_path, test_split=test, progress=False)
    assert card["natural_accuracy"] == pytest.approx(500 / 1200, abs=1e-6)
    assert card["robust_accuracy"] == pytest.approx(0.5, abs=1e-6)
    assert card["robust_protocol"]["images"] == "first 1000 test images"


def test_load_by_id_verifies_and_rebuilds(tmp_path):
    model, card, _ = _published(tmp_path)
    loaded = zoo.load(card["id"], cards_dir=tmp_path / "cards")
    with torch.no_grad():
        assert torch.equal(loaded(_x()), model(_x()))
    assert zoo.get_card(card["id"], tmp_path / "cards") == json.loads(
        (tmp_path / "cards" / f"{card['id']}.json").read_text())
    assert [c["id"] for c in zoo.list_cards("fmnist", cards_dir=tmp_path / "cards")] == [card["id"]]
    assert zoo.list_cards("cifar10", cards_dir=tmp_path / "cards") == []


def test_zoo_dir_env(tmp_path, monkeypatch):
    model, card, _ = _published(tmp_path)
    monkeypatch.setenv("SALBENCH_ZOO_DIR", str(tmp_path))
    assert zoo.default_cards_dir() == tmp_path / "cards"
    with torch.no_grad():
        assert torch.equal(zoo.load(card["id"])(_x()), model(_x()))


def test_card_sha_mismatch(tmp_path):
    _, card, _ = _published(tmp_path)
    path = tmp_path / "cards" / f"{card['id']}.json"
    bad = dict(card, sha256="0" * 64)
    path.write_text(json.dumps(bad))
    with pytest.raises(CheckpointError, match="sha256"):
        zoo.load(card["id"], cards_dir=tmp_path / "cards")


def test_tampered_weights(tmp_path):
    _, card, _ = _published(tmp_path)
    w = tmp_path / "checkpoints" / card["weights"]
    raw = bytearray(w.read_bytes())
    raw[-1] ^= 0x01  # one bit of one weight
    w.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="sha256"):
        zoo.load(card["id"], cards_dir=tmp_path / "cards")
    w.unlink()
    with pytest.raises(CheckpointError, match="missing"):
        zoo.load(card["id"], cards_dir=tmp_path / "cards")


def test_unknown_id_lists_the_known(tmp_path):
    _, card, _ = _published(tmp_path)
    with pytest.raises(KeyError, match=card["id"]):
        zoo.load("fmnist-lenet-Z-nothing", cards_dir=tmp_path / "cards")


def test_atomic_write_leaves_no_temp_files(tmp_path):
    zoo.atomic_write_json(tmp_path / "d" / "a.json", {"x": 1})
    zoo.atomic_write_bytes(tmp_path / "d" / "a.json", b"{}")
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["a.json"]
    assert (tmp_path / "d" / "a.json").read_bytes() == b"{}"


def test_republish_replaces_the_old_weights(tmp_path):
    _, first, _ = _published(tmp_path, seed=0)
    _, second, _ = _published(tmp_path, seed=1)
    assert first["id"] == second["id"] and first["sha256"] != second["sha256"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [second["weights"]]


def test_state_dict_bytes_is_deterministic():
    """The card's sha256 (and the result cache keyed by it) must be a function of the weights."""
    model = _lenet()
    digests = {hashlib.sha256(zoo.state_dict_bytes(model)).hexdigest() for _ in range(20)}
    assert len(digests) == 1


def test_publishing_one_preset_keeps_another_presets_weights(tmp_path):
    long_recipe = get_recipe("fmnist", "paper-10ep", "N")
    short_recipe = get_recipe("fmnist", "paper", "N")
    assert model_id_for(long_recipe).startswith(model_id_for(short_recipe) + "-")
    _, long_card, _ = _published(tmp_path, long_recipe)
    _published(tmp_path, short_recipe)
    assert (tmp_path / "checkpoints" / long_card["weights"]).is_file()
    zoo.load(long_card["id"], cards_dir=tmp_path / "cards")


def test_make_card_has_every_field(tmp_path):
    _, card, _ = _published(tmp_path)
    assert set(zoo.CARD_FIELDS) <= set(card)
    assert card["card_schema"] == zoo.CARD_SCHEMA_VERSION


def test_a_damaged_card_is_named(tmp_path):
    """A truncated or foreign file among the cards gives an error naming it, not a bare parser error."""
    from salbench.model_zoo.zoo import list_cards

    (tmp_path / "good.json").write_text('{"id": "good", "dataset": "fmnist"}')
    (tmp_path / "bad.json").write_text('{"id": "bad", "data')
    with pytest.raises(ValueError, match=r"bad\.json is unreadable"):
        list_cards("fmnist", cards_dir=tmp_path)
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"bad\.json is not a card"):
        list_cards(cards_dir=tmp_path)
