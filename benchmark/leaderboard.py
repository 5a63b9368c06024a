"""Leaderboards: a pure function from stored results to tables, written atomically.

- ``<dataset>.csv``: one row per model x method (wide), every aggregate with its 95% bootstrap
  interval (``<metric>_lo``, ``<metric>_hi``; PROTOCOL §7, §8.3), the numerical band of each
  headline aggregate (``<metric>_band``, §8.4), whether the row is ranked on ROS (``ros_ranked``:
  at most 10% NaN images, §8.2) and the platform it was scored on (§8.7).
- ``<dataset>_ssim.csv``: SSIM, its interval and the kept fraction per σ (long).
- ``<dataset>_road.csv``: ROAD accuracy and its interval per removal level (long).
- ``<dataset>_comparisons.csv``: paired model-vs-reference tests with verdicts.
- ``<dataset>_variants.csv``: every zoo recipe summarised across its training seeds.
- ``<dataset>_controls.csv``: the control explainers (``random``, ``edge``) per zoo model; the main
  board's ``beaten_by_control`` names the headline aggregates a control wins (``benchmark.controls``).
- ``<dataset>_gates.csv``, ``<dataset>_sanity.csv``: the sanity gates per model x method and the
  model-randomisation curves; the main board's ``gate`` column (``benchmark.sanity``).
- ``<dataset>_pattern.md``: the paper's claims, decided from the files above.
"""

from __future__ import annotations

import io
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd

from salbench.benchmark import claims as C
from salbench.benchmark import recipe_stats as RS
from salbench.benchmark.bands import band_of
from salbench.benchmark import stats as S
from salbench.benchmark.metric_registry import ROS_MAX_NAN_FRACTION, banded_aggregates, summary_metrics
from salbench.benchmark.results import leaderboards_dir, list_results
from salbench.model_zoo.zoo import atomic_write_bytes

VARIANT_ORDER = {"N": 0, "A": 1, "G": 2, "M1": 3, "M2": 4}
_SEED = re.compile(r"-s(\d+)$")


def seed_of(model: dict) -> int:
    """Training seed of a zoo entry: its card's recipe seed, else the id's ``-s<k>`` suffix.

    >>> seed_of({"id": "fmnist-lenet-A-paper-10ep-s2"}), seed_of({"id": "fmnist-lenet-A-paper-10ep"})
    (2, 0)
    """
    m = _SEED.search(model.get("id") or "")
    return int(m.group(1)) if m else 0


def recipe_of(model: dict) -> str:
    """The id without its seed suffix: one zoo recipe across seeds."""
    return _SEED.sub("", model.get("id") or "")


def arm_of(model: dict) -> str:
    """The variant with a non-default SmoothBlock placement: ``G``, ``G@p2``, ``M1``...

    >>> arm_of({"variant": "G", "smoothing": {"filter": "gaussian", "placement": 2}})
    'G@p2'
    """
    v = model.get("variant") or "?"
    place = (model.get("smoothing") or {}).get("placement", 1)
    return v if place in (1, None) else f"{v}@p{place}"


def _row_key(r: dict):
    m = r["model"]
    return (m.get("source") != "zoo", m.get("preset") or "", VARIANT_ORDER.get(m.get("variant"), 9),
            arm_of(m), seed_of(m), m.get("id") or "")


def _cis(results: list[dict]) -> dict[tuple[str, str], dict]:
    out = {}
    for r in results:
        for method in r["summary"]:
            pi = S.PerImage.from_result(r, method)
            out[(r["model"]["id"], method)] = S.aggregate_ci(pi, S.aggregate_names(pi, curve=True))
    return out


def leaderboard_tables(results: list[dict], *, stats: bool = True,
                       autoattack: dict[str, float] | None = None,
                       verifications: dict | None = None) -> dict[str, pd.DataFrame]:
    """Results -> ``{"main", "ssim", "road"}`` DataFrames (no I/O). With ``stats``, every
    aggregate carries its bootstrap interval (``_lo``/``_hi`` columns). ``autoattack``:
    checkpoint sha256 -> AutoAttack robust accuracy (from the zoo cards), NaN where unknown.
    ``verifications``: the dataset's verification records (``benchmark.provenance``): a row is
    ``verified`` when one is bound to its result's current digest and its checks hold."""
    from salbench.benchmark import provenance as PV

    autoattack = autoattack or {}
    verifications = verifications or {}
    rows, ssim_rows, road_rows = [], [], []
    results = sorted(results, key=_row_key)
    cis = _cis(results) if stats else {}
    for r in results:
        m, acc = r["model"], r["accuracy"]
        for method, s in r["summary"].items():
            ci = cis.get((m["id"], method), {})

            def put(row, col, value, key=None):
                row[col] = value
                if stats:
                    _, lo, hi = ci[key or col]
                    row[f"{col}_lo"], row[f"{col}_hi"] = lo, hi

            row = {
                "id": m["id"], "method": method, "variant": m.get("variant"), "preset": m.get("preset"),
                "seed": seed_of(m) if m.get("source") == "zoo" else None,
                "arch": m.get("arch"), "source": m.get("source"),
                "natural_acc": acc.get("natural", m.get("natural_accuracy")),
                "robust_acc": acc.get("robust", m.get("robust_accuracy")),
                "autoattack_acc": autoattack.get(m["sha256"], float("nan")),
            }
            put(row, "acc_on_set", acc["on_set"])
            # every registered metric's aggregates, in registry order (benchmark.metric_registry)
            for spec, values in summary_metrics(s):
                for agg in spec.aggregates(values):
                    if not agg.curve:
                        put(row, agg.name, agg.from_summary(s))
            for _, agg in banded_aggregates():
                if agg.name in row:
                    row[f"{agg.name}_band"] = band_of(r, method, agg.name)
            if "ros_nan_fraction" in row:
                row["ros_ranked"] = bool(row["ros_nan_fraction"] <= ROS_MAX_NAN_FRACTION)
            plat = r.get("versions", {}).get("platform", {})
            row["platform"] = f"{plat.get('cpu', '?')} / {plat.get('isa', '?')}" if plat else ""
            row["computed_by"] = PV.computed_by_label(r)
            row["verified"] = PV.is_verified(r, verifications)
            row.update({"n_images": r["imageset"]["n"], "protocol": r["protocol"], "sha256": m["sha256"],
                        "name": m.get("name") or "", "notes": m.get("notes") or ""})
            rows.append(row)
            for sigma, v in s.get("ssim", {}).items():
                sr = {"id": m["id"], "variant": m.get("variant"), "method": method, "sigma": float(sigma), "ssim": v}
                if stats:
                    sr["ssim_lo"], sr["ssim_hi"] = ci[f"ssim@{sigma}"][1:]
                sr["kept_fraction"] = s["ssim_kept_fraction"][sigma]
                ssim_rows.append(sr)
            for p, v in s.get("road_curve", {}).items():
                rr = {"id": m["id"], "variant": m.get("variant"), "method": method, "percent_removed": int(p),
                      "accuracy": v}
                if stats:
                    rr["accuracy_lo"], rr["accuracy_hi"] = ci[f"road@{p}"][1:]
                road_rows.append(rr)
    return {"main": pd.DataFrame(rows), "ssim": pd.DataFrame(ssim_rows), "road": pd.DataFrame(road_rows)}


def _same_natural_recipe(dataset: str | None, preset: str | None, other: str | None) -> bool:
    """Do two presets train N identically (the recipe apart from its preset name)?"""
    from salbench.model_zoo.recipes import get_recipe

    try:
        a, b = (get_recipe(dataset, p, "N").to_dict() for p in (preset, other))
    except (KeyError, ValueError, TypeError):
        return False
    a.pop("preset", None), b.pop("preset", None)
    return a == b


def zoo_groups(results: list[dict]) -> dict[tuple, dict[str, dict]]:
    """(preset, seed) -> arm -> result, over the zoo's models.

    A group with an A but no N of its own takes the N of the same seed from a preset whose N recipe
    is identical: FMNIST ``paper`` and ``paper-10ep`` differ only in the adversarial epochs, so
    the 40-epoch A and G are compared with the one N that both presets train.
    """
    groups: dict[tuple, dict[str, dict]] = {}
    for r in sorted((r for r in results if r["model"].get("source") == "zoo"), key=_row_key):
        m = r["model"]
        groups.setdefault((m.get("preset"), seed_of(m)), {})[arm_of(m)] = r
    own_n = {key: arms["N"] for key, arms in groups.items() if "N" in arms}
    for (preset, seed), arms in groups.items():
        if "N" in arms or "A" not in arms:
            continue
        dataset = arms["A"]["model"].get("dataset")
        for (other, s), n in sorted(own_n.items(), key=lambda kv: str(kv[0][0])):
            if s == seed and other != preset and _same_natural_recipe(dataset, preset, other):
                arms["N"] = n
                break
    return groups


def comparison_pairs(results: list[dict], reference_ids: dict[str, str] | None = None,
                     extra: tuple[tuple[str, str], ...] = ()) -> list[tuple[dict, dict]]:
    """(model, reference) result pairs (PROTOCOL §7): within each zoo (preset, seed), A vs N
    and every SmoothBlock arm (G, M1, M2, G@p2...) vs A, plus the ``extra`` (arm, reference
    arm) pairs (those the dataset's claims need); each submission vs the dataset's reference
    A and G (``reference_ids``: variant -> zoo id)."""
    zoo = [r for r in results if r["model"].get("source") == "zoo"]
    groups = zoo_groups(results)
    pairs = []
    for arms in groups.values():
        if "A" in arms and "N" in arms:
            pairs.append((arms["A"], arms["N"]))
        if "A" in arms:
            pairs += [(r, arms["A"]) for arm, r in arms.items() if arm not in ("N", "A")]
        pairs += [(arms[a], arms[b]) for a, b in extra if a in arms and b in arms and b != "A" and (a, b) != ("A", "N")]
    by_id = {r["model"]["id"]: r for r in zoo}
    refs = [by_id[i] for v, i in (reference_ids or {}).items() if v in ("A", "G") and i in by_id]
    for r in sorted(results, key=_row_key):
        if r["model"].get("source") != "zoo":
            pairs += [(r, ref) for ref in refs]
    return pairs


def _pair_bands(model: dict, ref: dict, method: str) -> dict[str, float]:
    """Per banded aggregate, the two results' bands summed (a missing band counts 0: a result
    without one is shown as such on the board, its verdicts are then the v1 rule)."""
    out = {}
    for _, agg in banded_aggregates():
        a, b = band_of(model, method, agg.name), band_of(ref, method, agg.name)
        out[agg.name] = (a if math.isfinite(a) else 0.0) + (b if math.isfinite(b) else 0.0)
    return out


def comparisons_table(results: list[dict], reference_ids: dict[str, str] | None = None,
                      extra: tuple[tuple[str, str], ...] = ()) -> pd.DataFrame:
    """Checkpoint comparisons (PROTOCOL §8.6): each pair of :func:`comparison_pairs`, per method and
    compared aggregate; the image is the unit."""
    rows = []
    for model, ref in comparison_pairs(results, reference_ids, extra):
        for method in model["summary"]:
            if method not in ref["summary"]:
                continue
            for c in S.compare(S.PerImage.from_result(model, method), S.PerImage.from_result(ref, method),
                               bands=_pair_bands(model, ref, method)):
                rows.append({"model": model["model"]["id"], "reference": ref["model"]["id"], "method": method, **c})
    cols = ["model", "reference", "method", "metric", "role", "variant_of", "n_paired", "delta", "delta_lo",
            "delta_hi", "p", "p_holm", "band", "verdict", "robustness"]
    return pd.DataFrame(rows, columns=cols)


_SPREAD_METRICS = ("natural_acc", "robust_acc", "autoattack_acc", "pgd_minus_autoattack", "acc_on_set", "gini",
                   "ssim_mean", "log10_ros", "ros_nan_fraction", "aopc", "ssim_raw", "ros_floor", "log10_mean_ros",
                   "aopc_stable_ties")


def variants_table(main: pd.DataFrame) -> pd.DataFrame:
    """Each zoo recipe (id without seed suffix) x method x metric across its training seeds."""
    rows = []
    zoo = main[main["source"] == "zoo"] if "source" in main.columns else main.iloc[0:0]
    if zoo.empty:
        return pd.DataFrame(columns=["recipe", "variant", "preset", "method", "metric", "n_seeds", "seeds", "mean",
                                     "std", "min", "max"])
    zoo = zoo.assign(recipe=[recipe_of({"id": i}) for i in zoo["id"]])
    if "autoattack_acc" in zoo.columns:  # a card without AutoAttack gives NaN, and so does its recipe's spread
        zoo = zoo.assign(pgd_minus_autoattack=zoo["robust_acc"].astype(float) - zoo["autoattack_acc"].astype(float))
    for (recipe, method), g in zoo.groupby(["recipe", "method"], sort=False):
        for metric in (m for m in _SPREAD_METRICS if m in g.columns):
            v = g[metric].astype(float).to_numpy()
            rows.append({"recipe": recipe, "variant": g["variant"].iloc[0], "preset": g["preset"].iloc[0],
                         "method": method, "metric": metric, "n_seeds": len(v),
                         "seeds": " ".join(str(int(s)) for s in g["seed"]), "mean": float(np.mean(v)),
                         "std": float(np.std(v, ddof=1)) if len(v) > 1 else float("nan"),
                         "min": float(np.min(v)), "max": float(np.max(v))})
    return pd.DataFrame(rows)


def _fmt_ci(d, lo, hi) -> str:
    return f"{d:+.4f} [{lo:+.4f}, {hi:+.4f}]"


def pattern_markdown(dataset: str, results: list[dict], comparisons: pd.DataFrame, variants: pd.DataFrame) -> str:
    """The paper's claims (:mod:`benchmark.claims`) decided per preset and seed pair."""
    arms: dict[str, dict[tuple[str, int], str]] = {}  # preset -> (arm, seed) -> id
    borrowed: dict[str, set[str]] = {}  # preset -> ids of models trained under another preset (a shared N)
    groups = zoo_groups(results)
    for (preset, seed), group in groups.items():
        for arm, r in group.items():
            arms.setdefault(preset, {})[(arm, seed)] = r["model"]["id"]
            if r["model"].get("preset") != preset:
                borrowed.setdefault(preset, set()).add(r["model"]["id"])
    paper = C.PAPER.get(dataset, {})
    lines = [f"# {dataset}: the paper's claims, decided by the benchmark",
             "",
             "Generated by `salbench leaderboard` from the stored results; do not edit. Protocol v2 "
             "(PROTOCOL §8). Two levels: **recipe claims** are decided with the training seed as the unit "
             "(one-sample t on the per-seed paired effects d_s, one-sided 95% bounds, superiority with a "
             "smallest effect δ or non-inferiority with margin δ, Holm over the preset's claim family, §8.6); "
             "**checkpoint comparisons** (one seed pair, the image as the unit: paired percentile bootstrap 95% "
             "interval, Wilcoxon p Holm-adjusted over the four headline metrics, numerical band) are the "
             "per-seed evidence. log10 ROS is the median over images of per-image log10 ROS; the paper "
             "reports log of the mean ROS, so its ROS differences (divided by ln 10, §6) compare with "
             "`log10_mean_ros`, not with this headline. `paper` is the paper's model - reference difference.",
             ""]
    if not results:
        return "\n".join(lines + [f"No protocol v2 results yet: `salbench leaderboard --dataset {dataset}` scores the zoo "
                                  "(the protocol v1 boards are archived in `leaderboards/archive/v1/`).", ""])
    if comparisons.empty:
        return "\n".join(lines + ["No comparable models yet.", ""])
    cmp_idx = comparisons.set_index(["model", "reference", "method", "metric"])
    spread = variants.set_index(["recipe", "method", "metric"]) if not variants.empty else None
    recipe = {preset: recipe_tests(dataset, arms[preset], cmp_idx, preset) for preset in sorted(p for p in arms if p)}
    lines += central_question(dataset, recipe)
    for preset in sorted(recipe):
        lines += recipe_table(dataset, preset, recipe[preset])
    lines += glance_table(dataset, arms, cmp_idx)
    lines += placement_table(dataset, groups, cmp_idx)
    for preset in sorted(p for p in arms if p):
        table = arms[preset]
        lines += [f"## preset `{preset}`", ""]
        shared = sorted(borrowed.get(preset, ()))
        if shared:
            lines += [f"N is shared with another preset that trains it identically: {', '.join(f'`{i}`' for i in shared)}.",
                      ""]
        lines += [
                  "| claim | method | paper | ours, per seed: delta [95% CI] (p Holm) -> status | across seeds |",
                  "|---|---|---|---|---|"]
        n_rows = 0
        for claim in C.claims_for(dataset):
            seeds = sorted(s for (a, s) in table if a == claim.model and (claim.reference, s) in table)
            for method in claim.methods:
                cells, statuses, deltas = [], [], []
                for s in seeds:
                    key = (table[(claim.model, s)], table[(claim.reference, s)], method, claim.metric)
                    if key not in cmp_idx.index:
                        continue
                    row = cmp_idx.loc[key]
                    st = C.status(claim, row)
                    statuses.append(st)
                    deltas.append(float(row["delta"]))
                    cells.append(f"s{s}: {_fmt_ci(row['delta'], row['delta_lo'], row['delta_hi'])} "
                                 f"(p {row['p_holm']:.2g}) -> **{st}**")
                if not cells:
                    continue
                sd = float("nan")
                if spread is not None and len(seeds) > 1:
                    sds = []
                    for arm in (claim.model, claim.reference):
                        key = (_recipe_id(table, arm, seeds[0]), method, claim.metric)
                        if key in spread.index:
                            sds.append(float(spread.loc[key, "std"]))
                    sd = max(sds) if sds else float("nan")
                gap = claim.expect in ("better", "worse")
                overall = C.across_seeds(statuses, deltas, sd, gap=gap)
                ptxt = _paper_delta(paper, claim, method)
                lines.append(f"| {claim.text} | {method} | {ptxt} | {'<br>'.join(cells)} | **{overall}** |")
                n_rows += 1
        if not n_rows:
            lines.append("| (no model pairs for these claims yet) | | | | |")
        lines.append("")
    return "\n".join(lines)


# pre-registered seeds per (dataset, preset) whose recipe claims are tested (PROTOCOL §8.6); every other
# preset with several seeds is descriptive ("consistent in j of k seeds")
PREREGISTERED = {("fmnist", "paper-10ep"): tuple(range(6))}
RECIPE_HEADING = "## Recipe claims"
CENTRAL_HEADING = "## Does smoothing make A's maps more trustworthy?"


def recipe_tests(dataset: str, table: dict, cmp_idx: pd.DataFrame, preset: str) -> list[tuple]:
    """(claim, method, seeds, SeedTest) of every main claim of one preset with a seed pair, Holm-adjusted
    over the preset's family (PROTOCOL §8.6). δ: the metric's (claims.DELTA_MIN), raised to the largest
    summed numerical band of the seed pairs."""
    rows = []
    for claim in C.claims_for(dataset):
        if claim.group != "main":
            continue
        seeds = sorted(s for (a, s) in table if a == claim.model and (claim.reference, s) in table)
        for method in claim.methods:
            ds, used, bands = [], [], []
            for s in seeds:
                key = (table[(claim.model, s)], table[(claim.reference, s)], method, claim.metric)
                if key in cmp_idx.index:
                    row = cmp_idx.loc[key]
                    ds.append(float(row["delta"]))
                    used.append(s)
                    bands.append(float(row.get("band", 0.0)) if "band" in row else 0.0)
            if not ds:
                continue
            kind, side, delta = C.recipe_spec(claim)
            finite_bands = [b for b in bands if math.isfinite(b)]
            delta = max([delta, *finite_bands])
            rows.append((claim, method, used, RS.seed_test(ds, kind=kind, side=side, delta_min=delta)))
    tests = RS.adjust_family([t for *_, t in rows]) if rows else []
    return [(c, m, s, t) for (c, m, s, _), t in zip(rows, tests)]


def _descriptive(test) -> str:
    """Status of a claim outside the pre-registered seeds: how many seeds point the claim's way."""
    if test.k < 2:
        return RS.ONE_SEED
    if test.kind == "superiority":
        j = sum(test.side * d >= test.delta_min for d in test.deltas)
    else:
        j = sum(test.side * d > -test.delta_min for d in test.deltas)
    return f"consistent in {j} of {test.k} seeds (descriptive)"


def _status_of(dataset: str, preset: str, seeds: list[int], test) -> str:
    pre = PREREGISTERED.get((dataset, preset))
    if pre is not None and test.k >= 2:
        return test.status + ("" if tuple(seeds) == pre else f" (seeds {', '.join(map(str, seeds))} of the "
                                                                f"pre-registered {len(pre)})")
    return _descriptive(test)


def recipe_table(dataset: str, preset: str, rows: list[tuple]) -> list[str]:
    if not rows:
        return []
    pre = PREREGISTERED.get((dataset, preset))
    what = (f"pre-registered seeds {', '.join(map(str, pre))}; Holm over the {len(rows)} claim x method tests of this "
            "preset" if pre else "not a pre-registered preset: statuses are descriptive, no test")
    out = [f"{RECIPE_HEADING}: preset `{preset}`", "",
           f"The training seed is the unit ({what}). d_s: the seed-s paired headline effect, model - reference; "
           "bounds: one-sided 95% t bounds on k-1 df; δ: the smallest effect that matters (superiority) or the "
           "margin (non-inferiority), never below the pair's numerical band; seeds for 80% power at the observed "
           "mean and spread.", "",
           "| claim | method | test | δ | k | d_s | mean | bounds | p | Holm p | seeds for 80% power | status |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for claim, method, seeds, t in rows:
        f = RS.format_row(t)
        kind = "superiority" if t.kind == "superiority" else "non-inferiority"
        out.append(f"| {claim.text} | {method} | {kind} | {t.delta_min:.3g} | {f['k']} | {f['d_s']} | {f['mean']} | "
                   f"{f['bounds']} | {f['p']} | {f['p_holm']} | {f['seeds_80']} | "
                   f"**{_status_of(dataset, preset, seeds, t)}** |")
    return out + [""]


_CENTRAL = ("ros_G_A", "ssim_G_A", "gini_G_A", "aopc_G_A")
_QUESTION = {"ros_G_A": "Are G's maps more stable in output (lower ROS)?",
             "ssim_G_A": "Are G's maps more stable under input noise (higher SSIM)?",
             "gini_G_A": "Does G keep A's sparsity (Gini within 0.02)?",
             "aopc_G_A": "Does G keep A's faithfulness (AOPC within 0.02)?"}


def _plain_answer(test, status: str) -> str:
    """A recipe test's status in plain words (the central-question table)."""
    if test.k < 2:
        return "no answer: one training seed"
    if status.startswith("consistent"):
        return status
    power = RS.format_row(test)["seeds_80"]
    m = re.search(r"of the pre-registered (\d+)\)", status)
    # an interim look (fewer seeds than pre-registered) is said to be one: the pre-registered test is at k = n
    interim = f" so far ({test.k} of the {m.group(1)} pre-registered seeds)" if m else ""
    if status.startswith("holds"):
        return "**yes**" + interim + (": G is better" if test.kind == "superiority" else ": G stays within the margin")
    if status.startswith("fails"):
        return "**no**" + interim + (": G is worse" if test.kind == "superiority" else ": G loses more than the margin")
    more = f"; about {power} seeds would give 80% power" if power.isdigit() else ""
    return f"**not decided** with {test.k} seeds{more}"


def central_question(dataset: str, recipe: dict[str, list[tuple]]) -> list[str]:
    """The paper's central question in plain words, from the seed-level G-vs-A claims of the preset with
    the most seeds: a table the README's first screen quotes and the site's index shows."""
    best = max(recipe, key=lambda p: max((t.k for c, *_, t in recipe[p] if c.key in _CENTRAL), default=0),
               default=None)
    if best is None:
        return []
    rows = [(c, m, s, t) for c, m, s, t in recipe[best] if c.key in _CENTRAL]
    if not rows:
        return []
    out = [CENTRAL_HEADING, "",
           f"G (adversarial training + Gaussian feature-map smoothing) against A (adversarial training alone), "
           f"{dataset} preset `{best}`, decided with the training seed as the unit (PROTOCOL §8.6): mean of the "
           "per-seed paired differences G - A with its one-sided 95% bounds and the Holm-adjusted p; the seeds for 80% "
           "power assume the observed mean and spread and a one-sided test at 0.05 before Holm.", "",
           "| question | method | answer | seeds | G - A: mean [bounds] | Holm p |", "|---|---|---|---|---|---|"]
    for c, m, s, t in rows:
        status = _status_of(dataset, best, s, t)
        f = RS.format_row(t)
        bounds = f"{f['mean']} {f['bounds']}" if t.k >= 2 else f"{f['mean']} (one seed)"
        out.append(f"| {_QUESTION[c.key]} | {m} | {_plain_answer(t, status)} | {t.k} | {bounds} | {f['p_holm']} |")
    return out + [""]


def _paper_delta(paper: dict, claim, method: str) -> str:
    """The paper's model - reference difference of a claim, formatted; ``n/a`` where it gives none."""
    if claim.paper is not None:
        return f"{claim.paper:+.3f}"
    pm = paper.get(claim.model, {}).get(method, {}).get(claim.metric)
    pr = paper.get(claim.reference, {}).get(method, {}).get(claim.metric)
    return f"{pm - pr:+.3f}" if pm is not None and pr is not None else "n/a"


GLANCE_HEADING = "## At a glance"


def glance_table(dataset: str, arms: dict, cmp_idx: pd.DataFrame) -> list[str]:
    """One row per (claim, method), one column per (preset, seed): the paired difference and the
    claim's status, for the claims about A vs N and G vs A (the paper's central ones). The README
    quotes this table (tests/benchmark/test_committed_artifacts.py keeps them equal)."""
    central = [c for c in C.claims_for(dataset)
               if c.group == "main" and c.model in ("A", "G") and c.reference in ("N", "A")]
    # a (preset, seed) column only where some claim has a model pair (an N alone makes none)
    columns = [(preset, seed) for preset in sorted(p for p in arms if p)
               for seed in sorted({s for (_, s) in arms[preset]})
               if any((arms[preset].get((c.model, seed)), arms[preset].get((c.reference, seed)), m, c.metric)
                      in cmp_idx.index for c in central for m in c.methods)]
    paper = C.PAPER.get(dataset, {})
    rows = []
    for claim in central:
        for method in claim.methods:
            cells, any_cell = [], False
            for preset, seed in columns:
                table = arms[preset]
                key = (table.get((claim.model, seed)), table.get((claim.reference, seed)), method, claim.metric)
                if key in cmp_idx.index:
                    row = cmp_idx.loc[key]
                    cells.append(f"{row['delta']:+.3f} {C.status(claim, row)}")
                    any_cell = True
                else:
                    cells.append("")
            if any_cell:
                ptxt = _paper_delta(paper, claim, method)
                rows.append(f"| {claim.text} | {method} | {ptxt} | " + " | ".join(cells) + " |")
    if not rows:
        return []
    head = "| claim | method | paper | " + " | ".join(f"`{p}` s{s}" for p, s in columns) + " |"
    return [GLANCE_HEADING, "",
            "Paired difference model - reference over the fixed set and the claim's status, per preset and "
            "training seed (details, intervals and p values in the sections below).", "",
            head, "|" + "---|" * (3 + len(columns)), *rows, ""]


PLACEMENT_HEADING = "## Placement ablation (paper Table 5)"


def placement_table(dataset: str, groups: dict, cmp_idx: pd.DataFrame) -> list[str]:
    """Paper Sec. 6.1 / Table 5: per (preset, seed) with G at more than one placement, VG Gini and
    log10 ROS of G at each placement minus N, with intervals, statuses and the paper's changes. The
    README quotes this table (tests/benchmark/test_committed_artifacts.py keeps them equal)."""
    by_arm = {c.model: c for c in C.claims_for(dataset) if c.group == "placement" and c.reference == "N"
              and c.metric == "gini"}
    ros = {c.model: c for c in C.claims_for(dataset) if c.group == "placement" and c.reference == "N"
           and c.metric == "log10_ros"}
    rows = []
    for (preset, seed), arms in sorted(groups.items(), key=lambda kv: (str(kv[0][0]), kv[0][1])):
        placed = [a for a in by_arm if a in arms]
        if "N" not in arms or len(placed) < 2:
            continue
        for k, arm in enumerate(by_arm, 1):
            if arm not in arms:
                continue
            m = arms[arm]["model"]
            cells = []
            for claim in (by_arm[arm], ros[arm]):
                key = (m["id"], arms["N"]["model"]["id"], "VG", claim.metric)
                if key in cmp_idx.index:
                    row = cmp_idx.loc[key]
                    cells += [f"{_fmt_ci(row['delta'], row['delta_lo'], row['delta_hi'])} {C.status(claim, row)}",
                              _paper_delta({}, claim, "VG")]
                else:
                    cells += ["", _paper_delta({}, claim, "VG")]
            a = arms[arm].get("accuracy", {})
            acc = " / ".join(f"{100 * a[k]:.1f}%" if isinstance(a.get(k), (int, float)) else "n/a"
                             for k in ("natural", "robust"))
            rows.append(f"| `{preset}` s{seed} | after block {k} | `{m['id']}` | {acc} | " + " | ".join(cells) + " |")
    if not rows:
        return []
    return [PLACEMENT_HEADING, "",
            "Where the SmoothBlock goes (VG; model - N of the same preset and seed, over the fixed set, with the "
            "paired 95% interval and the status of \"sparser than N\" / \"worse ROS than N\"); the paper's "
            "Table 5 changes beside them (its ROS divided by ln 10). Whether smoothing after block 1 is the most "
            "stable is decided in the preset sections below (claims \"Table 5: smoothing after block 1 ...\").", "",
            "| preset | placement | model | natural / PGD acc | Gini - N | paper | log10 ROS - N | paper |",
            "|---|---|---|---|---|---|---|---|", *rows, ""]


def _recipe_id(table: dict, arm: str, seed: int) -> str:
    return recipe_of({"id": table[(arm, seed)]})


def _autoattack_by_sha(dataset: str) -> dict[str, float]:
    """Checkpoint sha256 -> AutoAttack robust accuracy written on its card (``salbench zoo autoattack``)."""
    from salbench.model_zoo.zoo import list_cards

    return {c["sha256"]: float(c["autoattack"]["robust_accuracy"]) for c in list_cards(dataset)
            if isinstance(c.get("autoattack"), dict) and "robust_accuracy" in c["autoattack"]}


def _reference_ids(dataset: str) -> dict[str, str]:
    """variant -> id of the image set's reference models (what submissions are compared with)."""
    from salbench.benchmark.imagesets import REFERENCE_MODELS, imageset_path, read_imageset_doc

    p = imageset_path(dataset)
    if p.is_file():
        return {v: r["id"] for v, r in read_imageset_doc(p)["reference_models"].items()}
    return dict(REFERENCE_MODELS.get(dataset, {}))


def write_leaderboard(dataset: str, *, results_root: Path | None = None, out_dir: Path | None = None,
                      images_sha256: str | None = None, reference_ids: dict[str, str] | None = None) -> dict[str, Path]:
    """Regenerate every board file of ``dataset`` from the result store, atomically. With
    ``images_sha256`` (the current image set), results scored on another set are left out."""
    if reference_ids is None:
        reference_ids = _reference_ids(dataset)
    out = out_dir or leaderboards_dir()
    results = list_results(dataset, root=results_root, images_sha256=images_sha256)
    from salbench.benchmark.provenance import read_records

    from salbench.benchmark import controls as CT

    tables = leaderboard_tables(results, autoattack=_autoattack_by_sha(dataset),
                                verifications=read_records(dataset, results_root))
    tables["controls"] = CT.controls_table(CT.list_controls(dataset, results_root, images_sha256))
    from salbench.benchmark import sanity as SN

    sanity = SN.sanity_tables(SN.stored(dataset, results_root, images_sha256))
    tables["gates"], tables["sanity"] = sanity["gates"], sanity["curves"]
    if not tables["main"].empty:
        tables["main"]["gate"] = SN.gate_column(tables["main"], tables["gates"])
        tables["main"]["beaten_by_control"] = CT.beaten_by_control(tables["main"], tables["controls"])
    claim_pairs = tuple(dict.fromkeys((c.model, c.reference) for c in C.claims_for(dataset)))
    tables["comparisons"] = comparisons_table(results, reference_ids, claim_pairs)
    tables["variants"] = variants_table(tables["main"])
    names = {"main": f"{dataset}.csv", "ssim": f"{dataset}_ssim.csv", "road": f"{dataset}_road.csv",
             "comparisons": f"{dataset}_comparisons.csv", "variants": f"{dataset}_variants.csv",
             "controls": f"{dataset}_controls.csv", "gates": f"{dataset}_gates.csv",
             "sanity": f"{dataset}_sanity.csv"}
    paths = {}
    from salbench.benchmark.csv_safety import safe_frame  # no text cell starts a spreadsheet formula

    for key, df in tables.items():
        buf = io.StringIO()
        safe_frame(df).to_csv(buf, index=False, float_format="%.6g")
        paths[key] = out / names[key]
        atomic_write_bytes(paths[key], buf.getvalue().encode())
    paths["pattern"] = out / f"{dataset}_pattern.md"
    md = pattern_markdown(dataset, results, tables["comparisons"], tables["variants"])
    atomic_write_bytes(paths["pattern"], md.encode())
    return paths


# README sections that quote a generated table: (dataset, heading in <dataset>_pattern.md, README marker)
README_QUOTES = (("fmnist", CENTRAL_HEADING, "fmnist-central"), ("fmnist", GLANCE_HEADING, "fmnist-glance"),
                 ("cifar10", PLACEMENT_HEADING, "cifar10-placement"))


def pattern_section_table(pattern_md: str, heading: str) -> list[str]:
    """The table lines (``|...``) of one ``## `` section of a pattern file; [] if it has none."""
    if heading not in pattern_md:
        return []
    section = pattern_md.split(heading, 1)[1].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("|")]


def _markers(marker: str) -> tuple[str, str]:
    return f"<!-- BEGIN {marker}", f"<!-- END {marker} -->"


def readme_quote(readme: str, marker: str) -> list[str] | None:
    """The table lines the README holds between ``<!-- BEGIN marker ...-->`` and ``<!-- END marker -->``."""
    begin, end = _markers(marker)
    if begin not in readme or end not in readme:
        return None
    return [line for line in readme.split(begin, 1)[1].split(end, 1)[0].splitlines() if line.startswith("|")]


def bench_ratio_table(bench_md: str) -> list[str]:
    """The benchmark / ratio / target / met columns of ``docs/performance/bench.md``'s table."""
    rows = [line for line in bench_md.splitlines() if line.startswith("|")][2:]
    if not rows:
        return []
    out = ["| benchmark | ratio | target | met |", "|---|---|---|---|"]
    for line in rows:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        out.append(f"| {cells[0]} | {cells[3]} | {cells[4]} | {cells[5]} |")
    return out


#: Generated docs the README quotes in part: (path relative to the README, marker, the function
#: that turns the doc into the quoted table lines).
README_DOC_QUOTES = (("docs/performance/bench.md", "bench-ratios", bench_ratio_table),)


def _readme_tables(readme_path: Path, boards: Path) -> list[tuple[str, list[str]]]:
    """(marker, table lines) of every README quote, from the committed pattern files and docs."""
    out = []
    for dataset, heading, marker in README_QUOTES:
        pattern = boards / f"{dataset}_pattern.md"
        out.append((marker, pattern_section_table(pattern.read_text(), heading) if pattern.is_file() else []))
    for rel, marker, extract in README_DOC_QUOTES:
        doc = readme_path.parent / rel
        out.append((marker, extract(doc.read_text()) if doc.is_file() else []))
    return out


def sync_readme_quotes(readme_path: Path, boards: Path | None = None) -> list[str]:
    """Rewrite the README's quoted tables (``README_QUOTES``, ``README_DOC_QUOTES``) from the committed
    pattern files and docs, atomically; returns the markers it changed. ``make readme-tables`` runs it
    after a board regeneration or a ``SALBENCH_BENCH_MD`` bench run."""
    boards = boards or leaderboards_dir()
    text = readme_path.read_text()
    changed = []
    for marker, table in _readme_tables(readme_path, boards):
        quoted = readme_quote(text, marker)
        if quoted is None or not table or quoted == table:
            continue
        begin, end = _markers(marker)
        head, rest = text.split(begin, 1)
        begin_line, _ = rest.split("\n", 1)
        tail = rest.split(end, 1)[1]
        text = head + begin + begin_line + "\n" + "\n".join(table) + "\n" + end + tail
        changed.append(marker)
    if changed:
        atomic_write_bytes(readme_path, text.encode())
    return changed


def markdown_table(df: pd.DataFrame) -> str:
    """The README's compact view of a wide leaderboard (intervals where the CSV has them)."""
    cols = ["id", "method", "natural_acc", "robust_acc", "autoattack_acc", "gini", "ssim_mean", "log10_ros", "ros_nan_fraction", "aopc"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in df.iterrows():
        cells = []
        for c in cols:
            v = r[c]
            if isinstance(v, str):
                cells.append(v)
            elif f"{c}_lo" in df.columns and not (math.isnan(r[f"{c}_lo"]) or math.isnan(r[f"{c}_hi"])):
                cells.append(f"{v:.3f} [{r[f'{c}_lo']:.3f}, {r[f'{c}_hi']:.3f}]")
            else:
                cells.append(f"{v:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
