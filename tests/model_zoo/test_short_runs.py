"""`salbench train --epochs N` (issue 28, item 7): a short real run of a preset's recipe gets its own
preset name (`<preset>-e<N>`) and so its own id, epoch checkpoints and card; the preset's full run keeps
its id and files, whichever runs first. Real runs of the `tiny` FMNIST preset (its A recipe trains 2
epochs of PGD-3) on the tiny splits of conftest.py; the CLI plumbing is tests/benchmark/test_papercuts.py."""

from __future__ import annotations

import pytest
import torch

from salbench.model_zoo import zoo
from salbench.model_zoo.recipes import get_recipe
from salbench.model_zoo.training import CKPT_NAME, model_id_for, train


def _train(recipe, root, splits):
    tr, te = splits
    return train(recipe, work_dir=root / "runs", out_dir=root / "zoo", progress=False, train_split=tr, test_split=te)


def test_a_short_run_never_replaces_the_full_run(tmp_path, tiny_fmnist):
    full_recipe, short_recipe = get_recipe("fmnist", "tiny", "A"), get_recipe("fmnist", "tiny", "A", epochs=1)
    assert (full_recipe.epochs, short_recipe.epochs) == (2, 1)
    full_id, short_id = model_id_for(full_recipe), model_id_for(short_recipe)
    assert (full_id, short_id) == ("fmnist-lenet-A-tiny", "fmnist-lenet-A-tiny-e1")

    full = _train(full_recipe, tmp_path, tiny_fmnist)
    full_bytes = (tmp_path / "zoo" / "checkpoints" / full["weights"]).read_bytes()
    full_ckpt = (tmp_path / "runs" / full_id / CKPT_NAME).read_bytes()
    short = _train(short_recipe, tmp_path, tiny_fmnist)  # same work dir and zoo folder

    assert short["id"] == short_id and short["preset"] == "tiny-e1" and short["recipe"]["epochs"] == 1
    assert [h["epoch"] for h in short["history"]] == [1] and len(full["history"]) == 2
    # the full run's weights, card and epoch checkpoint are untouched; the short run has its own
    assert (tmp_path / "zoo" / "checkpoints" / full["weights"]).read_bytes() == full_bytes
    assert (tmp_path / "runs" / full_id / CKPT_NAME).read_bytes() == full_ckpt
    assert zoo.get_card(full_id, tmp_path / "zoo" / "cards") == full
    assert torch.load(tmp_path / "runs" / short_id / CKPT_NAME, weights_only=True)["epoch"] == 1
    assert sorted(p.name for p in (tmp_path / "zoo" / "cards").iterdir()) == sorted([f"{full_id}.json", f"{short_id}.json"])
    zoo.load(short_id, cards_dir=tmp_path / "zoo" / "cards")  # a loadable zoo entry of its own

    # re-running the full recipe afterwards resumes its own checkpoint and keeps the short run's files
    again = _train(full_recipe, tmp_path, tiny_fmnist)
    assert again["id"] == full_id
    assert (tmp_path / "zoo" / "checkpoints" / short["weights"]).is_file()


def test_epochs_is_checked():
    for bad in (0, -3, 1.5, True):
        with pytest.raises(ValueError, match="epochs"):
            get_recipe("fmnist", "tiny", "A", epochs=bad)
    assert get_recipe("fmnist", "tiny", "A", epochs=2) == get_recipe("fmnist", "tiny", "A")
