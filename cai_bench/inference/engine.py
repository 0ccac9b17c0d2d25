"""The one inference loop every backend runs on its workers, and the upstream-style reference loop.

A worker starts once (``start_worker``: build the model, load weights, prepare it, one small warm-up batch) and
then processes partitions (``run_partition``): batches of ``batch_size`` through the model under
``torch.inference_mode``, timed, predictions kept. Each partition yields a ``WorkerRecord``.

Two engines:
    fast       (default) the model prepared for inference (``model/inference.py``: BatchNorm folded,
               channels_last), precision "auto" (bf16 only where a start-up probe finds it faster and within
               2e-3 of fp32), optional torch.compile; every choice goes into the record
    reference  the upstream style, as the baseline: the whole data set read into one TensorDataset up front,
               a default DataLoader, eager float32 under no_grad (``run_reference``)

Times, per partition (docs/measurements.md):
    startup_s  the worker's start-up, charged to the first partition it runs (later ones are warm, like a
               warm Lambda invocation, and carry 0)
    load_s     read + checksum + decode of the partition (may overlap the previous partition's compute)
    wait_s     how long compute stood still waiting for the partition
    compute_s  model forward over all batches, nothing else
    total_s    startup_s + wait_s + the partition's own time in this function
"""

from __future__ import annotations

import contextlib
import time

import torch
from torch import nn

from cai_bench.core.machine import native_bf16_cpu
from cai_bench.core.plan import PartitionRef
from cai_bench.core.records import RANDOM_INIT, PartitionResult, WeightsInfo
from cai_bench.data.partitions import Partition, read_partition
from cai_bench.inference.worker import (  # noqa: F401 (named here for callers: the engine's vocabulary)
    FORCE_PROBE_ENV,
    PRECISION_TOLERANCE,
    PROBE_BATCH,
    WARMUP_BATCH,
    EngineOptions,
    WorkerState,
    decide_precision,
    forced_precision,
    partition_record,
    plan_options,
    probe_arrays,
    run_in_lanes,
    worker_record,
)
from cai_bench.measure.metrics import trim_heap
from cai_bench.model.astromae import build_model
from cai_bench.model.checkpoint import load_weights
from cai_bench.model.inference import compile_model, prepare_for_inference


def _synchronize(device: torch.device) -> None:
    # CUDA kernels run asynchronously; a timer read without this would measure the launch, not the work.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _precision_context(device: torch.device, precision: str):
    """Where the precision is an autocast (bf16, fp16); fp32 and tf32 run the float32 model as it is (tf32 is
    a switch of CUDA's matrix units, set once per worker: ``set_tf32``)."""
    if precision in ("bf16", "fp16"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
    return contextlib.nullcontext()


def set_tf32(enabled: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def native_bf16(device: torch.device) -> bool:
    """Whether the device computes bf16 natively (else bf16 is emulated and never worth probing). On a GPU, plain
    ``is_bf16_supported()`` counts emulation too: bf16 would be labelled native on a T4 or V100."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return native_bf16_cpu()


def probe_inputs(
    device: torch.device, channels_last: bool, size: int = PROBE_BATCH
) -> tuple[torch.Tensor, torch.Tensor]:
    """The precision probe's batch (``worker.probe_arrays``) on ``device``."""
    images, magnitudes = probe_arrays(size)
    image = torch.from_numpy(images).to(device)
    if channels_last:
        image = image.contiguous(memory_format=torch.channels_last)
    return image, torch.from_numpy(magnitudes).to(device)


def time_precisions(model: nn.Module, device: torch.device, channels_last: bool) -> dict:
    """fp32 and bf16 on one probe batch: best of 2 each after a warm-up, alternated, and how far apart their
    predictions are."""
    image, magnitude = probe_inputs(device, channels_last)
    seconds = {"fp32": [], "bf16": []}
    outputs = {}
    with torch.inference_mode():
        for _ in range(3):
            for precision in ("fp32", "bf16"):
                _synchronize(device)
                start = time.perf_counter()
                with _precision_context(device, precision):
                    outputs[precision] = model(image, magnitude).float()
                _synchronize(device)
                seconds[precision].append(time.perf_counter() - start)
    return {
        "fp32_s": min(seconds["fp32"][1:]),  # the first of each is a warm-up
        "bf16_s": min(seconds["bf16"][1:]),
        "max_difference": float((outputs["bf16"] - outputs["fp32"]).abs().max()),
    }


def choose_precision(model: nn.Module, device: torch.device, channels_last: bool) -> tuple[str, dict]:
    """For precision "auto": what ``decide_precision`` makes of this device and a timed probe batch.

    The probe is timed, so on a machine where bf16 is only a little faster its answer can differ between two
    runs; each run records what it chose and why. FORCE_PROBE_ENV (bf16 or fp32) replaces the answer without
    probing, so that a test suite can be run as it would on a machine that answers the other way.
    """
    forced = forced_precision(("fp32", "bf16"))
    if forced:
        return forced
    native = native_bf16(device)
    if not native:
        return "fp32", {"chose": "fp32", "why": decide_precision(False, 0.0, 0.0, 0.0)[1]}
    measured = time_precisions(model, device, channels_last)
    chose, why = decide_precision(native, **measured, tolerance=PRECISION_TOLERANCE)
    return chose, {"chose": chose, "why": why, **measured, "batch": PROBE_BATCH}


def auto_precision(seed: int) -> tuple[str, dict]:
    """What precision "auto" runs as on this CPU, probed on the fast engine's model as a worker prepares it."""
    model = build_model(seed=seed).eval()
    choices = prepare_for_inference(model)
    return choose_precision(model, torch.device("cpu"), choices["channels_last"])


def start_worker(worker_id: str, options: EngineOptions, weights: str | None = None, seed: int = 0) -> WorkerState:
    """Build the model (and load weights), prepare it for the engine; all of it timed as the worker's start-up.

    The fast engine resolves precision "auto" with a probe and, with ``compile``, compiles during the warm-up on
    a full batch and a partial one (the last batch of a partition), so no compilation lands in compute time.
    """
    start = time.perf_counter()
    device = torch.device(options.device)
    model = build_model(seed=seed)
    info = load_weights(model, weights) if weights else WeightsInfo(source=RANDOM_INIT, seed=seed)
    model = model.to(device)
    choices: dict = {
        "engine": options.engine,
        "runtime": "torch",
        "runtime_version": torch.__version__,
        "threading": {"lanes": options.lanes, "intra_op_threads": torch.get_num_threads()},
        "precision_requested": options.precision,
    }
    precision, channels_last = ("fp32" if options.precision == "auto" else options.precision), False
    if options.engine == "fast":
        choices.update(prepare_for_inference(model))
        channels_last = choices["channels_last"]
        if options.precision == "auto":
            precision, choices["precision_probe"] = choose_precision(model, device, channels_last)
    choices["precision"] = precision
    shapes = [WARMUP_BATCH]
    if options.compile:
        model = compile_model(model)
        shapes = [options.batch_size, max(1, options.batch_size // 2 - 1)]
    # Warm-up batches run the one-off work (thread pools, kernel selection, compilation) before anything is
    # timed as compute.
    warm = time.perf_counter()
    with torch.inference_mode(), _precision_context(device, precision):
        for n in shapes:
            image = torch.zeros(n, 5, 32, 32, device=device)
            if channels_last:
                image = image.contiguous(memory_format=torch.channels_last)
            model(image, torch.full((n, 5), 17.0, dtype=torch.float64, device=device))
    _synchronize(device)
    end = time.perf_counter()
    choices["compile"] = options.compile
    if options.compile:
        choices["compile_s"] = end - warm
    return WorkerState(
        worker_id,
        model,
        info,
        startup_s=end - start,
        warmup_batch_s=end - warm,
        precision=precision,
        channels_last=channels_last,
        choices=choices,
    )


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

    def run_share(lane: int, lo: int, hi: int) -> list[float]:
        latencies = []
        # inference_mode and autocast are per thread: each lane enters them itself
        with torch.inference_mode(), _precision_context(device, worker.precision):
            for start in range(lo, hi, batch):
                stop = min(start + batch, hi)
                t0 = time.perf_counter()
                image = partition.images[start:stop].to(device, non_blocking=True)
                if worker.channels_last:
                    image = image.contiguous(memory_format=torch.channels_last)
                magnitude = partition.magnitudes[start:stop].to(device, non_blocking=True)
                out = worker.model(image, magnitude)
                prediction[start:stop] = out[:, 0].float().cpu()
                _synchronize(device)
                latencies.append(time.perf_counter() - t0)
        return latencies

    _synchronize(device)
    compute_start = time.perf_counter()
    latencies = run_in_lanes(worker, n, options.lanes, run_share)
    compute_s = time.perf_counter() - compute_start
    trim_heap()
    record = partition_record(
        worker, partition.ref, entered, samples=n, batch_size=batch, device=device, wait_s=wait_s,
        load_s=partition.load_s, compute_s=compute_s, latencies=latencies,
    )  # fmt: skip
    return PartitionResult(record, partition.object_id.numpy(), prediction.numpy(), partition.redshift.numpy())


def run_reference(refs: tuple[PartitionRef, ...], worker: WorkerState, options: EngineOptions) -> PartitionResult:
    """The upstream-style loop, kept as the baseline the fast path is measured against.

    As upstream's evaluation script does it: every partition read into one in-memory TensorDataset first (one
    ``load_s`` for all), then a default DataLoader (batch ``batch_size``, no worker processes, default
    collation), eager float32 under ``torch.no_grad``. One record covers the whole data set (partition -1).
    """
    from torch.utils.data import DataLoader, TensorDataset

    entered = time.perf_counter()
    parts = [read_partition(ref, verify=options.verify_checksums) for ref in refs]
    dataset = TensorDataset(
        torch.cat([p.images for p in parts]),
        torch.cat([p.magnitudes for p in parts]),
        torch.cat([p.redshift for p in parts]),
    )
    object_id = torch.cat([p.object_id for p in parts]).numpy()
    del parts
    load_s = time.perf_counter() - entered
    device = torch.device(options.device)
    predictions, latencies = [], []
    compute_start = time.perf_counter()
    with torch.no_grad():
        t0 = time.perf_counter()
        for images, magnitudes, _ in DataLoader(dataset, batch_size=options.batch_size):
            out = worker.model(images.to(device), magnitudes.to(device))
            predictions.append(out[:, 0].float().cpu())
            _synchronize(device)
            latencies.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
    compute_s = time.perf_counter() - compute_start
    record = worker_record(
        worker,
        partition=-1,
        partition_file=f"all {len(refs)} partitions",
        samples=len(dataset),
        batch_size=options.batch_size,
        device=device,
        wait_s=0.0,
        load_s=load_s,
        compute_s=compute_s,
        own_s=time.perf_counter() - entered,
        latencies=latencies,
    )
    return PartitionResult(record, object_id, torch.cat(predictions).numpy(), dataset.tensors[2].numpy())
