"""The metric registry: every leaderboard metric is one :class:`MetricSpec` entry, as data.

An entry says, for one metric of the protocol (PROTOCOL §3):

- how to compute its per-image values for one scoring batch and one attribution method
  (``compute``, given a :class:`Batch`: the model, the images, the explainer, the clean maps and
  logits already computed, and a seeded generator keyed by the metric's name);
- how those values are stored in a result (``encode``/``decode``: the ``per_image`` JSON block)
  and summarised (``summarize``: the ``summary`` JSON entries);
- its aggregates (:class:`Aggregate`): their names (the leaderboard columns), their direction
  (higher or lower is better, or reported only), and how each is computed from count-weighted
  per-image columns (``columns``), so that ``benchmark.stats`` bootstraps and pairs every metric
  the same way without knowing any of them.

``benchmark.scoring.score`` iterates :data:`METRICS`; ``benchmark.stats`` and
``benchmark.leaderboard`` take their columns, directions and comparisons from it. Adding a metric
is one :func:`register_metric` call (:func:`register_scalar_metric` for the common case of one
number per image averaged over the set); nothing else is edited. The four protocol metrics are
registered below in the protocol's order (Gini, SSIM under noise, ROS, ROAD), which is the column
order of the boards.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from salbench import metrics

class ColumnSums:
    """What an aggregate is computed from: ``col(name)`` -> the (...,) array of count-weighted sums of
    column ``name`` (``col("one")`` is the number of images in the resample), and ``col.counts``, the
    (..., n) counts per image themselves (for an aggregate that is not a function of sums, such as a
    median: :func:`weighted_median`)."""

    def __init__(self, sums: Callable[[str], np.ndarray], counts: np.ndarray) -> None:
        self._sums, self.counts = sums, counts

    def __call__(self, name: str) -> np.ndarray:
        return self._sums(name)


def weighted_median(values: np.ndarray, valid: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Median of the multiset that holds ``values[i]`` ``counts[..., i]`` times, over the ``valid``
    images only (numpy's median: the mean of the two middle values for an even count); NaN where no
    valid image is drawn. ``counts`` (..., n) -> (...,).

    >>> v = np.array([3.0, 1.0, 2.0, 10.0])
    >>> float(weighted_median(v, np.ones(4, bool), np.ones(4)))  # np.median(v)
    2.5
    >>> float(weighted_median(v, np.array([True, True, True, False]), np.array([1.0, 0.0, 2.0, 5.0])))
    2.0
    """
    values = np.asarray(values, dtype=np.float64)
    valid = np.asarray(valid, dtype=bool) & np.isfinite(values)
    sel = np.flatnonzero(valid)
    sel = sel[np.argsort(values[sel], kind="stable")]
    v = values[sel]
    c = np.asarray(counts)[..., sel]
    if c.ndim == 1:  # one set of counts: the same computation on a batch of one
        return weighted_median(values, valid, np.asarray(counts)[None])[0]
    if v.size == 0:
        return np.full(c.shape[:-1], np.nan)
    # a resample's median sits near the middle of the sorted values: count through a window around it
    # (a sum for the part below, a cumulative sum inside), and through every value only for the rare
    # resample whose middle falls outside the window
    m = v.size
    w = int(8 * math.sqrt(m)) + 16
    lo_w, hi_w = max(0, m // 2 - w), min(m, m // 2 + w)
    below = c[..., :lo_w].sum(-1)
    cum = np.cumsum(c[..., lo_w:hi_w], axis=-1) + below[..., None]
    total = cum[..., -1] + c[..., hi_w:].sum(-1)
    lo_pos = np.floor((total - 1) / 2)
    hi_pos = np.floor(total / 2)
    i_lo = lo_w + (cum <= lo_pos[..., None]).sum(-1)
    i_hi = lo_w + (cum <= hi_pos[..., None]).sum(-1)
    outside = (below > lo_pos) | (cum[..., -1] <= hi_pos)
    if outside.any():
        full = np.cumsum(c[outside], axis=-1)
        i_lo[outside] = (full <= lo_pos[outside][:, None]).sum(-1)
        i_hi[outside] = (full <= hi_pos[outside][:, None]).sum(-1)
    i_lo, i_hi = np.minimum(i_lo, m - 1), np.minimum(i_hi, m - 1)
    return np.where(total > 0, (v[i_lo] + v[i_hi]) / 2, np.nan)

Values = dict[str, np.ndarray]  # one metric's decoded per-image values (images on the last axis or first, per metric)


@dataclass(frozen=True)
class Batch:
    """What a metric sees for one scoring batch and one attribution method."""

    model: torch.nn.Module
    x: torch.Tensor
    y: torch.Tensor
    explainer: Callable
    maps: torch.Tensor  # the clean attribution maps (B, H, W), computed once per batch and method
    logits: torch.Tensor  # the clean logits (B, K)
    config: object  # the resolved ``ScoreConfig``
    generator: Callable[[str], torch.Generator]  # a fresh generator seeded by (seed, method, key, batch start)


@dataclass(frozen=True)
class Aggregate:
    """One aggregate of a metric: a leaderboard column (and a comparison row when it has a direction).

    ``value(col, values)`` computes it from count-weighted column sums (:class:`ColumnSums`);
    ``paired(model_values, ref_values, valid)`` gives the per-image values the Wilcoxon test pairs
    (images valid in both only); ``effect(counts, model_values, ref_values, valid)``, when given,
    is the paired effect (default: the difference of the two aggregates), e.g. ROS's median of
    per-image paired differences; ``summary_key`` is where the stored summary holds its point
    estimate. ``curve`` marks a point of a per-level curve (the ROAD curve): it goes to the
    metric's own long table, not to the main board.

    ``role`` (PROTOCOL §8.2, §8.5): ``headline`` (decides verdicts; Holm family), ``variant`` (a
    robustness variant of the headline ``variant_of``: marks a verdict ``robust`` or
    ``variant-dependent``), ``secondary`` (shown and compared, never decides), ``level`` (one σ of
    a sweep, descriptive) or ``reported`` (no direction).
    """

    name: str
    direction: int | None  # +1 higher is better, -1 lower is better, None reported only (never compared)
    value: Callable[[ColumnSums, Values], np.ndarray]
    summary_key: tuple[str, ...]
    paired: Callable[[Values, Values, dict], tuple[np.ndarray, np.ndarray]] | None = None
    curve: bool = False
    role: str = "headline"
    variant_of: str | None = None
    effect: Callable[[np.ndarray, Values, Values, dict], np.ndarray] | None = None

    def __post_init__(self) -> None:
        if self.direction not in (1, -1, None):
            raise ValueError(f"aggregate {self.name!r}: direction must be +1, -1 or None, got {self.direction!r}")
        if self.direction is not None and self.paired is None:
            raise ValueError(f"aggregate {self.name!r} has a direction, so it is compared: give its `paired` values")
        if self.direction is None and self.role != "reported":
            object.__setattr__(self, "role", "reported")
        if self.role not in ("headline", "variant", "secondary", "level", "reported"):
            raise ValueError(f"aggregate {self.name!r}: role must be headline, variant, secondary, level or "
                             f"reported, got {self.role!r}")
        if self.role in ("variant", "level") and not self.variant_of:
            raise ValueError(f"aggregate {self.name!r}: a {self.role} names the headline it belongs to (variant_of)")

    def from_summary(self, summary: dict) -> float:
        """The stored point estimate (NaN where the summary does not hold this aggregate)."""
        v = summary
        for k in self.summary_key:
            if not isinstance(v, dict) or k not in v:
                return float("nan")
            v = v[k]
        return float("nan") if v is None else v


@dataclass(frozen=True)
class MetricSpec:
    """A registered metric (see the module docstring)."""

    name: str
    description: str
    compute: Callable[[Batch], dict[str, torch.Tensor]]
    encode: Callable[[dict[str, torch.Tensor]], dict]
    decode: Callable[[dict, dict], Values]  # (per_image block, summary block) of one method -> values
    summarize: Callable[[dict[str, torch.Tensor], object], dict]
    columns: Callable[[Values, dict], list[tuple[str, np.ndarray]]]
    aggregates: Callable[[Values], list[Aggregate]]
    fields: tuple[str, ...]  # the per_image keys it stores (to tell whether a result has it)
    # the summary of one method -> what ``aggregates`` needs to list them (levels), None when the
    # summary does not hold this metric (boards built from summaries alone use it)
    from_summary: Callable[[dict], Values | None] = field(default=lambda s: None)
    pair_valid: Callable[[Values, Values], dict] = field(default=lambda m, r: {})
    levels: Callable[[Values], list[str]] = field(default=lambda v: [])
    image_axis: dict[str, int] = field(default_factory=dict)  # per field: the axis that runs over images (default 0)

    def aggregate_names(self, values: Values, *, curve: bool = False) -> list[str]:
        return [a.name for a in self.aggregates(values) if curve or not a.curve]


METRICS: dict[str, MetricSpec] = {}
BUILTIN_METRICS = ("gini", "ssim", "ros", "road")
RESERVED = ("correct", "one", "acc_on_set")


def register_metric(spec: MetricSpec) -> MetricSpec:
    """Add ``spec`` to :data:`METRICS` (scored for every method from then on, in registration order)."""
    if not spec.name or not spec.name.replace("_", "").isalnum():
        raise ValueError(f"a metric name must be a non-empty identifier, got {spec.name!r}")
    if spec.name in METRICS:
        raise ValueError(f"a metric named {spec.name!r} is already registered")
    if spec.name in RESERVED or set(spec.fields) & set(RESERVED):
        raise ValueError(f"{spec.name!r}: the names {', '.join(RESERVED)} are reserved")
    taken = {f for m in METRICS.values() for f in m.fields}
    if set(spec.fields) & taken:
        raise ValueError(f"metric {spec.name!r} stores fields {sorted(set(spec.fields) & taken)} that another metric "
                         "already stores")
    METRICS[spec.name] = spec
    return spec


def unregister_metric(name: str) -> None:
    if name in BUILTIN_METRICS:
        raise ValueError(f"{name!r} is a protocol metric and cannot be removed")
    METRICS.pop(name, None)


def get_metric(name: str) -> MetricSpec:
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; registered: {', '.join(METRICS)} "
                         "(add one with salbench.benchmark.metric_registry.register_metric)")
    return METRICS[name]


def metrics_in(per_image_method: dict) -> list[MetricSpec]:
    """The registered metrics whose values a result's per-image block of one method holds."""
    return [m for m in METRICS.values() if all(f in per_image_method for f in m.fields)]


def summary_metrics(summary: dict) -> list[tuple[MetricSpec, Values]]:
    """The registered metrics a stored summary of one method holds, each with the values its
    ``aggregates`` need to list them (from the summary alone: no per-image values needed)."""
    out = []
    for m in METRICS.values():
        v = m.from_summary(summary)
        if v is not None:
            out.append((m, v))
    return out


def _none_to_nan(values) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


def nan_to_none(values: list) -> list:
    return [None if (v is None or (isinstance(v, float) and math.isnan(v))) else v for v in values]


# ---------------------------------------------------------------------------------------------
# the common case: one number per image, averaged over the images where it is finite
# ---------------------------------------------------------------------------------------------

def register_scalar_metric(name: str, per_image: Callable[[Batch], torch.Tensor], *, direction: int | None,
                           description: str = "") -> MetricSpec:
    """Register a metric with one value per image (NaN: undefined for that image), aggregated as the
    mean over the images where it is finite; the board gets a column ``name`` (with its interval),
    and, with a direction, paired comparisons on the images finite in both.

    >>> spec = register_scalar_metric("map_max", lambda b: b.maps.flatten(1).amax(1), direction=None,
    ...                               description="largest attribution value")
    >>> [a.name for a in spec.aggregates({})]
    ['map_max']
    >>> unregister_metric("map_max")
    """
    ok_col, v_col = f"{name}_ok", f"{name}_v"

    def compute(b: Batch) -> dict[str, torch.Tensor]:
        v = per_image(b)
        if not isinstance(v, torch.Tensor) or v.shape != (len(b.y),):
            got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise ValueError(f"metric {name!r} must return one value per image, shape ({len(b.y)},), got {got}")
        return {name: v.detach().double().cpu()}

    def summarize(v, cfg) -> dict:
        t = v[name]
        ok = torch.isfinite(t)
        return {name: float(t[ok].mean()) if ok.any() else float("nan")}

    def columns(v: Values, valid: dict) -> list[tuple[str, np.ndarray]]:
        ok = np.isfinite(v[name]) & valid.get(name, True)
        return [(ok_col, ok), (v_col, np.where(ok, v[name], 0.0))]

    def paired(m: Values, r: Values, valid: dict):
        return m[name][valid[name]], r[name][valid[name]]

    agg = Aggregate(name, direction, lambda col, v: col(v_col) / col(ok_col), (name,),
                    paired=paired if direction is not None else None)
    return register_metric(MetricSpec(
        name=name, description=description, compute=compute,
        encode=lambda v: {name: nan_to_none(v[name].tolist())},
        decode=lambda per, summ: {name: _none_to_nan(per[name])},
        summarize=summarize, columns=columns, aggregates=lambda v: [agg], fields=(name,),
        from_summary=lambda s: {} if name in s else None,
        pair_valid=lambda m, r: {name: np.isfinite(m[name]) & np.isfinite(r[name])}))


# ---------------------------------------------------------------------------------------------
# the protocol's metrics (PROTOCOL §3), in board order
# ---------------------------------------------------------------------------------------------

# Gini sparsity: the mean of the per-image Gini index of the map
def _gini_compute(b: Batch) -> dict[str, torch.Tensor]:
    return {"gini": metrics.gini_index(b.maps).double().cpu()}


register_metric(MetricSpec(
    name="gini", description="Gini index of the map (sparsity), mean over the set; higher is better",
    compute=_gini_compute,
    encode=lambda v: {"gini": v["gini"].tolist()},
    decode=lambda per, summ: {"gini": np.asarray(per["gini"], dtype=np.float64)},
    summarize=lambda v, cfg: {"gini": float(v["gini"].mean())},
    columns=lambda v, valid: [("gini", v["gini"])],
    aggregates=lambda v: [Aggregate("gini", +1, lambda col, _: col("gini") / col("one"), ("gini",),
                                    paired=lambda m, r, valid: (m["gini"], r["gini"]))],
    fields=("gini",), from_summary=lambda s: {} if "gini" in s else None))


# SSIM under Gaussian input noise: per σ the mean over the images whose prediction did not flip
# (stored (S, n): σ levels by images); ssim_mean is the mean of the per-σ means. Protocol v2
# (PROTOCOL §8.2): the headline SSIM is of scale-free maps (each divided by its own max|map|);
# v1's raw-map SSIM is the robustness variant ``ssim_raw`` (§8.5), stored beside it.
def _ssim_compute(b: Batch) -> dict[str, torch.Tensor]:
    s = metrics.ssim_under_noise(b.model, b.x, b.y, b.explainer, sigmas=b.config.sigmas,
                                 generator=b.generator("ssim"), maps=b.maps, normalize=True, with_raw=True)
    return {"ssim": s.scores.double().cpu(), "ssim_kept": s.kept.cpu(), "ssim_raw": s.scores_raw.double().cpu()}


def _kept_means(ssim: torch.Tensor, kept: torch.Tensor) -> list[float]:
    ok = kept & torch.isfinite(ssim)
    return [float(ssim[i][ok[i]].mean()) if ok[i].any() else float("nan") for i in range(ssim.shape[0])]


def _ssim_summarize(v, cfg) -> dict:
    means = _kept_means(v["ssim"], v["ssim_kept"])
    raw = _kept_means(v["ssim_raw"], v["ssim_kept"])
    return {"ssim": dict(zip(map(str, cfg.sigmas), means)),
            "ssim_kept_fraction": dict(zip(map(str, cfg.sigmas), v["ssim_kept"].double().mean(1).tolist())),
            "ssim_mean": float(np.nanmean(means)), "ssim_raw": float(np.nanmean(raw))}


def _ssim_decode(per: dict, summ: dict) -> Values:
    def grid(key):
        return np.array([_none_to_nan(row) for row in per[key]], dtype=np.float64).reshape(len(per[key]), -1)

    ssim, raw = grid("ssim"), grid("ssim_raw")
    kept = np.asarray(per["ssim_kept"], dtype=bool).reshape(ssim.shape)
    k, kr = kept & np.isfinite(ssim), kept & np.isfinite(raw)
    return {"ssim": np.where(k, ssim, 0.0), "kept": k, "raw": np.where(kr, raw, 0.0), "kept_raw": kr,
            "sigmas": list(summ["ssim"].keys())}


def _ssim_columns(v: Values, valid: dict) -> list[tuple[str, np.ndarray]]:
    out = []
    for i, s in enumerate(v["sigmas"]):
        k = v["kept"][i] & valid.get(f"ssim@{s}", True)
        kr = v["kept_raw"][i] & valid.get(f"ssim_raw@{s}", True)
        out += [(f"ssim_k@{s}", k), (f"ssim_s@{s}", np.where(k, v["ssim"][i], 0.0)),
                (f"ssimraw_k@{s}", kr), (f"ssimraw_s@{s}", np.where(kr, v["raw"][i], 0.0))]
    return out


def _ssim_mean_over_sigmas(prefix: str):
    def value(col: ColumnSums, v: Values) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            stacked = np.stack([col(f"{prefix}_s@{s}") / col(f"{prefix}_k@{s}") for s in v["sigmas"]], axis=-1)
        finite = np.isfinite(stacked)
        return np.where(finite, stacked, 0.0).sum(-1) / finite.sum(-1)
    return value


def _ssim_mean_paired(key: str, kept: str):
    def paired(m: Values, r: Values, valid: dict):
        """Per image, the mean over the σ levels kept in both."""
        km = np.stack([valid[f"{kept}@{s}"] for s in m["sigmas"]])
        has = km.any(0)
        with np.errstate(invalid="ignore"):
            a = (np.where(km, m[key], 0).sum(0) / km.sum(0))[has]
            b = (np.where(km, r[key], 0).sum(0) / km.sum(0))[has]
        return a, b
    return paired


def _ssim_sigma_aggregate(i: int, s: str) -> Aggregate:
    def paired(m, r, valid):
        k = valid[f"ssim@{s}"]
        return m["ssim"][i][k], r["ssim"][i][k]

    return Aggregate(f"ssim@{s}", +1, lambda col, v: col(f"ssim_s@{s}") / col(f"ssim_k@{s}"), ("ssim", s),
                     paired=paired, role="level", variant_of="ssim_mean")


register_metric(MetricSpec(
    name="ssim", description="SSIM between clean and noisy-input maps, each divided by its own max|map|, per σ "
                             "(images whose prediction flipped dropped), mean over σ; higher is better "
                             "(variant ssim_raw: v1's raw maps)",
    compute=_ssim_compute,
    encode=lambda v: {"ssim": [nan_to_none(r) for r in v["ssim"].tolist()], "ssim_kept": v["ssim_kept"].int().tolist(),
                      "ssim_raw": [nan_to_none(r) for r in v["ssim_raw"].tolist()]},
    decode=_ssim_decode, summarize=_ssim_summarize, columns=_ssim_columns,
    aggregates=lambda v: [
        Aggregate("ssim_mean", +1, _ssim_mean_over_sigmas("ssim"), ("ssim_mean",),
                  paired=_ssim_mean_paired("ssim", "ssim")),
        Aggregate("ssim_raw", +1, _ssim_mean_over_sigmas("ssimraw"), ("ssim_raw",),
                  paired=_ssim_mean_paired("raw", "ssim_raw"), role="variant", variant_of="ssim_mean"),
        *[_ssim_sigma_aggregate(i, s) for i, s in enumerate(v["sigmas"])]],
    fields=("ssim", "ssim_kept", "ssim_raw"),
    pair_valid=lambda m, r: {**{f"ssim@{s}": m["kept"][i] & r["kept"][i] for i, s in enumerate(m["sigmas"])},
                             **{f"ssim_raw@{s}": m["kept_raw"][i] & r["kept_raw"][i]
                                for i, s in enumerate(m["sigmas"])}},
    levels=lambda v: v["sigmas"], image_axis={"ssim": 1, "ssim_kept": 1, "ssim_raw": 1},
    from_summary=lambda s: {"sigmas": list(s["ssim"])} if "ssim" in s else None))


# ROS (PROTOCOL §8.2): per image the maximum over the noise samples whose prediction did not flip
# (NaN only when all flip); headline = the median over images of per-image log10 ROS, with its NaN
# fraction. Stored beside it: v1's per-image ROS (quantus semantics: one flip makes the image NaN),
# whose log10 of the mean is the secondary column ``log10_mean_ros``, and the variant ``ros_floor``
# (the clean map's denominator floored at 1e-3·max|e|, §8.5).
ROS_MAX_NAN_FRACTION = 0.10  # a row with more NaN images than this is shown but not ranked on ROS


def _ros_compute(b: Batch) -> dict[str, torch.Tensor]:
    cfg = b.config
    v = metrics.ros_variants(b.model, b.x, b.y, b.explainer, n_samples=cfg.ros_samples, generator=b.generator("ros"),
                             maps=b.maps, logits=b.logits)
    return {"ros": v["exclude"].double().cpu(), "ros_nan": v["nan"].double().cpu(),
            "ros_floor": v["floor"].double().cpu()}


def _log10(a: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log10(a)


def _median_log10(x: torch.Tensor) -> float:
    v = _log10(x.numpy())
    v = v[np.isfinite(v)]
    return float(np.median(v)) if v.size else float("nan")


def _ros_summarize(v, cfg) -> dict:
    log10_mean, nan_v1 = metrics.aggregate_ros(v["ros_nan"])
    return {"log10_ros": _median_log10(v["ros"]), "ros_nan_fraction": float(torch.isnan(v["ros"]).double().mean()),
            "ros_floor": _median_log10(v["ros_floor"]), "log10_mean_ros": float(log10_mean),
            "log10_mean_ros_nan_fraction": float(nan_v1)}


def _ros_columns(v: Values, valid: dict) -> list[tuple[str, np.ndarray]]:
    ok = np.isfinite(v["ros_nan"]) & valid.get("log10_mean_ros", True)
    return [("rosm_ok", ok), ("rosm_v", np.where(ok, v["ros_nan"], 0.0)),
            ("ros_finite", np.isfinite(v["ros"])), ("rosm_finite", np.isfinite(v["ros_nan"]))]


def _median_of(key: str):
    def value(col: ColumnSums, v: Values) -> np.ndarray:
        lg = _log10(v[key])
        return weighted_median(lg, np.isfinite(lg), col.counts)
    return value


def _median_effect(key: str, valid_key: str):
    def effect(counts: np.ndarray, m: Values, r: Values, valid: dict) -> np.ndarray:
        d = _log10(m[key]) - _log10(r[key])
        return weighted_median(d, valid[valid_key] & np.isfinite(d), counts)
    return effect


def _log10_paired(key: str, valid_key: str):
    def paired(m: Values, r: Values, valid: dict):
        k = valid[valid_key]
        return _log10(m[key])[k], _log10(r[key])[k]
    return paired


register_metric(MetricSpec(
    name="ros", description="relative output stability: median over images of per-image log10 ROS (flipped noise "
                            "samples left out; NaN only when all flip, fraction reported); lower is better",
    compute=_ros_compute,
    encode=lambda v: {k: nan_to_none(v[k].tolist()) for k in ("ros", "ros_nan", "ros_floor")},
    decode=lambda per, summ: {k: _none_to_nan(per[k]) for k in ("ros", "ros_nan", "ros_floor")},
    summarize=_ros_summarize, columns=_ros_columns,
    aggregates=lambda v: [
        Aggregate("log10_ros", -1, _median_of("ros"), ("log10_ros",), paired=_log10_paired("ros", "log10_ros"),
                  effect=_median_effect("ros", "log10_ros")),
        Aggregate("ros_floor", -1, _median_of("ros_floor"), ("ros_floor",),
                  paired=_log10_paired("ros_floor", "ros_floor"), effect=_median_effect("ros_floor", "ros_floor"),
                  role="variant", variant_of="log10_ros"),
        Aggregate("log10_mean_ros", -1, lambda col, _: _log10(col("rosm_v") / col("rosm_ok")), ("log10_mean_ros",),
                  paired=_log10_paired("ros_nan", "log10_mean_ros"), role="secondary", variant_of="log10_ros"),
        Aggregate("ros_nan_fraction", None, lambda col, _: 1.0 - col("ros_finite") / col("one"),
                  ("ros_nan_fraction",)),
        Aggregate("log10_mean_ros_nan_fraction", None, lambda col, _: 1.0 - col("rosm_finite") / col("one"),
                  ("log10_mean_ros_nan_fraction",))],
    fields=("ros", "ros_nan", "ros_floor"), from_summary=lambda s: {} if "log10_ros" in s else None,
    pair_valid=lambda m, r: {k: np.isfinite(m[f]) & np.isfinite(r[f]) for k, f in
                             (("log10_ros", "ros"), ("ros_floor", "ros_floor"), ("log10_mean_ros", "ros_nan"))}))


# ROAD: per removal level the accuracy on the imputed images (a curve); AOPC summarises it. Protocol v2
# (PROTOCOL §8.1): pixels of equal map value in a seeded random order; v1's stable order (ties to the
# lower pixel index) is the variant ``aopc_stable_ties`` (§8.5); the tied fraction per image is stored.
def _road_compute(b: Batch) -> dict[str, torch.Tensor]:
    cfg = b.config
    curves = metrics.road_curves(b.model, b.x, b.y, b.maps, percentages=cfg.road_percentages, noise=cfg.road_noise,
                                 generator=b.generator("road"), ties=("random", "stable"))
    return {"road": curves["random"].cpu(), "road_stable": curves["stable"].cpu(),
            "road_tied": metrics.tied_fraction(b.maps).double().cpu()}


def _road_summarize(v, cfg) -> dict:
    curve = v["road"].double().mean(0)
    return {"road_curve": dict(zip(map(str, cfg.road_percentages), curve.tolist())),
            "aopc": float(metrics.road_aopc(v["road"])), "aopc_stable_ties": float(metrics.road_aopc(v["road_stable"])),
            "road_tied_fraction": float(v["road_tied"].mean())}


def _road_decode(per: dict, summ: dict) -> Values:
    levels = list(summ["road_curve"].keys())
    return {"road": np.asarray(per["road"], dtype=np.float64).reshape(-1, len(levels)),
            "road_stable": np.asarray(per["road_stable"], dtype=np.float64).reshape(-1, len(levels)),
            "road_tied": np.asarray(per["road_tied"], dtype=np.float64), "levels": levels}


def aopc_terms(road: np.ndarray) -> np.ndarray:
    """Per-image AOPC terms of an (n, L) 0/1 curve: their mean is the protocol's AOPC (linear in the curve)."""
    r = road.astype(np.float64)
    return (r[:, :1] - r).sum(axis=1) / (r.shape[1] + 1)


def _road_columns(v: Values, valid: dict) -> list[tuple[str, np.ndarray]]:
    # AOPC as its integer numerator per image (sum over levels of r_1% - r_p, each 0/1): the
    # count-weighted sums are then exact integers whatever the BLAS summation order
    r, rs = v["road"], v["road_stable"]
    return [("aopc_num", (r[:, :1] - r).sum(axis=1)), ("aopcst_num", (rs[:, :1] - rs).sum(axis=1)),
            ("road_tied", v["road_tied"]), *[(f"road@{p}", r[:, j]) for j, p in enumerate(v["levels"])]]


def _road_level(p: str) -> Aggregate:
    return Aggregate(f"road@{p}", None, lambda col, v: col(f"road@{p}") / col("one"), ("road_curve", p), curve=True)


def _aopc(num: str):
    return lambda col, v: col(num) / (col("one") * (v["road"].shape[1] + 1))


register_metric(MetricSpec(
    name="road", description="ROAD: accuracy after removing the top p% of pixels (ties in seeded random order) by "
                             "noisy linear imputation, per level; AOPC (area over the curve) higher is better",
    compute=_road_compute,
    encode=lambda v: {"road": v["road"].int().tolist(), "road_stable": v["road_stable"].int().tolist(),
                      "road_tied": v["road_tied"].tolist()},
    decode=_road_decode, summarize=_road_summarize, columns=_road_columns,
    aggregates=lambda v: [
        Aggregate("aopc", +1, _aopc("aopc_num"), ("aopc",),
                  paired=lambda m, r, valid: (aopc_terms(m["road"]), aopc_terms(r["road"]))),
        Aggregate("aopc_stable_ties", +1, _aopc("aopcst_num"), ("aopc_stable_ties",),
                  paired=lambda m, r, valid: (aopc_terms(m["road_stable"]), aopc_terms(r["road_stable"])),
                  role="variant", variant_of="aopc"),
        Aggregate("road_tied_fraction", None, lambda col, v: col("road_tied") / col("one"), ("road_tied_fraction",)),
        *[_road_level(p) for p in v["levels"]]],
    fields=("road", "road_stable", "road_tied"), levels=lambda v: v["levels"],
    from_summary=lambda s: {"levels": list(s["road_curve"])} if "road_curve" in s else None))


# decoded values with one level each: enough to list every metric's aggregates (names, directions)
PROBE = {"sigmas": ["0"], "levels": ["0"], "road": np.zeros((0, 1)), "road_stable": np.zeros((0, 1))}


def headline_aggregates() -> list[tuple[MetricSpec, Aggregate]]:
    """Every registered metric's headline aggregates, in registry order (the protocol's: gini,
    ssim_mean, log10_ros, aopc; PROTOCOL §8.2). The figures draw one panel per entry."""
    return [(m, a) for m in METRICS.values() for a in m.aggregates(PROBE)
            if a.role == "headline" and not a.curve]


def banded_aggregates() -> list[tuple[MetricSpec, Aggregate]]:
    """The aggregates that get a numerical band (PROTOCOL §8.4): the headline ones and the secondary
    ``log10_mean_ros``, whose band shows how ill-conditioned it is."""
    return [(m, a) for m in METRICS.values() for a in m.aggregates(PROBE)
            if a.role in ("headline", "secondary") and not a.curve]


def stack_batches(parts: Sequence[dict[str, torch.Tensor]], spec: MetricSpec) -> dict[str, torch.Tensor]:
    """Concatenate one metric's per-batch values (in image order) along each field's image axis."""
    return {f: torch.cat([p[f] for p in parts], dim=spec.image_axis.get(f, 0)) for f in parts[0]}
