"""``cai-bench compare BASELINE CANDIDATE``: did the candidate get slower (or dearer) than the baseline, beyond the
noise of both? What a CI job can gate on, as asv's ``continuous -f`` does.

A side is a results directory, a git commit the records name (``environment.git_commit``, a prefix of at least 7
hex digits, looked up in ``--results``), or a filter over ``--results`` (``backend=hpc,workers=2``: each key a
record's backend, a plan field or a backend option, each value as the command line gives it). Points are
matched by identity (``results.point_key``: the plan in the precision that ran, on the same machine), less the
keys either side's filter names, so ``workers=1`` and ``workers=2`` compare the same points with one change.

Each matched point's repeats are compared by the Mann-Whitney U test, one-sided: exact (every assignment of the
pooled values to the two sides counted, ties included) up to 25 repeats a side, else its normal approximation. A
point is worse beyond the noise when the candidate's median is worse than the factor allows and p <= ALPHA.

A gate that cannot fail is not a pass: with n and m repeats the smallest p is 1 / C(n + m, n), so fewer than
three a side can never reach ALPHA (1/20 at three). Such points are reported with the repeats they need; a
comparison where no point matched, or none could fail, is refused (one line, exit 2) and says why: which side is
empty, or which identity keys (the machine, a plan field) differ between the sides and how to match across them
(``--across KEY``).

Only valid measurements are compared: a point whose repeats the validity rules call INVALID (too short, too few
galaxies, unchecked accuracy) is listed as not comparable, and where no valid point is left the comparison is
refused. With many points, some would pass ALPHA by chance alone: the p-values of the points that can fail are
adjusted by Holm's step-down method, which keeps the chance of any false alarm at ALPHA. A point the baseline
measured and the candidate did not fails the gate unless ``--allow-missing``; a point only the candidate has is
listed. A record that appears twice (the same run id: merged stores) counts once, and is reported.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from cai_bench.analysis.report import engine_label
from cai_bench.analysis.results import ran_precision, read_finished_runs, record_point_key
from cai_bench.analysis.validity import point_failures
from cai_bench.core.errors import UserError
from cai_bench.store.jsonl import ResultsStore

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
    duplicates: int = 0  # records dropped because another had their run id


@dataclass
class PointComparison:
    label: str
    baseline: list[float]
    candidate: list[float]
    ratio: float  # candidate median / baseline median
    worse_by: float  # the ratio in the worse direction: above 1 is worse, whatever the metric
    p_value: float  # that the candidate is not worse, by TEST_NAME
    regressed: bool  # worse than the factor allows, beyond the noise
    can_fail: bool = True  # enough repeats for p to reach ALPHA at all
    needs: str | None = None  # where it cannot: the repeats it needs
    invalid: list[str] = field(default_factory=list)  # "baseline: why", "candidate: why" (validity)
    p_holm: float | None = None  # p adjusted over the points that can fail (Holm); None where not compared

    @property
    def comparable(self) -> bool:
        return not self.invalid


@dataclass
class Comparison:
    baseline: str
    candidate: str
    metric: str
    factor: float
    points: list[PointComparison] = field(default_factory=list)
    only_baseline: list[str] = field(default_factory=list)
    only_candidate: list[str] = field(default_factory=list)
    allow_missing: bool = False
    duplicates: int = 0

    @property
    def regressions(self) -> list[PointComparison]:
        return [p for p in self.points if p.regressed]

    @property
    def missing(self) -> list[str]:
        """The baseline's points the candidate lacks, where they fail the gate (without --allow-missing)."""
        return [] if self.allow_missing else self.only_baseline

    @property
    def failed(self) -> bool:
        return bool(self.regressions or self.missing)

    @property
    def family(self) -> list[PointComparison]:
        """The points whose p-values Holm's correction adjusts: valid, and with repeats enough to fail."""
        return [p for p in self.points if p.comparable and p.can_fail]

    def to_dict(self) -> dict:
        done = {"baseline": self.baseline, "candidate": self.candidate, "metric": self.metric, "factor": self.factor,
                "test": TEST_NAME, "alpha": ALPHA, "correction": f"Holm over {len(self.family)} point(s)",
                "points": [{**vars(p), "comparable": p.comparable} for p in self.points],
                "cannot_fail": sum(not p.can_fail for p in self.points),
                "not_comparable": sum(not p.comparable for p in self.points),
                "only_baseline": self.only_baseline, "only_candidate": self.only_candidate,
                "missing_fail": bool(self.missing), "duplicates": self.duplicates,
                "regressions": len(self.regressions), "failed": self.failed}  # fmt: skip
        return finite_or_none(done)


def finite_or_none(value):
    """``value`` with every infinite or NaN float made None: JSON has no Infinity, and a reader must not guess."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def _once(records: list[dict]) -> tuple[list[dict], int]:
    """Each run id's first record, and how many were dropped as copies of one before."""
    seen, kept = set(), []
    for record in records:
        run_id = record.get("run_id")
        if run_id in seen:
            continue
        seen.add(run_id)
        kept.append(record)
    return kept, len(records) - len(kept)


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


def _filter_keys(records: list[dict]) -> list[str]:
    """The keys a filter can name in ``records``: the backend, the plan's plain fields, the backend options."""
    keys = {"backend"}
    for record in records:
        plan = record.get("plan") or {}
        keys |= {k for k, v in plan.items() if k != "backend_options" and not isinstance(v, (dict, list))}
        keys |= set(plan.get("backend_options") or {})
    return sorted(keys)


def _unknown_key(spec: str, pairs: dict[str, str], records: list[dict], results: str | Path) -> None:
    """A filter key that no record holds is a mistake, not a side with no runs: name the keys there are."""
    for key in pairs:
        if all(_field(r, key) is None for r in records):
            known = ", ".join(_filter_keys(records))
            raise UserError(f"{spec}: no finished run in {results} has {key!r}; a filter names one of: {known}")


def load_side(spec: str, results: str | Path, warn=None) -> Side:
    """The finished timing runs ``spec`` names: a results directory, a git commit in ``results``, or a filter."""
    if Path(spec).is_dir():
        kept, copies = _once(read_finished_runs(ResultsStore(spec), warn))
        return Side(spec, kept, duplicates=copies)
    finished = read_finished_runs(ResultsStore(results), warn)
    if "=" in spec:
        pairs = _filter(spec)
        _unknown_key(spec, pairs, finished, results)
        kept, copies = _once([r for r in finished if _matches(r, pairs)])
        return Side(spec, kept, tuple(pairs), copies)
    if _COMMIT.fullmatch(spec):
        named = [r for r in finished if str((r.get("environment") or {}).get("git_commit") or "").startswith(spec)]
        if not named:
            raise UserError(f"{spec}: no finished run in {results} names that git commit")
        kept, copies = _once(named)
        return Side(spec, kept, duplicates=copies)
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
def _u2_counts(groups: tuple[int, ...], n: int) -> dict[int, int]:
    """Over every way to pick which ``n`` of the pooled values are x's (the values in ascending ``groups`` of tied
    ones), how many give each 2U (two points per (x, y) pair with x > y, one per tie)."""
    states: dict[tuple[int, int], int] = {(0, 0): 1}  # (x's so far, 2U) -> ways
    seen = 0
    for tied in groups:
        nxt: dict[tuple[int, int], int] = {}
        for (xs, u2), ways in states.items():
            ys = seen - xs
            for picked in range(max(0, tied - (sum(groups) - n - ys)), min(tied, n - xs) + 1):
                gain = picked * 2 * ys + picked * (tied - picked)  # beats every smaller y, ties the tied y's
                key = (xs + picked, u2 + gain)
                nxt[key] = nxt.get(key, 0) + ways * math.comb(tied, picked)
        states, seen = nxt, seen + tied
    return {u2: ways for (xs, u2), ways in states.items() if xs == n}


def p_greater(xs: list[float], ys: list[float]) -> float:
    """One-sided p-value that the xs are not larger than the ys (Mann-Whitney U): exact, ties included, for up to
    25 values a side (every assignment of the pooled values counted), else the normal approximation with the tie
    correction."""
    n, m = len(xs), len(ys)
    if not n or not m:
        return 1.0
    u2 = sum(2 if x > y else 1 if x == y else 0 for x in xs for y in ys)
    values = sorted(xs + ys)
    if n <= 25 and m <= 25:
        groups = tuple(values.count(v) for v in sorted(set(values)))
        counts = _u2_counts(groups, n)
        return sum(ways for u, ways in counts.items() if u >= u2) / math.comb(n + m, n)
    ties = sum(t**3 - t for t in (values.count(v) for v in set(values)))
    variance = n * m / 12 * ((n + m + 1) - ties / ((n + m) * (n + m - 1)))
    if variance <= 0:
        return 1.0
    z = (u2 / 2 - n * m / 2 - 0.5) / math.sqrt(variance)  # continuity-corrected
    return 0.5 * math.erfc(z / math.sqrt(2))


def smallest_p(n: int, m: int) -> float:
    """The smallest one-sided p that n and m repeats can give: one assignment of C(n + m, n)."""
    return 1 / math.comb(n + m, n)


def repeats_needed(n: int, m: int) -> str:
    """What n and m repeats would need for p to reach ALPHA: more on the smaller side, or both to three."""
    more = next(k for k in range(max(n, m), 100) if smallest_p(min(n, m), k) <= ALPHA)
    if more < 100 and min(n, m) > 0:
        return f"{min(n, m)} and {more} repeats, or 3 a side (now {n} and {m}: p >= {smallest_p(n, m):.2g})"
    return f"3 repeats a side (now {n} and {m})"


def _values(records: list[dict], metric: str) -> list[float]:
    """The metric of each record that holds a finite number for it (a nulled or missing figure is no repeat)."""
    name = METRICS[metric][0]
    found = [(r.get("summary") or {}).get(name) for r in records]
    return [float(v) for v in found if isinstance(v, (int, float)) and math.isfinite(v)]


def _holm(points: list[PointComparison], factor: float) -> None:
    """Each point's p adjusted by Holm's step-down over ``points``, and whether it regressed: worse than
    ``factor`` with the adjusted p at most ALPHA."""
    ranked = sorted(points, key=lambda p: p.p_value)
    running = 0.0
    for rank, point in enumerate(ranked):
        running = max(running, min(1.0, (len(ranked) - rank) * point.p_value))  # adjusted p never falls
        point.p_holm = running
        point.regressed = point.worse_by > factor and running <= ALPHA


def compare_point(label: str, baseline: list[float], candidate: list[float], metric: str,
                  factor: float) -> PointComparison:  # fmt: skip
    more_is_better = METRICS[metric][1]
    before, after = statistics.median(baseline), statistics.median(candidate)
    ratio = after / before if before else math.inf
    worse_by = (1 / ratio if ratio else math.inf) if more_is_better else ratio
    worse, better = (baseline, candidate) if more_is_better else (candidate, baseline)
    p = p_greater(worse, better)  # the worse direction's values larger than the other's
    can_fail = smallest_p(len(baseline), len(candidate)) <= ALPHA
    needs = None if can_fail else repeats_needed(len(baseline), len(candidate))
    return PointComparison(label, baseline, candidate, ratio, worse_by, p, worse_by > factor and p <= ALPHA, can_fail,
                           needs)  # fmt: skip


def compare(baseline: Side, candidate: Side, metric: str = "wall", factor: float = 1.05,
            across: tuple[str, ...] = (), allow_missing: bool = False) -> Comparison:  # fmt: skip
    """Every point of both sides, matched by identity (less what the filters name and ``across``), compared on
    ``metric``; refused where nothing was compared or nothing could fail (``_refusal``)."""
    if metric not in METRICS:
        raise UserError(f"--metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if not (factor >= 1.0 and math.isfinite(factor)):
        raise UserError(f"--factor must be 1 or more (1.05: 5% worse fails), got {factor}")
    dropped = tuple(sorted(set(baseline.filtered) | set(candidate.filtered) | set(across)))
    groups: dict[str, dict[str, list[dict]]] = {}
    for name, side in (("baseline", baseline), ("candidate", candidate)):
        for record in side.records:
            groups.setdefault(_match_key(record, dropped), {}).setdefault(name, []).append(record)
    out = Comparison(baseline.label, candidate.label, metric, factor, allow_missing=allow_missing,
                     duplicates=baseline.duplicates + candidate.duplicates)  # fmt: skip
    for group in groups.values():
        label = _label((group.get("baseline") or group["candidate"])[-1])
        before, after = _values(group.get("baseline", []), metric), _values(group.get("candidate", []), metric)
        if before and after:
            point = compare_point(label, before, after, metric, factor)
            point.invalid = [f"{side}: {why}" for side in ("baseline", "candidate")
                             for why in point_failures(group[side])]  # fmt: skip
            out.points.append(point)
        elif before:
            out.only_baseline.append(label)
        elif after:
            out.only_candidate.append(label)
    for point in out.points:
        point.regressed = False  # decided below, over the family, never for a point not compared
    _holm(out.family, factor)
    problem = _refusal(out, baseline, candidate, dropped)
    if problem:
        raise UserError(problem)
    return out


def _refusal(out: Comparison, baseline: Side, candidate: Side, dropped: tuple[str, ...]) -> str | None:
    """Why the comparison proves nothing (None where it can): a side with nothing, no point on both sides (and
    which identity keys keep them apart), or no point with repeats enough to fail."""
    for side, labels in ((baseline, out.only_baseline), (candidate, out.only_candidate)):
        if not side.records or not (labels or out.points):
            return f"{side.label}: no finished run with a {out.metric} figure there: nothing to compare"
    if not out.points:
        differ = _keys_apart(baseline.records, candidate.records, dropped)
        how = f"; to compare across them: --across {','.join(differ)}" if differ else ""
        apart = f": the sides differ in {', '.join(differ)}" if differ else ""
        return f"no point measured on both sides{apart}{how}"
    valid = [p for p in out.points if p.comparable]
    if not valid:
        first = out.points[0]
        return (f"no matched point is a valid measurement, so nothing was compared: {first.label}: "
                f"{'; '.join(first.invalid)}")  # fmt: skip
    if not any(p.can_fail for p in valid):
        return (f"no matched point has repeats enough for the test to fail at p <= {ALPHA:g}: "
                f"{valid[0].label} needs {valid[0].needs}")  # fmt: skip
    if not any(smallest_p(len(p.baseline), len(p.candidate)) * len(out.family) <= ALPHA for p in out.family):
        return (
            f"with {len(out.family)} points, Holm's correction asks p <= {ALPHA / len(out.family):.2g} of the "
            "best of them, which their repeats cannot reach: measure more repeats a side"
        )
    return None


def _keys_apart(before: list[dict], after: list[dict], dropped: tuple[str, ...]) -> list[str]:
    """The identity keys (top level, then backend options) whose values no record of one side shares with the
    other's."""

    def values(records: list[dict]) -> dict[str, set[str]]:
        found: dict[str, set[str]] = {}
        for record in records:
            key = json.loads(_match_key(record, dropped))
            options = key.pop("backend_options", None) or {}
            for name, value in [*key.items(), *options.items()]:
                found.setdefault(name, set()).add(json.dumps(value, sort_keys=True))
        return found

    left, right = values(before), values(after)
    return sorted(k for k in left.keys() | right.keys() if not left.get(k, set()) & right.get(k, set()))


def compare_command(baseline: str, candidate: str, results: str | Path = "results", metric: str = "wall",
                    factor: float = 1.05, warn=None, across: tuple[str, ...] = (),
                    allow_missing: bool = False) -> Comparison:  # fmt: skip
    """``cai-bench compare``: both sides loaded, then ``compare``."""
    before, after = load_side(baseline, results, warn), load_side(candidate, results, warn)
    return compare(before, after, metric, factor, across, allow_missing)
