"""``cpu``: one process on this machine; the fast engine runs partitions on several lanes at once.

A lane is a thread that takes the next loaded partition and runs it through the shared model with one intra-op
thread (``threads`` cores give ``threads`` lanes, at most MAX_LANES). On the 2-core dev machine two lanes of one
thread each ran the prepared model about 25% faster than one lane of two threads: this model's many small
operations (16-channel convolutions, element-wise steps) parallelise poorly inside one operation. A reader
thread keeps the next partitions loaded, at most one per lane ahead, so memory stays bounded. The reference
engine runs as upstream did: one loop with all threads.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass

import psutil
import torch

from cai_bench.backends.base import BackendRun, Emit
from cai_bench.engine import EngineOptions, load_partition, run_partition, run_reference, start_worker
from cai_bench.metrics import allowed_cpus
from cai_bench.plan import Plan

MAX_LANES = 4  # more lanes hold more partitions and activations in memory for little gain
_DONE = object()  # end of the partitions, one per lane


def default_threads() -> int:
    """Physical cores this process may use: hyper-threads share a core's vector units and rarely help here."""
    allowed = allowed_cpus()
    physical = psutil.cpu_count(logical=False) or allowed
    return max(1, min(physical, allowed))


def lane_layout(threads: int, partitions: int, lanes: int | None = None) -> tuple[int, int]:
    """(lanes, intra-op threads per lane) for the fast engine; ``lanes`` overrides the default."""
    lanes = max(1, min(lanes or min(threads, MAX_LANES), partitions))
    return lanes, max(1, threads // lanes)


@dataclass
class CpuBackend:
    name: str = "cpu"

    def run(self, plan: Plan, emit: Emit) -> BackendRun:
        threads = plan.threads or default_threads()
        options = EngineOptions(
            batch_size=plan.batch_size,
            precision=plan.precision,
            device="cpu",
            verify_checksums=plan.verify_checksums,
            engine=plan.engine,
            compile=plan.compile,
        )
        previous_threads = torch.get_num_threads()
        try:
            if plan.engine == "reference":
                torch.set_num_threads(threads)
                start = time.perf_counter()
                worker = start_worker("cpu-0", options, weights=plan.weights, seed=plan.seed)
                emit(run_reference(plan.partitions, worker, options))
                info = {"threads": threads, "lanes": 1, "intra_op_threads": threads, **worker.choices}
                return BackendRun(time.perf_counter() - start, worker.weights, info)
            lanes, intra = lane_layout(threads, len(plan.partitions), plan.backend_options.get("lanes"))
            torch.set_num_threads(intra)
            start = time.perf_counter()
            worker = _run_lanes(plan, options, lanes, emit)
            wall_s = time.perf_counter() - start
        finally:
            torch.set_num_threads(previous_threads)
        info = {"threads": threads, "lanes": lanes, "intra_op_threads": intra, "prefetch_partitions": lanes}
        return BackendRun(wall_s=wall_s, weights=worker.weights, info={**info, **worker.choices})


def _run_lanes(plan: Plan, options: EngineOptions, lanes: int, emit: Emit):
    """Reader thread -> bounded queue of loaded partitions -> ``lanes`` compute threads sharing one model.

    Any failure (a bad partition, Ctrl-C in the caller) sets ``stop``: the reader stops reading, each lane
    finishes the partition in hand (its result is still emitted) and the first error is raised.
    """
    loaded: queue.Queue = queue.Queue(maxsize=lanes)
    stop = threading.Event()
    emit_lock = threading.Lock()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                loaded.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def read() -> None:
        try:
            for ref in plan.partitions:
                if not put(load_partition(ref, options)):
                    return
        except BaseException as exc:  # handed to a lane, which raises it in the caller
            put(exc)
        for _ in range(lanes):
            put(_DONE)

    def lane(state) -> None:
        while not stop.is_set():
            waited = time.perf_counter()
            try:
                item = loaded.get(timeout=0.1)
            except queue.Empty:
                continue
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            result = run_partition(item, state, options, wait_s=time.perf_counter() - waited)
            del item
            with emit_lock:
                emit(result)

    with ThreadPoolExecutor(max_workers=lanes + 1, thread_name_prefix="cai-cpu") as pool:
        pool.submit(read)  # reading the first partitions overlaps the model build
        try:
            worker = start_worker("cpu-0", options, weights=plan.weights, seed=plan.seed)
            # Lanes share the model and its one start-up (charged to lane 0's first partition).
            others = [dataclasses.replace(worker, worker_id=f"cpu-{i}", units_done=1) for i in range(1, lanes)]
            futures = [pool.submit(lane, state) for state in [worker, *others]]
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            for future in done:
                future.result()  # the first lane error, if any
            for future in futures:
                future.result()
        finally:
            stop.set()
    return worker


def create() -> CpuBackend:
    return CpuBackend()
