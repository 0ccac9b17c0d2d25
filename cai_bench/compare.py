"""``cai-bench compare BASELINE CANDIDATE``: did the candidate get slower (or dearer) than the baseline, beyond the
noise of both? What a CI job can gate on, as asv's ``continuous -f`` does.

A side is a results directory, a git commit the records name (``environment.git_commit``, a prefix of at least 7
hex digits, looked up in ``--results``), or a filter over ``--results`` (``backend=hpc,workers=2``: each key a
record's backend, a plan field or a backend option, each value as the command line gives it). Points are
matched by identity (``results.point_key``: the plan in the precision that ran, on the same machine), less the
keys either side's filter names, so ``workers=1`` and ``workers=2`` compare the same points with one change.

Each matched point's repeats are compared by the Mann-Whitney U test, one-sided, exact (no ties) or by its normal
approximation: a point is worse beyond the noise when the candidate's median is worse than the factor allows
and p <= ALPHA. Three repeats a side is the fewest that can reach it (p = 1/20). Points on one side only are
listed, never failed.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from cai_bench.errors import UserError
from cai_bench.report import engine_label
from cai_bench.results import ran_precision, read_finished_runs, record_point_key
from cai_bench.store import ResultsStore

ALPHA = 0.05
TEST_NAME = "Mann-Whitney U, one-sided"
# metric -> (where a record holds it, whether more is better)
METRICS = {"wall": ("wall_s", False), "samples_per_s": ("samples_per_s", True), "cost": ("cost_usd", False)}
_COMMIT = re.compile(r"[0-9a-f]{7,40}")


@dataclass
class Side:
    """One side of a comparison: where its records came from, and the keys its filter names."""

    label: str
    records: list[dict]
    filtered: tuple[str, ...] = ()


@dataclass
class PointComparison:
    label: str
    baseline: list[float]
    candidate: list[float]
    ratio: float  # candidate median / baseline median
    worse_by: float  # the ratio in the worse direction: above 1 is worse, whatever the metric
    p_value: float  # that the candidate is not worse, by TEST_NAME
    regressed: bool  # worse than the factor allows, beyond the noise


@dataclass
class Comparison:
    baseline: str
    candidate: str
    metric: str
    factor: float
    points: list[PointComparison] = field(default_factory=list)
    only_baseline: list[str] = field(default_factory=list)
    only_candidate: list[str] = field(default_factory=list)

    @property
    def regressions(self) -> list[PointComparison]:
        return [p for p in self.points if p.regressed]

    def to_dict(self) -> dict:
        return {"baseline": self.baseline, "candidate": self.candidate, "metric": self.metric, "factor": self.factor,
                "test": TEST_NAME, "alpha": ALPHA, "points": [vars(p) for p in self.points],
                "only_baseline": self.only_baseline, "only_candidate": self.only_candidate,
                "regressions": len(self.regressions)}  # fmt: skip


def _filter(text: str) -> dict[str, str]:
    pairs = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise UserError(f"{text!r}: a filter is KEY=VALUE pairs separated by commas (backend=hpc,workers=2)")
        pairs[key.strip()] = value.strip()
    return pairs


def _field(record: dict, key: str):
    """A record's value for a filter key: its backend, a plan field, or a backend option."""
    if key == "backend":
        return record.get("backend")
    plan = record.get("plan") or {}
    if key in plan and key != "backend_options":
        return plan[key]
    return (plan.get("backend_options") or {}).get(key)


def _matches(record: dict, pairs: dict[str, str]) -> bool:
    return all(str(_field(record, k)).lower() == v.lower() for k, v in pairs.items())


def load_side(spec: str, results: str | Path, warn=None) -> Side:
    """The finished timing runs ``spec`` names: a results directory, a git commit in ``results``, or a filter."""
    if Path(spec).is_dir():
        return Side(spec, read_finished_runs(ResultsStore(spec), warn))
    finished = read_finished_runs(ResultsStore(results), warn)
    if "=" in spec:
        pairs = _filter(spec)
        return Side(spec, [r for r in finished if _matches(r, pairs)], tuple(pairs))
    if _COMMIT.fullmatch(spec):
        named = [r for r in finished if str((r.get("environment") or {}).get("git_commit") or "").startswith(spec)]
        if not named:
            raise UserError(f"{spec}: no finished run in {results} names that git commit")
        return Side(spec, named)
    raise UserError(f"{spec}: not a results directory, a git commit (7+ hex digits) or a filter (KEY=VALUE,...)")


def _match_key(record: dict, dropped: tuple[str, ...]) -> str:
    """The record's point identity less the keys a filter names (backend options or plan fields)."""
    key = json.loads(record_point_key(record))
    for name in dropped:
        key.pop(name, None)
        (key.get("backend_options") or {}).pop(name, None)
    return json.dumps(key, sort_keys=True)


def _label(record: dict) -> str:
    """What tells the point apart: backend, data, batch, the precision that ran, engine or runtime, options."""
    plan, data = record["plan"], record["plan"]["data"]
    given = sorted((plan.get("backend_options") or {}).items())
    options = ",".join(f"{k}={v}" for k, v in given if v not in (None, False) and k != "runtime")
    extra = f" · {options}" if options else ""
    return (f"{record['backend']} · {data['data_gb']:.3g} GB · {data['partition_mb']:g} MB · batch "
            f"{plan['batch_size']} · {ran_precision(record)} · {engine_label(plan)}{extra}")  # fmt: skip


@cache
def _u_counts(n: int, m: int) -> tuple[int, ...]:
    """How many orderings of n x's and m y's give each U (the number of (x, y) pairs with x > y), 0..n*m."""
    if n == 0 or m == 0:
        return (1,)
    # the largest of all is an x (it beats every y: U gains m) or a y (U gains nothing)
    with_x, with_y = _u_counts(n - 1, m), _u_counts(n, m - 1)
    counts = [0] * (n * m + 1)
    for u, c in enumerate(with_x):
        counts[u + m] += c
    for u, c in enumerate(with_y):
        counts[u] += c
    return tuple(counts)


def p_greater(xs: list[float], ys: list[float]) -> float:
    """One-sided p-value that the xs are not larger than the ys (Mann-Whitney U): exact without ties and for up
    to 25 values a side, else the normal approximation with the tie correction."""
    n, m = len(xs), len(ys)
    if not n or not m:
        return 1.0
    u = sum(1.0 if x > y else 0.5 if x == y else 0.0 for x in xs for y in ys)
    tied = len(set(xs) | set(ys)) < n + m
    if not tied and n <= 25 and m <= 25:
        counts = _u_counts(n, m)
        return sum(counts[math.ceil(u) :]) / math.comb(n + m, n)
    values = sorted(xs + ys)
    ties = sum(t**3 - t for t in (values.count(v) for v in set(values)))
    variance = n * m / 12 * ((n + m + 1) - ties / ((n + m) * (n + m - 1)))
    if variance <= 0:
        return 1.0
    z = (u - n * m / 2 - 0.5) / math.sqrt(variance)  # continuity-corrected
    return 0.5 * math.erfc(z / math.sqrt(2))


def _values(records: list[dict], metric: str) -> list[float]:
    name = METRICS[metric][0]
    return [float(r["summary"][name]) for r in records if r["summary"].get(name) is not None]


def compare_point(label: str, baseline: list[float], candidate: list[float], metric: str,
                  factor: float) -> PointComparison:  # fmt: skip
    more_is_better = METRICS[metric][1]
    before, after = statistics.median(baseline), statistics.median(candidate)
    ratio = after / before if before else math.inf
    worse_by = (1 / ratio if ratio else math.inf) if more_is_better else ratio
    worse, better = (baseline, candidate) if more_is_better else (candidate, baseline)
    p = p_greater(worse, better)  # the worse direction's values larger than the other's
    return PointComparison(label, baseline, candidate, ratio, worse_by, p, worse_by > factor and p <= ALPHA)


def compare(baseline: Side, candidate: Side, metric: str = "wall", factor: float = 1.05) -> Comparison:
    """Every point of both sides, matched by identity (less what the filters name), compared on ``metric``."""
    if metric not in METRICS:
        raise UserError(f"--metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if not (factor >= 1.0 and math.isfinite(factor)):
        raise UserError(f"--factor must be 1 or more (1.05: 5% worse fails), got {factor}")
    dropped = tuple(sorted(set(baseline.filtered) | set(candidate.filtered)))
    groups: dict[str, dict[str, list[dict]]] = {}
    for name, side in (("baseline", baseline), ("candidate", candidate)):
        for record in side.records:
            groups.setdefault(_match_key(record, dropped), {}).setdefault(name, []).append(record)
    out = Comparison(baseline.label, candidate.label, metric, factor)
    for group in groups.values():
        label = _label((group.get("baseline") or group["candidate"])[-1])
        before, after = _values(group.get("baseline", []), metric), _values(group.get("candidate", []), metric)
        if before and after:
            out.points.append(compare_point(label, before, after, metric, factor))
        elif before:
            out.only_baseline.append(label)
        elif after:
            out.only_candidate.append(label)
    if not out.points and not out.only_baseline and not out.only_candidate:
        raise UserError(f"no finished runs with a {metric} figure on either side ({baseline.label}, {candidate.label})")
    return out


def compare_command(baseline: str, candidate: str, results: str | Path = "results", metric: str = "wall",
                    factor: float = 1.05, warn=None) -> Comparison:  # fmt: skip
    """``cai-bench compare``: both sides loaded, then ``compare``."""
    return compare(load_side(baseline, results, warn), load_side(candidate, results, warn), metric, factor)
