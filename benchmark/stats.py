"""Uncertainty and verdicts from stored per-image values (PROTOCOL §7).

Every leaderboard aggregate is a function of per-image columns summed over the fixed image set:
a mean (Gini, AOPC, accuracy on the set), a ratio of sums (SSIM over kept images, the nan-mean
of ROS) or a fixed transform of those (log10 ROS, the mean over σ). A bootstrap resample of
the images is then a vector of *counts* per image, and every aggregate of a resample is
``f(counts @ columns)``: one matrix product gives all of them at once. That is what
:func:`aggregate_ci` and :func:`compare` hand to ``scipy.stats.bootstrap`` (BCa, seeded,
``N_RESAMPLES`` resamples): the statistic receives resampled image indices and turns them
into counts, so the intervals are scipy's own, and all boards regenerate in seconds.

Paired comparisons (model vs reference on the same images) resample images jointly and use
only images valid in both (kept at that σ in both for SSIM, non-NaN in both for ROS); the
per-image test is ``scipy.stats.wilcoxon`` on the paired per-image values, Holm-adjusted
within one (model, reference, method) family.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
from scipy import stats as sps

N_RESAMPLES = 10_000
CONFIDENCE = 0.95
ALPHA = 0.05
BOOTSTRAP_SEED = 0
# resamples per vectorised call: keeps the (batch, n) index and count arrays cache-sized
# (measured: 40% less CPU than all 10 000 at once); the random stream, hence every bound, is the same
_BATCH = 2500
# metric -> +1 (higher is better) / -1 (lower is better); None: reported, not compared
DIRECTION = {"gini": +1, "ssim_mean": +1, "ssim": +1, "log10_ros": -1, "aopc": +1,
             "ros_nan_fraction": None, "acc_on_set": None}
VERDICTS = ("better", "worse", "no detectable difference", "not comparable")


def direction(metric: str) -> int | None:
    """+1 / -1 / None for a metric name (``ssim@0.1`` has SSIM's direction).

    >>> direction("log10_ros"), direction("ssim@0.05"), direction("acc_on_set")
    (-1, 1, None)
    """
    base = metric.split("@")[0]
    if base not in DIRECTION:
        raise ValueError(f"unknown metric {metric!r}; known: {', '.join(DIRECTION)} (and ssim@<sigma>)")
    return DIRECTION[base]


@dataclass
class PerImage:
    """The per-image values of one method of one stored result (n = images of the set).

    ``ssim`` and ``kept`` are (S, n) over the σ levels ``sigmas``; ``ros`` has NaN where
    the image's prediction flipped; ``road`` is the (n, L) correctness curve.
    """

    gini: np.ndarray
    sigmas: list[str]
    ssim: np.ndarray
    kept: np.ndarray
    ros: np.ndarray
    road: np.ndarray
    road_levels: list[str]
    correct: np.ndarray

    @property
    def n(self) -> int:
        return len(self.gini)

    @property
    def aopc_terms(self) -> np.ndarray:
        """Per-image AOPC terms: their mean is the protocol's AOPC (it is linear in the curve)."""
        r = self.road.astype(np.float64)
        return (r[:, :1] - r).sum(axis=1) / (r.shape[1] + 1)

    @property
    def log10_ros(self) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.log10(self.ros)

    @classmethod
    def from_result(cls, result: dict, method: str) -> "PerImage":
        try:
            d = result["per_image"][method]
            sigmas = list(result["summary"][method]["ssim"].keys())
            levels = list(result["summary"][method]["road_curve"].keys())
            correct = np.asarray(result["per_image"]["correct"], dtype=np.float64)
        except KeyError as e:
            mid = result.get("model", {}).get("id", "?")
            raise ValueError(f"result of {mid} has no per-image {method} values ({e.args[0]!r} missing): "
                             "rescore it with `salbench leaderboard --rescore`") from None
        ros = np.array([np.nan if v is None else v for v in d["ros"]], dtype=np.float64)
        ssim = np.array([[np.nan if v is None else v for v in row] for row in d["ssim"]], dtype=np.float64)
        kept = np.asarray(d["ssim_kept"], dtype=bool) & np.isfinite(ssim)
        return cls(gini=np.asarray(d["gini"], dtype=np.float64), sigmas=sigmas, ssim=np.where(kept, ssim, 0.0),
                   kept=kept, ros=ros, road=np.asarray(d["road"], dtype=np.float64), road_levels=levels,
                   correct=correct)


class _Columns:
    """Per-image columns whose count-weighted sums give every aggregate of :class:`PerImage`."""

    def __init__(self, pi: PerImage, valid: dict[str, np.ndarray] | None = None) -> None:
        valid = valid or {}
        n, cols, self.index = pi.n, [], {}

        def add(name, v):
            self.index[name] = len(cols)
            cols.append(np.asarray(v, dtype=np.float64))

        one = np.ones(n)
        add("one", one)
        add("gini", pi.gini)
        for i, s in enumerate(pi.sigmas):
            k = pi.kept[i] & valid.get(f"ssim@{s}", True)
            add(f"ssim_k@{s}", k)
            add(f"ssim_s@{s}", np.where(k, pi.ssim[i], 0.0))
        ok = np.isfinite(pi.ros) & valid.get("log10_ros", True)
        add("ros_ok", ok)
        add("ros_v", np.where(ok, pi.ros, 0.0))
        add("ros_finite", np.isfinite(pi.ros))
        # AOPC as its integer numerator per image (sum over levels of r_1% - r_p, each 0/1): the
        # count-weighted sums are then exact integers whatever the BLAS summation order, so the
        # bootstrap values that tie with the estimate tie exactly and BCa's bias term is reproducible
        r = pi.road.astype(np.float64)
        add("aopc_num", (r[:, :1] - r).sum(axis=1))
        self.aopc_den = r.shape[1] + 1
        for j, p in enumerate(pi.road_levels):
            add(f"road@{p}", pi.road[:, j])
        add("acc_on_set", pi.correct)
        self.matrix = np.stack(cols, axis=1)  # (n, k)
        self.sigmas, self.levels = pi.sigmas, pi.road_levels

    def aggregates(self, sums: np.ndarray, names: list[str]) -> np.ndarray:
        """``sums`` (..., k) of count-weighted columns -> (..., len(names)) aggregates."""
        col = lambda name: sums[..., self.index[name]]  # noqa: E731
        with np.errstate(divide="ignore", invalid="ignore"):
            one = col("one")
            per_sigma = {s: col(f"ssim_s@{s}") / col(f"ssim_k@{s}") for s in self.sigmas}
            out = []
            for name in names:
                if name == "gini":
                    v = col("gini") / one
                elif name.startswith("ssim@"):
                    v = per_sigma[name[5:]]
                elif name == "ssim_mean":
                    stacked = np.stack([per_sigma[s] for s in self.sigmas], axis=-1)
                    finite = np.isfinite(stacked)
                    v = np.where(finite, stacked, 0.0).sum(-1) / finite.sum(-1)
                elif name == "log10_ros":
                    v = np.log10(col("ros_v") / col("ros_ok"))
                elif name == "ros_nan_fraction":
                    v = 1.0 - col("ros_finite") / one
                elif name == "aopc":
                    v = col("aopc_num") / (one * self.aopc_den)
                elif name.startswith("road@"):
                    v = col(name) / one
                elif name == "acc_on_set":
                    v = col("acc_on_set") / one
                else:
                    raise ValueError(f"unknown aggregate {name!r}")
                out.append(v)
        return np.stack(out, axis=-1)


def _counts(idx: np.ndarray, n: int) -> np.ndarray:
    """Resampled indices (..., m) -> counts per image (..., n)."""
    flat = idx.reshape(-1, idx.shape[-1])
    rows = flat.shape[0]
    offsets = (np.arange(rows)[:, None] * n + flat).ravel()
    counts = np.bincount(offsets, minlength=rows * n).reshape(rows, n).astype(np.float64)
    return counts.reshape(*idx.shape[:-1], n)


def _bootstrap(n: int, statistic, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """scipy's BCa bootstrap over the n images of a vector statistic of resampled indices.

    Returns (estimate, lo, hi). Where BCa is undefined (a statistic that does not vary over
    resamples, e.g. an accuracy of 1.0 on every image) the interval is the estimate itself;
    where it fails otherwise, the percentile interval of the same resamples is used.
    """
    idx = np.arange(n)
    est = statistic(idx[None, :])[0]

    def stat(i, axis=-1):
        return np.moveaxis(statistic(np.moveaxis(i, axis, -1)), -1, 0)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = sps.bootstrap((idx,), stat, n_resamples=N_RESAMPLES, confidence_level=CONFIDENCE, method="BCa",
                            vectorized=True, random_state=np.random.default_rng(seed), batch=_BATCH)
    lo, hi = np.array(res.confidence_interval.low, dtype=float), np.array(res.confidence_interval.high, dtype=float)
    dist = np.asarray(res.bootstrap_distribution, dtype=float)  # (k, B)
    constant = np.all(dist == dist[:, :1], axis=1) & np.isfinite(est)
    lo = np.where(constant, est, lo)
    hi = np.where(constant, est, hi)
    bad = ~(np.isfinite(lo) & np.isfinite(hi)) & np.isfinite(est)
    if bad.any():
        q = np.nanpercentile(dist, [100 * (1 - CONFIDENCE) / 2, 100 * (1 + CONFIDENCE) / 2], axis=1)
        lo, hi = np.where(bad, q[0], lo), np.where(bad, q[1], hi)
    return est, lo, hi


def aggregate_names(pi: PerImage, curve: bool = False) -> list[str]:
    names = ["gini", "ssim_mean", *[f"ssim@{s}" for s in pi.sigmas], "log10_ros", "ros_nan_fraction", "aopc",
             "acc_on_set"]
    return names + ([f"road@{p}" for p in pi.road_levels] if curve else [])


def aggregate_ci(pi: PerImage, names: list[str] | None = None, seed: int = BOOTSTRAP_SEED) -> dict[str, tuple]:
    """``{name: (estimate, lo, hi)}``: each aggregate with its 95% BCa bootstrap interval over
    the images (PROTOCOL §7). Names: :func:`aggregate_names` (``road@<p>`` for the curve)."""
    names = names or aggregate_names(pi)
    c = _Columns(pi)
    est, lo, hi = _bootstrap(pi.n, lambda i: c.aggregates(_counts(i, pi.n) @ c.matrix, names), seed)
    return {name: (float(e), float(a), float(b)) for name, e, a, b in zip(names, est, lo, hi)}


def holm(pvalues: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (step-down, monotone, capped at 1; NaN stays NaN).

    >>> holm([0.01, 0.04, 0.03])
    [0.03, 0.06, 0.06]
    """
    p = np.asarray(pvalues, dtype=float)
    ok = np.flatnonzero(np.isfinite(p))
    out = np.full(len(p), np.nan)
    m = len(ok)
    running = 0.0
    for rank, j in enumerate(ok[np.argsort(p[ok], kind="stable")]):
        running = max(running, min(1.0, (m - rank) * p[j]))
        out[j] = running
    return [float(v) for v in out]


def wilcoxon_p(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sided ``scipy.stats.wilcoxon`` p of paired values; 1.0 when every pair is equal, NaN
    with no pairs."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) == 0:
        return float("nan")
    if np.all(a == b):
        return 1.0
    return float(sps.wilcoxon(a, b).pvalue)


def verdict(delta: float, lo: float, hi: float, p_holm: float, metric: str, n_paired: int,
            alpha: float = ALPHA) -> str:
    """``better`` / ``worse`` (model vs reference, in the metric's direction) when the
    Holm-adjusted Wilcoxon p is below ``alpha`` AND the paired bootstrap interval of the delta
    excludes 0 on the same side; else ``no detectable difference`` (PROTOCOL §7).

    >>> verdict(-0.3, -0.5, -0.1, 0.001, "log10_ros", 900)
    'better'
    >>> verdict(0.01, -0.001, 0.02, 0.01, "gini", 1000)
    'no detectable difference'
    """
    d = direction(metric)
    if n_paired == 0 or d is None or not all(map(math.isfinite, (delta, lo, hi))):
        return "not comparable"
    if not (math.isfinite(p_holm) and p_holm < alpha):
        return "no detectable difference"
    if lo > 0 and delta > 0:
        return "better" if d > 0 else "worse"
    if hi < 0 and delta < 0:
        return "worse" if d > 0 else "better"
    return "no detectable difference"


COMPARED = ("gini", "ssim_mean", "log10_ros", "aopc")  # + ssim@<sigma> for every σ


def compared_metrics(pi: PerImage) -> list[str]:
    return ["gini", "ssim_mean", *[f"ssim@{s}" for s in pi.sigmas], "log10_ros", "aopc"]


def compare(model: PerImage, ref: PerImage, seed: int = BOOTSTRAP_SEED) -> list[dict]:
    """Paired comparison of one method of two results on the same images (PROTOCOL §7).

    Returns one row per metric: metric, n_paired, delta (model - reference on the paired
    images), delta_lo/delta_hi (paired BCa bootstrap), p (Wilcoxon), p_holm, verdict.
    """
    if model.n != ref.n or model.sigmas != ref.sigmas or model.road_levels != ref.road_levels:
        raise ValueError("the two results were not scored on the same images/levels; rescore one of them")
    valid = {f"ssim@{s}": model.kept[i] & ref.kept[i] for i, s in enumerate(model.sigmas)}
    valid["log10_ros"] = np.isfinite(model.ros) & np.isfinite(ref.ros)
    cm, cr = _Columns(model, valid), _Columns(ref, valid)
    names = compared_metrics(model)
    both = np.concatenate([cm.matrix, cr.matrix], axis=1)
    k = cm.matrix.shape[1]

    def statistic(i):
        s = _counts(i, model.n) @ both
        return cm.aggregates(s[..., :k], names) - cr.aggregates(s[..., k:], names)

    est, lo, hi = _bootstrap(model.n, statistic, seed)
    rows = []
    for j, name in enumerate(names):
        if name == "gini":
            a, b = model.gini, ref.gini
        elif name == "aopc":
            a, b = model.aopc_terms, ref.aopc_terms
        elif name == "log10_ros":
            m = valid["log10_ros"]
            a, b = model.log10_ros[m], ref.log10_ros[m]
        elif name.startswith("ssim@"):
            i = model.sigmas.index(name[5:])
            m = valid[name]
            a, b = model.ssim[i][m], ref.ssim[i][m]
        else:  # ssim_mean: per image, the mean over the σ levels kept in both
            km = np.stack([valid[f"ssim@{s}"] for s in model.sigmas])
            has = km.any(0)
            with np.errstate(invalid="ignore"):
                a = (np.where(km, model.ssim, 0).sum(0) / km.sum(0))[has]
                b = (np.where(km, ref.ssim, 0).sum(0) / km.sum(0))[has]
        rows.append({"metric": name, "n_paired": int(len(a)), "delta": float(est[j]), "delta_lo": float(lo[j]),
                     "delta_hi": float(hi[j]), "p": wilcoxon_p(a, b)})
    for r, ph in zip(rows, holm([r["p"] for r in rows])):
        r["p_holm"] = ph
        r["verdict"] = verdict(r["delta"], r["delta_lo"], r["delta_hi"], ph, r["metric"], r["n_paired"])
    return rows
