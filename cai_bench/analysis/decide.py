"""``estimate --deadline`` and ``--budget``: the cheapest way to run a data set that still meets a deadline.

Every combination of the request (backend, partition size, Lambda memory and concurrency, hpc tasks, gpu devices)
is estimated; a setting meets the deadline when its interval's upper bound does (the model's own error
included: ``measure/uncertainty.py``), and the budget when its cost at that bound does. Those that meet both are
ranked by their median cost; the frontier is the settings no other beats on both the upper bound and the cost.

Only wall-clock profiles answer a deadline: a profile of compute time alone (the paper's HPC CPU and GPU figures,
torch-profiler time) is left out with a line saying what to measure instead.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from cai_bench.analysis.estimate import Estimate, EstimateOutcome, EstimateRequest, estimate_command, load_sources
from cai_bench.core.errors import UserError
from cai_bench.measure.time_kinds import WALL

SCREEN_TRIALS = 50  # trials per candidate: the upper bound is mostly the model's error, not the trials' spread
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*$")
_UNIT_S = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_deadline(text: str) -> float:
    """``600``, ``600s``, ``10m`` or ``2h``: seconds."""
    found = _DURATION.match(text.lower())
    seconds = float(found.group(1)) * _UNIT_S[found.group(2)] if found else 0.0
    if seconds <= 0:
        raise UserError(f"--deadline takes a positive time such as 600, 600s, 10m or 2h, got {text!r}")
    return seconds


def parse_budget(text: str) -> float:
    """US$: ``50`` or ``$50``."""
    try:
        value = float(text.strip().lstrip("$"))
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):
        raise UserError(f"--budget takes a positive amount of US$ such as 50, got {text!r}")
    return value


@dataclass
class Setting:
    """One setting the decision weighs: its estimate, whether it meets the deadline and the budget, and if not why."""

    estimate: Estimate
    meets: bool
    why_not: str | None  # what it misses: the deadline, the budget, no interval, no price
    frontier: bool = False

    def to_dict(self) -> dict:
        return {"estimate": self.estimate.to_dict(), "meets": self.meets, "why_not": self.why_not,
                "frontier": self.frontier}  # fmt: skip


@dataclass
class Decision:
    deadline_s: float | None
    budget_usd: float | None
    candidates: list[Setting]  # the ones that meet both first, cheapest first; then the others, fastest first
    left_out: list[str]  # backends whose profile cannot answer a wall-clock deadline, and why
    outcome: EstimateOutcome
    trials: int

    @property
    def chosen(self) -> Setting | None:
        return self.candidates[0] if self.candidates and self.candidates[0].meets else None

    def to_dict(self) -> dict:
        return {"deadline_s": self.deadline_s, "budget_usd": self.budget_usd, "trials": self.trials,
                "chosen": self.chosen.to_dict() if self.chosen else None,
                "candidates": [c.to_dict() for c in self.candidates], "left_out": self.left_out,
                "profiles": self.outcome.profiles}  # fmt: skip


def _why_not(e: Estimate, deadline_s: float | None, budget_usd: float | None) -> str | None:
    if e.time_s_high is None:
        return "no upper bound (too few measured runs of its backend to bound the model's error)"
    if e.cost_usd_p50 is None:
        return "unpriced (give --core-hour-price or --gpu-hour-price, and an hpc task's cores)"
    if e.map_retries_exhausted:
        return "its Map's throttled children run out of retries: on AWS they fail (--map-concurrency at most the quota)"
    if deadline_s is not None and e.time_s_high > deadline_s:
        return f"upper bound {e.time_s_high:,.0f} s is past the deadline"
    if budget_usd is not None and e.cost_usd_high > budget_usd:
        return f"cost up to US$ {e.cost_usd_high:,.2f} is over the budget"
    return None


def frontier(estimates: list[Estimate]) -> list[Estimate]:
    """The estimates that no other beats on both the upper bound of time and the median cost, fastest first."""
    bounded = sorted((e for e in estimates if e.time_s_high is not None and e.cost_usd_p50 is not None),
                     key=lambda e: (e.time_s_high, e.cost_usd_p50))  # fmt: skip
    kept, cheapest = [], float("inf")
    for e in bounded:
        if e.cost_usd_p50 < cheapest:
            kept.append(e)
            cheapest = e.cost_usd_p50
    return kept


def _compute_only(backend: str) -> str:
    return (f"{backend}: its profile is compute time only (torch profiler), not wall clock: measure {backend} runs "
            f"(cai-bench run --backend {backend} --repeats 3 --results DIR, at two or more sizes) and give "
            f"--profile {backend}=DIR")  # fmt: skip


def decide(request: EstimateRequest, deadline_s: float | None, budget_usd: float | None, warn=None) -> Decision:
    """The candidates of ``request`` for its one data size, ranked (the module's docstring)."""
    if deadline_s is None and budget_usd is None:
        raise UserError("deciding needs --deadline or --budget")
    if len(request.gbs) != 1:
        raise UserError("--deadline and --budget rank the ways to run one data set: give one --gb")
    sources = load_sources(request, warn)
    left_out = [_compute_only(b) for b, s in sources.items() if s.time_kind != WALL]
    usable = tuple(b for b in sources if sources[b].time_kind == WALL)
    if not usable:
        raise UserError("no profile of wall-clock time to rank: " + "; ".join(left_out))
    trials = min(request.trials, SCREEN_TRIALS)
    screened = replace(request, backends=usable, trials=trials)
    outcome = estimate_command(screened, warn, {b: sources[b] for b in usable})
    on_frontier = {id(e) for e in frontier(outcome.estimates)}
    candidates = [Setting(e, why is None, why, id(e) in on_frontier)
                  for e in outcome.estimates for why in [_why_not(e, deadline_s, budget_usd)]]  # fmt: skip
    meeting = sorted((c for c in candidates if c.meets),
                     key=lambda c: (c.estimate.cost_usd_p50, c.estimate.time_s_high))  # fmt: skip
    others = sorted((c for c in candidates if not c.meets),
                    key=lambda c: (c.estimate.time_s_high is None, c.estimate.time_s_high or 0.0))  # fmt: skip
    return Decision(deadline_s, budget_usd, meeting + others, left_out, outcome, trials)
