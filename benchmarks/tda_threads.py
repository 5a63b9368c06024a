"""Wall time of the TDA track's slowest step (quanda's RepresenterPoints fit) at 1 vs 2 torch threads,
alternating, on the FMNIST N model and a 1000-image class-balanced training subset. Run in .venv-tda:

    .venv-tda/bin/python benchmarks/tda_threads.py [--rounds 2] [--per-class 100]

Prints each timing and the ratio of medians (docs/tda.md)."""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from salbench.benchmark import tda
from salbench.model_zoo import zoo
from salbench.model_zoo.data import load_split


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--per-class", type=int, default=100)
    args = ap.parse_args()
    tda.require_quanda()
    from quanda.explainers.wrappers import RepresenterPoints

    train = load_split("fmnist", "train", download=False)
    idx = torch.as_tensor(tda.train_subset_indices(train.labels.numpy(), args.per_class))
    ds = tda._tensor_dataset(train.float_images(idx), train.labels[idx])
    model = zoo.load("fmnist-lenet-N-paper-10ep")
    times: dict[int, list[float]] = {1: [], 2: []}
    for r in range(args.rounds):
        for threads in (1, 2):
            torch.set_num_threads(threads)
            with tempfile.TemporaryDirectory() as d, tda._quiet():
                cls, kw = tda.make_explainer("representer", model, ds, cache_dir=d, model_id="bench",
                                             layers=("head.4", "head.5"), config=tda.TDAConfig())
                t0 = time.perf_counter()
                cls(model=model, train_dataset=ds, **kw)
                times[threads].append(time.perf_counter() - t0)
            print(f"round {r}: {threads} thread(s): {times[threads][-1]:.1f} s", flush=True)
    m1, m2 = statistics.median(times[1]), statistics.median(times[2])
    print(f"median 1 thread {m1:.1f} s, 2 threads {m2:.1f} s: 2 threads take {m2 / m1:.1f}x the time of 1")


if __name__ == "__main__":
    main()
