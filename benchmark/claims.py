"""The paper's claims as data, decided by the code from the paired comparisons (PROTOCOL §7).

Each claim names a model variant, a reference variant, a metric, the methods it is about and
what it expects of the paired verdict: ``better`` / ``worse`` (the verdict must say so),
``not worse`` (any verdict but ``worse``), or a margin (the paired 95% interval of
``model - reference`` must lie above ``margin``). Per seed pair the status is ``holds``,
``fails`` or ``undecided``; across seeds see :func:`across_seeds`.

``PAPER`` holds the paper's numbers in our units (Table 6 for Gini and ROS, Table 3 for AOPC;
ROS divided by ln 10, see PROTOCOL §6 "Units of the paper's ROS").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

LN10 = math.log(10)


def _paper(rows: dict) -> dict:
    out = {}
    for variant, (vg, ig) in rows.items():
        out[variant] = {}
        for method, vals in (("VG", vg), ("IG", ig)):
            d = {"gini": vals[0], "log10_ros": vals[1] / LN10}
            if len(vals) > 2:
                d["aopc"] = vals[2]
            out[variant][method] = d
    return out


# Table 5 (CIFAR-10, VG): change relative to N of (Gini, ROS as printed) with the SmoothBlock after the
# first, second, third residual block; arms "G", "G@p2", "G@p3" (leaderboard.arm_of)
PAPER_PLACEMENT = {"G": (0.18, 0.21), "G@p2": (0.18, 0.23), "G@p3": (0.19, 0.24)}

# (Gini, ROS as printed, [AOPC]) per variant: ((VG), (IG)); paper Tables 3 and 6
PAPER = {
    "fmnist": _paper({"N": ((0.54, 11.03, 0.22), (0.77, 7.26, 0.32)), "A": ((0.74, 13.12, 0.21), (0.83, 9.19, 0.31)),
                      "G": ((0.73, 11.77, 0.23), (0.82, 8.56, 0.28)), "M1": ((0.74, 12.16), (0.84, 10.18)),
                      "M2": ((0.72, 10.01), (0.81, 11.94))}),
    "cifar10": _paper({"N": ((0.49, 2.33), (0.61, 4.25)), "A": ((0.68, 2.55), (0.71, 4.48)),
                       "G": ((0.67, 2.54), (0.71, 4.16)), "M1": ((0.67, 2.59), (0.71, 4.60)),
                       "M2": ((0.67, 2.54), (0.71, 4.13))}),
    "imagenette": _paper({"N": ((0.51, 2.74), (0.63, 5.56)), "A": ((0.53, 2.88), (0.66, 5.60)),
                          "G": ((0.54, 2.77), (0.67, 5.59)), "M1": ((0.54, 2.52), (0.67, 5.03)),
                          "M2": ((0.58, 2.55), (0.69, 5.08))}),
}


@dataclass(frozen=True)
class Claim:
    key: str
    text: str
    model: str
    reference: str
    metric: str
    expect: str  # "better" | "worse" | "not worse" | "margin"
    methods: tuple[str, ...] = ("VG", "IG")
    margin: float = 0.0
    datasets: tuple[str, ...] | None = None  # None: every dataset
    group: str = "main"  # "main": the paper's central claims (the "At a glance" table); "placement": Table 5
    paper: float | None = None  # the paper's model - reference difference in our units, where PAPER has no row


CLAIMS: tuple[Claim, ...] = (
    Claim("gini_A_N", "A is sparser than N (Gini A > N)", "A", "N", "gini", "better"),
    Claim("ros_A_N", "A has worse output stability than N (ROS A > N)", "A", "N", "log10_ros", "worse"),
    Claim("ssim_A_N", "SSIM rises from N to A", "A", "N", "ssim_mean", "better"),
    Claim("ssim_G_A", "SSIM rises from A to G (SSIM A < G)", "G", "A", "ssim_mean", "better"),
    Claim("ros_G_A", "G has better output stability than A (ROS G < A)", "G", "A", "log10_ros", "better"),
    Claim("gini_G_A", "G keeps A's sparsity (Gini G >= A - 0.02)", "G", "A", "gini", "margin", margin=-0.02),
    Claim("aopc_G_A", "G keeps A's faithfulness (AOPC G >= A - 0.02)", "G", "A", "aopc", "margin", margin=-0.02),
    Claim("gini_M1_A", "Sec. 6.2: M1 keeps A's sparsity (Gini M1 >= A - 0.02)", "M1", "A", "gini", "margin",
          margin=-0.02),
    Claim("gini_M2_A", "Sec. 6.2: M2 keeps A's sparsity (Gini M2 >= A - 0.02)", "M2", "A", "gini", "margin",
          margin=-0.02),
    Claim("ros_M2_G_vg", "Sec. 6.2 (FMNIST): M2 has the best VG ROS (M2 < G)", "M2", "G", "log10_ros", "better",
          ("VG",), datasets=("fmnist",)),
    Claim("ros_M2_M1_vg", "Sec. 6.2 (FMNIST): M2 has the best VG ROS (M2 < M1)", "M2", "M1", "log10_ros", "better",
          ("VG",), datasets=("fmnist",)),
    Claim("ros_G_M1_ig", "Sec. 6.2 (FMNIST): G has the best IG ROS (G < M1)", "G", "M1", "log10_ros", "better",
          ("IG",), datasets=("fmnist",)),
    Claim("ros_G_M2_ig", "Sec. 6.2 (FMNIST): G has the best IG ROS (G < M2)", "G", "M2", "log10_ros", "better",
          ("IG",), datasets=("fmnist",)),
    *(Claim(f"gini_{arm}_N", f"Table 5: G after block {k} is sparser than N (Gini {arm} > N)", arm, "N", "gini",
            "better", ("VG",), datasets=("cifar10",), group="placement", paper=PAPER_PLACEMENT[arm][0])
      for k, arm in enumerate(PAPER_PLACEMENT, 1)),
    *(Claim(f"ros_{arm}_N", f"Table 5: G after block {k} has worse ROS than N (ROS {arm} > N)", arm, "N",
            "log10_ros", "worse", ("VG",), datasets=("cifar10",), group="placement",
            paper=PAPER_PLACEMENT[arm][1] / LN10)
      for k, arm in enumerate(PAPER_PLACEMENT, 1)),
    *(Claim(f"ros_G_{arm}", f"Table 5: smoothing after block 1 is the most stable (ROS G < {arm})", "G", arm,
            "log10_ros", "better", ("VG",), datasets=("cifar10",), group="placement",
            paper=(PAPER_PLACEMENT["G"][1] - PAPER_PLACEMENT[arm][1]) / LN10)
      for arm in ("G@p2", "G@p3")),
)


# PROTOCOL §8.6: the smallest effect that matters (superiority) and the non-inferiority margin, per
# headline metric, in its own units; never below the models' numerical band (``recipe_delta``)
DELTA_MIN = {"gini": 0.02, "ssim_mean": 0.01, "log10_ros": 0.1, "aopc": 0.02}
METRIC_DIRECTION = {"gini": 1, "ssim_mean": 1, "log10_ros": -1, "aopc": 1}


def recipe_spec(claim: Claim) -> tuple[str, int, float]:
    """(kind, side, δ) of a claim's seed-level test (``benchmark.recipe_stats.seed_test``):
    ``better``/``worse`` claims are superiority claims (side: the sign the effect must have),
    ``not worse`` and margin claims non-inferiority claims with margin δ (a margin claim's own).

    >>> recipe_spec(Claim("x", "", "G", "A", "log10_ros", "better"))
    ('superiority', -1, 0.1)
    >>> recipe_spec(Claim("y", "", "G", "A", "gini", "margin", margin=-0.02))
    ('noninferiority', 1, 0.02)
    """
    d = METRIC_DIRECTION[claim.metric]
    if claim.expect in ("better", "worse"):
        return "superiority", d if claim.expect == "better" else -d, DELTA_MIN[claim.metric]
    if claim.expect == "not worse":
        return "noninferiority", d, DELTA_MIN[claim.metric]
    if claim.expect == "margin":
        return "noninferiority", d, abs(claim.margin) or DELTA_MIN[claim.metric]
    raise ValueError(f"unknown claim expectation {claim.expect!r}")


def claims_for(dataset: str) -> list[Claim]:
    return [c for c in CLAIMS if c.datasets is None or dataset in c.datasets]


def status(claim: Claim, row: dict) -> str:
    """``holds`` / ``fails`` / ``undecided`` of one claim given one paired-comparison row.

    >>> c = Claim("x", "", "G", "A", "log10_ros", "better")
    >>> status(c, {"verdict": "better", "delta_lo": -0.2, "delta_hi": -0.1})
    'holds'
    >>> status(Claim("y", "", "G", "A", "aopc", "margin", margin=-0.02), {"verdict": "worse", "delta_lo": -0.015, "delta_hi": 0.0})
    'holds'
    """
    v = row["verdict"]
    if v == "not comparable":
        return "undecided"
    if claim.expect in ("better", "worse"):
        other = "worse" if claim.expect == "better" else "better"
        return "holds" if v == claim.expect else ("fails" if v == other else "undecided")
    if claim.expect == "not worse":
        return "fails" if v == "worse" else "holds"
    if claim.expect == "margin":
        sign = 1 if claim.metric != "log10_ros" else -1
        lo, hi = sign * row["delta_lo"], sign * row["delta_hi"]
        lo, hi = min(lo, hi), max(lo, hi)
        return "holds" if lo >= claim.margin else ("fails" if hi < claim.margin else "undecided")
    raise ValueError(f"unknown claim expectation {claim.expect!r}")


def across_seeds(statuses: list[str], deltas: list[float], spread: float, gap: bool = True) -> str:
    """A claim holds (fails) across seeds when every seed pair holds (fails) and the mean of
    the per-seed deltas exceeds the across-seed spread (the larger across-seed standard
    deviation of the two variants' aggregates; ``gap=False`` for ``not worse`` and margin
    claims, which need no gap); with one seed pair it is ``1 seed: <status>``.

    >>> across_seeds(["holds", "holds", "holds"], [-0.3, -0.25, -0.35], 0.05)
    'holds'
    >>> across_seeds(["holds", "undecided", "holds"], [-0.3, -0.01, -0.35], 0.05)
    'undecided'
    >>> across_seeds(["holds"], [-0.3], float("nan"))
    '1 seed: holds'
    """
    if not statuses:
        return "no data"
    if len(statuses) == 1:
        return f"1 seed: {statuses[0]}"
    same = len(set(statuses)) == 1 and statuses[0] in ("holds", "fails")
    big = not gap or (math.isfinite(spread) and abs(float(np.mean(deltas))) > spread)
    return statuses[0] if same and big else "undecided"
