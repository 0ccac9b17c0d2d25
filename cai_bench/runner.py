"""Runs a Plan on its backend (warm-up runs, measured repeats, one record appended per finished repeat), and a
sweep of plans that resumes where an earlier one stopped.

A repeat that fails or is interrupted part-way still leaves a record (status "failed" or "interrupted") with
the partitions it did finish, so nothing measured is lost; earlier repeats are already in the store. A sweep
counts only "ok" records as done, so a rerun repeats exactly what is missing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

try:
    import fcntl
except ImportError:  # Windows: no lock between sweeps
    fcntl = None

from cai_bench.backends import BackendRun, get_backend
from cai_bench.backends.base import Detachable, PartitionsFailed, collect_command, load_job, save_job
from cai_bench.data.partitions import MANIFEST, open_dataset, synthesize
from cai_bench.data.synthetic import GENERATOR_VERSION
from cai_bench.errors import UserError
from cai_bench.metrics import accuracy, allowed_cpus, reset_peak_rss
from cai_bench.model.checkpoint import RANDOM_INIT
from cai_bench.plan import (
    DataSummary,
    PartitionRef,
    Plan,
    SweepPoint,
    SweepSpec,
    check_size,
    data_gb,
    make_plan,
    partition_count,
    plan_from_dict,
    samples_for_gb,
    work_units,
)
from cai_bench.records import PartitionResult, WorkerRecord
from cai_bench.results import (
    ResultsStore,
    RunRecord,
    capture_environment,
    new_run_id,
    point_key,
    record_point_key,
    summarize_run,
    this_machine,
    utc_now,
)

DEFAULT_GB = 0.1  # 5,231 samples: 16-20 s of fp32 inference on the 2-core dev machine
DEFAULT_PARTITION_MB = 25.0


class ProgressSink(Protocol):
    def begin(self, label: str, partitions: int, samples: int) -> None: ...
    def advance(self, record: WorkerRecord) -> None: ...
    def end(self) -> None: ...


class SweepProgressSink(ProgressSink, Protocol):
    def sweep_begin(self, points: int, samples: int) -> None: ...
    def point_begin(self, number: int, label: str) -> None: ...
    def point_end(self, skipped: bool) -> None: ...
    def sweep_end(self) -> None: ...


class NoProgress:
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


def cache_dir() -> Path:
    if os.environ.get("CAI_BENCH_CACHE"):
        return Path(os.environ["CAI_BENCH_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cai-bench"


def synthetic_dir(gb: float, partition_mb: float, seed: int) -> Path:
    return cache_dir() / "datasets" / f"synthetic-v{GENERATOR_VERSION}-seed{seed}-{gb:g}gb-{partition_mb:g}mb"


def cached_synthetic(
    gb: float, partition_mb: float, seed: int, progress: Callable[[int, int], None] | None = None
) -> Path:
    """A synthetic data set in the cache, generated on first use and reused after."""
    path = synthetic_dir(gb, partition_mb, seed)
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


def check_sizes(**options: float | None) -> None:
    """Refuse size options (``gb=``, ``partition_mb=``, ``cycle_to_gb=``) that are not positive finite numbers,
    before anything is generated."""
    for name, value in options.items():
        if value is not None:
            check_size(value, "--" + name.replace("_", "-"))


def check_threads(threads: int | None, backend_options: dict, oversubscribe: bool) -> None:
    """Refuse more threads than this process may use, unless ``oversubscribe``: they would take turns on the
    same cores, and the figures would measure the taking turns. A SLURM array's threads are on its nodes."""
    if backend_options.get("slurm"):
        return
    asked = {
        "--threads": threads or 0,
        "--workers": backend_options.get("workers") or 0,
        "--lanes": backend_options.get("lanes") or 0,
    }
    option, wanted = max(asked.items(), key=lambda item: item[1])
    allowed = allowed_cpus()
    if wanted > allowed and not oversubscribe:
        raise UserError(
            f"{option} {wanted}: this process may use {allowed} CPU(s), so {wanted} threads would share them and "
            "the figures would measure the sharing; use fewer, or pass --oversubscribe (the point is then marked)"
        )


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
    return labelled_accuracy(accuracy(predicted, true), weights, plan.data)


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
    summary = summarize_run(workers, wall_s)
    if run is not None:
        summary.cost_usd = run.cost_usd
        typed = {"workers": run.workers, "threads": run.threads}
        extra["backend_info"] = {**{k: v for k, v in typed.items() if v is not None}, **run.info,
                                 **extra.get("backend_info", {})}  # fmt: skip
        extra["weights"] = run.weights.to_dict()
    return RunRecord(
        run_id=new_run_id(),
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


def run_repeat(
    plan: Plan,
    repeat: int,
    store: ResultsStore | None,
    progress: ProgressSink,
    label: str,
    on_result: Callable[[PartitionResult], None] | None = None,
    kind: str = "run",
    collect: Callable[[Plan, Callable[[PartitionResult], None]], BackendRun] | None = None,
) -> RunOutcome:
    """One run of ``plan`` on its backend, appended to ``store`` (None: a warm-up, not recorded) as repeat
    number ``repeat``. ``collect`` stands in for the backend's ``run`` where the work was submitted earlier
    and is followed now (``collect_job``)."""
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
            )
            store.append(failed)
        raise
    except KeyboardInterrupt as exc:
        if hasattr(exc, "collect"):  # detached work goes on without us, and ``collect`` records it whole
            raise
        _record_unfinished(plan, repeat, store, collected, start, exc, kind)
        raise
    except Exception as exc:
        _record_unfinished(plan, repeat, store, collected, start, exc, kind)
        raise
    finally:
        progress.end()
    info = {}
    if plan.cycle_to_gb is not None:  # the same for every backend: how often the data set was gone through
        info["partitions_processed"] = len(units)
        info["passes_over_data"] = len(units) / len(plan.partitions)
    record = _record(plan, repeat, collected, run.wall_s, "ok", run=run, backend_info=info, kind=kind)
    if store is not None:
        store.append(record)
    return RunOutcome(record, collected)


def _record_unfinished(plan, repeat, store, collected, start, exc, kind) -> None:
    """What a run that stopped part-way finished, kept as a "failed" or "interrupted" record."""
    if store is None or not collected:
        return
    status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
    weights = {"weights": plan.weights or RANDOM_INIT}
    elapsed = time.perf_counter() - start
    error = str(exc) or type(exc).__name__
    store.append(_record(plan, repeat, collected, elapsed, status, weights=weights, error=error, kind=kind))


def execute(
    plan: Plan,
    store: ResultsStore | None,
    progress: ProgressSink | None = None,
    first_repeat: int = 1,
    *,
    on_result: Callable[[PartitionResult], None] | None = None,
    kind: str = "run",
) -> list[RunOutcome]:
    """Warm-up runs (not recorded), then measured repeats ``first_repeat``..``plan.repeats``, each appended to
    ``store`` as soon as it finishes. ``on_result`` sees each partition's result of the measured repeats as it
    arrives (predict writes it out); the records are of ``kind``."""
    progress = progress or NoProgress()
    if plan.work_dir is None and store is not None:
        plan = dataclasses.replace(plan, work_dir=str(store.directory))
    for i in range(plan.warmup):
        run_repeat(plan, 0, None, progress, f"warm-up {i + 1}/{plan.warmup}")
    return [
        run_repeat(plan, r, store, progress, f"repeat {r}/{plan.repeats}", on_result, kind)
        for r in range(first_repeat, plan.repeats + 1)
    ]


def check_detach(backend_name: str, options: dict, repeats: int, warmup: int) -> None:
    """Refuse ``--no-wait`` before any work where the backend cannot leave its work running."""
    backend = get_backend(backend_name)
    if not isinstance(backend, Detachable):
        raise UserError(f"--no-wait: --backend {backend_name} runs while the command waits; it cannot detach")
    if repeats > 1 or warmup:
        raise UserError("--no-wait submits one run: leave out --repeats and --warmup")
    backend.check_detach(options)


def submit_plan(plan: Plan, store: ResultsStore) -> tuple[str, str]:
    """Submit ``plan`` and leave it running (``--no-wait``); returns its job id and the command that records it."""
    check_detach(plan.backend, plan.backend_options, plan.repeats, plan.warmup)
    job = get_backend(plan.backend).submit(dataclasses.replace(plan, work_dir=str(store.directory)))
    save_job(store.directory, job)
    return job.job_id, collect_command(job.job_id, store.directory)


def collect_job(job_id: str, store: ResultsStore, progress: ProgressSink | None = None) -> RunOutcome:
    """Follow a submitted job to its end and record it, once (a second collect of the same job is refused)."""
    job, _ = load_job(store.directory, job_id)
    if job.state.get("collected_utc"):
        when = job.state["collected_utc"]
        raise UserError(f"job {job.job_id} was already recorded ({when}); see: cai-bench results list")
    backend = get_backend(job.backend)
    plan = plan_from_dict(job.plan)
    try:
        follow = lambda _, emit: backend.collect(job, emit)  # noqa: E731
        outcome = run_repeat(plan, 1, store, progress or NoProgress(), f"job {job.job_id}", collect=follow)
    except KeyboardInterrupt as exc:
        exc.collect = collect_command(job.job_id, store.directory)
        raise
    except PartitionsFailed:
        _mark_collected(store, job)  # it ended, and its failed record is written
        raise
    _mark_collected(store, job)
    return outcome


def _mark_collected(store: ResultsStore, job) -> None:
    job.state["collected_utc"] = utc_now()
    save_job(store.directory, job)


# ---------------------------------------------------------------------------------------------- sweeps


@dataclass
class SweepPointState:
    point: SweepPoint
    key: str
    done: int  # "ok" repeats already in the store for this plan on this machine
    todo: int  # repeats this sweep runs
    precision: str  # what the point runs: its precision, with "auto" resolved once for the whole sweep


@dataclass
class SweepOutcome:
    points: list[SweepPointState]
    records: list[RunRecord] = field(default_factory=list)  # what this invocation appended
    auto_precision: dict | None = None  # the probe that resolved the sweep's "auto" points, where it ran
    auto_precisions: dict = field(default_factory=dict)  # runtime -> its probe, where the sweep has several


def _plan_options(spec: SweepSpec, point: SweepPoint, precision: str) -> dict:
    return {
        "batch_size": point.batch_size,
        "precision": precision,
        "threads": spec.threads,
        "repeats": spec.repeats,
        "warmup": spec.warmup,
        "weights": spec.weights,
        "seed": spec.seed,
        "verify_checksums": spec.verify_checksums,
        "engine": spec.engine,
        "compile": spec.compile,
        "oversubscribe": spec.oversubscribe,
        "backend_options": {k: dict(v) if isinstance(v, tuple) else v for k, v in point.backend_options},
    }


def _point_runtime(point: SweepPoint) -> str:
    return dict(point.backend_options).get("runtime") or "torch"


def resolve_auto_precision(spec: SweepSpec, runtime: str = "torch") -> tuple[str, dict]:
    """What "auto" runs as on this machine and ``runtime``, probed once for a whole sweep, so that all repeats
    of a point run the same precision (each run's own probe could answer differently on a machine where bf16 is
    only a little faster) and the sweep knows which points the store already holds."""
    if spec.engine == "reference":
        return "fp32", {"chose": "fp32", "why": "the reference engine runs fp32"}
    if runtime == "onnxruntime":
        return "fp32", {"chose": "fp32", "why": "onnxruntime's CPU provider has no bf16; int8 only by explicit choice"}
    if runtime == "openvino":
        from cai_bench.backends.cpu import default_threads
        from cai_bench.runtimes import model_for_workers, read_export, runtime_module

        module = runtime_module("openvino")
        model, _ = model_for_workers(spec.weights, "openvino", spec.seed)
        core = module.ov.Core()
        threads = spec.threads or default_threads()
        return module.choose_precision(core, core.read_model(read_export(model).model_file), threads)
    import torch

    from cai_bench.engine import choose_precision
    from cai_bench.model.astromae import build_model
    from cai_bench.model.inference import prepare_for_inference

    model = build_model(seed=spec.seed).eval()
    choices = prepare_for_inference(model)
    return choose_precision(model, torch.device("cpu"), choices["channels_last"])


def resolve_auto_precisions(spec: SweepSpec) -> tuple[dict[str, str], dict[str, dict]]:
    """``resolve_auto_precision`` for each runtime the sweep's "auto" points run on."""
    chosen, probes = {}, {}
    for runtime in sorted({_point_runtime(p) for p in spec.points() if p.precision == "auto"}):
        chosen[runtime], probes[runtime] = resolve_auto_precision(spec, runtime)
    return chosen, probes


def _expected_summary(point: SweepPoint, seed: int) -> DataSummary:
    """What the synthetic data of a point will be, without generating it (its identity is known in advance)."""
    samples = samples_for_gb(point.gb)
    return DataSummary(
        path=str(synthetic_dir(point.gb, point.partition_mb, seed)),
        dataset_id="",
        source={"kind": "synthetic", "seed": seed, "generator_version": GENERATOR_VERSION, "gb": point.gb},
        samples=samples,
        data_gb=data_gb(samples),
        partition_mb=point.partition_mb,
        partitions=partition_count(samples, point.partition_mb),
    )


def _done_counts(store: ResultsStore) -> dict[str, int]:
    done: dict[str, int] = {}
    for record in store.runs():
        key = record_point_key(record)
        done[key] = done.get(key, 0) + 1
    return done


def sweep_state(
    spec: SweepSpec, store: ResultsStore, force: bool = False, auto_as: dict[str, str] | None = None
) -> list[SweepPointState]:
    """Each point of the sweep with the repeats already in the store (for this plan, on this machine).

    ``auto_as`` is what "auto" runs as on each runtime (``resolve_auto_precisions``). Points on the same data
    run one after another (in the order the grids first name that data), so each data set is needed during one
    stretch of the sweep only.
    """
    done = _done_counts(store)
    states = []
    points = spec.points()
    if auto_as is None and any(p.precision == "auto" for p in points):
        auto_as, _ = resolve_auto_precisions(spec)
    first_use = {}
    for index, point in enumerate(points):
        first_use.setdefault((point.gb, point.partition_mb), index)
    points.sort(key=lambda p: first_use[(p.gb, p.partition_mb)])
    for point in points:
        precision = auto_as[_point_runtime(point)] if point.precision == "auto" else point.precision
        options = _plan_options(spec, point, precision)
        expected = Plan(spec.backend, _expected_summary(point, spec.seed), (), **options)
        key = point_key(expected.to_record(), plan_machine(expected))
        have = 0 if force else min(done.get(key, 0), spec.repeats)
        states.append(SweepPointState(point, key, have, spec.repeats - have, precision))
    return states


@contextmanager
def point_lock(store: ResultsStore, key: str, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold the lock of one point of ``store``: a second sweep into the same results waits here while the first
    measures the point (two measurements at once on one machine would also slow each other down)."""
    locks = store.directory / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    path = locks / (hashlib.sha256(key.encode()).hexdigest()[:24] + ".lock")
    with open(path, "a+") as fh:
        if fcntl is not None:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if on_wait is not None:
                    on_wait()
                fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(fh, fcntl.LOCK_UN)


def run_sweep(
    spec: SweepSpec,
    store: ResultsStore,
    *,
    force: bool = False,
    keep_data: bool = True,
    progress: SweepProgressSink | None = None,
    synth_progress: Callable[[int, int], None] | None = None,
    on_wait: Callable[[SweepPoint], None] | None = None,
) -> SweepOutcome:
    """Run every point of ``spec`` that lacks repeats in ``store`` (all of them with ``force``).

    Each point's data is generated once into the cache and reused; each finished repeat is appended at once,
    so an interrupted sweep loses at most the repeat in flight and a rerun continues from there. A point is
    measured under its lock (``point_lock``), and what it lacks is counted again once the lock is held, so two
    sweeps into one results directory never both measure it. With ``keep_data=False`` a data set this sweep
    generated is deleted after its last point (the paper's grid would otherwise keep about 175 GB).
    """
    progress = progress or NoProgress()
    probes: dict[str, dict] = {}
    auto_as = None
    if any(p.precision == "auto" for p in spec.points()):
        auto_as, probes = resolve_auto_precisions(spec)
    states = sweep_state(spec, store, force, auto_as)
    outcome = SweepOutcome(states, auto_precision=probes.get("torch") or next(iter(probes.values()), None))
    outcome.auto_precisions = probes
    total = sum(samples_for_gb(s.point.gb) * (s.todo + spec.warmup) for s in states if s.todo)
    progress.sweep_begin(len(states), total)
    generated: set[Path] = set()
    try:
        for number, state in enumerate(states, start=1):
            progress.point_begin(number, state.point.label())
            if state.todo == 0:
                progress.point_end(skipped=True)
                continue
            point = state.point
            with point_lock(store, state.key, lambda point=point: on_wait and on_wait(point)):
                if not force:  # another sweep may have measured it while this one waited or ran other points
                    state.done = min(_done_counts(store).get(state.key, 0), spec.repeats)
                    state.todo = spec.repeats - state.done
                if state.todo == 0:
                    progress.point_end(skipped=True)
                    continue
                directory = synthetic_dir(point.gb, point.partition_mb, spec.seed)
                if not (directory / MANIFEST).is_file():
                    generated.add(directory)
                summary, refs = resolve_data(None, point.gb, point.partition_mb, spec.seed, synth_progress)
                plan = make_plan(spec.backend, summary, refs, **_plan_options(spec, point, state.precision))
                if point_key(plan.to_record(), plan_machine(plan)) != state.key:
                    raise RuntimeError(f"{summary.path}: the cached data set is not the one the sweep expected")
                outcomes = execute(plan, store, progress, first_repeat=state.done + 1)
            outcome.records.extend(o.record for o in outcomes)
            progress.point_end(skipped=False)
            data = (point.gb, point.partition_mb)
            needed_later = any((s.point.gb, s.point.partition_mb) == data for s in states[number:] if s.todo)
            if not keep_data and directory in generated and not needed_later:
                shutil.rmtree(directory, ignore_errors=True)
    finally:
        progress.sweep_end()
    return outcome
