"""Runs a Plan on its backend: warm-up runs, measured repeats, one record appended per finished repeat.

A repeat that fails or is interrupted part-way still leaves a record (status "failed" or "interrupted") with
the partitions it did finish, so nothing measured is lost; earlier repeats are already in the store.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from cai_bench.backends import get_backend
from cai_bench.data.partitions import MANIFEST, open_dataset, synthesize
from cai_bench.data.synthetic import GENERATOR_VERSION
from cai_bench.engine import PartitionResult, WorkerRecord
from cai_bench.errors import UserError
from cai_bench.metrics import reset_peak_rss
from cai_bench.model.checkpoint import RANDOM_INIT
from cai_bench.plan import DataSummary, PartitionRef, Plan
from cai_bench.results import ResultsStore, RunRecord, capture_environment, new_run_id, summarize_run, utc_now

DEFAULT_GB = 0.1  # 5,231 samples: 16-20 s of fp32 inference on the 2-core dev machine
DEFAULT_PARTITION_MB = 25.0


class ProgressSink(Protocol):
    def begin(self, label: str, partitions: int, samples: int) -> None: ...
    def advance(self, record: WorkerRecord) -> None: ...
    def end(self) -> None: ...


class NoProgress:
    def begin(self, label: str, partitions: int, samples: int) -> None:
        pass

    def advance(self, record: WorkerRecord) -> None:
        pass

    def end(self) -> None:
        pass


@dataclass
class RunOutcome:
    record: RunRecord
    results: list[PartitionResult] = field(default_factory=list)


def cache_dir() -> Path:
    if os.environ.get("CAI_BENCH_CACHE"):
        return Path(os.environ["CAI_BENCH_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cai-bench"


def cached_synthetic(
    gb: float, partition_mb: float, seed: int, progress: Callable[[int, int], None] | None = None
) -> Path:
    """A synthetic data set in the cache, generated on first use and reused after."""
    path = cache_dir() / "datasets" / f"synthetic-v{GENERATOR_VERSION}-seed{seed}-{gb:g}gb-{partition_mb:g}mb"
    if not (path / MANIFEST).is_file():
        synthesize(path, gb, partition_mb, seed, overwrite=True, progress=progress)
    return path


def resolve_data(
    data: str | Path | None,
    gb: float | None,
    partition_mb: float | None,
    seed: int,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[DataSummary, tuple[PartitionRef, ...]]:
    """The data a run uses: a given directory, or synthetic data of ``gb`` (default 0.1 GB) from the cache."""
    if data is not None and gb is not None:
        raise UserError("give either --data DIR or --gb X, not both")
    if data is None:
        gb = DEFAULT_GB if gb is None else gb
        data = cached_synthetic(gb, DEFAULT_PARTITION_MB if partition_mb is None else partition_mb, seed, progress)
    manifest, summary, refs = open_dataset(data)
    if partition_mb is not None and abs(partition_mb - manifest.partition_mb) > 1e-9:
        raise UserError(
            f"{data}: partitioned at {manifest.partition_mb:g} MB, not {partition_mb:g} MB; "
            f"re-partition it with: cai-bench data split {data} --partition-mb {partition_mb:g} --out DIR"
        )
    return summary, refs


def _record(plan: Plan, repeat: int, workers: list[WorkerRecord], wall_s: float, status: str, **extra) -> RunRecord:
    return RunRecord(
        run_id=new_run_id(),
        created_utc=utc_now(),
        status=status,
        backend=plan.backend,
        repeat=repeat,
        repeats=plan.repeats,
        plan=plan.to_record(),
        environment=capture_environment(),
        summary=summarize_run(workers, wall_s),
        workers=workers,
        **extra,
    )


def _run_once(plan: Plan, repeat: int, store: ResultsStore | None, progress: ProgressSink, label: str) -> RunOutcome:
    backend = get_backend(plan.backend)
    collected: list[PartitionResult] = []

    def emit(result: PartitionResult) -> None:
        collected.append(result)
        progress.advance(result.record)

    reset_peak_rss()
    progress.begin(label, len(plan.partitions), plan.data.samples)
    start = time.perf_counter()
    try:
        run = backend.run(plan, emit)
    except (Exception, KeyboardInterrupt) as exc:
        if store is not None and collected:
            status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
            weights = {"weights": plan.weights or RANDOM_INIT}
            store.append(
                _record(
                    plan,
                    repeat,
                    [r.record for r in collected],
                    time.perf_counter() - start,
                    status,
                    weights=weights,
                    error=str(exc) or type(exc).__name__,
                )
            )
        raise
    finally:
        progress.end()
    record = _record(
        plan,
        repeat,
        [r.record for r in collected],
        run.wall_s,
        "ok",
        weights=run.weights.to_dict(),
        backend_info=run.info,
    )
    if store is not None:
        store.append(record)
    return RunOutcome(record, collected)


def execute(plan: Plan, store: ResultsStore | None, progress: ProgressSink | None = None) -> list[RunOutcome]:
    """Warm-up runs (not recorded), then ``plan.repeats`` measured runs, each appended to ``store`` at once."""
    progress = progress or NoProgress()
    for i in range(plan.warmup):
        _run_once(plan, 0, None, progress, f"warm-up {i + 1}/{plan.warmup}")
    return [_run_once(plan, r, store, progress, f"repeat {r}/{plan.repeats}") for r in range(1, plan.repeats + 1)]
