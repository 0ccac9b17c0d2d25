"""``estimate``: how long a run would take and what it would cost, simulated (``measure/simulate.py``) from a measured
profile: the per-partition records of runs in a results store, or the CAI paper's published run.

A profile comes from one backend's finished runs. Its units give compute per sample, each unit's excess (a
straggler's delay), load per byte and cold starts; what the unit records do not hold is calibrated: per run
(the measured wall beyond the simulated one, the median over the profile's runs) for a results store, per
function for the paper (its published Map-state time of 12.6 GB in 25 MB partitions beyond the simulated one).

Every estimate names its kind of time (wall clock, or compute only where a profile holds nothing else) and
carries an interval made from the model's own error on measured runs of its backend (``measure/uncertainty.py``).
``docs/estimate.md`` says what the model assumes and where it stops being right.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from cai_bench.analysis.estimate_checks import EXTRAPOLATE_FROM_GB, model_error, validate_paper, validate_store_records
from cai_bench.analysis.estimate_model import (
    BACKENDS,
    DEFAULT_QUOTA,
    PAPER_SYSTEMS,
    Prices,
    Target,
    check_target,
    check_trials,
    cost_items,
    is_array,
    median_trial,
    price_assumptions,
    simulate_target,
)
from cai_bench.analysis.estimate_profiles import (
    BackendProfile,
    check_predicted,
    paper_profile,
    profile_from_records,
    profile_runs,
    run_group,
    stored_records,
)
from cai_bench.analysis.published import PAPER_FUNCTION_MEMORY_MB
from cai_bench.core.errors import UserError
from cai_bench.core.plan import samples_for_gb
from cai_bench.measure.time_kinds import COMPUTE, TIME_KINDS, WALL
from cai_bench.measure.uncertainty import ModelError, stretch
from cai_bench.measure.uncertainty import interval as uncertainty_interval


@dataclass(kw_only=True)
class Estimate:
    """One setting's simulated time and cost. Every time is of ``time_kind`` (WALL or COMPUTE), and the JSON names
    its fields by that kind (``wall_s_p50`` or ``compute_s_p50``), so that a compute-only figure is never read as a
    wall clock."""

    backend: str
    gb: float
    partition_mb: float
    units: int
    slots: int
    time_kind: str
    time_s_p50: float  # the simulation's median
    time_s_p90: float
    time_s_low: float | None  # the interval with the model's error (None: too few validation points)
    time_s_high: float | None
    interval: str  # how the interval was made and how often it covered
    cost_usd_p50: float | None
    cost_usd_high: float | None  # the cost of a run as long as time_s_high (its durations scaled, fees as they are)
    cost: dict  # the itemised cost of the median-cost trial
    prices: dict  # the price assumptions used
    billed_gb_s_p50: float | None
    requests: int | None
    transitions: int | None
    memory_mb: int | None
    array_tasks: int | None  # hpc arrays: the array's size (slots: the tasks at once)
    profile: str
    trials: int
    seed: int
    simulated_s: float  # how long the simulation itself took
    samples: int = 0
    extrapolation: float = 1.0  # its data size over the largest its profile was calibrated on
    terms: dict = field(default_factory=dict)  # where the median trial's time went (simulate.TERMS), seconds
    map_retries_exhausted: float = 0.0  # the median trial's Map children throttled past their last retry

    def to_dict(self) -> dict:
        return {k.replace("time_s_", f"{self.time_kind}_s_", 1): v for k, v in asdict(self).items()}

    @property
    def label(self) -> str:
        """backend and its setting, as a table row or a figure's legend names it."""
        if self.backend == "lambda":
            return f"lambda {self.memory_mb:,} MB x{self.slots:,}"
        if self.array_tasks:
            return f"hpc array {self.array_tasks:,} tasks, {self.slots:,} at once"
        return f"{self.backend} x{self.slots:,}"


def load_profile(source: str, backend: str, seed: int = 0, warn=None, prefer_array: bool = False) -> BackendProfile:
    """``paper`` or a results directory's runs of ``backend`` (``profile_runs``), with the model's error on its
    validation points: the paper's other published times of that backend, or each stored run predicted from the
    others of its group."""
    if source == "paper":
        checks = validate_paper(seed=seed, backends=(backend,))
        system, kind = PAPER_SYSTEMS[backend]
        made_from = (f"{len(checks)} predictions of the paper's published {system} times ({kind}), each from the "
                     f"profile calibrated without its size, or on the sizes up to {EXTRAPOLATE_FROM_GB:g} GB "
                     "only")  # fmt: skip
        return replace(paper_profile(backend, seed), error=model_error(checks, made_from))
    records = stored_records(source, "to build a profile from (or use --profile paper)", warn)
    return load_profile_from_records(records, backend, str(source), seed, prefer_array)


def load_profile_from_records(records: list[dict], backend: str, source: str, seed: int = 0,
                              prefer_array: bool = False) -> BackendProfile:  # fmt: skip
    """``load_profile`` of a store's ``records``: each run validated without the repeats of its own point, so
    that repeats that sit together do not make the interval narrow."""
    runs = profile_runs(records, backend, prefer_array) or records  # none: profile_from_records says so
    profile = profile_from_records(runs, backend, str(source), seed)
    checks, _ = validate_store_records(runs, str(source), seed=seed, backends=(backend,), hold_out="point")
    group = run_group(runs[0]) if runs else backend
    made_from = f"{len(checks)} {group} run(s) of {source}, each predicted from the other points' runs"
    return replace(profile, error=model_error(checks, made_from))


FIXED_FEES = ("request_usd", "transitions_usd", "s3_usd")  # the cost items a run's length does not change


def estimate(source: BackendProfile, target: Target, prices: Prices, trials: int = 200, seed: int = 0) -> Estimate:
    """``target`` simulated ``trials`` times from ``source``: the median, p90 and the interval with the model's
    error, and the itemised cost."""
    check_target(target)
    check_trials(trials)
    memory = target.memory_mb or source.memory_mb or (PAPER_FUNCTION_MEMORY_MB if target.backend == "lambda" else None)
    began = time.perf_counter()
    sim = simulate_target(source.profile, target, memory, source.slots, trials, seed, source.array)
    took = time.perf_counter() - began
    array = is_array(target, source.array)
    cores = target.cores_per_task or source.cores_per_slot
    items = median_trial(cost_items(sim, target, memory, cores, array, prices), sim)
    samples = samples_for_gb(target.gb)  # the partitions split exactly these
    if items["usd"] is not None:
        items["usd_per_million_galaxies"] = items["usd"] / samples * 1e6
    p10, p50, p90 = (float(np.percentile(sim.wall_s, q)) for q in (10, 50, 90))
    check_predicted(p50, f"{target.backend} {target.gb:g} GB")
    error = source.error or ModelError((), "no validation")
    extrapolation = target.gb / source.largest_gb if source.largest_gb else 1.0
    factor = None if error.factor is None else error.factor ** stretch(extrapolation)
    low, high = uncertainty_interval(p10, p50, p90, factor)
    usd = items["usd"]
    # a longer run bills more duration, not more requests, transitions or S3 calls: only durations scale
    fixed = sum(items.get(name) or 0.0 for name in FIXED_FEES)
    usd_high = None if usd is None or high is None else fixed + (usd - fixed) * high / p50
    return Estimate(
        backend=target.backend,
        gb=target.gb,
        partition_mb=target.partition_mb,
        units=sim.units,
        slots=sim.slots,
        time_kind=source.time_kind,
        time_s_p50=p50,
        time_s_p90=p90,
        time_s_low=low,
        time_s_high=high,
        interval=error.describe(extrapolation),
        cost_usd_p50=usd,
        cost_usd_high=usd_high,
        cost=items,
        prices=price_assumptions(target, cores, prices, array),
        billed_gb_s_p50=items.get("billed_gb_s"),
        requests=_whole(items.get("requests")),
        transitions=_whole(items.get("transitions")),
        memory_mb=memory if target.backend == "lambda" else None,
        array_tasks=int(sim.created[0]) if array else None,
        profile=source.profile.name,
        trials=trials,
        seed=seed,
        simulated_s=took,
        samples=samples,
        extrapolation=extrapolation,
        terms=median_terms(sim),
        map_retries_exhausted=float(np.median(sim.exhausted)) if sim.exhausted is not None else 0.0,
    )


def median_terms(sim) -> dict:
    """The terms of the trial whose wall is the median: where its time went."""
    at = int(np.argsort(sim.wall_s)[(len(sim.wall_s) - 1) // 2])
    return {name: float(values[at]) for name, values in sim.terms.items()}


def _whole(count: float | None) -> int | None:
    return None if count is None else int(count)


# ---------------------------------------------------------------------------------------------- the command


@dataclass(frozen=True)
class EstimateRequest:
    """Every combination of its lists is a target: backends x partition sizes x data sizes, and per backend its
    settings (Lambda memory and concurrency, hpc tasks at once, gpu devices)."""

    backends: tuple[str, ...]
    gbs: tuple[float, ...]
    partition_mbs: tuple[float, ...]
    prices: Prices
    profile: str = "results"
    memory_mbs: tuple[int | None, ...] = (None,)
    concurrencies: tuple[int, ...] = (DEFAULT_QUOTA,)
    map_concurrency: int | None = None
    tasks: tuple[int | None, ...] = (None,)
    orchestrator: str = "direct"
    trials: int = 200
    seed: int = 0
    cores_per_task: int | None = None  # hpc: cores each task computes on (default: the profile's)
    gpus: tuple[int | None, ...] = (None,)  # gpu: devices (default: the profile's)
    array_tasks: int | None = None  # hpc: the array's size
    launch_per_s: float | None = None
    shared_read_gbps: float | None = None
    terms: tuple[tuple[str, float], ...] = ()  # --term NAME=VALUE (estimate_terms)


@dataclass
class EstimateOutcome:
    estimates: list[Estimate]
    profiles: dict  # backend -> what its profile is made of
    measured: list[dict]  # the profiles' measured points (data GB, partition MB, wall s, cost), to draw

    def to_dict(self) -> dict:
        return {"estimates": [e.to_dict() for e in self.estimates], "profiles": self.profiles,
                "measured": self.measured, "time_kinds": {k: TIME_KINDS[k].text for k in (WALL, COMPUTE)}}  # fmt: skip


def _settings(request: EstimateRequest, backend: str) -> list[dict]:
    """Each combination of ``backend``'s own settings in ``request``."""
    if backend == "lambda":
        return [{"memory_mb": m, "concurrency": c} for m in request.memory_mbs for c in request.concurrencies]
    if backend == "hpc":
        return [{"tasks": t, "cores_per_task": request.cores_per_task, "array_tasks": request.array_tasks,
                 "launch_per_s": request.launch_per_s, "shared_read_gbps": request.shared_read_gbps}
                for t in request.tasks]  # fmt: skip
    return [{"tasks": g} for g in request.gpus]


def _targets(request: EstimateRequest) -> list[Target]:
    targets = [Target(b, gb, mb, map_concurrency=request.map_concurrency, orchestrator=request.orchestrator,
                      terms=request.terms, **setting)
               for b in request.backends for setting in _settings(request, b) for mb in request.partition_mbs
               for gb in request.gbs]  # fmt: skip
    for target in targets:
        check_target(target)  # every target before any profile is read
    return targets


def profile_sources(text: str, backends: tuple[str, ...]) -> dict[str, str]:
    """``--profile``: one source for every backend (``paper`` or a results directory), or one per backend
    (``lambda=paper,hpc=results/hpc``)."""
    if "=" not in text:
        return dict.fromkeys(backends, text)
    found = {}
    for item in (t.strip() for t in text.split(",") if t.strip()):
        backend, _, source = item.partition("=")
        if backend not in BACKENDS or not source:
            raise UserError(f"--profile takes paper, a results directory, or backend=source pairs, got {item!r}")
        found[backend] = source
    missing = [b for b in backends if b not in found]
    if missing:
        raise UserError(f"--profile names no source for {', '.join(missing)}")
    return found


def _profile_facts(backend: str, source: BackendProfile) -> dict:
    """What a profile is made of, as the command shows it."""
    where = (
        {"memory_mb": source.memory_mb}
        if backend == "lambda"
        else {"workers": source.slots, "cores_per_worker": source.cores_per_slot}
    )
    profile = source.profile
    array = {"array_runs": source.array.runs, "array_launch_per_s": source.array.launch_per_s} if source.array else {}
    return {
        "name": profile.name,
        "time_kind": source.time_kind,
        **where,
        "cpu_share": profile.cpu_share,
        "compute_s_per_sample": profile.compute_s_per_sample,
        "unit_overhead_s": profile.unit_overhead_s,
        "run_overhead_s": profile.run_overhead_s,
        **array,
        **profile.facts,
        "model_error": source.error.to_dict() if source.error else None,
    }


def load_sources(request: EstimateRequest, warn=None) -> dict[str, BackendProfile]:
    where = profile_sources(request.profile, request.backends)
    array = request.array_tasks is not None
    return {b: load_profile(where[b], b, request.seed, warn, array) for b in dict.fromkeys(request.backends)}


def estimate_command(request: EstimateRequest, warn=None,
                     sources: dict[str, BackendProfile] | None = None) -> EstimateOutcome:  # fmt: skip
    """Every target of ``request``, each from its backend's profile."""
    check_trials(request.trials)
    targets = _targets(request)
    sources = sources or load_sources(request, warn)
    estimates = [estimate(sources[t.backend], t, request.prices, request.trials, request.seed) for t in targets]
    profiles = {b: _profile_facts(b, s) for b, s in sources.items()}
    measured = [m for s in sources.values() for m in s.measured]
    return EstimateOutcome(estimates, profiles, measured)
