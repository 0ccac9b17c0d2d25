"""``cpu``: one in-process worker on this machine, N intra-op threads, the next partition read in the background."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import psutil
import torch

from cai_bench.backends.base import BackendRun, Emit
from cai_bench.engine import EngineOptions, load_partition, run_partition, start_worker
from cai_bench.metrics import allowed_cpus
from cai_bench.plan import Plan


def default_threads() -> int:
    """Physical cores this process may use: hyper-threads share a core's vector units and rarely help here."""
    allowed = allowed_cpus()
    physical = psutil.cpu_count(logical=False) or allowed
    return max(1, min(physical, allowed))


@dataclass
class CpuBackend:
    name: str = "cpu"

    def run(self, plan: Plan, emit: Emit) -> BackendRun:
        threads = plan.threads or default_threads()
        options = EngineOptions(
            batch_size=plan.batch_size, precision=plan.precision, device="cpu", verify_checksums=plan.verify_checksums
        )
        refs = plan.partitions
        previous_threads = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            start = time.perf_counter()
            # One partition ahead: reading overlaps compute (the first one overlaps the model build), and at
            # most two partitions are ever in memory.
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="cai-prefetch") as reader:
                pending = reader.submit(load_partition, refs[0], options)
                worker = start_worker("cpu-0", options, weights=plan.weights, seed=plan.seed)
                for position in range(len(refs)):
                    waited = time.perf_counter()
                    partition = pending.result()
                    wait_s = time.perf_counter() - waited
                    if position + 1 < len(refs):
                        pending = reader.submit(load_partition, refs[position + 1], options)
                    emit(run_partition(partition, worker, options, wait_s=wait_s))
                    del partition
            wall_s = time.perf_counter() - start
        finally:
            torch.set_num_threads(previous_threads)
        return BackendRun(wall_s=wall_s, weights=worker.weights, info={"threads": threads, "prefetch_partitions": 1})


def create() -> CpuBackend:
    return CpuBackend()
