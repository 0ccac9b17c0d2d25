"""``gpu``: one worker process per CUDA device of this machine, all pulling partitions from one queue (the
dispatcher, through hpc's NodeTransport: pipes to processes from the fork server, which never touches CUDA).

Each device worker keeps its GPU busy:
- partitions are read, checked and decoded by ``read_ahead`` background threads straight into a pool of pinned
  host buffers, one per partition in flight, reused;
- each batch is copied host-to-device on a stream of its own into one of two fixed device buffers, so the copy
  of batch k+1 overlaps the forward pass of batch k; magnitudes are cast to float32 on the device;
- every batch has the same shape: the last one is padded (rows of the batch before it) and the padding's
  outputs are dropped, so a captured CUDA graph (``--cuda-graphs``) or ``torch.compile(mode="reduce-overhead")``
  replays every batch; capture and compilation happen at start-up and are timed as start-up, never as compute;
- precision ``auto`` is resolved on the device by a probe: the fastest of tf32, bf16 and fp16 that is at least
  10% faster than fp32 and within 2e-3 of it, else fp32.

Timing is by CUDA events: a partition's ``compute_s`` runs from its first copy to its last output, both on the
device; its ``device_stats`` add the seconds the model ran (busy), the seconds and bytes of host-to-device
copies, and the device's peak memory. The same code runs on the CPU device (streams and events become
synchronous timers), which is how the tests check it here: ``run_devices(plan, emit, ["cpu"])``.

torch (and the engine and model modules, which import it) is imported inside the functions that use it, so
that choosing the backend or listing its options never imports torch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import queue
import time
from dataclasses import dataclass, field

from cai_bench.backends.base import BackendOption, BackendRun, Emit, dispatched_run
from cai_bench.backends.dispatch import DEFAULT_RETRIES, Dispatcher
from cai_bench.backends.hpc import NodeTransport, quiet_signals, serve_pipe, worker_context
from cai_bench.backends.options import RETRIES
from cai_bench.choices import GPU_PRECISIONS
from cai_bench.data.partitions import read_partition
from cai_bench.errors import UserError, describe
from cai_bench.plan import BITS_PER_SAMPLE, Plan, work_units
from cai_bench.records import RANDOM_INIT, PartitionResult, WeightsInfo
from cai_bench.worker import PRECISION_TOLERANCE, WorkerState, forced_precision, partition_record, plan_options

DEFAULT_BATCH_SIZE = 4096
PROBE_BATCH = 1024
NO_CUDA = (
    "--backend gpu: no CUDA device is visible here (torch.cuda.is_available() is False); run it on a machine with "
    "an NVIDIA GPU and a CUDA build of torch, or use --backend cpu or --backend hpc"
)


def parse_devices(text: str) -> str:
    """``0,1`` (or ``0+1``, which a sweep's comma lists leave whole) or ``all``, as the option holds it."""
    text = str(text).strip().lower()
    if text == "all":
        return text
    try:
        numbers = [int(t) for t in text.replace("+", ",").split(",") if t.strip()]
    except ValueError:
        numbers = []
    if not numbers or min(numbers) < 0 or len(set(numbers)) != len(numbers):
        raise UserError(f"--devices {text!r}: give CUDA device numbers (0,1 or 0+1) or all")
    return "+".join(str(n) for n in numbers)


OPTIONS = (
    BackendOption(
        "devices", str, "CUDA devices, one worker each: 0,1 (0+1 in a sweep) or all.", "all", parse=parse_devices
    ),
    BackendOption("cuda_graphs", bool, "Replay each batch as a CUDA graph captured at start-up.", False),
    BackendOption(
        "read_ahead", int, "Partitions read into pinned host buffers ahead of the device.", 2, minimum=1,
        identity=False,
    ),
    RETRIES,
)  # fmt: skip


def visible_devices(devices: str) -> list[str]:
    """The torch device names ``--devices`` selects; a UserError where there is no CUDA or no such device."""
    import torch

    if not torch.cuda.is_available():
        raise UserError(NO_CUDA)
    count = torch.cuda.device_count()
    numbers = list(range(count)) if devices == "all" else [int(n) for n in parse_devices(devices).split("+")]
    missing = [n for n in numbers if n >= count]
    if missing:
        raise UserError(f"--devices: no CUDA device {missing[0]} here ({count} visible: 0-{count - 1})")
    return [f"cuda:{n}" for n in numbers]


# ---------------------------------------------------------------------------------------------- host side


@dataclass
class HostBuffer:
    """Host memory for one partition's inputs: pinned where the device is a GPU, so copies run asynchronously."""

    images: object  # torch.Tensor float32 [capacity, 5, 32, 32]
    magnitudes: object  # torch.Tensor float64 [capacity, 5]


class PinnedPool:
    """A fixed number of host buffers, each big enough for the largest partition, handed out and returned as
    partitions are read and run: memory stays bounded, and pinning (slow) happens once per buffer."""

    def __init__(self, count: int, capacity: int, pin: bool):
        self.capacity, self.pin = capacity, pin
        self.free: queue.Queue[HostBuffer | None] = queue.Queue()
        for _ in range(count):
            self.free.put(None)  # allocated on first use

    def acquire(self) -> HostBuffer:
        import torch

        buffer = self.free.get()
        if buffer is None:
            images = torch.empty((self.capacity, 5, 32, 32), dtype=torch.float32, pin_memory=self.pin)
            buffer = HostBuffer(images, torch.empty((self.capacity, 5), dtype=torch.float64, pin_memory=self.pin))
        return buffer

    def release(self, buffer: HostBuffer) -> None:
        self.free.put(buffer)


@dataclass
class HostPartition:
    """One partition read into a host buffer: ``n`` rows of it hold the partition."""

    ref: object  # PartitionRef
    buffer: HostBuffer
    n: int
    object_id: object  # numpy int64
    redshift: object  # numpy float32
    load_s: float
    pool: PinnedPool | None = None  # where the buffer goes back to after the run

    def release(self) -> None:
        if self.pool is not None:
            self.pool.release(self.buffer)
            self.pool = None


def read_into(pool: PinnedPool | None, ref, verify: bool) -> HostPartition:
    """Read, check and decode one partition into a buffer of ``pool`` (a buffer of its own without a pool)."""
    import torch

    started = time.perf_counter()
    partition = read_partition(ref, verify=verify)
    n = len(partition)
    buffer = pool.acquire() if pool is not None else PinnedPool(1, n, pin=torch.cuda.is_available()).acquire()
    try:
        buffer.images[:n].copy_(partition.images)
        buffer.magnitudes[:n].copy_(partition.magnitudes)
    except BaseException:
        if pool is not None:
            pool.release(buffer)
        raise
    return HostPartition(
        ref, buffer, n, partition.object_id.numpy(), partition.redshift.numpy(), time.perf_counter() - started, pool
    )


# ---------------------------------------------------------------------------------------------- device side


class _Timer:
    """A CUDA event on a GPU, a clock reading on the CPU: ``elapsed`` in seconds, once the device has synced."""

    def __init__(self, device):
        import torch

        self.cuda = device.type == "cuda"
        self.event = torch.cuda.Event(enable_timing=True) if self.cuda else None
        self.at = 0.0

    def record(self, stream=None) -> None:
        if self.cuda:
            self.event.record(stream)
        else:
            self.at = time.perf_counter()

    def elapsed_to(self, later: _Timer) -> float:
        return self.event.elapsed_time(later.event) / 1e3 if self.cuda else later.at - self.at


@dataclass
class DevicePipeline:
    """A device worker's fixed buffers: two slots of a batch each (one filling while the other computes)."""

    device: object  # torch.device
    batch_size: int
    images: list  # per slot: float32 [B, 5, 32, 32], channels_last
    magnitudes64: list  # per slot: float64 [B, 5], what the copy brings
    magnitudes: list  # per slot: float32 [B, 5], cast on the device
    outputs: list = field(default_factory=list)  # per slot, with CUDA graphs: the graph's output tensor
    graphs: list = field(default_factory=list)  # per slot, with CUDA graphs
    copy_stream: object = None
    copied: list = field(default_factory=list)  # per slot: an event, the slot's inputs are on the device
    free: list = field(default_factory=list)  # per slot: an event, the slot's last forward pass is done


def _new_pipeline(device, batch_size: int, channels_last: bool) -> DevicePipeline:
    import torch

    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    images = [
        torch.zeros((batch_size, 5, 32, 32), device=device).contiguous(memory_format=memory_format) for _ in range(2)
    ]
    magnitudes64 = [torch.zeros((batch_size, 5), dtype=torch.float64, device=device) for _ in range(2)]
    magnitudes = [torch.full((batch_size, 5), 17.0, device=device) for _ in range(2)]
    pipeline = DevicePipeline(device, batch_size, images, magnitudes64, magnitudes)
    if device.type == "cuda":
        pipeline.copy_stream = torch.cuda.Stream(device)
        pipeline.copied = [torch.cuda.Event() for _ in range(2)]
        pipeline.free = [torch.cuda.Event() for _ in range(2)]
    return pipeline


def _autocast(device, precision: str):
    """The precision's autocast, without its cast cache: a CUDA graph must not capture cached weight casts,
    which the cache frees when the context ends (as torch's CUDA graph notes say)."""
    import torch

    if precision not in ("bf16", "fp16"):
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype, cache_enabled=False)


def _forward(worker, slot: int):
    pipeline = worker.pipeline
    if pipeline.graphs:
        pipeline.graphs[slot].replay()
        return pipeline.outputs[slot]
    return worker.model(pipeline.images[slot], pipeline.magnitudes[slot])


def _capture_graphs(worker, precision_context) -> None:
    """One CUDA graph per slot, captured after warm-up passes on a side stream (as CUDA graphs require)."""
    import torch

    pipeline, device = worker.pipeline, worker.pipeline.device
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side), torch.inference_mode(), precision_context():
        for slot in range(2):
            for _ in range(3):
                worker.model(pipeline.images[slot], pipeline.magnitudes[slot])
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    for slot in range(2):
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), precision_context(), torch.cuda.graph(graph):
            pipeline.outputs.append(worker.model(pipeline.images[slot], pipeline.magnitudes[slot]))
        pipeline.graphs.append(graph)


def choose_gpu_precision(model, device, channels_last: bool) -> tuple[str, dict]:
    """For precision "auto" on a GPU: each candidate against fp32 on a probe batch of realistic galaxies, best of
    3 after a warm-up; the fastest that is at least 10% faster and within PRECISION_TOLERANCE wins."""
    import torch

    from cai_bench.engine import probe_inputs, set_tf32

    forced = forced_precision(GPU_PRECISIONS[1:])
    if forced:
        return forced
    image, magnitude = probe_inputs(device, channels_last, PROBE_BATCH)
    candidates = ["fp32", "tf32", "fp16"] + (["bf16"] if torch.cuda.is_bf16_supported() else [])
    seconds, outputs = {}, {}
    with torch.inference_mode():
        for precision in candidates:
            set_tf32(precision == "tf32")
            times = []
            for _ in range(4):
                torch.cuda.synchronize(device)
                start = time.perf_counter()
                with _autocast(device, precision):
                    outputs[precision] = model(image, magnitude).float()
                torch.cuda.synchronize(device)
                times.append(time.perf_counter() - start)
            seconds[precision] = min(times[1:])
    set_tf32(False)
    difference = {p: float((outputs[p] - outputs["fp32"]).abs().max()) for p in candidates}
    good = [p for p in candidates[1:] if seconds[p] < 0.9 * seconds["fp32"] and difference[p] <= PRECISION_TOLERANCE]
    chose = min(good, key=seconds.get) if good else "fp32"
    why = "fastest within tolerance" if good else "nothing 10% faster within tolerance"
    return chose, {"chose": chose, "why": why, "seconds": seconds, "max_difference": difference, "batch": PROBE_BATCH}


def start_gpu_worker(worker_id: str, options, weights: str | None, seed: int, cuda_graphs: bool, capacity: int,
                     label: str | None = None):  # fmt: skip
    """Build the model on the device, resolve the precision, make the fixed buffers, compile or capture graphs,
    and run warm-up batches of the full shape: all of it the worker's start-up.

    A batch never spans two partitions, so the fixed batch is ``--batch-size`` or the largest partition
    (``capacity`` samples, rounded up to a multiple of 8), whichever is smaller: a 25 MB partition (1,277
    galaxies) padded to 4,096 rows would compute three times what it needs. ``label``: the device as the run
    names it, where the process sees it under another name (its only visible GPU, ``cuda:0``)."""
    import torch

    from cai_bench.engine import set_tf32
    from cai_bench.model.astromae import build_model
    from cai_bench.model.checkpoint import load_weights
    from cai_bench.model.inference import output_in_float32, prepare_for_inference

    started = time.perf_counter()
    device = torch.device(options.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.cuda.reset_peak_memory_stats(device)
    model = build_model(seed=seed)
    info = load_weights(model, weights) if weights else WeightsInfo(source=RANDOM_INIT, seed=seed)
    model = model.to(device).eval()
    choices = {"engine": "fast", "precision_requested": options.precision, **prepare_for_inference(model)}
    precision = options.precision
    if precision == "auto":
        if device.type == "cuda":
            precision, choices["precision_probe"] = choose_gpu_precision(model, device, choices["channels_last"])
        else:
            precision = "fp32"  # the CPU device only stands in for a GPU in tests
    if device.type != "cuda" and precision in ("tf32", "fp16"):
        raise UserError(f"--precision {precision} needs a CUDA device")
    if precision not in GPU_PRECISIONS:
        raise UserError(f"--precision {precision}: a device worker runs {', '.join(GPU_PRECISIONS)}")
    set_tf32(device.type == "cuda" and precision == "tf32")
    if precision in ("bf16", "fp16"):  # the output in float32, not rounded to the half type's coarse steps
        choices["float32_output_layer"] = output_in_float32(model)
    choices["precision"] = precision
    context = functools.partial(_autocast, device, precision)
    worker = WorkerState(worker_id, model, info, 0.0, 0.0, precision, choices["channels_last"], choices)
    batch = min(options.batch_size, -(-capacity // 8) * 8)
    choices["batch_size_effective"] = batch
    worker.pipeline = _new_pipeline(device, batch, choices["channels_last"])
    warm = time.perf_counter()
    if options.compile:
        mode = "reduce-overhead" if device.type == "cuda" else None  # its own CUDA graphs
        worker.model = torch.compile(worker.model, mode=mode)
    elif cuda_graphs:
        if device.type != "cuda":
            raise UserError("--cuda-graphs needs a CUDA device")
        try:
            _capture_graphs(worker, context)
        except Exception as exc:  # a model step that cannot be captured: plain launches, and the record says why
            worker.pipeline.graphs.clear()
            worker.pipeline.outputs.clear()
            torch.cuda.synchronize(device)
            choices["cuda_graphs_error"] = describe(exc)
    with torch.inference_mode(), context():
        for slot in (0, 1, 0):  # both slots, so that compilation sees every buffer it will be given
            _forward(worker, slot)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    end = time.perf_counter()
    choices.update({"compile": options.compile, "cuda_graphs": bool(worker.pipeline.graphs),
                    "device": label or str(device)})  # fmt: skip
    if options.compile or worker.pipeline.graphs:
        choices["compile_or_capture_s"] = end - warm
    if device.type == "cuda":
        choices.update(_gpu_facts(device))
    worker.startup_s, worker.warmup_batch_s = end - started, end - warm
    return worker


def _gpu_facts(device) -> dict:
    import torch

    properties = torch.cuda.get_device_properties(device)
    return {
        "gpu_name": properties.name,
        "gpu_memory_bytes": properties.total_memory,
        "gpu_capability": f"{properties.major}.{properties.minor}",
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
    }


def run_gpu_partition(partition: HostPartition, worker, options, wait_s: float):
    """The padded, double-buffered batches of one partition on the worker's device; a PartitionResult."""
    import torch

    from cai_bench.engine import set_tf32

    entered = time.perf_counter()
    # TF32 is a switch of the whole process: another worker started in it since (bench-gpu's fp32 reference) may
    # have turned it, so it is set from this worker's precision where its partition runs
    set_tf32(worker.precision == "tf32")
    pipeline, device = worker.pipeline, worker.pipeline.device
    cuda, batch, n = device.type == "cuda", pipeline.batch_size, partition.n
    host = partition.buffer
    prediction = torch.empty(n, dtype=torch.float32, device=device)
    spans = []  # per batch: (copy start, copy end, forward start, forward end) timers
    compute_stream = torch.cuda.current_stream(device) if cuda else None
    first = _Timer(device)
    try:
        first.record(compute_stream)
        with torch.inference_mode(), _autocast(device, worker.precision):
            for number, start in enumerate(range(0, n, batch)):
                stop, slot = min(start + batch, n), number % 2
                rows = stop - start
                timers = [_Timer(device) for _ in range(4)]
                if cuda:  # the copy waits for the slot's previous forward pass, on its own stream
                    pipeline.copy_stream.wait_event(pipeline.free[slot])
                    with torch.cuda.stream(pipeline.copy_stream):
                        timers[0].record(pipeline.copy_stream)
                        pipeline.images[slot][:rows].copy_(host.images[start:stop], non_blocking=True)
                        pipeline.magnitudes64[slot][:rows].copy_(host.magnitudes[start:stop], non_blocking=True)
                        timers[1].record(pipeline.copy_stream)
                        pipeline.copied[slot].record(pipeline.copy_stream)
                    compute_stream.wait_event(pipeline.copied[slot])
                else:
                    timers[0].record()
                    pipeline.images[slot][:rows].copy_(host.images[start:stop])
                    pipeline.magnitudes64[slot][:rows].copy_(host.magnitudes[start:stop])
                    timers[1].record()
                # Rows past ``rows`` still hold the slot's previous batch: finite values whose outputs are dropped
                timers[2].record(compute_stream)
                pipeline.magnitudes[slot].copy_(pipeline.magnitudes64[slot])  # the cast, on the device
                out = _forward(worker, slot)
                prediction[start:stop] = out[:rows, 0].float()
                timers[3].record(compute_stream)
                if cuda:
                    pipeline.free[slot].record(compute_stream)
                spans.append(timers)
        last = _Timer(device)
        last.record(compute_stream)
        result = prediction.cpu().numpy()  # waits for the device
    finally:
        if cuda:  # no copy from the host buffer may still be running when another partition is read into it
            torch.cuda.synchronize(device)
        partition.release()
    compute_s = first.elapsed_to(last)
    latencies = [t[2].elapsed_to(t[3]) for t in spans]
    stats = {
        "h2d_bytes": n * BITS_PER_SAMPLE // 8,
        "h2d_s": sum(t[0].elapsed_to(t[1]) for t in spans),
        "busy_s": sum(latencies),
        "max_memory_allocated_bytes": torch.cuda.max_memory_allocated(device) if cuda else None,
    }
    record = partition_record(
        worker, partition.ref, entered, samples=n, batch_size=batch, device=worker.choices.get("device", device),
        wait_s=wait_s,
        load_s=partition.load_s, compute_s=compute_s, latencies=latencies, device_stats=stats,
    )  # fmt: skip
    return PartitionResult(record, partition.object_id, result, partition.redshift)


# ---------------------------------------------------------------------------------------------- processes


@dataclass(frozen=True)
class DeviceWorkerSpec:
    device: str
    cuda_graphs: bool
    read_ahead: int
    capacity: int  # samples of the largest partition: the size of each pinned buffer


def device_visibility(device: str, visible: str | None) -> tuple[dict[str, str], str]:
    """What a device worker sets before CUDA starts in it, and the name its device then has: only its own GPU is
    visible, as ``cuda:0``, so that nothing it does (a pinned allocation, a read before ``set_device``) opens a
    context on another GPU. ``visible`` is the CUDA_VISIBLE_DEVICES the run started under, whose entries
    ``cuda:N`` counts."""
    if not device.startswith("cuda"):
        return {}, device
    index = int(device.partition(":")[2] or 0)
    entries = [v.strip() for v in (visible or "").split(",") if v.strip()]
    return {"CUDA_VISIBLE_DEVICES": entries[index] if entries else str(index)}, "cuda:0"


def device_worker_main(conn, worker_id: str, options, weights: str | None, seed: int, spec: DeviceWorkerSpec) -> None:
    """One device worker process: the engine's worker loop, reading into pinned buffers, running padded batches."""
    environment, local = device_visibility(spec.device, os.environ.get("CUDA_VISIBLE_DEVICES"))
    os.environ.update(environment)  # before any CUDA call of this process: the fork server made none
    import torch

    quiet_signals()
    torch.set_num_threads(max(1, spec.read_ahead))  # the host side only decodes and copies
    options = dataclasses.replace(options, device=local)
    pool = PinnedPool(spec.read_ahead + 1, spec.capacity, pin=spec.device.startswith("cuda"))
    serve_pipe(
        conn,
        lambda: start_gpu_worker(worker_id, options, weights, seed, spec.cuda_graphs, spec.capacity, spec.device),
        options,
        load=lambda ref: read_into(pool, ref, options.verify_checksums),
        run=lambda partition, worker, wait_s: run_gpu_partition(partition, worker, options, wait_s),
        read_ahead=spec.read_ahead,
    )


@dataclass
class DeviceTotals:
    """The run's device figures, summed over its partitions' records as they arrive."""

    h2d_bytes: int = 0
    h2d_s: float = 0.0
    busy_s: float = 0.0
    compute_s: float = 0.0
    peak_bytes: int = 0

    def add(self, record) -> None:
        stats = record.device_stats or {}
        self.h2d_bytes += stats.get("h2d_bytes", 0)
        self.h2d_s += stats.get("h2d_s", 0.0)
        self.busy_s += stats.get("busy_s", 0.0)
        self.compute_s += record.compute_s
        self.peak_bytes = max(self.peak_bytes, stats.get("max_memory_allocated_bytes") or 0)

    def figures(self, wall_s: float, devices: int = 1) -> dict:
        """``busy_fraction``: of the partitions' compute time, how much the model ran; ``busy_fraction_of_wall``:
        of the devices' whole wall clock, gaps between partitions included, how much the model ran."""
        return {
            "h2d_gbps": self.h2d_bytes / self.h2d_s / 1e9 if self.h2d_s else None,
            "busy_fraction": self.busy_s / self.compute_s if self.compute_s else None,
            "busy_fraction_of_wall": self.busy_s / (wall_s * devices) if wall_s > 0 else None,
            "peak_gpu_memory_bytes": self.peak_bytes or None,
        }


def run_devices(plan: Plan, emit: Emit, devices: list[str]) -> BackendRun:
    """One worker process per device, on the dispatcher; a device that fails loses only its units, which go to
    the others (no replacement is started on a device that failed)."""
    options = plan.backend_options
    retries = options.get("retries")
    totals = DeviceTotals()

    def counted(result) -> None:
        totals.add(result.record)
        emit(result)

    units = work_units(plan)
    dispatcher = Dispatcher(units, counted, DEFAULT_RETRIES if retries is None else retries)
    engine_options = plan_options(plan)
    capacity = max(ref.samples for ref in units)
    read_ahead = options.get("read_ahead") or 2
    specs = [DeviceWorkerSpec(d, bool(options.get("cuda_graphs")), read_ahead, capacity) for d in devices]
    context, server_s = worker_context()
    transport = NodeTransport(
        plan,
        len(devices),
        context,
        target=device_worker_main,
        args_for=lambda n: (engine_options, plan.weights, plan.seed, specs[n]),
        prefix="gpu",
        replace=False,
    )
    wall_s = transport.drive(dispatcher)
    info = {
        "devices": devices,
        "read_ahead": read_ahead,
        **totals.figures(wall_s, len(devices)),
        "worker_ready_after_s": transport.ready_after_s,
        "fork_server_start_s": server_s,
        "start_method": context.get_start_method(),
    }
    return dispatched_run(plan, dispatcher, wall_s, info, workers=len(devices))


@dataclass
class GpuBackend:
    name: str = "gpu"
    options: tuple[BackendOption, ...] = OPTIONS
    precisions: tuple[str, ...] = GPU_PRECISIONS
    default_batch_size: int = DEFAULT_BATCH_SIZE

    def check(self, options: dict) -> None:
        visible_devices(options.get("devices") or "all")

    def machine(self, plan: Plan) -> str | None:
        return None  # this machine, whose GPUs its environment lists

    def run(self, plan: Plan, emit: Emit) -> BackendRun:
        if plan.engine == "reference":
            raise UserError("--engine reference is the one-process upstream loop: run it with --backend cpu")
        return run_devices(plan, emit, visible_devices(plan.backend_options.get("devices") or "all"))


def create() -> GpuBackend:
    return GpuBackend()
