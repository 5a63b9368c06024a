"""The trainer (PROTOCOL §5): seeded, resumable bit for bit after a stop or a real crash, and
publishing a card + safetensors weights that `zoo.load` verifies and rebuilds.

All runs use the "tiny" FMNIST preset shrunk further (64 training images, 3 epochs, PGD-2,
variant G so that PGD and the SmoothBlock are both exercised) and 100 test images.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from salbench.model_zoo import zoo
from salbench.model_zoo.architectures import build
from salbench.model_zoo.attacks import natural_accuracy, robust_accuracy
from salbench.model_zoo.recipes import Recipe, get_recipe
from salbench.model_zoo.training import CKPT_NAME, model_id_for, train
from salbench.model_zoo.zoo import CARD_FIELDS, CheckpointError, read_state_dict

RECIPE = replace(get_recipe("fmnist", "tiny", "G"), train_subset=64, epochs=3, attack_steps=2)
MID = model_id_for(RECIPE)
REPO = Path(__file__).resolve().parents[2]


def _run(recipe, root: Path, splits, **kw):
    tr, te = splits
    return train(recipe, work_dir=root / "runs", out_dir=root / "zoo", progress=False,
                 train_split=tr, test_split=te, **kw)


def _ckpt(root: Path) -> dict:
    return torch.load(root / "runs" / MID / CKPT_NAME, map_location="cpu", weights_only=True)


def _weights(root: Path, card: dict) -> Path:
    return root / "zoo" / "checkpoints" / card["weights"]


def _strip_seconds(history):
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_fmnist):
    """One uninterrupted run: (root, card)."""
    root = tmp_path_factory.mktemp("reference")
    card = _run(RECIPE, root, tiny_fmnist, resume=False)
    assert card is not None
    return root, card


def _assert_same_run(root: Path, card: dict, reference) -> None:
    ref_root, ref_card = reference
    # the published tensors, bit for bit. (Not the file's sha256: zoo.state_dict_bytes writes a
    # two-key safetensors metadata whose order varies between calls, a reported bug; see
    # test_zoo.py::test_state_dict_bytes_is_deterministic.)
    mine, theirs = read_state_dict(_weights(root, card)), read_state_dict(_weights(ref_root, ref_card))
    assert mine.keys() == theirs.keys()
    for k in mine:
        assert torch.equal(mine[k], theirs[k]), k
    a, b = _ckpt(root), _ckpt(ref_root)
    assert a["epoch"] == b["epoch"] == RECIPE.epochs
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert _strip_seconds(card["history"]) == _strip_seconds(ref_card["history"])
    assert card["natural_accuracy"] == ref_card["natural_accuracy"]
    assert card["robust_accuracy"] == ref_card["robust_accuracy"]


def test_training_changes_the_weights(reference, tiny_fmnist):
    """The reference run really trained (else 'identical weights' below would be vacuous)."""
    root, card = reference
    torch.manual_seed(RECIPE.seed)
    init = build("lenet", smoothing=RECIPE.smoothing).state_dict()
    final = _ckpt(root)["model"]
    assert any(not torch.equal(init[k], final[k]) for k in init if k.endswith("weight"))
    assert [h["epoch"] for h in card["history"]] == [1, 2, 3]


def test_stop_then_resume_is_bit_identical(tmp_path, tiny_fmnist, reference):
    assert _run(RECIPE, tmp_path, tiny_fmnist, stop_after_epoch=1) is None
    assert _ckpt(tmp_path)["epoch"] == 1
    assert not (tmp_path / "zoo" / "cards").exists()  # nothing published by a stopped run
    card = _run(RECIPE, tmp_path, tiny_fmnist, resume=True)
    _assert_same_run(tmp_path, card, reference)


def test_no_resume_starts_over(tmp_path, tiny_fmnist, reference):
    """resume=False ignores a checkpoint, even one from another recipe, and gives the same run."""
    other = replace(RECIPE, lr=RECIPE.lr * 3)
    _run(other, tmp_path, tiny_fmnist, stop_after_epoch=1)
    card = _run(RECIPE, tmp_path, tiny_fmnist, resume=False)
    _assert_same_run(tmp_path, card, reference)


def test_resume_refuses_another_recipes_checkpoint(tmp_path, tiny_fmnist, reference):
    shutil.copytree(reference[0] / "runs", tmp_path / "runs")
    for change in (dict(lr=RECIPE.lr * 2), dict(attack_steps=3), dict(train_subset=32)):
        with pytest.raises(ValueError, match="different recipe"):
            _run(replace(RECIPE, **change), tmp_path, tiny_fmnist, resume=True)
    assert not (tmp_path / "zoo").exists()


def test_a_training_seed_is_its_own_zoo_entry():
    """Seeds > 0 get their own id (and so their own epoch checkpoint and card); seed 0 keeps
    the original id, so the committed zoo is unchanged."""
    assert RECIPE.seed == 0 and not MID.endswith("-s0")
    s1, s2 = model_id_for(replace(RECIPE, seed=1)), model_id_for(replace(RECIPE, seed=2))
    assert s1 == model_id_for(replace(RECIPE, seed=0)) + "-s1" and s2.endswith("-s2") and s1 != s2
    with pytest.raises(ValueError, match="seed"):
        get_recipe("fmnist", "tiny", "A", seed=-1)


# A child process trains RECIPE; mid-way through epoch 2 (after epoch 1's checkpoint and one
# more optimiser step) it blocks, and the parent kills it with SIGKILL. Blocking at a known
# batch instead of racing a timer makes the crash point deterministic on a loaded machine;
# the kill itself is a real `kill -9` of a process holding un-checkpointed progress.
_CHILD = textwrap.dedent(
    """
    import json, sys, time
    import torch
    torch.set_num_threads(int(sys.argv[1]))
    from salbench.model_zoo import training
    from salbench.model_zoo.data import Split
    from salbench.model_zoo.recipes import Recipe

    data = torch.load(sys.argv[2], weights_only=True)
    recipe = Recipe.from_dict(json.loads(sys.argv[3]))
    root = sys.argv[4]
    hang_at = int(sys.argv[5])
    calls = 0
    real_augment = training._augment

    def augment(x, kind, gen):  # called once per batch
        global calls
        calls += 1
        if calls == hang_at:
            print("HANGING", flush=True)
            time.sleep(3600)
        return real_augment(x, kind, gen)

    training._augment = augment
    training.train(recipe, work_dir=root + "/runs", out_dir=root + "/zoo", progress=False,
                   train_split=Split("fmnist", "train", data["xtr"], data["ytr"], "t"),
                   test_split=Split("fmnist", "test", data["xte"], data["yte"], "t"))
    print("FINISHED", flush=True)
    """
)


def test_resume_after_kill_9_is_bit_identical(tmp_path, tiny_fmnist, reference):
    tr, te = tiny_fmnist
    torch.save({"xtr": tr.images, "ytr": tr.labels, "xte": te.images, "yte": te.labels}, tmp_path / "data.pt")
    per_epoch = math.ceil(min(RECIPE.train_subset, len(tr)) / RECIPE.batch_size)
    assert per_epoch >= 2
    log = open(tmp_path / "child.log", "w")
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(torch.get_num_threads()), str(tmp_path / "data.pt"),
         json.dumps(RECIPE.to_dict()), str(tmp_path), str(per_epoch + 2)],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
    )
    ckpt = tmp_path / "runs" / MID / CKPT_NAME
    deadline = time.monotonic() + 120
    try:
        while True:
            out = (tmp_path / "child.log").read_text()
            if "HANGING" in out and ckpt.is_file():
                break
            if child.poll() is not None:
                pytest.fail(f"training child exited early ({child.returncode}):\n{out[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"training child did not reach epoch 2 in 120 s:\n{out[-2000:]}")
            time.sleep(0.05)
        assert _ckpt(tmp_path)["epoch"] >= 1
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        log.close()
    assert child.returncode == -signal.SIGKILL
    assert _ckpt(tmp_path)["epoch"] == 1
    assert not (tmp_path / "zoo" / "cards").exists()
    # a half-written checkpoint from a crash during a save must not matter
    (tmp_path / "runs" / MID / "last.tmp").write_bytes(b"\x80garbage")

    card = _run(RECIPE, tmp_path, tiny_fmnist, resume=True)
    _assert_same_run(tmp_path, card, reference)


# ----------------------------------------------------------------------------- the published card
def test_card_fields_and_hash(reference):
    root, card = reference
    on_disk = json.loads((root / "zoo" / "cards" / f"{MID}.json").read_text())
    assert on_disk == card
    assert set(CARD_FIELDS) <= set(card)
    w = _weights(root, card)
    assert card["sha256"] == hashlib.sha256(w.read_bytes()).hexdigest() == zoo.sha256_file(w)
    assert card["weights"] == f"{MID}-{card['sha256'][:8]}.safetensors"
    assert card["id"] == MID and card["dataset"] == "fmnist" and card["arch"] == "lenet"
    assert card["variant"] == "G" and card["preset"] == "tiny"
    assert Recipe.from_dict(card["recipe"]) == RECIPE
    assert card["smoothing"] == {"filter": "gaussian", "placement": 1}
    assert card["num_classes"] == 10
    assert card["num_params"] == sum(p.numel() for p in build("lenet", smoothing=RECIPE.smoothing).parameters())
    # PROTOCOL §3 "Accuracy", FMNIST: PGD ε 0.1, α 0.01, 40 steps, random start
    proto = card["robust_protocol"]
    assert (proto["eps"], proto["alpha"], proto["steps"], proto["random_start"]) == (0.1, 0.01, 40, True)
    assert card["card_schema"] == zoo.CARD_SCHEMA_VERSION
    assert card["torch_version"] == torch.__version__


def test_card_loads_and_its_accuracies_are_reproducible(reference, tiny_fmnist):
    root, card = reference
    _, te = tiny_fmnist
    model = zoo.load(card["id"], cards_dir=root / "zoo" / "cards")
    ref = build("lenet", smoothing=RECIPE.smoothing).eval()
    ref.load_state_dict(_ckpt(root)["model"])  # the last epoch checkpoint = the published weights
    x = te.float_images(slice(0, 16))
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))
    assert natural_accuracy(model, te.images, te.labels) == pytest.approx(card["natural_accuracy"], abs=1e-6)
    p = card["robust_protocol"]
    m = min(1000, len(te))
    rob = robust_accuracy(model, te.images[:m], te.labels[:m], eps=p["eps"], alpha=p["alpha"], steps=p["steps"],
                          seed=p["seed"])
    assert rob == pytest.approx(card["robust_accuracy"], abs=1e-6)
    assert card["robust_accuracy"] <= card["natural_accuracy"] + 0.05


def test_card_with_wrong_sha256_is_refused(tmp_path, reference):
    shutil.copytree(reference[0] / "zoo", tmp_path / "zoo")
    path = tmp_path / "zoo" / "cards" / f"{MID}.json"
    card = json.loads(path.read_text())
    card["sha256"] = hashlib.sha256(b"something else").hexdigest()
    path.write_text(json.dumps(card))
    with pytest.raises(CheckpointError, match="sha256"):
        zoo.load(MID, cards_dir=tmp_path / "zoo" / "cards")


def test_best_val_selection_publishes_the_best_epoch(tmp_path, tiny_fmnist):
    """PROTOCOL §5 (ImageNette): a recipe with select="best_val" publishes the epoch with the best
    held-out accuracy, not the last; the card says which; an old checkpoint without the field resumes."""
    recipe = replace(RECIPE, select="best_val", epochs=4, lr=3e-2)  # a large lr makes epochs differ
    card = _run(recipe, tmp_path, tiny_fmnist, resume=False)
    accs = [h["test_acc"] for h in card["history"]]
    best_epoch = accs.index(max(accs)) + 1
    assert card["selected_epoch"] == best_epoch
    best_sd = torch.load(tmp_path / "runs" / MID / "best.pt", weights_only=True)
    published = zoo.load_checkpoint(tmp_path / "zoo" / "checkpoints" / card["weights"], card["arch"],
                                    smoothing=card["smoothing"]).state_dict()
    assert all(torch.equal(published[k], best_sd[k]) for k in best_sd)
    assert get_recipe("imagenette", "paper", "G").select == "best_val"
    assert get_recipe("fmnist", "paper", "G").select == "last"
    with pytest.raises(ValueError, match="selection"):
        _run(replace(RECIPE, select="median"), tmp_path / "x", tiny_fmnist, resume=False)


def test_a_checkpoint_written_before_a_recipe_field_existed_resumes(tmp_path, tiny_fmnist):
    """The in-progress runs of a long recipe survive a new Recipe field with a default."""
    assert _run(RECIPE, tmp_path, tiny_fmnist, resume=False, stop_after_epoch=1) is None
    ck = tmp_path / "runs" / MID / CKPT_NAME
    state = torch.load(ck, weights_only=True)
    del state["recipe"]["select"]
    torch.save(state, ck)
    assert _run(RECIPE, tmp_path, tiny_fmnist, resume=True) is not None
