"""OpenVINO on the CPU: one compiled model with a stream per lane, and an infer request per lane.

The precision is always set explicitly (``INFERENCE_PRECISION_HINT``), never left to OpenVINO: its own default
picks bf16 from the CPU's flags alone, which was slower than f32 on CPUs without AMX, and under an AVX2-only
limit failed to compile a Softmax. "auto" is decided by the same probe as torch's (``worker.decide_precision``:
bf16 only with native bf16, at least 10% faster and within the tolerance), measured on this runtime; what the
compiled model then reports back as its precision goes into the record.

int8 (``openvino_int8``) is a model of its own, the transformer's matrix products quantized by NNCF, made once
per export into the cache; at every start it is checked against fp32 on the probe batch and a held-out batch and
refused, with both differences, where either is over the tolerance. Its inputs take magnitudes as float32.
"""

from __future__ import annotations

import time

import numpy as np
import openvino as ov

from cai_bench.core.machine import native_bf16_cpu
from cai_bench.inference.runtimes import RuntimeModel, judge_explicit, max_difference, probe_arrays
from cai_bench.inference.runtimes import openvino_int8 as int8
from cai_bench.inference.worker import PRECISION_TOLERANCE, decide_precision, forced_precision
from cai_bench.model.export_format import Export

HINTS = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}  # ours -> OpenVINO's hint (int8: the layers left in fp32)


def version() -> str:
    return ov.get_version()


def configuration(precision: str, lanes: int, threads: int) -> dict:
    return {
        "INFERENCE_PRECISION_HINT": HINTS[precision],
        "PERFORMANCE_HINT": "THROUGHPUT",
        "NUM_STREAMS": str(lanes),
        "INFERENCE_NUM_THREADS": lanes * threads,
    }


def compile_model(core: ov.Core, model, precision: str, lanes: int, threads: int):
    return core.compile_model(model, "CPU", configuration(precision, lanes, threads))


def predictor(compiled, magnitude_dtype=np.float64):
    request = compiled.create_infer_request()

    def predict(images: np.ndarray, magnitudes: np.ndarray) -> np.ndarray:
        request.infer([np.ascontiguousarray(images), np.ascontiguousarray(magnitudes, dtype=magnitude_dtype)])
        return request.get_output_tensor(0).data[:, 0].copy()

    return predict


def time_precisions(core: ov.Core, model, threads: int) -> dict:
    """f32 and bf16 compiled alike (one stream), the probe batch through each: best of 2 after a warm-up,
    alternated, and how far apart their predictions are."""
    image, magnitude = probe_arrays()
    predict = {p: predictor(compile_model(core, model, p, 1, threads)) for p in ("fp32", "bf16")}
    seconds: dict = {p: [] for p in ("fp32", "bf16")}
    outputs = {}
    for _ in range(3):
        for precision in predict:
            start = time.perf_counter()
            outputs[precision] = predict[precision](image, magnitude)
            seconds[precision].append(time.perf_counter() - start)
    return {
        "fp32_s": min(seconds["fp32"][1:]),
        "bf16_s": min(seconds["bf16"][1:]),
        "max_difference": max_difference(outputs["bf16"], outputs["fp32"]),
    }


def choose_precision(core: ov.Core, model, threads: int) -> tuple[str, dict]:
    """For "auto": FORCE_PROBE_ENV's answer where it is set, else the probe's rule on this CPU and runtime."""
    forced = forced_precision(("fp32", "bf16"))
    if forced:
        return forced
    native = native_bf16_cpu()
    if not native:
        return "fp32", {"chose": "fp32", "why": decide_precision(False, 0.0, 0.0, 0.0)[1]}
    measured = time_precisions(core, model, threads)
    chose, why = decide_precision(native, **measured, tolerance=PRECISION_TOLERANCE)
    return chose, {"chose": chose, "why": why, **measured, "batch": len(probe_arrays()[0])}


def auto_precision(export: Export, threads: int) -> tuple[str, dict]:
    """``choose_precision`` on the export, as a worker with ``threads`` threads would probe it."""
    core = ov.Core()
    return choose_precision(core, core.read_model(export.model_file), threads)


def compile_int8(core: ov.Core, export: Export, lanes: int, threads: int):
    """The int8 export of ``export`` (itself where it is one; else made into the cache first), compiled, and
    checked on this machine: refused where the probe or the held-out batch is over the tolerance."""
    made = {}
    if export.meta.get("precision") != "int8":
        export, made = int8.cached_int8_export(export, threads)
    compiled = compile_model(core, core.read_model(export.model_file), "int8", lanes, threads)
    differences = int8.check(export, compiled)
    judged = judge_explicit("int8", max(differences.values()), where="the probe and a held-out batch, on this machine")
    quantization = export.meta.get("quantization") or {}
    probe = {"chose": "int8", **judged, "max_difference_by_batch": differences, **made,
             "quantization": {k: quantization.get(k) for k in ("kept", "attempts", "quantized_products")}}  # fmt: skip
    return compiled, probe


def compile_export(export: Export, precision: str, lanes: int, threads: int) -> RuntimeModel:
    core = ov.Core()
    if precision == "int8":
        compiled, probe = compile_int8(core, export, lanes, threads)
        chose = "int8"
    else:
        model = core.read_model(export.model_file)
        if precision == "auto":
            chose, probe = choose_precision(core, model, threads)
        else:
            chose, probe = precision, {"chose": precision, "why": "asked for"}
        compiled = compile_model(core, model, chose, lanes, threads)
    threading = {
        "streams": int(compiled.get_property("NUM_STREAMS")),
        "infer_requests": lanes,
        "threads": int(compiled.get_property("INFERENCE_NUM_THREADS")),
        "performance_hint": str(compiled.get_property("PERFORMANCE_HINT")),
    }
    choices = {
        "runtime_version": version(),
        "threading": threading,
        "precision_hint": HINTS[chose],
        # what the compiled model says it runs: where the CPU lacks bf16, OpenVINO may run f32 whatever the hint
        "inference_precision": str(compiled.get_property("INFERENCE_PRECISION_HINT")),
        "precision_probe": probe,
    }
    dtype = np.float32 if chose == "int8" else np.float64  # the int8 export takes magnitudes as float32
    return RuntimeModel([predictor(compiled, dtype) for _ in range(lanes)], chose, choices)
