"""``cpu``: one worker process on this machine, the next partition read in the background.

The fast engine splits each partition between lanes: threads with one intra-op thread each (``threads`` cores
give ``threads`` lanes, at most MAX_LANES), sharing one model. On the 2-core dev machine two single-threaded
lanes ran the prepared model about 25% faster than one two-threaded loop: this model's many small operations
(16-channel convolutions, element-wise steps) parallelise poorly inside one operation. The reference engine
runs as upstream did: one loop with all threads.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import psutil

from cai_bench.backends.base import BackendOption, BackendRun, Emit
from cai_bench.choices import CPU_PRECISIONS
from cai_bench.metrics import allowed_cpus
from cai_bench.plan import Plan, work_units

MAX_LANES = 4  # each lane holds a batch of activations; more lanes cost memory for little gain
LANES = BackendOption(
    "lanes", int, "cpu, hpc, fast engine: partitions split between this many threads.", "threads, at most 4",
    minimum=1,
)  # fmt: skip


def default_threads() -> int:
    """Physical cores this process may use: hyper-threads share a core's vector units and rarely help here."""
    allowed = allowed_cpus()
    physical = psutil.cpu_count(logical=False) or allowed
    return max(1, min(physical, allowed))


def lane_layout(threads: int, lanes: int | None = None) -> tuple[int, int]:
    """(lanes, intra-op threads per lane) for the fast engine; ``lanes`` overrides the default."""
    lanes = max(1, lanes or min(threads, MAX_LANES))
    return lanes, max(1, threads // lanes)


@dataclass
class CpuBackend:
    name: str = "cpu"
    options: tuple[BackendOption, ...] = (LANES,)
    precisions: tuple[str, ...] = CPU_PRECISIONS
    default_batch_size: int = 512

    def check(self, options: dict) -> None:
        pass

    def machine(self, plan: Plan) -> str | None:
        return None

    def run(self, plan: Plan, emit: Emit) -> BackendRun:
        import torch

        from cai_bench.engine import plan_options, run_reference, start_worker
        from cai_bench.loop import units_from, worker_loop

        threads = plan.threads or default_threads()
        if plan.engine == "reference" or plan.compile:  # a compiled model is called from one thread only
            lanes, intra = 1, threads
        else:
            lanes, intra = lane_layout(threads, plan.backend_options.get("lanes"))
        options = plan_options(plan, lanes)
        refs = work_units(plan)
        previous_threads = torch.get_num_threads()
        torch.set_num_threads(intra)
        info = {"lanes": lanes, "intra_op_threads": intra}
        try:
            start = time.perf_counter()
            if plan.engine == "reference":
                worker = start_worker("cpu-0", options, weights=plan.weights, seed=plan.seed)
                emit(run_reference(refs, worker, options))
                wall_s = time.perf_counter() - start
                return BackendRun(wall_s, worker.weights, 1, threads, info={**info, **worker.choices})
            worker = worker_loop(
                lambda: start_worker("cpu-0", options, weights=plan.weights, seed=plan.seed),
                units_from(list(enumerate(refs))),
                options,
                lambda position, result: emit(result),
            )
            worker.close()
            wall_s = time.perf_counter() - start
        finally:
            torch.set_num_threads(previous_threads)
        info["prefetch_partitions"] = 1
        return BackendRun(wall_s, worker.weights, workers=1, threads=threads, info={**info, **worker.choices})


def create() -> CpuBackend:
    return CpuBackend()
