"""The backend interface: what a backend declares (its options, precisions, default batch size), what it
returns (``BackendRun``), work it leaves running (``Job``), and partitions that failed for good.

A backend takes a Plan, gets every work unit to a worker (``loop.worker_loop`` on each), hands each
finished ``PartitionResult`` to ``emit`` as soon as it exists, and reports its wall clock. Backends with
workers of their own run them under the one dispatcher (``dispatch.py``) and only add a transport. Callers only
ever use ``registry.get_backend(name).run(plan, emit)``; a backend that can leave work running and be collected
later also has ``submit(plan)`` and ``collect(job, emit)``.

Backend modules import neither torch nor the model until they run, so a missing optional dependency of one
backend (boto3, submitit, CUDA) never breaks another and reports stay light.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from cai_bench.core.errors import UserError
from cai_bench.core.files import loads_json
from cai_bench.core.records import RANDOM_INIT, PartitionResult, WeightsInfo

Emit = Callable[[PartitionResult], None]


@dataclass(frozen=True)
class BackendOption:
    """One option a backend takes: what run, predict, sweep and presets accept for it, and how it is checked.

    ``identity``: whether two runs that differ in it are different measurements (workers: yes; where files
    go, retries: no). ``parse`` reads the command line's text where that is not just ``kind`` (``--time 1:30:00``).
    """

    name: str  # as in Plan.backend_options and TOML; the flag is --name-with-dashes
    kind: type  # int, float, str, bool or dict (KEY=VALUE, repeatable)
    help: str
    default: Any = None  # what the backend does without it (shown in --help)
    choices: tuple = ()
    minimum: float | None = None
    identity: bool = True
    sweepable: bool = True  # sweep takes a comma list of values
    parse: Callable[[str], Any] | None = None
    cli: str | None = None  # the flag, where it is not --name-with-dashes (--time for time_min)
    typed: Callable[[Any], str] | None = None  # a value as the flag takes it, where str() is not (--mem 4G)
    # What a run without this option ran, where that is a value of it: a record holding it is a repeat of one
    # without it (records from before it was written out: --runtime torch, before auto resolved it)
    absent_as: Any = None

    @property
    def flag(self) -> str:
        return self.cli or "--" + self.name.replace("_", "-")

    def as_typed(self, value: Any) -> list[str]:
        """The words a user types for ``value``: the flag alone for True, once per KEY=VALUE for a table."""
        if value is True:
            return [self.flag]
        if isinstance(value, dict):
            return [word for key, item in value.items() for word in (self.flag, f"{key}={item}")]
        return [self.flag, self.typed(value) if self.typed else str(value)]

    def check(self, value: Any) -> Any:
        """``value`` as this option holds it, or a UserError naming the flag."""
        if self.kind is dict:
            if not isinstance(value, dict):
                raise UserError(f"{self.flag} takes KEY=VALUE pairs, got {value!r}")
            return {str(k): str(v) for k, v in value.items()}
        if self.kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, self.kind) or (self.kind is not bool and isinstance(value, bool)):
            raise UserError(f"{self.flag} must be {_KINDS[self.kind]}, got {value!r}")
        if self.choices and value not in self.choices:
            raise UserError(f"{self.flag} must be one of {', '.join(map(str, self.choices))}, got {value!r}")
        if self.minimum is not None and value < self.minimum:
            raise UserError(f"{self.flag} must be at least {self.minimum:g}, got {value}")
        return value

    def from_text(self, text: str) -> Any:
        if self.parse is not None:
            return self.check(self.parse(text))
        try:
            value = {"true": True, "false": False}[text.lower()] if self.kind is bool else self.kind(text)
        except (ValueError, KeyError):
            raise UserError(f"{self.flag} must be {_KINDS[self.kind]}, got {text!r}") from None
        return self.check(value)


_KINDS = {int: "a whole number", float: "a number", str: "a string", bool: "true or false", dict: "KEY=VALUE pairs"}


@dataclass
class BackendRun:
    wall_s: float  # from the start of dispatch to the last result, start-up of workers included
    weights: WeightsInfo
    workers: int | None = None  # workers the backend ran (processes, array tasks, function instances)
    threads: int | None = None  # threads in all, where the backend sets them
    cost_usd: float | None = None  # what the run cost, where the backend bills for it
    info: dict = field(default_factory=dict)  # other backend facts worth keeping: lanes, start method, queue wait
    # Where the work ran, where that is not the driver's machine (the nodes of a SLURM array): these fields
    # replace the driver's in the record's environment
    environment: dict | None = None


@dataclass(frozen=True)
class Job:
    """Work a backend submitted and did not wait for: saved under the results directory until collected."""

    job_id: str
    backend: str
    plan: dict  # Plan.to_json_dict(), with its partitions: what collect records the run as
    state: dict  # the backend's own: where its workers write, scheduler ids


class PartitionsFailed(Exception):
    """Some partitions failed for good (after any retries); ``run`` holds what the others measured."""

    def __init__(self, run: BackendRun, failed: list[dict]):
        self.run = run
        self.failed = failed  # one dict per failed partition: partition, unit, attempts, errors
        shown = "; ".join(f"partition {f['partition']}: {f['errors'][-1]}" for f in failed[:3])
        more = f"; and {len(failed) - 3} more" if len(failed) > 3 else ""
        super().__init__(f"{len(failed)} partition(s) failed: {shown}{more}")

    @property
    def kind(self) -> str:
        """Why they failed, as ``failure_kind`` names it."""
        return failure_kind([error for f in self.failed for error in f["errors"]])


# What an error's text says of why a unit could not finish: it ran out of memory, or out of time (its own limit,
# or an environment that overran or died while the machine was oversubscribed); anything else is its own error
_OUT_OF_MEMORY = ("outofmemory", "out of memory", "memoryerror", "cannot allocate memory")
_OUT_OF_TIME = ("timedout", "timed out", "timeout", "ran one unit for more than", "runtime.exiterror")


def failure_kind(errors: list[str]) -> str:
    """``memory``, ``time`` or ``other``: the first of them that one of ``errors`` names."""
    text = " ".join(errors).lower()
    if any(word in text for word in _OUT_OF_MEMORY):
        return "memory"
    if any(word in text for word in _OUT_OF_TIME):
        return "time"
    return "other"


class Backend(Protocol):
    name: str
    options: tuple[BackendOption, ...]
    precisions: tuple[str, ...]  # the --precision values it runs
    default_batch_size: int  # --batch-size where none is given

    def check(self, options: dict) -> None:
        """Refuse combinations of its options it cannot run (UserError), before any work starts."""

    def run(self, plan, emit: Emit) -> BackendRun: ...

    def machine(self, plan) -> str | None:
        """Where ``plan`` will run, as records name it (``machine.machine_id``); None: this machine."""


@runtime_checkable
class Detachable(Protocol):
    """A backend whose work can outlive the command that started it (a SLURM array)."""

    def check_detach(self, options: dict) -> None:
        """Refuse (UserError) options with which this backend's work cannot be left running."""

    def submit(self, plan) -> Job: ...

    def collect(self, job: Job, emit: Emit) -> BackendRun: ...


def dispatched_run(plan, dispatcher, wall_s: float, info: dict, **typed) -> BackendRun:
    """The BackendRun of a run driven by the dispatcher: what the workers reported at start-up, the dispatch's
    counts, and ``PartitionsFailed`` (with all of it) when some units failed for good."""
    ready = list(dispatcher.ready.values())
    first = ready[0] if ready else {}
    weights = WeightsInfo(**first["weights"]) if first else WeightsInfo(plan.weights or RANDOM_INIT, seed=plan.seed)
    precisions = sorted({r["choices"].get("precision") for r in ready} - {None})
    info = {**info, **dispatcher.summary(), **first.get("choices", {}), "precisions": precisions}
    run = BackendRun(wall_s=wall_s, weights=weights, info=info, **typed)
    failures = dispatcher.failures()
    if failures:
        raise PartitionsFailed(run, [f.to_dict() for f in failures])
    return run


# ---------------------------------------------------------------------------------------------- detached jobs


def jobs_dir(results: str | Path) -> Path:
    return Path(results) / "jobs"


def save_job(results: str | Path, job: Job) -> Path:
    directory = jobs_dir(results)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{job.job_id}.json"
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps({"job_id": job.job_id, "backend": job.backend, "plan": job.plan,
                                     "state": job.state}, indent=1))  # fmt: skip
    os.replace(temporary, path)
    return path


def load_job(results: str | Path, job_id: str) -> tuple[Job, Path]:
    """A saved job by its id (or the start of it, or a scheduler's id it names); a UserError when there is none."""
    directory = jobs_dir(results)
    paths = sorted(directory.glob("*.json")) if directory.is_dir() else []
    found = [p for p in paths if p.stem.startswith(job_id)]
    if not found:
        found = [p for p in paths if job_id in _job_file(p)["state"].get("scheduler_ids", [])]
    if len(found) != 1:
        what = "no job" if not found else f"{len(found)} jobs match"
        raise UserError(f"{what} {job_id!r} in {directory}: give the id that --no-wait printed and the same --results")
    data = _job_file(found[0])
    return Job(data["job_id"], data["backend"], data["plan"], data["state"]), found[0]


def _job_file(path: Path) -> dict:
    data = loads_json(path.read_bytes(), str(path))
    if not isinstance(data, dict) or not isinstance(data.get("state"), dict) or "plan" not in data:
        raise UserError(f"{path}: not a cai-bench job file")
    return data


def collect_command(job_id: str, results: str | Path) -> str:
    return f"cai-bench collect {job_id} --results {results}"
