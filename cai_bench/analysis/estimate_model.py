"""The estimate's model of a run: what to estimate (``Target``), the prices, and one target simulated
(``measure/simulate.py``) with its cost per trial. Constants are AWS's and SLURM's documented defaults."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from cai_bench.analysis.estimate_terms import TERMS, fixed_seconds, lambda_rates, map_retry_waits, term_value
from cai_bench.backends.aws_lambda import pricing
from cai_bench.backends.aws_lambda.environments import MAX_VCPUS, cpu_share
from cai_bench.core.errors import UserError
from cai_bench.core.plan import (
    BYTES_PER_SAMPLE,
    partition_count,
    partition_sizes,
    samples_for_gb,
    samples_per_partition,
)
from cai_bench.measure.simulate import Profile, Scenario, Simulated, simulate

BACKENDS = ("lambda", "hpc", "gpu")


# AWS Lambda: each function scales by 1,000 execution environments every 10 seconds (estimate_terms), up to the
# account's concurrency quota (1,000 unless raised)
LAMBDA_RAMP_EVERY, LAMBDA_RAMP_S = int(TERMS["lambda_scaling_per_10s"].default), 10.0


DEFAULT_QUOTA = 1000


# A Distributed Map runs up to 10,000 child executions at once when its MaxConcurrency is not set; cai-bench's
# own state machine sets it to the run's concurrency, and so does the estimate unless --map-concurrency says
MAP_DEFAULT_CONCURRENCY = 10_000


# The paper's systems behind each backend, and which of its times the paper profile is calibrated on
PAPER_SYSTEMS = {"lambda": ("cai-lambda", "map-state-wall"), "hpc": ("hpc-cpu", "profiler-cpu"),
                 "gpu": ("hpc-gpu", "profiler-gpu")}  # fmt: skip


# The simulation holds every unit of every trial in memory at once (several float64 arrays of units x trials)
MAX_SIMULATED_UNITS = 20_000_000


HOLD_OUTS = ("run", "point")  # --validate: what a run is predicted without


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
    terms: tuple[tuple[str, float], ...] = ()  # --term NAME=VALUE: the mechanisms of scale changed (estimate_terms)


@dataclass(frozen=True)
class Prices:
    """What the estimate prices time at: Lambda's table (``aws_lambda/pricing.py``), and the other backends' hourly
    prices (None: not priced)."""

    lambda_table: dict
    architecture: str = "x86_64"
    core_hour_usd: float | None = None
    gpu_hour_usd: float | None = None


# ---------------------------------------------------------------------------------------------- profiles


@dataclass(frozen=True)
class ArrayFacts:
    """What SLURM runs say of how a cluster starts an array: the tasks it launched per second (None: those that
    could start together did, within 10 ms), and how many array runs the profile holds."""

    launch_per_s: float | None
    runs: int


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
    return target.concurrency if target.backend == "lambda" else target.tasks or default_slots


def is_array(target: Target, array: ArrayFacts | None) -> bool:
    """hpc as a SLURM array: asked for (--array-tasks), or the profile's runs were arrays."""
    return target.backend == "hpc" and (target.array_tasks is not None or array is not None)


def _array_scenario(units: np.ndarray, target: Target, slots: int, array: ArrayFacts | None,
                    factor: float) -> Scenario:  # fmt: skip
    """An array of ``--array-tasks`` tasks (default: one per task at once), each given an even group of units,
    ``slots`` at once, launched at the measured rate, reading through the shared bandwidth."""
    free = term_value(target.terms, "free_cores")
    if free:  # the cluster runs no more at once than its free cores hold
        slots = min(slots, max(1, int(free // (target.cores_per_task or 1))))
    tasks = min(target.array_tasks or slots, len(units))
    per_task = math.ceil(len(units) / tasks)
    groups = tuple(min(per_task, len(units) - start) for start in range(0, len(units), per_task))
    launch = target.launch_per_s or (array.launch_per_s if array else None)
    shared = (target.shared_read_gbps or DEFAULT_SHARED_READ_GBPS) * GB
    return Scenario(units, BYTES_PER_SAMPLE, slots, *((1, 1.0 / launch) if launch else (0, 0.0)),
                    compute_factor=factor, groups=groups, shared_read_bytes_per_s=shared)  # fmt: skip


def with_terms(profile: Profile, given: tuple) -> Profile:
    """``profile`` as the target's terms change it: its straggler tail off, or one cold start for all."""
    if not term_value(given, "straggler_tail"):
        profile = replace(profile, tail_scale_s=None)
    cold = term_value(given, "cold_start_s")
    return profile if cold is None else replace(profile, cold_s=np.array([cold]))


def _lambda_scenario(units: np.ndarray, target: Target, slots: int, factor: float) -> Scenario:
    """A Lambda run: environments at the scaling rate up to ``slots``; partitions started no faster than the
    Map, the driver or S3's GETs allow, results written no faster than S3's PUTs; a Map's listing and own time.
    With an ItemBatcher, each child execution runs its batch of partitions one after another."""
    given, count = target.terms, len(units)
    batch = int(term_value(given, "items_per_batch")) if target.orchestrator == "stepfunctions" else 1
    if batch > 1:
        units = np.add.reduceat(units, np.arange(0, count, batch))
    start, finish = lambda_rates(given, target.orchestrator, target.partition_mb * batch)
    ramp = int(term_value(given, "lambda_scaling_per_10s"))
    mapped = {}
    if target.orchestrator == "stepfunctions":  # the quota caps environments; the Map, its children in flight
        in_flight = min(target.map_concurrency or target.concurrency, MAP_DEFAULT_CONCURRENCY)
        mapped = {"retry_s": map_retry_waits(given), "in_flight": in_flight}
    fixed = fixed_seconds(given, target.orchestrator, count)
    return Scenario(units, BYTES_PER_SAMPLE, slots, ramp, LAMBDA_RAMP_S, factor, start_per_s=start,
                    finish_per_s=finish, fixed_s=fixed, **mapped)  # fmt: skip


def simulate_target(profile: Profile, target: Target, memory_mb: int | None, default_slots: int, trials: int,
                     seed: int, array: ArrayFacts | None = None) -> Simulated:  # fmt: skip
    samples = samples_for_gb(target.gb)
    count = partition_count(samples, target.partition_mb)
    if count * trials > MAX_SIMULATED_UNITS:
        raise UserError(f"{count:,} partitions x {trials} trials is more than one simulation holds "
                        f"({MAX_SIMULATED_UNITS:,} units): use fewer --trials or a larger --partition-mb")  # fmt: skip
    units = np.array(partition_sizes(samples, target.partition_mb), dtype=np.int64)
    slots = target_slots(target, default_slots)
    profile = with_terms(profile, target.terms)
    factor = 1.0
    if target.backend == "lambda" and profile.cpu_share and memory_mb:
        factor = profile.cpu_share / lambda_vcpus(memory_mb)
    elif target.backend == "hpc" and target.cores_per_task and profile.cpu_share:
        factor = profile.cpu_share / target.cores_per_task
    if target.backend == "lambda":
        scenario = _lambda_scenario(units, target, slots, factor)
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
    # sim.units are invocations: with an ItemBatcher each runs a batch of partitions, with a GET and a PUT each
    partitions = partition_count(samples_for_gb(target.gb), target.partition_mb)
    transitions = sim.units + 1 if target.orchestrator == "stepfunctions" else 0
    costs = [pricing.total_cost(ms, sim.units, memory_mb, prices.architecture, table, transitions)
             for ms in sim.billed_ms]  # fmt: skip
    gets, puts = partitions + sim.created, np.full(len(sim.wall_s), partitions)
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


def cost_items(sim: Simulated, target: Target, memory_mb: int | None, cores: int | None, array: bool,
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


def median_trial(items: dict, sim: Simulated) -> dict:
    """The items of the trial whose cost is the median (their sum is that cost), or of the median wall."""
    key = items["usd"] if items["usd"] is not None else sim.wall_s
    at = int(np.argsort(key)[(len(key) - 1) // 2])
    return {name: (None if values is None else float(values[at])) for name, values in items.items()}
