"""The backend interface and the registry that picks a backend by name.

A backend takes a Plan, starts its workers (``engine.start_worker``), gets every partition to a worker
(``engine.run_partition``), hands each finished ``PartitionResult`` to ``emit`` as soon as it exists, and reports
its wall clock. Callers only ever use ``get_backend(name).run(plan, emit)``.

Backends live in their own modules and are imported only when chosen, so a missing optional dependency of
one backend (boto3, submitit, CUDA) never breaks another.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from cai_bench.choices import BACKEND_MODULES
from cai_bench.engine import PartitionResult
from cai_bench.errors import UserError
from cai_bench.model.checkpoint import WeightsInfo
from cai_bench.plan import Plan

Emit = Callable[[PartitionResult], None]


@dataclass
class BackendRun:
    wall_s: float  # from the start of dispatch to the last result, start-up of workers included
    weights: WeightsInfo
    info: dict = field(default_factory=dict)  # backend facts worth keeping: threads, workers, prefetch depth
    # Where the work ran, where that is not the driver's machine (the nodes of a SLURM array): these fields
    # replace the driver's in the record's environment
    environment: dict | None = None


class PartitionsFailed(Exception):
    """Some partitions failed for good (after any retries); ``run`` holds what the others measured."""

    def __init__(self, run: BackendRun, failed: list[dict]):
        self.run = run
        self.failed = failed  # one dict per failed partition: partition, attempts, errors
        shown = "; ".join(f"partition {f['partition']}: {f['errors'][-1]}" for f in failed[:3])
        more = f"; and {len(failed) - 3} more" if len(failed) > 3 else ""
        super().__init__(f"{len(failed)} partition(s) failed: {shown}{more}")


class Detached(Exception):
    """The work was submitted and is not waited for (``--no-wait``); ``collect`` is the command that records it."""

    def __init__(self, job_id: str, collect: str):
        self.job_id = job_id
        self.collect = collect
        super().__init__(f"submitted job {job_id}; record it when it has run with: {collect}")


class Backend(Protocol):
    name: str

    def check(self, options: dict) -> None:
        """Refuse ``Plan.backend_options`` it would ignore or cannot use (UserError), before any work starts."""

    def run(self, plan: Plan, emit: Emit) -> BackendRun: ...


def refuse_unknown(backend: str, options: dict, known: tuple[str, ...]) -> None:
    unknown = sorted(set(options) - set(known))
    if unknown:
        flags = ", ".join("--" + name.replace("_", "-") for name in unknown)
        raise UserError(f"{flags}: not an option of --backend {backend}")


def available_backends() -> list[str]:
    return sorted(BACKEND_MODULES)


def get_backend(name: str) -> Backend:
    if name not in BACKEND_MODULES:
        raise UserError(f"unknown backend {name!r}; available: {', '.join(available_backends())}")
    return importlib.import_module(BACKEND_MODULES[name]).create()
