"""Wall time of scoring one zoo model from scratch with 1 process vs `salbench --procs K` (one thread
each), side by side in one run, into temporary leaderboard folders (the committed boards are not
touched); checks that both runs stored the same per-image values.

    .venv/bin/python benchmarks/procs_scaling.py [--model fmnist-lenet-N-paper-10ep] [--procs 2]

Prints one JSON line: seconds per run, the ratio, whether the per-image values are identical, and
the 1-minute load average before and after (other processes on the machine slow both runs).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _score(model: str, dataset: str, procs: int, lb: str, device: str = "cpu", batch_size: int | None = None) -> float:
    cmd = [sys.executable, "-m", "salbench.benchmark.cli", "--threads", "1", "--procs", str(procs), "leaderboard",
           "--dataset", dataset, "--only", model, "--rescore", "--quiet", "--device", device]
    if batch_size:
        cmd += ["--batch-size", str(batch_size)]
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, env={**os.environ, "SALBENCH_LEADERBOARDS_DIR": lb, "OMP_NUM_THREADS": "1"},
                   check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def scaling(model: str, dataset: str, procs: list[int], device: str = "cpu", batch_size: int | None = None) -> dict:
    """Wall time of scoring ``model`` from scratch with each process count in ``procs`` (into
    temporary boards), the speed-up over the first, and whether every run stored the same values."""
    out, first = {"model": model, "device": device, "procs": procs, "seconds": {}, "speedup": {}}, None
    for k in procs:
        with tempfile.TemporaryDirectory() as lb:
            out["seconds"][k] = round(_score(model, dataset, k, lb, device, batch_size), 1)
            (f,) = Path(lb, "results", dataset).glob("*.json")
            doc = json.loads(f.read_text())
        values = (doc["per_image"], doc["accuracy"])
        first = first or (k, values)
        out["speedup"][k] = round(out["seconds"][first[0]] / out["seconds"][k], 2)
        out.setdefault("identical", True)
        out["identical"] = out["identical"] and values == first[1]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="fmnist-lenet-N-paper-10ep")
    ap.add_argument("--dataset", default="fmnist")
    ap.add_argument("--procs", type=int, default=2)
    a = ap.parse_args()
    out = {"model": a.model, "cores": os.cpu_count(), "load_before": os.getloadavg()}
    per_image = {}
    with tempfile.TemporaryDirectory() as one, tempfile.TemporaryDirectory() as many:
        for k, lb in ((1, one), (a.procs, many)):
            out[f"seconds_{k}_proc"] = round(_score(a.model, a.dataset, k, lb), 1)
            out[f"load_after_{k}_proc"] = os.getloadavg()
            (f,) = Path(lb, "results", a.dataset).glob("*.json")
            doc = json.loads(f.read_text())
            per_image[k] = (doc["per_image"], doc["accuracy"])
            out[f"scoring_seconds_{k}_proc"] = doc["timings"]["total"]
    out["ratio"] = round(out["seconds_1_proc"] / out[f"seconds_{a.procs}_proc"], 2)
    out["identical_per_image_and_accuracy"] = per_image[1] == per_image[a.procs]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
