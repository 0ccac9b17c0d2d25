"""Runs a Plan on its backend: warm-up runs, measured repeats, one record appended per finished repeat; and work
a backend left running (``--no-wait``), submitted and later collected into one record.

A repeat that fails or is interrupted part-way still leaves a record (status "failed" or "interrupted") with
the partitions it did finish, so nothing measured is lost; earlier repeats are already in the store.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from cai_bench.analysis.validity import verdict
from cai_bench.backends.base import BackendRun, PartitionsFailed, collect_command, load_job, save_job
from cai_bench.backends.registry import get_backend, requested_runtime
from cai_bench.commands.preflight import Ready, check_run
from cai_bench.core.errors import UserError
from cai_bench.core.machine import capture_environment, default_threads, machine_identity, this_machine
from cai_bench.core.plan import DataSummary, Plan, make_plan, plan_from_dict, work_units
from cai_bench.core.records import (
    RANDOM_INIT,
    PartitionResult,
    RunRecord,
    WorkerRecord,
    new_run_id,
    summarize_run,
    utc_now,
)
from cai_bench.data.datasets import resolve_data
from cai_bench.inference.runtime_choice import choose_runtime, fixed_choice
from cai_bench.measure.efficiency import achieved_gflops, gemm_peak, mfu
from cai_bench.measure.metrics import reset_peak_rss
from cai_bench.measure.photoz import upstream_paper_metrics
from cai_bench.model.flops import model_flops_per_sample
from cai_bench.store.jsonl import ResultsStore


class ProgressSink(Protocol):
    def begin(self, label: str, partitions: int, samples: int) -> None: ...
    def advance(self, record: WorkerRecord) -> None: ...
    def end(self) -> None: ...
    def note(self, text: str) -> None: ...  # what is happening before the clock starts (the runtime probe)


class SweepProgressSink(ProgressSink, Protocol):
    def sweep_begin(self, points: int, samples: int) -> None: ...
    def point_begin(self, number: int, label: str) -> None: ...
    def point_end(self, skipped: bool) -> None: ...
    def sweep_end(self) -> None: ...


class NoProgress:
    def note(self, text: str) -> None:
        pass

    def sweep_begin(self, points: int, samples: int) -> None:
        pass

    def point_begin(self, number: int, label: str) -> None:
        pass

    def point_end(self, skipped: bool) -> None:
        pass

    def sweep_end(self) -> None:
        pass

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


@dataclass(frozen=True)
class RunRequest:
    """What run, predict and bench are asked to measure, as their command lines give it."""

    backend: str = "cpu"
    backend_options: dict = field(default_factory=dict)
    data: str | Path | None = None
    gb: float | None = None
    partition_mb: float | None = None
    batch_size: int | None = None
    precision: str = "auto"
    engine: str = "fast"
    compile: bool = False
    threads: int | None = None
    oversubscribe: bool = False
    repeats: int = 1
    warmup: int = 0
    weights: str | Path | None = None
    seed: int = 0
    verify: bool = True
    cycle_to_gb: float | None = None
    wait: bool = True
    results: str | Path = "results"

    def check(self) -> Ready:
        """The pre-run checks, before any data is generated or anything runs."""
        sizes = {"gb": self.gb, "partition_mb": self.partition_mb, "cycle_to_gb": self.cycle_to_gb}
        return check_run(
            self.backend, [(self.backend_options, self.precision)], results=self.results, threads=self.threads,
            oversubscribe=self.oversubscribe, weights=self.weights, batch_size=self.batch_size, sizes=sizes,
            engine=self.engine, compile=self.compile, repeats=self.repeats, warmup=self.warmup,
            detach=None if self.wait else (self.repeats, self.warmup),
        )  # fmt: skip

    def plan(self, ready: Ready, synthesizing: Callable[[int, int], None] | None = None) -> Plan:
        """The plan of this request, its data resolved (synthetic data generated into the cache once)."""
        summary, refs = resolve_data(self.data, self.gb, self.partition_mb, self.seed, synthesizing)
        return make_plan(
            self.backend, summary, refs, batch_size=ready.batch_size, precision=self.precision,
            threads=self.threads, oversubscribe=self.oversubscribe, repeats=self.repeats, warmup=self.warmup,
            weights=ready.weights, seed=self.seed, verify_checksums=self.verify, engine=self.engine,
            compile=self.compile, backend_options=ready.options[0], cycle_to_gb=self.cycle_to_gb,
        )  # fmt: skip


@dataclass
class RunDone:
    """What ``run_command`` did: the records it appended, or the job it submitted and how to record it later."""

    store: ResultsStore
    records: list[RunRecord] = field(default_factory=list)
    submitted: tuple[str, str] | None = None  # (job id, the command that records it)


def run_command(request: RunRequest, progress=None) -> RunDone:
    """``cai-bench run``: the checks, the data, then the repeats (or, with ``wait=False``, the job submitted).
    ``progress`` is a ProgressSink that may also show data generation (``synthesizing(done, total)``)."""
    ready = request.check()
    plan = request.plan(ready, getattr(progress, "synthesizing", None))
    if not request.wait:
        return RunDone(ready.store, submitted=submit_plan(plan, ready.store))
    return RunDone(ready.store, [outcome.record for outcome in execute(plan, ready.store, progress)])


def labelled_accuracy(metrics: dict, weights: dict, data: DataSummary) -> dict:
    """Accuracy figures with whether they mean anything: not with random-init weights, and on synthetic
    galaxies they describe the synthetic galaxies, not SDSS."""
    out = dict(metrics)
    if weights.get("weights") == RANDOM_INIT:
        out["meaningful"] = False
        out["note"] = "random-init weights: computed, but they say nothing about the model"
    else:
        out["meaningful"] = True
        if (data.source or {}).get("kind") == "synthetic":
            out["note"] = "on synthetic galaxies, not SDSS: not comparable with published figures"
    return out


def run_accuracy(plan: Plan, results: list[PartitionResult], weights: dict) -> dict | None:
    """Accuracy of a run's predictions, when its data has labels."""
    if not plan.data.has_labels or not results:
        return None
    predicted = np.concatenate([r.prediction for r in results])
    true = np.concatenate([r.redshift for r in results])
    return labelled_accuracy(upstream_paper_metrics(predicted, true), weights, plan.data)


def run_environment(plan: Plan, ran_on: dict | None = None) -> dict:
    """Where a run is recorded as having run: this machine, with what the backend says of where its workers
    ran (``ran_on``: the nodes of an array), under the name the backend gives that place, where it gives one."""
    environment = {**capture_environment(), **(ran_on or {})}
    machine = get_backend(plan.backend).machine(plan)
    if machine:
        environment["machine_id"] = machine
    return environment


def plan_machine(plan: Plan) -> dict:
    """What identifies the machine ``plan`` will run on, before it runs (compared with records' environments)."""
    machine = get_backend(plan.backend).machine(plan)
    return {"machine_id": machine} if machine else this_machine()


# Backends whose workers run on this machine's CPU: the only ones a peak measured here speaks for
PEAK_BACKENDS = ("cpu", "hpc", "dask")


def add_efficiency(record: RunRecord, plan: Plan, threads: int | None) -> None:
    """The record's FLOPs per galaxy and GFLOP/s, and where its workers ran on this machine's CPU and it finished,
    the machine's fp32 peak at the run's threads (measured once, kept in the cache) and the MFU."""
    summary = record.summary
    summary.flops_per_sample = model_flops_per_sample()
    summary.gflops = achieved_gflops(summary.samples_per_s, summary.flops_per_sample)
    local = plan.backend in PEAK_BACKENDS and get_backend(plan.backend).machine(plan) is None
    if record.status != "ok" or not local:
        return
    peak = gemm_peak(machine_identity(), threads or default_threads())
    record.environment["fp32_peak"] = peak
    summary.mfu = mfu(summary.gflops, peak)


def _add_comm_seconds(workers: list, run: BackendRun | None) -> None:
    """--comm where results came before the collectives (hpc's pipes): each record gets its worker's seconds."""
    ranks = ((run.info.get("comm") or {}).get("ranks") or []) if run is not None else []
    by_worker = {r["worker"]: r["comm_s"] for r in ranks if r.get("worker") and r.get("comm_s") is not None}
    for worker in workers:
        if worker.comm_s is None and worker.worker_id in by_worker:
            worker.comm_s = by_worker[worker.worker_id]


def _record(
    plan: Plan,
    repeat: int,
    results: list[PartitionResult],
    wall_s: float,
    status: str,
    run: BackendRun | None = None,
    **extra,
) -> RunRecord:
    workers = [r.record for r in results]
    _add_comm_seconds(workers, run)
    summary = summarize_run(workers, wall_s)
    if run is not None:
        summary.cost_usd = run.cost_usd
        typed = {"workers": run.workers, "threads": run.threads}
        extra["backend_info"] = {**{k: v for k, v in typed.items() if v is not None}, **run.info,
                                 **extra.get("backend_info", {})}  # fmt: skip
        extra["weights"] = run.weights.to_dict()
    record = RunRecord(
        run_id=extra.pop("run_id", None) or new_run_id(),
        created_utc=utc_now(),
        status=status,
        backend=plan.backend,
        repeat=repeat,
        repeats=plan.repeats,
        plan=plan.to_record(),
        environment=run_environment(plan, run.environment if run is not None else None),
        summary=summary,
        workers=workers,
        accuracy=run_accuracy(plan, results, extra["weights"]),
        **extra,
    )
    # What validity reads of a record, without turning every unit's record into a dict
    light = {"backend": record.backend, "plan": record.plan, "summary": asdict(summary),
             "backend_info": record.backend_info, "workers": [{"precision": w.precision} for w in workers]}  # fmt: skip
    record.validity = verdict(light)
    add_efficiency(record, plan, run.threads if run is not None else None)
    return record


def run_repeat(
    plan: Plan,
    repeat: int,
    store: ResultsStore | None,
    progress: ProgressSink,
    label: str,
    on_result: Callable[[PartitionResult], None] | None = None,
    kind: str = "run",
    collect: Callable[[Plan, Callable[[PartitionResult], None]], BackendRun] | None = None,
    run_id: str | None = None,
    command: str = "run",
) -> RunOutcome:
    """One run of ``plan`` on its backend, appended to ``store`` (None: a warm-up, not recorded) as repeat
    number ``repeat``. ``collect`` stands in for the backend's ``run`` where the work was submitted earlier
    and is followed now (``collect_job``). ``run_id``: the record's id, where the caller named it beforehand."""
    backend = get_backend(plan.backend)
    collected: list[PartitionResult] = []

    def emit(result: PartitionResult) -> None:
        if on_result is not None:
            on_result(result)
        collected.append(result)
        progress.advance(result.record)

    reset_peak_rss()
    units = work_units(plan)
    progress.begin(label, len(units), sum(ref.samples for ref in units))
    start = time.perf_counter()
    try:
        run = (collect or backend.run)(plan, emit)
    except PartitionsFailed as exc:
        # The backend finished what it could: its own wall clock and facts go into the record
        if store is not None:
            failed = _record(
                plan,
                repeat,
                collected,
                exc.run.wall_s,
                "failed",
                run=exc.run,
                backend_info={"failed_partitions": exc.failed},
                error=str(exc),
                kind=kind,
                command=command,
            )
            store.append(failed)
        raise
    except KeyboardInterrupt as exc:
        if hasattr(exc, "collect"):  # detached work goes on without us, and ``collect`` records it whole
            raise
        _record_unfinished(plan, repeat, store, collected, start, exc, kind, run_id, command)
        raise
    except Exception as exc:
        _record_unfinished(plan, repeat, store, collected, start, exc, kind, run_id, command)
        raise
    finally:
        progress.end()
    info = {}
    if plan.cycle_to_gb is not None:  # the same for every backend: how often the data set was gone through
        info["partitions_processed"] = len(units)
        info["passes_over_data"] = len(units) / len(plan.partitions)
    record = _record(plan, repeat, collected, run.wall_s, "ok", run=run, backend_info=info, kind=kind, run_id=run_id,
                     command=command)  # fmt: skip
    if store is not None:
        store.append(record)
    return RunOutcome(record, collected)


def _record_unfinished(plan, repeat, store, collected, start, exc, kind, run_id=None, command="run") -> None:
    """What a run that stopped part-way finished, kept as a "failed" or "interrupted" record."""
    if store is None or not collected:
        return
    status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
    weights = {"weights": plan.weights or RANDOM_INIT}
    elapsed = time.perf_counter() - start
    error = str(exc) or type(exc).__name__
    store.append(
        _record(
            plan,
            repeat,
            collected,
            elapsed,
            status,
            weights=weights,
            error=error,
            kind=kind,
            run_id=run_id,
            command=command,
        )
    )


def resolve_runtime(plan: Plan, asked: dict | None = None, say: Callable[[str], None] | None = None) -> Plan:
    """``plan`` with --runtime auto resolved: the runtime and precision the probe chose, with its figures in
    ``runtime_choice``. ``asked`` keeps the answers of earlier calls (a sweep asks once per distinct probe). Torch
    without a probe where the probe cannot speak for the workers: the reference loop and torch.compile are
    torch's, and workers on other machines (SLURM tasks) are not this one; their precision stays as asked. ``say``
    is told what the probe does while it runs."""
    backend = get_backend(plan.backend)
    if requested_runtime(backend, plan.backend_options) != "auto":
        return plan
    layout = getattr(backend, "worker_layout", lambda _: None)(plan)
    if plan.engine == "reference" or plan.compile:
        runtime, precision, probe = fixed_choice("the reference loop and torch.compile are torch's", plan.precision)
    elif layout is None:
        runtime, precision, probe = fixed_choice("the workers run on other machines than this probe", plan.precision)
    else:
        asked = {} if asked is None else asked
        key = (plan.precision, layout, plan.weights, plan.seed, plan.batch_size)
        if key not in asked:
            asked[key] = choose_runtime(plan.weights, plan.seed, layout, plan.precision, plan.batch_size, say)
        runtime, precision, probe = asked[key]
    options = {**plan.backend_options, "runtime": runtime}
    return dataclasses.replace(plan, backend_options=options, precision=precision, runtime_choice=probe)


def execute(
    plan: Plan,
    store: ResultsStore | None,
    progress: ProgressSink | None = None,
    first_repeat: int = 1,
    *,
    on_result: Callable[[PartitionResult], None] | None = None,
    kind: str = "run",
    run_id: str | None = None,
    command: str = "run",
) -> list[RunOutcome]:
    """Warm-up runs (not recorded), then measured repeats ``first_repeat``..``plan.repeats``, each appended to
    ``store`` as soon as it finishes. ``on_result`` sees each partition's result of the measured repeats as it
    arrives (predict writes it out); the records are of ``kind``. ``run_id`` names a single repeat's record
    beforehand (predict writes it beside each partition's predictions)."""
    progress = progress or NoProgress()
    plan = resolve_runtime(plan, say=getattr(progress, "note", None))
    if plan.work_dir is None and store is not None:
        plan = dataclasses.replace(plan, work_dir=str(store.directory))
    for i in range(plan.warmup):
        run_repeat(plan, 0, None, progress, f"warm-up {i + 1}/{plan.warmup}")
    if run_id is not None and plan.repeats - first_repeat > 0:
        raise ValueError("a run id names one repeat's record")
    return [
        run_repeat(
            plan, r, store, progress, f"repeat {r}/{plan.repeats}", on_result, kind, run_id=run_id, command=command
        )
        for r in range(first_repeat, plan.repeats + 1)
    ]


def submit_plan(plan: Plan, store: ResultsStore) -> tuple[str, str]:
    """Submit ``plan`` and leave it running (``--no-wait``, checked by ``preflight``); returns its job id and the
    command that records it."""
    job = get_backend(plan.backend).submit(dataclasses.replace(resolve_runtime(plan), work_dir=str(store.directory)))
    save_job(store.directory, job)
    return job.job_id, collect_command(job.job_id, store.directory)


def collect_job(job_id: str, store: ResultsStore, progress: ProgressSink | None = None) -> RunOutcome:
    """Follow a submitted job to its end and record it, once (a second collect of the same job is refused)."""
    job, _ = load_job(store.directory, job_id)
    if job.state.get("collected_utc"):
        when = job.state["collected_utc"]
        raise UserError(f"job {job.job_id} was already recorded ({when}); see: cai-bench results list")
    if job.state.get("cancelled_utc"):
        when = job.state["cancelled_utc"]
        raise UserError(f"job {job.job_id} was cancelled at an interrupt ({when}); what its tasks finished is in its "
                        "interrupted record: run the same command again to continue")  # fmt: skip
    backend = get_backend(job.backend)
    plan = plan_from_dict(job.plan)
    try:
        follow = lambda _, emit: backend.collect(job, emit)  # noqa: E731
        outcome = run_repeat(plan, 1, store, progress or NoProgress(), f"job {job.job_id}", collect=follow,
                             command="collect")  # fmt: skip
    except KeyboardInterrupt as exc:
        exc.collect = collect_command(job.job_id, store.directory)
        raise
    except PartitionsFailed:
        _mark_collected(store, job)  # it ended, and its failed record is written
        raise
    _mark_collected(store, job)
    return outcome


def collect_run(job_id: str, results: str | Path, progress: ProgressSink | None = None) -> RunDone:
    """``cai-bench collect``: the store checked, then ``collect_job``."""
    store = ResultsStore(results)
    store.check_writable()
    return RunDone(store, [collect_job(job_id, store, progress).record])


def _mark_collected(store: ResultsStore, job) -> None:
    job.state["collected_utc"] = utc_now()
    save_job(store.directory, job)
