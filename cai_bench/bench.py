"""``cai-bench bench``: the reference loop and the fast path on the same data, side by side.

Runs alternate (reference, fast, reference, fast, ...) after unrecorded warm-ups of each, so slow drifts of a
noisy machine hit both alike; each pair gives a ratio and the median ratio is the answer. Every measured run
is an ordinary record in the store (its plan says which engine).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cai_bench.metrics import spread
from cai_bench.plan import BITS_PER_SAMPLE, Plan, replace_plan
from cai_bench.results import ResultsStore, RunRecord
from cai_bench.runner import ProgressSink, run_repeat

ARMS = ("reference", "fast")


@dataclass
class BenchOutcome:
    records: dict[str, list[RunRecord]] = field(default_factory=lambda: {arm: [] for arm in ARMS})

    def samples_per_s(self, arm: str) -> list[float]:
        return [r.summary.samples_per_s for r in self.records[arm]]

    def compute_samples_per_s(self, arm: str) -> list[float]:
        """Forward passes only, the steady state without start-up and loading: the sum over workers (lanes) of
        each one's samples / its own compute time."""
        return [r.summary.sum_worker_throughput_bps / BITS_PER_SAMPLE for r in self.records[arm]]

    def ratios(self, measure: str = "samples_per_s") -> list[float]:
        fast, reference = getattr(self, measure)("fast"), getattr(self, measure)("reference")
        return [f / r for f, r in zip(fast, reference, strict=True) if r > 0]

    def median_ratio(self, measure: str = "samples_per_s") -> float:
        return spread(self.ratios(measure)).median

    def peak_rss_bytes(self, arm: str) -> int:
        return max(r.summary.peak_rss_bytes for r in self.records[arm])


def bench_plans(plan: Plan) -> dict[str, Plan]:
    """The two arms on the same data and batch size: the eager fp32 reference and the default fast path."""
    return {
        "reference": replace_plan(plan, engine="reference", precision="fp32", compile=False),
        "fast": replace_plan(plan, engine="fast"),
    }


def run_bench(
    plan: Plan, pairs: int, warmup: int, store: ResultsStore | None, progress: ProgressSink | None = None
) -> BenchOutcome:
    from cai_bench.runner import NoProgress

    progress = progress or NoProgress()
    plans = bench_plans(plan)
    outcome = BenchOutcome()
    for i in range(warmup):
        for arm in ARMS:
            run_repeat(plans[arm], 0, None, progress, f"{arm}: warm-up {i + 1}/{warmup}")
    for pair in range(1, pairs + 1):
        for arm in ARMS:
            result = run_repeat(plans[arm], pair, store, progress, f"{arm}: pair {pair}/{pairs}")
            outcome.records[arm].append(result.record)
    return outcome
