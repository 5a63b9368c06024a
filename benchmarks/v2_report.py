"""Protocol v2 report: numerical bands of every stored result and what changed from v1.

Writes ``docs/protocol-v2.md`` (generated; do not edit) from the stored results alone:

1. the numerical band of every headline aggregate (and of v1's ``log10_mean_ros``) per model and
   method (PROTOCOL §8.4), with the largest per metric and the target "ROS headline band < 0.05
   dex on FMNIST";
2. per model and method, v1's stored headline values (``leaderboards/archive/v1/results``) beside
   v2's, for the metrics whose definition changed (SSIM: raw maps -> scale-free; ROS: log10 of the
   mean -> median of per-image log10; AOPC: stable -> random tie order);
3. per claim, method and seed pair, the checkpoint status under v1 (archived comparisons) and
   under v2, with every change listed.

    .venv/bin/python benchmarks/v2_report.py            # writes docs/protocol-v2.md
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pandas as pd

from salbench.benchmark import claims as C
from salbench.benchmark import leaderboard as L
from salbench.benchmark.bands import band_of, banded_names
from salbench.benchmark.results import DEFAULT_LEADERBOARDS_DIR, list_results
from salbench.model_zoo.zoo import atomic_write_bytes

ROOT = Path(__file__).resolve().parents[1]
ARCHIVE = DEFAULT_LEADERBOARDS_DIR / "archive" / "v1"
CHANGED = (("ssim_mean", "ssim_mean"), ("log10_ros", "log10_ros"), ("aopc", "aopc"))


def _f(x: float, nd: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def band_section(dataset: str, results: list[dict]) -> list[str]:
    names = banded_names()
    out = [f"### {dataset}: numerical bands", "",
           "Largest |change| of each aggregate when every weight moves one ulp up or the model runs in float64, "
           "same draws (PROTOCOL §8.4); `salbench verify <id>` re-scores a model and checks it against these.", "",
           "| model | method | " + " | ".join(names) + " | re-scores | band time / scoring time |",
           "|---|---|" + "---|" * len(names) + "---|---|"]
    worst = {n: 0.0 for n in names}
    for r in sorted(results, key=lambda d: d["model"]["id"]):
        for m in r["summary"]:
            vals = [band_of(r, m, n) for n in names]
            for n, v in zip(names, vals):
                if math.isfinite(v):
                    worst[n] = max(worst[n], v)
            kinds = ", ".join((r.get("band") or {}).get("kinds", [])) or "none yet"
            secs, total = (r.get("band") or {}).get("seconds"), r["timings"].get("metrics_total")
            ratio = f"{secs / total:.2f}x ({secs:.0f} s / {total:.0f} s)" if secs and total else "n/a"
            out.append(f"| `{r['model']['id']}` | {m} | " + " | ".join("%.2g" % v if math.isfinite(v) else "n/a"
                                                                    for v in vals) + f" | {kinds} | {ratio} |")
    out += ["", "Times are wall-clock seconds on the machine that scored the row, which was shared with other work "
            "(training runs), so ratios are indicative; the band's two re-scores skip the accuracies.", "",
            "Largest band per aggregate: " + ", ".join(f"{n} {v:.2g}" for n, v in worst.items()) + ".", ""]
    if dataset == "fmnist":
        ros = [band_of(r, m, "log10_ros") for r in results for m in r["summary"]]
        ros = [v for v in ros if math.isfinite(v)]
        if ros:
            met = max(ros) < 0.05
            out += [f"Target (issue 25): every FMNIST ROS headline band < 0.05 dex: **{'met' if met else 'not met'}** "
                    f"(largest {max(ros):.3g} over {len(ros)} model x method rows with a band).", ""]
    return out


def _v1_summaries(dataset: str) -> dict[str, dict]:
    out = {}
    for p in sorted((ARCHIVE / "results" / dataset).glob("*-v1.json")):
        d = json.loads(p.read_text())
        out[d["model"]["sha256"]] = d
    return out


def values_section(dataset: str, results: list[dict]) -> list[str]:
    v1 = _v1_summaries(dataset)
    out = [f"### {dataset}: v1 and v2 headline values", "",
           "SSIM: v1 raw maps (now `ssim_raw`) -> v2 scale-free maps; ROS: v1 log10 of the mean (now "
           "`log10_mean_ros`, flipped images NaN) -> v2 median of per-image log10 ROS (flipped samples left out); "
           "AOPC: v1 stable tie order (now `aopc_stable_ties`) -> v2 seeded random ties.", "",
           "| model | method | SSIM v1 -> v2 | log10 ROS v1 -> v2 (ROS NaN v1 -> v2) | AOPC v1 -> v2 (tied pixels) |",
           "|---|---|---|---|---|"]
    for r in sorted(results, key=lambda d: d["model"]["id"]):
        old = v1.get(r["model"]["sha256"])
        for m, s in r["summary"].items():
            o = (old or {}).get("summary", {}).get(m, {})
            out.append(f"| `{r['model']['id']}` | {m} | {_f(o.get('ssim_mean'))} -> {_f(s['ssim_mean'])} | "
                       f"{_f(o.get('log10_ros'))} -> {_f(s['log10_ros'])} ({_f(o.get('ros_nan_fraction'))} -> "
                       f"{_f(s['ros_nan_fraction'])}) | {_f(o.get('aopc'), 4)} -> {_f(s['aopc'], 4)} "
                       f"({100 * s.get('road_tied_fraction', float('nan')):.0f}%) |")
    return out + [""]


def status_section(dataset: str, results: list[dict]) -> list[str]:
    p1 = ARCHIVE / f"{dataset}_comparisons.csv"
    out = [f"### {dataset}: checkpoint statuses, v1 -> v2", ""]
    if not p1.is_file():
        return out + ["No v1 comparisons archived.", ""]
    v1 = pd.read_csv(p1).set_index(["model", "reference", "method", "metric"])
    claim_pairs = tuple(dict.fromkeys((c.model, c.reference) for c in C.claims_for(dataset)))
    v2 = L.comparisons_table(results, {}, claim_pairs)
    if v2.empty:
        return out + ["No v2 comparisons yet.", ""]
    v2 = v2.set_index(["model", "reference", "method", "metric"])
    groups = L.zoo_groups(results)
    v1_claims = {c.key: c for c in C.CLAIMS}
    rows, changed, compared = [], 0, 0
    for (preset, seed), arms in sorted(groups.items(), key=lambda kv: (str(kv[0][0]), kv[0][1])):
        for claim in C.claims_for(dataset):
            if claim.group != "main" or claim.model not in arms or claim.reference not in arms:
                continue
            for m in claim.methods:
                key = (arms[claim.model]["model"]["id"], arms[claim.reference]["model"]["id"], m, claim.metric)
                if key not in v2.index:
                    continue
                new = C.status(claim, v2.loc[key])
                old_claim = v1_claims[claim.key]
                if claim.key == "ssim_G_A":  # v1 asked "SSIM of G is at least A's" (not worse)
                    old_claim = C.Claim(claim.key, "", "G", "A", "ssim_mean", "not worse")
                old = C.status(old_claim, v1.loc[key]) if key in v1.index else "n/a"
                mark = "" if old == new else " **changed**"
                if key in v1.index:  # pairs scored only under v2 (new seeds) have no v1 status to change
                    compared += 1
                    changed += old != new
                rows.append(f"| `{preset}` s{seed} | {claim.text} | {m} | {old} ({v1.loc[key]['delta']:+.3f}) | "
                            f"{new} ({v2.loc[key]['delta']:+.3f}){mark} |" if key in v1.index else
                            f"| `{preset}` s{seed} | {claim.text} | {m} | n/a | {new} ({v2.loc[key]['delta']:+.3f}) |")
    out += [f"{changed} of the {compared} checkpoint statuses that v1 had changed ({len(rows) - compared} more are of "
            "seed pairs scored only under v2). \"SSIM rises from A to G\" was v1's non-inferiority "
            "claim \"SSIM of G is at least A's\"; v2 tests it as superiority (PROTOCOL §8.6).", "",
            "| seed pair | claim | method | v1 status (delta) | v2 status (delta) |", "|---|---|---|---|---|", *rows, ""]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "protocol-v2.md")
    args = ap.parse_args()
    lines = ["# Protocol v2: bands and what changed from v1 (generated)", "",
             "Generated by `benchmarks/v2_report.py` from the stored results; do not edit. The rules are "
             "[PROTOCOL.md §8](../PROTOCOL.md); the v1 files are in `leaderboards/archive/v1/`.", ""]
    for dataset in ("fmnist", "cifar10"):
        results = [r for r in list_results(dataset) if r["model"].get("source") == "zoo"]
        lines += [f"## {dataset}", ""]
        if not results:
            lines += ["No protocol v2 results yet (`salbench leaderboard --dataset " + dataset + "` scores them).", ""]
            continue
        lines += band_section(dataset, results) + values_section(dataset, results) + status_section(dataset, results)
    atomic_write_bytes(args.out, "\n".join(lines).encode())
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
