"""Scoring on several processes with ``torch.distributed`` (launched by ``torchrun`` or ``salbench --procs K``).

What is sharded: the fixed image set by whole scoring batches (rank r scores batches r, r + K,
r + 2K, ... with the batch boundaries of a single-process run), natural accuracy and PGD robust
accuracy by their evaluation batches. Every random draw of a scoring batch is keyed by
(seed, method, metric, batch start) (``benchmark.scoring._gen``), and the robust-accuracy random
starts are drawn from one generator that a rank advances over the batches it skips
(``model_zoo.attacks.robust_accuracy``), so the per-image values and both accuracies are the ones a
single-process run on the same device type computes, bit for bit on CPU. The per-image values are
gathered on every rank; rank 0 alone writes the result, the leaderboard (under its lock) and the
figures.

Backends: gloo for CPU scoring, nccl for CUDA (each process on ``cuda:<LOCAL_RANK>``).
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta

# torch is imported on first use: a command that never initialises a process group (`salbench zoo
# list`, `--help`) starts without it, and a group cannot exist before torch.distributed is imported


def _dist():
    """``torch.distributed`` when it has been imported (else no process group can exist), or None."""
    return sys.modules.get("torch.distributed")


def launched() -> bool:
    """True inside a process started by torchrun / ``torch.distributed.run`` with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def under_launcher() -> bool:
    """True inside a process started by torchrun / ``torch.distributed.run`` (any number of processes)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def rank_from_env() -> int:
    return int(os.environ.get("RANK", "0"))


def active() -> bool:
    """True when a process group of more than one process is initialised."""
    dist = _dist()
    return dist is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return _dist().get_rank() if active() else 0


def world_size() -> int:
    return _dist().get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0 (or not distributed): the process that prints, writes results, boards and figures."""
    return rank() == 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def init(device: str = "cpu", timeout_s: float = 1800.0) -> bool:
    """Initialise the process group from torchrun's environment (no-op outside torchrun, or when it
    is already initialised). Backend gloo for a CPU ``device``, nccl for CUDA (then this process's
    current device is ``cuda:<LOCAL_RANK>``). Returns whether a group of >1 processes is active."""
    if not launched():
        return False
    import torch
    import torch.distributed as dist

    if not dist.is_available():
        return False
    if dist.is_initialized():
        return active()
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    return active()


def shutdown() -> None:
    dist = _dist()
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def device_for(device: str) -> torch.device:
    """The device this rank computes on: a bare ``"cuda"`` becomes ``cuda:<LOCAL_RANK>`` when distributed."""
    import torch

    d = torch.device(device)
    if d.type == "cuda" and d.index is None and active():
        return torch.device("cuda", local_rank())
    return d


def my_batches(n_batches: int) -> list[int]:
    """The batch indices this rank evaluates: r, r + K, r + 2K, ... (all of them when not distributed)."""
    return list(range(rank(), n_batches, world_size()))


def all_gather_object(obj) -> list:
    """``obj`` of every rank, in rank order (``[obj]`` when not distributed)."""
    if not active():
        return [obj]
    out = [None] * world_size()
    _dist().all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s ``obj`` on every rank (``obj`` itself when not distributed)."""
    if not active():
        return obj
    box = [obj]
    _dist().broadcast_object_list(box, src=src)
    return box[0]


def all_sum(value: int) -> int:
    """Sum of an integer over the ranks (exact: summed as Python ints after a gather)."""
    return sum(all_gather_object(int(value)))


def barrier() -> None:
    if active():
        _dist().barrier()
