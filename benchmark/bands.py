"""Numerical bands and re-score verification (PROTOCOL §8.4, §8.7).

A stored aggregate is a float computation; how far it moves when nothing that matters changes is
its *numerical band*. Each zoo model is scored two more ways with the same random draws:

- ``ulp``: every floating-point parameter moved one ulp up (``torch.nextafter(p, +inf)``);
- ``float64``: the model and the images cast to float64.

Per banded aggregate (``metric_registry.banded_aggregates``: the four headline ones and the
secondary ``log10_mean_ros``) and method, the band is the largest |difference| from the stored
value. A submission gets the one-ulp band, plus float64 where its model can be cast (an exported
program cannot). The band is stored in the result (``band``) with the re-scored values, and a
checkpoint verdict is ``better``/``worse`` only when |delta| exceeds the two models' bands summed.

:func:`verify` re-scores a stored result on this machine and says, per banded aggregate, whether
the new value is within the stored band: a re-score on another CPU must reproduce every headline
aggregate within its band, not bit for bit.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, fields, replace

import torch
from torch import nn

from salbench.benchmark import metric_registry as MR
from salbench.benchmark import stats as S
from salbench.benchmark.scoring import ScoreConfig, score


def config_of(doc: dict) -> ScoreConfig:
    """The :class:`ScoreConfig` a stored result was scored with (tuples restored)."""
    known = {f.name for f in fields(ScoreConfig)}
    kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in doc["config"].items() if k in known}
    return ScoreConfig(**kw)


def ulp_model(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every floating-point parameter moved one ulp towards +inf."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for p in m.parameters():
            if p.is_floating_point():
                p.copy_(torch.nextafter(p, torch.full_like(p, math.inf)))
    return m


def float64_model(model: nn.Module) -> nn.Module | None:
    """A float64 copy of ``model``, or None when it cannot be cast (e.g. an exported program)."""
    try:
        m = copy.deepcopy(model).double()
    except Exception:
        return None
    if any(p.is_floating_point() and p.dtype != torch.float64 for p in m.parameters()):
        return None
    return m


def banded_names() -> list[str]:
    return [a.name for _, a in MR.banded_aggregates()]


def point_values(doc: dict) -> dict[str, dict[str, float]]:
    """``{method: {aggregate: value}}`` of the banded aggregates, from a result's per-image values."""
    out = {}
    for method in doc["summary"]:
        pi = S.PerImage.from_result(doc, method)
        names = [n for n in banded_names() if n in {a.name for a in pi.aggregates()}]
        out[method] = dict(zip(names, map(float, S.point_estimates(pi, names))))
    return out


def _diff(a: float, b: float) -> float:
    if math.isnan(a) and math.isnan(b):
        return 0.0
    if a == b:  # equal infinities
        return 0.0
    return abs(a - b)


def _rescore(model: nn.Module, imageset, cfg: ScoreConfig, *, dtype=None, progress: bool, deadline=None) -> dict:
    return score(model, imageset, replace(cfg, accuracy=False), progress=progress, dtype=dtype,
                 deadline=deadline).to_dict()


def numerical_band(model: nn.Module, imageset, doc: dict, *, float64: bool = True, progress: bool = True,
                   deadline=None) -> dict:
    """The ``band`` block of a result: the one-ulp (and, with ``float64`` and a castable model, the
    float64) re-scores' banded aggregates and, per method and aggregate, the band (largest
    |difference| from the stored value). ``doc`` is the stored result of ``model``'s weights."""
    t0 = time.perf_counter()
    cfg = config_of(doc)
    stored = point_values(doc)
    rescored = {"ulp": point_values(_rescore(ulp_model(model), imageset, cfg, progress=progress, deadline=deadline))}
    m64 = float64_model(model) if float64 else None
    if m64 is not None:
        rescored["float64"] = point_values(_rescore(m64, imageset, cfg, dtype=torch.float64, progress=progress,
                                                     deadline=deadline))
    band = {m: {k: max(_diff(v, r[m][k]) for r in rescored.values()) for k, v in vals.items()}
            for m, vals in stored.items()}
    return {"kinds": list(rescored), "band": band, "rescored": rescored, "seconds": round(time.perf_counter() - t0, 1)}


def band_of(doc: dict, method: str, name: str) -> float:
    """The stored band of one aggregate (NaN when the result has none)."""
    try:
        return float(doc["band"]["band"][method][name])
    except (KeyError, TypeError):
        return float("nan")


@dataclass(frozen=True)
class Check:
    method: str
    aggregate: str
    stored: float
    rescored: float
    band: float

    @property
    def difference(self) -> float:
        return _diff(self.stored, self.rescored)

    @property
    def ok(self) -> bool:
        return math.isfinite(self.band) and self.difference <= self.band


def verify(model: nn.Module, imageset, doc: dict, *, progress: bool = True) -> list[Check]:
    """Re-score ``doc``'s model on this machine with the stored config and draws (no accuracies) and
    check every banded aggregate against its stored band. A result without a band fails every check."""
    new = point_values(_rescore(model, imageset, config_of(doc), progress=progress))
    stored = point_values(doc)
    return [Check(m, k, v, new[m][k], band_of(doc, m, k)) for m, vals in stored.items() for k, v in vals.items()]


def checks_table(checks: list[Check]) -> str:
    lines = [f"{'method':6} {'aggregate':16} {'stored':>12} {'re-scored':>12} {'|diff|':>10} {'band':>10}  status"]
    for c in checks:
        lines.append(f"{c.method:6} {c.aggregate:16} {c.stored:12.6g} {c.rescored:12.6g} {c.difference:10.3g} "
                     f"{c.band:10.3g}  {'ok' if c.ok else 'OUTSIDE BAND' if math.isfinite(c.band) else 'no band'}")
    return "\n".join(lines)


def max_band(docs: list[dict], name: str) -> float:
    """The largest stored band of ``name`` over results and methods (NaN when none has one)."""
    vals = [band_of(d, m, name) for d in docs for m in d.get("summary", {})]
    vals = [v for v in vals if math.isfinite(v)]
    return max(vals) if vals else float("nan")


__all__ = ["Check", "band_of", "checks_table", "config_of", "float64_model", "max_band", "numerical_band",
           "point_values", "ulp_model", "verify"]
