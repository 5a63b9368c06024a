"""Regenerating every board file (intervals, comparisons, seed spread, claims) from the stored
results: the target is under 30 s for all datasets on this 2-core machine (statistics issue).

Run: ``.venv/bin/python -m pytest benchmarks/test_stats_speed.py -o addopts="" -p no:cacheprovider --benchmark-only -s``.
The bound asserted is looser (60 s) because the machine is often shared; the measured time and
the CPU time are in ``extra_info``.
"""

from __future__ import annotations

import json
import os
import time

from salbench.benchmark.imagesets import IMAGESETS_DIR
from salbench.benchmark.leaderboard import write_leaderboard


def test_regenerate_all_boards(benchmark, tmp_path):
    datasets = sorted(p.stem for p in IMAGESETS_DIR.glob("*.json"))

    def run():
        for ds in datasets:
            sha = json.loads((IMAGESETS_DIR / f"{ds}.json").read_text())["images_sha256"]
            write_leaderboard(ds, out_dir=tmp_path, images_sha256=sha)

    cpu0 = time.process_time()
    benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info.update(datasets=datasets, cpu_seconds=round(time.process_time() - cpu0, 2),
                                load_average=os.getloadavg()[0])
    assert benchmark.stats.stats.max < 60, f"regenerating {datasets} took {benchmark.stats.stats.max:.1f} s"
    assert (tmp_path / "fmnist_pattern.md").is_file()
