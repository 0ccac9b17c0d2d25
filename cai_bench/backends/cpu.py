"""``cpu``: one worker process on this machine, the next partition read in the background.

The fast engine splits each partition between lanes: threads with one intra-op thread each (``threads`` cores
give ``threads`` lanes, at most MAX_LANES), sharing one model. On the 2-core dev machine two single-threaded
lanes ran the prepared model about 25% faster than one two-threaded loop: this model's many small operations
(16-channel convolutions, element-wise steps) parallelise poorly inside one operation. The reference engine
runs as upstream did: one loop with all threads.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import psutil

from cai_bench.backends.base import BackendOption, BackendRun, Emit
from cai_bench.choices import CPU_PRECISIONS, RUNTIMES
from cai_bench.metrics import allowed_cpus
from cai_bench.plan import Plan, work_units

MAX_LANES = 4  # each lane holds a batch of activations; more lanes cost memory for little gain
LANES = BackendOption(
    "lanes", int, "cpu, hpc: partitions split between this many threads (torch: sharing the model; onnxruntime: a "
    "session each; openvino: a stream each).", "threads, at most 4",
    minimum=1,
)  # fmt: skip
RUNTIME = BackendOption(
    "runtime", str, "cpu, hpc, lambda: what runs the model: torch, or an export on onnxruntime or openvino.",
    "torch", choices=RUNTIMES,
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


@contextlib.contextmanager
def torch_threads(threads: int | None):
    """torch's intra-op threads set to ``threads`` while the block runs; None: torch is not touched (a worker on
    another runtime never imports it)."""
    if threads is None:
        yield
        return
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@dataclass
class CpuBackend:
    name: str = "cpu"
    options: tuple[BackendOption, ...] = (LANES, RUNTIME)
    precisions: tuple[str, ...] = CPU_PRECISIONS
    default_batch_size: int = 512

    def check(self, options: dict) -> None:
        pass

    def machine(self, plan: Plan) -> str | None:
        return None

    def run(self, plan: Plan, emit: Emit) -> BackendRun:
        from cai_bench.loop import model_worker, units_from, worker_loop
        from cai_bench.runtimes import model_for_workers
        from cai_bench.worker import plan_options

        threads = plan.threads or default_threads()
        if plan.engine == "reference" or plan.compile:  # a compiled model is called from one thread only
            lanes, intra = 1, threads
        else:
            lanes, intra = lane_layout(threads, plan.backend_options.get("lanes"))
        options = plan_options(plan, lanes, intra_threads=intra)
        # An export the run needs is made before the clock starts, as the data set is: a one-off preparation
        model, prepared = model_for_workers(plan.weights, options.runtime, plan.seed)
        refs = work_units(plan)
        info = {"lanes": lanes, "intra_op_threads": intra, **prepared}
        with torch_threads(intra if options.runtime == "torch" else None):
            start = time.perf_counter()
            if plan.engine == "reference":
                from cai_bench.engine import run_reference, start_worker

                worker = start_worker("cpu-0", options, weights=plan.weights, seed=plan.seed)
                emit(run_reference(refs, worker, options))
                wall_s = time.perf_counter() - start
                return BackendRun(wall_s, worker.weights, 1, threads, info={**info, **worker.choices})
            begin, load, run = model_worker("cpu-0", options, model, plan.seed)
            worker = worker_loop(
                begin,
                units_from(list(enumerate(refs))),
                options,
                lambda position, result: emit(result),
                load=load,
                run=run,
            )
            worker.close()
            wall_s = time.perf_counter() - start
        info["prefetch_partitions"] = 1
        return BackendRun(wall_s, worker.weights, workers=1, threads=threads, info={**info, **worker.choices})


def create() -> CpuBackend:
    return CpuBackend()
