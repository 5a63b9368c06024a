"""Leaderboards: a pure function from results to DataFrames, written as CSV atomically.

- ``<dataset>.csv``: one row per model x method (wide).
- ``<dataset>_ssim.csv``: SSIM and kept fraction per σ (long).
- ``<dataset>_road.csv``: ROAD accuracy per removal level (long).
"""

from __future__ import annotations

import io
from pathlib import Path

import pandas as pd

from benchmark.results import leaderboards_dir, list_results
from model_zoo.zoo import atomic_write_bytes

VARIANT_ORDER = {"N": 0, "A": 1, "G": 2, "M1": 3, "M2": 4}


def _row_key(r: dict):
    m = r["model"]
    return (m.get("source") != "zoo", VARIANT_ORDER.get(m.get("variant"), 9), m.get("id") or "")


def leaderboard_tables(results: list[dict]) -> dict[str, pd.DataFrame]:
    """Results -> ``{"main": wide, "ssim": long, "road": long}`` DataFrames (no I/O)."""
    rows, ssim_rows, road_rows = [], [], []
    for r in sorted(results, key=_row_key):
        m, acc = r["model"], r["accuracy"]
        for method, s in r["summary"].items():
            row = {
                "id": m["id"], "method": method, "variant": m.get("variant"), "preset": m.get("preset"),
                "arch": m.get("arch"), "source": m.get("source"),
                "natural_acc": acc.get("natural", m.get("natural_accuracy")),
                "robust_acc": acc.get("robust", m.get("robust_accuracy")),
                "acc_on_set": acc["on_set"], "gini": s["gini"], "ssim_mean": s["ssim_mean"],
            }
            for sigma, v in s["ssim"].items():
                row[f"ssim@{sigma}"] = v
            row.update({"log10_ros": s["log10_ros"], "ros_nan_fraction": s["ros_nan_fraction"], "aopc": s["aopc"],
                        "n_images": r["imageset"]["n"], "protocol": r["protocol"], "sha256": m["sha256"]})
            rows.append(row)
            for sigma, v in s["ssim"].items():
                ssim_rows.append({"id": m["id"], "variant": m.get("variant"), "method": method, "sigma": float(sigma),
                                  "ssim": v, "kept_fraction": s["ssim_kept_fraction"][sigma]})
            for p, v in s["road_curve"].items():
                road_rows.append({"id": m["id"], "variant": m.get("variant"), "method": method,
                                  "percent_removed": int(p), "accuracy": v})
    return {"main": pd.DataFrame(rows), "ssim": pd.DataFrame(ssim_rows), "road": pd.DataFrame(road_rows)}


def write_leaderboard(dataset: str, *, results_root: Path | None = None, out_dir: Path | None = None,
                      images_sha256: str | None = None) -> dict[str, Path]:
    """Regenerate the three CSVs of ``dataset`` from the result store, atomically. With
    ``images_sha256`` (the current image set), results scored on another set are left out."""
    out = out_dir or leaderboards_dir()
    tables = leaderboard_tables(list_results(dataset, root=results_root, images_sha256=images_sha256))
    names = {"main": f"{dataset}.csv", "ssim": f"{dataset}_ssim.csv", "road": f"{dataset}_road.csv"}
    paths = {}
    for key, df in tables.items():
        buf = io.StringIO()
        df.to_csv(buf, index=False, float_format="%.6g")
        paths[key] = out / names[key]
        atomic_write_bytes(paths[key], buf.getvalue().encode())
    return paths


def markdown_table(df: pd.DataFrame) -> str:
    """The README's compact view of a wide leaderboard."""
    cols = ["id", "method", "natural_acc", "robust_acc", "gini", "ssim_mean", "log10_ros", "ros_nan_fraction", "aopc"]
    d = df[cols].copy()
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in d.iterrows():
        cells = [str(r[c]) if isinstance(r[c], str) else f"{r[c]:.3f}" for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
