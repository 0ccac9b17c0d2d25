"""``estimate``: how long a run would take and what it would cost, simulated (``simulate.py``) from a measured
profile: the per-partition records of runs in a results store, or the CAI paper's published run.

A profile comes from one backend's finished runs. Its units give compute per sample, each unit's excess (a
straggler's delay), load per byte and cold starts; what the unit records do not hold is calibrated: per run
(the measured wall beyond the simulated one, the median over the profile's runs) for a results store, per
function for the paper (its published Map-state time of 12.6 GB in 25 MB partitions beyond the simulated one).
``docs/estimate.md`` says what the model assumes and where it stops being right.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, replace

import numpy as np

from cai_bench.backends.aws_lambda import pricing
from cai_bench.backends.aws_lambda.emulator import MAX_VCPUS, cpu_share
from cai_bench.errors import UserError
from cai_bench.machine import machine_label
from cai_bench.plan import BYTES_PER_SAMPLE, partition_count, partition_sizes, samples_for_gb, samples_per_partition
from cai_bench.published import (
    PAPER_FUNCTION_MEMORY_MB,
    load_reference,
    paper_function_records,
    published_seconds,
)
from cai_bench.results import read_records, record_point_key
from cai_bench.simulate import Profile, Scenario, Simulated, simulate
from cai_bench.store import ResultsStore

BACKENDS = ("lambda", "hpc", "gpu")
# AWS Lambda: each function scales by 1,000 execution environments every 10 seconds, up to the account's
# concurrency quota (1,000 unless raised)
LAMBDA_RAMP_EVERY, LAMBDA_RAMP_S = 1000, 10.0
DEFAULT_QUOTA = 1000
# A Distributed Map runs up to 10,000 child executions at once when its MaxConcurrency is not set
MAP_DEFAULT_CONCURRENCY = 10_000
# The paper's systems behind each backend, and which of its times the paper profile is calibrated on
PAPER_SYSTEMS = {"lambda": ("cai-lambda", "map-state-wall"), "hpc": ("hpc-cpu", "profiler-cpu"),
                 "gpu": ("hpc-gpu", "profiler-gpu")}  # fmt: skip
# The simulation holds every unit of every trial in memory at once (several float64 arrays of units x trials)
MAX_SIMULATED_UNITS = 20_000_000
HOLD_OUTS = ("run", "point")  # --validate: what a run is predicted without
PAPER_CALIBRATION = (12.6, 25.0)  # data GB, partition MB: the run the per-function records are of


def lambda_vcpus(memory_mb: float) -> float:
    """The CPU share of a function of ``memory_mb``, in vCPUs: one per 1,769 MB, at most 6 (the emulator's rule,
    on a machine with cores enough)."""
    return cpu_share(memory_mb, MAX_VCPUS)


@dataclass(frozen=True)
class Target:
    """One run to estimate."""

    backend: str
    gb: float
    partition_mb: float
    memory_mb: int | None = None  # lambda: the function's memory (default: the profile's)
    concurrency: int = DEFAULT_QUOTA  # lambda: the account's concurrency quota
    map_concurrency: int | None = None  # lambda --orchestrator stepfunctions: the Map's MaxConcurrency
    orchestrator: str = "direct"
    tasks: int | None = None  # hpc: tasks at once (SLURM array parallelism); gpu: devices (default: the profile's)
    cores_per_task: int | None = None  # hpc: the cores each task computes on (default: the profile's)


@dataclass(frozen=True)
class Prices:
    """What the estimate prices time at: Lambda's table (``pricing.py``), and the other backends' hourly prices
    (None: not priced)."""

    lambda_table: dict
    architecture: str = "x86_64"
    core_hour_usd: float | None = None
    gpu_hour_usd: float | None = None


@dataclass
class Estimate:
    backend: str
    gb: float
    partition_mb: float
    units: int
    slots: int
    wall_s_p50: float
    wall_s_p90: float
    cost_usd_p50: float | None
    cost_usd_p90: float | None
    billed_gb_s_p50: float | None
    requests: int | None
    transitions: int | None
    memory_mb: int | None
    profile: str
    trials: int
    seed: int
    simulated_s: float  # how long the simulation itself took

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------- profiles


@dataclass(frozen=True)
class BackendProfile:
    """A profile with what the estimate needs beside it: how many workers its runs had, cores per worker, the
    Lambda memory it ran at, and the measured points (data GB, partition MB, wall s, cost) to draw."""

    profile: Profile
    slots: int
    cores_per_slot: int
    memory_mb: int | None
    measured: tuple[dict, ...]


def _usable_runs(records: list[dict], backend: str) -> list[dict]:
    return [r for r in records if r.get("backend") == backend and r.get("status") == "ok"
            and r.get("kind", "run") == "run" and any(_unit_ok(w) for w in r.get("workers") or [])]  # fmt: skip


def _unit_ok(worker: dict) -> bool:
    return worker.get("samples", 0) > 0 and worker.get("compute_s", 0) > 0 and worker.get("device") != "none"


def run_slots(record: dict) -> int:
    """How many workers a stored run had at once (a worker's lanes split each of its partitions: one slot)."""
    info = record.get("backend_info") or {}
    if record.get("backend") == "lambda":
        emulated = (info.get("emulator") or {}).get("concurrency")
        caps = [c for c in (info.get("max_concurrency"), emulated) if c]
        return max(1, min(caps)) if caps else DEFAULT_QUOTA
    return max(1, int(info.get("tasks") or info.get("workers") or 1))


def run_cores_per_slot(record: dict) -> int | None:
    """The threads each worker of a run computed with, all its lanes together (None where the record does not
    say)."""
    info = record.get("backend_info") or {}
    if info.get("threads_per_worker"):
        return int(info["threads_per_worker"])
    threading = info.get("threading") or {}
    threads = threading.get("intra_op_threads")
    return int(threads) * int(threading.get("lanes") or 1) if threads else None


def run_cpu_share(record: dict) -> float | None:
    """The CPUs a worker of the run computed on: an hpc worker's threads; a Lambda function's vCPUs (its memory's
    on AWS; in the emulator its share, as far as the machine's CPUs go between the environments at once); None
    for a GPU, whose speed is not its host's CPUs'."""
    info = record.get("backend_info") or {}
    if record.get("backend") == "hpc":
        return run_cores_per_slot(record)
    if record.get("backend") != "lambda":
        return None
    if info.get("emulated") and info.get("cpu_share"):
        cpus = (record.get("environment") or {}).get("cpu_affinity")
        return min(float(info["cpu_share"]), cpus / run_slots(record)) if cpus else float(info["cpu_share"])
    return lambda_vcpus(info["memory_mb"]) if info.get("memory_mb") else None


def _invocation_gaps(record: dict) -> tuple[dict, list[float]]:
    """Lambda: each invocation's time beyond its units' own (the driver's round trip: init, the handler's imports
    and result upload): ``{request id: gap}`` of cold invocations, and the warm ones' gaps."""
    own: dict[str, float] = {}
    for w in record["workers"]:
        own[w.get("worker_id")] = own.get(w.get("worker_id"), 0.0) + w.get("total_s", 0.0)
    cold, warm = {}, []
    for inv in (record.get("backend_info") or {}).get("invocations") or []:
        if inv.get("client_s") is None or inv.get("request_id") not in own:
            continue
        gap = max(0.0, inv["client_s"] - own[inv["request_id"]])
        if inv.get("cold"):
            cold[inv["request_id"]] = gap
        else:
            warm.append(gap)
    return cold, warm


def run_units(record: dict) -> np.ndarray:
    """A stored run's units' samples, in partition order."""
    workers = sorted((w for w in record["workers"] if _unit_ok(w)), key=lambda w: w.get("partition", 0))
    return np.array([w["samples"] for w in workers], dtype=np.int64)


def _unit_draws(runs: list[dict], share: float | None) -> tuple[list, list, float]:
    """Per measured unit (samples, compute s, load s per byte), cold starts, and the per-unit time beyond the
    records (Lambda: the warm invocations' median gap); compute scaled to ``share`` where the runs' CPU shares
    differ. A cold invocation's gap beyond the warm one's is its cold start's, beside the handler's start-up."""
    gaps = [_invocation_gaps(record) for record in runs]
    warm = [g for _, warm_gaps in gaps for g in warm_gaps]
    per_unit = float(np.median(warm)) if warm else 0.0
    units, colds = [], []
    for record, (cold_gaps, _) in zip(runs, gaps, strict=True):
        scale = (run_cpu_share(record) or share) / share if share else 1.0
        for w in record["workers"]:
            if not _unit_ok(w):
                continue
            load_rate = w.get("load_s", 0.0) / (w["samples"] * BYTES_PER_SAMPLE)
            units.append((w["samples"], w["compute_s"] * scale, load_rate))
            if w.get("startup_s", 0.0) > 0:
                colds.append(w["startup_s"] + max(0.0, cold_gaps.get(w.get("worker_id"), per_unit) - per_unit))
    return units, colds, per_unit


def profile_from_records(records: list[dict], backend: str, where: str, seed: int = 0) -> BackendProfile:
    """The profile of ``backend``'s finished runs among ``records``, calibrated on their own walls."""
    runs = _usable_runs(records, backend)
    if not runs:
        raise UserError(f"{where}: no finished {backend} run with usable partition records to build a profile "
                        f"from (run one first, or use --profile paper)")  # fmt: skip
    shares = [v for v in (run_cpu_share(r) for r in runs) if v]
    share = statistics.median(shares) if shares else None
    units, colds, per_unit = _unit_draws(runs, share)
    samples = np.array([u[0] for u in units], dtype=np.float64)
    compute = np.array([u[1] for u in units])
    typical = float(np.median(compute / samples))
    profile = Profile(
        name=where, compute_s_per_sample=typical, compute_excess_s=compute - typical * samples,
        load_s_per_byte=np.array([u[2] for u in units]), cold_s=np.array(colds or [0.0]),
        unit_overhead_s=per_unit, cpu_share=share,
        facts={"runs": len(runs), "units": len(units), "cold_starts": len(colds),
               "machines": sorted({machine_label(r.get("environment") or {}) for r in runs})},
    )  # fmt: skip
    overheads = [r["summary"]["wall_s"] - float(np.median(_own_run(profile, r, 200, seed).wall_s)) for r in runs]
    profile = replace(profile, run_overhead_s=float(np.median(overheads)))
    memory = [(r.get("backend_info") or {}).get("memory_mb") for r in runs]
    return BackendProfile(profile, int(statistics.median(run_slots(r) for r in runs)), _cores_per_slot(runs),
                          next((m for m in memory if m), None), tuple(_measured_point(r) for r in runs))  # fmt: skip


def _cores_per_slot(runs: list[dict]) -> int:
    per = [c for c in (run_cores_per_slot(r) for r in runs) if c]
    return int(statistics.median(per)) if per else 1


def _measured_point(record: dict) -> dict:
    data = record["plan"]["data"]
    return {"backend": record["backend"], "gb": data["data_gb"], "partition_mb": data["partition_mb"],
            "wall_s": record["summary"]["wall_s"], "cost_usd": record["summary"].get("cost_usd"),
            "run_id": record.get("run_id")}  # fmt: skip


def _own_run(profile: Profile, record: dict, trials: int, seed: int) -> Simulated:
    """A stored run simulated as it ran: its units, its workers, its CPU share."""
    own = run_cpu_share(record)
    factor = profile.cpu_share / own if profile.cpu_share and own else 1.0
    ramp = (LAMBDA_RAMP_EVERY, LAMBDA_RAMP_S) if record.get("backend") == "lambda" else (0, 0.0)
    scenario = Scenario(run_units(record), BYTES_PER_SAMPLE, run_slots(record), *ramp, compute_factor=factor)
    return simulate(profile, scenario, trials, seed)


def _by_partition(published: dict) -> list:
    """The published points in order of partition size, then data size."""
    return sorted(published.items(), key=lambda kv: (kv[0][1] or 0, kv[0][0]))


def paper_profile(backend: str, seed: int = 0) -> BackendProfile:
    """The CAI paper's profile of ``backend``. Lambda: the 517 per-function records of its 12.6 GB / 25 MB run
    (compute only: the records hold no cold start or read), with one per-function overhead calibrated so that this
    run's simulated Map-state time is the published median of its three runs. hpc and gpu: one worker at the
    paper's samples/s over 12.6 GB (its HPC CPU node, its HPC GPU), from the same kind of calibration."""
    system, kind = PAPER_SYSTEMS[backend]
    published = published_seconds(load_reference("paper"), system, kind)
    measured = tuple({"backend": backend, "gb": gb, "partition_mb": mb, "wall_s": statistics.median(s),
                      "cost_usd": None, "run_id": f"paper {system} ({kind})"}
                     for (gb, mb), s in _by_partition(published))  # fmt: skip
    if backend != "lambda":
        seconds = statistics.median(published[(PAPER_CALIBRATION[0], None)])
        rate = seconds / samples_for_gb(PAPER_CALIBRATION[0])
        profile = Profile(f"paper ({system})", rate, np.zeros(1), np.zeros(1), np.zeros(1),
                          facts={"calibrated_on": f"{PAPER_CALIBRATION[0]} GB: {seconds} s ({kind})"})  # fmt: skip
        return BackendProfile(profile, 1, 1, None, measured)
    rows = paper_function_records()
    samples = np.array([s for s, _ in rows], dtype=np.float64)
    compute = np.array([t for _, t in rows])
    typical = float(np.median(compute / samples))
    profile = Profile("paper (CAI on AWS Lambda)", typical, compute - typical * samples, np.zeros(len(rows)),
                      np.zeros(1), cpu_share=lambda_vcpus(PAPER_FUNCTION_MEMORY_MB))  # fmt: skip
    target = statistics.median(published[PAPER_CALIBRATION])
    uncalibrated = _simulate_target(profile, Target("lambda", *PAPER_CALIBRATION), PAPER_FUNCTION_MEMORY_MB, 1, 200,
                                    seed)  # fmt: skip
    overhead = target - float(np.median(uncalibrated.wall_s))
    facts = {"functions": len(rows), "calibrated_on": f"{PAPER_CALIBRATION[0]} GB in {PAPER_CALIBRATION[1]:g} MB "
             f"partitions: {target} s (Map state, median of 3 runs)", "unit_overhead_s": overhead}  # fmt: skip
    profile = replace(profile, unit_overhead_s=overhead, facts=facts)
    return BackendProfile(profile, 1, 1, PAPER_FUNCTION_MEMORY_MB, measured)


def load_profile(source: str, backend: str, seed: int = 0, warn=None) -> BackendProfile:
    """``paper`` or a results directory's runs of ``backend``."""
    if source == "paper":
        return paper_profile(backend, seed)
    records = _stored_records(source, "to build a profile from (or use --profile paper)", warn)
    return profile_from_records(records, backend, str(source), seed)


def _stored_records(source: str, purpose: str, warn) -> list[dict]:
    store = ResultsStore(source)
    if not store.path.exists():
        raise UserError(f"{store.path}: no results store there {purpose}")
    return read_records(store, warn)


# ---------------------------------------------------------------------------------------------- estimates


def check_trials(trials: int) -> None:
    if trials < 1:
        raise UserError(f"--trials must be at least 1, got {trials}")


def check_target(target: Target) -> None:
    """One clear line for a target that cannot be simulated."""
    if target.backend not in BACKENDS:
        raise UserError(f"--backend must be among {', '.join(BACKENDS)}, got {target.backend!r}")
    samples_for_gb(target.gb)
    samples_per_partition(target.partition_mb)
    for name, value in (("--concurrency", target.concurrency), ("--map-concurrency", target.map_concurrency),
                        ("--tasks", target.tasks), ("--memory-mb", target.memory_mb),
                        ("--cores-per-task", target.cores_per_task)):  # fmt: skip
        if value is not None and value < 1:
            raise UserError(f"{name} must be at least 1, got {value}")
    if target.memory_mb is not None and not 128 <= target.memory_mb <= 10_240:
        raise UserError(f"--memory-mb must be between 128 and 10240 (Lambda's range), got {target.memory_mb}")
    if target.orchestrator not in ("direct", "stepfunctions"):
        raise UserError(f"--orchestrator must be direct or stepfunctions, got {target.orchestrator!r}")


def target_slots(target: Target, default_slots: int) -> int:
    if target.backend != "lambda":
        return target.tasks or default_slots
    if target.orchestrator == "stepfunctions":
        return min(target.concurrency, target.map_concurrency or MAP_DEFAULT_CONCURRENCY)
    return target.concurrency


def _simulate_target(profile: Profile, target: Target, memory_mb: int | None, default_slots: int, trials: int,
                     seed: int) -> Simulated:  # fmt: skip
    samples = samples_for_gb(target.gb)
    count = partition_count(samples, target.partition_mb)
    if count * trials > MAX_SIMULATED_UNITS:
        raise UserError(f"{count:,} partitions x {trials} trials is more than one simulation holds "
                        f"({MAX_SIMULATED_UNITS:,} units): use fewer --trials or a larger --partition-mb")  # fmt: skip
    units = np.array(partition_sizes(samples, target.partition_mb), dtype=np.int64)
    slots = target_slots(target, default_slots)
    if target.backend == "lambda":
        factor = profile.cpu_share / lambda_vcpus(memory_mb) if profile.cpu_share and memory_mb else 1.0
        scenario = Scenario(units, BYTES_PER_SAMPLE, slots, LAMBDA_RAMP_EVERY, LAMBDA_RAMP_S, factor)
    elif target.backend == "hpc" and target.cores_per_task and profile.cpu_share:
        scenario = Scenario(units, BYTES_PER_SAMPLE, slots, compute_factor=profile.cpu_share / target.cores_per_task)
    else:
        scenario = Scenario(units, BYTES_PER_SAMPLE, slots)
    return simulate(profile, scenario, trials, seed)


def _costs(sim: Simulated, target: Target, memory_mb: int | None, cores: int, prices: Prices) -> dict:
    """Per trial cost in US$ (None: not priced), and Lambda's billed GB-s, requests and transitions."""
    if target.backend == "lambda":
        transitions = sim.units + 1 if target.orchestrator == "stepfunctions" else 0
        costs = [pricing.total_cost(ms, sim.units, memory_mb, prices.architecture, prices.lambda_table, transitions)
                 for ms in sim.billed_ms]  # fmt: skip
        usd, gb_s = np.array([c.usd for c in costs]), np.array([c.billed_gb_s for c in costs])
        return {"usd": usd, "gb_s": gb_s, "requests": sim.units, "transitions": transitions}
    if target.backend == "hpc":  # an array task is billed its own elapsed time on its cores
        usd = None if prices.core_hour_usd is None else sim.busy_s / 3600 * cores * prices.core_hour_usd
    else:  # the GPUs are held for the whole run
        usd = None if prices.gpu_hour_usd is None else sim.wall_s / 3600 * sim.slots * prices.gpu_hour_usd
    return {"usd": usd, "gb_s": None, "requests": None, "transitions": None}


def estimate(source: BackendProfile, target: Target, prices: Prices, trials: int = 200, seed: int = 0) -> Estimate:
    """``target`` simulated ``trials`` times from ``source``: median and p90 wall and cost."""
    check_target(target)
    check_trials(trials)
    memory = target.memory_mb or source.memory_mb or (PAPER_FUNCTION_MEMORY_MB if target.backend == "lambda" else None)
    began = time.perf_counter()
    sim = _simulate_target(source.profile, target, memory, source.slots, trials, seed)
    took = time.perf_counter() - began
    cost = _costs(sim, target, memory, target.cores_per_task or source.cores_per_slot, prices)
    usd = cost["usd"]

    def p(values, q):
        return None if values is None else float(np.percentile(values, q))

    return Estimate(
        target.backend, target.gb, target.partition_mb, sim.units, sim.slots, p(sim.wall_s, 50), p(sim.wall_s, 90),
        p(usd, 50), p(usd, 90), p(cost["gb_s"], 50), cost["requests"], cost["transitions"],
        memory if target.backend == "lambda" else None, source.profile.name, trials, seed, took,
    )  # fmt: skip


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

    @property
    def error(self) -> float:
        return (self.predicted_s_p50 - self.measured_s) / self.measured_s

    def to_dict(self) -> dict:
        return {**asdict(self), "error": self.error}


def median_abs_error(checks: list[Check]) -> float | None:
    errors = [abs(c.error) for c in checks if not c.calibration]
    return float(np.median(errors)) if errors else None


def validate_store(source: str, trials: int = 200, seed: int = 0, warn=None,
                   hold_out: str = "run") -> tuple[list[Check], list[str]]:  # fmt: skip
    """``validate_store_records`` over the records of the results directory ``source``."""
    records = _stored_records(source, "to validate", warn)
    return validate_store_records(records, str(source), trials, seed, hold_out)


def validate_store_records(records: list[dict], where: str, trials: int = 200, seed: int = 0,
                           hold_out: str = "run") -> tuple[list[Check], list[str]]:  # fmt: skip
    """Each finished lambda, hpc or gpu run predicted from the profile of the others of its backend: all the
    others (``hold_out="run"``), or those of other measured points only (``"point"``: its own repeats left out
    too). The checks, and a line for each run that could not be predicted."""
    if hold_out not in HOLD_OUTS:
        raise UserError(f"--hold-out must be one of {', '.join(HOLD_OUTS)}, got {hold_out!r}")
    check_trials(trials)
    checks, skipped = [], []
    for backend in BACKENDS:
        runs = _usable_runs(records, backend)
        for run in runs:
            point = record_point_key(run)
            others = [r for r in runs if r is not run and (hold_out == "run" or record_point_key(r) != point)]
            if not others:
                skipped.append(f"{run['run_id']} ({backend}): no other {backend} {hold_out} to predict it from")
                continue
            profile = profile_from_records(others, backend, where, seed).profile
            sim = _own_run(profile, run, trials, seed)
            data = run["plan"]["data"]
            checks.append(Check(run["run_id"], backend, data["data_gb"], data["partition_mb"], run_slots(run),
                                run["summary"]["wall_s"], float(np.median(sim.wall_s)),
                                float(np.percentile(sim.wall_s, 90))))  # fmt: skip
    if not checks and not skipped:
        raise UserError(f"{where}: no finished lambda, hpc or gpu run with partition records to validate")
    return checks, skipped


def validate_paper(trials: int = 200, seed: int = 0) -> list[Check]:
    """Every published time of the paper's data-size experiment at batch 512 predicted from the paper profile,
    which is calibrated on one of them (marked)."""
    check_trials(trials)
    checks = []
    for backend, (system, kind) in PAPER_SYSTEMS.items():
        source = paper_profile(backend, seed)
        published = published_seconds(load_reference("paper"), system, kind)
        for (gb, mb), seconds in _by_partition(published):
            target = Target(backend, gb, mb or 25.0, orchestrator="stepfunctions" if backend == "lambda" else "direct")
            sim = _simulate_target(source.profile, target, source.memory_mb, source.slots, trials, seed)
            calibration = (gb, mb) == PAPER_CALIBRATION or (backend != "lambda" and gb == PAPER_CALIBRATION[0])
            checks.append(Check(f"paper {system} ({kind}), median of {len(seconds)}", backend, gb, mb, sim.slots,
                                statistics.median(seconds), float(np.median(sim.wall_s)),
                                float(np.percentile(sim.wall_s, 90)), calibration))  # fmt: skip
    return checks


# ---------------------------------------------------------------------------------------------- the command


@dataclass(frozen=True)
class EstimateRequest:
    backends: tuple[str, ...]
    gbs: tuple[float, ...]
    partition_mbs: tuple[float, ...]
    prices: Prices
    profile: str = "results"
    memory_mb: int | None = None
    concurrency: int = DEFAULT_QUOTA
    map_concurrency: int | None = None
    tasks: int | None = None
    orchestrator: str = "direct"
    trials: int = 200
    seed: int = 0
    cores_per_task: int | None = None  # hpc: cores each task computes on (default: the profile's)
    gpus: int | None = None  # gpu: devices (default: the profile's)


@dataclass
class EstimateOutcome:
    estimates: list[Estimate]
    profiles: dict  # backend -> what its profile is made of
    measured: list[dict]  # the profiles' measured points (data GB, partition MB, wall s, cost), to draw

    def to_dict(self) -> dict:
        return {"estimates": [e.to_dict() for e in self.estimates], "profiles": self.profiles,
                "measured": self.measured}  # fmt: skip


def _targets(request: EstimateRequest) -> list[Target]:
    workers = {"hpc": request.tasks, "gpu": request.gpus}
    targets = [Target(b, gb, mb, request.memory_mb, request.concurrency, request.map_concurrency,
                      request.orchestrator, workers.get(b), request.cores_per_task)
               for b in request.backends for mb in request.partition_mbs for gb in request.gbs]  # fmt: skip
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
    return {
        "name": profile.name,
        **where,
        "cpu_share": profile.cpu_share,
        "compute_s_per_sample": profile.compute_s_per_sample,
        "unit_overhead_s": profile.unit_overhead_s,
        "run_overhead_s": profile.run_overhead_s,
        **profile.facts,
    }


def estimate_command(request: EstimateRequest, warn=None) -> EstimateOutcome:
    """Every backend x partition size x data size of ``request``, from each backend's profile."""
    check_trials(request.trials)
    targets = _targets(request)
    where = profile_sources(request.profile, request.backends)
    sources = {b: load_profile(where[b], b, request.seed, warn) for b in dict.fromkeys(request.backends)}
    estimates = [estimate(sources[t.backend], t, request.prices, request.trials, request.seed) for t in targets]
    profiles = {b: _profile_facts(b, s) for b, s in sources.items()}
    measured = [m for s in sources.values() for m in s.measured]
    return EstimateOutcome(estimates, profiles, measured)
