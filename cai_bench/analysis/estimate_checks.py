"""The estimate checked against what was measured: each run (or point) of a store predicted without
itself, the paper's published runs predicted from its profile; the model's error they give."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass

import numpy as np

from cai_bench.analysis.estimate_model import (
    BACKENDS,
    HOLD_OUTS,
    PAPER_CALIBRATION,
    PAPER_SYSTEMS,
    Target,
    check_trials,
    simulate_target,
)
from cai_bench.analysis.estimate_profiles import (
    by_partition,
    check_predicted,
    own_run,
    paper_profile,
    profile_from_records,
    run_group,
    stored_records,
    usable_runs,
)
from cai_bench.analysis.published import (
    load_reference,
    published_seconds,
)
from cai_bench.analysis.results import record_point_key
from cai_bench.core.errors import UserError
from cai_bench.measure.simulate import Simulated
from cai_bench.measure.time_kinds import WALL
from cai_bench.measure.uncertainty import ModelError, Point


def model_error(checks: list[Check], made_from: str) -> ModelError:
    points = tuple(Point(c.measured_s, c.predicted_s_p10, c.predicted_s_p50, c.predicted_s_p90) for c in checks
                   if not c.calibration)  # fmt: skip
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

    @property
    def error(self) -> float:
        return (self.predicted_s_p50 - self.measured_s) / self.measured_s

    def to_dict(self) -> dict:
        return {**asdict(self), "error": self.error}


def _check(what: str, backend: str, gb: float, mb: float | None, sim: Simulated, measured_s: float,
           calibration: bool = False, kind: str = WALL, group: str = "") -> Check:  # fmt: skip
    p10, p50, p90 = (float(np.percentile(sim.wall_s, q)) for q in (10, 50, 90))
    check_predicted(p50, what)
    return Check(what, backend, gb, mb, sim.slots, measured_s, p50, p90, calibration, p10, kind, group or backend)


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
            checks.append(_check(run["run_id"], backend, data["data_gb"], data["partition_mb"], sim,
                                 run["summary"]["wall_s"], group=group))  # fmt: skip
    if not checks and not skipped and backends == BACKENDS:
        raise UserError(f"{where}: no finished lambda, hpc or gpu run with partition records to validate")
    return checks, skipped


def validate_paper(trials: int = 200, seed: int = 0, backends: tuple[str, ...] = BACKENDS) -> list[Check]:
    """Every published time of the paper's data-size experiment at batch 512 predicted from the paper profile,
    which is calibrated on one of them (marked)."""
    check_trials(trials)
    checks = []
    for backend in backends:
        system, kind = PAPER_SYSTEMS[backend]
        source = paper_profile(backend, seed)
        published = published_seconds(load_reference("paper"), system, kind)
        for (gb, mb), seconds in by_partition(published):
            target = Target(backend, gb, mb or 25.0, orchestrator="stepfunctions" if backend == "lambda" else "direct")
            sim = simulate_target(source.profile, target, source.memory_mb, source.slots, trials, seed)
            calibration = (gb, mb) == PAPER_CALIBRATION or (backend != "lambda" and gb == PAPER_CALIBRATION[0])
            checks.append(_check(f"paper {system} ({kind}), median of {len(seconds)}", backend, gb, mb, sim,
                                 statistics.median(seconds), calibration, source.time_kind))  # fmt: skip
    return checks
