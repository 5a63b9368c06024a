"""Time left and time limits of a scoring run (issue 30, items 4 and 6).

A scoring run is a grid of stages: per scoring batch, per method, the attribution and then each
metric. Stage costs differ by orders of magnitude (an IG SSIM stage re-computes IG at 8 noise levels;
a Gini stage is a sort), so a bar that counts stages predicts badly until the end. :class:`StageClock`
predicts each remaining stage from what has been measured:

- a stage already measured in an earlier batch: its measured seconds per image (mean so far);
- otherwise, its *work* in units of the method's attribution (``StageWork``: SSIM runs the explainer
  once per σ level, ROS once per sample, ROAD a forward pass per removal level and tie rule, Gini
  nothing) times the measured seconds of that attribution, or of one forward pass, per image;
- an attribution not measured yet: its forward-pass equivalents (VG 3, IG ``3 * ig_steps``, another
  explainer 3) times the measured forward time.

The estimate is therefore right up to the ratio of real to modelled work from the moment the first
forward pass is timed, and exact for every stage from the second batch on.

:class:`Deadline` stops a run cleanly when ``--time-limit`` is past: :class:`TimeLimitExceeded`
(one line: how far it got, that nothing was written, and the option to raise).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field


class TimeLimitExceeded(RuntimeError):
    """A scoring run went past its ``--time-limit``; nothing was written."""


@dataclass(frozen=True)
class StageWork:
    """The work of one stage per image: ``explainer`` calls of the method's explainer and ``forwards``
    forward passes (a forward and backward pass counts as 3 forwards)."""

    explainer: float = 0.0
    forwards: float = 0.0


def stage_work(stage: str, *, method: str, ig_steps: int, n_sigmas: int, ros_samples: int, road_levels: int) -> StageWork:
    """The modelled work of ``stage`` for ``method`` (see the module docstring)."""
    if stage == "attribution":
        return StageWork(forwards=3.0 * ig_steps if method == "IG" else 3.0)
    if stage == "ssim":
        return StageWork(explainer=n_sigmas, forwards=n_sigmas)
    if stage == "ros":
        return StageWork(explainer=ros_samples, forwards=ros_samples + 1)
    if stage == "road":
        return StageWork(forwards=2.0 * road_levels * 1.5)  # two tie rules; imputation ~ half a forward
    if stage == "gini":
        return StageWork()
    return StageWork(forwards=1.0)  # a registered metric: refined as soon as it is measured


@dataclass
class StageClock:
    """Predicted seconds left of a scoring grid, refined as stages are measured.

    ``grid``: the remaining stages in order, as ``(batch_images, method, stage)``; :meth:`done` records
    one stage's measured seconds; :meth:`remaining` is the predicted seconds of the stages not done."""

    grid: list[tuple[int, str, str]]
    work: dict[tuple[str, str], StageWork]
    per_image: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    forward_per_image: float | None = None
    position: int = 0

    def forward(self, seconds: float, images: int) -> None:
        if images > 0 and seconds > 0:
            self.forward_per_image = seconds / images

    def done(self, seconds: float) -> None:
        n, method, stage = self.grid[self.position]
        self.per_image.setdefault((method, stage), []).append(seconds / max(n, 1))
        self.position += 1

    def _seconds_per_image(self, method: str, stage: str) -> float:
        seen = self.per_image.get((method, stage))
        if seen:
            return sum(seen) / len(seen)
        f = self.forward_per_image or 0.0
        w = self.work.get((method, stage), StageWork(forwards=1.0))
        attr = self.per_image.get((method, "attribution"))
        explainer = (sum(attr) / len(attr)) if attr else self.work.get((method, "attribution"), StageWork(3.0)).forwards * f
        return w.explainer * explainer + w.forwards * f

    def remaining(self) -> float:
        return sum(n * self._seconds_per_image(m, s) for n, m, s in self.grid[self.position:])


def format_seconds(s: float) -> str:
    """``3725`` -> ``'1h02m'``, ``95`` -> ``'1m35s'``, ``7.2`` -> ``'7s'``; ``'?'`` when unknown."""
    if not math.isfinite(s) or s < 0:
        return "?"
    s = int(round(s))
    if s >= 3600:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


@dataclass
class Deadline:
    """A wall-clock budget: :meth:`check` raises :class:`TimeLimitExceeded` once ``limit`` seconds
    have passed since ``start`` (no limit: never)."""

    limit: float | None
    start: float = field(default_factory=time.monotonic)

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def check(self, where: str) -> None:
        if self.limit is not None and self.elapsed() > self.limit:
            raise TimeLimitExceeded(
                f"stopped after {self.elapsed():.0f} s, past the time limit of {self.limit:.0f} s, {where}; nothing "
                "was written for this model (raise --time-limit, or leave it out for no limit)")


__all__ = ["Deadline", "StageClock", "StageWork", "TimeLimitExceeded", "format_seconds", "stage_work"]
