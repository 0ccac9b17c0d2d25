"""What one array task runs on its node: the worker loop over its units, each event appended to its own JSON
Lines file (start, ready, unit, unit_failed, failed, end), and the closing collective where ``--comm`` asks."""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cai_bench.comm import CommError
from cai_bench.core.errors import describe
from cai_bench.core.files import read_secret_file, write_secret_file
from cai_bench.core.machine import capture_environment
from cai_bench.core.plan import PartitionRef
from cai_bench.core.records import encode_result
from cai_bench.inference.gathering import (
    CommConfig,
    finish_together,
    rank_account,
)
from cai_bench.inference.loop import model_worker, units_from, worker_loop

# ---------------------------------------------------------------------------------------------- array task

COMM_SECRET = "comm.secret"  # in the job's folder (0700): the comm key and URLs, 0600, removed at the job's end


def make_job_folder(directory: Path, secret: dict | None) -> str | None:
    """A job's folder, its user's alone (0700): the tasks' event files and results, the aggregate, submitit's
    pickles and logs, and with --comm the file of its key and URLs (0600), which the tasks read where the nodes
    share the file system. Returns that file's path."""
    directory.mkdir(parents=True)
    os.chmod(directory, 0o700)
    (directory / "tasks").mkdir()
    (directory / "units").mkdir()
    if secret is None:
        return None
    write_secret_file(directory / COMM_SECRET, secret)
    return str(directory / COMM_SECRET)


def forget_secret(together: dict | None) -> None:
    """The job has ended (followed to its end, collected, or cancelled): its comm secret's file goes."""
    if together:
        Path(together["secret_file"]).unlink(missing_ok=True)


def arrays_dir(work_dir: str | Path) -> Path:
    return Path(work_dir) / "hpc-jobs"


@dataclass
class TaskFile:
    path: Path
    offset: int = 0
    events: list = field(default_factory=list)
    ended: bool = False

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
        return events


@dataclass(frozen=True)
class TaskSpec:
    task: str  # the worker's name: task-0, task-1, ...
    units: tuple[tuple[int, PartitionRef], ...]  # (place in the run's work list, partition)
    options: object  # EngineOptions
    weights: str | None
    seed: int
    intra: int  # intra-op threads of each lane
    directory: str  # the job's directory: tasks/<task>.jsonl and units/
    together: dict | None = None  # --comm: its rank in the first round's closing collectives (gathering.py)


def append_event(path: Path, event: dict) -> None:
    # One complete line per write, forced to disk: a reader never sees half an event except a torn last line
    with open(path, "a") as fh:
        fh.write(json.dumps(event, separators=(",", ":")) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def run_task(spec: TaskSpec) -> int:
    """One array task, on whatever node the scheduler chose; returns how many units it finished."""
    directory = Path(spec.directory)
    out = directory / "tasks" / f"{spec.task}.jsonl"
    job = next(
        (os.environ[k] for k in ("SLURM_ARRAY_JOB_ID", "SLURM_JOB_ID", "SUBMITIT_LOCAL_JOB_ID") if k in os.environ),
        None,
    )
    here = {"host": socket.gethostname(), "pid": os.getpid(), "job": job}
    rank = spec.together["rank"] if spec.together else None
    append_event(out, {"event": "start", "task": spec.task, "epoch": time.time(), "rank": rank, **here})
    if spec.options.runtime == "torch":
        import torch  # only in a task that runs the model through it

        torch.set_num_threads(spec.intra)
    finished = 0
    kept: list = []
    begin, load, run = model_worker(spec.task, spec.options, spec.weights, spec.seed)

    def start():
        worker = begin()
        ready = {"event": "ready", "epoch": time.time(), "weights": asdict(worker.weights), "choices": worker.choices}
        ready["environment"] = capture_environment(with_torch=spec.options.runtime == "torch")  # the node's
        ready["cluster"] = os.environ.get("SLURM_CLUSTER_NAME")
        append_event(out, ready)
        return worker

    def on_done(position: int, result) -> None:
        nonlocal finished
        # The result's file first, then the line that names it: a reader never finds a line without its file.
        # A unit run again (a retry) overwrites its own file, never adds a second.
        name = f"unit-{position:06d}.npz"
        temporary = directory / "units" / f".{name}.{spec.task}.tmp"
        temporary.write_bytes(encode_result(result))
        os.replace(temporary, directory / "units" / name)
        append_event(out, {"event": "unit", "unit": position, "epoch": time.time(), "file": name})
        finished += 1
        if spec.together:
            kept.append((position, result))

    def on_failed(position: int, error: str) -> None:
        append_event(out, {"event": "unit_failed", "unit": position, "epoch": time.time(), "error": error})

    try:
        worker = worker_loop(start, units_from(list(spec.units)), spec.options, on_done, on_failed, load=load, run=run)
    except BaseException as exc:
        append_event(out, {"event": "failed", "epoch": time.time(), "error": describe(exc)})
        raise
    if worker is not None:
        worker.close()
    if spec.together:
        append_event(
            out, {"event": "together", "epoch": time.time(), **finish_together_in_task(spec.together, kept, directory)}
        )
    append_event(out, {"event": "end", "epoch": time.time()})
    return finished


def finish_together_in_task(together: dict, kept: list, directory: Path) -> dict:
    """A task's part in the closing collectives: rank 0 writes the aggregate beside the units' own files."""
    config = CommConfig.joined(together, read_secret_file(together["secret_file"]))
    try:
        aggregate, info = finish_together(config, together["rank"], kept)
    except CommError as exc:
        return {"rank": together["rank"], "error": str(exc)}
    if aggregate is not None:
        name = f"aggregate-{config.run_id}.npz"
        (directory / "units" / f".{name}.tmp").write_bytes(aggregate)
        os.replace(directory / "units" / f".{name}.tmp", directory / "units" / name)
        info["aggregate"] = name
    return {**rank_account(info), "aggregate": info.get("aggregate")}
