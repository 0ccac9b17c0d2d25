"""Is a result a valid measurement? As MLPerf's offline scenario and hyperfine ask, before a figure is trusted:

- it ran long enough: at least ``min_duration_s`` of wall clock per repeat (warm-up runs are never recorded);
- over enough galaxies: at least ``min_samples`` per repeat;
- and its predictions matched the fp32 reference within the tolerance its precision promises: torch fp32 is the
  reference itself; any other runtime or precision must have been checked against it (the runtime or precision
  probe's largest |dz| on its probe batch, at most PRECISION_TOLERANCE).

A record that fails any of them is INVALID, with each failed condition named; its figures are kept and shown,
marked. A point is valid when every repeat is. Cold and warm runs are not the same measurement: a Lambda run
whose every invocation found a warm environment is a point of its own (``start_kind``).
"""

from __future__ import annotations

from dataclasses import dataclass

from cai_bench.analysis.results import ran_precision, ran_runtime
from cai_bench.inference.worker import PRECISION_TOLERANCE

MIN_DURATION_S = 10.0
MIN_SAMPLES = 10_000


@dataclass(frozen=True)
class Rules:
    min_duration_s: float = MIN_DURATION_S
    min_samples: int = MIN_SAMPLES

    def to_dict(self) -> dict:
        return {"min_duration_s": self.min_duration_s, "min_samples": self.min_samples,
                "tolerance": PRECISION_TOLERANCE}  # fmt: skip


DEFAULT_RULES = Rules()


def checked_difference(record: dict) -> tuple[float | None, str]:
    """The largest |dz| from torch fp32 that a check measured for what this record ran, and where it came from."""
    plan, info = record.get("plan") or {}, record.get("backend_info") or {}
    ran, runtime = ran_precision(record), ran_runtime(record)
    for candidate in (plan.get("runtime_choice") or {}).get("candidates") or []:
        same = (candidate.get("runtime"), candidate.get("precision")) == (runtime, ran)
        if same and candidate.get("max_difference") is not None:
            return float(candidate["max_difference"]), "the runtime probe"
    probe = info.get("precision_probe") or {}
    difference = probe.get("max_difference")
    if isinstance(difference, dict):  # the GPU probe: one per candidate precision
        difference = difference.get(ran)
    if difference is not None:
        return float(difference), "the precision probe"
    return None, ""


def accuracy_failure(record: dict) -> str | None:
    """Why the record's predictions are not known to match fp32 (None: they are)."""
    ran, runtime = ran_precision(record), ran_runtime(record)
    if ran == "fp32" and runtime == "torch":
        return None  # the reference itself
    difference, where = checked_difference(record)
    if difference is None:
        if ran == "fp32":
            return None  # an fp32 export: checked against torch when it was made
        return f"{runtime} {ran} was not checked against torch fp32 (--precision auto checks it)"
    if not difference <= PRECISION_TOLERANCE:
        return f"{runtime} {ran} is {difference:.2g} from torch fp32 ({where}), over {PRECISION_TOLERANCE:g}"
    return None


def _duration_failure(record: dict, rules: Rules) -> str | None:
    wall = (record.get("summary") or {}).get("wall_s") or 0.0
    return f"ran {wall:.1f} s, under {rules.min_duration_s:g} s" if wall < rules.min_duration_s else None


def _samples_failure(record: dict, rules: Rules) -> str | None:
    samples = (record.get("summary") or {}).get("samples") or 0
    return f"{samples:,} galaxies, under {rules.min_samples:,}" if samples < rules.min_samples else None


def failures(record: dict, rules: Rules = DEFAULT_RULES) -> list[str]:
    """Each condition the record fails, as a short sentence; empty where it is valid."""
    found = (_duration_failure(record, rules), _samples_failure(record, rules), accuracy_failure(record))
    return [f for f in found if f]


def point_failures(records: list[dict], rules: Rules = DEFAULT_RULES) -> list[str]:
    """Each condition a point's repeats fail, once: its shortest repeat, its fewest galaxies, each accuracy
    failure."""
    if not records:
        return []
    shortest = min(records, key=lambda r: (r.get("summary") or {}).get("wall_s") or 0.0)
    fewest = min(records, key=lambda r: (r.get("summary") or {}).get("samples") or 0)
    duration = _duration_failure(shortest, rules)
    if duration and len(records) > 1:
        duration = f"the shortest repeat {duration}"
    found = [duration, _samples_failure(fewest, rules), *(accuracy_failure(r) for r in records)]
    return list(dict.fromkeys(f for f in found if f))


def verdict(record: dict, rules: Rules = DEFAULT_RULES) -> dict:
    """What a record carries: valid or not, each failed condition, the rules."""
    failed = failures(record, rules)
    return {"valid": not failed, "failed": failed, "rules": rules.to_dict()}


def verdict_line(failed: list[str], rules: Rules = DEFAULT_RULES) -> str:
    """One line for a person: VALID with the rules it met, or INVALID with what failed."""
    if failed:
        return "INVALID: " + "; ".join(failed)
    return (f"VALID: at least {rules.min_duration_s:g} s and {rules.min_samples:,} galaxies a repeat, predictions "
            f"within {PRECISION_TOLERANCE:g} of torch fp32")  # fmt: skip


def start_kind(record: dict) -> str:
    """``warm`` for a Lambda run none of whose invocations started an environment, else ``cold``: the two are
    never one point."""
    invocations = (record.get("backend_info") or {}).get("invocations") or []
    if record.get("backend") == "lambda" and invocations and not any(i.get("cold") for i in invocations):
        return "warm"
    return "cold"
