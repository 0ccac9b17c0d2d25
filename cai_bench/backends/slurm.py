"""``hpc --slurm``: one SLURM job array over groups of partitions, submitted through submitit.

Each array task is one worker: it builds the model once, runs its group of partitions (reading one ahead) and
appends what it measured to its own JSON Lines file in the job's directory under the results directory, which
must be on a filesystem the nodes share. One line per event: ``start`` (epoch time, host), ``ready`` (weights,
what the engine chose), ``unit`` (a partition's WorkerRecord with its predictions), then ``end`` or ``failed``.
A task that is killed keeps every partition it finished.

The driver submits, then (unless ``--no-wait``) reads the task files as they grow, passing each partition on as
it appears, until every task has ended or its job is gone. ``cai-bench hpc collect JOB`` does the same later.
The run's wall clock is from the first task's start to the last task's end (the clocks of the nodes are taken
to agree); the time from submission to the first start is reported apart as queue wait.

``--slurm-executor local`` runs the same array with submitit's local executor: each task a process on this
machine, at most ``--array-parallelism`` at once (default: one per ``--cpus-per-task`` cores).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import psutil
import torch

from cai_bench.backends.base import BackendRun, Detached, Emit, PartitionsFailed
from cai_bench.backends.cpu import default_threads, lane_layout
from cai_bench.choices import SLURM_EXECUTORS
from cai_bench.engine import (
    EngineOptions,
    PartitionResult,
    WorkerRecord,
    plan_options,
    run_partitions,
    start_worker,
)
from cai_bench.errors import UserError, describe
from cai_bench.model.checkpoint import RANDOM_INIT, WeightsInfo
from cai_bench.plan import DataSummary, PartitionRef, Plan, work_units
from cai_bench.results import capture_environment

DEFAULT_TIME_MIN = 60
JOB_FILE = "job.json"
POLL_S = {"local": 0.5, "slurm": 10.0}  # squeue/sacct are shared by everyone on a cluster: ask them rarely


def jobs_dir(results: Path) -> Path:
    return Path(results) / "hpc-jobs"


# ---------------------------------------------------------------------------------------------- array task


@dataclass(frozen=True)
class TaskSpec:
    task: int
    units: tuple[tuple[int, PartitionRef], ...]  # (place in the run's work list, partition)
    options: EngineOptions
    weights: str | None
    seed: int
    intra: int  # intra-op threads of each lane
    out: str  # the task's JSON Lines file


def _append(path: str, event: dict) -> None:
    # One complete line per write, forced to disk: a reader never sees half an event except a torn last line
    with open(path, "a") as fh:
        fh.write(json.dumps(event, separators=(",", ":")) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def run_task(spec: TaskSpec) -> int:
    """One array task, on whatever node the scheduler chose; returns how many partitions it ran."""
    started = time.time()
    job = next(
        (os.environ[k] for k in ("SLURM_ARRAY_JOB_ID", "SLURM_JOB_ID", "SUBMITIT_LOCAL_JOB_ID") if k in os.environ),
        None,
    )
    here = {"host": socket.gethostname(), "pid": os.getpid(), "job": job}
    _append(spec.out, {"event": "start", "task": spec.task, "epoch": started, **here})
    torch.set_num_threads(spec.intra)
    positions = iter([position for position, _ in spec.units])

    def make_worker():
        worker = start_worker(f"task-{spec.task}", spec.options, weights=spec.weights, seed=spec.seed)
        ready = {"event": "ready", "epoch": time.time(), "weights": asdict(worker.weights), "choices": worker.choices}
        ready["environment"] = capture_environment()  # the node's, for the record
        ready["cluster"] = os.environ.get("SLURM_CLUSTER_NAME")
        _append(spec.out, ready)
        return worker

    def emit(result: PartitionResult) -> None:
        unit = {
            "event": "unit",
            "unit": next(positions),
            "epoch": time.time(),
            "record": asdict(result.record),
            "object_id": result.object_id.tolist(),
            "prediction": result.prediction.tolist(),
            "redshift": result.redshift.tolist(),
        }
        _append(spec.out, unit)

    try:
        worker = run_partitions(tuple(ref for _, ref in spec.units), spec.options, emit, make_worker)
        worker.close()
    except BaseException as exc:
        _append(spec.out, {"event": "failed", "epoch": time.time(), "error": describe(exc)})
        raise
    _append(spec.out, {"event": "end", "epoch": time.time()})
    return len(spec.units)


# ---------------------------------------------------------------------------------------------- submission


def _groups(count: int, tasks: int | None, per_task: int | None) -> list[range]:
    """Contiguous groups of work units, one per array task."""
    if tasks is not None and per_task is not None:
        raise UserError("give --tasks or --partitions-per-task, not both")
    if (tasks is not None and tasks < 1) or (per_task is not None and per_task < 1):
        raise UserError("--tasks and --partitions-per-task must be at least 1")
    per_task = math.ceil(count / min(tasks, count)) if tasks else (per_task or 1)
    return [range(lo, min(lo + per_task, count)) for lo in range(0, count, per_task)]


def _parameters(options: dict, executor: str, cpus: int) -> dict:
    """submitit parameters: the shared ones, then SLURM's own (which the local executor has no use for)."""
    parameters = {"timeout_min": options.get("time_min") or DEFAULT_TIME_MIN, "cpus_per_task": cpus}
    parameters["name"] = "cai-bench"
    if options.get("mem_gb"):
        parameters["mem_gb"] = options["mem_gb"]
    if executor == "slurm":
        if options.get("slurm_partition"):
            parameters["slurm_partition"] = options["slurm_partition"]
        if options.get("array_parallelism"):
            parameters["slurm_array_parallelism"] = options["array_parallelism"]
        if options.get("slurm_options"):
            parameters["slurm_additional_parameters"] = dict(options["slurm_options"])
    return parameters


def plan_from_json(data: dict) -> Plan:
    data = dict(data)
    data["data"] = DataSummary(**data["data"])
    data["partitions"] = tuple(PartitionRef(**ref) for ref in data["partitions"])
    return Plan(**data)


def _write_job(directory: Path, job: dict) -> None:
    temporary = directory / (JOB_FILE + ".tmp")
    temporary.write_text(json.dumps(job, indent=1))
    os.replace(temporary, directory / JOB_FILE)


def _executor(directory: Path, kind: str, parameters: dict):
    import submitit

    executor = submitit.AutoExecutor(folder=directory / "submitit", cluster=kind)
    executor.update_parameters(**parameters)
    return executor


def check(options: dict) -> None:
    kind = options.get("slurm_executor") or "slurm"
    if kind not in SLURM_EXECUTORS:
        raise UserError(f"--slurm-executor must be one of {', '.join(SLURM_EXECUTORS)}, got {kind!r}")
    if "workers" in options or "retries" in options:
        raise UserError("--workers and --retries are for one node; an array has --tasks or --partitions-per-task")
    _groups(1, options.get("tasks"), options.get("partitions_per_task"))
    for name in ("cpus_per_task", "array_parallelism"):
        if options.get(name) is not None and options[name] < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {options[name]}")
    try:
        import submitit  # noqa: F401
    except ImportError:
        raise UserError("--slurm needs submitit: pip install 'cai-bench[hpc]'") from None
    if kind == "slurm" and not (shutil.which("sbatch") and shutil.which("srun")):
        raise UserError(
            "--slurm: no SLURM here (sbatch/srun not found); run on a login node or add --slurm-executor local"
        )


def run_array(plan: Plan, emit: Emit) -> BackendRun:
    options = plan.backend_options
    kind = options.get("slurm_executor") or "slurm"
    if plan.engine == "reference":
        raise UserError("--engine reference is the one-process upstream loop: run it with --backend cpu")
    wait = options.get("wait", True)
    if not wait and (plan.repeats > 1 or plan.warmup):
        raise UserError("--no-wait submits one run: leave out --repeats and --warmup")
    if "jobs_dir" not in options:
        raise UserError("internal: the SLURM backend needs the results directory (backend option jobs_dir)")
    units = work_units(plan)
    groups = _groups(len(units), options.get("tasks"), options.get("partitions_per_task"))
    cpus = options.get("cpus_per_task") or plan.threads or 1
    lanes, intra = (1, cpus) if plan.compile else lane_layout(cpus, options.get("lanes"))
    parameters = _parameters(options, kind, cpus)
    parallelism = options.get("array_parallelism") or (
        max(1, default_threads() // cpus) if kind == "local" else len(groups)
    )

    job_id = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
    directory = Path(options["jobs_dir"]).resolve() / job_id
    (directory / "tasks").mkdir(parents=True)
    engine = plan_options(plan, lanes)
    specs = [
        TaskSpec(
            task=task,
            units=tuple((position, units[position]) for position in group),
            options=engine,
            weights=plan.weights,
            seed=plan.seed,
            intra=intra,
            out=str(directory / "tasks" / f"task-{task:05d}.jsonl"),
        )
        for task, group in enumerate(groups)
    ]
    executor = _executor(directory, kind, parameters)
    job = {
        "job_id": job_id,
        "executor": kind,
        "submit_epoch": time.time(),
        "tasks": len(specs),
        "partitions_per_task": len(groups[0]),
        "cpus_per_task": cpus,
        "lanes": lanes,
        "intra_op_threads": intra,
        "array_parallelism": parallelism,
        "parameters": parameters,
        "units": [[position for position, _ in spec.units] for spec in specs],
        "plan": asdict(plan),
        "scheduler_job_ids": [],
        "gathered_utc": None,
    }
    _write_job(directory, job)
    # SLURM throttles the array itself (%parallelism); the local executor would start every task at once,
    # so unless the driver leaves, it starts them in waves as earlier ones end.
    first = specs if kind == "slurm" or not wait else specs[:parallelism]
    jobs = executor.map_array(run_task, first)
    job["scheduler_job_ids"] = [j.job_id for j in jobs]
    _write_job(directory, job)
    if not wait:
        results = Path(options["jobs_dir"]).parent
        raise Detached(job_id, f"cai-bench hpc collect {job_id} --results {results}")
    waves = _Waves(executor, directory, specs[len(first) :])
    return gather(directory, emit, jobs=jobs, waves=waves)


@dataclass
class _Waves:
    """Local tasks not started yet; started as running ones end, so at most ``array_parallelism`` run at once."""

    executor: object
    directory: Path
    waiting: list

    def submit(self, n: int) -> list:
        batch, self.waiting = self.waiting[: max(0, n)], self.waiting[max(0, n) :]
        if not batch:
            return []
        jobs = self.executor.map_array(run_task, batch)
        job = json.loads((self.directory / JOB_FILE).read_text())
        job["scheduler_job_ids"] += [j.job_id for j in jobs]
        _write_job(self.directory, job)
        return jobs


# ---------------------------------------------------------------------------------------------- gathering


@dataclass
class _TaskFile:
    path: Path
    offset: int = 0
    events: list = field(default_factory=list)
    ended: str | None = None  # "end", "failed", or "gone" when its job ended without either

    def read_new(self) -> list[dict]:
        """Complete lines appended since the last read (a line being written is left for next time)."""
        if not self.path.exists():
            return []
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            chunk = fh.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self.offset += len(complete)
        events = [json.loads(line) for line in complete.splitlines() if line.strip()]
        self.events += events
        for event in events:
            if event["event"] in ("end", "failed"):
                self.ended = event["event"]
        return events


def _job_running(kind: str, job) -> bool:
    if kind == "local" and getattr(job, "_process", None) is None:
        # rebuilt after the driver left: the local job id is the pid of submitit's controller process
        try:
            return psutil.Process(int(job.job_id)).status() != psutil.STATUS_ZOMBIE
        except (psutil.Error, ValueError):
            return False
    return not job.done()


def find_job(results: Path, job_id: str) -> Path:
    """The directory of a submitted array, by our job id or by the scheduler's (array) job id."""
    root = jobs_dir(results)
    if (root / job_id / JOB_FILE).is_file():
        directory = root / job_id
    else:
        matches = [
            path.parent
            for path in sorted(root.glob(f"*/{JOB_FILE}"))
            if any(j.split("_")[0] == job_id for j in json.loads(path.read_text())["scheduler_job_ids"])
        ]
        if not matches:
            raise UserError(f"no job {job_id!r} in {root}: give the id that --no-wait printed and the same --results")
        directory = matches[0]
    gathered = json.loads((directory / JOB_FILE).read_text()).get("gathered_utc")
    if gathered:
        raise UserError(f"job {job_id} was already recorded ({gathered}); see: cai-bench results list")
    return directory


def job_plan(directory: Path) -> Plan:
    return plan_from_json(json.loads((directory / JOB_FILE).read_text())["plan"])


def _rebuilt_jobs(directory: Path, job: dict) -> list:
    import submitit

    cls = submitit.SlurmJob if job["executor"] == "slurm" else submitit.LocalJob
    return [cls(folder=directory / "submitit", job_id=job_id) for job_id in job["scheduler_job_ids"]]


def gather(directory: Path, emit: Emit, jobs: list | None = None, waves: _Waves | None = None) -> BackendRun:
    """Follow the tasks' files until every task has ended, emitting each partition once; build the BackendRun."""
    job = json.loads((directory / JOB_FILE).read_text())
    kind = job["executor"]
    jobs = list(jobs) if jobs is not None else _rebuilt_jobs(directory, job)
    plan = plan_from_json(job["plan"])
    files = [_TaskFile(directory / "tasks" / f"task-{task:05d}.jsonl") for task in range(job["tasks"])]
    emitted: set[int] = set()

    def read_all() -> None:
        for task_file in files:
            for event in task_file.read_new():
                if event["event"] == "unit" and event["unit"] not in emitted:
                    emitted.add(event["unit"])
                    emit(_result(event))

    try:
        while True:
            read_all()
            if all(f.ended for f in files):
                break
            running = [j for j in jobs if _job_running(kind, j)]
            if waves is not None and waves.waiting:
                jobs += waves.submit(job["array_parallelism"] - len(running))
            elif not running:
                read_all()  # what was written just before the last job ended
                for task_file in files:
                    task_file.ended = task_file.ended or "gone"
                break
            time.sleep(POLL_S[kind])
    except KeyboardInterrupt:
        results = directory.parent.parent
        raise Detached(job["job_id"], f"cai-bench hpc collect {job['job_id']} --results {results}") from None
    # Every task has ended: the job is recorded now (as ok or failed), and a later collect is refused
    job["gathered_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    _write_job(directory, job)
    return _backend_run(job, plan, files, emitted)


def _nodes_environment(ready: list[dict]) -> dict | None:
    """The record's machine is the nodes the tasks ran on, not the login node that submitted them.

    Its ``host`` is the cluster's name (stable from one array to the next, whichever nodes the scheduler
    picked), else the one node all tasks ran on; the nodes themselves are listed apart.
    """
    if not ready:
        return None
    first = ready[0]["environment"]
    nodes = sorted({e["environment"]["host"] for e in ready})
    models = sorted({e["environment"]["cpu_model"] for e in ready})
    out = {key: first[key] for key in ("os", "python", "packages", "cpu_physical_cores", "cpu_logical_cores")}
    out |= {key: first[key] for key in ("cpu_affinity", "cpu_capability", "memory_total_bytes", "gpus", "gpu_driver")}
    out["cpu_model"] = " + ".join(models)
    out["host"] = ready[0].get("cluster") or (nodes[0] if len(nodes) == 1 else f"{len(nodes)} nodes")
    out["nodes"] = nodes
    return out


def _result(event: dict) -> PartitionResult:
    return PartitionResult(
        WorkerRecord(**event["record"]),
        np.asarray(event["object_id"], dtype=np.int64),
        np.asarray(event["prediction"], dtype=np.float32),
        np.asarray(event["redshift"], dtype=np.float32),
    )


def _backend_run(job: dict, plan: Plan, files: list[_TaskFile], emitted: set[int]) -> BackendRun:
    starts = [e["epoch"] for f in files for e in f.events if e["event"] == "start"]
    ends = [f.events[-1]["epoch"] for f in files if f.events]
    ready = [e for f in files for e in f.events if e["event"] == "ready"]
    hosts = {e["host"] for f in files for e in f.events if e["event"] == "start"}
    waits = sorted(s - job["submit_epoch"] for s in starts)
    wall_s = max(ends) - min(starts) if starts else 0.0
    info = {
        "slurm": True,
        "executor": job["executor"],
        "job_id": job["job_id"],
        "scheduler_job_ids": job["scheduler_job_ids"],
        "tasks": job["tasks"],
        "tasks_started": len(starts),
        "partitions_per_task": job["partitions_per_task"],
        "cpus_per_task": job["cpus_per_task"],
        "threads": job["cpus_per_task"],
        "lanes": job["lanes"],
        "intra_op_threads": job["intra_op_threads"],
        "array_parallelism": job["array_parallelism"],
        "parameters": job["parameters"],
        "hosts": len(hosts),
        "queue_wait_s": waits[0] if waits else None,
        "queue_wait_max_s": waits[-1] if waits else None,
        "submit_to_last_end_s": max(ends) - job["submit_epoch"] if ends else None,
        "wall_clock": "first task start to last task end, epoch clocks of the nodes",
        **(ready[0]["choices"] if ready else {}),
        "precisions": sorted({e["choices"].get("precision") for e in ready} - {None}),
    }
    weights = WeightsInfo(**ready[0]["weights"]) if ready else WeightsInfo(plan.weights or RANDOM_INIT, seed=plan.seed)
    run = BackendRun(wall_s=wall_s, weights=weights, info=info, environment=_nodes_environment(ready))
    units = work_units(plan)
    failed = []
    for task, (task_file, positions) in enumerate(zip(files, job["units"], strict=True)):
        missing = [p for p in positions if p not in emitted]
        if not missing:
            continue
        error = next((e["error"] for e in task_file.events if e["event"] == "failed"), None)
        why = error or f"task {task} ended without finishing (killed, timed out or never started)"
        failed += [{"partition": units[p].index, "unit": p, "attempts": 1, "errors": [why]} for p in missing]
    if failed:
        raise PartitionsFailed(run, failed)
    return run
