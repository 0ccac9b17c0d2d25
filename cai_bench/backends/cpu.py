"""``cpu``: one worker in the command's own process, the next partition read in the background.

The fast engine splits each partition between lanes: threads with one intra-op thread each (``threads`` cores
give ``threads`` lanes, at most MAX_LANES), sharing one model. On a 2-core AMD EPYC machine two single-threaded
lanes ran the prepared model about 25% faster than one two-threaded loop: this model's many small operations
(16-channel convolutions, element-wise steps) parallelise poorly inside one operation. The reference engine
runs as upstream did: one loop with all threads, over the whole data set at once.

Unlike the other backends, ``cpu`` runs ``loop.worker_loop`` over its list of units directly, not under the
dispatcher (``dispatch.py``), on purpose: the dispatcher moves units between workers (retries on another worker,
a replacement for a lost one, read-ahead only while every worker has work), and here there is one worker, in the
driver's own process. A crash of that worker is a crash of the command, so nothing would be left to retry; a
partition that raises is, on one local reader, a bad input (a checksum, a size, a dtype, NaN: it fails the same
way when read again), which stops the run with the one line and exit code 2 that bad input gets, the partitions
that finished kept in a ``failed`` record; and reads from ``s3://`` are already retried by botocore (standard
mode, 5 attempts). Use ``--backend hpc --workers 1`` for the same single worker under the dispatcher.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from cai_bench.backends.base import BackendOption, BackendRun, Emit
from cai_bench.backends.options import LANES, RUNTIME
from cai_bench.core.choices import CPU_PRECISIONS
from cai_bench.core.machine import default_threads
from cai_bench.core.plan import Plan, work_units
from cai_bench.inference.loop import model_worker, prepare_model, units_from, worker_loop
from cai_bench.inference.runtime_choice import Layout
from cai_bench.inference.worker import plan_options, torch_threads

MAX_LANES = 4  # each lane holds a batch of activations; more lanes cost memory for little gain


def lane_layout(threads: int, lanes: int | None = None) -> tuple[int, int]:
    """(lanes, intra-op threads per lane) for the fast engine; ``lanes`` overrides the default."""
    lanes = max(1, lanes or min(threads, MAX_LANES))
    return lanes, max(1, threads // lanes)


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

    def worker_layout(self, plan: Plan) -> Layout:
        """The one worker's lanes and threads: what --runtime auto's probe starts each runtime with."""
        return Layout(*lane_layout(plan.threads or default_threads(), plan.backend_options.get("lanes")))

    def run(self, plan: Plan, emit: Emit) -> BackendRun:
        threads = plan.threads or default_threads()
        if plan.engine == "reference" or plan.compile:  # a compiled model is called from one thread only
            lanes, intra = 1, threads
        else:
            lanes, intra = lane_layout(threads, plan.backend_options.get("lanes"))
        options = plan_options(plan, lanes, intra_threads=intra)
        # An export the run needs is made before the clock starts, as the data set is: a one-off preparation
        model, prepared = prepare_model(plan.weights, options.runtime, plan.seed, options.precision)
        refs = work_units(plan)
        info = {"lanes": lanes, "intra_op_threads": intra, **prepared}
        with torch_threads(intra if options.runtime == "torch" else None):
            start = time.perf_counter()
            if plan.engine == "reference":
                from cai_bench.inference.engine import run_reference, start_worker  # torch: only once the run starts

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
