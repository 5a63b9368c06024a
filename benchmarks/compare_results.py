"""Paired comparison of any two stored results on the same image set (PROTOCOL §7), as markdown.

The boards compare the pairs the claims name (G vs A, A vs N, ...). This compares any two
results, e.g. a model retrained with another trainer commit against the committed one (issue 11:
how far does the same recipe and seed move the metrics when only the code changed?)::

    .venv/bin/python benchmarks/compare_results.py MODEL.json REFERENCE.json [--methods VG IG]

A result is a ``leaderboards/results/<dataset>/<sha16>-v1.json`` file (or one written into another
store by ``SALBENCH_LEADERBOARDS_DIR=... salbench score``). Prints one row per headline aggregate:
model - reference over the paired images, the paired BCa interval, the Holm-adjusted Wilcoxon p
and the verdict, exactly as the boards compute them (``salbench.benchmark.stats.compare``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from salbench.benchmark import metric_registry, stats


def rows(model: dict, reference: dict, methods: tuple[str, ...] = ("VG", "IG")) -> list[dict]:
    """The board's paired comparison rows of the registered headline aggregates, per method (with the
    two results' numerical bands, as the board compares them)."""
    from salbench.benchmark.leaderboard import _pair_bands

    headline = {a.name for _, a in metric_registry.headline_aggregates()}
    out = []
    for method in methods:
        for r in stats.compare(stats.PerImage.from_result(model, method),
                               stats.PerImage.from_result(reference, method),
                               bands=_pair_bands(model, reference, method)):
            if r["metric"] in headline:
                out.append({"method": method, **r})
    return out


def markdown(model: dict, reference: dict, table: list[dict]) -> str:
    name = lambda r: r["model"].get("id") or r["model"].get("name") or r["model"]["sha256"][:16]  # noqa: E731
    lines = [f"model `{name(model)}` (sha256 {model['model']['sha256'][:16]}) - reference `{name(reference)}` "
             f"(sha256 {reference['model']['sha256'][:16]}); natural accuracy "
             f"{model['accuracy'].get('natural', float('nan')):.4f} vs {reference['accuracy'].get('natural', float('nan')):.4f}, "
             f"robust {model['accuracy'].get('robust', float('nan')):.3f} vs {reference['accuracy'].get('robust', float('nan')):.3f}",
             "", "| method | metric | n paired | model - reference [95% CI] | p (Holm) | verdict |",
             "|---|---|---|---|---|---|"]
    for r in table:
        lines.append(f"| {r['method']} | {r['metric']} | {r['n_paired']} | {r['delta']:+.4f} "
                     f"[{r['delta_lo']:+.4f}, {r['delta_hi']:+.4f}] | {r['p_holm']:.2g} | {r['verdict']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("reference", type=Path)
    ap.add_argument("--methods", nargs="+", default=["VG", "IG"])
    args = ap.parse_args(argv)
    model, reference = (json.loads(p.read_text()) for p in (args.model, args.reference))
    print(markdown(model, reference, rows(model, reference, tuple(args.methods))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
