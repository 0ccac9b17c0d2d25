"""ONNX Runtime on the CPU: one ``InferenceSession`` per lane, each with its own intra-op threads.

Several single-threaded sessions beat one multi-threaded session on this model for the same reason two torch
lanes beat one two-threaded loop: its many small operations parallelise poorly inside one operation. Each
session holds its own copy of the weights (about 62 MB in fp32).

fp32 runs the export as it is; int8 (explicit only) is ONNX Runtime's dynamic quantization of the MatMul and
Gemm weights to signed 8 bits, made at start-up from the fp32 file and kept only within the tolerance on the
probe batch. There is no bf16 on the CPU provider, so "auto" is fp32.
"""

from __future__ import annotations

import logging
import os
import tempfile

import numpy as np
import onnxruntime as ort

from cai_bench.inference.runtimes import RuntimeModel, judge_explicit, max_difference, probe_arrays
from cai_bench.model.export_format import Export

QUANTIZED_OPS = ["MatMul", "Gemm"]  # the matrix products: where int8 pays; convolutions stay fp32


def version() -> str:
    return ort.__version__


def session(path: str, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: its notes on nodes it could not fold are not the user's to act on
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def predictor(sess: ort.InferenceSession):
    image_name, magnitude_name = (i.name for i in sess.get_inputs())

    def predict(images: np.ndarray, magnitudes: np.ndarray) -> np.ndarray:
        out = sess.run(
            None, {image_name: np.ascontiguousarray(images), magnitude_name: np.ascontiguousarray(magnitudes)}
        )
        return out[0][:, 0]

    return predict


def quantize_int8(source: str, out: str) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.disable(logging.WARNING)  # its advice to pre-process first is for static quantization
    try:
        quantize_dynamic(source, out, weight_type=QuantType.QInt8, op_types_to_quantize=QUANTIZED_OPS)
    finally:
        logging.disable(logging.NOTSET)


def compile_export(export: Export, precision: str, lanes: int, threads: int) -> RuntimeModel:
    if precision != "int8":
        probe = {"chose": "fp32", "why": "onnxruntime's CPU provider has no bf16; int8 only by explicit choice"}
        sessions = [session(export.model_file, threads) for _ in range(lanes)]
    else:
        with tempfile.TemporaryDirectory(prefix="cai-bench-int8-") as folder:  # the sessions hold the model
            path = os.path.join(folder, "model-int8.onnx")
            quantize_int8(export.model_file, path)
            sessions = [session(path, threads) for _ in range(lanes)]
        image, magnitude = probe_arrays()
        reference = predictor(session(export.model_file, threads))(image, magnitude)
        difference = max_difference(predictor(sessions[0])(image, magnitude), reference)
        probe = {"chose": "int8", **judge_explicit("int8", difference), "batch": len(image)}
    threading = {"sessions": lanes, "intra_op_threads": threads, "inter_op_threads": 1}
    choices = {"runtime_version": version(), "threading": threading, "precision_probe": probe}
    return RuntimeModel([predictor(s) for s in sessions], "int8" if precision == "int8" else "fp32", choices)
