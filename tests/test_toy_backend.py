"""A backend written the way a new one is: a transport of threads on the one dispatcher, under 60 lines, using
only the public backend interface; then run, sweep and report through it, and the hpc backend swept by option."""

from __future__ import annotations

import queue
import threading
from collections import Counter
from dataclasses import dataclass, field

from cai_bench.backends.base import BackendOption, dispatched_run
from cai_bench.backends.dispatch import Dispatcher, Event, drive
from cai_bench.backends.registry import register_backend
from cai_bench.core.plan import work_units
from cai_bench.inference.engine import plan_options, start_worker
from cai_bench.inference.loop import worker_loop

# ---- the toy backend, all of it down to the end marker (under 60 lines)


@dataclass
class Threads:  # the transport: each worker a thread running the engine's worker loop
    plan: object
    events: queue.Queue = field(default_factory=queue.Queue)
    inboxes: dict = field(default_factory=dict)
    flaky: set = field(default_factory=set)  # units whose first attempt raises, to show the retries

    def start(self, dispatcher):
        for n in range(self.plan.backend_options.get("workers", 1)):
            dispatcher.join(name := f"toy-{n}")
            self.inboxes[name] = queue.Queue()
            threading.Thread(target=self.work, args=(name,), daemon=True).start()

    def work(self, name):
        options = plan_options(self.plan)

        def next_units(ahead):
            self.events.put(Event("want", name, ahead=ahead))
            return self.inboxes[name].get()

        def on_done(position, result):
            if position in self.flaky:
                self.flaky.discard(position)
                return self.events.put(Event("failed", name, position=position, error="flaky"))
            self.events.put(Event("done", name, position=position, result=result))

        start = lambda: start_worker(name, options, seed=self.plan.seed)  # noqa: E731
        worker_loop(start, next_units, options, on_done).close()
        self.events.put(Event("left", name))

    def poll(self, timeout_s):
        return [self.events.get()]

    def send(self, name, units, ahead):
        self.inboxes[name].put([(u.position, u.item) for u in units])

    def after_exit(self, dispatcher, name): ...
    def abandon(self, name): ...

    def stop(self, finished):
        for inbox in self.inboxes.values():
            inbox.put([])


@dataclass
class Toy:
    name: str = "toy"
    options: tuple = (BackendOption("workers", int, "toy: threads as workers.", 1, minimum=1),)

    def check(self, options): ...
    def machine(self, plan): ...

    def run(self, plan, emit):
        dispatcher = Dispatcher(work_units(plan), emit, retries=1)
        drive(dispatcher, Threads(plan, flaky={1}))
        return dispatched_run(plan, dispatcher, 0.5, {}, workers=plan.backend_options.get("workers", 1))


# ---- end of the toy backend


def test_a_toy_backend_runs_through_run_sweep_and_report(tiny_data, tmp_path):
    from cai_bench.analysis import report
    from cai_bench.commands import runner, sweep
    from cai_bench.core.plan import make_plan
    from cai_bench.data.partitions import open_dataset
    from cai_bench.store.jsonl import ResultsStore

    register_backend("toy", Toy)
    _, summary, refs = open_dataset(tiny_data)
    plan = make_plan("toy", summary, refs, precision="fp32", backend_options={"workers": 2}, threads=1)
    seen = Counter()
    (outcome,) = runner.execute(plan, None, on_result=lambda r: seen.update([r.record.partition]))
    assert seen == Counter({0: 1, 1: 1, 2: 1, 3: 1})  # each partition once, unit 1 after a retry
    info = outcome.record.backend_info
    assert info["retried_units"] == 1 and info["retried"][0]["errors"] == ["flaky"]
    assert info["workers"] == 2 and info["attempts"] == 5
    assert {w.worker_id for w in outcome.record.workers} <= {"toy-0", "toy-1"}

    store = ResultsStore(tmp_path / "r")
    overrides = {"backend": "toy", "gb": [0.002], "partition_mb": [0.52], "precision": ["fp32"], "repeats": 2,
                 "threads": 1, "backend_options": {"workers": [1, 2]}}  # fmt: skip
    spec = sweep.make_sweep(overrides=overrides)
    assert [dict(p.backend_options) for p in spec.points()] == [{"workers": 1}, {"workers": 2}]
    done = sweep.run_sweep(spec, store)
    assert len(done.records) == 4
    assert sweep.run_sweep(spec, store).records == []  # everything is there: nothing runs again
    points = report.summarize_points(store.read())
    assert sorted(p.workers for p in points) == [1, 2] and all(p.repeats == 2 for p in points)


def test_an_hpc_sweep_over_workers_records_each_point_and_resumes(cli, tmp_path):
    from cai_bench.store.jsonl import ResultsStore

    args = ["sweep", "--backend", "hpc", "--workers", "1,2", "--gb", "0.01", "--partition-mb", "1", "--repeats", "2"]
    args += ["--precision", "fp32", "--oversubscribe", "--results", tmp_path / "r", "--quiet"]
    code, out, err = cli(*args)
    assert code == 0, err
    records = ResultsStore(tmp_path / "r").read()
    assert sorted((r["plan"]["backend_options"]["workers"], r["repeat"]) for r in records) == [
        (1, 1), (1, 2), (2, 1), (2, 2),
    ]  # fmt: skip
    assert {r["backend_info"]["workers"] for r in records} == {1, 2}
    code, out, err = cli(*args)
    assert code == 0, err
    assert len(ResultsStore(tmp_path / "r").read()) == 4
    assert "2 point(s) were already complete" in out
