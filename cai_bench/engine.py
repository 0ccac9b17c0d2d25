"""The one inference loop every backend runs on its workers.

A worker starts once (``start_worker``: build the model, load weights, one small warm-up batch) and then
processes partitions (``run_partition``): batches of ``batch_size`` through the model under
``torch.inference_mode``, timed, predictions kept. Each partition yields a ``WorkerRecord``.

Times, per partition (shared/spec/data-and-measures.md):
    startup_s  the worker's start-up, charged to the first partition it runs (later ones are warm, like a
               warm Lambda invocation, and carry 0)
    load_s     read + checksum + decode of the partition (may overlap the previous partition's compute)
    wait_s     how long compute stood still waiting for the partition
    compute_s  model forward over all batches, nothing else
    total_s    startup_s + wait_s + the partition's own time in this function
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from cai_bench.data.partitions import Partition, read_partition
from cai_bench.metrics import peak_rss_bytes, percentiles, rate, trim_heap
from cai_bench.model.astromae import build_model
from cai_bench.model.checkpoint import RANDOM_INIT, WeightsInfo, load_weights
from cai_bench.plan import BITS_PER_SAMPLE, PartitionRef

WARMUP_BATCH = 16


@dataclass(frozen=True)
class EngineOptions:
    batch_size: int = 512
    precision: str = "fp32"
    device: str = "cpu"
    verify_checksums: bool = True


@dataclass
class WorkerState:
    worker_id: str
    model: nn.Module
    weights: WeightsInfo
    startup_s: float
    warmup_batch_s: float
    units_done: int = 0


@dataclass
class WorkerRecord:
    worker_id: str
    partition: int
    partition_file: str
    samples: int
    bits: int
    batches: int
    batch_size: int
    precision: str
    device: str
    startup_s: float
    wait_s: float
    load_s: float
    compute_s: float
    total_s: float
    samples_per_s: float  # samples / compute_s
    throughput_bps: float  # bits / compute_s: the worker's own throughput, as the paper counts per function
    batch_latency_p50_s: float | None
    batch_latency_p90_s: float | None
    batch_latency_p99_s: float | None
    peak_rss_bytes: int
    host: str
    pid: int
    batch_latency_s: list[float] = field(default_factory=list)


@dataclass
class PartitionResult:
    record: WorkerRecord
    object_id: np.ndarray
    prediction: np.ndarray  # float32 redshift per object
    redshift: np.ndarray  # the partition's labels (NaN-free when the data has labels)


def _synchronize(device: torch.device) -> None:
    # CUDA kernels run asynchronously; a timer read without this would measure the launch, not the work.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _precision_context(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def start_worker(worker_id: str, options: EngineOptions, weights: str | None = None, seed: int = 0) -> WorkerState:
    """Build the model (and load weights) on this worker; timed as the worker's start-up."""
    start = time.perf_counter()
    device = torch.device(options.device)
    model = build_model(seed=seed)
    info = load_weights(model, weights) if weights else WeightsInfo(source=RANDOM_INIT, seed=seed)
    model = model.to(device)
    # One small batch runs the one-off work (thread pools, kernel selection) before anything is timed as compute.
    warm = time.perf_counter()
    image = torch.zeros(WARMUP_BATCH, 5, 32, 32, device=device)
    magnitude = torch.full((WARMUP_BATCH, 5), 17.0, dtype=torch.float64, device=device)
    with torch.inference_mode(), _precision_context(device, options.precision):
        model(image, magnitude)
    _synchronize(device)
    end = time.perf_counter()
    return WorkerState(worker_id, model, info, startup_s=end - start, warmup_batch_s=end - warm)


def load_partition(ref: PartitionRef, options: EngineOptions) -> Partition:
    return read_partition(ref, verify=options.verify_checksums)


def run_partition(
    partition: Partition | PartitionRef, worker: WorkerState, options: EngineOptions, wait_s: float = 0.0
) -> PartitionResult:
    """Run the model over one partition.

    Given a reference, the partition is read here and the whole read counts as waiting; given a partition a
    background reader already loaded, ``wait_s`` is how long the caller waited for it.
    """
    if isinstance(partition, PartitionRef):
        started = time.perf_counter()
        partition = load_partition(partition, options)
        wait_s = time.perf_counter() - started
    entered = time.perf_counter()
    device = torch.device(options.device)
    n, batch = len(partition), options.batch_size
    prediction = torch.empty(n, dtype=torch.float32)
    latencies = []
    _synchronize(device)
    compute_start = time.perf_counter()
    with torch.inference_mode(), _precision_context(device, options.precision):
        for lo in range(0, n, batch):
            t0 = time.perf_counter()
            image = partition.images[lo : lo + batch].to(device, non_blocking=True)
            magnitude = partition.magnitudes[lo : lo + batch].to(device, non_blocking=True)
            out = worker.model(image, magnitude)
            prediction[lo : lo + batch] = out[:, 0].float().cpu()
            _synchronize(device)
            latencies.append(time.perf_counter() - t0)
    compute_s = time.perf_counter() - compute_start
    trim_heap()

    startup_s = worker.startup_s if worker.units_done == 0 else 0.0
    worker.units_done += 1
    bits = n * BITS_PER_SAMPLE
    lat = percentiles(latencies)
    record = WorkerRecord(
        worker_id=worker.worker_id,
        partition=partition.ref.index,
        partition_file=os.path.basename(partition.ref.path),
        samples=n,
        bits=bits,
        batches=len(latencies),
        batch_size=batch,
        precision=options.precision,
        device=str(device),
        startup_s=startup_s,
        wait_s=wait_s,
        load_s=partition.load_s,
        compute_s=compute_s,
        total_s=startup_s + wait_s + (time.perf_counter() - entered),
        samples_per_s=rate(n, compute_s),
        throughput_bps=rate(bits, compute_s),
        batch_latency_p50_s=lat["p50"],
        batch_latency_p90_s=lat["p90"],
        batch_latency_p99_s=lat["p99"],
        peak_rss_bytes=peak_rss_bytes(),
        host=socket.gethostname(),
        pid=os.getpid(),
        batch_latency_s=[round(x, 6) for x in latencies],
    )
    return PartitionResult(record, partition.object_id.numpy(), prediction.numpy(), partition.redshift.numpy())
