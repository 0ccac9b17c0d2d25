"""What every worker holds and reports, whatever runs its model, importable without torch: the options a worker
gets, its state, the precision rule, and the record of one unit. ``engine`` (torch) and ``runtimes`` (ONNX
Runtime, OpenVINO) both build on it, so a worker on another runtime never imports torch.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from cai_bench.core.errors import UserError
from cai_bench.core.plan import BITS_PER_SAMPLE, PartitionRef, Plan
from cai_bench.core.records import WeightsInfo, WorkerRecord
from cai_bench.core.stats import percentiles, rate
from cai_bench.data.synthetic import generate
from cai_bench.measure.metrics import peak_rss_bytes

WARMUP_BATCH = 16
PRECISION_TOLERANCE = 2e-3  # largest redshift difference from fp32 that a faster precision may cause
PROBE_BATCH = 64
# Set (fp32 or bf16) to replace the precision probe's answer; what the tests use to stand for another machine
FORCE_PROBE_ENV = "CAI_BENCH_FORCE_PROBE"


@dataclass(frozen=True)
class EngineOptions:
    batch_size: int = 512
    precision: str = "auto"  # "auto", "fp32", "bf16", "int8" (onnxruntime), "tf32", "fp16" (CUDA)
    device: str = "cpu"
    verify_checksums: bool = True
    engine: str = "fast"
    compile: bool = False
    lanes: int = 1  # threads that split each partition between them (each with the process's intra-op threads)
    runtime: str = "torch"  # what runs the model: torch, onnxruntime or openvino (choices.RUNTIMES)
    intra_threads: int = 0  # exported-model runtimes: threads per lane (0: the allowed CPUs shared by the lanes)


def plan_options(plan: Plan, lanes: int = 1, device: str = "cpu", intra_threads: int = 0) -> EngineOptions:
    """What a worker needs to know of a plan, with where it runs, how many lanes it splits partitions into and
    (for the exported-model runtimes, which have no process-wide thread count) how many threads each lane has."""
    runtime = plan.backend_options.get("runtime") or "torch"  # checked before any plan (plan.check_settings)
    return EngineOptions(
        batch_size=plan.batch_size,
        precision=plan.precision,
        device=device,
        verify_checksums=plan.verify_checksums,
        engine=plan.engine,
        compile=plan.compile,
        lanes=lanes,
        runtime=runtime,
        intra_threads=intra_threads if runtime != "torch" else 0,
    )


@dataclass
class WorkerState:
    worker_id: str
    model: Any  # a torch module, or a runtime's compiled model (runtimes.RuntimeModel)
    weights: WeightsInfo
    startup_s: float
    warmup_batch_s: float
    precision: str = "fp32"  # what runs: "auto" resolved
    channels_last: bool = False
    choices: dict = field(default_factory=dict)  # what the engine chose and measured, for the run record
    units_done: int = 0
    lanes: ThreadPoolExecutor | None = None  # with options.lanes > 1: the threads that share each partition
    pipeline: Any = None  # a backend's own per-worker state (the GPU worker's device buffers and streams)

    def close(self) -> None:
        if self.lanes is not None:
            self.lanes.shutdown()
            self.lanes = None


@contextlib.contextmanager
def torch_threads(threads: int | None):
    """torch's intra-op threads set to ``threads`` while the block runs; None: torch is not touched (a worker on
    another runtime never imports it)."""
    if threads is None:
        yield
        return
    import torch  # only where the model runs through it

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def probe_arrays(size: int = PROBE_BATCH):
    """The precision probe's batch, as numpy arrays: ``size`` realistic galaxies (not noise), the same on every
    runtime."""
    batch = generate(seed=12345, start=0, stop=size)
    return batch.images, batch.magnitudes


def run_in_lanes(worker: WorkerState, samples: int, lanes: int, run_share: Callable[[int, int, int], list[float]]):
    """``run_share(lane, lo, hi)`` over an even split of ``samples`` between up to ``lanes`` lanes, each in a
    thread of the worker's lane pool (made on first use), so no lane idles while another runs a last, partial
    batch; returns every batch latency, lane by lane."""
    count = min(max(lanes, 1), max(samples, 1))
    bounds = [round(samples * i / count) for i in range(count + 1)]
    shares = [(lane, bounds[lane], bounds[lane + 1]) for lane in range(count)]
    if count == 1:
        return run_share(*shares[0])
    if worker.lanes is None:
        worker.lanes = ThreadPoolExecutor(max_workers=count, thread_name_prefix="cai-lane")
    return [x for share in worker.lanes.map(lambda s: run_share(*s), shares) for x in share]


def decide_precision(
    native: bool, fp32_s: float, bf16_s: float, max_difference: float, tolerance: float = PRECISION_TOLERANCE
) -> tuple[str, str]:
    """The probe's rule, apart from its measurements: bf16 only where the device has it natively, it ran at
    least 10% faster than fp32, and its predictions stayed within ``tolerance`` of fp32's."""
    if not native:
        return "fp32", "no native bf16 on this device"
    if not bf16_s < 0.9 * fp32_s:
        return "fp32", "not 10% faster"
    if not max_difference <= tolerance:
        return "fp32", "outside tolerance"
    return "bf16", "faster and within tolerance"


def forced_precision(allowed: tuple[str, ...]) -> tuple[str, dict] | None:
    """The probe's answer as FORCE_PROBE_ENV gives it (one of ``allowed``), with why; None when it is not set."""
    forced = os.environ.get(FORCE_PROBE_ENV, "").strip().lower()
    if not forced:
        return None
    if forced not in allowed:
        raise UserError(f"{FORCE_PROBE_ENV}={forced!r}: give {' or '.join(allowed)}, or unset it")
    return forced, {"chose": forced, "why": f"forced by {FORCE_PROBE_ENV}"}


def worker_record(
    worker: WorkerState,
    *,
    partition: int,
    partition_file: str,
    samples: int,
    batch_size: int,
    device: object,
    wait_s: float,
    load_s: float,
    compute_s: float,
    own_s: float,
    latencies: list[float],
    device_stats: dict | None = None,
    busy_s: float | None = None,
) -> WorkerRecord:
    """The record of one unit of work; start-up is charged to the worker's first unit only. ``busy_s``: a device
    unit's share of the device's busy time, which its rates are of (its ``compute_s`` is a latency that overlaps
    its neighbours')."""
    startup_s = worker.startup_s if worker.units_done == 0 else 0.0
    worker.units_done += 1
    bits = samples * BITS_PER_SAMPLE
    lat = percentiles(latencies)
    return WorkerRecord(
        worker_id=worker.worker_id,
        partition=partition,
        partition_file=partition_file,
        samples=samples,
        bits=bits,
        batches=len(latencies),
        batch_size=batch_size,
        precision=worker.precision,
        device=str(device),
        startup_s=startup_s,
        wait_s=wait_s,
        load_s=load_s,
        compute_s=compute_s,
        total_s=startup_s + wait_s + own_s,
        samples_per_s=rate(samples, compute_s if busy_s is None else busy_s),
        throughput_bps=rate(bits, compute_s if busy_s is None else busy_s),
        batch_latency_p50_s=lat["p50"],
        batch_latency_p90_s=lat["p90"],
        batch_latency_p99_s=lat["p99"],
        peak_rss_bytes=peak_rss_bytes(),
        host=socket.gethostname(),
        pid=os.getpid(),
        batch_latency_s=[round(x, 6) for x in latencies],
        device_stats=device_stats,
        busy_s=busy_s,
        ended_epoch_s=time.time(),
    )


def partition_record(worker: WorkerState, ref: PartitionRef, entered: float, **figures) -> WorkerRecord:
    """The record of one partition run on ``worker`` that began at ``entered`` (a perf_counter reading);
    ``figures`` are worker_record's samples, batch_size, device, wait_s, load_s, compute_s, latencies."""
    own_s = time.perf_counter() - entered
    return worker_record(worker, partition=ref.index, partition_file=os.path.basename(ref.path), own_s=own_s, **figures)
