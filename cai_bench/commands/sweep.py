"""A sweep: every point of a grid run as plans through the runner, resuming where an earlier sweep stopped.

A sweep counts only "ok" records as done, so a rerun repeats exactly what is missing; each point is measured
under a lock in the results directory, so two sweeps into one store never measure the same point twice.
"""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from cai_bench.analysis.report import PointReport, summarize_points
from cai_bench.analysis.results import point_key, read_records, record_point_key
from cai_bench.backends.registry import get_backend
from cai_bench.commands.preflight import check_run
from cai_bench.commands.runner import NoProgress, SweepProgressSink, execute, plan_machine, resolve_runtime
from cai_bench.core.errors import UserError
from cai_bench.core.files import exclusive
from cai_bench.core.machine import default_threads
from cai_bench.core.plan import (
    DataSummary,
    Plan,
    SweepPoint,
    SweepSpec,
    data_gb,
    load_sweep_config,
    make_plan,
    partition_count,
    samples_for_gb,
    sweep_backend,
)
from cai_bench.core.plan import make_sweep as make_sweep_spec
from cai_bench.core.records import RunRecord
from cai_bench.data.datasets import resolve_data, synthetic_dir
from cai_bench.data.storage import MANIFEST
from cai_bench.data.synthetic import GENERATOR_VERSION
from cai_bench.inference.loop import auto_precision
from cai_bench.store.jsonl import ResultsStore


def make_sweep(config: dict | None = None, *, where: str = "", overrides: dict | None = None) -> SweepSpec:
    """``plan.make_sweep`` with the options and default batch size of the backend the sweep runs on."""
    try:
        known = get_backend(sweep_backend(config, overrides))
    except UserError:
        known = None  # refused where the sweep's backend is looked up, before anything runs
    return make_sweep_spec(config, where=where, overrides=overrides, known=known)


def sweep_spec(config: str | None, overrides: dict) -> SweepSpec:
    """The sweep a command line asks for: a preset or TOML file (``config``), with the command line's values."""
    table, where = load_sweep_config(config) if config else ({}, "")
    return make_sweep(table, where=where, overrides=overrides)


@dataclass
class SweepPointState:
    point: SweepPoint
    key: str
    done: int  # "ok" repeats already in the store for this plan on this machine
    todo: int  # repeats this sweep runs
    precision: str  # what the point runs: its precision, with "auto" resolved once for the whole sweep
    plan_options: dict = field(default_factory=dict)  # make_plan's options for the point, "auto" resolved
    reused: list[dict] = field(default_factory=list)  # the repeats in the store it takes: run id, when, command


@dataclass
class SweepOutcome:
    points: list[SweepPointState]
    records: list[RunRecord] = field(default_factory=list)  # what this invocation appended
    auto_precision: dict | None = None  # the probe that resolved the sweep's "auto" points, where it ran
    auto_precisions: dict = field(default_factory=dict)  # runtime -> its probe, where the sweep has several
    runtime_choices: list[dict] = field(default_factory=list)  # --runtime auto's answers, one per distinct probe


def _point_options(point: SweepPoint) -> dict:
    """A point's backend options as a plan holds them (a KEY=VALUE option is kept as sorted pairs in a point)."""
    return {k: dict(v) if isinstance(v, tuple) else v for k, v in point.backend_options}


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
        "backend_options": _point_options(point),
    }


def resolve_auto_precision(spec: SweepSpec, runtime: str = "torch") -> tuple[str, dict]:
    """What "auto" runs as on this machine and ``runtime``, probed once for a whole sweep, so that all repeats
    of a point run the same precision (each run's own probe could answer differently on a machine where bf16 is
    only a little faster) and the sweep knows which points the store already holds."""
    if spec.engine == "reference":
        return "fp32", {"chose": "fp32", "why": "the reference engine runs fp32"}
    return auto_precision(runtime, spec.weights, spec.seed, spec.threads or default_threads())


@dataclass
class AutoAnswers:
    """What "auto" runs as in a sweep, asked once per distinct question for all its points, so that every repeat
    of a point runs the same and the sweep knows which points the store already holds: --runtime auto per probe
    (``runner.resolve_runtime``), then precision "auto" per runtime where the runtime's answer left it open."""

    spec: SweepSpec
    say: Callable[[str], None] | None = None  # told what the runtime probe does while it runs
    runtimes: dict = field(default_factory=dict)  # resolve_runtime's answers
    precisions: dict = field(default_factory=dict)  # runtime -> (precision, the probe's figures)

    def plan(self, point: SweepPoint) -> Plan:
        """The plan ``point`` will run (its data as expected, without generating it), "auto" resolved."""
        options = _plan_options(self.spec, point, point.precision)
        expected = Plan(self.spec.backend, _expected_summary(point, self.spec.seed), (), **options)
        expected = resolve_runtime(expected, self.runtimes, self.say)
        if expected.precision == "auto":
            runtime = expected.backend_options.get("runtime") or "torch"
            if runtime not in self.precisions:
                self.precisions[runtime] = resolve_auto_precision(self.spec, runtime)
            expected = dataclasses.replace(expected, precision=self.precisions[runtime][0])
        return expected

    def probes(self) -> tuple[dict, list[dict]]:
        """The precision probes by runtime, and the distinct runtime choices, for the sweep's outcome."""
        choices = [answer[2] for answer in self.runtimes.values()]
        return {runtime: probe for runtime, (_, probe) in self.precisions.items()}, choices


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


def _done_records(store: ResultsStore) -> dict[str, list[dict]]:
    """The finished repeats in the store by point: when each was measured and by which command."""
    done: dict[str, list[dict]] = {}
    for record in store.runs():
        done.setdefault(record_point_key(record), []).append(
            {"run_id": record.get("run_id"), "created_utc": record.get("created_utc"), "command": record.get("command")}
        )
    return done


def sweep_state(
    spec: SweepSpec, store: ResultsStore, force: bool = False, answers: AutoAnswers | None = None
) -> list[SweepPointState]:
    """Each point of the sweep with the repeats already in the store (for this plan, on this machine).

    ``answers`` holds what "auto" runs as (asked here where not given). Points on the same data run one after
    another (in the order the grids first name that data), so each data set is needed during one stretch of the
    sweep only.
    """
    done = _done_records(store)
    answers = answers or AutoAnswers(spec)
    states = []
    points = spec.points()
    first_use = {}
    for index, point in enumerate(points):
        first_use.setdefault((point.gb, point.partition_mb), index)
    points.sort(key=lambda p: first_use[(p.gb, p.partition_mb)])
    for point in points:
        expected = answers.plan(point)
        key = point_key(expected.to_record(), plan_machine(expected))
        have = 0 if force else min(len(done.get(key, [])), spec.repeats)
        options = {**_plan_options(spec, point, expected.precision), "backend_options": expected.backend_options,
                   "runtime_choice": expected.runtime_choice}  # fmt: skip
        states.append(SweepPointState(point, key, have, spec.repeats - have, expected.precision, options,
                                      done.get(key, [])[:have]))  # fmt: skip
    return states


@contextmanager
def point_lock(store: ResultsStore, key: str, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold the lock of one point of ``store``: a second sweep into the same results waits here while the first
    measures the point (two measurements at once on one machine would also slow each other down)."""
    with exclusive(store.directory / ".locks" / (hashlib.sha256(key.encode()).hexdigest()[:24] + ".lock"), on_wait):
        yield


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
    answers = AutoAnswers(spec, getattr(progress, "note", None))
    states = sweep_state(spec, store, force, answers)
    probes, choices = answers.probes()
    outcome = SweepOutcome(states, auto_precision=probes.get("torch") or next(iter(probes.values()), None))
    outcome.auto_precisions, outcome.runtime_choices = probes, choices
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
                    found = _done_records(store).get(state.key, [])
                    state.done = min(len(found), spec.repeats)
                    state.todo, state.reused = spec.repeats - state.done, found[: state.done]
                if state.todo == 0:
                    progress.point_end(skipped=True)
                    continue
                directory = synthetic_dir(point.gb, point.partition_mb, spec.seed)
                if not (directory / MANIFEST).is_file():
                    generated.add(directory)
                summary, refs = resolve_data(None, point.gb, point.partition_mb, spec.seed, synth_progress)
                plan = make_plan(spec.backend, summary, refs, **state.plan_options)
                if point_key(plan.to_record(), plan_machine(plan)) != state.key:
                    raise RuntimeError(f"{summary.path}: the cached data set is not the one the sweep expected")
                outcomes = execute(plan, store, progress, first_repeat=state.done + 1, command="sweep")
            outcome.records.extend(o.record for o in outcomes)
            progress.point_end(skipped=False)
            data = (point.gb, point.partition_mb)
            needed_later = any((s.point.gb, s.point.partition_mb) == data for s in states[number:] if s.todo)
            if not keep_data and directory in generated and not needed_later:
                shutil.rmtree(directory, ignore_errors=True)
    finally:
        progress.sweep_end()
    return outcome


@dataclass
class SweepDone:
    spec: SweepSpec
    outcome: SweepOutcome
    points: list[PointReport]  # the sweep's points as the store now holds them (medians, spread)
    store: ResultsStore


def sweep_command(
    config: str | None,
    overrides: dict,
    results: str | Path,
    *,
    force: bool = False,
    keep_data: bool = True,
    progress: SweepProgressSink | None = None,
    on_wait: Callable[[SweepPoint], None] | None = None,
    warn: Callable[[str], None] | None = None,
) -> SweepDone:
    """``cai-bench sweep``: the spec from a preset or file and the command line, every point's checks before
    anything runs (the store read whole too: a broken or newer one fails here, ``warn`` gets what it skipped),
    then ``run_sweep``."""
    spec = sweep_spec(config, overrides)
    points = [(_point_options(p), p.precision) for p in spec.points()]
    ready = check_run(spec.backend, points, results=results, threads=spec.threads, oversubscribe=spec.oversubscribe,
                      weights=spec.weights, engine=spec.engine, compile=spec.compile, repeats=spec.repeats,
                      warmup=spec.warmup)  # fmt: skip
    spec = dataclasses.replace(spec, weights=ready.weights)
    read_records(ready.store, warn)
    synthesizing = getattr(progress, "synthesizing", None)
    outcome = run_sweep(spec, ready.store, force=force, keep_data=keep_data, progress=progress,
                        synth_progress=synthesizing, on_wait=on_wait)  # fmt: skip
    keys = {state.key for state in outcome.points}
    mine = [p for p in summarize_points(ready.store.read()) if p.key in keys]
    return SweepDone(spec, outcome, mine, ready.store)
