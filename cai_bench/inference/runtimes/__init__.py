"""Workers on an exported model: ONNX Runtime (``onnx_runtime``) or OpenVINO (``openvino_runtime``), chosen by
``--runtime``, none of them importing torch.

An export (``cai-bench model export``, ``model/export.py``) is a directory: the model file(s) and
``export.json``, which names the weights it was made from (so records still name them), the format and how far
the exported model's predictions were from torch's on a fixed batch. A worker starts by compiling it for the
chosen precision and threading, then runs partitions read as numpy arrays, split between lanes as the torch
engine splits them: each lane a thread with a session (ONNX Runtime) or an infer request on a stream
(OpenVINO) of its own.

Precision, as on torch: "auto" is the fastest precision the runtime's start-up probe finds at least 10% faster
than fp32 and within PRECISION_TOLERANCE of it (OpenVINO: fp32 or bf16; ONNX Runtime: fp32, since its CPU
provider has no bf16); "int8" (ONNX Runtime's dynamic quantization of the matrix products) only by explicit
choice, and refused, with the difference measured on the probe batch, where it is over the same tolerance.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from cai_bench.core.choices import RUNTIMES
from cai_bench.core.errors import UserError
from cai_bench.core.machine import allowed_cpus
from cai_bench.core.plan import PartitionRef, check_runtime
from cai_bench.core.records import PartitionResult
from cai_bench.data.partitions import Partition, read_partition_arrays
from cai_bench.inference.worker import (
    PRECISION_TOLERANCE,
    WARMUP_BATCH,
    EngineOptions,
    WorkerState,
    partition_record,
    probe_arrays,
    run_in_lanes,
)
from cai_bench.measure.metrics import trim_heap
from cai_bench.model.export_format import EXPORT_META, Export, is_export, read_export  # noqa: F401 (named here too)

# runtime name -> module (imported only when chosen: a missing runtime never breaks another)
RUNTIME_MODULES = {
    "onnxruntime": "cai_bench.inference.runtimes.onnx_runtime",
    "openvino": "cai_bench.inference.runtimes.openvino_runtime",
}
# The Python package each runtime needs, and the extra that installs it
RUNTIME_PACKAGES = {"onnxruntime": ("onnxruntime", "onnx"), "openvino": ("openvino", "openvino")}


def runtime_module(runtime: str):
    """The module of ``runtime``, or one line saying what to install."""
    if runtime not in RUNTIME_MODULES:
        raise UserError(f"--runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    package, extra = RUNTIME_PACKAGES[runtime]
    try:
        importlib.import_module(package)
    except ImportError:
        raise UserError(f"--runtime {runtime} needs {package}: pip install 'cai-bench[{extra}]'") from None
    return importlib.import_module(RUNTIME_MODULES[runtime])


def auto_precision(runtime: str, model: str, threads: int) -> tuple[str, dict]:
    """What precision "auto" runs as on ``runtime`` with the export ``model`` on this machine, and why (the
    probe's figures): what a sweep asks once for all its points."""
    if runtime == "onnxruntime":
        return "fp32", {"chose": "fp32", "why": "onnxruntime's CPU provider has no bf16; int8 only by explicit choice"}
    return runtime_module(runtime).auto_precision(read_export(model, runtime), threads)


def int8_export(model: str) -> tuple[Export, dict]:
    """The OpenVINO int8 export of the export ``model`` (itself where it is one), made into the cache first
    where missing, with what was done."""
    export = read_export(model, "openvino")
    if export.meta.get("precision") == "int8":
        return export, {}
    runtime_module("openvino")  # one line saying what to install, where openvino is missing
    module = importlib.import_module("cai_bench.inference.runtimes.openvino_int8")
    return module.cached_int8_export(export, allowed_cpus())


def judge_explicit(
    precision: str, max_difference: float, tolerance: float | None = None, where: str = "the probe batch"
) -> dict:
    """An explicitly chosen lower precision kept only within ``tolerance`` (default PRECISION_TOLERANCE, read
    when called) of fp32 on ``where``."""
    tolerance = PRECISION_TOLERANCE if tolerance is None else tolerance
    if not max_difference <= tolerance:
        raise UserError(
            f"--precision {precision}: its predictions on {where} differ from fp32 by up to "
            f"{max_difference:.3g} in redshift, over the {tolerance:g} tolerance; run fp32 (or auto)"
        )
    return {"max_difference": max_difference, "tolerance": tolerance, "why": f"within tolerance on {where}"}


def max_difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


@dataclass
class RuntimeModel:
    """A compiled export: one predictor per lane (each callable from its own thread), and what was chosen."""

    predictors: list[Callable[[np.ndarray, np.ndarray], np.ndarray]]  # (images, magnitudes) -> redshift [n]
    precision: str
    choices: dict = field(default_factory=dict)  # version, threading, precision hint, probe


def start_worker(worker_id: str, options: EngineOptions, model: str | None) -> WorkerState:
    """Compile the export ``model`` on ``options.runtime`` for the chosen precision and lanes, then one warm-up
    batch per lane; all of it timed as the worker's start-up, as the torch engine's is."""
    start = time.perf_counter()
    if not is_export(model):
        raise UserError(f"--runtime {options.runtime} runs an exported model: {model!r} is not one")
    export = read_export(model, options.runtime)
    module = runtime_module(options.runtime)
    check_runtime(options.runtime, options.precision, options.engine, options.compile)
    lanes = max(1, options.lanes)
    threads = options.intra_threads or max(1, allowed_cpus() // lanes)
    try:
        compiled = module.compile_export(export, options.precision, lanes, threads)
    except UserError:
        raise
    except Exception as exc:  # the runtime's own error on a damaged or foreign model file
        raise UserError(
            f"{model}: {options.runtime} cannot load the export ({str(exc).splitlines()[0][:200]})"
        ) from None
    warm = time.perf_counter()
    image, magnitude = probe_arrays(WARMUP_BATCH)
    for predict in compiled.predictors:
        predict(np.zeros_like(image), magnitude)
    end = time.perf_counter()
    choices = {
        "startup": {"compile_s": round(warm - start, 4), "warmup_s": round(end - warm, 4)},
        "engine": "exported",
        "runtime": options.runtime,
        "precision_requested": options.precision,
        "precision": compiled.precision,
        "lanes": lanes,
        **compiled.choices,
        "export": {"format": export.format, "max_abs_dz": export.check.get("max_abs_dz")},
    }
    return WorkerState(
        worker_id, compiled, export.weights, startup_s=end - start, warmup_batch_s=end - warm,
        precision=compiled.precision, choices=choices,
    )  # fmt: skip


def load_partition(ref: PartitionRef, options: EngineOptions) -> Partition:
    """A partition read and checked as numpy arrays (the torch engine's ``Partition`` holding numpy instead)."""
    started = time.perf_counter()
    arrays = read_partition_arrays(ref, verify=options.verify_checksums)
    return Partition(ref, arrays["images"], arrays["magnitudes"], arrays["redshift"], arrays["object_id"],
                     load_s=time.perf_counter() - started)  # fmt: skip


def run_partition(
    partition: Partition, worker: WorkerState, options: EngineOptions, wait_s: float = 0.0
) -> PartitionResult:
    """The torch engine's ``run_partition`` on a compiled export: the partition split evenly between the lanes,
    each batching its own share with its own predictor."""
    entered = time.perf_counter()
    model: RuntimeModel = worker.model
    n, batch = len(partition), options.batch_size
    prediction = np.empty(n, dtype=np.float32)

    def run_share(lane: int, lo: int, hi: int) -> list[float]:
        predict, latencies = model.predictors[lane], []
        for start in range(lo, hi, batch):
            stop = min(start + batch, hi)
            t0 = time.perf_counter()
            prediction[start:stop] = predict(partition.images[start:stop], partition.magnitudes[start:stop])
            latencies.append(time.perf_counter() - t0)
        return latencies

    compute_start = time.perf_counter()
    latencies = run_in_lanes(worker, n, len(model.predictors), run_share)
    compute_s = time.perf_counter() - compute_start
    trim_heap()
    record = partition_record(
        worker, partition.ref, entered, samples=n, batch_size=batch, device="cpu", wait_s=wait_s,
        load_s=partition.load_s, compute_s=compute_s, latencies=latencies,
    )  # fmt: skip
    return PartitionResult(record, partition.object_id, prediction, partition.redshift)


def loop_functions(options: EngineOptions) -> tuple[Callable, Callable]:
    """``load`` and ``run`` for ``loop.worker_loop``."""
    return (lambda ref: load_partition(ref, options)), (
        lambda partition, worker, wait_s: run_partition(partition, worker, options, wait_s=wait_s)
    )
