"""Intervals, paired tests, verdicts and claims (PROTOCOL §7, §8), against scipy and by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sps

from salbench.benchmark import claims as C
from salbench.benchmark import stats as S
from salbench.benchmark.leaderboard import comparison_pairs, leaderboard_tables, variants_table
from salbench.benchmark.results import DEFAULT_LEADERBOARDS_DIR

SIGMAS = ["0.01", "0.1"]
LEVELS = ["1", "6", "11"]


def _pi(n=200, seed=0, gini=None, ros=None, ssim=None, kept=None, road=None, ros_nan=None, ros_floor=None,
        ssim_raw=None, road_stable=None) -> S.PerImage:
    rng = np.random.default_rng(seed)
    ssim = rng.random((2, n)) if ssim is None else np.asarray(ssim, float)
    raw = rng.random((2, n)) if ssim_raw is None else np.asarray(ssim_raw, float)
    kept = np.ones((2, n), bool) if kept is None else np.asarray(kept, bool)
    ros = 10 ** rng.normal(3, 0.5, n) if ros is None else np.asarray(ros, float)
    road = (rng.random((n, 3)) < [0.9, 0.6, 0.3]).astype(float) if road is None else np.asarray(road, float)
    return S.PerImage(values={
        "gini": {"gini": rng.random(n) if gini is None else np.asarray(gini, float)},
        "ssim": {"ssim": np.where(kept, ssim, 0.0), "kept": kept, "raw": np.where(kept, raw, 0.0), "kept_raw": kept,
                 "sigmas": SIGMAS},
        "ros": {"ros": ros, "ros_nan": ros if ros_nan is None else np.asarray(ros_nan, float),
                "ros_floor": ros / 10 if ros_floor is None else np.asarray(ros_floor, float)},
        "road": {"road": road, "road_stable": road if road_stable is None else np.asarray(road_stable, float),
                 "road_tied": rng.random(n), "levels": LEVELS}}, correct=np.ones(n))


def test_estimates_are_the_protocol_aggregates():
    pi = _pi(ros=np.r_[np.nan, 10.0, 1000.0, np.full(197, 100.0)],
             kept=np.r_[[np.r_[False, np.ones(199, bool)]], [np.ones(200, bool)]])
    ci = S.aggregate_ci(pi, S.aggregate_names(pi, curve=True))
    assert ci["gini"][0] == pytest.approx(pi.gini.mean())
    assert ci["ssim@0.01"][0] == pytest.approx(pi.ssim[0, 1:].mean())  # kept images only
    assert ci["ssim_mean"][0] == pytest.approx((pi.ssim[0, 1:].mean() + pi.ssim[1].mean()) / 2)
    assert ci["log10_ros"][0] == pytest.approx(np.nanmedian(np.log10(pi.ros)))  # v2: median of per-image log10
    assert ci["log10_mean_ros"][0] == pytest.approx(math.log10(np.nanmean(pi.ros)))  # v1, secondary
    assert ci["ros_floor"][0] == pytest.approx(np.nanmedian(np.log10(pi.ros / 10)))
    assert ci["ros_nan_fraction"][0] == pytest.approx(1 / 200)
    assert ci["ssim_raw"][0] == pytest.approx((pi.values["ssim"]["raw"][0, 1:].mean() + pi.values["ssim"]["raw"][1].mean()) / 2)
    acc = pi.road.mean(0)
    assert ci["aopc"][0] == pytest.approx(((acc[0] - acc) / 4).sum())
    assert ci["road@6"][0] == pytest.approx(acc[1])
    for name, (e, lo, hi) in ci.items():
        assert lo <= e <= hi, name


@pytest.mark.parametrize("path", sorted((DEFAULT_LEADERBOARDS_DIR / "results" / "fmnist").glob("*-v2.json"))[:1])
def test_estimates_equal_the_stored_summary(path: Path):
    r = json.loads(path.read_text())
    for method, s in r["summary"].items():
        ci = S.aggregate_ci(S.PerImage.from_result(r, method))
        for k in ("gini", "ssim_mean", "ssim_raw", "log10_ros", "ros_floor", "log10_mean_ros", "ros_nan_fraction",
                  "aopc", "aopc_stable_ties", "road_tied_fraction"):
            assert ci[k][0] == pytest.approx(s[k], rel=1e-6, abs=1e-9), k
        assert ci["acc_on_set"][0] == pytest.approx(r["accuracy"]["on_set"], abs=1e-6)


def test_bootstrap_interval_covers_a_known_mean_about_95_percent(monkeypatch):
    """Coverage over 240 simulated image sets with a known population mean (skewed values).
    2000 resamples instead of 10 000 keep it fast; that adds Monte-Carlo noise to each bound,
    not bias. Binomial SE of the coverage at 240 sets: 0.014."""
    monkeypatch.setattr(S, "N_RESAMPLES", 2000)
    hits, sets = 0, 240
    for k in range(sets):
        rng = np.random.default_rng(1000 + k)
        g = rng.exponential(0.5, 120)  # population mean 0.5
        _, lo, hi = S.aggregate_ci(_pi(120, seed=k, gini=g), ["gini"], seed=k)["gini"]
        hits += lo <= 0.5 <= hi
    assert 0.90 <= hits / sets <= 0.99, hits / sets


def test_intervals_are_scipys_percentile_bootstrap_of_the_statistic():
    """PROTOCOL §8.3: the percentile bootstrap (10 000 resamples, default_rng(0)), here for a mean and,
    through the counts, for the median of per-image log10 ROS."""
    pi = _pi(150, seed=4)
    ci = S.aggregate_ci(pi, ["gini", "log10_ros"])
    for name, values, stat in (("gini", pi.gini, np.mean), ("log10_ros", np.log10(pi.ros), np.median)):
        ref = sps.bootstrap((values,), stat, n_resamples=10_000, method="percentile",
                            random_state=np.random.default_rng(0), batch=2500)
        assert ci[name][1] == pytest.approx(ref.confidence_interval.low, rel=1e-9), name
        assert ci[name][2] == pytest.approx(ref.confidence_interval.high, rel=1e-9), name


@pytest.mark.parametrize("seed", range(5))
def test_weighted_median_is_numpys_median_of_the_resample(seed):
    from salbench.benchmark.metric_registry import weighted_median

    rng = np.random.default_rng(seed)
    v = rng.normal(size=40)
    v[rng.random(40) < 0.2] = np.nan
    valid = rng.random(40) < 0.9
    idx = rng.integers(0, 40, (25, 40))
    counts = S._counts(idx, 40)
    got = weighted_median(v, valid, counts)
    for row, i in zip(got, idx):
        pick = v[i][valid[i] & np.isfinite(v[i])]
        assert row == pytest.approx(np.median(pick)) if pick.size else math.isnan(row)


def test_interval_of_a_constant_statistic_is_the_point():
    pi = _pi(50, gini=np.full(50, 0.3))
    assert S.aggregate_ci(pi, ["gini", "acc_on_set"])["gini"] == pytest.approx((0.3, 0.3, 0.3))


def test_wilcoxon_p_is_scipys_on_the_paired_valid_images():
    rng = np.random.default_rng(3)
    ros_a, ros_b = 10 ** rng.normal(3, 0.4, 300), 10 ** rng.normal(3.1, 0.4, 300)
    ros_a[:7] = np.nan
    ros_b[5:12] = np.nan  # 12 images NaN in one or the other
    a, b = _pi(300, 1, ros=ros_a), _pi(300, 2, ros=ros_b)
    rows = {r["metric"]: r for r in S.compare(a, b)}
    ok = np.isfinite(ros_a) & np.isfinite(ros_b)
    assert rows["log10_ros"]["n_paired"] == 288
    assert rows["log10_ros"]["p"] == pytest.approx(sps.wilcoxon(np.log10(ros_a[ok]), np.log10(ros_b[ok])).pvalue)
    # v2: the median of per-image paired log10 differences; v1's difference of log10 means is secondary
    assert rows["log10_ros"]["delta"] == pytest.approx(np.median(np.log10(ros_a[ok]) - np.log10(ros_b[ok])))
    assert rows["log10_mean_ros"]["delta"] == pytest.approx(math.log10(ros_a[ok].mean()) - math.log10(ros_b[ok].mean()))
    assert rows["gini"]["p"] == pytest.approx(sps.wilcoxon(a.gini, b.gini).pvalue)
    assert rows["gini"]["delta"] == pytest.approx(a.gini.mean() - b.gini.mean())
    assert rows["aopc"]["p"] == pytest.approx(sps.wilcoxon(a.aopc_terms, b.aopc_terms).pvalue)


def test_verdict_follows_each_metrics_direction():
    rng = np.random.default_rng(5)
    base = rng.random(400)
    ros = 10 ** rng.normal(3, 0.3, 400)
    ref = _pi(400, 1, gini=base, ros=ros)
    model = _pi(400, 1, gini=base + 0.05 + rng.normal(0, 0.01, 400), ros=ros / 3)  # sparser, more stable
    rows = {r["metric"]: r for r in S.compare(model, ref)}
    assert rows["gini"]["verdict"] == "better" and rows["log10_ros"]["verdict"] == "better"
    rows = {r["metric"]: r for r in S.compare(ref, model)}
    assert rows["gini"]["verdict"] == "worse" and rows["log10_ros"]["verdict"] == "worse"
    same = {r["metric"]: r for r in S.compare(ref, ref)}
    assert all(r["verdict"] == "no detectable difference" for r in same.values())
    assert same["gini"]["p"] == 1.0 and same["gini"]["delta"] == 0.0


def test_holm_runs_over_the_headline_metrics_and_variants_take_their_headlines_place():
    rng = np.random.default_rng(6)
    ref = _pi(300, 1)
    model = _pi(300, 1, gini=ref.gini + rng.normal(0.01, 0.05, 300), ros=ref.ros * 10 ** rng.normal(-0.05, 0.3, 300))
    rows = {r["metric"]: r for r in S.compare(model, ref)}
    head = [m for m, r in rows.items() if r["role"] == "headline"]
    assert head == ["gini", "ssim_mean", "log10_ros", "aopc"]
    adjusted = S.holm([rows[m]["p"] for m in head])
    assert [rows[m]["p_holm"] for m in head] == pytest.approx(adjusted)
    swapped = S.holm([rows["ros_floor"]["p"] if m == "log10_ros" else rows[m]["p"] for m in head])
    assert rows["ros_floor"]["p_holm"] == pytest.approx(swapped[head.index("log10_ros")])
    assert rows["ssim@0.1"]["role"] == "level" and rows["log10_mean_ros"]["role"] == "secondary"


def test_a_verdict_is_robust_only_when_every_variant_agrees():
    rng = np.random.default_rng(7)
    ros = 10 ** rng.normal(3, 0.3, 400)
    ref = _pi(400, 1, ros=ros)
    better = _pi(400, 1, ros=ros / 3, ros_floor=ros / 30)  # headline and floor variant both improve
    split = _pi(400, 1, ros=ros / 3, ros_floor=ros / 10 * 3)  # the floor variant gets worse
    assert {r["metric"]: r for r in S.compare(better, ref)}["log10_ros"]["robustness"] == "robust"
    rows = {r["metric"]: r for r in S.compare(split, ref)}
    assert rows["log10_ros"]["verdict"] == "better" and rows["ros_floor"]["verdict"] == "worse"
    assert rows["log10_ros"]["robustness"] == "variant-dependent"


def test_a_difference_inside_the_numerical_band_decides_nothing():
    rng = np.random.default_rng(8)
    ros = 10 ** rng.normal(3, 0.3, 400)
    ref, model = _pi(400, 1, ros=ros), _pi(400, 1, ros=ros / 3)  # delta = -log10(3) = -0.477
    assert {r["metric"]: r for r in S.compare(model, ref)}["log10_ros"]["verdict"] == "better"
    rows = {r["metric"]: r for r in S.compare(model, ref, bands={"log10_ros": 0.5})}
    assert rows["log10_ros"]["band"] == 0.5 and rows["log10_ros"]["verdict"] == "no detectable difference"


def test_verdict_needs_both_the_test_and_the_interval():
    assert S.verdict(0.1, 0.05, 0.2, 0.001, "gini", 100) == "better"
    assert S.verdict(0.1, -0.05, 0.2, 0.001, "gini", 100) == "no detectable difference"  # CI straddles 0
    assert S.verdict(0.1, 0.05, 0.2, 0.2, "gini", 100) == "no detectable difference"  # p too large
    assert S.verdict(0.1, 0.05, 0.2, 0.001, "log10_ros", 100) == "worse"
    assert S.verdict(0.1, 0.05, 0.2, 0.001, "gini", 0) == "not comparable"


def test_holm_by_hand():
    # m = 4; sorted p 0.005, 0.01, 0.03, 0.04 -> 0.02, 0.03, 0.06, max(0.06, 0.04) = 0.06
    assert S.holm([0.04, 0.005, 0.03, 0.01]) == pytest.approx([0.06, 0.02, 0.06, 0.03])
    adj = S.holm([0.2, float("nan"), 0.01])  # NaN is not counted in the family
    assert adj[0] == pytest.approx(0.2) and math.isnan(adj[1]) and adj[2] == pytest.approx(0.02)


def _result(mid, variant, preset="p", source="zoo", seed_shift=0.0, smoothing=None):
    pi = _pi(60, seed=sum(map(ord, mid)))
    per = {"gini": list(pi.gini + seed_shift), "ros": list(pi.ros), "ros_nan": list(pi.ros),
           "ros_floor": list(pi.ros / 10), "ssim": pi.ssim.tolist(), "ssim_raw": pi.ssim.tolist(),
           "ssim_kept": pi.kept.astype(int).tolist(), "road": pi.road.tolist(), "road_stable": pi.road.tolist(),
           "road_tied": [0.0] * 60}
    summ = {"gini": float(np.mean(per["gini"])), "ssim": {s: 0.5 for s in SIGMAS},
            "ssim_kept_fraction": {s: 1.0 for s in SIGMAS}, "ssim_mean": 0.5, "ssim_raw": 0.5, "log10_ros": 3.0,
            "ros_nan_fraction": 0.0, "ros_floor": 2.0, "log10_mean_ros": 3.1, "log10_mean_ros_nan_fraction": 0.0,
            "road_curve": {p: 0.5 for p in LEVELS}, "aopc": 0.1, "aopc_stable_ties": 0.1, "road_tied_fraction": 0.0}
    return {"model": {"id": mid, "variant": variant, "preset": preset, "source": source, "sha256": mid,
                      "smoothing": smoothing, "arch": "lenet"},
            "accuracy": {"on_set": 1.0, "natural": 0.8, "robust": 0.6}, "summary": {"VG": summ},
            "per_image": {"correct": [1] * 60, "VG": per}, "imageset": {"n": 60}, "protocol": "v2"}


def test_comparison_pairs_within_seed_and_for_submissions():
    rs = [_result("d-N-p", "N"), _result("d-A-p", "A"), _result("d-G-p", "G"), _result("d-M1-p", "M1"),
          _result("d-A-p-s1", "A"), _result("d-G-p-s1", "G"),
          _result("d-G-p-p2", "G", smoothing={"filter": "gaussian", "placement": 2}),
          _result("sub-x", "submission", source="submission")]
    pairs = [(m["model"]["id"], r["model"]["id"]) for m, r in
             comparison_pairs(rs, {"A": "d-A-p", "G": "d-G-p"}, extra=(("G", "M1"),))]
    assert ("d-A-p", "d-N-p") in pairs and ("d-G-p", "d-A-p") in pairs and ("d-M1-p", "d-A-p") in pairs
    assert ("d-G-p-p2", "d-A-p") in pairs and ("d-G-p", "d-M1-p") in pairs
    assert ("d-G-p-s1", "d-A-p-s1") in pairs and ("d-G-p-s1", "d-A-p") not in pairs  # same seed only
    assert ("sub-x", "d-A-p") in pairs and ("sub-x", "d-G-p") in pairs
    assert len(pairs) == len(set(pairs))


def test_a_preset_without_its_own_n_borrows_an_identically_trained_one():
    # FMNIST `paper` (40 PGD epochs) trains N exactly as `paper-10ep` does: the 40-epoch A is compared
    # with that N, of the same seed only; CIFAR-10's presets train N differently, so none is borrowed.
    def fm(mid, variant, preset):
        r = _result(mid, variant, preset)
        r["model"]["dataset"] = "fmnist"
        return r

    rs = [fm("fmnist-lenet-N-paper-10ep", "N", "paper-10ep"), fm("fmnist-lenet-A-paper-10ep", "A", "paper-10ep"),
          fm("fmnist-lenet-N-paper-10ep-s1", "N", "paper-10ep"), fm("fmnist-lenet-A-paper", "A", "paper"),
          fm("fmnist-lenet-G-paper", "G", "paper")]
    cifar = [_result("c-N-cpu", "N", "cpu-resnet8"), _result("c-A-paper", "A", "paper")]
    for r in cifar:
        r["model"]["dataset"] = "cifar10"
    pairs = [(m["model"]["id"], r["model"]["id"]) for m, r in comparison_pairs(rs + cifar)]
    assert ("fmnist-lenet-A-paper", "fmnist-lenet-N-paper-10ep") in pairs
    assert ("fmnist-lenet-G-paper", "fmnist-lenet-A-paper") in pairs
    assert not any(ref == "fmnist-lenet-N-paper-10ep-s1" and m.endswith("-paper") for m, ref in pairs)
    assert not any(m == "c-A-paper" for m, _ in pairs)
    from salbench.benchmark.leaderboard import comparisons_table, pattern_markdown

    table = comparisons_table(rs)
    md = pattern_markdown("fmnist", rs, table, variants_table(leaderboard_tables(rs, stats=False)["main"]))
    section = md.split("## preset `paper`")[1].split("## preset")[0]
    assert "N is shared with another preset that trains it identically: `fmnist-lenet-N-paper-10ep`." in section
    assert "A is sparser than N" in section and "G keeps A's sparsity" in section
    assert "N is shared" not in md.split("## preset `paper-10ep`")[1]


def test_placement_table_reports_table5_changes_against_n():
    """Paper Table 5: G at each placement minus N (VG Gini, log10 ROS) with the paper's changes; the
    ordering claim (block 1 most stable) is decided in the preset section."""
    from salbench.benchmark.leaderboard import PLACEMENT_HEADING, comparisons_table, pattern_markdown

    def c(mid, variant, placement=None, shift=0.0):
        r = _result(mid, variant, "cpu-resnet8", seed_shift=shift,
                    smoothing=None if placement is None else {"filter": "gaussian", "placement": placement})
        r["model"]["dataset"] = "cifar10"
        return r

    rs = [c("c-N", "N"), c("c-A", "A", shift=0.05), c("c-G", "G", 1, shift=0.06), c("c-G-p2", "G", 2, shift=0.07)]
    claim_pairs = tuple(dict.fromkeys((cl.model, cl.reference) for cl in C.claims_for("cifar10")))
    table = comparisons_table(rs, extra=claim_pairs)
    assert {("c-G-p2", "c-N"), ("c-G", "c-N"), ("c-G", "c-G-p2")} <= set(zip(table["model"], table["reference"]))
    md = pattern_markdown("cifar10", rs, table, variants_table(leaderboard_tables(rs, stats=False)["main"]))
    section = md.split(PLACEMENT_HEADING)[1].split("\n## ")[0]
    rows = [line for line in section.splitlines() if line.startswith("| `cpu-resnet8`")]
    assert [r.split(" | ")[1] for r in rows] == ["after block 1", "after block 2"]
    g_p2 = table[(table["model"] == "c-G-p2") & (table["reference"] == "c-N") & (table["metric"] == "gini")]
    assert f"{g_p2['delta'].iloc[0]:+.4f}" in rows[1] and "+0.180" in rows[1]  # ours, and the paper's 0.18
    assert f"{0.23 / math.log(10):+.3f}" in rows[1]  # the paper's ROS change in log10 units
    assert "80.0% / 60.0%" in rows[0]
    assert "Table 5: smoothing after block 1 is the most stable (ROS G < G@p2)" in md
    glance = md.split("## At a glance")[1].split("\n## ")[0]
    assert "Table 5" not in glance  # the glance table keeps the paper's central claims only
    # with one placement there is no ablation to show
    md1 = pattern_markdown("cifar10", rs[:3], comparisons_table(rs[:3], extra=claim_pairs),
                           variants_table(leaderboard_tables(rs[:3], stats=False)["main"]))
    assert PLACEMENT_HEADING not in md1


def test_glance_table_has_no_column_for_a_seed_without_a_model_pair():
    """An N trained for a new seed before its A and G makes no (empty) column in "At a glance"."""
    from salbench.benchmark.leaderboard import comparisons_table, pattern_markdown

    rs = [_result("d-N-p", "N"), _result("d-A-p", "A"), _result("d-G-p", "G"), _result("d-N-p-s2", "N")]
    for r in rs:
        r["model"]["dataset"] = "fmnist"
    rs[-1]["model"]["id"] = "d-N-p-s2"
    md = pattern_markdown("fmnist", rs, comparisons_table(rs), variants_table(leaderboard_tables(rs, stats=False)["main"]))
    header = next(line for line in md.split("## At a glance")[1].splitlines() if line.startswith("| claim"))
    assert header == "| claim | method | paper | `p` s0 |"


def test_variants_table_spreads_over_seeds():
    rs = [_result("d-A-p", "A"), _result("d-A-p-s1", "A", seed_shift=0.1), _result("d-A-p-s2", "A", seed_shift=0.2)]
    main = leaderboard_tables(rs, autoattack={"d-A-p": 0.55, "d-A-p-s1": 0.57, "d-A-p-s2": 0.50})["main"]
    v = variants_table(main)
    g = v[(v["recipe"] == "d-A-p") & (v["metric"] == "gini")].iloc[0]
    assert g["n_seeds"] == 3 and g["seeds"] == "0 1 2"
    vals = sorted(main["gini"])
    assert g["mean"] == pytest.approx(np.mean(vals)) and g["std"] == pytest.approx(np.std(vals, ddof=1))
    assert g["min"] == pytest.approx(vals[0]) and g["max"] == pytest.approx(vals[-1])
    aa = v[(v["recipe"] == "d-A-p") & (v["metric"] == "autoattack_acc")].iloc[0]
    assert aa["mean"] == pytest.approx(np.mean([0.55, 0.57, 0.50])) and aa["std"] == pytest.approx(0.0360555, abs=1e-6)
    gap = v[(v["recipe"] == "d-A-p") & (v["metric"] == "pgd_minus_autoattack")].iloc[0]  # robust 0.6 on every card
    assert (gap["min"], gap["max"]) == (pytest.approx(0.03), pytest.approx(0.10))


def test_claim_status_and_across_seeds():
    better = C.Claim("k", "", "G", "A", "log10_ros", "better")
    row = lambda v, lo=-0.1, hi=-0.05: {"verdict": v, "delta_lo": lo, "delta_hi": hi}  # noqa: E731
    assert [C.status(better, row(v)) for v in ("better", "worse", "no detectable difference")] == \
        ["holds", "fails", "undecided"]
    notworse = C.Claim("k", "", "G", "A", "ssim_mean", "not worse")
    assert C.recipe_spec(notworse) == ("noninferiority", 1, 0.01)
    assert C.status(notworse, row("no detectable difference")) == "holds"
    assert C.status(notworse, row("worse")) == "fails"
    margin = C.Claim("k", "", "G", "A", "aopc", "margin", margin=-0.02)
    assert C.status(margin, row("worse", -0.03, -0.01)) == "undecided"
    assert C.status(margin, row("worse", -0.05, -0.03)) == "fails"
    assert C.across_seeds(["holds", "holds"], [-0.1, -0.12], 0.2) == "undecided"  # spread larger than the gap
    assert C.across_seeds(["holds", "holds"], [-0.1, -0.12], 0.05) == "holds"
    assert C.across_seeds(["holds", "holds"], [0.001, 0.0], float("nan"), gap=False) == "holds"


def test_discrete_aggregates_do_not_depend_on_the_summation_order():
    """AOPC, accuracy and NaN fraction take few distinct values, so many bootstrap resamples tie
    with the estimate and the percentiles fall on ties: their sums must be exact (integer
    numerators), or another BLAS summation order (e.g. OMP_NUM_THREADS=1) shifts the interval."""
    pi = _pi(300, seed=9)
    c = S._Columns(pi)
    rng = np.random.default_rng(0)
    counts = S._counts(rng.integers(0, 300, (50, 300)), 300)
    forward = counts @ c.matrix
    backward = (counts[:, ::-1] @ c.matrix[::-1]).copy()  # the same sums, added in the other order
    names = ["aopc", "aopc_stable_ties", "acc_on_set", "ros_nan_fraction", "road@6"]
    assert np.array_equal(c.aggregates(forward, names), c.aggregates(backward, names))


def test_recipe_claims_use_the_training_seed_as_the_unit():
    """PROTOCOL §8.6: per claim and method, d_s is the seed-s checkpoint effect; the recipe test is a
    t test over the seeds (benchmark.recipe_stats), Holm over the preset's family."""
    from salbench.benchmark import recipe_stats as RS
    from salbench.benchmark.leaderboard import (CENTRAL_HEADING, PREREGISTERED, comparisons_table, pattern_markdown,
                                                recipe_tests, zoo_groups)

    rs = []
    for s in range(3):
        suffix = f"-s{s}" if s else ""
        for v, shift in (("N", 0.0), ("A", 0.1), ("G", 0.1 + 0.03 * (s + 1))):
            r = _result(f"fmnist-lenet-{v}-paper-10ep{suffix}", v, "paper-10ep", seed_shift=shift)
            r["model"]["dataset"] = "fmnist"
            rs.append(r)
    table = comparisons_table(rs)
    cmp_idx = table.set_index(["model", "reference", "method", "metric"])
    arms = {}
    for (preset, seed), group in zoo_groups(rs).items():
        for arm, r in group.items():
            arms[(arm, seed)] = r["model"]["id"]
    rows = recipe_tests("fmnist", arms, cmp_idx, "paper-10ep")
    gini = next(t for c, m, s, t in rows if c.key == "gini_G_A")
    want = [float(cmp_idx.loc[(arms[("G", s)], arms[("A", s)], "VG", "gini"), "delta"]) for s in range(3)]
    assert gini.k == 3 and list(gini.deltas) == pytest.approx(want)
    ref = RS.seed_test(want, kind="noninferiority", side=1, delta_min=0.02)
    assert gini.p == pytest.approx(ref.p) and gini.lower == pytest.approx(ref.lower)
    family = RS.adjust_family([t for *_, t in rows])
    assert [t.p_holm for *_, t in rows] == pytest.approx([t.p_holm for t in family], nan_ok=True)
    md = pattern_markdown("fmnist", rs, table, variants_table(leaderboard_tables(rs, stats=False)["main"]))
    section = md.split("## Recipe claims: preset `paper-10ep`")[1].split("\n## ")[0]
    assert "| G keeps A's sparsity (Gini G >= A - 0.02) | VG | non-inferiority | 0.02 | 3 |" in section
    assert f"seeds 0, 1, 2 of the pre-registered {len(PREREGISTERED[('fmnist', 'paper-10ep')])}" in section
    central = md.split(CENTRAL_HEADING)[1].split("\n## ")[0]
    assert "| Does G keep A's sparsity (Gini within 0.02)? | VG |" in central


def test_the_sites_central_heading_is_the_pattern_files():
    from salbench.benchmark import leaderboard as L
    from salbench.benchmark import site as W

    assert W.CENTRAL_HEADING == L.CENTRAL_HEADING
