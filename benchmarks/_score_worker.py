"""One rank of scoring a zoo model on the committed image set (no accuracy pass, one torch thread).

Launched by ``benchmarks/test_harness_speed.py`` as
``python -m torch.distributed.run --standalone --nproc-per-node K benchmarks/_score_worker.py MODEL OUT``
(or run directly for one process). Rank 0 writes ``{"score_s": ..., "summary": ...}`` to OUT.
"""

from __future__ import annotations

import json
import sys
import time

import torch


def main(model_id: str, out: str) -> None:
    torch.set_num_threads(1)
    from salbench.benchmark import distributed as D
    from salbench.benchmark.imagesets import load_imageset
    from salbench.benchmark.scoring import ScoreConfig, score
    from salbench.model_zoo import zoo

    D.init("cpu")
    try:
        imageset = load_imageset("fmnist")
        model = zoo.load(model_id)
        t0 = time.perf_counter()
        res = score(model, imageset, ScoreConfig(accuracy=False), progress=False).to_dict()
        seconds = time.perf_counter() - t0
        res = res.to_dict() if hasattr(res, "to_dict") else res
        if D.is_main():
            with open(out, "w") as f:
                json.dump({"score_s": seconds, "processes": D.world_size(), "summary": res["summary"]}, f)
    finally:
        D.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
