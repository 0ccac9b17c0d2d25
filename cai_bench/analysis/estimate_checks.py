"""The estimate checked against what was measured: each run (or point) of a store predicted without
itself, the paper's published runs predicted from its profile; the model's error they give."""

from __future__ import annotations

import functools
import statistics
from dataclasses import asdict, dataclass, replace

import numpy as np

from cai_bench.analysis.estimate_model import (
    BACKENDS,
    HOLD_OUTS,
    PAPER_SYSTEMS,
    Target,
    check_trials,
    simulate_target,
)
from cai_bench.analysis.estimate_profiles import (
    check_predicted,
    own_run,
    paper_points,
    paper_profile,
    paper_target,
    profile_from_records,
    run_group,
    stored_records,
    usable_runs,
)
from cai_bench.analysis.results import record_point_key
from cai_bench.core.errors import UserError
from cai_bench.measure.simulate import Simulated
from cai_bench.measure.time_kinds import WALL
from cai_bench.measure.uncertainty import ModelError, Point, leave_one_out_coverage, stretch


def model_error(checks: list[Check], made_from: str) -> ModelError:
    points = tuple(Point(c.measured_s, c.predicted_s_p10, c.predicted_s_p50, c.predicted_s_p90,
                         stretch(c.extrapolation)) for c in checks if not c.calibration)  # fmt: skip
    return ModelError(points, made_from)


# ---------------------------------------------------------------------------------------------- validation


@dataclass
class Check:
    """One measured run against its prediction."""

    what: str  # the run's id, or which published figure
    backend: str
    gb: float
    partition_mb: float | None
    slots: int
    measured_s: float
    predicted_s_p50: float
    predicted_s_p90: float
    calibration: bool = False  # the point the profile was calibrated on: its error says nothing
    predicted_s_p10: float | None = None
    time_kind: str = WALL
    group: str = ""  # which runs it was predicted from (run_group): its backend's by default
    extrapolation: float = 1.0  # its data size over the largest its profile was calibrated on
    held_out: str = ""  # how: its own point left out, its size left out, or only smaller sizes calibrated on

    @property
    def error(self) -> float:
        return (self.predicted_s_p50 - self.measured_s) / self.measured_s

    def to_dict(self) -> dict:
        return {**asdict(self), "error": self.error}


def _check(what: str, backend: str, gb: float, mb: float | None, sim: Simulated, measured_s: float,
           calibration: bool = False, kind: str = WALL, group: str = "", largest_gb: float | None = None,
           held_out: str = "") -> Check:  # fmt: skip
    p10, p50, p90 = (float(np.percentile(sim.wall_s, q)) for q in (10, 50, 90))
    check_predicted(p50, what)
    extrapolation = gb / largest_gb if largest_gb else 1.0
    return Check(what, backend, gb, mb, sim.slots, measured_s, p50, p90, calibration, p10, kind, group or backend,
                 extrapolation, held_out)  # fmt: skip


# The extrapolation factors a check is counted under (size predicted over the largest calibrated)
EXTRAPOLATION_BINS = ((0.0, 1.0, "within the range (x <= 1)"), (1.0, 2.0, "1-2x"), (2.0, 4.0, "2-4x"),
                      (4.0, 10.0, "4-10x"), (10.0, float("inf"), "over 10x"))  # fmt: skip


def by_extrapolation_summary(checks: list[Check]) -> list[dict]:
    """``by_extrapolation`` of ``checks`` in one band, whatever their factors."""
    return by_extrapolation(checks, ((0.0, float("inf"), "any"),))


def by_extrapolation(checks: list[Check], bins: tuple = EXTRAPOLATION_BINS) -> list[dict]:
    """Per band of extrapolation factor: the checks in it, their median absolute error, and how many of them the
    80% interval covered, each made from the other checks' scores (normalised by their stretch)."""
    rows = []
    held = [c for c in checks if not c.calibration]
    points = list(model_error(held, "").points)
    for low, high, name in bins:
        inside = [i for i, c in enumerate(held) if low < c.extrapolation <= high or (low == 0 and c.extrapolation <= 1)]
        if not inside:
            continue
        errors = sorted(abs(held[i].error) for i in inside)
        covered, bounded = leave_one_out_coverage(points, among=inside)
        rows.append({"extrapolation": name, "checks": len(inside), "median_abs_error": statistics.median(errors),
                     "covered": covered, "bounded": bounded})  # fmt: skip
    return rows


def errors_by_backend(checks: list[Check], made_from: str) -> dict[str, ModelError]:
    """Per group of runs (a backend; SLURM arrays apart from an hpc node's runs), the model's error on its checks
    (the calibration points left out): median absolute error, the interval's factor and its leave-one-out
    coverage."""
    groups = dict.fromkeys(c.group or c.backend for c in checks)
    return {g: model_error([c for c in checks if (c.group or c.backend) == g], made_from) for g in groups}


def validate_store(source: str, trials: int = 200, seed: int = 0, warn=None,
                   hold_out: str = "point") -> tuple[list[Check], list[str]]:  # fmt: skip
    """``validate_store_records`` over the records of the results directory ``source``."""
    records = stored_records(source, "to validate", warn)
    return validate_store_records(records, str(source), trials, seed, hold_out)


def validate_store_records(records: list[dict], where: str, trials: int = 200, seed: int = 0, hold_out: str = "point",
                           backends: tuple[str, ...] = BACKENDS) -> tuple[list[Check], list[str]]:  # fmt: skip
    """Each finished lambda, hpc or gpu run predicted from the profile of the others of its group (``run_group``:
    its backend, SLURM arrays apart): those of other measured points only (``hold_out="point"``: its own repeats
    left out too, so an interval is not made narrow by repeats that sit together), or all the others (``"run"``).
    The checks, and a line for each run that could not be predicted."""
    if hold_out not in HOLD_OUTS:
        raise UserError(f"--hold-out must be one of {', '.join(HOLD_OUTS)}, got {hold_out!r}")
    check_trials(trials)
    checks, skipped = [], []
    for backend in backends:
        runs = usable_runs(records, backend)
        for run in runs:
            point, group = record_point_key(run), run_group(run)
            others = [r for r in runs if r is not run and run_group(r) == group
                      and (hold_out == "run" or record_point_key(r) != point)]  # fmt: skip
            if not others:
                skipped.append(f"{run['run_id']} ({group}): no other {group} {hold_out} to predict it from")
                continue
            source = profile_from_records(others, backend, where, seed)
            launch = source.array.launch_per_s if source.array else None
            sim = own_run(source.profile, run, trials, seed, launch)
            data = run["plan"]["data"]
            largest = max(r["plan"]["data"]["data_gb"] for r in others)
            checks.append(_check(run["run_id"], backend, data["data_gb"], data["partition_mb"], sim,
                                 run["summary"]["wall_s"], group=group, largest_gb=largest,
                                 held_out=f"its {hold_out} left out"))  # fmt: skip
    if not checks and not skipped and backends == BACKENDS:
        raise UserError(f"{where}: no finished lambda, hpc or gpu run with partition records to validate")
    return checks, skipped


# --validate paper: the sizes calibrated on, and those predicted, when the model extrapolates
EXTRAPOLATE_FROM_GB, EXTRAPOLATE_TO_GB = 4.0, 6.0


def validate_paper(trials: int = 200, seed: int = 0, backends: tuple[str, ...] = BACKENDS) -> list[Check]:
    """Every published time of the paper's data-size experiment at batch 512, predicted twice from the paper
    profile calibrated without it: from the other sizes (each size left out in turn), and from the sizes up to
    4 GB only (the sizes from 6 GB, extrapolated). Each check says how far it extrapolated."""
    check_trials(trials)
    return [replace(c) for backend in backends for c in _paper_checks_of(backend, trials, seed)]


# The published figures are the package's own: the same arguments give the same checks, and every estimate from
# the paper's profile asks for them (its interval), so they are made once per process
@functools.lru_cache(maxsize=32)
def _paper_checks_of(backend: str, trials: int, seed: int) -> tuple[Check, ...]:
    published = paper_points(backend)
    checks = []
    for size in sorted({gb for gb, _ in published}):
        others = tuple(k for k in published if k[0] != size)
        checks += _paper_checks(backend, published, others, [k for k in published if k[0] == size], trials, seed,
                                f"{size:g} GB left out")  # fmt: skip
    small = tuple(k for k in published if k[0] <= EXTRAPOLATE_FROM_GB)
    large = [k for k in published if k[0] >= EXTRAPOLATE_TO_GB]
    checks += _paper_checks(backend, published, small, large, trials, seed, f"from <= {EXTRAPOLATE_FROM_GB:g} GB")
    return tuple(checks)


def _paper_checks(backend: str, published: dict, calibrate_on: tuple, predict: list, trials: int, seed: int,
                  held_out: str) -> list[Check]:  # fmt: skip
    system, kind = PAPER_SYSTEMS[backend]
    source = paper_profile(backend, seed, calibrate_on)
    out = []
    for gb, mb in sorted(predict, key=lambda k: (k[1] or 0, k[0])):
        target = paper_target(gb, mb) if backend == "lambda" else Target(backend, gb, mb or 25.0)
        sim = simulate_target(source.profile, target, source.memory_mb, source.slots, trials, seed)
        seconds = published[(gb, mb)]
        out.append(_check(f"paper {system} ({kind}), median of {len(seconds)}", backend, gb, mb, sim,
                          statistics.median(seconds), kind=source.time_kind, largest_gb=source.largest_gb,
                          held_out=held_out))  # fmt: skip
    return out
