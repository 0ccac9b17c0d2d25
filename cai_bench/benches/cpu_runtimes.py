"""``cai-bench bench``: the reference loop and every available runtime on the same data, side by side.

Arms: ``reference`` (the upstream-style loop: eager fp32 torch), ``torch`` (the fast engine), ``onnxruntime``
and ``openvino`` (an export of the same weights, made once before anything is timed), the last two where
installed, each at the bench's precision, or at its own where named ``runtime:precision`` (``openvino:int8``).
Runs alternate (reference, torch, onnxruntime, openvino, reference, ...) after unrecorded warm-ups of
each, so slow drifts of a noisy machine hit every arm alike; each round gives every arm a ratio to the
reference run of the same round, and the median ratio is the answer. Every measured run is an ordinary record
in the store (its plan says which engine and runtime).

Beside the speed, how close to the hardware and to the reference each arm ran: its GFLOP/s and MFU (the records'
own, ``measure/efficiency.py``), and the largest |dz| of its predictions from the reference loop's on the same
galaxies of the same round, over every galaxy of the data, not a probe batch.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass, field

from cai_bench.commands.preflight import check_run
from cai_bench.commands.runner import NoProgress, ProgressSink, RunRequest, resolve_runtime, run_repeat
from cai_bench.core.choices import RUNTIME_PRECISIONS
from cai_bench.core.errors import UserError
from cai_bench.core.machine import isa_limits, machine_label, this_machine, vector_flags
from cai_bench.core.plan import BITS_PER_SAMPLE, Plan, replace_plan
from cai_bench.core.records import RunRecord
from cai_bench.measure.efficiency import achieved_gflops, mfu
from cai_bench.measure.metrics import spread
from cai_bench.store.jsonl import ResultsStore

REFERENCE = "reference"
# What a user gets without flags: --runtime auto and --precision auto, resolved once before the rounds
DEFAULT = "default"
RUNTIME_ARMS = ("torch", "onnxruntime", "openvino")
ARMS = (*RUNTIME_ARMS, DEFAULT)


def _arm_known(arm: str) -> bool:
    runtime, _, precision = arm.partition(":")
    return arm in ARMS or (runtime in RUNTIME_ARMS and precision in RUNTIME_PRECISIONS[runtime])


def available_arms(wanted: list[str] | None = None) -> list[str]:
    """The reference and the arms asked for (default: every runtime installed here, and the default path), the
    named ones first in a fixed order, then any ``runtime:precision`` in the order given."""
    wanted = list(ARMS) if wanted is None else wanted
    unknown = [w for w in wanted if not _arm_known(w)]
    if unknown:
        raise UserError(f"--runtimes takes {', '.join(ARMS)} or runtime:precision (openvino:int8), got "
                        f"{', '.join(unknown)}")  # fmt: skip

    def installed(arm: str) -> bool:
        runtime = arm.partition(":")[0]
        return runtime in ("torch", DEFAULT) or importlib.util.find_spec(runtime) is not None

    named = [a for a in ARMS if a in wanted]
    pinned = list(dict.fromkeys(a for a in wanted if a not in ARMS))
    return [REFERENCE, *(a for a in named + pinned if installed(a))]


@dataclass
class BenchOutcome:
    arms: list[str]
    records: dict[str, list[RunRecord]] = field(default_factory=dict)
    # per arm, per round: the largest |dz| from the reference loop's predictions of the same round
    max_dz: dict[str, list[float]] = field(default_factory=dict)

    def samples_per_s(self, arm: str) -> list[float]:
        return [r.summary.samples_per_s for r in self.records[arm]]

    def compute_samples_per_s(self, arm: str) -> list[float]:
        """Forward passes only, the steady state without start-up and loading: the sum over workers (lanes) of
        each one's samples / its own compute time."""
        return [r.summary.sum_worker_throughput_bps / BITS_PER_SAMPLE for r in self.records[arm]]

    def ratios(self, arm: str, measure: str = "samples_per_s") -> list[float]:
        """``arm`` against the reference run of the same round."""
        mine, reference = getattr(self, measure)(arm), getattr(self, measure)(REFERENCE)
        return [m / r for m, r in zip(mine, reference, strict=True) if r > 0]

    def median_ratio(self, arm: str, measure: str = "samples_per_s") -> float:
        return spread(self.ratios(arm, measure)).median

    def peak_rss_bytes(self, arm: str) -> int:
        return max(r.summary.peak_rss_bytes for r in self.records[arm])

    def efficiency(self, arm: str) -> dict:
        """Median GFLOP/s over the wall and over the forward passes, and each as a share of the fp32 peak."""
        records = self.records[arm]
        flops = records[-1].summary.flops_per_sample
        peak = records[-1].environment.get("fp32_peak")
        wall = spread([r.summary.gflops or 0.0 for r in records]).median  # each record's own
        compute = spread([achieved_gflops(s, flops) or 0.0 for s in self.compute_samples_per_s(arm)]).median
        return {"gflops": wall, "compute_gflops": compute, "mfu": mfu(wall, peak), "compute_mfu": mfu(compute, peak)}


def bench_plans(plan: Plan, arms: list[str]) -> dict[str, Plan]:
    """Every arm on the same data and batch size: the eager fp32 reference, each runtime at the plan's
    precision, and the default path (runtime and precision auto, the probe asked here, once)."""
    options = {k: v for k, v in plan.backend_options.items() if k != "runtime"}
    plans = {REFERENCE: replace_plan(plan, engine="reference", precision="fp32", compile=False,
                                     backend_options={**options, "runtime": "torch"})}  # fmt: skip
    for arm in arms[1:]:
        runtime, _, pinned = arm.partition(":")
        if pinned:
            plans[arm] = replace_plan(plan, engine="fast", precision=pinned,
                                      backend_options={**options, "runtime": runtime})  # fmt: skip
        elif arm == DEFAULT:
            asked = replace_plan(plan, engine="fast", precision="auto", backend_options={**options, "runtime": "auto"})
            plans[arm] = resolve_runtime(asked)
        else:
            plans[arm] = replace_plan(plan, engine="fast", backend_options={**options, "runtime": arm})
    return plans


def run_bench(
    plan: Plan,
    rounds: int,
    warmup: int,
    store: ResultsStore | None,
    progress: ProgressSink | None = None,
    arms: list[str] | None = None,
) -> BenchOutcome:
    progress = progress or NoProgress()
    arms = arms or available_arms()
    plans = bench_plans(plan, arms)
    outcome = BenchOutcome(arms, {arm: [] for arm in arms}, {arm: [] for arm in arms[1:]})
    for i in range(warmup):  # also where an export is made, once, before anything is timed
        for arm in arms:
            run_repeat(plans[arm], 0, None, progress, f"{arm}: warm-up {i + 1}/{warmup}")
    for number in range(1, rounds + 1):
        reference = None
        for arm in arms:
            result = run_repeat(plans[arm], number, store, progress, f"{arm}: round {number}/{rounds}", command="bench")
            outcome.records[arm].append(result.record)
            if arm == REFERENCE:
                reference = predictions_by_id(result.results)
            else:
                outcome.max_dz[arm].append(largest_difference(reference, predictions_by_id(result.results)))
    return outcome


def predictions_by_id(results) -> dict[int, float]:
    return {int(i): float(z) for r in results for i, z in zip(r.object_id, r.prediction, strict=True)}


def largest_difference(reference: dict[int, float], other: dict[int, float]) -> float:
    """The largest |dz| over the galaxies both predicted; the two must have predicted the same galaxies."""
    if not reference or reference.keys() != other.keys():
        raise UserError("bench: an arm predicted other galaxies than the reference loop; nothing to compare")
    return max(abs(other[i] - reference[i]) for i in reference)


@dataclass
class BenchDone:
    plan: Plan
    outcome: BenchOutcome
    store: ResultsStore
    figures: dict


def arm_point(arm: str, precision: str) -> tuple[dict, str]:
    """The backend options and precision an arm runs, for the checks before anything runs."""
    if arm == DEFAULT:
        return {"runtime": "auto"}, "auto"
    runtime, _, pinned = arm.partition(":")
    return {"runtime": runtime}, pinned or precision


def bench_command(request: RunRequest, runtimes: list[str] | None = None, progress=None) -> BenchDone:
    """``cai-bench bench``: the checks, the data (0.2 GB synthetic by default), then ``run_bench`` for
    ``request.repeats`` rounds after ``request.warmup`` unrecorded runs of each arm, on the cpu backend."""
    if request.repeats < 1:
        raise UserError(f"--rounds must be at least 1, got {request.repeats}")
    if request.warmup < 0:
        raise UserError(f"--warmup must be 0 or more, got {request.warmup}")
    arms = available_arms(runtimes)
    if request.data is None and request.gb is None:
        request = dataclasses.replace(request, gb=0.2)
    points = [arm_point(arm, request.precision) for arm in arms[1:]] or [({}, request.precision)]
    ready = check_run("cpu", points, results=request.results, threads=request.threads,
                      oversubscribe=request.oversubscribe, weights=request.weights, batch_size=request.batch_size,
                      sizes={"gb": request.gb, "partition_mb": request.partition_mb})  # fmt: skip
    # Every arm is checked above; the plan itself is the arms' common part (bench_plans sets each one's runtime)
    plan = request.plan(dataclasses.replace(ready, options=({},)), getattr(progress, "synthesizing", None))
    outcome = run_bench(plan, request.repeats, request.warmup, ready.store, progress, arms)
    return BenchDone(plan, outcome, ready.store, bench_figures(plan, outcome))


def _chose(record: RunRecord) -> dict:
    keep = ("runtime", "runtime_version", "engine", "precision", "threading", "lanes", "intra_op_threads")
    return {k: record.backend_info[k] for k in keep if k in record.backend_info}


def bench_figures(plan: Plan, outcome: BenchOutcome) -> dict:
    """What ``bench --json`` prints: per arm its samples/s, ratios to the reference and what it chose, beside
    the machine and its CPU flags."""

    def arm_figures(arm: str) -> dict:
        out = {"samples_per_s": outcome.samples_per_s(arm), "compute_samples_per_s": outcome.compute_samples_per_s(arm),
               "peak_rss_bytes": outcome.peak_rss_bytes(arm)}  # fmt: skip
        out.update(outcome.efficiency(arm))
        if arm != REFERENCE:
            out.update(ratios=outcome.ratios(arm), median_ratio=outcome.median_ratio(arm),
                       median_compute_ratio=outcome.median_ratio(arm, "compute_samples_per_s"),
                       max_abs_dz=max(outcome.max_dz[arm]), max_abs_dz_per_round=outcome.max_dz[arm])  # fmt: skip
        last = outcome.records[arm][-1]
        chose = {**_chose(last), **({"runtime_choice": last.plan["runtime_choice"]} if arm == DEFAULT else {})}
        return {**out, "choices": chose, "run_ids": [r.run_id for r in outcome.records[arm]]}

    data = plan.data
    last = outcome.records[REFERENCE][-1]
    return {
        "machine": machine_label(this_machine()),
        "cpu_flags": vector_flags(),
        "isa_limits": isa_limits(),
        "flops_per_sample": last.summary.flops_per_sample,
        "fp32_peak": last.environment.get("fp32_peak"),
        "data": {"samples": data.samples, "data_gb": data.data_gb, "partitions": data.partitions},
        "batch_size": plan.batch_size,
        "precision": plan.precision,
        "arms": {arm: arm_figures(arm) for arm in outcome.arms},
    }
