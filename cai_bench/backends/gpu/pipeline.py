"""The device pipeline: fixed-shape batches that span partitions, copied on a stream of their own into one of
two device buffers while the other computes, timed by CUDA events; CUDA graphs captured at start-up."""

from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass, field

from cai_bench.backends.gpu.host_buffers import HostPartition
from cai_bench.core.errors import describe
from cai_bench.core.plan import BITS_PER_SAMPLE
from cai_bench.core.records import PartitionResult
from cai_bench.inference.worker import partition_record

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


def new_pipeline(device, batch_size: int, channels_last: bool) -> DevicePipeline:
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


def autocast(device, precision: str):
    """The precision's autocast, without its cast cache: a CUDA graph must not capture cached weight casts,
    which the cache frees when the context ends (as torch's CUDA graph notes say)."""
    import torch

    if precision not in ("bf16", "fp16"):
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype, cache_enabled=False)


def forward_batch(worker, slot: int):
    pipeline = worker.pipeline
    if pipeline.graphs:
        pipeline.graphs[slot].replay()
        return pipeline.outputs[slot]
    return worker.model(pipeline.images[slot], pipeline.magnitudes[slot])


def captured_graph(device, precision_context, call) -> tuple[object, object]:
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


def capture_graphs(worker, precision_context) -> None:
    """One CUDA graph per slot, each replaying the model on that slot's buffers."""
    pipeline = worker.pipeline
    for slot in range(2):
        call = functools.partial(worker.model, pipeline.images[slot], pipeline.magnitudes[slot])
        graph, output = captured_graph(pipeline.device, precision_context, call)
        pipeline.graphs.append(graph)
        pipeline.outputs.append(output)


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
        with torch.inference_mode(), autocast(device, worker.precision):
            timers[0].record(self.compute_stream)
            pipeline.magnitudes[slot].copy_(pipeline.magnitudes64[slot])  # the cast, on the device
            out = forward_batch(worker, slot)
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
