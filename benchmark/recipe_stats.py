"""Recipe-level claims: the training seed is the unit (PROTOCOL §8.6, "Recipes").

A claim about a *training recipe* ("G has better ROS than A", "G keeps A's sparsity") is decided
from the per-seed paired headline effects ``d_s`` (model recipe minus reference recipe, one per
training seed ``s``, in the metric's own units), not from the images of one checkpoint. With
``k`` seeds the mean ``d̄`` and ``sd`` (ddof=1) give a one-sample t statistic on ``k - 1`` degrees
of freedom.

Conventions
-----------
``side`` is +1 when the claim expects a positive effect (``Gini A > N``, ``SSIM G > A``) and -1
when it expects a negative one (``ROS G < A``: lower is better). ``delta_min`` (δ > 0) is the
smallest effect that matters (superiority) or the non-inferiority margin. The *null value* ``m0``
of the claim is 0 for superiority and ``-side·δ`` for non-inferiority, and every test is
one-sided at level ``alpha``:

- ``p``: the claim side, H0 ``side·μ <= side·m0`` (superiority ``side·μ <= 0``,
  non-inferiority ``side·μ <= -δ``);
- ``p_opposite``: the other side, H0 ``side·μ >= side·m0``;
- ``lower`` / ``upper``: the one-sided ``1 - alpha`` (95%) t bounds
  ``d̄ ∓ t_{1-alpha, k-1}·sd/√k`` (together a two-sided 90% interval). By duality
  ``p < alpha`` iff the claim-side bound excludes ``m0`` and ``p_opposite < alpha`` iff the
  opposite bound does.

Status rules
------------
``k < 2``: ``"1 seed: checkpoint only"`` (no spread, so ``sd``, the bounds and every p are NaN;
the checkpoint comparison of §8.6 is the only evidence). Otherwise, with ``q`` the Holm-adjusted
claim-side p (:func:`adjust_family`; before adjustment the raw ``p``):

========================  =====================================  =======================================
kind                      ``"holds"``                            ``"fails"``
========================  =====================================  =======================================
superiority               ``q < alpha`` AND ``side·d̄ >= δ``      opposite bound excludes 0
                                                                 (side +1: ``upper < 0``;
                                                                 side -1: ``lower > 0``)
non-inferiority           ``q < alpha`` (unadjusted: the claim-  opposite bound past the margin
                          side bound is beyond the margin,       (side +1: ``upper < -δ``;
                          side +1: ``lower > -δ``; side -1:      side -1: ``lower > δ``)
                          ``upper < δ``)
========================  =====================================  =======================================

Anything else is ``"undecided"``; in particular a significant superiority effect smaller than δ
(``side·d̄ < δ``) stays undecided. "Holds" and "fails" exclude each other (``p + p_opposite = 1``
and Holm never lowers a p). "Fails" uses the unadjusted opposite bound, as §8.6 states it.

All seeds equal (``sd == 0``, ``k >= 2``) is decided exactly, without warnings: ``sd = 0``,
``lower = upper = d̄``, ``p = 0`` when ``d̄`` is strictly on the claim side of ``m0`` and 1
otherwise, ``p_opposite = 0`` when strictly on the other side and 1 otherwise.

Power
-----
``seeds_80`` is the number of seeds a one-sided one-sample t test at level ``alpha`` needs for
80% power if the true effect were the observed one with the observed spread
(:func:`seeds_for_power`, effect = distance of ``d̄`` from ``m0`` in the claim direction:
``side·d̄`` for superiority, ``side·d̄ + δ`` for non-inferiority); ``None`` when the effect is on
the other side (or zero), beyond ``k_max`` seeds, or with one seed.

>>> t = seed_test([0.031, 0.024, 0.040, 0.028], kind="superiority", side=+1, delta_min=0.02)
>>> t.k, round(t.mean, 4), round(t.lower, 4), round(t.p, 5), t.seeds_80, t.status
(4, 0.0307, 0.0227, 0.00143, 3, 'holds')
>>> format_row(t)["bounds"], format_row(t)["d_s"]
('[+0.023, +0.039]', '+0.031, +0.024, +0.040, +0.028')
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from scipy import stats as sps

from salbench.benchmark.stats import holm

KINDS = ("superiority", "noninferiority")
ONE_SEED = "1 seed: checkpoint only"
STATUSES = ("holds", "fails", "undecided", ONE_SEED)
K_MAX = 1000
POWER = 0.8


@dataclass(frozen=True)
class SeedTest:
    """One recipe claim for one method, decided from its per-seed effects (module docstring).

    ``kind``, ``side``, ``delta_min`` and ``alpha`` are the inputs of :func:`seed_test`, kept so
    that :func:`adjust_family` can recompute the status.
    """

    kind: str
    side: int
    delta_min: float
    alpha: float
    k: int
    deltas: tuple[float, ...]
    mean: float
    sd: float
    lower: float
    upper: float
    p: float
    p_opposite: float
    p_holm: float
    seeds_80: int | None
    status: str

    @property
    def null_value(self) -> float:
        """``m0``: 0 for superiority, ``-side·δ`` for non-inferiority."""
        return _null_value(self.kind, self.side, self.delta_min)

    @property
    def effect(self) -> float:
        """Distance of the mean from the null value in the claim direction (``side·(d̄ - m0)``)."""
        return _effect(self.kind, self.side, self.delta_min, self.mean)


def _null_value(kind: str, side: int, delta_min: float) -> float:
    return 0.0 if kind == "superiority" else -side * delta_min


def _effect(kind: str, side: int, delta_min: float, mean: float) -> float:
    # written as side·d̄ (+ δ) so that d̄ = ∓δ gives exactly 0
    return side * mean + (0.0 if kind == "superiority" else delta_min)


def _check(kind: str, side: int, delta_min: float, alpha: float) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    if side not in (1, -1):
        raise ValueError(f"side must be +1 or -1, not {side!r}")
    if not (math.isfinite(delta_min) and delta_min > 0):
        raise ValueError(f"delta_min must be a finite number > 0, not {delta_min!r}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), not {alpha!r}")


def _status(kind: str, side: int, delta_min: float, alpha: float, k: int, mean: float,
            lower: float, upper: float, p_claim: float) -> str:
    """The status table of the module docstring; ``p_claim`` is the Holm p, else the raw p."""
    if k < 2:
        return ONE_SEED
    opposite = upper if side > 0 else lower  # the bound on the side the claim does not expect
    if kind == "superiority":
        if p_claim < alpha and side * mean >= delta_min:
            return "holds"
        if side * opposite < 0:
            return "fails"
    else:
        if p_claim < alpha:
            return "holds"
        if side * opposite < -delta_min:
            return "fails"
    return "undecided"


def seed_test(deltas, *, kind: str, side: int, delta_min: float, alpha: float = 0.05) -> SeedTest:
    """Decide one recipe claim from the per-seed paired effects ``deltas`` (module docstring).

    ``p_holm`` is NaN and the status uses the raw claim-side ``p`` until :func:`adjust_family`.

    >>> t = seed_test([-0.12, -0.30, -0.05], kind="superiority", side=-1, delta_min=0.1)
    >>> round(t.upper, 3), round(t.p, 3), t.status
    (0.061, 0.085, 'undecided')
    >>> seed_test([0.01, 0.01], kind="noninferiority", side=+1, delta_min=0.02).p
    0.0
    >>> seed_test([0.2], kind="superiority", side=+1, delta_min=0.02).status
    '1 seed: checkpoint only'
    """
    _check(kind, side, delta_min, alpha)
    d = np.asarray(deltas, dtype=float).ravel()
    if d.size == 0:
        raise ValueError("seed_test needs at least one per-seed effect")
    if not np.all(np.isfinite(d)):
        raise ValueError(f"every per-seed effect must be finite, got {d.tolist()}")
    k = int(d.size)
    nan = float("nan")
    if k < 2:
        mean, sd, lower, upper, p, p_opp, seeds = float(d[0]), nan, nan, nan, nan, nan, None
    elif np.all(d == d[0]):  # exact: no spread, no division by zero
        mean, sd = float(d[0]), 0.0
        lower = upper = mean
        e = _effect(kind, side, delta_min, mean)
        p, p_opp = (0.0 if e > 0 else 1.0), (0.0 if e < 0 else 1.0)
        seeds = seeds_for_power(e, 0.0, alpha=alpha)
    else:
        mean, sd = float(d.mean()), float(d.std(ddof=1))
        se = sd / math.sqrt(k)
        half = float(sps.t.ppf(1 - alpha, k - 1)) * se
        lower, upper = mean - half, mean + half
        e = _effect(kind, side, delta_min, mean)
        t = e / se
        p, p_opp = float(sps.t.sf(t, k - 1)), float(sps.t.cdf(t, k - 1))
        seeds = seeds_for_power(e, sd, alpha=alpha)
    status = _status(kind, side, delta_min, alpha, k, mean, lower, upper, p)
    return SeedTest(kind=kind, side=side, delta_min=float(delta_min), alpha=float(alpha), k=k,
                    deltas=tuple(float(x) for x in d), mean=mean, sd=sd, lower=lower, upper=upper, p=p,
                    p_opposite=p_opp, p_holm=nan, seeds_80=seeds, status=status)


def adjust_family(tests: list[SeedTest], alpha: float = 0.05) -> list[SeedTest]:
    """Holm over the claim-side p of every test of one family (one dataset and preset: every
    claim x method), in order; new SeedTests with ``p_holm`` set and the status recomputed.

    The tests are recomputed at the family's ``alpha`` (bounds and power included) when theirs
    differs. One-seed tests (p NaN) take no part in the correction and keep their status.

    >>> a = seed_test([0.03, 0.05, 0.04], kind="superiority", side=1, delta_min=0.02)
    >>> b = seed_test([0.01, -0.02, 0.02], kind="noninferiority", side=1, delta_min=0.02)
    >>> [(round(t.p, 4), round(t.p_holm, 4), t.status) for t in adjust_family([a, b])]
    [(0.0101, 0.0202, 'holds'), (0.0959, 0.0959, 'undecided')]
    """
    tests = [t if t.alpha == alpha else seed_test(t.deltas, kind=t.kind, side=t.side, delta_min=t.delta_min,
                                                  alpha=alpha) for t in tests]
    adjusted = holm([t.p for t in tests])
    return [replace(t, p_holm=q, status=_status(t.kind, t.side, t.delta_min, alpha, t.k, t.mean, t.lower, t.upper,
                                                q if t.k >= 2 else t.p))
            for t, q in zip(tests, adjusted)]


def t_power(k, effect: float, sd: float, alpha: float = 0.05):
    """Power of the one-sided one-sample t test at level ``alpha`` with ``k`` samples when the
    true effect (distance from the null value, claim direction) is ``effect`` and the SD ``sd``:
    ``1 - nct.cdf(t_{1-alpha,k-1}, df=k-1, nc=effect·√k/sd)``. ``k`` may be an array.

    >>> round(float(t_power(10, 1.0, 1.0)), 4)
    0.8975
    """
    k = np.asarray(k, dtype=float)
    return sps.nct.sf(sps.t.ppf(1 - alpha, k - 1), k - 1, effect * np.sqrt(k) / sd)


def seeds_for_power(effect: float, sd: float, alpha: float = 0.05, power: float = POWER,
                    k_max: int = K_MAX) -> int | None:
    """The smallest ``k >= 2`` at which the one-sided one-sample t test at level ``alpha`` has
    at least ``power`` (:func:`t_power`); ``None`` when ``effect <= 0`` (the effect is on the other
    side of the null value: no number of seeds helps) or when ``k_max`` seeds are not enough;
    2 when ``sd == 0`` (and ``effect > 0``).

    >>> seeds_for_power(0.5, 1.0), seeds_for_power(1.0, 1.0), seeds_for_power(-0.1, 1.0)
    (27, 8, None)
    >>> seeds_for_power(0.01, 1.0) is None, seeds_for_power(0.3, 0.0)
    (True, 2)
    """
    if not (math.isfinite(effect) and math.isfinite(sd)) or sd < 0:
        raise ValueError(f"effect must be finite and sd finite and >= 0, got effect={effect!r}, sd={sd!r}")
    if effect <= 0:
        return None
    if sd == 0:
        return 2
    ks = np.arange(2, int(k_max) + 1)
    if ks.size == 0:
        return None
    reached = t_power(ks, effect, sd, alpha) >= power
    return int(ks[np.argmax(reached)]) if reached.any() else None


def _num(x: float, decimals: int) -> str:
    return "—" if not math.isfinite(x) else f"{x:+.{decimals}f}"


def _pval(p: float) -> str:
    if not math.isfinite(p):
        return "—"
    if p == 0:
        return "0"
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def format_row(test: SeedTest, decimals: int = 3, k_max: int = K_MAX) -> dict[str, str]:
    """Printable cells of one row of ``<dataset>_pattern.md`` (PROTOCOL §8.6): ``k``, ``d_s``
    (every per-seed effect), ``mean``, ``bounds`` (``[lower, upper]``, the one-sided bounds),
    ``p``, ``p_holm``, ``seeds_80`` and ``status``. Effects print with ``decimals`` decimals and
    a sign; ``k_max`` is the limit :func:`seeds_for_power` used (printed as ``"> k_max"``).

    >>> t = seed_test([0.1, 0.2, 0.3], kind="superiority", side=-1, delta_min=0.1)
    >>> format_row(t)
    {'k': '3', 'd_s': '+0.100, +0.200, +0.300', 'mean': '+0.200', 'bounds': '[+0.031, +0.369]', \
'p': '0.963', 'p_holm': '—', 'seeds_80': 'n/a: effect on the other side', 'status': 'fails'}
    """
    if test.k < 2:
        seeds = "n/a: 1 seed"
        bounds = "—"
    else:
        bounds = f"[{_num(test.lower, decimals)}, {_num(test.upper, decimals)}]"
        if test.seeds_80 is not None:
            seeds = str(test.seeds_80)
        elif test.effect <= 0:
            seeds = "n/a: effect on the other side"
        else:
            seeds = f"> {k_max}"
    return {"k": str(test.k), "d_s": ", ".join(_num(x, decimals) for x in test.deltas),
            "mean": _num(test.mean, decimals), "bounds": bounds, "p": _pval(test.p), "p_holm": _pval(test.p_holm),
            "seeds_80": seeds, "status": test.status}
