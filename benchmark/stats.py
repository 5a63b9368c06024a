"""Uncertainty and verdicts from stored per-image values (PROTOCOL §7).

Every leaderboard aggregate is a function of per-image columns summed over the fixed image set:
a mean (Gini, AOPC, accuracy on the set), a ratio of sums (SSIM over kept images, the nan-mean
of ROS) or a fixed transform of those (log10 ROS, the mean over σ). A bootstrap resample of
the images is then a vector of *counts* per image, and every aggregate of a resample is
``f(counts @ columns)``: one matrix product gives all of them at once. An aggregate that is not
a function of sums (protocol v2's ROS headline, a median of per-image log10 ROS) reads the
counts themselves (``ColumnSums.counts``, :func:`weighted_median`). That is what
:func:`aggregate_ci` and :func:`compare` hand to ``scipy.stats.bootstrap`` (percentile
intervals, PROTOCOL §8.3: BCa under-covers on heavy tails and depends on exact ties; seeded,
``N_RESAMPLES`` resamples): the statistic receives resampled image indices and turns them
into counts, so the intervals are scipy's own, and all boards regenerate in seconds.

Paired comparisons (model vs reference on the same images) resample images jointly and use
only images valid in both (kept at that σ in both for SSIM, non-NaN in both for ROS); the
effect is the difference of the two aggregates, or the aggregate's own paired effect where it
registers one (ROS: the median of per-image paired log10 differences). The per-image test is
``scipy.stats.wilcoxon`` on the paired per-image values, Holm-adjusted within one
(model, reference, method) family over the headline aggregates only (PROTOCOL §8.6); a
robustness variant or a secondary column is adjusted as if it took its headline's place.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
from scipy import stats as sps

from salbench.benchmark import metric_registry as R

N_RESAMPLES = 10_000
CONFIDENCE = 0.95
ALPHA = 0.05
BOOTSTRAP_SEED = 0
# resamples per vectorised call: keeps the (batch, n) index and count arrays cache-sized
# (measured: 40% less CPU than all 10 000 at once); the random stream, hence every bound, is the same
_BATCH = 2500
VERDICTS = ("better", "worse", "no detectable difference", "not comparable")


def _aggregate(metric: str):
    """The registered :class:`~salbench.benchmark.metric_registry.Aggregate` named ``metric``
    (``ssim@<σ>`` and ``road@<p>`` at any level), with the metric it belongs to."""
    base = metric.split("@")[0]
    for spec in R.METRICS.values():
        for a in spec.aggregates(R.PROBE):
            if a.name.split("@")[0] == base:
                return spec, a
    return None, None




def direction(metric: str) -> int | None:
    """+1 / -1 / None for an aggregate name, as its metric registers it (``ssim@0.1`` has SSIM's
    per-σ direction); ``acc_on_set`` is reported only.

    >>> direction("log10_ros"), direction("ssim@0.05"), direction("acc_on_set")
    (-1, 1, None)
    """
    if metric == "acc_on_set":
        return None
    _, a = _aggregate(metric)
    if a is None:
        names = [x.name for m in R.METRICS.values() for x in m.aggregates(R.PROBE)]
        raise ValueError(f"unknown metric {metric!r}; known: {', '.join(names)}, acc_on_set "
                         "(ssim@<sigma>, road@<percent> at any level)")
    return a.direction


@dataclass
class PerImage:
    """The per-image values of one method of one stored result: for each registered metric the
    result holds, its decoded values (``metric_registry.MetricSpec.decode``), and whether each
    image is classified correctly. ``n`` is the number of images of the set."""

    values: dict[str, dict]
    correct: np.ndarray

    @property
    def n(self) -> int:
        return len(self.correct)

    @property
    def metrics(self) -> list[R.MetricSpec]:
        return [R.METRICS[k] for k in self.values]

    def levels(self) -> dict[str, list[str]]:
        return {m.name: list(m.levels(self.values[m.name])) for m in self.metrics}

    def aggregates(self, *, curve: bool = False) -> list[R.Aggregate]:
        return [a for m in self.metrics for a in m.aggregates(self.values[m.name]) if curve or not a.curve]

    # the protocol metrics' values by name (convenience for callers and tests)
    gini = property(lambda self: self.values["gini"]["gini"])
    ros = property(lambda self: self.values["ros"]["ros"])
    ssim = property(lambda self: self.values["ssim"]["ssim"])  # (S, n), 0 where not kept
    kept = property(lambda self: self.values["ssim"]["kept"])  # (S, n)
    sigmas = property(lambda self: self.values["ssim"]["sigmas"])
    road = property(lambda self: self.values["road"]["road"])  # (n, L)
    road_levels = property(lambda self: self.values["road"]["levels"])

    @property
    def aopc_terms(self) -> np.ndarray:
        """Per-image AOPC terms: their mean is the protocol's AOPC (it is linear in the curve)."""
        return R.aopc_terms(self.road)

    @property
    def log10_ros(self) -> np.ndarray:
        return R._log10(self.ros)

    @classmethod
    def from_result(cls, result: dict, method: str) -> "PerImage":
        """Decode one method of a stored result (every registered metric the result holds)."""
        mid = result.get("model", {}).get("id", "?")
        try:
            d = result["per_image"][method]
            summ = result["summary"][method]
            correct = np.asarray(result["per_image"]["correct"], dtype=np.float64)
        except KeyError as e:
            raise ValueError(f"result of {mid} has no per-image {method} values ({e.args[0]!r} missing): "
                             "rescore it with `salbench leaderboard --rescore`") from None
        values = {}
        for spec in R.metrics_in(d):
            try:
                values[spec.name] = spec.decode(d, summ)
            except (KeyError, ValueError, TypeError) as e:
                raise ValueError(f"result of {mid}: the stored {method} values of metric {spec.name!r} are "
                                 f"malformed ({e}); rescore it with `salbench leaderboard --rescore`") from None
        return cls(values=values, correct=correct)


class _Columns:
    """Per-image columns whose count-weighted sums give every aggregate of :class:`PerImage`:
    ``one``, then each metric's columns (registry order), then ``acc_on_set``."""

    def __init__(self, pi: PerImage, valid: dict[str, np.ndarray] | None = None) -> None:
        valid = valid or {}
        cols, self.index = [], {}

        def add(name, v):
            if name in self.index:
                raise ValueError(f"two metrics define a column named {name!r}")
            self.index[name] = len(cols)
            cols.append(np.asarray(v, dtype=np.float64))

        add("one", np.ones(pi.n))
        for spec in pi.metrics:
            for name, v in spec.columns(pi.values[spec.name], valid):
                add(name, v)
        add("acc_on_set", pi.correct)
        self.matrix = np.stack(cols, axis=1)  # (n, k)
        self.pi = pi
        self.by_name = {a.name: (spec, a) for spec in pi.metrics for a in spec.aggregates(pi.values[spec.name])}

    def aggregates(self, sums: np.ndarray, names: list[str], counts: np.ndarray | None = None) -> np.ndarray:
        """``sums`` (..., k) of count-weighted columns -> (..., len(names)) aggregates; ``counts``
        (..., n) are the resample's counts per image (None: every image once)."""
        if counts is None:
            counts = np.ones((*sums.shape[:-1], self.pi.n))
        col = R.ColumnSums(lambda name: sums[..., self.index[name]], counts)
        out = []
        with np.errstate(divide="ignore", invalid="ignore"):
            for name in names:
                if name == "acc_on_set":
                    out.append(col("acc_on_set") / col("one"))
                    continue
                if name not in self.by_name:
                    raise ValueError(f"unknown aggregate {name!r}")
                spec, a = self.by_name[name]
                out.append(a.value(col, self.pi.values[spec.name]))
        return np.stack(out, axis=-1)


def _counts(idx: np.ndarray, n: int) -> np.ndarray:
    """Resampled indices (..., m) -> counts per image (..., n), int32 (exact; half the memory traffic of
    float64 in the weighted medians, and a matrix product with float columns costs the same)."""
    flat = idx.reshape(-1, idx.shape[-1])
    rows = flat.shape[0]
    offsets = (np.arange(rows)[:, None] * n + flat).ravel()
    counts = np.bincount(offsets, minlength=rows * n).reshape(rows, n).astype(np.int32)
    return counts.reshape(*idx.shape[:-1], n)


def _bootstrap(n: int, statistic, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """scipy's percentile bootstrap over the n images of a vector statistic of resampled indices
    (PROTOCOL §8.3).

    Returns (estimate, lo, hi). A statistic that does not vary over resamples (an accuracy of 1.0
    on every image) gets the estimate itself as its interval; resamples where a statistic is NaN
    (no valid image drawn) are left out of its percentiles.
    """
    idx = np.arange(n)
    est = statistic(idx[None, :])[0]

    def stat(i, axis=-1):
        return np.moveaxis(statistic(np.moveaxis(i, axis, -1)), -1, 0)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = sps.bootstrap((idx,), stat, n_resamples=N_RESAMPLES, confidence_level=CONFIDENCE, method="percentile",
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
    """Every aggregate of ``pi`` (its metrics' non-curve aggregates, then ``acc_on_set``; with
    ``curve``, the curve points such as ``road@<p>`` last)."""
    names = [a.name for a in pi.aggregates()] + ["acc_on_set"]
    return names + ([a.name for a in pi.aggregates(curve=True) if a.curve] if curve else [])


def aggregate_ci(pi: PerImage, names: list[str] | None = None, seed: int = BOOTSTRAP_SEED) -> dict[str, tuple]:
    """``{name: (estimate, lo, hi)}``: each aggregate with its 95% percentile bootstrap interval over
    the images (PROTOCOL §7). Names: :func:`aggregate_names` (``road@<p>`` for the curve)."""
    names = names or aggregate_names(pi)
    c = _Columns(pi)
    def statistic(i):
        counts = _counts(i, pi.n)
        return c.aggregates(counts @ c.matrix, names, counts)

    est, lo, hi = _bootstrap(pi.n, statistic, seed)
    return {name: (float(e), float(a), float(b)) for name, e, a, b in zip(names, est, lo, hi)}


def point_estimates(pi: PerImage, names: list[str]) -> np.ndarray:
    """The aggregates ``names`` of ``pi`` on the whole set (every image once), without intervals."""
    c = _Columns(pi)
    return c.aggregates(np.ones(pi.n) @ c.matrix, names, np.ones(pi.n))


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
            alpha: float = ALPHA, band: float = 0.0) -> str:
    """``better`` / ``worse`` (model vs reference, in the metric's direction) when the
    Holm-adjusted Wilcoxon p is below ``alpha`` AND the paired bootstrap interval of the delta
    excludes 0 on the same side AND ``|delta|`` exceeds ``band``, the two models' numerical bands
    summed (PROTOCOL §7, §8.4); else ``no detectable difference``.

    >>> verdict(-0.3, -0.5, -0.1, 0.001, "log10_ros", 900)
    'better'
    >>> verdict(0.01, -0.001, 0.02, 0.01, "gini", 1000)
    'no detectable difference'
    >>> verdict(-0.3, -0.5, -0.1, 0.001, "log10_ros", 900, band=0.4)  # inside the numerical band
    'no detectable difference'
    """
    d = direction(metric)
    if n_paired == 0 or d is None or not all(map(math.isfinite, (delta, lo, hi))):
        return "not comparable"
    if not (math.isfinite(p_holm) and p_holm < alpha):
        return "no detectable difference"
    if not (math.isfinite(band) and abs(delta) > band):
        return "no detectable difference"
    if lo > 0 and delta > 0:
        return "better" if d > 0 else "worse"
    if hi < 0 and delta < 0:
        return "worse" if d > 0 else "better"
    return "no detectable difference"


def compared_metrics(pi: PerImage) -> list[str]:
    """The aggregates with a direction (registry order): those the paired comparisons test."""
    return [a.name for a in pi.aggregates() if a.direction is not None]


def _holm_in_place(family: dict[str, float], name: str, p: float) -> float:
    """Holm-adjusted ``p`` of a test that takes ``name``'s place in the headline ``family``."""
    keys = list(family)
    ps = [p if k == name else family[k] for k in keys]
    if name not in family:
        keys, ps = keys + [name], ps + [p]
    return holm(ps)[keys.index(name)]


def compare(model: PerImage, ref: PerImage, seed: int = BOOTSTRAP_SEED,
            bands: dict[str, float] | None = None) -> list[dict]:
    """Paired comparison of one method of two results on the same images (PROTOCOL §7, §8.6).

    Returns one row per compared aggregate (:func:`compared_metrics`, of the metrics both results
    hold): metric, role (``headline``, ``variant``, ``secondary``, ``level``), n_paired, delta (the
    aggregate's paired effect, model - reference on the paired images), delta_lo/delta_hi (paired
    percentile bootstrap), p (Wilcoxon), p_holm (Holm over the headline aggregates; any other row
    adjusted as if it took its headline's place), band (``bands[name]``: the two models' numerical
    bands summed, 0 when not given), verdict; a headline row also gets ``robustness``: ``robust``
    when every robustness variant of it gives the same verdict, else ``variant-dependent``.
    """
    shared = [k for k in model.values if k in ref.values]
    model = PerImage({k: model.values[k] for k in shared}, model.correct)
    ref = PerImage({k: ref.values[k] for k in shared}, ref.correct)
    if model.n != ref.n or model.levels() != ref.levels():
        raise ValueError("the two results were not scored on the same images/levels; rescore one of them")
    valid = {}
    for spec in model.metrics:
        valid.update(spec.pair_valid(model.values[spec.name], ref.values[spec.name]))
    cm, cr = _Columns(model, valid), _Columns(ref, valid)
    names = compared_metrics(model)
    plain = [nm for nm in names if cm.by_name[nm][1].effect is None]
    own = [nm for nm in names if cm.by_name[nm][1].effect is not None]
    both = np.concatenate([cm.matrix, cr.matrix], axis=1)
    k = cm.matrix.shape[1]
    pos = {nm: j for j, nm in enumerate(plain + own)}

    def statistic(i):
        counts = _counts(i, model.n)
        s = counts @ both
        out = [cm.aggregates(s[..., :k], plain, counts) - cr.aggregates(s[..., k:], plain, counts)] if plain else []
        for nm in own:
            spec, agg = cm.by_name[nm]
            out.append(agg.effect(counts, model.values[spec.name], ref.values[spec.name], valid)[..., None])
        return np.concatenate(out, axis=-1)

    est, lo, hi = _bootstrap(model.n, statistic, seed)
    rows = []
    for name in names:
        j = pos[name]
        spec, agg = cm.by_name[name]
        a, b = agg.paired(model.values[spec.name], ref.values[spec.name], valid)
        rows.append({"metric": name, "role": agg.role, "variant_of": agg.variant_of or "", "n_paired": int(len(a)),
                     "delta": float(est[j]), "delta_lo": float(lo[j]), "delta_hi": float(hi[j]),
                     "p": wilcoxon_p(a, b), "band": float((bands or {}).get(name, 0.0))})
    headline = {r["metric"]: r["p"] for r in rows if r["role"] == "headline"}
    for r, ph in zip([r for r in rows if r["role"] == "headline"], holm(list(headline.values()))):
        r["p_holm"] = ph
    for r in rows:
        if r["role"] != "headline":
            r["p_holm"] = _holm_in_place(headline, r["variant_of"] or r["metric"], r["p"])
        r["verdict"] = verdict(r["delta"], r["delta_lo"], r["delta_hi"], r["p_holm"], r["metric"], r["n_paired"],
                               band=r["band"])
    by = {r["metric"]: r for r in rows}
    for r in rows:
        if r["role"] == "headline":
            variants = [v for v in rows if v["role"] == "variant" and v["variant_of"] == r["metric"]]
            r["robustness"] = ("robust" if all(v["verdict"] == r["verdict"] for v in variants)
                               else "variant-dependent")
    del by
    return rows
