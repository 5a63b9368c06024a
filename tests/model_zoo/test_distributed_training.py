"""Training under torch.distributed (issue 12): 2 gloo ranks, DDP with batch/2 per rank, end with the
weights of a one-process run of the same global batch (up to float reduction order)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from salbench.model_zoo.recipes import get_recipe
from salbench.model_zoo.training import CKPT_NAME, model_id_for, train
from salbench.model_zoo.zoo import read_state_dict

# G: PGD and the SmoothBlock; 80 images in global batches of 32: 32, 32, 16 (the last one split 8/8)
RECIPE = replace(get_recipe("fmnist", "tiny", "G"), train_subset=80, epochs=2, attack_steps=2)
MID = model_id_for(RECIPE)


def _gloo_or_skip() -> None:
    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available in this build")


def _rank_main(rank: int, world: int, init_file: str, root: str, splits, stop_after: int | None = None,
               resume: bool = False) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        card = train(RECIPE, work_dir=Path(root) / "runs", out_dir=Path(root) / "zoo", progress=False,
                     train_split=splits[0], test_split=splits[1], resume=resume, stop_after_epoch=stop_after)
        name = f"rank{rank}.json" if not resume else f"rank{rank}-{stop_after}.json"
        Path(root, name).write_text(json.dumps(card))
    finally:
        torch.distributed.destroy_process_group()


def test_two_gloo_ranks_train_the_one_process_weights(tmp_path, tiny_fmnist):
    """Tolerance: LeNet has no BatchNorm and every random draw (order, PGD starts) is the one-process
    draw, so only the order of float reductions differs (the gradient is summed per rank then
    averaged by all-reduce, instead of one mean over the batch): float32 rounding, ~1e-7 relative
    per step. Adam normalises each update by the gradient's running RMS, so a rounding difference
    moves a weight by at most ~lr * (relative gradient difference); over 6 steps of lr 1e-4 that is
    far below 1e-6. We allow atol 1e-5 (a wrong sharding, a missing share or a wrong loss scale moves
    weights by ~lr = 1e-4 per step, i.e. it fails)."""
    _gloo_or_skip()
    import torch.multiprocessing as mp

    torch.set_num_threads(1)
    one = tmp_path / "one"
    ref = train(RECIPE, work_dir=one / "runs", out_dir=one / "zoo", progress=False, train_split=tiny_fmnist[0],
                test_split=tiny_fmnist[1], resume=False)
    two = tmp_path / "two"
    mp.start_processes(_rank_main, args=(2, str(tmp_path / "rdzv"), str(two), tiny_fmnist), nprocs=2, join=True,
                       start_method="spawn")
    card = json.loads((two / "rank0.json").read_text())
    assert json.loads((two / "rank1.json").read_text()) is None  # rank 0 alone publishes
    assert card["world_size"] == 2 and "world_size" not in ref
    a, b = read_state_dict(one / "zoo" / "checkpoints" / ref["weights"]), read_state_dict(
        two / "zoo" / "checkpoints" / card["weights"])
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5, msg=k)
    print("max |two-rank - one-process| weight difference:", max(float((a[k] - b[k]).abs().max()) for k in a))
    ck = torch.load(two / "runs" / MID / CKPT_NAME, weights_only=True)
    assert ck["epoch"] == RECIPE.epochs
    # the epoch statistics cover every image once (summed over the ranks' shares)
    assert [h["train_acc"] for h in card["history"]] == pytest.approx([h["train_acc"] for h in ref["history"]], abs=1e-9)
    assert [h["train_loss"] for h in card["history"]] == pytest.approx([h["train_loss"] for h in ref["history"]],
                                                                        rel=1e-5)


def test_batch_must_divide_by_the_world_size(monkeypatch, tiny_fmnist, tmp_path):
    from salbench.model_zoo import training

    monkeypatch.setattr(training, "_dist", lambda: (0, 3))
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        train(RECIPE, work_dir=tmp_path, out_dir=tmp_path, progress=False, train_split=tiny_fmnist[0],
              test_split=tiny_fmnist[1])


def test_a_run_stopped_under_two_ranks_resumes_from_its_epoch_checkpoint(tmp_path, tiny_fmnist):
    """A 2-rank run that stops after epoch 1 (as a killed run leaves only its epoch checkpoint)
    resumes on 2 ranks from that checkpoint and ends with the uninterrupted run's weights
    (same 1e-5 tolerance and reasoning as the one-process equivalence above)."""
    _gloo_or_skip()
    import torch.multiprocessing as mp

    torch.set_num_threads(1)
    one = tmp_path / "one"
    ref = train(RECIPE, work_dir=one / "runs", out_dir=one / "zoo", progress=False, train_split=tiny_fmnist[0],
                test_split=tiny_fmnist[1], resume=False)
    two = tmp_path / "two"
    for k, stop in enumerate((1, None)):
        mp.start_processes(_rank_main, args=(2, str(tmp_path / f"rdzv{k}"), str(two), tiny_fmnist, stop, True), nprocs=2,
                           join=True, start_method="spawn")
        ck = torch.load(two / "runs" / MID / CKPT_NAME, weights_only=True)
        assert ck["epoch"] == (1 if stop else RECIPE.epochs)
    assert json.loads((two / "rank0-1.json").read_text()) is None  # stopped: nothing published
    card = json.loads((two / "rank0-None.json").read_text())
    a, b = read_state_dict(one / "zoo" / "checkpoints" / ref["weights"]), read_state_dict(
        two / "zoo" / "checkpoints" / card["weights"])
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-5, msg=key)
