"""SLURM job arrays as a transport of the dispatcher: submission through submitit, the tasks followed through
their files, a smaller array of what came back, ``--no-wait`` and ``collect``."""

from __future__ import annotations

import math
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from cai_bench.backends.base import BackendRun, Emit, Job, dispatched_run, save_job
from cai_bench.backends.cpu import lane_layout
from cai_bench.backends.dispatch import DEFAULT_RETRIES, Dispatcher, Event, Unit, apply, drive
from cai_bench.backends.slurm.options import DEFAULT_TIME_MIN, groups_of
from cai_bench.backends.slurm.scheduler import POLL_S, job_running, nodes_environment, scheduler_view, state_of
from cai_bench.backends.slurm.task import TaskFile, TaskSpec, arrays_dir, forget_secret, make_job_folder, run_task
from cai_bench.core.errors import UserError
from cai_bench.core.machine import default_threads
from cai_bench.core.plan import Plan, plan_from_dict, plan_to_dict, work_units
from cai_bench.core.records import decode_result, utc_now
from cai_bench.inference.gathering import (
    CommConfig,
    config_for_run,
    read_aggregate,
    record_of,
)
from cai_bench.inference.loop import prepare_model
from cai_bench.inference.worker import plan_options

# ---------------------------------------------------------------------------------------------- transport


def _parameters(options: dict, executor: str, cpus: int) -> dict:
    """submitit parameters: the shared ones, then SLURM's own (which the local executor has no use for)."""
    timeout_min = options.get("time_min") or DEFAULT_TIME_MIN
    parameters = {"timeout_min": timeout_min, "cpus_per_task": cpus}
    parameters["name"] = "cai-bench"
    if options.get("mem_gb"):
        parameters["mem_gb"] = options["mem_gb"]
    if executor == "slurm":
        if options.get("slurm_partition"):
            parameters["slurm_partition"] = options["slurm_partition"]
        if options.get("array_parallelism"):
            parameters["slurm_array_parallelism"] = options["array_parallelism"]
        # submitit's warning signal comes 90 s before the limit by default: at the start of a task of a minute or
        # two, which it would then stop as timed out. A tenth of the limit, at most those 90 s
        parameters["slurm_signal_delay_s"] = min(90, max(5, int(timeout_min * 6)))
        if options.get("slurm_options"):
            parameters["slurm_additional_parameters"] = dict(options["slurm_options"])
    return parameters


@dataclass
class ArrayGathered:
    """The driver's side of --comm on an array: a ranked task's units wait for rank 0's aggregate, read once;
    where the collectives failed (or rank 0's task died) each waiting unit's own file is read instead. A ranked
    task's end is held back until its units are done, so the dispatcher never sees it leave holding them."""

    ranked: dict = field(default_factory=dict)  # task -> [(position, own file)] still waiting
    held_ends: dict = field(default_factory=dict)  # task -> its left/lost Event, held back
    aggregate: dict | None = None  # position -> PartitionResult, once read
    summary: dict | None = None
    root_done: bool = False  # rank 0 said how it went (or its task died): nothing more will come from it
    by_rank: dict = field(default_factory=dict)
    aggregate_reads: int = 0
    unit_reads: int = 0

    def reported(self, task: str, event: dict, transport: ArrayTransport) -> list[Event]:
        self.by_rank[event["rank"]] = {k: v for k, v in event.items() if k not in ("event", "epoch")}
        if event.get("aggregate"):
            data = (transport.directory / "units" / event["aggregate"]).read_bytes()
            self.aggregate, self.summary = read_aggregate(data)
            self.aggregate_reads += 1
        if event["rank"] == 0:
            self.root_done = True
            return self.release(list(self.ranked), transport)
        return self.release([task], transport) if "error" in event or self.root_done else []

    def release(self, tasks: list[str], transport: ArrayTransport) -> list[Event]:
        """Done events for the waiting units of ``tasks``, from the aggregate where it has them, then any end held."""
        out = []
        for task in tasks:
            for position, name in self.ranked.pop(task, []):
                kept = (self.aggregate or {}).get(position)
                out.append(Event("done", task, position=position, result=kept) if kept is not None
                           else transport._own_result(task, position, name))  # fmt: skip
            if task in self.held_ends:
                out.append(self.held_ends.pop(task))
        return out

    def ending(self, task: str, event: Event, transport: ArrayTransport) -> list[Event]:
        """A ranked task's end: held back until its units are done. One that died gives what it finished from
        its own files; if it was rank 0, no aggregate will come, and every waiting task reads its own."""
        if task not in self.ranked:
            return [event]
        if event.kind == "lost":
            out = self.release([task], transport)
            if self._rank(task, transport) == 0 and not self.root_done:
                self.root_done = True
                out += self.release(list(self.ranked), transport)
            return [*out, event]
        self.held_ends[task] = event
        return self.release([task], transport) if self.root_done else []

    @staticmethod
    def _rank(task: str, transport: ArrayTransport) -> int | None:
        starts = [e for e in transport.files[task].events if e["event"] == "start"]
        return starts[0].get("rank") if starts else None

    def summary_for_record(self, config: dict | None) -> dict | None:
        if config is None:
            return None
        ranks = list(self.by_rank.values())
        return record_of(CommConfig.from_dict(config), ranks, self.summary, self.aggregate_reads, self.unit_reads)


@dataclass
class ArrayTransport:
    """Array tasks as workers: each wants its group of units at once, and every group wanted in one round is
    submitted as one array. A round's tasks are created together (``--slurm-executor local``: as many at once
    as ``array_parallelism``, the rest as earlier ones end); units that come back start a smaller round once
    no task is left running."""

    plan: Plan
    job: dict  # the job's state, saved in RESULTS/jobs/<job id>.json as it changes
    spec: dict  # what every task's TaskSpec shares: engine options, weights, seed, threads
    executor: object = None  # a submitit executor
    files: dict = field(default_factory=dict)  # task -> TaskFile, for every task created
    jobs: dict = field(default_factory=dict)  # task -> submitit job, once submitted
    pending: list = field(default_factory=list)  # TaskSpecs wanted and not submitted yet
    events: list = field(default_factory=list)  # Events made here (want), handed out by the next poll
    gathered: ArrayGathered = field(default_factory=lambda: ArrayGathered())
    planned: int = 0  # tasks of this round not created yet
    created: int = 0

    @property
    def directory(self) -> Path:
        return Path(self.job["directory"])

    @property
    def kind(self) -> str:
        return self.job["executor"]

    def live(self) -> list[str]:
        return [task for task, f in self.files.items() if not f.ended]

    def start(self, dispatcher: Dispatcher) -> None:
        if self.files:  # taken up again by collect: the tasks exist already
            return
        self.new_round(dispatcher)

    def new_round(self, dispatcher: Dispatcher) -> None:
        self.planned = math.ceil(len(dispatcher.queue) / self.job["partitions_per_task"])
        self.job["rounds"] += 1
        self.launch(dispatcher)

    def launch(self, dispatcher: Dispatcher) -> None:
        limit = self.job["array_parallelism"] if self.kind == "local" and self.job["wait"] else math.inf
        while self.planned and dispatcher.queue and len(self.live()) < limit:
            task = f"task-{self.created}"
            self.created += 1
            self.planned -= 1
            self.files[task] = TaskFile(self.directory / "tasks" / f"{task}.jsonl")
            dispatcher.join(task)
            self.events.append(Event("want", task, count=self.job["partitions_per_task"]))

    def send(self, task: str, units: list[Unit], ahead: bool) -> None:
        if task in self.jobs or not units:
            raise RuntimeError(f"internal: {task} was given work after its submission")
        positions = [u.position for u in units]
        self.job["tasks"][task] = {"units": positions, "round": self.job["rounds"]}
        items = tuple((u.position, u.item) for u in units)
        together = self.job.get("together")
        if together and self.job["rounds"] == 1:  # the first round's groups are the ranks; a retry runs alone
            together = {**together, "rank": positions[0] // self.job["partitions_per_task"]}
        else:
            together = None
        self.pending.append(TaskSpec(task, items, directory=str(self.directory), together=together, **self.spec))

    def submit_pending(self) -> None:
        if not self.pending:
            return
        batch, self.pending = self.pending, []
        submitted = self.executor.map_array(run_task, batch)
        for spec, job in zip(batch, submitted, strict=True):
            self.jobs[spec.task] = job
            self.job["tasks"][spec.task]["scheduler_id"] = job.job_id
        self.job["scheduler_ids"] += [j.job_id for j in submitted]
        save_job(self.job["results"], _as_job(self.plan, self.job))

    def _event(self, task: str, event: dict) -> list[Event]:
        kind = event["event"]
        if kind == "start" and event.get("rank") is not None:
            self.gathered.ranked[task] = []
        if kind == "unit":
            if task in self.gathered.ranked:  # its result comes with rank 0's aggregate (or alone, if that fails)
                self.gathered.ranked[task].append((event["unit"], event["file"]))
                return []
            kept = (self.gathered.aggregate or {}).get(event["unit"])  # read after rank 0's, in the same pass
            if kept is not None:
                return [Event("done", task, position=event["unit"], result=kept)]
            return [self._own_result(task, event["unit"], event["file"])]
        if kind == "together":
            return self.gathered.reported(task, event, self)
        if kind == "unit_failed":
            return [Event("failed", task, position=event["unit"], error=event["error"])]
        if kind == "ready":
            return [Event("ready", task, info=event)]
        if kind in ("end", "failed"):
            self.files[task].ended = True
            ending = (
                Event("left", task) if kind == "end" else Event("lost", task, error=self._why(task, event["error"]))
            )
            return self.gathered.ending(task, ending, self)
        return []

    def _own_result(self, task: str, position: int, name: str) -> Event:
        self.gathered.unit_reads += 1
        data = (self.directory / "units" / name).read_bytes()
        return Event("done", task, position=position, result=decode_result(data))

    def read(self) -> list[Event]:
        out = []
        for task in self.live():
            for event in self.files[task].read_new():
                out += self._event(task, event)
        return out

    def poll(self, timeout_s: float | None) -> list[Event]:
        if self.events:
            out, self.events = self.events, []
            return out
        self.submit_pending()
        while True:
            out = self.read()
            if out:
                return out
            gone = [task for task, running in self.running().items() if not running]
            if gone:
                out = self.read()  # what was written just before its job ended
                for task in gone:
                    if not self.files[task].ended:
                        self.files[task].ended = True
                        why = self._why(task, f"{task} ended without finishing (the scheduler says "
                                                  f"{state_of(self.jobs[task])})")  # fmt: skip
                        out += self.gathered.ending(task, Event("lost", task, error=why), self)
                return out
            time.sleep(POLL_S[self.kind])

    def _why(self, task: str, error: str) -> str:
        """A task's end in words, saying so first when it was its time limit: SLURM's TIMEOUT, or submitit's own
        stop just before the limit (its signal, then "timed-out and not checkpointable")."""
        if "TIMEOUT" in error or "timed-out" in error:
            return f"{task} timed out at its time limit ({self.job['parameters']['timeout_min']} min): {error}"
        return error

    def running(self) -> dict[str, bool]:
        """Each live submitted task: whether its job still runs (or waits to). On SLURM one sacct call answers
        for the whole array, through submitit's watcher, not one call per task."""
        tasks = [t for t in self.live() if t in self.jobs]
        if self.kind == "slurm" and tasks:
            watcher = self.jobs[tasks[0]].watcher
            watcher.update()
            return {t: not watcher.is_done(self.jobs[t].job_id, mode="cache") for t in tasks}
        return {t: job_running(self.kind, self.jobs[t]) for t in tasks}

    def cancel(self, within_s: float = 120.0) -> list[str]:
        """Cancel every task still running or waiting (scancel on SLURM, in one call), and wait up to
        ``within_s`` until none runs: a task goes on until SLURM's KillWait ends it (submitit lets it ignore
        SIGTERM), and what it finishes by then is kept. The tasks cancelled."""
        tasks = [task for task, running in self.running().items() if running]
        if not tasks:
            return []
        ids = [self.jobs[t].job_id for t in tasks]
        if self.kind == "slurm":
            subprocess.run(["scancel", *ids], check=False, capture_output=True, timeout=60)
        else:
            for task in tasks:
                self.jobs[task].cancel(check=False)
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline and self._still_running(tasks, ids):
            time.sleep(0.5)
        return tasks

    def _still_running(self, tasks: list[str], ids: list[str]) -> bool:
        if self.kind != "slurm":
            return any(job_running(self.kind, self.jobs[t]) for t in tasks)
        # squeue, not sacct: a cancelled task is CANCELLED in the accounting at once, and COMPLETING in the
        # queue until its processes are gone
        try:
            done = subprocess.run(["squeue", "-h", "-o", "%i", "-j", ",".join(ids)], capture_output=True, text=True,
                                  timeout=60)  # fmt: skip
        except (OSError, subprocess.SubprocessError):
            return False
        return done.returncode == 0 and bool(done.stdout.strip())

    def after_exit(self, dispatcher: Dispatcher, task: str) -> None:
        if self.planned:
            self.launch(dispatcher)
        elif dispatcher.queue and not self.live():
            self.new_round(dispatcher)

    def abandon(self, task: str) -> None:
        job = self.jobs.get(task)
        if job is not None:
            job.cancel(check=False)

    def stop(self, finished: bool) -> None:
        # Tasks end on their own; cut short, the array goes on, and ``collect`` can take it up again
        self.submit_pending()
        if finished:
            together = self.job.get("together")
            self._hear_every_task(30.0 + (together["timeout_s"] if together else 0.0))

    def _hear_every_task(self, within_s: float) -> None:
        """Every unit is in, but a task may not have written its end yet (the record's wall clock runs to the
        last task's end), and with --comm ranks may still be saying how their collectives went (those that
        waited for one that died end within their deadline): read the tasks until they end."""
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            self.read()  # the dispatcher is done: only what the tasks report of themselves is kept
            if not any(self.running().values()):
                self.read()  # what a task wrote just before its job ended
                return
            time.sleep(POLL_S[self.kind])


def _as_job(plan: Plan, state: dict) -> Job:
    return Job(state["job_id"], plan.backend, plan_to_dict(plan), state)


def _executor(directory: Path, kind: str, parameters: dict):
    import submitit  # the [hpc] extra, only where an array is submitted

    executor = submitit.AutoExecutor(folder=directory / "submitit", cluster=kind)
    executor.update_parameters(**parameters)
    return executor


def _new_job(plan: Plan, wait: bool) -> tuple[dict, Dispatcher]:
    options = plan.backend_options
    if plan.engine == "reference":
        raise UserError("--engine reference is the one-process upstream loop: run it with --backend cpu")
    if plan.work_dir is None:
        raise RuntimeError("internal: a SLURM array needs the plan's work_dir (the results directory)")
    kind = options.get("slurm_executor") or "slurm"
    units = work_units(plan)
    per_task = groups_of(len(units), options.get("tasks"), options.get("partitions_per_task"))
    cpus = options.get("cpus_per_task") or plan.threads or 1
    lanes, intra = (1, cpus) if plan.compile else lane_layout(cpus, options.get("lanes"))
    groups = math.ceil(len(units) / per_task)
    parallelism = options.get("array_parallelism") or (max(1, default_threads() // cpus) if kind == "local" else groups)
    together = config_for_run(options, groups, plan.work_dir)
    if together is not None and (kind == "local" or options.get("array_parallelism")) and parallelism < groups:
        raise UserError(f"--comm needs all {groups} array tasks alive at once, but at most {parallelism} run at a "
                        f"time (--array-parallelism): raise it, or --partitions-per-task")  # fmt: skip
    job_id = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
    directory = arrays_dir(plan.work_dir).resolve() / job_id
    secret_file = make_job_folder(directory, together.secret() if together is not None else None)
    job = {
        "job_id": job_id,
        "results": plan.work_dir,
        "directory": str(directory),
        "executor": kind,
        "wait": wait,
        "submit_epoch": time.time(),
        "partitions_per_task": per_task,
        "cpus_per_task": cpus,
        "lanes": lanes,
        "intra_op_threads": intra,
        "array_parallelism": parallelism,
        "parameters": _parameters(options, kind, cpus),
        "retries": DEFAULT_RETRIES if options.get("retries") is None else options["retries"],
        "rounds": 0,
        "tasks": {},
        "scheduler_ids": [],
        "together": {**together.public(), "secret_file": secret_file} if together else None,
    }
    return job, Dispatcher(units, lambda result: None, job["retries"])


def _transport(plan: Plan, job: dict) -> ArrayTransport:
    options = plan_options(plan, job["lanes"], intra_threads=job["intra_op_threads"])
    # An export is made here, where torch is; the tasks read it where it lies (a filesystem the nodes share)
    model, _ = prepare_model(plan.weights, options.runtime, plan.seed, options.precision)
    spec = {"options": options, "weights": model, "seed": plan.seed}
    transport = ArrayTransport(plan, job, {**spec, "intra": job["intra_op_threads"]})
    transport.executor = _executor(Path(job["directory"]), job["executor"], job["parameters"])
    return transport


def run_array(plan: Plan, emit: Emit) -> BackendRun:
    job, dispatcher = _new_job(plan, wait=True)
    dispatcher.emit = emit
    transport = _transport(plan, job)
    try:
        drive(dispatcher, transport)
    except KeyboardInterrupt:
        _cancel_at_interrupt(plan, job, dispatcher, transport)
        raise
    finally:
        forget_secret(job.get("together"))
    # Followed to its end here and recorded by the caller: a later collect of it is refused
    job["collected_utc"] = utc_now()
    save_job(plan.work_dir, _as_job(plan, job))
    return _finish(plan, job, dispatcher, transport)


def _cancel_at_interrupt(plan: Plan, job: dict, dispatcher: Dispatcher, transport: ArrayTransport) -> None:
    """Ctrl-C (or SIGTERM) of a driver that follows its array: the array is cancelled (scancel), and the units its
    tasks finished before that are handed on, for the run's "interrupted" record. ``--no-wait`` is the way to
    leave an array running."""
    job["cancelled"] = transport.cancel()
    job["cancelled_utc"] = utc_now()
    for event in transport.read():  # what the tasks wrote before they were stopped
        if event.kind == "done":
            dispatcher.done(event.worker, event.position, event.result)
    save_job(plan.work_dir, _as_job(plan, job))


def submit(plan: Plan) -> Job:
    """Submit the first round and leave; ``collect`` follows it (and any retry rounds) later."""
    job, dispatcher = _new_job(plan, wait=False)
    transport = _transport(plan, job)
    transport.start(dispatcher)
    for event in transport.poll(None):  # the first round's requests for work
        apply(dispatcher, transport, event)
    transport.stop(finished=False)
    return _as_job(plan, job)


def collect(saved: Job, emit: Emit) -> BackendRun:
    """Take up a submitted array where it is: its tasks as workers holding their units, then as ``run_array``."""
    import submitit  # the [hpc] extra, only where an array is followed

    plan, job = plan_from_dict(saved.plan), dict(saved.state)
    job["wait"] = True  # from here on the driver waits, so a retry round on the local executor runs in waves
    transport = _transport(plan, job)
    dispatcher = Dispatcher(work_units(plan), emit, job["retries"])
    cls = submitit.SlurmJob if job["executor"] == "slurm" else submitit.LocalJob
    for task, held in job["tasks"].items():
        transport.files[task] = TaskFile(transport.directory / "tasks" / f"{task}.jsonl")
        transport.jobs[task] = cls(folder=transport.directory / "submitit", job_id=held["scheduler_id"])
        transport.created += 1
        dispatcher.join(task)
        dispatcher.hand_over(task, held["units"])
    try:
        drive(dispatcher, transport)
    finally:
        forget_secret(job.get("together"))
    return _finish(plan, job, dispatcher, transport)


def _finish(plan: Plan, job: dict, dispatcher: Dispatcher, transport: ArrayTransport) -> BackendRun:
    events = [e for f in transport.files.values() for e in f.events]
    starts = [e["epoch"] for e in events if e["event"] == "start"]
    ends = [f.events[-1]["epoch"] for f in transport.files.values() if f.events]
    waits = sorted(s - job["submit_epoch"] for s in starts)
    info = {
        "slurm": True,
        "executor": job["executor"],
        "job_id": job["job_id"],
        "scheduler_job_ids": job["scheduler_ids"],
        "tasks": len(job["tasks"]),
        "tasks_started": len(starts),
        "rounds": job["rounds"],
        "partitions_per_task": job["partitions_per_task"],
        "cpus_per_task": job["cpus_per_task"],
        "lanes": job["lanes"],
        "intra_op_threads": job["intra_op_threads"],
        "array_parallelism": job["array_parallelism"],
        "parameters": job["parameters"],
        "hosts": len({e["host"] for e in events if e["event"] == "start"}),
        "queue_wait_s": waits[0] if waits else None,
        "queue_wait_max_s": waits[-1] if waits else None,
        # each task's start (its interpreter up) after the first's: the launch rate the estimate models
        "task_start_offsets_s": [round(w - waits[0], 6) for w in waits],
        "submit_to_last_end_s": max(ends) - job["submit_epoch"] if ends else None,
        "wall_clock": "first task start to last task end, epoch clocks of the nodes",
    }
    info["scheduler"] = scheduler_view(job["executor"], dict(transport.jobs))
    gathered = transport.gathered.summary_for_record(job.get("together"))
    if gathered is not None:
        info["comm"] = gathered
    wall_s = max(ends) - min(starts) if starts else 0.0
    environment = nodes_environment(list(dispatcher.ready.values()))
    return dispatched_run(
        plan, dispatcher, wall_s, info, workers=len(job["tasks"]), threads=job["cpus_per_task"], environment=environment
    )
