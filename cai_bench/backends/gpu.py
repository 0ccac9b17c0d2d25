"""``gpu``: one worker process per CUDA device of this machine, all pulling partitions from one queue (the
dispatcher, through hpc's NodeTransport: pipes to processes from the fork server, which never touches CUDA).

Each device worker keeps its GPU busy:
- partitions are read, checked and decoded by ``read_ahead`` background threads straight into a pool of pinned
  host buffers, one per partition in flight, reused;
- batches span partitions (``PartitionStream``): a partition's rows fill the batch after the rows of the one
  before it, each batch is copied host-to-device on a stream of its own into one of two fixed device buffers,
  so the copy of batch k+1 overlaps the forward pass of batch k, and its outputs come back non-blocking into
  pinned memory; a partition is done when the batch with its last rows is back; magnitudes are cast to float32
  on the device;
- every batch has the same shape: a stream's last one is padded (rows of an earlier batch) and the padding's
  outputs are dropped, so a captured CUDA graph (``--cuda-graphs``) or ``torch.compile(mode="reduce-overhead")``
  replays every batch; capture and compilation happen at start-up and are timed as start-up, never as compute;
- precision ``auto`` is resolved on the device by a probe: the fastest of tf32, bf16 and fp16 that is at least
  10% faster than fp32 and within 2e-3 of it, else fp32.

Timing is by CUDA events: a partition's ``compute_s`` is its latency, from its first copy to the end of the batch
with its last rows, both on the device. Batches span partitions, so neighbours' latencies overlap and do not add
up: the device's own time is measured apart, as unions of intervals on the device's clock. Its busy time is the
union of its batches' forward passes, each batch's part shared between the partitions by rows (the record's
``busy_s``: the parts add up to the device's busy time); its active time is the union of the partitions'
latencies, each partition adding what it extends that union by. ``device_stats`` holds both, with the
host-to-device copies, the bytes copied, and the device's peak memory since start-up. The same code runs on the CPU
device (streams and events become synchronous timers), which is how the tests check it here:
``run_devices(plan, emit, ["cpu"])``.

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
from collections.abc import Callable
from dataclasses import dataclass, field

from cai_bench.backends.base import BackendOption, BackendRun, Emit, dispatched_run
from cai_bench.backends.dispatch import DEFAULT_RETRIES, Dispatcher
from cai_bench.backends.hpc import NodeTransport, quiet_signals, serve_pipe, worker_context
from cai_bench.backends.options import RETRIES
from cai_bench.core.choices import GPU_PRECISIONS
from cai_bench.core.errors import UserError, describe
from cai_bench.core.machine import allowed_cpus
from cai_bench.core.plan import BITS_PER_SAMPLE, Plan, work_units
from cai_bench.core.records import RANDOM_INIT, PartitionResult, WeightsInfo
from cai_bench.data.partitions import read_partition
from cai_bench.inference.worker import (
    PRECISION_TOLERANCE,
    WorkerState,
    forced_precision,
    partition_record,
    plan_options,
)

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
        "read_ahead", int, "Partitions read (each by a thread) into pinned host buffers ahead of the device.",
        "the cores per device, 2 to 8", minimum=1, identity=False,
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


def _captured(device, precision_context, call) -> tuple[object, object]:
    """``call()`` as a CUDA graph, captured after warm-up passes on a side stream (as CUDA graphs require): the
    graph and the output tensor its replays write."""
    import torch

    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side), torch.inference_mode(), precision_context():
        for _ in range(3):
            call()
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.inference_mode(), precision_context(), torch.cuda.graph(graph):
        output = call()
    return graph, output


def _capture_graphs(worker, precision_context) -> None:
    """One CUDA graph per slot, each replaying the model on that slot's buffers."""
    pipeline = worker.pipeline
    for slot in range(2):
        call = functools.partial(worker.model, pipeline.images[slot], pipeline.magnitudes[slot])
        graph, output = _captured(pipeline.device, precision_context, call)
        pipeline.graphs.append(graph)
        pipeline.outputs.append(output)


def _probe_runner(model, image, magnitude, precision: str, graphs: bool) -> tuple[Callable, str | None]:
    """One candidate precision on the probe batch as the worker will run it: replays of a CUDA graph captured
    for it (``graphs``), else plain launches. Returns the call, and why a graph could not be captured (then
    plain launches are timed)."""
    import torch

    from cai_bench.inference.engine import set_tf32

    device, why = image.device, None
    set_tf32(precision == "tf32")
    run = functools.partial(model, image, magnitude)
    if graphs:
        try:
            graph, captured = _captured(device, functools.partial(_autocast, device, precision), run)

            def run():
                graph.replay()
                return captured
        except Exception as exc:  # a step that cannot be captured: plain launches, as the worker then runs
            torch.cuda.synchronize(device)
            why = describe(exc)
    return run, why


def _time_once(run, device, precision: str) -> tuple[float, object]:
    """One pass of ``run`` under ``precision``, timed by CUDA events: seconds and the output."""
    import torch

    from cai_bench.inference.engine import set_tf32

    set_tf32(precision == "tf32")
    began, ended = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    began.record()
    with _autocast(device, precision):
        output = run().float()
    ended.record()
    ended.synchronize()
    return began.elapsed_time(ended) / 1e3, output


def _probe_seconds(runners: dict, device, rounds: int = 4) -> tuple[dict, dict]:
    """The candidates take turns, a pass each per round (as the CPU probe does), so that a GPU still clocking up
    does not favour the ones timed last; each one's best pass after its first. Seconds and outputs."""
    times: dict[str, list[float]] = {p: [] for p in runners}
    outputs = {}
    for _ in range(rounds):
        for precision, run in runners.items():
            seconds, output = _time_once(run, device, precision)
            times[precision].append(seconds)
            outputs[precision] = output.clone()
    return {p: min(t[1:]) for p, t in times.items()}, outputs


def choose_gpu_precision(model, device, channels_last: bool, batch: int = PROBE_BATCH,
                         graphs: bool = False) -> tuple[str, dict]:  # fmt: skip
    """For precision "auto" on a GPU: each candidate against fp32 on a probe batch of realistic galaxies (tiled
    to the worker's ``batch`` rows), run as the worker will run it (``_probe_runner``), timed taking turns
    (``_probe_seconds``); the fastest that is at least 10% faster and within PRECISION_TOLERANCE wins."""
    import torch

    from cai_bench.inference.engine import native_bf16, probe_inputs, set_tf32

    forced = forced_precision(GPU_PRECISIONS[1:])
    if forced:
        return forced
    image, magnitude = probe_inputs(device, channels_last, PROBE_BATCH)
    repeats = -(-batch // PROBE_BATCH)
    image = image.repeat(repeats, 1, 1, 1)[:batch].contiguous(memory_format=image_format(channels_last))
    magnitude = magnitude.repeat(repeats, 1)[:batch].contiguous()
    bf16 = native_bf16(device)
    candidates = ["fp32", "tf32", "fp16"] + (["bf16"] if bf16 else [])
    with torch.inference_mode():
        made = {p: _probe_runner(model, image, magnitude, p, graphs) for p in candidates}
        seconds, outputs = _probe_seconds({p: run for p, (run, _) in made.items()}, device)
    graph_errors = {p: why for p, (_, why) in made.items() if why}
    set_tf32(False)
    difference = {p: float((outputs[p] - outputs["fp32"]).abs().max()) for p in candidates}
    good = [p for p in candidates[1:] if seconds[p] < 0.9 * seconds["fp32"] and difference[p] <= PRECISION_TOLERANCE]
    chose = min(good, key=seconds.get) if good else "fp32"
    why = "fastest within tolerance" if good else "nothing 10% faster within tolerance"
    timed = "CUDA graph replays" if graphs and not graph_errors else "plain launches"
    return chose, {
        "chose": chose,
        "why": why,
        "seconds": seconds,
        "max_difference": difference,
        "batch": batch,
        "timed": f"{timed}, CUDA events, candidates taking turns",
        "bf16": "native" if bf16 else "not a candidate: no bf16 in hardware (emulated only)",
        **({"graph_errors": graph_errors} if graph_errors else {}),
    }


def image_format(channels_last: bool):
    import torch

    return torch.channels_last if channels_last else torch.contiguous_format


def start_gpu_worker(worker_id: str, options, weights: str | None, seed: int, cuda_graphs: bool,
                     label: str | None = None):  # fmt: skip
    """Build the model on the device, resolve the precision, make the fixed buffers, compile or capture graphs,
    and run warm-up batches of the full shape: all of it the worker's start-up.

    The fixed batch is ``--batch-size``: batches span partitions (``PartitionStream``), so only a stream's last
    batch is padded. ``label``: the device as the run names it, where the process sees it under another name (its
    only visible GPU, ``cuda:0``)."""
    import torch

    from cai_bench.inference.engine import set_tf32
    from cai_bench.model.astromae import build_model
    from cai_bench.model.checkpoint import load_weights
    from cai_bench.model.inference import output_in_float32, prepare_for_inference

    started = time.perf_counter()
    device = torch.device(options.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True  # one batch shape: cuDNN's fastest algorithms, found once (probe too)
    model = build_model(seed=seed)
    info = load_weights(model, weights) if weights else WeightsInfo(source=RANDOM_INIT, seed=seed)
    model = model.to(device).eval()
    choices = {"engine": "fast", "precision_requested": options.precision, **prepare_for_inference(model)}
    precision = options.precision
    if precision in ("auto", "bf16", "fp16"):  # before the probe, which then times what will run
        float32_output = output_in_float32(model)  # under fp32 and tf32 it computes as the plain layer
    if precision == "auto":
        if device.type == "cuda":
            precision, choices["precision_probe"] = choose_gpu_precision(
                model, device, choices["channels_last"], options.batch_size, cuda_graphs and not options.compile
            )  # fmt: skip
        else:
            precision = "fp32"  # the CPU device only stands in for a GPU in tests
    if device.type != "cuda" and precision in ("tf32", "fp16"):
        raise UserError(f"--precision {precision} needs a CUDA device")
    if precision not in GPU_PRECISIONS:
        raise UserError(f"--precision {precision}: a device worker runs {', '.join(GPU_PRECISIONS)}")
    set_tf32(device.type == "cuda" and precision == "tf32")
    if precision in ("bf16", "fp16"):  # the output in float32, not rounded to the half type's coarse steps
        choices["float32_output_layer"] = float32_output
    choices["precision"] = precision
    context = functools.partial(_autocast, device, precision)
    worker = WorkerState(worker_id, model, info, 0.0, 0.0, precision, choices["channels_last"], choices)
    batch = options.batch_size
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
                    "device": label or str(device), "cudnn_benchmark": device.type == "cuda"})  # fmt: skip
    if options.compile or worker.pipeline.graphs:
        choices["compile_or_capture_s"] = end - warm
    if device.type == "cuda":
        choices.update(_gpu_facts(device))
        # The probe, the graph capture and the warm-up peak apart: the records' peak is the run's own
        choices["startup_peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
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


@dataclass
class DeviceUnion:
    """The length of a union of intervals on one clock, grown one interval at a time, intervals given in the order
    of their starts (a stream's batches, a stream's partitions): ``add`` returns what the interval extends it by."""

    until: float = float("-inf")  # where the union so far ends
    total: float = 0.0

    def add(self, start: float, end: float) -> float:
        added = max(0.0, end - max(start, self.until))
        self.until = max(self.until, end)
        self.total += added
        return added


@dataclass
class _InFlight:
    """A partition whose rows are on their way through the batches: where its outputs go, and how many are left."""

    position: int  # the unit's place in the run's list of work
    partition: HostPartition
    entered: float  # perf_counter when the stream took it
    wait_s: float
    prediction: object  # numpy float32 [n]
    left: int  # rows whose outputs have not come back yet
    first: _Timer | None = None  # the first copy of its rows begins
    latencies: list = field(default_factory=list)  # the forward passes of the batches that held its rows
    h2d_s: float = 0.0  # its rows' share of those batches' copies
    busy_s: float = 0.0  # its rows' share of what those batches' forward passes add to the device's busy union


@dataclass
class _Batch:
    """One fixed-size batch in a device slot: which rows of which partitions it holds, its four timers (copy
    start, copy end, forward start, forward end) and, on a GPU, the event of its outputs being back on the host."""

    segments: list  # (in-flight partition, first row of the partition, rows, first row in the batch)
    timers: list
    done: object = None  # torch.cuda.Event on a GPU


class PartitionStream:
    """A device worker's batches, filled across partitions: a partition's rows go into the slot being filled
    after the rows of the partition before it, a full batch is launched at once, and its outputs come back
    non-blocking into pinned host memory. A partition is done, and its record built, when the batch holding its
    last rows is back; the device meanwhile runs the next batch. With 1,276-galaxy partitions and 4,096-row
    batches the device runs full batches instead of one partition per padded batch, copy -> forward -> copy back
    in series.

    ``feed`` takes a partition and returns what finished meanwhile; ``drain`` launches the last, padded batch and
    returns the rest. Each as ``(position, PartitionResult or an error message)``: where a step fails, every
    partition in flight fails with it (the dispatcher runs them again elsewhere)."""

    def __init__(self, worker):
        import torch

        self.worker, self.pipeline = worker, worker.pipeline
        device = self.pipeline.device
        self.cuda, self.batch = device.type == "cuda", self.pipeline.batch_size
        self.compute_stream = torch.cuda.current_stream(device) if self.cuda else None
        self.host_out = [torch.empty(self.batch, dtype=torch.float32, pin_memory=self.cuda) for _ in range(2)]
        self.slot, self.filled, self.filling = 0, 0, _Batch([], [])
        self.launched: list[_Batch | None] = [None, None]  # per slot, its batch whose outputs are not read yet
        self.in_flight: dict[int, _InFlight] = {}
        self.origin = _Timer(device)  # the device clock's zero, which the unions are measured on
        self.origin.record(self.compute_stream)
        self.busy = DeviceUnion()  # the batches' forward passes
        self.active = DeviceUnion()  # the partitions' latencies

    def feed(self, position: int, partition: HostPartition, wait_s: float) -> list:
        import numpy as np
        import torch

        item = _InFlight(position, partition, time.perf_counter(), wait_s, np.empty(partition.n, np.float32),
                         partition.n)  # fmt: skip
        self.in_flight[position] = item
        try:
            finished, row = [], 0
            while row < partition.n:
                take = min(self.batch - self.filled, partition.n - row)
                finished += self._copy(item, row, take)
                row += take
                if self.filled == self.batch:
                    self._launch()
            if self.cuda:  # its rows are on the device (the copy stream runs in order): its buffer is free
                copied = torch.cuda.Event()
                copied.record(self.pipeline.copy_stream)
                copied.synchronize()
            partition.release()
            return finished + self._collect(block=False)
        except Exception as exc:
            return self._fail(exc)

    def drain(self) -> list:
        try:
            if self.filled:
                self._launch()  # rows past ``filled`` still hold an earlier batch's: outputs dropped
            return self._collect(block=True)
        except Exception as exc:
            return self._fail(exc)

    def _copy(self, item: _InFlight, row: int, rows: int) -> list:
        """``rows`` rows of ``item`` from ``row`` into the slot being filled, after it: on a GPU on the copy
        stream, once the slot's previous batch is done with its buffers (its outputs read first)."""
        import torch

        pipeline, slot, at = self.pipeline, self.slot, self.filled
        finished = self._read(slot) if at == 0 else []
        host, timers = item.partition.buffer, [_Timer(pipeline.device), _Timer(pipeline.device)]
        stream = pipeline.copy_stream
        with torch.cuda.stream(stream) if self.cuda else contextlib.nullcontext():
            if self.cuda and at == 0:
                stream.wait_event(pipeline.free[slot])
            timers[0].record(stream)
            pipeline.images[slot][at : at + rows].copy_(host.images[row : row + rows], non_blocking=self.cuda)
            pipeline.magnitudes64[slot][at : at + rows].copy_(host.magnitudes[row : row + rows], non_blocking=self.cuda)
            timers[1].record(stream)
            if self.cuda:
                pipeline.copied[slot].record(stream)
        item.first = item.first or timers[0]
        self.filling.segments.append((item, row, rows, at))
        self.filling.timers.append(timers)
        self.filled += rows
        return finished

    def _launch(self) -> None:
        """The filled slot's forward pass, its outputs copied back non-blocking; the other slot fills next."""
        import torch

        from cai_bench.inference.engine import set_tf32

        pipeline, slot, worker, device = self.pipeline, self.slot, self.worker, self.pipeline.device
        batch, timers = self.filling, [_Timer(device), _Timer(device)]
        # TF32 is a switch of the whole process: another worker started in it since (bench-gpu's fp32 reference)
        # may have turned it, so it is set from this worker's precision where its batches run
        set_tf32(worker.precision == "tf32")
        if self.cuda:
            self.compute_stream.wait_event(pipeline.copied[slot])
        with torch.inference_mode(), _autocast(device, worker.precision):
            timers[0].record(self.compute_stream)
            pipeline.magnitudes[slot].copy_(pipeline.magnitudes64[slot])  # the cast, on the device
            out = _forward(worker, slot)
            self.host_out[slot][: self.filled].copy_(out[: self.filled, 0].float(), non_blocking=self.cuda)
            timers[1].record(self.compute_stream)
        if self.cuda:
            pipeline.free[slot].record(self.compute_stream)
            batch.done = torch.cuda.Event()
            batch.done.record(self.compute_stream)
        batch.timers = [(t[0], t[1], timers[0], timers[1]) for t in batch.timers]
        self.launched[slot] = batch
        self.slot, self.filled, self.filling = 1 - slot, 0, _Batch([], [])

    def _collect(self, block: bool) -> list:
        """The partitions finished by launched batches that are back (all of them with ``block``), oldest first."""
        finished = []
        for slot in (self.slot, 1 - self.slot):  # the older launch is in the slot that fills next
            batch = self.launched[slot]
            if batch is not None and (block or batch.done is None or batch.done.query()):
                finished += self._read(slot)
        return finished

    def _read(self, slot: int) -> list:
        """The outputs of ``slot``'s launched batch into their partitions; those now whole, as results."""
        batch = self.launched[slot]
        if batch is None:
            return []
        if batch.done is not None:
            batch.done.synchronize()
        self.launched[slot] = None
        outputs = self.host_out[slot].numpy()
        began, ended = batch.timers[0][2], batch.timers[0][3]
        forward = began.elapsed_to(ended)
        added = self.busy.add(self.origin.elapsed_to(began), self.origin.elapsed_to(ended))
        rows_in_batch = sum(rows for _, _, rows, _ in batch.segments)
        finished = []
        for (item, row, rows, at), (c0, c1, _, end) in zip(batch.segments, batch.timers, strict=True):
            item.prediction[row : row + rows] = outputs[at : at + rows]
            item.left -= rows
            item.latencies.append(forward)
            item.h2d_s += c0.elapsed_to(c1)
            item.busy_s += added * rows / rows_in_batch
            if item.left == 0:
                finished.append((item.position, self._result(item, end)))
        return finished

    def _result(self, item: _InFlight, end: _Timer) -> PartitionResult:
        import torch

        self.in_flight.pop(item.position, None)
        partition, device = item.partition, self.pipeline.device
        stats = {
            "h2d_bytes": partition.n * BITS_PER_SAMPLE // 8,
            "h2d_s": item.h2d_s,
            "busy_s": item.busy_s,
            "active_s": self.active.add(self.origin.elapsed_to(item.first), self.origin.elapsed_to(end)),
            "max_memory_allocated_bytes": torch.cuda.max_memory_allocated(device) if self.cuda else None,
        }
        record = partition_record(
            self.worker, partition.ref, item.entered, samples=partition.n, batch_size=self.batch,
            device=self.worker.choices.get("device", device), wait_s=item.wait_s, load_s=partition.load_s,
            compute_s=item.first.elapsed_to(end), latencies=item.latencies, device_stats=stats, busy_s=item.busy_s,
        )  # fmt: skip
        return PartitionResult(record, partition.object_id, item.prediction, partition.redshift)

    def _fail(self, exc: BaseException) -> list:
        """Every partition in flight fails with ``exc``; the stream starts empty again."""
        import torch

        with contextlib.suppress(Exception):
            if self.cuda:
                torch.cuda.synchronize(self.pipeline.device)
        failed = [(position, describe(exc)) for position in self.in_flight]
        for item in self.in_flight.values():
            item.partition.release()
        self.in_flight.clear()
        self.launched, self.slot, self.filled, self.filling = [None, None], 0, 0, _Batch([], [])
        return failed


def run_gpu_partition(partition: HostPartition, worker, wait_s: float):
    """One partition alone through a stream of its own (its last batch padded); a PartitionResult."""
    stream = PartitionStream(worker)
    finished = stream.feed(0, partition, wait_s) + stream.drain()
    outcome = dict(finished)[0]
    if isinstance(outcome, str):
        raise RuntimeError(outcome)
    return outcome


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
    streams: dict[int, PartitionStream] = {}  # the worker's one stream, made once the worker has started

    def stream_of(worker) -> PartitionStream:
        return streams.setdefault(id(worker), PartitionStream(worker))

    serve_pipe(
        conn,
        lambda: start_gpu_worker(worker_id, options, weights, seed, spec.cuda_graphs, spec.device),
        options,
        load=once_checked(functools.partial(read_into, pool), options.verify_checksums),
        run=lambda partition, worker, wait_s, position: stream_of(worker).feed(position, partition, wait_s),
        drain=lambda worker: stream_of(worker).drain(),
        read_ahead=spec.read_ahead,
    )


def default_read_ahead(devices: int) -> int:
    """Reader threads per device worker: the cores this process may use, shared between the devices, 2 to 8
    (reading, the sha256 check and decoding are the host's work; a device eats a 25 MB partition in milliseconds)."""
    return max(2, min(8, allowed_cpus() // max(1, devices)))


def once_checked(load: Callable, verify: bool) -> Callable:
    """``load(ref, verify)`` that checks a partition's sha256 on its first read only: with ``--cycle-to-gb`` a
    worker reads the same partitions again and again, and a 25 MB hash is some 20 ms of a reader's time."""
    checked: set[str] = set()

    def loaded(ref):
        partition = load(ref, verify and ref.path not in checked)
        if verify:
            checked.add(ref.path)  # after a read that passed its check
        return partition

    return loaded


@dataclass
class DeviceTotals:
    """The run's device figures, summed over its partitions' records as they arrive: their parts of the devices'
    busy and active unions add up to those unions."""

    h2d_bytes: int = 0
    h2d_s: float = 0.0
    busy_s: float = 0.0
    active_s: float = 0.0
    peak_bytes: int = 0

    def add(self, record) -> None:
        stats = record.device_stats or {}
        self.h2d_bytes += stats.get("h2d_bytes", 0)
        self.h2d_s += stats.get("h2d_s", 0.0)
        self.busy_s += stats.get("busy_s", 0.0)
        self.active_s += stats.get("active_s", 0.0)
        self.peak_bytes = max(self.peak_bytes, stats.get("max_memory_allocated_bytes") or 0)

    def figures(self, wall_s: float, devices: int = 1) -> dict:
        """``busy_fraction``: of the time a device had partitions in flight, how much the model ran;
        ``busy_fraction_of_wall``: of the devices' whole wall clock, gaps between partitions included."""
        return {
            "h2d_gbps": self.h2d_bytes / self.h2d_s / 1e9 if self.h2d_s else None,
            "device_busy_s": self.busy_s,
            "device_active_s": self.active_s,
            "busy_fraction": self.busy_s / self.active_s if self.active_s else None,
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
    read_ahead = options.get("read_ahead") or default_read_ahead(len(devices))
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
        "workers_stop_s": round(transport.stop_s, 6),  # after the last result, apart from the wall
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
