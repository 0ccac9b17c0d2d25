"""The values of the enumerated options, importable without torch: the CLI builds its choices from them, and the
modules that act on a value check it against the same tuple. (The backends' names are the registry's,
``backends/registry.py``.)"""

from __future__ import annotations

import enum

# auto: the fastest precision a start-up probe finds at least 10% faster than fp32 and within 2e-3 of it.
# tf32 and fp16 are CUDA's (a backend says which it takes: Backend.precisions)
# int8: onnxruntime's (dynamic quantization of the matrix products, explicit only) and openvino's (NNCF's static
# quantization of the transformer's products, weighed by auto where the CPU has int8 dot products); either is kept
# only where it stays within the same tolerance
PRECISIONS = ("auto", "fp32", "bf16", "int8", "tf32", "fp16")
CPU_PRECISIONS = ("auto", "fp32", "bf16", "int8")
# A GPU runs no int8 (its torch path has no quantized kernels here): an int8 run would be fp32 under int8's name
GPU_PRECISIONS = ("auto", "fp32", "tf32", "bf16", "fp16")
ENGINES = ("fast", "reference")
# What runs the model on a CPU worker: torch (the engines above), or an exported model (cai-bench model export)
# on ONNX Runtime or OpenVINO, in a worker that never imports torch
RUNTIMES = ("torch", "onnxruntime", "openvino")
# The precisions each runtime runs, beside "auto" (which every runtime takes)
RUNTIME_PRECISIONS = {"torch": ("fp32", "bf16"), "onnxruntime": ("fp32", "int8"), "openvino": ("fp32", "bf16", "int8")}
EXPORT_FORMATS = ("onnx", "openvino")
SLURM_EXECUTORS = ("slurm", "local")
REPORT_FORMATS = ("table", "markdown", "csv", "json")
FIGURE_FORMATS = ("png", "svg", "pdf")


def choice(name: str, values) -> type[enum.Enum]:
    """A str-valued Enum of ``values``, which Typer shows and checks as the option's choices."""
    return enum.Enum(name, {v: v for v in values}, type=str)


# Where the fine-tuned pcm-AstroMAE weights come from: the CAI paper's code, as a whole pickled model that
# `cai-bench model convert` recovers without running it
UPSTREAM_WEIGHTS = "Mixed_Inception_z_VITAE_Base_Img_Full_New_Full.pt"
UPSTREAM_WEIGHTS_WHERE = "github.com/UVA-MLSys/AI-for-Astronomy, folder 'Anomaly Detection/Fine_Tune_Model/'"

# Set (by --reprobe): --runtime auto times the runtimes again instead of taking the answer kept in the cache
REPROBE_ENV = "CAI_BENCH_REPROBE"
