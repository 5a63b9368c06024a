"""Recipe-level claims from per-seed effects (PROTOCOL §8.6): against scipy, by hand and by simulation."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy import stats as sps

from salbench.benchmark import recipe_stats as RS
from salbench.benchmark.stats import holm

SUP, NI = "superiority", "noninferiority"
D = [0.031, 0.024, 0.040, 0.028, 0.019]  # hand-made per-seed effects


def _alternative(side: int) -> str:
    return "greater" if side > 0 else "less"


@pytest.mark.parametrize("kind", [SUP, NI])
@pytest.mark.parametrize("side", [1, -1])
@pytest.mark.parametrize("deltas", [D, [-0.12, -0.30, -0.05], [0.01, -0.02, 0.02, 0.0, -0.005, 0.015]])
def test_bounds_and_p_equal_scipy(kind, side, deltas):
    delta_min = 0.02
    t = RS.seed_test(deltas, kind=kind, side=side, delta_min=delta_min)
    k = len(deltas)
    m0 = 0.0 if kind == SUP else -side * delta_min
    claim = sps.ttest_1samp(deltas, m0, alternative=_alternative(side))
    other = sps.ttest_1samp(deltas, m0, alternative=_alternative(-side))
    assert t.p == pytest.approx(claim.pvalue, rel=1e-10, abs=1e-15)
    assert t.p_opposite == pytest.approx(other.pvalue, rel=1e-10, abs=1e-15)
    # the one-sided 95% bounds: by hand with t.ppf, and scipy's own one-sided intervals
    se = np.std(deltas, ddof=1) / math.sqrt(k)
    q = sps.t.ppf(0.95, k - 1)
    assert t.lower == pytest.approx(np.mean(deltas) - q * se, rel=1e-12)
    assert t.upper == pytest.approx(np.mean(deltas) + q * se, rel=1e-12)
    assert t.lower == pytest.approx(sps.ttest_1samp(deltas, 0, alternative="greater").confidence_interval(0.95).low)
    assert t.upper == pytest.approx(sps.ttest_1samp(deltas, 0, alternative="less").confidence_interval(0.95).high)
    assert (t.k, t.deltas, t.mean, t.sd) == (k, tuple(deltas), pytest.approx(np.mean(deltas)),
                                             pytest.approx(np.std(deltas, ddof=1)))
    assert math.isnan(t.p_holm)


def test_bound_p_duality():
    """p < alpha iff the claim-side bound excludes the null value; the same for the opposite side."""
    rng = np.random.default_rng(1)
    seen = set()
    for i in range(240):
        k = int(rng.integers(2, 8))
        deltas = rng.normal(rng.normal(0, 0.03), 0.03, k)
        kind, side = (SUP, NI)[i % 2], (1, -1)[(i // 2) % 2]
        t = RS.seed_test(deltas, kind=kind, side=side, delta_min=0.02)
        m0 = t.null_value
        claim_bound, other_bound = (t.lower, t.upper) if side > 0 else (t.upper, t.lower)
        if min(abs(claim_bound - m0), abs(other_bound - m0)) < 1e-12:
            continue
        assert (t.p < 0.05) == (side * (claim_bound - m0) > 0)
        assert (t.p_opposite < 0.05) == (side * (other_bound - m0) < 0)
        assert t.p + t.p_opposite == pytest.approx(1.0)
        seen.add((t.p < 0.05, t.p_opposite < 0.05))
    assert seen == {(True, False), (False, True), (False, False)}  # both outcomes of each side occurred


# (deltas, kind, side, delta_min, expected status), each checked against its defining bound below
STATUS_CASES = [
    # superiority, side +1 (e.g. Gini A > N, δ 0.02)
    ([0.05, 0.06, 0.055, 0.052], SUP, 1, 0.02, "holds"),
    ([-0.05, -0.06, -0.055, -0.052], SUP, 1, 0.02, "fails"),
    ([0.03, -0.02, 0.04, -0.01], SUP, 1, 0.02, "undecided"),
    ([0.010, 0.011, 0.012, 0.0105], SUP, 1, 0.02, "undecided"),  # significant but mean < δ
    # superiority, side -1 (e.g. log10 ROS G < A, δ 0.1)
    ([-0.30, -0.25, -0.35, -0.28], SUP, -1, 0.1, "holds"),
    ([0.30, 0.25, 0.35, 0.28], SUP, -1, 0.1, "fails"),
    ([-0.3, 0.2, -0.1, 0.05], SUP, -1, 0.1, "undecided"),
    ([-0.05, -0.06, -0.055, -0.052], SUP, -1, 0.1, "undecided"),  # significant but |mean| < δ
    # non-inferiority, side +1 (e.g. G keeps A's Gini, margin 0.02)
    ([0.0, 0.005, -0.005, 0.002], NI, 1, 0.02, "holds"),
    ([-0.015, -0.012, -0.018, -0.014], NI, 1, 0.02, "holds"),  # below 0 yet within the margin
    ([-0.05, -0.06, -0.045, -0.055], NI, 1, 0.02, "fails"),
    ([-0.02, 0.01, -0.05, 0.0], NI, 1, 0.02, "undecided"),
    # non-inferiority, side -1 (e.g. G's log10 ROS no worse than A's, margin 0.1)
    ([0.05, 0.02, 0.07, 0.04], NI, -1, 0.1, "holds"),
    ([0.3, 0.25, 0.35, 0.28], NI, -1, 0.1, "fails"),
    ([0.1, -0.05, 0.2, 0.02], NI, -1, 0.1, "undecided"),
]


@pytest.mark.parametrize("deltas,kind,side,delta_min,expected", STATUS_CASES)
def test_status_table(deltas, kind, side, delta_min, expected):
    t = RS.seed_test(deltas, kind=kind, side=side, delta_min=delta_min)
    assert t.status == expected
    claim_bound, other_bound = (t.lower, t.upper) if side > 0 else (t.upper, t.lower)
    m0 = 0.0 if kind == SUP else -side * delta_min
    # the case really is what its label says, read off the bounds (not the function's own rule)
    significant = side * (claim_bound - m0) > 0
    opposite = side * (other_bound - m0) < 0
    if expected == "holds":
        assert significant and (kind == NI or abs(np.mean(deltas)) >= delta_min)
    elif expected == "fails":
        assert opposite and not significant
    else:
        assert not opposite and (not significant or (kind == SUP and abs(np.mean(deltas)) < delta_min))


def test_small_significant_superiority_stays_undecided():
    t = RS.seed_test([0.010, 0.011, 0.012, 0.0105], kind=SUP, side=1, delta_min=0.02)
    assert t.p < 1e-4 and t.lower > 0 and t.status == "undecided"
    # the same effects decide with a δ below the mean
    assert RS.seed_test(t.deltas, kind=SUP, side=1, delta_min=0.01).status == "holds"


@pytest.mark.parametrize("kind,side,delta_min,value,p,p_opp,status", [
    (SUP, 1, 0.02, 0.03, 0.0, 1.0, "holds"),
    (SUP, 1, 0.02, 0.01, 0.0, 1.0, "undecided"),  # exact, significant, below δ
    (SUP, 1, 0.02, 0.0, 1.0, 1.0, "undecided"),  # on the null value
    (SUP, 1, 0.02, -0.01, 1.0, 0.0, "fails"),
    (SUP, -1, 0.1, -0.2, 0.0, 1.0, "holds"),
    (SUP, -1, 0.1, 0.2, 1.0, 0.0, "fails"),
    (NI, 1, 0.02, -0.01, 0.0, 1.0, "holds"),
    (NI, 1, 0.02, -0.02, 1.0, 1.0, "undecided"),  # exactly on the margin
    (NI, 1, 0.02, -0.03, 1.0, 0.0, "fails"),
    (NI, -1, 0.1, 0.05, 0.0, 1.0, "holds"),
    (NI, -1, 0.1, 0.1, 1.0, 1.0, "undecided"),
    (NI, -1, 0.1, 0.15, 1.0, 0.0, "fails"),
])
def test_zero_spread_is_exact_and_silent(kind, side, delta_min, value, p, p_opp, status):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t = RS.seed_test([value] * 3, kind=kind, side=side, delta_min=delta_min)
        row = RS.format_row(t)
    assert (t.sd, t.mean, t.lower, t.upper) == (0.0, value, value, value)
    assert (t.p, t.p_opposite, t.status) == (p, p_opp, status)
    assert t.seeds_80 == (2 if p == 0.0 else None)
    assert row["p"] == ("0" if p == 0.0 else "1.000")


def test_a_value_like_0_1_repeated_counts_as_zero_spread():
    # np.mean([0.1] * 3) is not exactly 0.1; all-equal seeds must still be exact
    t = RS.seed_test([0.1, 0.1, 0.1], kind=NI, side=-1, delta_min=0.1)
    assert (t.sd, t.p, t.status) == (0.0, 1.0, "undecided")


def test_one_seed_is_a_checkpoint_only():
    t = RS.seed_test([0.2], kind=SUP, side=1, delta_min=0.02)
    assert t.status == RS.ONE_SEED == "1 seed: checkpoint only"
    assert (t.k, t.mean, t.seeds_80) == (1, 0.2, None)
    assert all(math.isnan(x) for x in (t.sd, t.lower, t.upper, t.p, t.p_opposite, t.p_holm))
    (adjusted,) = RS.adjust_family([t])
    assert adjusted.status == RS.ONE_SEED and math.isnan(adjusted.p_holm)
    row = RS.format_row(t)
    assert row["k"] == "1" and row["d_s"] == "+0.200" and row["status"] == RS.ONE_SEED
    assert row["bounds"] == row["p"] == row["p_holm"] == "—" and row["seeds_80"] == "n/a: 1 seed"


@pytest.mark.parametrize("bad", [dict(kind="equivalence"), dict(side=0), dict(delta_min=0.0), dict(delta_min=-0.1),
                                 dict(alpha=1.0), dict(deltas=[]), dict(deltas=[0.1, float("nan")])])
def test_bad_inputs_are_refused(bad):
    args = dict(deltas=D, kind=SUP, side=1, delta_min=0.02) | bad
    with pytest.raises(ValueError):
        RS.seed_test(args.pop("deltas"), **args)


def test_holm_over_the_family_equals_stats_holm():
    rng = np.random.default_rng(3)
    family = [RS.seed_test(rng.normal(mu, 0.02, 6), kind=kind, side=side, delta_min=0.02)
              for mu, kind, side in [(0.05, SUP, 1), (0.01, SUP, 1), (-0.03, SUP, -1), (0.0, NI, 1),
                                     (0.015, NI, -1), (0.03, NI, 1), (-0.01, SUP, 1)]]
    family.append(RS.seed_test([0.3], kind=SUP, side=1, delta_min=0.02))  # one seed: p NaN, left out
    out = RS.adjust_family(family)
    expected = holm([t.p for t in family])
    assert [t.p_holm for t in out[:-1]] == pytest.approx(expected[:-1], rel=1e-12)
    assert math.isnan(out[-1].p_holm)
    # everything but p_holm and status is kept, the inputs are not modified, and the status follows Holm
    for before, after in zip(family, out):
        kept = lambda t: (t.deltas, t.p, t.p_opposite, t.lower, t.upper, t.seeds_80)  # noqa: E731
        assert kept(after) == kept(before)
        assert math.isnan(before.p_holm)
    assert any(b.status == "holds" for b in family)
    for t in out[:-1]:
        claim_ok = t.p_holm < 0.05 and (t.kind == NI or t.side * t.mean >= t.delta_min)
        assert (t.status == "holds") == claim_ok


def test_holm_can_turn_holds_into_undecided():
    """A claim whose raw p is below alpha but whose Holm p is not is no longer 'holds'."""
    a = RS.seed_test([0.05, 0.03, 0.07, 0.02], kind=SUP, side=1, delta_min=0.02)
    assert 0.01 < a.p < 0.05 and a.status == "holds"
    strong = RS.seed_test([0.05, 0.06, 0.055, 0.052], kind=SUP, side=1, delta_min=0.02)
    adj = RS.adjust_family([strong, a, a, a, a])  # Holm: 5·p_strong, then max(.., 4·p_a) for the four
    assert adj[0].p_holm == pytest.approx(5 * strong.p) and adj[0].status == "holds"
    for t in adj[1:]:
        assert t.p_holm == pytest.approx(4 * a.p) and t.p_holm >= 0.05 and t.status == "undecided"


def _mc_power(k: int, effect: float, sd: float, n: int = 20_000, seed: int = 0) -> float:
    x = np.random.default_rng(seed).normal(effect, sd, (n, k))
    t = x.mean(1) / (x.std(1, ddof=1) / math.sqrt(k))
    return float(np.mean(t > sps.t.ppf(0.95, k - 1)))


@pytest.mark.parametrize("effect,sd", [(0.5, 1.0), (0.03, 0.02), (0.1, 0.25)])
def test_seeds_for_power_matches_simulation(effect, sd):
    k = RS.seeds_for_power(effect, sd)
    assert k is not None and k > 2
    assert _mc_power(k, effect, sd) >= 0.8 - 0.01
    assert _mc_power(k - 1, effect, sd, seed=1) < 0.8 + 0.01
    # and the noncentral-t formula at k and k - 1
    power = [1 - sps.nct.cdf(sps.t.ppf(0.95, n - 1), n - 1, effect * math.sqrt(n) / sd) for n in (k - 1, k)]
    assert power[0] < 0.8 <= power[1]


def test_seeds_for_power_is_monotone_and_bounded():
    ratios = np.geomspace(0.1, 20.0, 40)
    ks = [RS.seeds_for_power(r, 1.0) for r in ratios]
    assert all(k is not None for k in ks)
    assert all(a >= b for a, b in zip(ks, ks[1:])) and ks[0] > ks[-1] == 2
    # only effect/sd matters
    assert RS.seeds_for_power(0.03, 0.06) == RS.seeds_for_power(0.5, 1.0)
    assert RS.seeds_for_power(0.0, 1.0) is None and RS.seeds_for_power(-0.2, 1.0) is None
    assert RS.seeds_for_power(0.01, 1.0) is None  # needs more than k_max = 1000 seeds
    assert RS.seeds_for_power(0.01, 1.0, k_max=100_000) > 1000
    assert RS.seeds_for_power(0.3, 0.0) == 2


def test_seed_test_power_uses_the_distance_from_the_null_value():
    deltas = [-0.01, 0.0, -0.015, 0.005, -0.02]
    ni = RS.seed_test(deltas, kind=NI, side=1, delta_min=0.02)
    assert ni.seeds_80 == RS.seeds_for_power(np.mean(deltas) + 0.02, np.std(deltas, ddof=1))
    sup = RS.seed_test(deltas, kind=SUP, side=-1, delta_min=0.02)
    assert sup.seeds_80 == RS.seeds_for_power(-np.mean(deltas), np.std(deltas, ddof=1))
    assert RS.seed_test(deltas, kind=SUP, side=1, delta_min=0.02).seeds_80 is None


def test_format_row():
    t = RS.adjust_family([RS.seed_test([0.012, -0.003, 0.02], kind=SUP, side=1, delta_min=0.02)])[0]
    row = RS.format_row(t)
    assert list(row) == ["k", "d_s", "mean", "bounds", "p", "p_holm", "seeds_80", "status"]
    assert row["k"] == "3" and row["d_s"] == "+0.012, -0.003, +0.020" and row["mean"] == f"{t.mean:+.3f}"
    assert row["bounds"] == f"[{t.lower:+.3f}, {t.upper:+.3f}]"
    assert row["p"] == f"{t.p:.3f}" and row["p_holm"] == f"{t.p_holm:.3f}"
    assert row["seeds_80"] == str(t.seeds_80) and row["status"] == "undecided"
    assert all(isinstance(v, str) for v in row.values())
    tiny = RS.seed_test([0.05, -0.049, 0.03, -0.0305], kind=SUP, side=1, delta_min=0.02)
    assert RS.format_row(tiny)["seeds_80"] == "> 1000"
    other_side = RS.seed_test([-0.01, -0.02, -0.015], kind=SUP, side=1, delta_min=0.02)
    assert RS.format_row(other_side)["seeds_80"] == "n/a: effect on the other side"
    assert RS.format_row(RS.seed_test([0.05, 0.06, 0.055, 0.052], kind=SUP, side=1, delta_min=0.02))["p"] == "< 0.001"
