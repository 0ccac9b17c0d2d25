"""The estimate's profiles: what one backend's finished runs say of compute per sample, a straggler's
delay, load per byte, cold starts, slots and SLURM arrays; and the CAI paper's published run as a profile."""

from __future__ import annotations

import functools
import statistics
from dataclasses import dataclass, replace

import numpy as np

from cai_bench.analysis.estimate_model import (
    DEFAULT_QUOTA,
    LAMBDA_RAMP_EVERY,
    LAMBDA_RAMP_S,
    PAPER_SYSTEMS,
    ArrayFacts,
    Target,
    lambda_vcpus,
    simulate_target,
)
from cai_bench.analysis.published import (
    PAPER_FUNCTION_MEMORY_MB,
    load_reference,
    paper_function_records,
    published_seconds,
)
from cai_bench.analysis.results import measured_only, read_records
from cai_bench.core.errors import UserError
from cai_bench.core.machine import machine_label
from cai_bench.core.plan import (
    BYTES_PER_SAMPLE,
    samples_for_gb,
)
from cai_bench.measure.simulate import Profile, Scenario, Simulated, exponential_tail_scale, simulate
from cai_bench.measure.time_kinds import COMPUTE, WALL
from cai_bench.measure.uncertainty import ModelError
from cai_bench.store.jsonl import ResultsStore


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
    largest_gb: float | None = None  # the largest data size it was calibrated on: how far an estimate extrapolates


def usable_runs(records: list[dict], backend: str) -> list[dict]:
    """``backend``'s finished timing runs with a wall above zero and a unit that computed."""
    return [r for r in records if r.get("backend") == backend and r.get("status") == "ok"
            and r.get("kind", "run") == "run" and (r.get("summary") or {}).get("wall_s", 0) > 0
            and any(_unit_ok(w) for w in r.get("workers") or [])]  # fmt: skip


def check_predicted(p50_s: float, what: str) -> None:
    """A predicted wall that is not above zero is no prediction: the profile's calibrated run overhead is so far
    below zero that it cancels the units' own time (runs whose walls are shorter than their units add up to)."""
    if not p50_s > 0:
        raise UserError(f"{what}: the profile predicts {p50_s:.3g} s, which is no time: its runs' walls are shorter "
                        "than their units' own times add up to (a run overhead below zero); measure runs of 10 s "
                        "or more, whole, to profile from")  # fmt: skip


ARRAY_GROUP = "hpc (SLURM array)"


def run_group(record: dict) -> str:
    """Which runs a run is profiled and validated with: its backend's, an hpc node's apart from SLURM arrays'."""
    return ARRAY_GROUP if record.get("backend") == "hpc" and (record.get("backend_info") or {}).get("slurm") else (
        record["backend"])  # fmt: skip


def profile_runs(records: list[dict], backend: str, prefer_array: bool = False) -> list[dict]:
    """The usable runs of ``backend`` one profile is made of: for hpc, a node's runs, or SLURM arrays' where
    ``prefer_array`` (each where there are no runs of the other)."""
    runs = usable_runs(records, backend)
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
    runs = usable_runs(records, backend)
    if not runs:
        raise UserError(f"{where}: no finished {backend} run with usable partition records to build a profile "
                        f"from (run one first, or use --profile paper)")  # fmt: skip
    shares = [v for v in (run_cpu_share(r) for r in runs) if v]
    share = statistics.median(shares) if shares else None
    units, colds, per_unit = _unit_draws(runs, share)
    samples = np.array([u[0] for u in units], dtype=np.float64)
    compute = np.array([u[1] for u in units])
    typical = float(np.median(compute / samples))
    excess = compute - typical * samples
    profile = Profile(
        name=where, compute_s_per_sample=typical, compute_excess_s=excess,
        load_s_per_byte=np.array([u[2] for u in units]), cold_s=np.array(colds or [0.0]),
        unit_overhead_s=per_unit, cpu_share=share, tail_scale_s=exponential_tail_scale(excess),
        facts={"runs": len(runs), "units": len(units), "cold_starts": len(colds),
               "machines": sorted({machine_label(r.get("environment") or {}) for r in runs})},
    )  # fmt: skip
    arrays = [r for r in runs if run_groups(r)]
    rates = [v for v in (array_launch_rate(r) for r in arrays) if v]
    array = ArrayFacts(statistics.median(rates) if rates else None, len(arrays)) if arrays else None
    launch = array.launch_per_s if array else None
    overheads = [r["summary"]["wall_s"] - float(np.median(own_run(profile, r, 200, seed, launch).wall_s))
                 for r in runs]  # fmt: skip
    profile = replace(profile, run_overhead_s=float(np.median(overheads)))
    memory = [(r.get("backend_info") or {}).get("memory_mb") for r in runs]
    return BackendProfile(profile, int(statistics.median(run_slots(r) for r in runs)), _cores_per_slot(runs),
                          next((m for m in memory if m), None), tuple(_measured_point(r) for r in runs),
                          array=array, largest_gb=max(r["plan"]["data"]["data_gb"] for r in runs))  # fmt: skip


def _cores_per_slot(runs: list[dict]) -> int:
    per = [c for c in (run_cores_per_slot(r) for r in runs) if c]
    return int(statistics.median(per)) if per else 1


def _measured_point(record: dict) -> dict:
    data = record["plan"]["data"]
    return {"backend": record["backend"], "gb": data["data_gb"], "partition_mb": data["partition_mb"],
            "wall_s": record["summary"]["wall_s"], "cost_usd": record["summary"].get("cost_usd"),
            "run_id": record.get("run_id")}  # fmt: skip


def own_run(profile: Profile, record: dict, trials: int, seed: int, launch_per_s: float | None = None) -> Simulated:
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


def by_partition(published: dict) -> list:
    """The published points in order of partition size, then data size."""
    return sorted(published.items(), key=lambda kv: (kv[0][1] or 0, kv[0][0]))


def paper_points(backend: str) -> dict:
    """``{(data GB, partition MB or None): [seconds of each run]}``: the paper's published times of ``backend``."""
    system, kind = PAPER_SYSTEMS[backend]
    return published_seconds(load_reference("paper"), system, kind)


@functools.lru_cache(maxsize=64)  # the package's own figures: the same arguments, the same (frozen) profile
def paper_profile(backend: str, seed: int = 0, calibrate_on: tuple | None = None) -> BackendProfile:
    """The CAI paper's profile of ``backend``, calibrated on the published points ``calibrate_on`` ((data GB,
    partition MB) pairs; default: all of them).

    Lambda: the 517 per-function records of its 12.6 GB / 25 MB run give each function's compute and its
    straggler's delay (compute only: the records hold no cold start or read). What they lack is calibrated as a
    per-function overhead ``a + b x MB`` (start-up, and reading the partition), the least squares fit of the
    published Map-state times (the median of each point's runs) beyond the simulated ones, in relative terms.
    hpc and gpu: one worker at the paper's seconds per sample over the calibration points (the median)."""
    system, kind = PAPER_SYSTEMS[backend]
    published = paper_points(backend)
    chosen = sorted(published if calibrate_on is None else (k for k in published if k in set(calibrate_on)))
    if not chosen:
        raise UserError(f"no published {system} point to calibrate on")
    measured = tuple({"backend": backend, "gb": gb, "partition_mb": mb, "wall_s": statistics.median(s),
                      "cost_usd": None, "run_id": f"paper {system} ({kind})"}
                     for (gb, mb), s in by_partition(published))  # fmt: skip
    largest = max(gb for gb, _ in chosen)
    if backend != "lambda":
        rate = statistics.median(statistics.median(published[k]) / samples_for_gb(k[0]) for k in chosen)
        facts = {"calibrated_on": _calibrated_on(chosen, kind), "largest_calibrated_gb": largest}
        profile = Profile(f"paper ({system})", rate, np.zeros(1), np.zeros(1), np.zeros(1), facts=facts)
        # A worker is the paper's whole node or GPU, whose cores the paper does not give: priced only where
        # --cores-per-task says them; its times are the profiler's, so are its estimates
        return BackendProfile(profile, 1, None, None, measured, COMPUTE, largest_gb=largest)
    base = _paper_lambda_records()
    a, b = _fit_overhead(base, [(k, statistics.median(published[k])) for k in chosen], seed)
    facts = {"functions": len(base.compute_excess_s), "calibrated_on": _calibrated_on(chosen, kind),
             "unit_overhead_s": a, "unit_overhead_s_per_mb": b, "largest_calibrated_gb": largest,
             "straggler_tail_scale_s": base.tail_scale_s}  # fmt: skip
    profile = replace(base, unit_overhead_s=a, unit_overhead_s_per_mb=b, facts=facts)
    return BackendProfile(profile, 1, 1, PAPER_FUNCTION_MEMORY_MB, measured, largest_gb=largest)


def _calibrated_on(points: list, kind: str) -> str:
    shown = ", ".join(f"{gb:g} GB" + (f" / {mb:g} MB" if mb else "") for gb, mb in points[:4])
    more = f" and {len(points) - 4} more" if len(points) > 4 else ""
    return f"{len(points)} published point(s) ({kind}, the median of each point's runs): {shown}{more}"


def _paper_lambda_records() -> Profile:
    rows = paper_function_records()
    samples = np.array([s for s, _ in rows], dtype=np.float64)
    compute = np.array([t for _, t in rows])
    typical = float(np.median(compute / samples))
    excess = compute - typical * samples
    share = lambda_vcpus(PAPER_FUNCTION_MEMORY_MB)
    return Profile("paper (CAI on AWS Lambda)", typical, excess, np.zeros(len(rows)), np.zeros(1), cpu_share=share,
                   tail_scale_s=exponential_tail_scale(excess))  # fmt: skip


def paper_target(gb: float, mb: float) -> Target:
    """One of the paper's Lambda runs: a Distributed Map at the default quota, every function at once."""
    return Target("lambda", gb, mb, orchestrator="stepfunctions")


def _fit_overhead(base: Profile, points: list, seed: int) -> tuple[float, float]:
    """``a`` and ``b`` of ``paper_profile``: every function of these runs starts at once, so an overhead per
    function adds to the simulated wall as it is, and the fit is linear. One partition size among the points: no
    ``b`` (0)."""
    rows = []
    for (gb, mb), seconds in points:
        sim = simulate_target(base, paper_target(gb, mb), PAPER_FUNCTION_MEMORY_MB, 1, 200, seed)
        rows.append((mb, seconds, seconds - float(np.median(sim.wall_s))))
    weights = np.array([1.0 / seconds for _, seconds, _ in rows])
    gap = np.array([g for _, _, g in rows]) * weights
    if len({mb for mb, _, _ in rows}) < 2:
        return float(np.sum(gap * weights) / np.sum(weights**2)), 0.0
    design = np.array([[1.0, mb] for mb, _, _ in rows]) * weights[:, None]
    (a, b), *_ = np.linalg.lstsq(design, gap, rcond=None)
    return float(a), float(b)


def stored_records(source: str, purpose: str, warn) -> list[dict]:
    store = ResultsStore(source)
    if not store.path.exists():
        raise UserError(f"{store.path}: no results store there {purpose}")
    return measured_only(read_records(store, warn), warn)
