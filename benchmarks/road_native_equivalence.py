"""Does the C imputation solver keep every stored ROAD value? (issue 13.3)

``metrics/_imputation_solver.py`` solves the plain-CG planes (all of FMNIST's and CIFAR-10's) in C
(``metrics/imputation_kernel.c``) when a compiler is at hand. Both paths stop at the same float64
residual bound, so the imputed pixels agree to the solve's tolerance, not bit for bit. This script
scores ROAD alone (VG and IG maps, the protocol's levels, noise and seeds: ``ScoreConfig(metrics=
("road",))``) for committed zoo models twice, with the C solver and with ``SALBENCH_NATIVE=0``'s torch
path, times both, and compares every per-image, per-level correctness with the other run and with the
committed result in ``leaderboards/results/``.

Run (single-threaded; nothing is written under leaderboards/)::

    SALBENCH_CIFAR10_DIR=../shared/data/cifar10 .venv/bin/python benchmarks/road_native_equivalence.py --write-doc

Output: stdout and, with ``--write-doc``, the "road-native" section of ``docs/performance/scoring.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
COMMITTED = REPO / "leaderboards" / "results"
DOC = REPO / "docs" / "performance" / "scoring.md"
DEFAULT_IDS = ("fmnist-lenet-N-paper-10ep", "fmnist-lenet-A-paper-10ep", "fmnist-lenet-G-paper-10ep",
               "fmnist-lenet-M2-paper-10ep", "cifar10-resnet8-G-cpu-resnet8")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from smoothing_step_table import write_section  # noqa: E402  (same folder: the docs' generated sections)


def _road(model, imageset, test_split, native: bool) -> tuple[dict, float]:
    from salbench.benchmark.scoring import ScoreConfig, score
    from salbench.metrics._imputation_solver import IMPUTATION_NATIVE

    saved = os.environ.get("SALBENCH_NATIVE")
    os.environ["SALBENCH_NATIVE"] = "1" if native else "0"
    IMPUTATION_NATIVE.reset()
    try:
        if native and IMPUTATION_NATIVE.library() is None:
            sys.exit(f"the C solver is not available here: {IMPUTATION_NATIVE.status()}")
        t0 = time.perf_counter()
        res = score(model, imageset, ScoreConfig(metrics=("road",), accuracy=False), test_split=test_split,
                    progress=False).to_dict()
        seconds = time.perf_counter() - t0
    finally:
        if saved is None:
            os.environ.pop("SALBENCH_NATIVE", None)
        else:
            os.environ["SALBENCH_NATIVE"] = saved
        IMPUTATION_NATIVE.reset()
    return res, seconds


def _roads(doc: dict) -> dict[str, np.ndarray]:
    return {m: np.array(v["road"], dtype=bool) for m, v in doc["per_image"].items() if isinstance(v, dict) and "road" in v}


def _differing(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> int:
    return int(sum((a[m] != b[m]).sum() for m in b))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=list(DEFAULT_IDS))
    ap.add_argument("--write-doc", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)

    from salbench.benchmark.imagesets import load_imageset
    from salbench.model_zoo import zoo
    from salbench.model_zoo.data import load_split

    rows, loads = [], [os.getloadavg()[0]]
    splits = {}
    for model_id in args.models:
        card = zoo.get_card(model_id)
        dataset = card["dataset"]
        if dataset not in splits:
            try:
                test = load_split(dataset, "test")
            except Exception as exc:  # CIFAR-10 without SALBENCH_CIFAR10_DIR: skip its models, say so
                print(f"skipping {model_id}: {exc}", flush=True)
                continue
            splits[dataset] = (test, load_imageset(dataset, test_split=test))
        test, imageset = splits[dataset]
        committed = json.loads((COMMITTED / dataset / f"{card['sha256'][:16]}-v1.json").read_text())
        model = zoo.load(model_id)
        native, t_native = _road(model, imageset, test, native=True)
        torch_path, t_torch = _road(model, imageset, test, native=False)
        a, b, c = _roads(native), _roads(torch_path), _roads(committed)
        row = {"model": model_id, "values": int(sum(v.size for v in c.values())),
               "native_vs_torch": _differing(a, b), "native_vs_committed": _differing(a, c),
               "torch_vs_committed": _differing(b, c), "seconds_native": t_native, "seconds_torch": t_torch}
        rows.append(row)
        print(json.dumps(row), flush=True)
    loads.append(os.getloadavg()[0])
    lines = [
        "## ROAD with the C imputation solver: the same predictions",
        "",
        "Command: `SALBENCH_CIFAR10_DIR=../shared/data/cifar10 .venv/bin/python benchmarks/road_native_equivalence.py "
        f"--write-doc` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, one torch thread, 1-minute load "
        f"average {loads[0]:.1f} at the start and {loads[1]:.1f} at the end. ROAD alone (VG and IG maps "
        "included in the times), every per-image, per-level correctness compared.",
        "",
        "| model | ROAD values | C vs torch path: differing | C vs committed | torch vs committed "
        "| seconds, C solver | seconds, torch solver | ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| `{r['model']}` | {r['values']} | {r['native_vs_torch']} | {r['native_vs_committed']} | "
                     f"{r['torch_vs_committed']} | {r['seconds_native']:.1f} | {r['seconds_torch']:.1f} | "
                     f"{r['seconds_torch'] / r['seconds_native']:.2f}x |")
    text = "\n".join(lines)
    print(text)
    if args.write_doc:
        write_section(DOC, "road-native", text)


if __name__ == "__main__":
    main()
