"""``estimate``: how long a run would take and what it would cost, simulated (``simulate.py``) from a measured
profile: the per-partition records of runs in a results store, or the CAI paper's published run.

A profile comes from one backend's finished runs. Its units give compute per sample, each unit's excess (a
straggler's delay), load per byte and cold starts; what the unit records do not hold is calibrated: per run
(the measured wall beyond the simulated one, the median over the profile's runs) for a results store, per
function for the paper (its published Map-state time of 12.6 GB in 25 MB partitions beyond the simulated one).

Every estimate names its kind of time (wall clock, or compute only where a profile holds nothing else) and
carries an interval made from the model's own error on measured runs of its backend (``uncertainty.py``).
``docs/estimate.md`` says what the model assumes and where it stops being right.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass, replace

import numpy as np

from cai_bench.analysis.published import (
    PAPER_FUNCTION_MEMORY_MB,
    load_reference,
    paper_function_records,
    published_seconds,
)
from cai_bench.analysis.results import read_records, record_point_key
from cai_bench.backends.aws_lambda import pricing
from cai_bench.backends.aws_lambda.emulator import MAX_VCPUS, cpu_share
from cai_bench.core.errors import UserError
from cai_bench.core.machine import machine_label
from cai_bench.core.plan import (
    BYTES_PER_SAMPLE,
    partition_count,
    partition_sizes,
    samples_for_gb,
    samples_per_partition,
)
from cai_bench.measure.simulate import Profile, Scenario, Simulated, simulate
from cai_bench.measure.time_kinds import COMPUTE, TIME_KINDS, WALL
from cai_bench.measure.uncertainty import ModelError, Point
from cai_bench.measure.uncertainty import interval as uncertainty_interval
from cai_bench.store.jsonl import ResultsStore

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
# The kinds of time a profile predicts: never two in one answer
# SLURM arrays, where the profile's runs cannot say: a one-node cluster reads its own disk, so a parallel file
# system's bandwidth shared by every task at once is an assumption (a modest Lustre or GPFS); --shared-read-gbps
DEFAULT_SHARED_READ_GBPS = 10.0
GB = 1e9  # bandwidths in decimal GB/s, as file systems quote them


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
    array_tasks: int | None = None  # hpc: the SLURM array's size (default: the profile's kind of run)
    launch_per_s: float | None = None  # hpc arrays: tasks the scheduler starts per second (default: measured)
    shared_read_gbps: float | None = None  # hpc arrays: what all tasks at once read together, GB/s


@dataclass(frozen=True)
class Prices:
    """What the estimate prices time at: Lambda's table (``pricing.py``), and the other backends' hourly prices
    (None: not priced)."""

    lambda_table: dict
    architecture: str = "x86_64"
    core_hour_usd: float | None = None
    gpu_hour_usd: float | None = None


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
    cost_usd_high: float | None  # the cost of a run as long as time_s_high (the same factor on every duration)
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


# ---------------------------------------------------------------------------------------------- profiles


@dataclass(frozen=True)
class ArrayFacts:
    """What SLURM runs say of how a cluster starts an array: the tasks it launched per second (None: those that
    could start together did, within 10 ms), and how many array runs the profile holds."""

    launch_per_s: float | None
    runs: int


@dataclass(frozen=True)
class BackendProfile:
    """A profile with what the estimate needs beside it: how many workers its runs had, cores per worker (what a
    task occupies and is priced for; None where the source does not say), the Lambda memory it ran at, the kind
    of time it predicts, SLURM array facts, the model's error on measured runs, and the measured points (data GB,
    partition MB, wall s, cost) to draw."""

    profile: Profile
    slots: int
    cores_per_slot: int | None
    memory_mb: int | None
    measured: tuple[dict, ...]
    time_kind: str = WALL
    array: ArrayFacts | None = None
    error: ModelError | None = None


def _usable_runs(records: list[dict], backend: str) -> list[dict]:
    return [r for r in records if r.get("backend") == backend and r.get("status") == "ok"
            and r.get("kind", "run") == "run" and any(_unit_ok(w) for w in r.get("workers") or [])]  # fmt: skip


ARRAY_GROUP = "hpc (SLURM array)"


def run_group(record: dict) -> str:
    """Which runs a run is profiled and validated with: its backend's, an hpc node's apart from SLURM arrays'."""
    return ARRAY_GROUP if record.get("backend") == "hpc" and (record.get("backend_info") or {}).get("slurm") else (
        record["backend"])  # fmt: skip


def profile_runs(records: list[dict], backend: str, prefer_array: bool = False) -> list[dict]:
    """The usable runs of ``backend`` one profile is made of: for hpc, a node's runs, or SLURM arrays' where
    ``prefer_array`` (each where there are no runs of the other)."""
    runs = _usable_runs(records, backend)
    arrays = [r for r in runs if run_group(r) == ARRAY_GROUP]
    nodes = [r for r in runs if run_group(r) != ARRAY_GROUP]
    return (arrays or nodes) if prefer_array else (nodes or arrays)


def _unit_ok(worker: dict) -> bool:
    return worker.get("samples", 0) > 0 and worker.get("compute_s", 0) > 0 and worker.get("device") != "none"


def run_slots(record: dict) -> int:
    """How many workers a stored run had at once (a worker's lanes split each of its partitions: one slot)."""
    info = record.get("backend_info") or {}
    if record.get("backend") == "lambda":
        emulated = (info.get("emulator") or {}).get("concurrency")
        caps = [c for c in (info.get("max_concurrency"), emulated) if c]
        return max(1, min(caps)) if caps else DEFAULT_QUOTA
    if info.get("slurm"):
        return max(1, min(int(info.get("array_parallelism") or info["tasks"]), int(info["tasks"])))
    return max(1, int(info.get("tasks") or info.get("workers") or 1))


def run_groups(record: dict) -> tuple[int, ...] | None:
    """A SLURM array run's units per task, in order (None: not an array)."""
    info = record.get("backend_info") or {}
    if not info.get("slurm"):
        return None
    units = len(run_units(record))
    per_task = max(1, int(info.get("partitions_per_task") or 1))
    return tuple(min(per_task, units - start) for start in range(0, units, per_task))


def array_launch_rate(record: dict) -> float | None:
    """Tasks per second the scheduler started, from the first tasks that could start together (their own start
    events: the interpreter up); None where they started within 10 ms of each other or too few did."""
    info = record.get("backend_info") or {}
    offsets = sorted(info.get("task_start_offsets_s") or [])
    together = min(len(offsets), int(info.get("array_parallelism") or len(offsets)))
    if together < 2 or offsets[together - 1] - offsets[0] < 0.01:
        return None
    return (together - 1) / (offsets[together - 1] - offsets[0])


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


def unit_compute_s(worker: dict) -> float:
    """A unit's own compute: on a device, its share of the device's busy time (its ``compute_s`` there is a
    latency that overlaps its neighbours'); elsewhere its compute time."""
    busy = worker.get("busy_s")
    return float(busy) if busy is not None else float(worker["compute_s"])


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
            units.append((w["samples"], unit_compute_s(w) * scale, load_rate))
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
    arrays = [r for r in runs if run_groups(r)]
    rates = [v for v in (array_launch_rate(r) for r in arrays) if v]
    array = ArrayFacts(statistics.median(rates) if rates else None, len(arrays)) if arrays else None
    launch = array.launch_per_s if array else None
    overheads = [r["summary"]["wall_s"] - float(np.median(_own_run(profile, r, 200, seed, launch).wall_s))
                 for r in runs]  # fmt: skip
    profile = replace(profile, run_overhead_s=float(np.median(overheads)))
    memory = [(r.get("backend_info") or {}).get("memory_mb") for r in runs]
    return BackendProfile(profile, int(statistics.median(run_slots(r) for r in runs)), _cores_per_slot(runs),
                          next((m for m in memory if m), None), tuple(_measured_point(r) for r in runs),
                          array=array)  # fmt: skip


def _cores_per_slot(runs: list[dict]) -> int:
    per = [c for c in (run_cores_per_slot(r) for r in runs) if c]
    return int(statistics.median(per)) if per else 1


def _measured_point(record: dict) -> dict:
    data = record["plan"]["data"]
    return {"backend": record["backend"], "gb": data["data_gb"], "partition_mb": data["partition_mb"],
            "wall_s": record["summary"]["wall_s"], "cost_usd": record["summary"].get("cost_usd"),
            "run_id": record.get("run_id")}  # fmt: skip


def _own_run(profile: Profile, record: dict, trials: int, seed: int, launch_per_s: float | None = None) -> Simulated:
    """A stored run simulated as it ran: its units, its workers, its CPU share; an array's groups, launched at
    ``launch_per_s``."""
    own = run_cpu_share(record)
    factor = profile.cpu_share / own if profile.cpu_share and own else 1.0
    groups = run_groups(record)
    if record.get("backend") == "lambda":
        rate = (LAMBDA_RAMP_EVERY, LAMBDA_RAMP_S)
    else:
        rate = (1, 1.0 / launch_per_s) if groups and launch_per_s else (0, 0.0)
    scenario = Scenario(run_units(record), BYTES_PER_SAMPLE, run_slots(record), *rate, compute_factor=factor,
                        groups=groups)  # fmt: skip
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
        # A worker is the paper's whole node or GPU, whose cores the paper does not give: priced only where
        # --cores-per-task says them; its times are the profiler's, so are its estimates
        return BackendProfile(profile, 1, None, None, measured, COMPUTE)
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


def load_profile(source: str, backend: str, seed: int = 0, warn=None, prefer_array: bool = False) -> BackendProfile:
    """``paper`` or a results directory's runs of ``backend`` (``profile_runs``), with the model's error on its
    validation points: the paper's other published times of that backend, or each stored run predicted from the
    others of its group."""
    if source == "paper":
        checks = [c for c in validate_paper(seed=seed, backends=(backend,)) if not c.calibration]
        system, kind = PAPER_SYSTEMS[backend]
        made_from = f"the paper's {len(checks)} other published {system} times ({kind}), calibration excluded"
        return replace(paper_profile(backend, seed), error=model_error(checks, made_from))
    records = _stored_records(source, "to build a profile from (or use --profile paper)", warn)
    runs = profile_runs(records, backend, prefer_array) or records  # none: profile_from_records says so
    profile = profile_from_records(runs, backend, str(source), seed)
    checks, _ = validate_store_records(runs, str(source), seed=seed, backends=(backend,))
    group = run_group(runs[0]) if runs else backend
    made_from = f"{len(checks)} {group} run(s) of {source}, each predicted from the others"
    return replace(profile, error=model_error(checks, made_from))


def model_error(checks: list[Check], made_from: str) -> ModelError:
    points = tuple(Point(c.measured_s, c.predicted_s_p10, c.predicted_s_p50, c.predicted_s_p90) for c in checks
                   if not c.calibration)  # fmt: skip
    return ModelError(points, made_from)


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
                        ("--cores-per-task", target.cores_per_task),
                        ("--array-tasks", target.array_tasks)):  # fmt: skip
        if value is not None and value < 1:
            raise UserError(f"{name} must be at least 1, got {value}")
    for name, value in (("--launch-per-s", target.launch_per_s), ("--shared-read-gbps", target.shared_read_gbps)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise UserError(f"{name} must be a positive number, got {value}")
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


def is_array(target: Target, array: ArrayFacts | None) -> bool:
    """hpc as a SLURM array: asked for (--array-tasks), or the profile's runs were arrays."""
    return target.backend == "hpc" and (target.array_tasks is not None or array is not None)


def _array_scenario(units: np.ndarray, target: Target, slots: int, array: ArrayFacts | None,
                    factor: float) -> Scenario:  # fmt: skip
    """An array of ``--array-tasks`` tasks (default: one per task at once), each given an even group of units,
    ``slots`` at once, launched at the measured rate, reading through the shared bandwidth."""
    tasks = min(target.array_tasks or slots, len(units))
    per_task = math.ceil(len(units) / tasks)
    groups = tuple(min(per_task, len(units) - start) for start in range(0, len(units), per_task))
    launch = target.launch_per_s or (array.launch_per_s if array else None)
    shared = (target.shared_read_gbps or DEFAULT_SHARED_READ_GBPS) * GB
    return Scenario(units, BYTES_PER_SAMPLE, slots, *((1, 1.0 / launch) if launch else (0, 0.0)),
                    compute_factor=factor, groups=groups, shared_read_bytes_per_s=shared)  # fmt: skip


def _simulate_target(profile: Profile, target: Target, memory_mb: int | None, default_slots: int, trials: int,
                     seed: int, array: ArrayFacts | None = None) -> Simulated:  # fmt: skip
    samples = samples_for_gb(target.gb)
    count = partition_count(samples, target.partition_mb)
    if count * trials > MAX_SIMULATED_UNITS:
        raise UserError(f"{count:,} partitions x {trials} trials is more than one simulation holds "
                        f"({MAX_SIMULATED_UNITS:,} units): use fewer --trials or a larger --partition-mb")  # fmt: skip
    units = np.array(partition_sizes(samples, target.partition_mb), dtype=np.int64)
    slots = target_slots(target, default_slots)
    factor = 1.0
    if target.backend == "lambda" and profile.cpu_share and memory_mb:
        factor = profile.cpu_share / lambda_vcpus(memory_mb)
    elif target.backend == "hpc" and target.cores_per_task and profile.cpu_share:
        factor = profile.cpu_share / target.cores_per_task
    if target.backend == "lambda":
        scenario = Scenario(units, BYTES_PER_SAMPLE, slots, LAMBDA_RAMP_EVERY, LAMBDA_RAMP_S, factor)
    elif is_array(target, array):
        scenario = _array_scenario(units, target, slots, array, factor)
    else:
        scenario = Scenario(units, BYTES_PER_SAMPLE, slots, compute_factor=factor)
    return simulate(profile, scenario, trials, seed)


def price_assumptions(target: Target, cores: int | None, prices: Prices, array: bool) -> dict:
    """What the cost of ``target`` is priced at, as the table shows it."""
    if target.backend == "lambda":
        table = prices.lambda_table
        keys = ("request_usd", "state_transition_usd", "s3_get_usd", "s3_put_usd", "as_of", "region")
        return {"architecture": prices.architecture, "gb_second_usd": table["gb_second_usd"].get(prices.architecture),
                **{k: table.get(k, pricing.PRICES.get(k)) for k in keys}}  # fmt: skip
    if target.backend == "hpc":
        held = "each array task's own elapsed time" if array else "every worker for the whole wall"
        return {"core_hour_usd": prices.core_hour_usd, "cores_per_task": cores, "billed": f"{held}, on its cores"}
    return {"gpu_hour_usd": prices.gpu_hour_usd, "billed": "each GPU with its share of its host, for the whole wall"}


def _lambda_items(sim: Simulated, target: Target, memory_mb: int, prices: Prices) -> dict:
    """Per trial: Lambda's GB-seconds at the architecture's price, requests, Step Functions transitions, and S3
    requests (a GET per partition and per environment's weights, a PUT per result)."""
    table = prices.lambda_table
    transitions = sim.units + 1 if target.orchestrator == "stepfunctions" else 0
    costs = [pricing.total_cost(ms, sim.units, memory_mb, prices.architecture, table, transitions)
             for ms in sim.billed_ms]  # fmt: skip
    gets, puts = sim.units + sim.created, np.full(len(sim.wall_s), sim.units)
    s3_usd = gets * table.get("s3_get_usd", pricing.PRICES["s3_get_usd"]) + puts * table.get(
        "s3_put_usd", pricing.PRICES["s3_put_usd"])  # fmt: skip
    return {
        "usd": np.array([c.usd for c in costs]) + s3_usd,
        "billed_gb_s": np.array([c.billed_gb_s for c in costs]),
        "duration_usd": np.array([c.duration_usd for c in costs]),
        "requests": np.full(len(costs), sim.units),
        "request_usd": np.array([c.request_usd for c in costs]),
        "transitions": np.full(len(costs), transitions),
        "transitions_usd": np.array([c.transitions_usd for c in costs]),
        "s3_gets": gets.astype(float),
        "s3_puts": puts.astype(float),
        "s3_usd": s3_usd,
    }


def _cost_items(sim: Simulated, target: Target, memory_mb: int | None, cores: int | None, array: bool,
                prices: Prices) -> dict:  # fmt: skip
    """Per trial, each item of the cost; ``usd`` None where unpriced. A task is priced for what it occupies:
    an array task its cores for its own elapsed time, a node's workers their cores for the whole wall, a GPU
    (with its host) for the whole wall."""
    if target.backend == "lambda":
        return _lambda_items(sim, target, memory_mb, prices)
    if target.backend == "hpc":
        held = sim.busy_s if array else sim.wall_s * sim.slots
        core_hours = None if cores is None else held * cores / 3600
        usd = None if core_hours is None or prices.core_hour_usd is None else core_hours * prices.core_hour_usd
        return {"usd": usd, "core_hours": core_hours}
    gpu_hours = sim.wall_s * sim.slots / 3600
    return {"usd": None if prices.gpu_hour_usd is None else gpu_hours * prices.gpu_hour_usd, "gpu_hours": gpu_hours}


def _median_trial(items: dict, sim: Simulated) -> dict:
    """The items of the trial whose cost is the median (their sum is that cost), or of the median wall."""
    key = items["usd"] if items["usd"] is not None else sim.wall_s
    at = int(np.argsort(key)[(len(key) - 1) // 2])
    return {name: (None if values is None else float(values[at])) for name, values in items.items()}


def estimate(source: BackendProfile, target: Target, prices: Prices, trials: int = 200, seed: int = 0) -> Estimate:
    """``target`` simulated ``trials`` times from ``source``: the median, p90 and the interval with the model's
    error, and the itemised cost."""
    check_target(target)
    check_trials(trials)
    memory = target.memory_mb or source.memory_mb or (PAPER_FUNCTION_MEMORY_MB if target.backend == "lambda" else None)
    began = time.perf_counter()
    sim = _simulate_target(source.profile, target, memory, source.slots, trials, seed, source.array)
    took = time.perf_counter() - began
    array = is_array(target, source.array)
    cores = target.cores_per_task or source.cores_per_slot
    items = _median_trial(_cost_items(sim, target, memory, cores, array, prices), sim)
    samples = samples_for_gb(target.gb)  # the partitions split exactly these
    if items["usd"] is not None:
        items["usd_per_million_galaxies"] = items["usd"] / samples * 1e6
    p10, p50, p90 = (float(np.percentile(sim.wall_s, q)) for q in (10, 50, 90))
    error = source.error or ModelError((), "no validation")
    low, high = uncertainty_interval(p10, p50, p90, error.factor)
    usd = items["usd"]
    usd_high = None if usd is None or high is None else usd * high / p50
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
        interval=error.describe(),
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
    )


def _whole(count: float | None) -> int | None:
    return None if count is None else int(count)


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
    return Check(what, backend, gb, mb, sim.slots, measured_s, p50, p90, calibration, p10, kind, group or backend)


def median_abs_error(checks: list[Check]) -> float | None:
    errors = [abs(c.error) for c in checks if not c.calibration]
    return float(np.median(errors)) if errors else None


def errors_by_backend(checks: list[Check], made_from: str) -> dict[str, ModelError]:
    """Per group of runs (a backend; SLURM arrays apart from an hpc node's runs), the model's error on its checks
    (the calibration points left out): median absolute error, the interval's factor and its leave-one-out
    coverage."""
    groups = dict.fromkeys(c.group or c.backend for c in checks)
    return {g: model_error([c for c in checks if (c.group or c.backend) == g], made_from) for g in groups}


def validate_store(source: str, trials: int = 200, seed: int = 0, warn=None,
                   hold_out: str = "run") -> tuple[list[Check], list[str]]:  # fmt: skip
    """``validate_store_records`` over the records of the results directory ``source``."""
    records = _stored_records(source, "to validate", warn)
    return validate_store_records(records, str(source), trials, seed, hold_out)


def validate_store_records(records: list[dict], where: str, trials: int = 200, seed: int = 0, hold_out: str = "run",
                           backends: tuple[str, ...] = BACKENDS) -> tuple[list[Check], list[str]]:  # fmt: skip
    """Each finished lambda, hpc or gpu run predicted from the profile of the others of its group (``run_group``:
    its backend, SLURM arrays apart): all the others (``hold_out="run"``), or those of other measured points only
    (``"point"``: its own repeats left out too). The checks, and a line for each run that could not be
    predicted."""
    if hold_out not in HOLD_OUTS:
        raise UserError(f"--hold-out must be one of {', '.join(HOLD_OUTS)}, got {hold_out!r}")
    check_trials(trials)
    checks, skipped = [], []
    for backend in backends:
        runs = _usable_runs(records, backend)
        for run in runs:
            point, group = record_point_key(run), run_group(run)
            others = [r for r in runs if r is not run and run_group(r) == group
                      and (hold_out == "run" or record_point_key(r) != point)]  # fmt: skip
            if not others:
                skipped.append(f"{run['run_id']} ({group}): no other {group} {hold_out} to predict it from")
                continue
            source = profile_from_records(others, backend, where, seed)
            launch = source.array.launch_per_s if source.array else None
            sim = _own_run(source.profile, run, trials, seed, launch)
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
        for (gb, mb), seconds in _by_partition(published):
            target = Target(backend, gb, mb or 25.0, orchestrator="stepfunctions" if backend == "lambda" else "direct")
            sim = _simulate_target(source.profile, target, source.memory_mb, source.slots, trials, seed)
            calibration = (gb, mb) == PAPER_CALIBRATION or (backend != "lambda" and gb == PAPER_CALIBRATION[0])
            checks.append(_check(f"paper {system} ({kind}), median of {len(seconds)}", backend, gb, mb, sim,
                                 statistics.median(seconds), calibration, source.time_kind))  # fmt: skip
    return checks


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
                      **setting)
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
