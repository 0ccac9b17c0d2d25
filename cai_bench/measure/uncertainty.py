"""How far an estimate may be off: an interval that holds the model's own error, as measured against runs.

The simulation's spread over trials says how the draws of measured units vary; it says nothing of what the model
leaves out (a run's other overheads, a different machine, stragglers a profile never saw). So every estimate's
interval is made from the model's error on measured runs of the same backend, by split conformal prediction:

- each validation point (a measured run predicted without itself) gives a score ``|ln(measured / predicted p50)|``;
- with ``n`` scores and a target coverage ``c``, the factor ``F`` is ``exp`` of the ``ceil((n + 1) c)``-th smallest
  score (no finite factor when that rank exceeds ``n``: too few points to promise ``c``);
- the interval is ``[min(p50 / F, p10), max(p50 * F, p90)]``: the model's error, widened where the trials spread
  further.

Beyond the data the model was calibrated on, its error grows. So a point's score is divided by its stretch,
``1 + ln(x)`` for an extrapolation factor ``x`` (the size predicted over the largest calibrated, 1 within the
range), and an estimate at factor ``x`` gets ``F`` raised to its own stretch: split conformal on scores
normalised by the extrapolation. That ``ln`` is a choice, not a fit: it says the error grows with each tenfold
of extrapolation by what it was within the range.

Where the points are exchangeable with the run estimated, such an interval covers it with probability at least
``c``. How often it did is measured too: each point against the interval made from the other points' scores
(``leave_one_out_coverage``). Pure arithmetic: it imports nothing of the tool.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

TARGET_COVERAGE = 0.8


@dataclass(frozen=True)
class Point:
    """A measured run and its prediction (the simulation's p10, p50 and p90)."""

    measured_s: float
    p10_s: float
    p50_s: float
    p90_s: float
    stretch: float = 1.0  # 1 + ln of its extrapolation factor (1 within the calibrated range)

    @property
    def score(self) -> float:
        return abs(math.log(self.measured_s / self.p50_s)) / self.stretch


def stretch(extrapolation: float | None) -> float:
    """``1 + ln(x)`` for an extrapolation factor ``x`` above 1; 1 within the calibrated range (or unknown)."""
    return 1.0 + math.log(extrapolation) if extrapolation and extrapolation > 1 else 1.0


def error_factor(scores: list[float], coverage: float = TARGET_COVERAGE) -> float | None:
    """``F`` of the module's docstring, None where ``len(scores)`` is too small for ``coverage``."""
    rank = math.ceil((len(scores) + 1) * coverage)
    if not scores or rank > len(scores):
        return None
    return math.exp(sorted(scores)[rank - 1])


def least_points(coverage: float = TARGET_COVERAGE) -> int:
    """The fewest validation points that give a finite factor at ``coverage``."""
    n = 1
    while math.ceil((n + 1) * coverage) > n:
        n += 1
    return n


def interval(p10_s: float, p50_s: float, p90_s: float, factor: float | None) -> tuple[float | None, float | None]:
    """The interval of the module's docstring; (None, None) without a factor."""
    if factor is None:
        return None, None
    return min(p50_s / factor, p10_s), max(p50_s * factor, p90_s)


def leave_one_out_coverage(points: list[Point], coverage: float = TARGET_COVERAGE,
                           among: list[int] | None = None) -> tuple[int, int]:  # fmt: skip
    """Of the points (those at the indices ``among``, where given) that could be bounded from all the others'
    scores, how many their interval covered: (covered, bounded)."""
    scores = [p.score for p in points]
    covered = bounded = 0
    for i in range(len(points)) if among is None else among:
        point = points[i]
        factor = error_factor(scores[:i] + scores[i + 1 :], coverage)
        low, high = interval(point.p10_s, point.p50_s, point.p90_s, None if factor is None else factor**point.stretch)
        if low is None:
            continue
        bounded += 1
        covered += low <= point.measured_s <= high
    return covered, bounded


@dataclass(frozen=True)
class ModelError:
    """A profile's error on its validation points, and what an interval made from it promises."""

    points: tuple[Point, ...]
    made_from: str  # which measured runs, predicted how
    coverage_target: float = TARGET_COVERAGE

    @property
    def factor(self) -> float | None:
        return error_factor([p.score for p in self.points], self.coverage_target)

    @property
    def median_abs_error(self) -> float | None:
        errors = sorted(abs(p.p50_s - p.measured_s) / p.measured_s for p in self.points)
        if not errors:
            return None
        mid = len(errors) // 2
        return errors[mid] if len(errors) % 2 else (errors[mid - 1] + errors[mid]) / 2

    def coverage(self) -> tuple[int, int]:
        return leave_one_out_coverage(list(self.points), self.coverage_target)

    def describe(self, extrapolation: float | None = None) -> str:
        """One line: how the interval is made and how often it covered; at ``extrapolation`` (the size estimated
        over the largest calibrated), its factor as stretched there."""
        n = len(self.points)
        if self.factor is None:
            return (f"no interval: {n} validation point(s) ({self.made_from}), at least "
                    f"{least_points(self.coverage_target)} needed for {self.coverage_target:.0%}")  # fmt: skip
        covered, bounded = self.coverage()
        at = stretch(extrapolation)
        how = f"{self.factor:.2f}"
        if at != 1:
            how = f"{self.factor**at:.2f} ({how} to the power 1 + ln {extrapolation:.3g}, the extrapolation)"
        return (f"{self.coverage_target:.0%} interval: the model's error on {n} measured point(s) held out "
                f"({self.made_from}), p50 divided and multiplied by {how}; it covered {covered} of {bounded} "
                f"points held out")  # fmt: skip

    def to_dict(self) -> dict:
        covered, bounded = self.coverage()
        return {"made_from": self.made_from, "points": len(self.points), "coverage_target": self.coverage_target,
                "factor": self.factor, "median_abs_error": self.median_abs_error,
                "covered": covered, "bounded": bounded}  # fmt: skip
