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

# a function of count-weighted column sums: ``col(name)`` -> the (..., ) array of sums of column
# ``name`` (``col("one")`` is the number of images in the resample)
ColumnSums = Callable[[str], np.ndarray]
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

    ``value(col, values)`` computes it from count-weighted column sums (see module docstring);
    ``paired(model_values, ref_values, valid)`` gives the per-image values the Wilcoxon test pairs
    (images valid in both only); ``summary_key`` is where the stored summary holds its point
    estimate. ``curve`` marks a point of a per-level curve (the ROAD curve): it goes to the
    metric's own long table, not to the main board.
    """

    name: str
    direction: int | None  # +1 higher is better, -1 lower is better, None reported only (never compared)
    value: Callable[[ColumnSums, Values], np.ndarray]
    summary_key: tuple[str, ...]
    paired: Callable[[Values, Values, dict], tuple[np.ndarray, np.ndarray]] | None = None
    curve: bool = False

    def __post_init__(self) -> None:
        if self.direction not in (1, -1, None):
            raise ValueError(f"aggregate {self.name!r}: direction must be +1, -1 or None, got {self.direction!r}")
        if self.direction is not None and self.paired is None:
            raise ValueError(f"aggregate {self.name!r} has a direction, so it is compared: give its `paired` values")

    def from_summary(self, summary: dict) -> float:
        v = summary
        for k in self.summary_key:
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
# (stored (S, n): σ levels by images); ssim_mean is the mean of the per-σ means
def _ssim_compute(b: Batch) -> dict[str, torch.Tensor]:
    s = metrics.ssim_under_noise(b.model, b.x, b.y, b.explainer, sigmas=b.config.sigmas,
                                 generator=b.generator("ssim"), maps=b.maps)
    return {"ssim": s.scores.double().cpu(), "ssim_kept": s.kept.cpu()}


def _ssim_summarize(v, cfg) -> dict:
    ssim, kept = v["ssim"], v["ssim_kept"]
    means = [float(ssim[i][kept[i]].mean()) if kept[i].any() else float("nan") for i in range(len(cfg.sigmas))]
    return {"ssim": dict(zip(map(str, cfg.sigmas), means)),
            "ssim_kept_fraction": dict(zip(map(str, cfg.sigmas), kept.double().mean(1).tolist())),
            "ssim_mean": float(np.nanmean(means))}


def _ssim_decode(per: dict, summ: dict) -> Values:
    ssim = np.array([_none_to_nan(row) for row in per["ssim"]], dtype=np.float64).reshape(len(per["ssim"]), -1)
    kept = np.asarray(per["ssim_kept"], dtype=bool).reshape(ssim.shape) & np.isfinite(ssim)
    return {"ssim": np.where(kept, ssim, 0.0), "kept": kept, "sigmas": list(summ["ssim"].keys())}


def _ssim_columns(v: Values, valid: dict) -> list[tuple[str, np.ndarray]]:
    out = []
    for i, s in enumerate(v["sigmas"]):
        k = v["kept"][i] & valid.get(f"ssim@{s}", True)
        out += [(f"ssim_k@{s}", k), (f"ssim_s@{s}", np.where(k, v["ssim"][i], 0.0))]
    return out


def _ssim_per_sigma(col: ColumnSums, s: str) -> np.ndarray:
    return col(f"ssim_s@{s}") / col(f"ssim_k@{s}")


def _ssim_mean(col: ColumnSums, v: Values) -> np.ndarray:
    stacked = np.stack([_ssim_per_sigma(col, s) for s in v["sigmas"]], axis=-1)
    finite = np.isfinite(stacked)
    return np.where(finite, stacked, 0.0).sum(-1) / finite.sum(-1)


def _ssim_mean_paired(m: Values, r: Values, valid: dict):
    """Per image, the mean over the σ levels kept in both."""
    km = np.stack([valid[f"ssim@{s}"] for s in m["sigmas"]])
    has = km.any(0)
    with np.errstate(invalid="ignore"):
        a = (np.where(km, m["ssim"], 0).sum(0) / km.sum(0))[has]
        b = (np.where(km, r["ssim"], 0).sum(0) / km.sum(0))[has]
    return a, b


def _ssim_sigma_aggregate(i: int, s: str) -> Aggregate:
    def paired(m, r, valid):
        k = valid[f"ssim@{s}"]
        return m["ssim"][i][k], r["ssim"][i][k]

    return Aggregate(f"ssim@{s}", +1, lambda col, v: _ssim_per_sigma(col, s), ("ssim", s), paired=paired)


register_metric(MetricSpec(
    name="ssim", description="SSIM between clean and noisy-input maps per σ (images whose prediction flipped "
                             "dropped), mean over σ; higher is better",
    compute=_ssim_compute,
    encode=lambda v: {"ssim": [nan_to_none(r) for r in v["ssim"].tolist()], "ssim_kept": v["ssim_kept"].int().tolist()},
    decode=_ssim_decode, summarize=_ssim_summarize, columns=_ssim_columns,
    aggregates=lambda v: [Aggregate("ssim_mean", +1, _ssim_mean, ("ssim_mean",), paired=_ssim_mean_paired),
                          *[_ssim_sigma_aggregate(i, s) for i, s in enumerate(v["sigmas"])]],
    fields=("ssim", "ssim_kept"),
    pair_valid=lambda m, r: {f"ssim@{s}": m["kept"][i] & r["kept"][i] for i, s in enumerate(m["sigmas"])},
    levels=lambda v: v["sigmas"], image_axis={"ssim": 1, "ssim_kept": 1},
    from_summary=lambda s: {"sigmas": list(s["ssim"])} if "ssim" in s else None))


# ROS: log10 of the nan-mean over images (NaN where a noisy prediction flipped); NaN fraction reported
def _ros_compute(b: Batch) -> dict[str, torch.Tensor]:
    cfg = b.config
    return {"ros": metrics.relative_output_stability(b.model, b.x, b.y, b.explainer, n_samples=cfg.ros_samples,
                                                     variant=cfg.ros_variant, generator=b.generator("ros"),
                                                     maps=b.maps, logits=b.logits).double().cpu()}


def _ros_summarize(v, cfg) -> dict:
    log10_ros, nan_frac = metrics.aggregate_ros(v["ros"])
    return {"log10_ros": float(log10_ros), "ros_nan_fraction": float(nan_frac)}


def _ros_columns(v: Values, valid: dict) -> list[tuple[str, np.ndarray]]:
    ok = np.isfinite(v["ros"]) & valid.get("log10_ros", True)
    return [("ros_ok", ok), ("ros_v", np.where(ok, v["ros"], 0.0)), ("ros_finite", np.isfinite(v["ros"]))]


def _log10(a: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log10(a)


register_metric(MetricSpec(
    name="ros", description="relative output stability: log10 of the mean over images (images with a flipped "
                            "noisy prediction are NaN, their fraction reported); lower is better",
    compute=_ros_compute,
    encode=lambda v: {"ros": nan_to_none(v["ros"].tolist())},
    decode=lambda per, summ: {"ros": _none_to_nan(per["ros"])},
    summarize=_ros_summarize, columns=_ros_columns,
    aggregates=lambda v: [
        Aggregate("log10_ros", -1, lambda col, _: np.log10(col("ros_v") / col("ros_ok")), ("log10_ros",),
                  paired=lambda m, r, valid: (_log10(m["ros"])[valid["log10_ros"]],
                                              _log10(r["ros"])[valid["log10_ros"]])),
        Aggregate("ros_nan_fraction", None, lambda col, _: 1.0 - col("ros_finite") / col("one"),
                  ("ros_nan_fraction",))],
    fields=("ros",), from_summary=lambda s: {} if "log10_ros" in s else None,
    pair_valid=lambda m, r: {"log10_ros": np.isfinite(m["ros"]) & np.isfinite(r["ros"])}))


# ROAD: per removal level the accuracy on the imputed images (a curve); AOPC summarises it
def _road_compute(b: Batch) -> dict[str, torch.Tensor]:
    cfg = b.config
    return {"road": metrics.road_curve(b.model, b.x, b.y, b.maps, percentages=cfg.road_percentages,
                                       noise=cfg.road_noise, generator=b.generator("road")).cpu()}


def _road_summarize(v, cfg) -> dict:
    curve = v["road"].double().mean(0)
    return {"road_curve": dict(zip(map(str, cfg.road_percentages), curve.tolist())),
            "aopc": float(metrics.road_aopc(v["road"]))}


def _road_decode(per: dict, summ: dict) -> Values:
    road = np.asarray(per["road"], dtype=np.float64)
    levels = list(summ["road_curve"].keys())
    return {"road": road.reshape(-1, len(levels)), "levels": levels}


def aopc_terms(road: np.ndarray) -> np.ndarray:
    """Per-image AOPC terms of an (n, L) 0/1 curve: their mean is the protocol's AOPC (linear in the curve)."""
    r = road.astype(np.float64)
    return (r[:, :1] - r).sum(axis=1) / (r.shape[1] + 1)


def _road_columns(v: Values, valid: dict) -> list[tuple[str, np.ndarray]]:
    # AOPC as its integer numerator per image (sum over levels of r_1% - r_p, each 0/1): the
    # count-weighted sums are then exact integers whatever the BLAS summation order, so the
    # bootstrap values that tie with the estimate tie exactly and BCa's bias term is reproducible
    r = v["road"]
    return [("aopc_num", (r[:, :1] - r).sum(axis=1)), *[(f"road@{p}", r[:, j]) for j, p in enumerate(v["levels"])]]


def _road_level(p: str) -> Aggregate:
    return Aggregate(f"road@{p}", None, lambda col, v: col(f"road@{p}") / col("one"), ("road_curve", p), curve=True)


register_metric(MetricSpec(
    name="road", description="ROAD: accuracy after removing the top p% of pixels by noisy linear imputation, "
                             "per level; AOPC (area over the curve) higher is better",
    compute=_road_compute,
    encode=lambda v: {"road": v["road"].int().tolist()},
    decode=_road_decode, summarize=_road_summarize, columns=_road_columns,
    aggregates=lambda v: [
        Aggregate("aopc", +1, lambda col, v: col("aopc_num") / (col("one") * (v["road"].shape[1] + 1)), ("aopc",),
                  paired=lambda m, r, valid: (aopc_terms(m["road"]), aopc_terms(r["road"]))),
        *[_road_level(p) for p in v["levels"]]],
    fields=("road",), levels=lambda v: v["levels"],
    from_summary=lambda s: {"levels": list(s["road_curve"])} if "road_curve" in s else None))


# decoded values with one level each: enough to list every metric's aggregates (names, directions)
PROBE = {"sigmas": ["0"], "levels": ["0"], "road": np.zeros((0, 1))}


def headline_aggregates() -> list[tuple[MetricSpec, Aggregate]]:
    """Every registered metric's headline aggregates, in registry order: those with a direction that
    are not one level of a curve or of a σ sweep (the protocol's: gini, ssim_mean, log10_ros, aopc).
    The figures draw one panel per entry."""
    return [(m, a) for m in METRICS.values() for a in m.aggregates(PROBE)
            if a.direction is not None and not a.curve and "@" not in a.name]


def stack_batches(parts: Sequence[dict[str, torch.Tensor]], spec: MetricSpec) -> dict[str, torch.Tensor]:
    """Concatenate one metric's per-batch values (in image order) along each field's image axis."""
    return {f: torch.cat([p[f] for p in parts], dim=spec.image_axis.get(f, 0)) for f in parts[0]}
