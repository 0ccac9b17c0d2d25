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
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cai_bench.choices import RUNTIMES
from cai_bench.data.partitions import Partition, read_partition_arrays
from cai_bench.errors import UserError
from cai_bench.metrics import allowed_cpus, trim_heap
from cai_bench.plan import PartitionRef, check_runtime
from cai_bench.records import PartitionResult, WeightsInfo
from cai_bench.worker import (
    PRECISION_TOLERANCE,
    WARMUP_BATCH,
    EngineOptions,
    WorkerState,
    partition_record,
    probe_arrays,
    run_in_lanes,
)

EXPORT_META = "export.json"
EXPORT_KIND = "cai-bench/model-export"
EXPORT_VERSION = 1
# runtime name -> module (imported only when chosen: a missing runtime never breaks another)
RUNTIME_MODULES = {"onnxruntime": "cai_bench.runtimes.onnx_runtime", "openvino": "cai_bench.runtimes.openvino_runtime"}
# The Python package each runtime needs, and the extra that installs it
RUNTIME_PACKAGES = {"onnxruntime": ("onnxruntime", "onnx"), "openvino": ("openvino", "openvino")}
# Which export formats a runtime reads
READS = {"onnxruntime": ("onnx",), "openvino": ("openvino", "onnx")}


@dataclass(frozen=True)
class Export:
    """An export directory as ``export.json`` describes it."""

    directory: str
    format: str  # "onnx" or "openvino"
    files: tuple[str, ...]  # every file of the export, the model file first
    weights: WeightsInfo
    check: dict  # {"batch", "max_abs_dz", "runtime", ...}: the export's own check against torch
    meta: dict

    @property
    def model_file(self) -> str:
        return str(Path(self.directory) / self.files[0])


def is_export(path: str | None) -> bool:
    return bool(path) and (Path(path) / EXPORT_META).is_file()


def read_export(directory: str | Path, runtime: str | None = None) -> Export:
    """The export in ``directory``, checked: its metadata, every file it names present, and (given ``runtime``)
    a format that runtime reads."""
    directory = Path(directory)
    try:
        meta = json.loads((directory / EXPORT_META).read_text())
    except OSError:
        raise UserError(f"{directory}: not a model export (no {EXPORT_META}); see cai-bench model export") from None
    except json.JSONDecodeError:
        raise UserError(f"{directory / EXPORT_META}: not valid JSON") from None
    if not isinstance(meta, dict) or meta.get("kind") != EXPORT_KIND:
        raise UserError(f"{directory / EXPORT_META}: not a cai-bench model export")
    if meta.get("version") != EXPORT_VERSION:
        raise UserError(f"{directory}: export version {meta.get('version')!r}, this cai-bench reads {EXPORT_VERSION}")
    files = tuple(meta.get("files") or ())
    if meta.get("format") not in ("onnx", "openvino") or not files:
        raise UserError(f"{directory / EXPORT_META}: no format or no files named")
    for name in files:
        plain = isinstance(name, str) and "/" not in name and "\\" not in name and not name.startswith(".")
        if not plain or not (directory / name).is_file():
            raise UserError(f"{directory}: the export names {name!r}, which is not a file there")
    weights = meta.get("weights") if isinstance(meta.get("weights"), dict) else {}
    info = WeightsInfo(weights.get("source", "unknown"), weights.get("sha256"), weights.get("seed"))
    if runtime is not None and meta["format"] not in READS[runtime]:
        reads = " or ".join(READS[runtime])
        raise UserError(f"{directory}: a {meta['format']} export; --runtime {runtime} reads {reads}")
    return Export(str(directory), meta["format"], files, info, dict(meta.get("check") or {}), meta)


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


def model_for_workers(weights: str | None, runtime: str, seed: int) -> tuple[str | None, dict]:
    """What the workers of ``runtime`` load, made ready by the driver before its clock starts: for torch the
    weights as given; for the others an export, ``weights`` itself where it is one, else the export of
    ``weights`` (random-init from ``seed`` when None) from the cache, made there first with torch when missing.
    Returns it with what was done, for the run record."""
    if runtime == "torch":
        if is_export(weights):
            raise UserError(f"{weights}: an exported model; run it with --runtime onnxruntime or openvino")
        return weights, {}
    if is_export(weights):
        read_export(weights, runtime)
        return weights, {"export_made": False}
    if weights and str(weights).startswith("s3:/"):
        raise UserError(f"--runtime {runtime} runs an export: export {weights} here first (cai-bench model export)")
    try:
        from cai_bench.model.export import cached_export
    except ImportError:
        raise UserError(f"--runtime {runtime} needs an export (--weights EXPORT_DIR), or torch to make one") from None
    export, seconds, cached = cached_export(weights, "openvino" if runtime == "openvino" else "onnx", seed)
    return export.directory, {"export_made": not cached, "export_s": round(seconds, 3)}


def judge_explicit(precision: str, max_difference: float, tolerance: float | None = None) -> dict:
    """An explicitly chosen lower precision kept only within ``tolerance`` (default PRECISION_TOLERANCE, read
    when called) of fp32 on the probe batch."""
    tolerance = PRECISION_TOLERANCE if tolerance is None else tolerance
    if not max_difference <= tolerance:
        raise UserError(
            f"--precision {precision}: its predictions on the probe batch differ from fp32 by up to "
            f"{max_difference:.3g} in redshift, over the {tolerance:g} tolerance; run fp32 (or auto)"
        )
    return {"max_difference": max_difference, "tolerance": tolerance, "why": "within tolerance on the probe batch"}


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
