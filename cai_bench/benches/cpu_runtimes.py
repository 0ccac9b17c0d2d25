"""``cai-bench bench``: the reference loop and every available runtime on the same data, side by side.

Arms: ``reference`` (the upstream-style loop: eager fp32 torch), ``torch`` (the fast engine), ``onnxruntime``
and ``openvino`` (an export of the same weights, made once before anything is timed), the last two where
installed. Runs alternate (reference, torch, onnxruntime, openvino, reference, ...) after unrecorded warm-ups of
each, so slow drifts of a noisy machine hit every arm alike; each round gives every arm a ratio to the
reference run of the same round, and the median ratio is the answer. Every measured run is an ordinary record
in the store (its plan says which engine and runtime).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass, field

from cai_bench.commands.preflight import check_run
from cai_bench.commands.runner import NoProgress, ProgressSink, RunRequest, resolve_runtime, run_repeat
from cai_bench.core.errors import UserError
from cai_bench.core.machine import machine_label, this_machine, vector_flags
from cai_bench.core.plan import BITS_PER_SAMPLE, Plan, replace_plan
from cai_bench.core.records import RunRecord
from cai_bench.measure.metrics import spread
from cai_bench.store.jsonl import ResultsStore

REFERENCE = "reference"
# What a user gets without flags: --runtime auto and --precision auto, resolved once before the rounds
DEFAULT = "default"
RUNTIME_ARMS = ("torch", "onnxruntime", "openvino")
ARMS = (*RUNTIME_ARMS, DEFAULT)


def available_arms(wanted: list[str] | None = None) -> list[str]:
    """The reference and the arms asked for (default: every runtime installed here, and the default path), in
    a fixed order."""
    wanted = list(ARMS) if wanted is None else wanted
    unknown = [w for w in wanted if w not in ARMS]
    if unknown:
        raise UserError(f"--runtimes takes {', '.join(ARMS)}, got {', '.join(unknown)}")
    installed = [a for a in ARMS if a in ("torch", DEFAULT) or importlib.util.find_spec(a) is not None]
    return [REFERENCE, *(a for a in ARMS if a in wanted and a in installed)]


@dataclass
class BenchOutcome:
    arms: list[str]
    records: dict[str, list[RunRecord]] = field(default_factory=dict)

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


def bench_plans(plan: Plan, arms: list[str]) -> dict[str, Plan]:
    """Every arm on the same data and batch size: the eager fp32 reference, each runtime at the plan's
    precision, and the default path (runtime and precision auto, the probe asked here, once)."""
    options = {k: v for k, v in plan.backend_options.items() if k != "runtime"}
    plans = {REFERENCE: replace_plan(plan, engine="reference", precision="fp32", compile=False,
                                     backend_options={**options, "runtime": "torch"})}  # fmt: skip
    for arm in arms[1:]:
        if arm == DEFAULT:
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
    outcome = BenchOutcome(arms, {arm: [] for arm in arms})
    for i in range(warmup):  # also where an export is made, once, before anything is timed
        for arm in arms:
            run_repeat(plans[arm], 0, None, progress, f"{arm}: warm-up {i + 1}/{warmup}")
    for number in range(1, rounds + 1):
        for arm in arms:
            result = run_repeat(plans[arm], number, store, progress, f"{arm}: round {number}/{rounds}", command="bench")
            outcome.records[arm].append(result.record)
    return outcome


@dataclass
class BenchDone:
    plan: Plan
    outcome: BenchOutcome
    store: ResultsStore
    figures: dict


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
    points = [({"runtime": "auto" if arm == DEFAULT else arm}, "auto" if arm == DEFAULT else request.precision)
              for arm in arms[1:]] or [({}, request.precision)]  # fmt: skip
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
        if arm != REFERENCE:
            out.update(ratios=outcome.ratios(arm), median_ratio=outcome.median_ratio(arm),
                       median_compute_ratio=outcome.median_ratio(arm, "compute_samples_per_s"))  # fmt: skip
        last = outcome.records[arm][-1]
        chose = {**_chose(last), **({"runtime_choice": last.plan["runtime_choice"]} if arm == DEFAULT else {})}
        return {**out, "choices": chose, "run_ids": [r.run_id for r in outcome.records[arm]]}

    data = plan.data
    return {
        "machine": machine_label(this_machine()),
        "cpu_flags": vector_flags(),
        "data": {"samples": data.samples, "data_gb": data.data_gb, "partitions": data.partitions},
        "batch_size": plan.batch_size,
        "precision": plan.precision,
        "arms": {arm: arm_figures(arm) for arm in outcome.arms},
    }
