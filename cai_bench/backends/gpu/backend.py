"""The ``gpu`` backend: its options, one process per device under the dispatcher (hpc's NodeTransport), and
the devices' totals in the record."""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass

from cai_bench.backends.base import BackendOption, BackendRun, Emit, dispatched_run
from cai_bench.backends.dispatch import DEFAULT_RETRIES, Dispatcher
from cai_bench.backends.gpu.devices import (
    DEFAULT_BATCH_SIZE,
    default_read_ahead,
    device_visibility,
    parse_devices,
    visible_devices,
)
from cai_bench.backends.gpu.host_buffers import PinnedPool, once_checked, read_into
from cai_bench.backends.gpu.pipeline import PartitionStream
from cai_bench.backends.gpu.start import start_gpu_worker
from cai_bench.backends.hpc import NodeTransport, quiet_signals, serve_pipe, worker_context
from cai_bench.backends.options import RETRIES
from cai_bench.core.choices import GPU_PRECISIONS
from cai_bench.core.errors import UserError
from cai_bench.core.plan import Plan, work_units
from cai_bench.inference.worker import plan_options

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


# ---------------------------------------------------------------------------------------------- processes


@dataclass(frozen=True)
class DeviceWorkerSpec:
    device: str
    cuda_graphs: bool
    read_ahead: int
    capacity: int  # samples of the largest partition: the size of each pinned buffer


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
